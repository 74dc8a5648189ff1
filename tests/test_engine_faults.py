"""Faults that used to loop or double a side effect: values that cannot be stored, runs whose
executions keep dying, at-most-once steps that time out. Each runs on both databases, for a
sync and an async handler."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus, StepStatus

WORK = {"until_idle": True, "timeout": 20.0}


class WorkerCrash(BaseException):
    """Unwinds the worker's thread in the middle of a step body, as a crash would."""


# -- values that cannot be stored ---------------------------------------------------------


def test_state_that_is_not_json_is_an_incident_at_once_and_no_finished_step_runs_again(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def fetch() -> str:
        calls["fetch"] += 1
        return "page"

    def parse(page: str) -> list[str]:
        calls["parse"] += 1
        return ["a", "b"]

    def handler(ctx: Any, task: Any) -> Any:
        page = yield ctx.step(fetch, name="fetch")
        ctx.state["seen"] = threading.Lock()  # not JSON
        words = yield ctx.step(parse, page, name="parse")
        return words

    register(app, flavor, "scraper", handler)
    active_agent(app, "scraper", "s1")
    run = app.submit("s1")
    app.work(**WORK)

    info = app.get_run(run.run_id)
    assert info.status == RunStatus.NEEDS_ATTENTION
    assert info.attempts == 1  # not claimed again and again
    assert calls == Counter(fetch=1, parse=1)
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "serialization"
    assert "state.seen" in incident.error["message"]
    journal = {s.name: (s.status, s.output) for s in app.run_steps(run.run_id)}
    assert journal["fetch"] == (StepStatus.COMPLETED, "page")
    assert journal["parse"] == (StepStatus.COMPLETED, ["a", "b"])  # stored, though state was not
    assert app.get_agent("s1").state == {}


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("bad \ud800 surrogate", "output"),
        (10**5000, "output"),
        ({"k": threading.Lock()}, "output.k"),
    ],
    ids=["lone-surrogate", "huge-int", "object"],
)
def test_a_step_output_that_cannot_be_stored_is_an_incident_naming_its_path(
    app: tether.App, flavor: str, value: Any, where: str
) -> None:
    calls = Counter[str]()

    def produce() -> Any:
        calls["produce"] += 1
        return value

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(produce, name="produce"))

    register(app, flavor, "producer", handler)
    active_agent(app, "producer", "p1")
    run = app.submit("p1")
    app.work(**WORK)

    assert calls["produce"] == 1
    info = app.get_run(run.run_id)
    assert (info.status, info.attempts) == (RunStatus.NEEDS_ATTENTION, 1)
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "serialization"
    assert incident.error["type"] == "SerializationError"
    assert where in incident.error["message"]


def test_an_error_message_with_unstorable_text_is_stored_escaped(
    app: tether.App, flavor: str
) -> None:
    def fail() -> None:
        raise ValueError("bad \ud800 and \x00 inside")

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(fail, name="fail")

    register(app, flavor, "failer", handler)
    active_agent(app, "failer", "f1")
    run = app.submit("f1")
    app.work(**WORK)

    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "step_failed"
    assert incident.error["message"] == "bad \\ud800 and \\x00 inside"


# -- poison runs ----------------------------------------------------------------------------


def test_a_run_whose_executions_keep_dying_becomes_a_poison_incident(
    db_url: str, flavor: str
) -> None:
    app = tether.App(db_url, lease_ttl=0.5, stall_limit=3)
    calls = Counter[str]()

    def explode() -> None:
        calls["explode"] += 1
        raise WorkerCrash  # the worker's thread dies: nothing is committed

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(explode, name="explode")

    try:
        register(app, flavor, "doomed", handler)
        active_agent(app, "doomed", "d1")
        run = app.submit("d1")
        app.work(**WORK)

        assert calls["explode"] == 3  # three claims found nothing new; the fourth stopped it
        info = app.get_run(run.run_id)
        assert info.status == RunStatus.NEEDS_ATTENTION
        [incident] = app.incidents(status="open", run_id=run.run_id)
        assert incident.kind == "poison_run"
        assert "4 times in a row without committing anything" in incident.error["message"]

        app.resolve_incident(incident.incident_id, "retry")  # a person: once more, please
        app.work(**WORK)
        assert calls["explode"] == 6
    finally:
        app.close()


def test_a_run_that_progresses_between_crashes_is_not_poison(db_url: str, flavor: str) -> None:
    app = tether.App(db_url, lease_ttl=0.5, stall_limit=2)
    calls = Counter[str]()

    def step(n: int) -> int:
        calls[f"step{n}"] += 1
        if calls[f"step{n}"] == 1 and n > 1:
            raise WorkerCrash  # each new step crashes once, after the one before committed
        return n

    def handler(ctx: Any, task: Any) -> Any:
        done = []
        for n in range(1, 5):
            done.append((yield ctx.step(step, n, name=f"step{n}")))
        return done

    try:
        register(app, flavor, "bumpy", handler)
        active_agent(app, "bumpy", "b1")
        run = app.submit("b1")
        app.work(**WORK)

        assert run.result(timeout=1) == [1, 2, 3, 4]
        assert app.incidents(run_id=run.run_id) == []
    finally:
        app.close()


