"""An idle worker is woken when a run becomes runnable, instead of finding it at its next poll.

In this process (both databases) a write that makes a run runnable wakes the workers that
share its Store; across processes on PostgreSQL a ``NOTIFY`` does, and the listener comes back
after its connection is killed.

How these tests tell a wake-up from a poll, without timing anything: every worker here polls
once every ``LONG_POLL`` seconds, far longer than a test lasts, and logs at debug level each
time it goes idle ("waiting up to ...") and each time its wait ran out with nothing having
woken it ("no wake-up within ...": a poll). A test makes the run runnable only once the worker
logged that it is idle, after a claim that found nothing; the worker can then leave its wait
only when its wake-up event is set or the wait runs out. So a run that completes while the log
holds no poll was found because something woke the worker, and the log names what did. A
broken wake-up makes the test fail: the run does not complete within the test's timeout, or
(if the timeout were raised past the poll interval) it completes after a logged poll.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import tether
from tests.crashkit import ROOT, worker_env
from tether.engine.worker import Worker
from tether.testing import active_agent

LONG_POLL = 300.0
"""Seconds between a worker's polls here: no test comes near it."""

WITHIN = 30.0
"""Seconds a test waits for what a wake-up should bring about before it fails."""

IDLE = "waiting up to"
POLLED = "no wake-up within"
WOKEN_HERE = "woken by a write of this process"
NOTIFIED = "woken by a notification"
LISTENING = "listening for notifications (PostgreSQL backend pid"


def messages(caplog: pytest.LogCaptureFixture, thread: str | None = None) -> list[str]:
    """The workers' log so far, oldest first (only what ``thread`` logged, if given)."""
    return [
        r.getMessage()
        for r in list(caplog.records)
        if r.name == "tether.worker" and thread in (None, r.threadName)
    ]


def count(lines: list[str], prefix: str) -> int:
    return sum(1 for line in lines if line.startswith(prefix))


