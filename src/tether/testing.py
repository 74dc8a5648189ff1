"""A kit for testing code that uses tether: ready agents, and a worker that runs while you wait.

Import it in your own tests (it is not part of ``import tether``)::

    from tether import RunStatus
    from tether.testing import active_agent, work_until

    def test_the_run_parks_on_its_sleep(app):
        active_agent(app, "napper", "n1")
        run = app.submit("n1")
        work_until(app, lambda: run.status() == RunStatus.WAITING)

To run everything that can progress without a person, ``app.work(until_idle=True,
timeout=...)`` needs no kit; ``work_until`` is for stopping at a point in between, or when a
long timer would keep ``until_idle`` waiting.

Deadlines without sleeping: give the app a ``FakeClock`` and move it::

    clock = FakeClock()
    app = tether.App(url, clock=clock)
    ...                                    # a run sleeps for an hour: it is waiting
    clock.advance(3600)
    app.work(until_idle=True, timeout=10)  # its timer is due now: it finishes
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.app import App
    from tether.engine.worker import Worker
    from tether.types import AgentInfo

_STOP_WITHIN = 35.0
"""Seconds a stopped worker may take to end: its own grace for runs in flight is 30 s."""

_POLL = 0.02
"""Seconds between two checks of a ``work_until`` condition."""


def active_agent(
    app: App, type: str, agent_id: str, config: dict[str, Any] | None = None
) -> AgentInfo:
    """Create an agent of a registered type, then initialize and activate it.

    Args:
        app: the App the agent type is registered with (its hooks run).
        type: the agent type's name.
        agent_id: the new agent's id.
        config: the agent's configuration, if any.

    Returns:
        The agent, now ``active``: runs submitted to it are claimable.
    """
    app.create_agent(type, agent_id, config)
    app.initialize(agent_id)
    return app.activate(agent_id)


@contextmanager
def background_worker(app: App, *, concurrency: int = 4) -> Iterator[Worker]:
    """Run ``app.worker(...)`` on a thread for the ``with`` block; stop it at the end.

    Leaving the block asks the worker to stop (runs in flight are handed back at their next
    step) and waits for it to end.

    Args:
        app: the App whose agent types the worker executes.
        concurrency: runs executing at once.

    Yields:
        The running worker.

    Raises:
        TimeoutError: the worker did not end within 35 s of being asked to stop (a step that
            never returns?).
        Exception: whatever made the worker itself fail, raised again here.
    """
    worker = app.worker(concurrency=concurrency)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # raised again in the test's thread, below
            failures.append(exc)

    thread = threading.Thread(target=run, name="tether-testing-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(_STOP_WITHIN)
        if failures:
            raise failures[0]
    if thread.is_alive():
        raise TimeoutError(
            f"the worker did not stop within {_STOP_WITHIN:g}s of being asked to; a step that "
            "never returns keeps it busy"
        )


def work_until(
    app: App, condition: Callable[[], bool], *, timeout: float = 20.0, concurrency: int = 4
) -> None:
    """Run a worker on a thread until ``condition()`` holds, then stop it.

    The condition is checked every 20 ms while the worker runs; when this returns, the worker
    has stopped, so nothing moves until the test acts again.

    Args:
        app: the App whose agent types the worker executes.
        condition: checked in the calling thread, e.g. ``lambda: run.status() == WAITING``.
        timeout: seconds to wait for the condition.
        concurrency: runs executing at once.

    Raises:
        TimeoutError: the condition did not hold within ``timeout`` seconds.
        Exception: whatever made the worker fail, as soon as it did.
    """
    with background_worker(app, concurrency=concurrency) as worker:
        deadline = time.monotonic() + timeout
        while not condition():
            if worker.stopping:  # nobody asked it to: it failed, and leaving raises its error
                raise RuntimeError("work_until: the worker stopped before the condition held")
            if time.monotonic() >= deadline:
                name = getattr(condition, "__qualname__", repr(condition))
                raise TimeoutError(
                    f"work_until: {name} did not hold within {timeout:g}s of a worker running; "
                    "is the agent active, and its type registered with this app?"
                )
            time.sleep(_POLL)


class FakeClock:
    """A clock for tests: time stands still until the test moves it.

    Pass it as ``tether.App(url, clock=FakeClock())``. It decides what ``ctx.now()`` returns
    and when sleeps, retry delays and other deadlines fall due; leases keep real time (they
    guard against real crashes).

    Args:
        start: the time it shows first (timezone-aware); default 2030-01-01 00:00 UTC.
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        start = start or dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        if start.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        """The current (fake) time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> dt.datetime:
        """Move time forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back; advance by a positive amount")
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)
            return self._now

    def set(self, when: dt.datetime) -> None:
        """Jump to ``when`` (not before the current time)."""
        with self._lock:
            if when < self._now:
                raise ValueError(f"a clock does not go back: {when} is before {self._now}")
            self._now = when
