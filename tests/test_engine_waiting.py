"""Waiting is free: a sleeping run is a row in the database, not a thread in a worker."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import tether
from tether.context import RunContext
from tether.testing import active_agent, work_until
from tether.types import RunStatus, StepStatus

WORK = {"until_idle": True, "timeout": 20.0}


def wait_for_threads(count: int, within: float = 5.0) -> int:
    """The thread count once it has come down to ``count`` (or whatever it is at the deadline).

    A stopped worker's helper threads end on their own schedule (the PostgreSQL listener checks
    its stop flag once a second), so "no threads left" is checked with a deadline.
    """
    deadline = time.monotonic() + within
    while threading.active_count() > count and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()


def statuses(app: tether.App, agent_id: str) -> Counter[str]:
    return Counter(r.status.value for r in app.list_runs(agent_id=agent_id, limit=None))


def test_a_thousand_sleeping_runs_hold_no_threads_and_all_resume(
    app: tether.App, db_url: str
) -> None:
    # Parking a run costs a claim and a commit: a few hundred runs a second on SQLite, fewer on
    # PostgreSQL, where each is a network round trip (and a NOTIFY); so PostgreSQL gets fewer
    # runs. With a plain ``ctx.sleep(1.0)`` the first runs would be due, and resumed, long
    # before the last ones had parked, so no moment would show them all waiting. Every run
    # therefore sleeps until one common instant, set far enough ahead for the whole first pass.
    # The sleep's duration is computed on the first execution only: replay reads the wake-up
    # time back from the journal.
    sqlite = db_url.startswith("sqlite")
    total, budget = (1000, 5.0) if sqlite else (300, 3.5)
    gate: dict[str, float] = {}
    finished = Counter[str]()
    executions = Counter[str]()

    def finish(i: int) -> int:
        finished["finish"] += 1
        return i

    @app.agent("sleeper", max_concurrent_runs=total)
    def handle(ctx: RunContext, task: int) -> int:
        executions["handler"] += 1
        ctx.sleep(gate["wake_at"] - time.time())
        return int(ctx.step(finish, task))

    active_agent(app, "sleeper", "z1")
    runs = [app.submit("z1", i) for i in range(total)]
    baseline = threading.active_count()
    started = time.time()
    wake_at = gate["wake_at"] = started + budget

    worker = app.worker(concurrency=4)
    thread = threading.Thread(target=worker.run, kwargs={"timeout": 60}, daemon=True)
    thread.start()
    while time.time() < wake_at:
        if not app.list_runs(agent_id="z1", status=["pending", "running"], limit=1):
            break
        time.sleep(0.02)
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    parked_in = time.time() - started

    assert parked_in < budget, f"parking {total} runs took {parked_in:.1f}s, over {budget}s"
    assert statuses(app, "z1") == Counter(waiting=total)
    assert executions["handler"] == total
    assert finished["finish"] == 0
    assert all(r.owner is None for r in app.list_runs(agent_id="z1", limit=None))
    # A thousand suspended runs, and the process is back to the threads it had before.
    assert wait_for_threads(baseline) <= baseline

    app.work(until_idle=True, timeout=60, concurrency=4)

    assert statuses(app, "z1") == Counter(completed=total)
    assert finished["finish"] == total
    assert executions["handler"] == 2 * total
    assert runs[-1].result(timeout=1) == total - 1


def test_a_sleep_is_not_repeated_on_replay(app: tether.App) -> None:
    handler_runs: list[float] = []

    @app.agent("napper")
    def handle(ctx: RunContext, task: Any) -> str:
        handler_runs.append(time.monotonic())
        ctx.sleep(0.2)
        ctx.sleep(0.0)  # a zero sleep completes at once, without parking the run
        return "rested"

    active_agent(app, "napper", "n1")
    run = app.submit("n1")
    started = time.monotonic()
    app.work(**WORK)
    elapsed = time.monotonic() - started

    assert run.result(timeout=1) == "rested"
    assert len(handler_runs) == 2  # the first execution and one replay after the timer
    assert handler_runs[1] - handler_runs[0] >= 0.2
    assert elapsed < 2.0
    steps = app.run_steps(run.run_id)
    assert [(s.kind, s.status) for s in steps] == [
        ("sleep", StepStatus.COMPLETED),
        ("sleep", StepStatus.COMPLETED),
    ]
    assert len(app.events(run_id=run.run_id, types=["run.waiting"])) == 1


def test_a_run_paused_while_waiting_stays_paused_and_continues_after_resume(
    app: tether.App,
) -> None:
    calls = Counter[str]()

    def before() -> None:
        calls["before"] += 1

    def after() -> None:
        calls["after"] += 1

    @app.agent("dozer")
    def handle(ctx: RunContext, task: Any) -> str:
        ctx.step(before)
        ctx.sleep(0.2)
        ctx.step(after)
        return "done"

    active_agent(app, "dozer", "d1")
    run = app.submit("d1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)

    app.pause("d1")
    assert run.status() == RunStatus.PAUSED
    time.sleep(0.25)  # the timer is now due
    app.work(timeout=0.4)  # a worker that is around must leave it alone
    assert run.status() == RunStatus.PAUSED
    assert calls == Counter(before=1)

    app.resume("d1")
    app.work(**WORK)
    assert run.result(timeout=1) == "done"
    assert calls == Counter(before=1, after=1)


def test_a_run_paused_while_waiting_does_not_run_early_after_resume(app: tether.App) -> None:
    """Resuming before the timer is due does not cut the sleep short."""
    woke_at: list[float] = []

    @app.agent("alarm")
    def handle(ctx: RunContext, task: Any) -> None:
        ctx.sleep(0.5)
        woke_at.append(time.monotonic())

    active_agent(app, "alarm", "a1")
    run = app.submit("a1")
    submitted = time.monotonic()
    work_until(app, lambda: run.status() == RunStatus.WAITING)
    app.pause("a1")
    app.resume("a1")
    app.work(**WORK)

    assert run.status() == RunStatus.COMPLETED
    assert len(woke_at) == 1
    assert woke_at[0] - submitted >= 0.45
