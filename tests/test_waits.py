"""The general wait, at the store: a run parks on waits (kind, key, deadline); an outcome
delivered for one of them wakes it, journals the outcome and withdraws the others in one
transaction; a claim at the deadline withdraws them too. On both databases."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select

import tether
from tether.journal import Claim, Commit, JournalEntry, Wait
from tether.store.schema import waits
from tether.testing import FakeClock, active_agent
from tether.types import RunStatus, StepStatus
from tether.vocabulary import StepKind, WaitKind

WORKER = "test-worker:1:0"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def parked(db_url: str, clock: FakeClock) -> Any:
    """A run parked at journal position 1 on a message (key ``inbox``) or a deadline in an
    hour, the way the executor parks one."""
    app = tether.App(db_url, clock=clock)

    @app.agent("listener")
    def listener(ctx: tether.RunContext, task: Any) -> None:
        return None

    active_agent(app, "listener", "l1")
    run_id = app.submit("l1").run_id
    [claim] = app.store.claim_runs(WORKER, ["listener"], 1, 30.0)
    deadline = clock() + dt.timedelta(hours=1)
    entry = JournalEntry(1, "receive", StepKind.SLEEP, StepStatus.WAITING, output={})
    alternatives = [
        Wait(1, WaitKind.MESSAGE, "inbox"),
        Wait(1, WaitKind.TIMER, "", deadline),
    ]
    change = Commit(entries=[entry], status=RunStatus.WAITING, waits=alternatives, release=True)
    app.store.commit(claim.ref, change, "l1", 30.0)
    try:
        yield app, run_id, deadline
    finally:
        app.close()


def deliver(app: tether.App, kind: WaitKind, key: str, outcome: Any) -> list[str]:
    with app.store.db.write() as conn:
        return app.store.deliver(conn, kind, key, outcome, app.clock())


def waits_of(app: tether.App, run_id: str) -> list[tuple[str, str]]:
    with app.store.db.read() as conn:
        rows = conn.execute(select(waits.c.kind, waits.c.key).where(waits.c.run_id == run_id)).all()
    return sorted((r.kind, r.key) for r in rows)


def test_a_parked_run_waits_for_the_first_of_its_waits(parked: Any) -> None:
    app, run_id, deadline = parked

    info = app.get_run(run_id)
    assert (info.status, info.owner, info.wake_at) == (RunStatus.WAITING, None, deadline)
    assert waits_of(app, run_id) == [("message", "inbox"), ("timer", "")]


def test_a_delivered_outcome_wakes_the_run_journals_it_and_withdraws_the_rest(
    parked: Any,
) -> None:
    app, run_id, _ = parked

    assert deliver(app, WaitKind.MESSAGE, "inbox", {"text": "hello"}) == [run_id]

    info = app.get_run(run_id)
    assert (info.status, info.wake_at) == (RunStatus.PENDING, None)
    assert waits_of(app, run_id) == []  # the deadline lost: withdrawn in the same commit
    [entry] = app.run_steps(run_id)
    assert entry.status == StepStatus.COMPLETED
    assert entry.output == {"kind": "message", "key": "inbox", "value": {"text": "hello"}}
    [woken] = [e for e in app.timeline(run_id) if e.type == "run.woken"]
    assert woken.data == {"kind": "message", "key": "inbox", "seq": 1}
    assert deliver(app, WaitKind.MESSAGE, "inbox", "again") == []  # consumed once


def test_an_outcome_for_something_nobody_waits_for_wakes_nothing(parked: Any) -> None:
    app, run_id, _ = parked

    assert deliver(app, WaitKind.MESSAGE, "elsewhere", 1) == []
    assert deliver(app, WaitKind.CHILD, "inbox", 1) == []
    assert app.get_run(run_id).status == RunStatus.WAITING


def test_a_paused_run_takes_its_outcome_and_stays_paused(parked: Any) -> None:
    app, run_id, _ = parked
    app.pause("l1")

    assert deliver(app, WaitKind.MESSAGE, "inbox", "while paused") == [run_id]

    assert app.get_run(run_id).status == RunStatus.PAUSED
    assert app.run_steps(run_id)[0].output["value"] == "while paused"
    app.resume("l1")
    assert app.get_run(run_id).status == RunStatus.PENDING


def test_a_claim_at_the_deadline_withdraws_the_waits_and_a_late_outcome_finds_none(
    parked: Any, clock: FakeClock
) -> None:
    app, run_id, _ = parked
    assert app.store.claim_runs(WORKER, ["listener"], 1, 30.0) == []  # not due yet

    clock.advance(3600)
    [claim] = app.store.claim_runs(WORKER, ["listener"], 1, 30.0)

    assert isinstance(claim, Claim) and claim.ref.run_id == run_id
    assert waits_of(app, run_id) == []
    assert deliver(app, WaitKind.MESSAGE, "inbox", "too late") == []
    assert app.run_steps(run_id)[0].status == StepStatus.WAITING  # replay decides: a timeout


def test_cancelling_a_waiting_run_withdraws_its_waits(parked: Any) -> None:
    app, run_id, _ = parked

    app.cancel(run_id)

    assert waits_of(app, run_id) == []
    assert deliver(app, WaitKind.MESSAGE, "inbox", "too late") == []
    assert app.get_run(run_id).status == RunStatus.CANCELLED