def eventually(what: str, condition: Callable[[], bool], within: float = WITHIN) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` if it has not within ``within``."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        time.sleep(0.005)


@contextmanager
def idle_worker(
    app: tether.App, caplog: pytest.LogCaptureFixture, name: str = "idle-worker"
) -> Iterator[Worker]:
    """A worker of ``app`` on a thread called ``name``, polling every ``LONG_POLL`` seconds,
    entered once it has looked for work, found none and gone idle."""
    caplog.set_level(logging.DEBUG, logger="tether.worker")
    worker = app.worker(concurrency=2, poll_interval=LONG_POLL)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # raised again in the test's thread, below
            failures.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        eventually(f"{name} going idle", lambda: count(messages(caplog, name), IDLE) > 0)
        yield worker
    finally:
        worker.stop()
        thread.join(WITHIN)
    assert not thread.is_alive(), "the worker did not stop"
    if failures:
        raise failures[0]


def attempt(task: dict[str, Any]) -> dict[str, Any]:
    """The step of the runs here: fails once when the task says so (an incident)."""
    if task.get("fail") and not FAILED:
        FAILED.append(task)
        raise ValueError("first attempt fails")
    return {"n": task["n"]}


FAILED: list[dict[str, Any]] = []


def register(app: tether.App) -> None:
    @app.agent("waker")
    def waker(ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
        if task.get("receive"):  # wait for a message carrying the task
            message = ctx.receive()
            assert message is not None
            task = message.payload
        return ctx.step(attempt, task)  # type: ignore[no-any-return]

    class Inbox(tether.Agent):
        type = "waker-inbox"

        def handle(self, ctx: tether.RunContext, task: Any) -> Any:
            return None

        def on_message(self, ctx: tether.RunContext, message: tether.Message) -> Any:
            return ctx.step(attempt, message.payload)

    app.register(Inbox)


def silence_listener(app: tether.App, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: the worker receives no notification (its listener waits to be stopped), so
    only the in-process wake-up can wake it."""

    def listen(wake: object, stop: threading.Event, listening: object = None) -> None:
        stop.wait()

    monkeypatch.setattr(app.store, "listen", listen)


def submit(app: tether.App) -> tether.RunHandle:
    return app.submit("w1", {"n": 1})


def needing_attention(app: tether.App) -> tether.RunHandle:
    """A run whose step failed (run by another worker, before the idle one starts)."""
    FAILED.clear()
    run = app.submit("w1", {"n": 1, "fail": True})
    app.work(until_idle=True, timeout=WITHIN)
    assert run.status() == tether.RunStatus.NEEDS_ATTENTION
    return run


def paused(app: tether.App) -> tether.RunHandle:
    """A run of an agent paused before any worker took it."""
    run = app.submit("w1", {"n": 1})
    app.pause("w1")
    assert run.status() == tether.RunStatus.PAUSED
    return run


def retry(app: tether.App, run: tether.RunHandle) -> tether.RunHandle:
    app.retry_run(run.run_id)
    return run


def resume(app: tether.App, run: tether.RunHandle) -> tether.RunHandle:
    app.resume("w1")
    return run


def receiving(app: tether.App) -> tether.RunHandle:
    """A run waiting for a message (parked by another worker, before the idle one starts)."""
    run = app.submit("w1", {"receive": True})
    app.work(until_idle=True, timeout=WITHIN)
    assert run.status() == tether.RunStatus.WAITING
    return run


def send(app: tether.App, run: tether.RunHandle) -> tether.RunHandle:
    app.send("w1", {"n": 1})
    return run


def to_mailbox(app: tether.App, _: Any) -> tether.RunHandle:
    """A message that starts a run of its recipient's mailbox."""
    active_agent(app, "waker-inbox", "box")
    message_id = app.send("box", {"n": 1})
    [started] = [m.consumed_by for m in app.messages(agent_id="box") if m.message_id == message_id]
    return app.run(started or "")


Prepare = Callable[[tether.App], tether.RunHandle]
MakeRunnable = Callable[[tether.App, Any], tether.RunHandle]
CAUSES: dict[str, tuple[Prepare | None, MakeRunnable]] = {
    # cause: (what is set up before the worker starts, what then makes the run runnable)
    "submit": (None, lambda app, _: submit(app)),
    "incident retry": (needing_attention, retry),
    "agent resume": (paused, resume),
    "message to a waiting receive": (receiving, send),
    "message to a mailbox": (None, to_mailbox),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_a_write_that_makes_a_run_runnable_wakes_the_idle_worker_of_this_process(
    app: tether.App,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    cause: str,
) -> None:
    register(app)
    active_agent(app, "waker", "w1")
    if app.store.dialect == "postgresql":
        silence_listener(app, monkeypatch)
    prepare, make_runnable = CAUSES[cause]
    prepared = prepare(app) if prepare else None
    with idle_worker(app, caplog):
        run = make_runnable(app, prepared)
        assert run.result(timeout=WITHIN) == {"n": 1}
        log = messages(caplog)
    # Idle before the run was runnable, and never polled since: it was woken (module
    # docstring), and with no listener the only wake-up left is this process's own write.
    assert count(log, POLLED) == 0, log
    assert count(log, WOKEN_HERE) >= 1, log
    assert count(log, NOTIFIED) == 0, log


def test_every_worker_sharing_the_store_is_woken_until_it_stops(
    app: tether.App, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two idle workers of one App: one submit wakes both (one claims the run, the other
    finds nothing and goes idle again); once stopped, neither is woken any more."""
    register(app)
    active_agent(app, "waker", "w1")
    if app.store.dialect == "postgresql":
        silence_listener(app, monkeypatch)
    with idle_worker(app, caplog, "first"), idle_worker(app, caplog, "second"):
        assert submit(app).result(timeout=WITHIN) == {"n": 1}
        for name in ("first", "second"):
            # Idle once before the submit; idle again after it only if something woke it.
            idle_again = lambda name=name: count(messages(caplog, name), IDLE) >= 2  # noqa: E731
            eventually(f"{name} idle again", idle_again)
        log = messages(caplog)
        assert count(log, POLLED) == 0, log
        assert count(log, WOKEN_HERE) == 2, log  # the submit called each worker's wake-up once
    submit(app)
    assert count(messages(caplog), WOKEN_HERE) == 2  # nobody is woken any more


def test_a_step_commit_wakes_nobody(app: tether.App) -> None:
    """The hot path stays quiet: of a run's writes, only its submit calls the wake-up hook."""
    register(app)
    active_agent(app, "waker", "w1")
    calls: list[int] = []
    app.store.add_wake_listener(lambda: calls.append(1))

    @app.agent("stepper")
    def stepper(ctx: tether.RunContext, task: int) -> int:
        return sum(ctx.step(lambda i=i: i, name=f"step-{i}") for i in range(task))

    active_agent(app, "stepper", "s1")
    run = app.submit("s1", 5)
    assert calls == [1]
    app.work(until_idle=True, concurrency=1, timeout=WITHIN)
    assert run.result(timeout=0) == 10
    assert calls == [1]


# -- PostgreSQL: NOTIFY across processes ---------------------------------------------------

LISTENING_WORKER = """
import logging, sys
from tests.procs.crash_app import app
logging.basicConfig(level=logging.WARNING, filename=sys.argv[1], format="%(message)s")
logging.getLogger("tether.worker").setLevel(logging.DEBUG)
app.worker(concurrency=1, poll_interval=float(sys.argv[2])).run()
"""


@pytest.mark.postgres
def test_notify_wakes_an_idle_worker_process(pg_url: str, tmp_path: Path) -> None:
    """A real worker process, idle: a run submitted by this process (its own connection) is
    picked up because the worker was notified. The worker logs what woke it to a file."""
    log = tmp_path / "worker.log"
    app = tether.App(pg_url, require_types=False)  # the agent type's code is the worker's
    try:
        active_agent(app, "crasher", "c1")
        proc = subprocess.Popen(
            [sys.executable, "-c", LISTENING_WORKER, str(log), str(LONG_POLL)],
            cwd=ROOT,
            env=worker_env(pg_url, tmp_path / "effects.log", lease=5.0),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def lines() -> list[str]:
                assert proc.poll() is None, proc.communicate()[1]
                return log.read_text().splitlines() if log.exists() else []

            # Listening (a NOTIFY sent before would be lost) and idle after a first claim.
            eventually(
                "the worker listening and idle",
                lambda: count(lines(), LISTENING) == 1 and count(lines(), IDLE) >= 1,
            )
            run = app.submit("c1", {"steps": 1})
            assert len(run.result(timeout=WITHIN)) == 1
            worker_log = lines()
        finally:
            proc.terminate()
            proc.wait(WITHIN)
    finally:
        app.close()
    # The submitting process's in-process wake-up cannot reach another process: only a
    # notification can have woken the worker, which never polled (module docstring).
    assert count(worker_log, POLLED) == 0, worker_log
    assert count(worker_log, NOTIFIED) >= 1, worker_log
    assert count(worker_log, WOKEN_HERE) == 0, worker_log


@pytest.mark.postgres
def test_the_listener_reconnects_after_its_connection_is_killed(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener's server session is terminated: the worker says so, listens again on a new
    session, and a run submitted afterwards by another App (another Store: no in-process
    wake-up reaches this worker) is picked up because of a notification."""
    app, other = tether.App(pg_url), tether.App(pg_url, require_types=False)
    try:
        register(app)
        active_agent(app, "waker", "w1")
        with idle_worker(app, caplog):
            eventually("the listener starting", lambda: count(messages(caplog), LISTENING) == 1)
            [first] = [m for m in messages(caplog) if m.startswith(LISTENING)]
            pid = int(first.removeprefix(LISTENING).strip(" )"))
            import psycopg

            admin = psycopg.connect(pg_url, autocommit=True)
            try:
                killed = admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            finally:
                admin.close()
            assert killed == (True,)
            eventually("listening again", lambda: count(messages(caplog), LISTENING) == 2)
            # Back, it looked for work it may have missed; wait until it is idle again.
            eventually("idle again", lambda: after(messages(caplog), LISTENING, IDLE) >= 1)
            run = other.submit("w1", {"n": 2})
            assert app.run(run.run_id).result(timeout=WITHIN) == {"n": 2}
            log = messages(caplog)
    finally:
        other.close()
        app.close()
    assert any(m.startswith("LISTEN connection lost") for m in log), log
    assert [m for m in log if m.startswith(LISTENING)][1] != first  # a new server session
    assert count(log, POLLED) == 0, log
    assert after(log, LISTENING, NOTIFIED) >= 1, log
    assert count(log, WOKEN_HERE) == 0, log


def after(lines: list[str], mark: str, prefix: str) -> int:
    """How many lines starting with ``prefix`` follow the last line starting with ``mark``."""
    last = max((i for i, line in enumerate(lines) if line.startswith(mark)), default=-1)
    return count(lines[last + 1 :], prefix)
