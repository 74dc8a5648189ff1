"""What an agent's lifecycle and a person's cancel do to runs (SQLite and PostgreSQL).

Operators act from another process; here that is a second ``App`` on the same database URL,
called from inside a step so the action lands while the run is really executing. Every test that
runs a handler runs it for a sync and an async one (``tests/flavors.py``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.app import RunHandle
from tether.context import current_step
from tether.testing import active_agent, work_until
from tether.types import RunStatus, StepStatus

WORK = {"until_idle": True, "timeout": 20.0}


def operator(db_url: str) -> Callable[[str, str], Any]:
    """``act("pause", "a1")`` as a person would, through a separate App on the same database."""

    def act(action: str, target: str) -> Any:
        with tether.App(db_url, require_types=False) as ops:
            return getattr(ops, action)(target, reason="by the test", actor="ops")

    return act


class TwoSteps:
    """Agent ``w1`` of a type whose first step lets the test act from outside, mid-run."""

    def __init__(self, app: tether.App, db_url: str, flavor: str) -> None:
        self.calls = Counter[str]()
        self.act = operator(db_url)
        self.action: str | None = None  # what ``first`` does to the run or its agent, if anything

        def first() -> str:
            self.calls["first"] += 1
            if self.action == "cancel":
                self.act("cancel", current_step().run_id)
            elif self.action is not None:
                self.act(self.action, "w1")
            return "one"

        def second(previous: str) -> str:
            self.calls["second"] += 1
            return previous + "+two"

        def handler(ctx: Any, task: Any) -> Any:
            self.calls["handler"] += 1
            out = yield ctx.step(first)
            return (yield ctx.step(second, out))

        register(app, flavor, "twosteps", handler)
        active_agent(app, "twosteps", "w1")


@pytest.fixture
def agent(app: tether.App, db_url: str, flavor: str) -> TwoSteps:
    """Agent ``w1`` running ``TwoSteps``; its first step does nothing to it until told to."""
    return TwoSteps(app, db_url, flavor)


# -- pause and resume ------------------------------------------------------------------------


@pytest.fixture
def paused_mid_run(app: tether.App, agent: TwoSteps) -> tuple[TwoSteps, RunHandle]:
    """A run whose agent was paused while its first step was executing."""
    agent.action = "pause"
    run = app.submit("w1")
    app.work(**WORK)
    agent.action = None  # the next executions of ``first`` (there must be none) do nothing
    return agent, run


def test_pausing_an_agent_pauses_its_running_run_at_the_next_step_boundary(
    app: tether.App, paused_mid_run: tuple[TwoSteps, RunHandle]
) -> None:
    agent, run = paused_mid_run

    info = run.info()
    assert info.status == RunStatus.PAUSED
    assert info.owner is None
    assert agent.calls == Counter(handler=1, first=1)
    [step] = app.run_steps(run.run_id)  # the step in flight finished and was journaled
    assert (step.seq, step.status, step.output) == (1, StepStatus.COMPLETED, "one")
    types = [e.type for e in app.timeline(run.run_id)]
    assert types.index("step.completed") < types.index("run.paused_at_boundary")
    assert "run.paused" in types


def test_resuming_continues_a_paused_run_without_rerunning_finished_steps(
    app: tether.App, paused_mid_run: tuple[TwoSteps, RunHandle]
) -> None:
    agent, run = paused_mid_run

    app.resume("w1")
    assert run.status() == RunStatus.PENDING
    app.work(**WORK)

    assert run.result(timeout=1) == "one+two"
    assert agent.calls == Counter(handler=2, first=1, second=1)


def test_a_worker_leaves_the_runs_of_a_paused_agent_alone(app: tether.App, agent: TwoSteps) -> None:
    run = app.submit("w1")
    app.pause("w1")
    assert run.status() == RunStatus.PAUSED
    app.work(timeout=0.3)

    assert run.status() == RunStatus.PAUSED
    assert agent.calls == Counter()
    app.resume("w1")
    app.work(**WORK)
    assert run.result(timeout=1) == "one+two"


def test_an_agent_that_fails_pauses_its_runs_until_it_is_recovered_and_activated(
    app: tether.App, agent: TwoSteps
) -> None:
    run = app.submit("w1")
    app.fail("w1", reason="broken dependency")
    assert run.status() == RunStatus.PAUSED
    app.recover("w1")
    app.work(timeout=0.2)
    assert run.status() == RunStatus.PAUSED  # initialized is not active yet
    app.activate("w1")
    app.work(**WORK)

    assert run.result(timeout=1) == "one+two"
    assert agent.calls["first"] == 1


# -- terminate -------------------------------------------------------------------------------


def test_terminating_an_agent_cancels_its_pending_and_waiting_runs(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def handler(ctx: Any, task: Any) -> Any:
        calls["before"] += 1
        yield ctx.sleep(0.2)
        calls["after"] += 1

    register(app, flavor, "napper", handler, max_concurrent_runs=5)
    active_agent(app, "napper", "n1")
    waiting = app.submit("n1", "w")
    work_until(app, lambda: waiting.status() == RunStatus.WAITING)
    pending = app.submit("n1", "p")

    app.terminate("n1", reason="retired")
    time.sleep(0.25)  # the sleep is now due
    app.work(timeout=0.2)

    for run in (waiting, pending):
        info = run.info()
        assert info.status == RunStatus.CANCELLED
        assert info.finished_at is not None
        assert info.error is not None
        assert "terminate" in info.error["message"]
    assert calls == Counter(before=1)


def test_terminating_an_agent_stops_its_running_run_at_the_next_step(
    app: tether.App, agent: TwoSteps
) -> None:
    agent.action = "terminate"
    run = app.submit("w1")
    app.work(**WORK)

    assert run.status() == RunStatus.CANCELLED
    assert agent.calls == Counter(handler=1, first=1)
    assert [s.status for s in app.run_steps(run.run_id)] == [StepStatus.COMPLETED]


# -- cancel ----------------------------------------------------------------------------------


def test_cancelling_a_waiting_run_means_it_never_runs_again(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()

    def handler(ctx: Any, task: Any) -> Any:
        calls["before"] += 1
        yield ctx.sleep(0.2)
        calls["after"] += 1

    register(app, flavor, "napper", handler)
    active_agent(app, "napper", "n1")
    run = app.submit("n1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)

    cancelled = app.cancel(run.run_id, reason="changed my mind", actor="ops")
    assert cancelled.status == RunStatus.CANCELLED
    time.sleep(0.25)
    app.work(timeout=0.3)

    info = run.info()
    assert info.status == RunStatus.CANCELLED
    assert info.error == {"type": "Cancelled", "message": "changed my mind", "actor": "ops"}
    assert calls == Counter(before=1)
    [event] = app.events(run_id=run.run_id, types=["run.cancelled"])
    assert event.data == {"reason": "changed my mind", "actor": "ops"}
    with pytest.raises(tether.RunFailed, match="cancelled"):
        run.result(timeout=1)


def test_cancelling_a_running_run_stops_it_at_the_next_step(
    app: tether.App, agent: TwoSteps
) -> None:
    agent.action = "cancel"
    run = app.submit("w1")
    app.work(**WORK)

    assert run.status() == RunStatus.CANCELLED
    assert agent.calls == Counter(handler=1, first=1)
    [step] = app.run_steps(run.run_id)
    assert step.status == StepStatus.COMPLETED


@pytest.mark.parametrize("final", ["completed", "cancelled"])
def test_cancelling_a_finished_run_is_refused(app: tether.App, agent: TwoSteps, final: str) -> None:
    run = app.submit("w1")
    if final == "completed":
        app.work(**WORK)
    else:
        app.cancel(run.run_id)
    before = run.info()

    with pytest.raises(tether.Refused, match=f"already {final}"):
        app.cancel(run.run_id)
    after = run.info()
    assert after.status == before.status
    assert after.updated_at == before.updated_at
    assert len(app.events(run_id=run.run_id, types=["run.cancelled"])) == (final == "cancelled")


def test_cancelling_a_parent_cancels_its_unfinished_descendants(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def handler(ctx: Any, task: str) -> Any:
        calls[task] += 1
        if task == "parent":
            yield ctx.sleep(30)  # waits for its children, as ctx.call would
        return task

    register(app, flavor, "family", handler)
    for agent_id in ("p", "c1", "c2", "g1"):
        active_agent(app, "family", agent_id)
    parent = app.submit("p", "parent")

    def child(agent_id: str, task: str, of: str) -> str:
        run, created = app.store.submit_run(
            agent_id, task, task_id=None, priority=0, max_concurrent=1, parent_run_id=of
        )
        assert created
        return run.run_id

    done = child("c1", "done-child", parent.run_id)
    work_until(
        app,
        lambda: (
            (app.get_run(done).status, parent.status()) == (RunStatus.COMPLETED, RunStatus.WAITING)
        ),
    )
    live = child("c2", "live-child", parent.run_id)
    grandchild = child("g1", "grandchild", live)

    app.cancel(parent.run_id, reason="stop everything")

    statuses = {r: app.get_run(r).status for r in (parent.run_id, done, live, grandchild)}
    assert statuses == {
        parent.run_id: RunStatus.CANCELLED,
        done: RunStatus.COMPLETED,
        live: RunStatus.CANCELLED,
        grandchild: RunStatus.CANCELLED,
    }
    app.work(timeout=0.3)
    assert calls == Counter(parent=1, **{"done-child": 1})
    cancelled = app.events(types=["run.cancelled"])
    assert [(e.run_id, e.agent_id, e.data["reason"]) for e in cancelled] == [
        (parent.run_id, "p", "stop everything"),
        (live, "c2", f"parent {parent.run_id} cancelled"),
        (grandchild, "g1", f"parent {live} cancelled"),
    ]
