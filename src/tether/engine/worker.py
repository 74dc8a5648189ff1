"""The worker: claims runs under a lease, executes them, heartbeats, and recovers.

Recovery is not a special mode: a run whose lease expired (its worker died) is claimable like a
pending one, and replay continues it. A worker's id is unique per process start, so a restarted
process never mistakes an old claim for its own.

Sync handlers execute on a thread pool of ``concurrency`` threads; async handlers on one event
loop thread. A run that waits gives its thread back: waiting holds nothing in the worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from tether.announce import Announcer
from tether.errors import DatabaseUnavailable
from tether.journal import Claim, ClaimSpec, Lease
from tether.outage import DEFAULT_OUTAGE_LIMIT, Outage

if TYPE_CHECKING:
    from tether.announce import Announcements
    from tether.store import Store

log = logging.getLogger("tether.worker")
T = TypeVar("T")


def new_worker_id() -> str:
    """``host:pid:random``: unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def dead_local_owners(owners: list[str]) -> list[str]:
    """The owners among ``owners`` that ran on this host in a process that no longer exists.

    Their runs need not wait for the lease to expire. A reused pid only makes us wait for
    the lease, never the reverse.
    """
    host = socket.gethostname()
    dead = []
    for owner in owners:
        owner_host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        if owner_host != host or not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            dead.append(owner)
        except PermissionError:
            continue
    return dead


def recover(store: Store) -> list[str]:
    """Make claimable every run whose lease expired or whose local worker process died."""
    return store.expire_leases(dead_local_owners(store.run_owners()))


