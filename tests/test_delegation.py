"""Delegation, on both databases, for sync and async handlers: fan-out and fan-in, call, how a
child's failure or cancellation reaches its parent, structured cancellation of whole trees,
wait_any over children and messages, refusals, and runs waiting for messages holding nothing."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections import Counter
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.store.coordination import MAX_DEPTH
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus

WORK = {"until_idle": True, "timeout": 30.0}


def doubler(app: tether.App, flavor: str) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(lambda n: n * 2, task, name="double"))

    register(app, flavor, "doubler", handler)
    for i in range(3):
        active_agent(app, "doubler", f"d{i}")


def test_a_parent_fans_out_to_children_and_gathers_their_results_in_order(
    app: tether.App, flavor: str
) -> None:
    doubler(app, flavor)

    def boss(ctx: Any, task: Any) -> Any:
        handles = []
        for i in range(3):
            handles.append((yield ctx.spawn(f"d{i}", 10 + i)))
        results = yield ctx.wait(handles)
        alone = yield ctx.call("d0", 100)
        return {"results": results, "alone": alone}

    register(app, flavor, "boss", boss)
    active_agent(app, "boss", "b1")
    run = app.submit("b1")
    app.work(**WORK)

    assert run.result(timeout=1) == {"results": [20, 22, 24], "alone": 200}
    children = app.store.list_runs(parent_run_id=run.run_id)
    assert sorted(c.agent_id for c in children) == ["d0", "d0", "d1", "d2"]
    assert {c.status for c in children} == {RunStatus.COMPLETED}
    spawned = [s for s in app.run_steps(run.run_id) if s.kind == "spawn"]
    assert sorted(s.output for s in spawned) == sorted(c.run_id for c in children)


def test_a_parent_woken_by_each_of_many_children_is_not_taken_for_a_poison_run(
    app: tether.App, flavor: str
) -> None:
    # Each child's end wakes the parent, which finds the others still running and parks
    # again without a new journal entry: here one child at a time, more times than the stall
    # limit (5).
    def gated(ctx: Any, task: Any) -> Any:
        yield ctx.receive()  # the test lets the children end one by one
        return task * 2

    def boss(ctx: Any, task: Any) -> Any:
        handles = []
        for i in range(task):
            handles.append((yield ctx.spawn("g1", i)))
        return (yield ctx.wait(handles))

    register(app, flavor, "gated", gated)
    register(app, flavor, "boss", boss)
    active_agent(app, "gated", "g1")
    active_agent(app, "boss", "b1")
    run = app.submit("b1", 8)

    def parked(done: int) -> bool:
        children = app.store.list_runs(parent_run_id=run.run_id)
        ended = [c for c in children if c.status == RunStatus.COMPLETED]
        return len(children) == 8 and len(ended) == done and run.status() == RunStatus.WAITING

    work_until(app, lambda: parked(0))
    for done in range(1, 8):
        app.send("g1", "go")
        work_until(app, lambda done=done: parked(done))  # type: ignore[misc]
    app.send("g1", "go")
    app.work(**WORK)

    assert run.result(timeout=1) == [2 * i for i in range(8)]
    claims = [e for e in app.events(run_id=run.run_id) if e.type == "run.claimed"]
    assert len(claims) == 9  # its first claim, then one per child's end
    assert app.incidents(run_id=run.run_id) == []


def failing_child_and_parent(app: tether.App, flavor: str) -> tether.RunHandle:
    def fragile(ctx: Any, task: Any) -> Any:
        yield ctx.step(lambda: (_ for _ in ()).throw(ValueError("bad input")), name="break")

    def parent(ctx: Any, task: Any) -> Any:
        child = yield ctx.spawn("f1", None)
        try:
            yield ctx.wait(child)
        except tether.ChildRunFailed as exc:
            return {"failed": exc.run_id, "why": exc.error.get("message")}
        except tether.ChildCancelled as exc:
            return {"cancelled": exc.run_id}
        return "no error"

    register(app, flavor, "fragile", fragile)
    register(app, flavor, "parent", parent)
    active_agent(app, "fragile", "f1")
    active_agent(app, "parent", "p1")
    return app.submit("p1")


def test_a_failed_child_raises_child_run_failed_in_its_parent(app: tether.App, flavor: str) -> None:
    run = failing_child_and_parent(app, flavor)
    app.work(**WORK)
    [incident] = app.incidents(status="open")
    assert app.get_run(run.run_id).status == RunStatus.WAITING  # the parent waits meanwhile

    app.resolve_incident(incident.incident_id, "abort", comment="give up")
    app.work(**WORK)

    assert run.result(timeout=1) == {"failed": incident.run_id, "why": "give up"}


def test_a_cancelled_child_raises_child_cancelled_in_its_parent(
    app: tether.App, flavor: str
) -> None:
    run = failing_child_and_parent(app, flavor)
    app.work(**WORK)
    [incident] = app.incidents(status="open")

    app.cancel(incident.run_id, reason="not needed")
    app.work(**WORK)

    assert run.result(timeout=1) == {"cancelled": incident.run_id}


def test_a_run_that_ends_cancels_its_children_unless_they_are_detached(
    app: tether.App, flavor: str
) -> None:
    def napper(ctx: Any, task: Any) -> Any:
        yield ctx.sleep(3600)
        return "woke"

    def parent(ctx: Any, task: Any) -> Any:
        attached = yield ctx.spawn("n1", None)
        detached = yield ctx.spawn("n2", None, detached=True)
        return [attached.run_id, detached.run_id]

    register(app, flavor, "napper", napper, max_concurrent_runs=5)
    register(app, flavor, "parent", parent)
    for agent_id in ("n1", "n2", "p1"):
        active_agent(app, "napper" if agent_id != "p1" else "parent", agent_id)
    run = app.submit("p1")
    work_until(app, lambda: run.status() == RunStatus.COMPLETED)
    attached, detached = run.result(timeout=1)

    assert app.get_run(attached).status == RunStatus.CANCELLED
    assert app.get_run(detached).status in (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING)


def test_cancelling_a_root_cancels_a_three_level_tree_and_nothing_comes_back(
    db_url: str, flavor: str
) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)

    def node(ctx: Any, task: Any) -> Any:
        if task["depth"] < 2:
            handles = []
            for _ in range(2):
                handles.append(
                    (yield ctx.spawn(f"n{task['depth'] + 1}", {"depth": task["depth"] + 1}))
                )
            return (yield ctx.wait(handles))
        yield ctx.sleep(60)
        return "leaf"

    try:
        register(app, flavor, "node", node, max_concurrent_runs=10)
        for depth in range(3):
            active_agent(app, "node", f"n{depth}")
        root = app.submit("n0", {"depth": 0})

        def tree() -> list[tether.types.RunInfo]:
            return app.store.list_runs(limit=None)

        work_until(app, lambda: sum(r.status == RunStatus.WAITING for r in tree()) == 7)

        app.cancel(root.run_id, reason="stop everything")
        clock.advance(60)  # the leaves' timers fall due: nothing may revive them
        app.work(**WORK)

        statuses = Counter(r.status for r in tree())
        assert statuses == Counter({RunStatus.CANCELLED: 7})
        assert app.store.count_unfinished(["node"])[0] == 0
        with pytest.raises(tether.Refused):
            app.retry_run(root.run_id)
    finally:
        app.close()


def test_wait_any_returns_the_first_of_a_child_and_a_message_and_withdraws_the_other(
    db_url: str, flavor: str
) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)

    def slow(ctx: Any, task: Any) -> Any:
        yield ctx.sleep(3600)
        return "slow"

    def chooser(ctx: Any, task: Any) -> Any:
        child = yield ctx.spawn("s1", None)
        ready = yield ctx.wait_any(child, tether.Receive("answers"), timeout=7200)
        if ready.source is None:
            return "timeout"
        kind = "child" if isinstance(ready.source, tether.ChildHandle) else "message"
        value = ready.value.payload if kind == "message" else ready.value
        return [kind, value]

    try:
        register(app, flavor, "slow", slow)
        register(app, flavor, "chooser", chooser)
        active_agent(app, "slow", "s1")
        active_agent(app, "chooser", "c1")
        run = app.submit("c1")
        work_until(app, lambda: run.status() == RunStatus.WAITING)
        assert app.get_run(run.run_id).wake_at == clock() + dt.timedelta(hours=2)

        app.send("c1", 42, topic="answers")
        work_until(app, lambda: run.status() == RunStatus.COMPLETED)

        assert run.result(timeout=1) == ["message", 42]
        assert app.get_run(run.run_id).wake_at is None
    finally:
        app.close()


@pytest.mark.parametrize("problem", ["missing", "inactive"])
def test_a_child_on_an_agent_that_cannot_run_it_is_refused_at_once(
    app: tether.App, flavor: str, problem: str
) -> None:
    doubler(app, flavor)
    if problem == "inactive":
        app.pause("d0")
    caught: dict[str, str] = {}

    def parent(ctx: Any, task: Any) -> Any:
        try:
            yield ctx.spawn("d0" if problem == "inactive" else "nobody", 1)
        except (tether.NotFound, tether.Refused) as exc:
            caught["error"] = str(exc)
        return "went on"

    register(app, flavor, "parent", parent)
    active_agent(app, "parent", "p1")
    run = app.submit("p1")
    app.work(**WORK)

    assert run.result(timeout=1) == "went on"
    assert ("paused" if problem == "inactive" else "nobody") in caught["error"]
    assert app.store.list_runs(parent_run_id=run.run_id) == []


def test_a_delegation_chain_past_the_limit_is_refused_naming_the_chain(
    app: tether.App, flavor: str
) -> None:
    def echo(ctx: Any, task: Any) -> Any:
        try:
            return (yield ctx.call("ping" if task % 2 else "pong", task + 1))
        except tether.ConfigurationError as exc:
            return {"stopped_at": task, "why": str(exc)}

    register(app, flavor, "echo", echo, max_concurrent_runs=MAX_DEPTH + 2)
    active_agent(app, "echo", "ping")
    active_agent(app, "echo", "pong")
    run = app.submit("ping", 0)
    app.work(until_idle=True, timeout=120)

    outcome = run.result(timeout=1)
    assert outcome["stopped_at"] == MAX_DEPTH - 1
    assert "ping -> pong" in outcome["why"] and f"limit of {MAX_DEPTH}" in outcome["why"]


def test_a_call_back_into_a_busy_agent_up_the_chain_cannot_deadlock(
    app: tether.App, flavor: str
) -> None:
    """ping calls pong, which calls ping again: with one run at a time per agent, the second
    ping run can start only because a waiting run does not hold its agent. Such a cycle of
    calls never deadlocks; one without end is refused at ``MAX_DEPTH`` (test above)."""

    def echo(ctx: Any, task: Any) -> Any:
        if task == 3:
            return [ctx.agent_id]
        rest = yield ctx.call("ping" if task % 2 == 0 else "pong", task + 1)
        return [ctx.agent_id, *rest]

    register(app, flavor, "echo", echo)  # max_concurrent_runs=1
    active_agent(app, "echo", "ping")
    active_agent(app, "echo", "pong")
    run = app.submit("ping", 1)
    app.work(**WORK)

    assert run.result(timeout=1) == ["ping", "pong", "ping"]
    tree = app.store.list_runs(agent_id="ping")
    assert len(tree) == 2 and {r.status for r in tree} == {RunStatus.COMPLETED}


def threads_down_to(baseline: int) -> bool:
    """Whether the stopped worker's helper threads (the listener checks once a second) end."""
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count() <= baseline


def test_many_runs_waiting_for_messages_hold_no_threads(db_url: str, flavor: str) -> None:
    count = (10_000 if os.environ.get("TETHER_STRESS") else 500) if "sqlite" in db_url else 200
    app = tether.App(db_url)

    def waiter(ctx: Any, task: Any) -> Any:
        message = yield ctx.receive()
        return message.payload

    try:
        register(app, flavor, "waiter", waiter, max_concurrent_runs=count)
        active_agent(app, "waiter", "w1")
        baseline = threading.active_count()
        runs = [app.submit("w1", i) for i in range(count)]
        app.work(until_idle=True, timeout=120, concurrency=8)

        assert all(r.status() == RunStatus.WAITING for r in runs)
        assert threads_down_to(baseline)
        for i in range(3):
            app.send("w1", i)
        app.work(until_idle=True, timeout=60)
        assert sum(r.status() == RunStatus.COMPLETED for r in runs) == 3
    finally:
        app.close()