# -- at-most-once steps that time out ----------------------------------------------------------


def _slow_side_effect(log: list[tuple[str, float]], seconds: float) -> Any:
    def transfer() -> str:
        log.append(("start", time.monotonic()))
        time.sleep(seconds)
        log.append(("end", time.monotonic()))
        return "sent"

    return transfer


@pytest.mark.parametrize("choice", ["ask", "fail"])
def test_an_at_most_once_step_that_times_out_while_running_is_not_started_again(
    app: tether.App, flavor: str, choice: str
) -> None:
    log: list[tuple[str, float]] = []
    transfer = _slow_side_effect(log, 0.6)

    def handler(ctx: Any, task: Any) -> Any:
        return (
            yield ctx.step(
                transfer, name="transfer", timeout=0.1, at_most_once=True, on_ambiguous=choice
            )
        )

    register(app, flavor, "payer", handler)
    active_agent(app, "payer", "p1")
    run = app.submit("p1")
    app.work(**WORK)
    work_until(app, lambda: len(log) == 2)  # let the abandoned body end before counting

    assert [kind for kind, _ in log] == ["start", "end"]  # one execution, never another
    info = app.get_run(run.run_id)
    ambiguous = "it timed out while its body was still running"
    if choice == "ask":
        assert info.status == RunStatus.NEEDS_ATTENTION
        [incident] = app.incidents(status="open", run_id=run.run_id)
        assert incident.kind == "ambiguous_step" and ambiguous in incident.error["message"]
    else:
        assert info.status == RunStatus.FAILED and ambiguous in info.error["message"]


def test_an_at_most_once_retry_waits_for_the_abandoned_attempt_to_end(
    app: tether.App, flavor: str
) -> None:
    log: list[tuple[str, float]] = []
    transfer = _slow_side_effect(log, 0.3)

    def handler(ctx: Any, task: Any) -> Any:
        return (
            yield ctx.step(
                transfer,
                name="transfer",
                timeout=0.2,
                at_most_once=True,
                on_ambiguous="retry",
                retry=tether.Retry(max_attempts=2, max_timeout=2.0),
            )
        )

    register(app, flavor, "payer", handler)
    active_agent(app, "payer", "p1")
    run = app.submit("p1")
    app.work(**WORK)
    work_until(app, lambda: len(log) >= 4)

    assert [kind for kind, _ in log] == ["start", "end", "start", "end"]
    first_end, second_start = log[1][1], log[2][1]
    assert first_end <= second_start  # the attempts never overlapped
    assert app.get_run(run.run_id).status in (RunStatus.NEEDS_ATTENTION, RunStatus.COMPLETED)


def test_a_retry_says_when_the_abandoned_sync_attempt_may_still_run(
    app: tether.App, flavor: str
) -> None:
    release = threading.Event()
    calls = Counter[str]()

    def stuck() -> str:
        calls["stuck"] += 1
        if calls["stuck"] == 1:
            release.wait(5)
        return "done"

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(stuck, name="stuck", timeout=0.1))

    register(app, flavor, "stucker", handler)
    active_agent(app, "stucker", "s1")
    run = app.submit("s1")
    try:
        app.work(**WORK)
    finally:
        release.set()

    assert run.result(timeout=1) == "done"
    [failed] = [e for e in app.timeline(run.run_id) if e.type == "step.failed"]
    assert failed.data["abandoned_attempt_running"] is True
    assert failed.data["strategy"] == "retry_with_increased_timeout"


# -- retry delays are waits -----------------------------------------------------------------


def test_a_run_resumed_before_its_retry_is_due_waits_again_until_then(
    db_url: str, flavor: str
) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)
    calls = Counter[str]()

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("reset by peer")
        return "ok"

    def handler(ctx: Any, task: Any) -> Any:
        policy = tether.Retry(initial_delay=60, jitter=0)
        return (yield ctx.step(flaky, name="flaky", retry=policy))

    try:
        register(app, flavor, "patient", handler)
        active_agent(app, "patient", "p1")
        run = app.submit("p1")
        work_until(app, lambda: run.status() == RunStatus.WAITING)
        due = app.get_run(run.run_id).wake_at
        assert due == clock() + dt.timedelta(seconds=60)

        app.pause("p1")
        app.resume("p1")  # the run is pending again, 60 s early
        work_until(app, lambda: run.status() == RunStatus.WAITING)
        assert calls["flaky"] == 1
        assert app.get_run(run.run_id).wake_at == due

        clock.advance(60)
        app.work(**WORK)
        assert run.result(timeout=1) == "ok"
        assert calls["flaky"] == 2
    finally:
        app.close()