class WorkerLink:
    """What an execution asks of the worker running it."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        # Only a worker of one slot, which would otherwise spend a transaction (an fsync) of
        # its own on each claim. With more slots the worker's loop claims for all the slots
        # freed meanwhile at once, which costs less than a claim inside every ending run.
        one_slot = worker.concurrency == 1
        self._spec = (
            ClaimSpec(worker.id, tuple(worker.agent_types), 1, worker.lease_ttl)
            if one_slot
            else None
        )

    def should_stop(self) -> bool:
        """True once the worker is stopping: the run is handed back at its next step."""
        return self._worker.stopping

    def next_claim(self) -> ClaimSpec | None:
        """The claim to make in the write that ends an execution, whose slot is free then
        (one-slot workers only); ``None`` once the worker is stopping."""
        return None if self._worker.stopping else self._spec

    def lease(self, claim: Claim) -> Lease:
        """The lease of a claim this worker executes, kept up to date by its heartbeat."""
        return self._worker.lease_of(claim)


class Worker:
    """Claims and executes runs of the given agent types until stopped (or idle).

    Args:
        store: the database.
        agent_types: names of the agent types this worker can execute.
        run_sync: executes one claim of a synchronous handler (blocking); returns the runs
            claimed in the write that ended it (to take its slot).
        run_async: returns a coroutine executing one claim of an async handler (likewise).
        is_async: tells which of the two a claim needs.
        concurrency: runs executing at once in this process.
        lease_ttl: seconds a claim lasts without a heartbeat.
        poll_interval: seconds between looks for work when nothing woke the worker.
        periodic: ``(interval, fn)`` maintenance jobs run from the heartbeat thread
            (retention, WAL checkpoints); a failing job is logged and tried again next time.
        outage_limit: seconds the worker waits for an unreachable database (retrying with
            backoff, and saying so in its log each time) before it gives up.
        clock: the app's clock, against which deadlines of waits fall due.
        announcements: where new approval requests are announced, by a thread of the
            worker's own (``tether.announce``); None: nowhere.
    """

    def __init__(
        self,
        store: Store,
        agent_types: list[str],
        *,
        run_sync: Callable[[Claim, WorkerLink], list[Claim]],
        run_async: Callable[[Claim, WorkerLink], Coroutine[Any, Any, list[Claim]]],
        is_async: Callable[[Claim], bool],
        concurrency: int = 4,
        lease_ttl: float = 30.0,
        poll_interval: float = 0.5,
        worker_id: str | None = None,
        periodic: list[tuple[float, Callable[[], object]]] | None = None,
        outage_limit: float | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        announcements: Announcements | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.store = store
        self.agent_types = agent_types
        self.run_sync = run_sync
        self.run_async = run_async
        self.is_async = is_async
        self.concurrency = concurrency
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.id = worker_id or new_worker_id()
        self.periodic = periodic or []
        self.outage_limit = DEFAULT_OUTAGE_LIMIT if outage_limit is None else outage_limit
        self.clock = clock
        self.announcements = announcements
        self.executed = 0
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._inflight: dict[str, Future[list[Claim]]] = {}
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="tether-run")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._link = WorkerLink(self)

    # -- control --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new claims; running runs stop at their next step."""
        self._stopping.set()
        self._wakeup.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping.is_set()

    def wake(self) -> None:
        """Look for work now (a notification arrived, or a run finished)."""
        self._wakeup.set()

    # -- the loop -------------------------------------------------------------------------

    def run(
        self, *, until_idle: bool = False, timeout: float | None = None, grace: float = 30.0
    ) -> int:
        """Work until stopped; with ``until_idle``, until nothing can progress without a person.

        Returns how many executions (claims) this worker ran.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = Outage(self.store.target.display, self.outage_limit)
        self._ride_out(outage, self._start)
        helpers = [
            threading.Thread(target=self._heartbeat_loop, name="tether-heartbeat", daemon=True)
        ]
        if self.store.dialect == "postgresql":
            helpers.append(
                threading.Thread(target=self._listen_loop, name="tether-listen", daemon=True)
            )
        for thread in helpers:
            thread.start()
        announcer: Announcer | None = None
        if self.announcements is not None:
            announcer = Announcer(self.store, self.announcements)
            announcer.start()
        self.store.add_wake_listener(self._woken_here)
        try:
            while not self.stopping:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self._ride_out(outage, self._claim_and_dispatch):
                    continue
                wait = self.poll_interval
                if until_idle and not self._busy():
                    pending, next_wake = self._ride_out(outage, self._unfinished)
                    if pending == 0:
                        break
                    if next_wake is not None:
                        due = (next_wake - self.clock()).total_seconds()
                        wait = max(0.005, min(wait, due))
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                log.debug("waiting up to %gs for a wake-up", wait)
                if not self._wakeup.wait(wait):
                    log.debug("no wake-up within %gs: polling", wait)
                self._wakeup.clear()
        finally:
            self.store.remove_wake_listener(self._woken_here)
            if announcer is not None:
                announcer.stop()
            self._shutdown(grace)
        return self.executed

    def _start(self) -> None:
        self.store.register_worker(self.id, socket.gethostname(), os.getpid())
        recovered = recover(self.store)
        if recovered:
            log.info("recovered %d runs of dead workers", len(recovered))

    def _unfinished(self) -> tuple[int, dt.datetime | None]:
        return self.store.count_unfinished(self.agent_types)

    def _ride_out(self, outage: Outage, work: Callable[[], T]) -> T:
        """``work()``, done again while the database is unavailable, until it answers or the
        outage has lasted ``outage_limit`` (then ``DatabaseUnavailable`` is raised)."""
        while True:
            try:
                result = work()
            except DatabaseUnavailable as exc:
                if self.stopping or not outage.wait(exc):
                    raise
                continue
            outage.over()
            return result

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._inflight)

    def _claim_and_dispatch(self) -> bool:
        with self._lock:
            free = self.concurrency - len(self._inflight)
        if free <= 0:
            return False
        claims = self.store.claim_runs(self.id, self.agent_types, free, self.lease_ttl)
        for claim in claims:
            self._dispatch(claim)
        return bool(claims)

    def lease_of(self, claim: Claim) -> Lease:
        """The lease of a claim this worker executes, which its heartbeat renews."""
        with self._lock:
            return self._leases.setdefault(
                claim.ref.run_id, Lease(self.lease_ttl, claim.lease_from)
            )

    def _dispatch(self, claim: Claim) -> None:
        self.executed += 1
        with self._lock:
            self._leases[claim.ref.run_id] = Lease(self.lease_ttl, claim.lease_from)
        if self.is_async(claim):
            future: Future[list[Claim]] = asyncio.run_coroutine_threadsafe(
                self.run_async(claim, self._link), self._event_loop()
            )
        else:
            future = self._pool.submit(self.run_sync, claim, self._link)
        run_id = claim.ref.run_id
        with self._lock:
            self._inflight[run_id] = future
        future.add_done_callback(functools.partial(self._done, run_id))

    def _done(self, run_id: str, future: Future[list[Claim]]) -> None:
        error = future.exception()
        if error is not None:
            # The executor turns handler errors into incidents; anything reaching here is
            # tether's own failure (e.g. the database went away). The lease will expire and
            # another claim will resume the run.
            log.error("run %s stopped on an internal error: %s", run_id, error, exc_info=error)
        else:
            # The runs claimed in the write that ended this one take its slot: dispatched
            # before the slot is freed, so the loop never claims past the concurrency.
            for claim in future.result():
                try:
                    self._dispatch(claim)
                except RuntimeError:  # the pool shut down: stopping hands the run back
                    log.info("worker stopping: run %s handed back", claim.ref.run_id)
        with self._lock:
            self._inflight.pop(run_id, None)
            self._leases.pop(run_id, None)
        self._wakeup.set()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="tether-async", daemon=True)
            thread.start()
            self._loop, self._loop_thread = loop, thread
        return self._loop

    def _heartbeat_loop(self) -> None:
        interval = max(0.05, self.lease_ttl / 3)
        beats = 0
        due = [time.monotonic() + every for every, _ in self.periodic]
        while not self._stopping.wait(interval):
            beats += 1
            try:
                with self._lock:
                    held = {run_id: self._leases.get(run_id) for run_id in self._inflight}
                sent = time.monotonic()
                owned = self.store.heartbeat(self.id, list(held), self.lease_ttl)
                for run_id, lease in held.items():
                    if lease is None:
                        continue
                    if run_id in owned:
                        lease.renewed(sent)
                    else:
                        lease.lost = True  # no further step of it starts here
                if beats % 3 == 0 and recover(self.store):
                    self._wakeup.set()  # a worker died here: take over its runs now
            except Exception as exc:  # keep beating: a transient database error must not kill it
                log.warning("heartbeat failed (leases are not renewed meanwhile): %s", exc)
            for i, (every, job) in enumerate(self.periodic):
                if time.monotonic() >= due[i]:
                    due[i] = time.monotonic() + every
                    try:
                        job()
                    except Exception as exc:
                        log.warning("maintenance job %s failed: %s", job, exc)

    def _woken_here(self) -> None:
        """A write of this process made a run runnable (called on the committing thread)."""
        log.debug("woken by a write of this process")
        self._wakeup.set()

    def _listen_loop(self) -> None:
        lost = False
        while not self.stopping:
            try:
                listening = functools.partial(self._listening, lost)
                self.store.listen(self._notified, self._stopping, listening)
            except Exception as exc:  # polling covers the gap; try to listen again shortly
                log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                lost = True
                self._stopping.wait(1.0)

    def _listening(self, again: bool, backend_pid: int) -> None:
        log.debug("listening for notifications (PostgreSQL backend pid %d)", backend_pid)
        if again:
            log.info("listening for notifications again")
            self._wakeup.set()  # those sent while the connection was down are lost: look now

    def _notified(self) -> None:
        log.debug("woken by a notification")
        self._wakeup.set()

    def _close_event_loop(self, loop: asyncio.AbstractEventLoop, wait: float) -> None:
        """Stop the async handlers' loop, and the threads it sends writes to, and close it.

        A thread still busy past ``wait`` (an abandoned step body) is left to end on its own.
        """
        ended = asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop)
        try:
            ended.result(timeout=wait)
        except Exception as exc:
            log.warning("the async handlers' threads did not all end in time: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(wait)
            if not self._loop_thread.is_alive():
                loop.close()
        self._loop = self._loop_thread = None

    def _shutdown(self, grace: float) -> None:
        self._stopping.set()
        with self._lock:
            futures = list(self._inflight.values())
        deadline = time.monotonic() + grace
        for future in futures:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            self._close_event_loop(self._loop, max(1.0, deadline - time.monotonic()))
        try:
            released = self.store.stop_worker(self.id)
            if released:
                log.info("handed %d unfinished runs back", released)
        except Exception as exc:
            log.warning("could not hand runs back on shutdown (%s); their leases will expire", exc)
