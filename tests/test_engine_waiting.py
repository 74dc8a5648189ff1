"""Waiting is free: a sleeping run is a row in the database, not a thread in a worker.

Every test runs on both databases, for a sync and an async handler (``tests/flavors.py``), on
a ``FakeClock``: timers fall due when the test moves time, so nothing here sleeps for them.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus, StepStatus

WORK = {"until_idle": True, "timeout": 20.0}


@pytest.fixture
def clock() -> FakeClock:
    """Time that stands still until the test moves it."""
    return FakeClock()


@pytest.fixture
def timed_app(db_url: str, clock: FakeClock) -> Iterator[tether.App]:
    """An App on a fresh database whose time is ``clock``."""
    application = tether.App(db_url, clock=clock)
    try:
        yield application
    finally:
        application.close()


def later(clock: FakeClock, seconds: float) -> dt.datetime:
    """``seconds`` after the clock's current time."""
    return clock() + dt.timedelta(seconds=seconds)


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


def waited(app: tether.App, run_id: str) -> list[tuple[str, dt.datetime]]:
    """What a run parked for, in order: each ``run.waiting`` event's kind and deadline."""
    events = app.events(run_id=run_id, types=["run.waiting"])
    return [(e.data["kind"], dt.datetime.fromisoformat(e.data["until"])) for e in events]


def stays(app: tether.App, run: tether.RunHandle, status: RunStatus) -> None:
    """A worker that is around leaves the run alone: it is still ``status`` afterwards."""
    app.work(until_idle=False, timeout=0.5)
    assert run.status() == status


def test_a_thousand_sleeping_runs_hold_no_threads_and_all_resume(
    timed_app: tether.App, clock: FakeClock, db_url: str, flavor: str
) -> None:
    # Parking a run costs a claim and a commit; on PostgreSQL each is a network round trip
    # (and a NOTIFY), so it parks fewer runs to keep the suite quick. How fast runs park is
    # measured in bench/, not here.
    app = timed_app
    total = 1000 if db_url.startswith("sqlite") else 300
    finished = Counter[str]()
    executions = Counter[str]()

    def finish(i: int) -> int:
        finished["finish"] += 1
        return i

    def handler(ctx: Any, task: int) -> Any:
        executions["handler"] += 1
        yield ctx.sleep(3600)
        return int((yield ctx.step(finish, task)))

    register(app, flavor, "sleeper", handler, max_concurrent_runs=total)
    active_agent(app, "sleeper", "z1")
    runs = [app.submit("z1", i) for i in range(total)]
    wake_at = later(clock, 3600)
    baseline = threading.active_count()

    work_until(
        app,
        lambda: not app.list_runs(agent_id="z1", status=["pending", "running"], limit=1),
        timeout=120,
    )

    assert statuses(app, "z1") == Counter(waiting=total)
    assert executions["handler"] == total
    assert finished["finish"] == 0
    parked = app.list_runs(agent_id="z1", limit=None)
    assert all(r.owner is None for r in parked)
    assert {r.wake_at for r in parked} == {wake_at}
    # A thousand suspended runs, and the process is back to the threads it had before.
    assert wait_for_threads(baseline) <= baseline

    clock.advance(3600)
    app.work(until_idle=True, timeout=120, concurrency=4)

    assert statuses(app, "z1") == Counter(completed=total)
    assert finished["finish"] == total
    assert executions["handler"] == 2 * total
    assert runs[-1].result(timeout=1) == total - 1


def test_a_sleep_is_not_repeated_on_replay(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    app = timed_app
    executions = Counter[str]()

    def handler(ctx: Any, task: Any) -> Any:
        executions["handler"] += 1
        yield ctx.sleep(60)
        yield ctx.sleep(0.0)  # a zero sleep completes at once, without parking the run
        return ctx.now().isoformat()

    register(app, flavor, "napper", handler)
    active_agent(app, "napper", "n1")
    run = app.submit("n1")
    wake_at = later(clock, 60)
    work_until(app, lambda: run.status() == RunStatus.WAITING)

    assert run.info().wake_at == wake_at
    clock.advance(59)
    stays(app, run, RunStatus.WAITING)  # not due a second early
    clock.advance(1)
    app.work(**WORK)

    assert dt.datetime.fromisoformat(run.result(timeout=1)) == wake_at
    assert executions["handler"] == 2  # the first execution and one replay after the timer
    steps = app.run_steps(run.run_id)
    assert [(s.kind, s.status) for s in steps] == [
        ("sleep", StepStatus.COMPLETED),
        ("sleep", StepStatus.COMPLETED),
        ("now", StepStatus.COMPLETED),
    ]
    assert waited(app, run.run_id) == [("timer", wake_at)]  # the replay did not park again


def test_a_run_paused_while_waiting_stays_paused_and_continues_after_resume(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    app = timed_app
    calls = Counter[str]()

    def before() -> None:
        calls["before"] += 1

    def after() -> None:
        calls["after"] += 1

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(before)
        yield ctx.sleep(60)
        yield ctx.step(after)
        return "done"

    register(app, flavor, "dozer", handler)
    active_agent(app, "dozer", "d1")
    run = app.submit("d1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)

    app.pause("d1")
    assert run.status() == RunStatus.PAUSED
    clock.advance(60)  # the timer is now due
    stays(app, run, RunStatus.PAUSED)  # a worker that is around must leave it alone
    assert calls == Counter(before=1)

    app.resume("d1")
    app.work(**WORK)
    assert run.result(timeout=1) == "done"
    assert calls == Counter(before=1, after=1)


def test_a_run_paused_while_waiting_does_not_run_early_after_resume(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    """Resuming before the timer is due does not cut the sleep short."""
    app = timed_app
    woke_at: list[dt.datetime] = []

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.sleep(60)
        woke_at.append(ctx.now())

    register(app, flavor, "alarm", handler)
    active_agent(app, "alarm", "a1")
    run = app.submit("a1")
    wake_at = later(clock, 60)
    work_until(app, lambda: run.status() == RunStatus.WAITING)
    app.pause("a1")
    app.resume("a1")

    assert run.info().wake_at == wake_at
    stays(app, run, RunStatus.WAITING)
    assert woke_at == []
    clock.advance(60)
    app.work(**WORK)

    assert run.status() == RunStatus.COMPLETED
    assert woke_at == [wake_at]
