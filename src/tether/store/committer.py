"""The hot path: a run's fenced journal writes, with group commit.

Every step a worker finishes is written here, so this module trades SQLAlchemy's statement
machinery for plain DBAPI calls on one dedicated connection, with SQL built once per dialect.

Group commit: threads that commit at the same time queue up; one of them (the leader) writes
the whole queue in a single transaction — one fsync for many steps — and wakes the others.
Each caller still returns only after its own write is durable. A unit of work that refuses
(a lost lease, an agent that is not active) does so before its first write, so the others in
the batch go on without it and no savepoint is needed.

Every write starts with the fence: ``UPDATE runs ... WHERE run_id AND owner AND fence
RETURNING status``; if no row matches, the lease was lost and nothing of that write happens.
On PostgreSQL a run's write is one statement whose other writes depend on the fence inside it
(``fenced``), sent alone in autocommit mode: one round trip per step instead of six.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tether.errors import (
    ConfigurationError,
    LeaseLost,
    NotFound,
    Refused,
    StorageFull,
    TetherError,
)
from tether.journal import (
    Claim,
    ClaimSpec,
    Commit,
    Committed,
    JournalEntry,
    LedgerChange,
    OpenLedger,
    Reserve,
    RunRef,
    Settle,
    Wait,
)
from tether.limits import Breach, Limit, Throttle, check
from tether.outage import DEFAULT_OUTAGE_LIMIT, Outage
from tether.store import approvals, coordination, fenced, ledger
from tether.store.common import new_id
from tether.store.database import (
    CONNECTION,
    ROLLED_BACK,
    Database,
    failure_kind,
    translate,
)
from tether.store.schema import json_text
from tether.store.statements import Statements
from tether.types import FINAL_RUN_STATUSES, RunStatus, StepStatus
from tether.vocabulary import EventType, WaitKind

log = logging.getLogger("tether.store")

MAX_BATCH = 128
IDLE_CHECK = 1.0
"""Seconds after which the dedicated PostgreSQL connection is checked before a write."""
_RUN_STATUS = {status.value: status for status in RunStatus}  # faster than RunStatus(value)


def _execute(cur: Any, statement: str, rows: list[tuple[Any, ...]]) -> None:
    """One row is the common case, and ``execute`` is cheaper than ``executemany`` for it."""
    if len(rows) == 1:
        cur.execute(statement, rows[0])
    elif rows:
        cur.executemany(statement, rows)


@dataclass
class _Request:
    """One caller's unit of work in a batch: ``work(cursor, now, request)`` sets ``result``
    and returns whether workers should be woken (this process's, and by NOTIFY on PostgreSQL).

    A unit of work that raises ``TetherError`` must do so before its first write: the batch's
    transaction commits the others' writes regardless.
    """

    work: Callable[[Any, _TransactionTime, _Request], bool]
    one_statement: bool = False
    """Its work is a single statement needing no ``now``: alone in a batch, it runs in
    autocommit mode (PostgreSQL), without BEGIN, ``SELECT now()`` and COMMIT."""
    patient: bool = True
    """A worker's write, which waits out an unreachable database or a full disk; a write
    from the App or the CLI (a submit) fails at once instead, for its caller to decide."""
    ledger: tuple[str, ...] = ()
    """The runs whose budget ledger rows it takes: it comes after the batch's other writes,
    with those rows locked first (see ``Committer._transaction``)."""
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    after: list[Any] = field(default_factory=list)


class Committer:
    """Writes runs' progress through one connection, batching concurrent callers."""

    def __init__(
        self,
        db: Database,
        max_batch: int = MAX_BATCH,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        outage_limit: float = DEFAULT_OUTAGE_LIMIT,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.db = db
        self.wake = wake
        """Called after a batch that made a run runnable commits, to wake this process's
        workers; it must not raise (``Wakeups.wake`` logs its callbacks' errors)."""
        self.sql = Statements(db.dialect)
        self.co = coordination.CoordinationSql(self.sql.pg)
        self.ap = approvals.ApprovalSql(self.sql.pg)
        self.lg = ledger.LedgerSql(self.sql.pg)
        self.max_batch = max_batch
        self.clock = clock
        """The app's clock: what due deadlines of waits are compared with."""
        self.outage_limit = outage_limit
        self._used = 0.0
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._leading = False
        self._conn: Any = None
        self.batches = 0
        self.writes = 0

    def close(self) -> None:
        """Close the dedicated connection."""
        with self._cond:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def commit(self, ref: RunRef, change: Commit, agent_id: str, lease_ttl: float) -> Committed:
        """Write ``change`` for the run durably; returns the run's status after the write, and
        the runs claimed for ``change.then_claim`` in the same transaction.

        Raises ``LeaseLost`` (nothing written, nothing claimed) when ``ref`` no longer owns
        the run.
        """
        if change.settle is not None:
            settle = functools.partial(self._apply_settle, ref, change, agent_id, lease_ttl)
            status, settled = self._submit(_Request(settle))
            return Committed(status, settled=settled)
        one_statement = self.sql.pg and fenced.fits_one_statement(change)
        apply = self._apply_pg_commit if one_statement else self._apply_commit
        write = functools.partial(apply, ref, change, agent_id, lease_ttl)
        ledger_rows = _ledger_rows(ref, change)
        if change.reserve is not None:
            status, verdict = self._submit(_Request(write, ledger=ledger_rows))
            return Committed(status, verdict=verdict)
        if change.then_claim is None:
            status = self._submit(_Request(write, one_statement=one_statement, ledger=ledger_rows))
            return Committed(status)
        work = functools.partial(self._apply_write_then_claim, write, change.then_claim)
        status, claimed = self._submit(_Request(work))
        return Committed(status, claimed)

    def _apply_write_then_claim(
        self,
        write: Callable[[Any, _TransactionTime, _Request], bool],
        spec: ClaimSpec,
        cur: Any,
        clock: _TransactionTime,
        request: _Request,
    ) -> bool:
        """A fenced write, then the claim it asks for; the result is ``(status, claims)``.

        The claim comes after the write, so a lost lease (raised by the write) claims nothing
        either.
        """
        notify = write(cur, clock, request)
        claimed = self._claim(
            cur, clock, spec.worker_id, spec.agent_types, spec.limit, spec.lease_ttl
        )
        request.result = (request.result, claimed)
        return notify

    def claim(
        self, worker_id: str, agent_types: Sequence[str], limit: int, lease_ttl: float
    ) -> list[Claim]:
        """Claim up to ``limit`` runnable runs of these types, loaded for replay.

        Runnable: pending; waiting with its timer due; or running with an expired lease (its
        worker died) - recovery is the ordinary claim path. An agent never runs more runs at
        once than its ``max_concurrent``; an agent type never more than its
        ``type_concurrency``, nor claims more than its ``rate_limit`` in a window (both from
        ``agent_types``, across all workers). Each claim increments the run's fencing epoch
        and sets its ``claimed_at``.
        """
        work = functools.partial(self._apply_claim, worker_id, list(agent_types), limit, lease_ttl)
        return list(self._submit(_Request(work)))

    def submit(
        self,
        agent_id: str,
        task: Any,
        *,
        task_id: str | None,
        priority: int,
        max_concurrent: int,
        parent_run_id: str | None = None,
        forked_from: str | None = None,
        forked_at_step: int | None = None,
        copy_journal_to: int | None = None,
        state_version: int | None = None,
        limits: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Insert a pending run for an active agent, durably; returns its id and whether it
        was created now (an existing ``task_id`` of the agent returns that run instead)."""
        values = {
            "agent_id": agent_id,
            "task": task,
            "task_id": task_id,
            "priority": priority,
            "max_concurrent": max_concurrent,
            "parent_run_id": parent_run_id,
            "forked_from": forked_from,
            "forked_at_step": forked_at_step,
            "copy_journal_to": copy_journal_to,
            "state_version": state_version,
            "limits": limits or None,
        }
        work = functools.partial(self._apply_submit, values)
        run_id, created = self._submit(_Request(work, patient=False))
        return str(run_id), bool(created)

    def _submit(self, request: _Request) -> Any:
        with self._cond:
            self._queue.append(request)
            while not request.done and self._leading:
                self._cond.wait()
            if not request.done:
                self._leading = True
        if not request.done:
            try:
                while not request.done:
                    with self._cond:
                        batch = self._queue[: self.max_batch]
                        del self._queue[: self.max_batch]
                    self._write(batch)
                    with self._cond:
                        self._cond.notify_all()
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        return request.result

    # -- one transaction for a batch ------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self.db.engine.raw_connection()
            if self.sql.pg:
                # Ours alone, never back to the pool: autocommit lets a one-statement write
                # skip BEGIN and COMMIT; every other batch begins its transaction explicitly.
                driver = conn.driver_connection
                assert driver is not None  # a fresh checkout always has one
                driver.autocommit = True
                conn.detach()
            self._conn = conn
        return self._conn

    def _write(self, requests: list[_Request]) -> None:
        """Write a batch in one transaction, doing it again when nothing of it can have been
        written: after a lock wait, a deadlock or a serialization failure at once (a few
        times); while the database cannot be reached or the disk is full, with backoff, for
        up to ``outage_limit`` seconds (workers' writes only: the others fail at once). A
        connection lost while a statement was in flight is reported (``DatabaseUnavailable``):
        whether it committed is unknown."""
        outage: Outage | None = None  # made on the first failure: rendering the URL costs
        batch = list(requests)
        rolled_back = 0
        reconnected = False
        while batch:
            for request in batch:
                request.result, request.error, request.after = None, None, []
            conn, sent = None, False
            try:
                conn = self._connection()
                self._check_alive(conn)
                cur = conn.cursor()
                try:
                    sent = True
                    if len(batch) == 1 and batch[0].one_statement:
                        woke = batch[0].work(cur, _TransactionTime(cur, pg=True), batch[0])
                    else:
                        woke = self._transaction(cur, batch)
                        conn.commit()
                finally:
                    cur.close()
                self._used = time.monotonic()
                if woke:
                    self.wake()
                break
            except BaseException as exc:
                self._abandon(conn)
                wrapped = _dbapi_error(exc)
                error = (
                    exc
                    if isinstance(exc, TetherError | LeaseLost)  # refused before writing
                    else translate(wrapped if wrapped is not None else exc, self.db.target)
                )
                kind = failure_kind(wrapped, self.db.dialect) if wrapped is not None else None
                if kind == ROLLED_BACK and rolled_back < 7:
                    rolled_back += 1  # nothing was committed: the batch is safe to redo
                    time.sleep(min(1.0, 0.01 * 2**rolled_back))
                    continue
                if kind == CONNECTION and not sent and not reconnected:
                    # A stale connection (the server restarted meanwhile): a new one, now.
                    log.warning("%s; reconnecting", error)
                    reconnected = True
                    continue
                unwritten = (kind == CONNECTION and not sent) or isinstance(error, StorageFull)
                for request in batch:
                    if not (unwritten and request.patient):
                        request.error = error
                batch = [r for r in batch if r.error is None]
                outage = outage or Outage(self.db.target.display, self.outage_limit)
                if batch and not outage.wait(error):
                    for request in batch:
                        request.error = error
                    break
        if outage is not None:
            outage.over()
        self.batches += 1
        for request in requests:
            if request.error is None:
                self.writes += 1
                for action in request.after:
                    action()
            request.done = True

    def _check_alive(self, conn: Any) -> None:
        """PostgreSQL: a connection idle for a while may have died with a server restart;
        find out before sending a write, when a failure still means nothing was sent."""
        if self.sql.pg and time.monotonic() - self._used > IDLE_CHECK:
            cur = conn.cursor()
            try:
                cur.execute("SELECT 1")
            finally:
                cur.close()

    def _abandon(self, conn: Any) -> None:
        if conn is None:
            return
        try:
            conn.rollback()
        except Exception:
            # A broken connection cannot be rolled back; drop it and reconnect next time.
            try:
                conn.invalidate()
            except Exception:
                pass
            self._conn = None

    def _transaction(self, cur: Any, batch: list[_Request]) -> bool:
        """The batch's writes, uncommitted; returns whether one made a run runnable.

        Those that take budget ledger rows come last: the lock order puts ledger rows after
        every agent and run row of a transaction (docs/architecture.md), and the batch's
        other writes (a claim, a wake-up) take agents' and runs' rows."""
        sql = self.sql
        cur.execute("BEGIN" if sql.pg else "BEGIN IMMEDIATE")
        now = _TransactionTime(cur, sql.pg)
        notify = False
        holders = sorted({run_id for request in batch for run_id in request.ledger})
        if holders:
            batch = sorted(batch, key=lambda request: bool(request.ledger))
        locked = False
        for request in batch:
            if request.ledger and not locked and sql.pg:
                # Every ledger row the batch's writes take, in key order, before the first
                # of them: two batches never take the same rows in different orders.
                ledger.lock(cur, self.lg, holders)
                locked = True
            try:
                notify |= request.work(cur, now, request)
            except (TetherError, LeaseLost) as exc:  # refusals: raised before any write
                if len(batch) == 1:
                    raise
                request.error, request.after = exc, []
        if notify and sql.pg:
            cur.execute("NOTIFY tether_runs")
        return notify

    def _apply_commit(
        self,
        ref: RunRef,
        change: Commit,
        agent_id: str,
        lease_ttl: float,
        cur: Any,
        clock: _TransactionTime,
        request: _Request,
    ) -> bool:
        """The statements of one fenced write; returns whether workers should be woken."""
        sql = self.sql
        now = clock()
        t = sql.time(now)
        sends = self._before_sends(cur, ref, change) if change.outgoing or change.children else {}
        if sql.pg and change.state is not None:
            cur.execute(sql.lock_agent, (agent_id,))  # the lock order: the agent, then the run
        if not sql.pg and not change.release and change.status is None:
            # Most writes of a step on SQLite: nothing of the run changes, the fence is a read.
            cur.execute(sql.fence_read, (ref.run_id, ref.owner, ref.fence))
        else:
            params: list[Any] = []
            cur.execute(fenced.fence(ref, change, lease_ttl, params, pg=sql.pg, now=t), params)
        row = cur.fetchone()
        if row is None:
            raise _lease_lost(ref)
        status = _RUN_STATUS[row[0]]
        others = False  # runs this write made runnable, besides this one
        if sends or change.children or change.ended or change.wakes:
            others = self._coordinate(cur, ref, agent_id, change, status, sends, t)
        if change.waits and status != RunStatus.CANCELLED:
            _execute(
                cur,
                sql.insert_wait,
                [
                    (ref.run_id, w.seq, w.kind.value, w.key, sql.time(w.deadline), t)
                    for w in change.waits
                ],
            )
        entries = list(change.entries)
        version = None
        if change.state is not None:
            cur.execute(sql.state, (json_text(change.state), t, agent_id))
            version = cur.fetchone()[0]
            cur.execute(
                sql.state_version,
                (agent_id, version, json_text(change.state), "run", ref.run_id, t),
            )
        inserts, updates = [], []
        for entry in entries:
            state_version = (
                version if (version is not None and entry is entries[-1]) else (entry.state_version)
            )
            finished = t if entry.status == StepStatus.COMPLETED else None
            columns = fenced.entry_columns(entry)
            if entry.stored:
                updates.append((*columns, state_version, finished, ref.run_id, entry.seq))
            else:
                # A start time is known only for a step whose intent was journaled.
                started = t if entry.status == StepStatus.STARTED else None
                inserts.append((ref.run_id, entry.seq, *columns, state_version, started, finished))
        _execute(cur, sql.insert_step, inserts)
        _execute(cur, sql.update_step, updates)
        events = list(change.events)
        verdict = None
        if change.reserve is not None:
            verdict = self._reserve(cur, ref, change.reserve, events, lease_ttl, t)
        if change.ledger is not None:
            events += self._charge(cur, ref, change.ledger, t)
        _execute(
            cur,
            sql.insert_event,
            [(ref.run_id, None, kind, json_text(data), t) for kind, data in events],
        )
        checkpoint_id = None
        if change.checkpoint is not None:
            checkpoint_id = self._checkpoint(cur, ref, agent_id, change.checkpoint, entries, t)
        if change.incident is not None:
            columns = fenced.incident_columns(ref, agent_id, change.incident)
            cur.execute(sql.insert_incident, (*columns, t))
        wake = others or (change.status == RunStatus.PENDING and status == RunStatus.PENDING)
        request.after.append(functools.partial(_written, entries, version, checkpoint_id))
        request.result = status if change.reserve is None else (status, verdict)
        return wake

    def _open(self, cur: Any, run_id: str, opening: OpenLedger | None, t: Any) -> None:
        if opening is not None:
            ledger.create(
                cur,
                self.lg,
                run_id,
                opening.limits,
                opening.action,
                opening.warn_at,
                opening.started,
                t,
            )

    def _reserve(
        self, cur: Any, ref: RunRef, reserve: Reserve, events: list[Any], lease_ttl: float, t: Any
    ) -> tuple[Breach | Throttle | None, list[Limit], bool]:
        """Check a step's usage against its budgets, locked, and hold it if it fits; a breach
        is checked again once reservations of runs that ended are dropped. A breach whose
        action is to pause parks the run here (``Reserve.park``)."""
        self._open(cur, ref.run_id, reserve.open, t)
        if reserve.sync is not None:
            self._charge(cur, ref, reserve.sync, t)
        holders = reserve.holders
        limits = ledger.load(cur, self.lg, ref.run_id, holders, lock=True)
        verdict = check(limits, reserve.amounts, reserve.now)
        if (
            isinstance(verdict, Breach)
            and verdict.limit.reserved
            and ledger.prune(cur, self.lg, holders)
        ):
            limits = ledger.load(cur, self.lg, ref.run_id, holders, lock=True)
            verdict = check(limits, reserve.amounts, reserve.now)
        if verdict is None:
            ledger.reserve(cur, self.lg, ref.run_id, reserve.seq, reserve.amounts, limits,
                           reserve.now, t)  # fmt: skip
            events.extend(reserve.events)
        parked = isinstance(verdict, Breach) and reserve.park and verdict.parks
        if parked:
            assert isinstance(verdict, Breach)
            parking = Commit(status=RunStatus.WAITING, release=True)
            params: list[Any] = []
            cur.execute(
                fenced.fence(ref, parking, lease_ttl, params, pg=self.sql.pg, now=t), params
            )
            if cur.fetchone() is None:
                raise _lease_lost(ref)
            holder = verdict.limit.holder
            cur.execute(
                self.sql.insert_wait,
                (ref.run_id, reserve.seq, WaitKind.BUDGET.value, holder, None, t),
            )
            waiting = {"kind": WaitKind.BUDGET.value, "seq": reserve.seq,
                       "reason": verdict.message(ref.run_id, reserve.step)}  # fmt: skip
            events.append(
                (EventType.BUDGET_EXCEEDED.value, verdict.event(reserve.step, reserve.seq))
            )
            events.append((EventType.RUN_WAITING.value, waiting))
        return verdict, limits, parked

    def _charge(self, cur: Any, ref: RunRef, change: LedgerChange, t: Any) -> list[Any]:
        self._open(cur, ref.run_id, change.open, t)
        if change.synced is not None:
            ledger.sync(cur, self.lg, ref.run_id, change.usage, change.synced, t)
            if change.release is not None:
                ledger.settle(cur, self.lg, ref.run_id, change.seq, change.release, (), {}, t)
            return []
        return ledger.settle(
            cur, self.lg, ref.run_id, change.seq, change.release, change.holders, change.usage, t
        )

    def _before_sends(self, cur: Any, ref: RunRef, change: Commit) -> dict[int, list[str]]:
        """Before a write sends messages or starts children: refuse what cannot be (before
        anything is written), find each message's recipients, and lock their agents (the lock
        order: agents, then runs). Returns the recipients by journal position."""
        co = self.co
        sends: dict[int, list[str]] = {}
        for out in change.outgoing:
            if out.recipient is not None:
                coordination.check_recipient(cur, co, out.recipient)
            sends[out.seq] = coordination.recipients(cur, co, out.recipient, out.topic)
        for child in change.children:
            coordination.check_child_agent(cur, co, child.agent_id, ref.run_id)
        coordination.lock_agents(cur, co, [a for agents in sends.values() for a in agents])
        return sends

    def _coordinate(
        self,
        cur: Any,
        ref: RunRef,
        agent_id: str,
        change: Commit,
        status: RunStatus,
        sends: dict[int, list[str]],
        t: Any,
    ) -> bool:
        """After the fence: send, start children, cancel an ended run's attached children,
        wake who waits for this run. A cancelled run does none of it. Returns whether a run
        became runnable (a woken receiver or parent, a mailbox run, a child)."""
        if status == RunStatus.CANCELLED:
            return False
        co = self.co
        outputs: dict[int, Any] = {}
        runnable = bool(change.children)
        for out in change.outgoing:
            ids = [
                coordination.send(
                    cur,
                    co,
                    recipient=recipient,
                    topic=out.topic,
                    key=out.key,
                    payload=out.payload,
                    sender_agent=agent_id,
                    sender_run=ref.run_id,
                    at=t,
                )
                for recipient in sends[out.seq]
            ]
            runnable = runnable or any(r for _, _, r in ids)
            outputs[out.seq] = ids[0][0] if out.recipient is not None else len(ids)
        for entry in change.entries:
            if entry.seq in outputs:
                entry.output = outputs[entry.seq]
        for child in change.children:
            coordination.start_child(
                cur,
                co,
                run_id=child.run_id,
                agent_id=child.agent_id,
                task=child.task,
                task_id=child.task_id,
                priority=child.priority,
                parent_run_id=ref.run_id,
                detached=child.detached,
                limits=child.limits,
                at=t,
            )
        if change.ended:
            reason = f"its parent {ref.run_id} ended"
            below = coordination.cancel_subtree(cur, co, ref.run_id, reason, t)
            approvals.withdraw(cur, co, below, t)
        for kind, key in change.wakes:
            runnable = bool(coordination.wake(cur, co, kind, key, t)) or runnable
        if change.children and self.sql.pg:
            cur.execute(co.notify)
        return runnable

    def _apply_settle(
        self,
        ref: RunRef,
        change: Commit,
        agent_id: str,
        lease_ttl: float,
        cur: Any,
        clock: _TransactionTime,
        request: _Request,
    ) -> bool:
        """A wait decided inside the write (``Commit.settle``): journal the first ready
        alternative, or park the run on all of them. The result is ``(status, settled)``."""
        settle = change.settle
        assert settle is not None
        co, sql = self.co, self.sql
        t = sql.time(clock())
        topics = [key for kind, key in settle.alternatives if kind == "message"]
        kids = [key for kind, key in settle.alternatives if kind == "child"]
        asked = [key for kind, key in settle.alternatives if kind == "approval"]
        if topics:
            coordination.lock_agents(cur, co, [agent_id])  # senders to this agent take turns
        ended = coordination.children(cur, co, kids)  # FOR SHARE, before this run's row
        rows = self._approvals(cur, ref, agent_id, settle, asked, t)  # locked, likewise
        for kid in kids:
            found = ended.get(kid)
            if found is None or found["parent_run_id"] != ref.run_id:
                raise ConfigurationError(
                    f"run {ref.run_id} cannot wait for run {kid}: it is not a child of this "
                    "run (wait only for handles that ctx.spawn returned here)"
                )
        params: list[Any] = []
        plain = Commit()
        cur.execute(fenced.fence(ref, plain, lease_ttl, params, pg=sql.pg, now=t), params)
        row = cur.fetchone()
        if row is None:
            raise _lease_lost(ref)
        settled = None
        if _RUN_STATUS[row[0]] != RunStatus.CANCELLED:
            settled = self._ready(cur, ref, agent_id, settle, ended, rows, t)
        final = _FINAL_VALUES
        if settled is None and settle.deadline is not None and self.clock() >= settle.deadline:
            settled = {"timeout": True}
        if settled is not None:
            entry = JournalEntry(
                settle.seq,
                settle.name,
                settle.kind,
                StepStatus.COMPLETED,
                output=settled,
                stored=settle.stored,
            )
            done = replace(change, settle=None, entries=[*change.entries, entry])
            self._apply_commit(ref, done, agent_id, lease_ttl, cur, clock, request)
            request.result = (request.result, settled)
            return False
        waits = [
            Wait(settle.seq, WaitKind.MESSAGE, coordination.message_key(agent_id, key))
            if kind == "message"
            else Wait(settle.seq, WaitKind.APPROVAL, key)
            if kind == "approval"
            else Wait(settle.seq, WaitKind.CHILD, key)
            for kind, key in settle.alternatives
            if kind != "child" or ended[key]["status"] not in final
        ]
        if settle.deadline is not None:
            waits.append(Wait(settle.seq, WaitKind.TIMER, "", settle.deadline))
        until = {"until": _iso(settle.deadline)} if settle.deadline is not None else None
        parked_entry = JournalEntry(
            settle.seq,
            settle.name,
            settle.kind,
            StepStatus.WAITING,
            output=until,  # replay keeps the deadline of the first try
            stored=settle.stored,
        )
        detail: dict[str, Any] = {"kind": waits[0].kind.value, "seq": settle.seq}
        if asked:
            detail["approval_id"] = asked[0]
        if settle.deadline is not None:
            detail["until"] = _iso(settle.deadline)
        parked = replace(
            change,
            settle=None,
            entries=[*change.entries, parked_entry] if not settle.stored else change.entries,
            status=RunStatus.WAITING,
            waits=waits,
            release=True,
            events=[*change.events, (EventType.RUN_WAITING, detail)],
        )
        self._apply_commit(ref, parked, agent_id, lease_ttl, cur, clock, request)
        request.result = (request.result, None)
        return False

    def _approvals(
        self,
        cur: Any,
        ref: RunRef,
        agent_id: str,
        settle: Settle,
        asked: list[str],
        t: Any,
    ) -> dict[str, tuple[Any, ...]]:
        """The approvals a wait is on, created with its first try and locked (before the
        run's row: the lock order of a decision, which locks the approval, then wakes the
        run)."""
        rows: dict[str, tuple[Any, ...]] = {}
        for approval_id in asked:
            if settle.request is not None and not settle.stored:
                deadline = self.sql.time(settle.deadline)
                approvals.create(
                    cur,
                    self.ap,
                    self.co,
                    approval_id=approval_id,
                    run_id=ref.run_id,
                    seq=settle.seq,
                    agent_id=agent_id,
                    request=settle.request,
                    deadline=deadline,
                    at=t,
                )
            row = approvals.lock(cur, self.ap, approval_id)
            if row is None:
                raise ConfigurationError(
                    f"run {ref.run_id} waits for approval {approval_id}, which does not exist"
                )
            rows[approval_id] = row
        return rows

    def _ready(
        self,
        cur: Any,
        ref: RunRef,
        agent_id: str,
        settle: Settle,
        ended: dict[str, dict[str, Any]],
        rows: dict[str, tuple[Any, ...]],
        t: Any,
    ) -> dict[str, Any] | None:
        """What settles the wait now: the first ready alternative (a message or a decision
        is consumed), or with ``every`` all children's ends; None if nothing is ready."""
        final = _FINAL_VALUES
        kids = [key for kind, key in settle.alternatives if kind == "child"]
        if settle.every:
            if all(ended[kid]["status"] in final for kid in kids):
                return {"children": [_outcome(ended[kid]) for kid in kids]}
            return None
        due = settle.deadline is not None and self.clock() >= settle.deadline
        for index, (kind, key) in enumerate(settle.alternatives):
            if kind == "child":
                if ended[key]["status"] in final:
                    return {"index": index, "child": _outcome(ended[key])}
                continue
            if kind == "approval":
                decision = approvals.take(
                    cur,
                    self.ap,
                    self.co,
                    rows[key],
                    approval_id=key,
                    run_id=ref.run_id,
                    seq=settle.seq,
                    due=due,
                    at=t,
                )
                if decision is not None:
                    return {"index": index, "approval": decision}
                continue
            message = coordination.consume(cur, self.co, agent_id, key, ref.run_id, settle.seq, t)
            if message is not None:
                return {"index": index, "message": message}
        return None

    def _apply_pg_commit(
        self,
        ref: RunRef,
        change: Commit,
        agent_id: str,
        lease_ttl: float,
        cur: Any,
        _clock: _TransactionTime,
        request: _Request,
    ) -> bool:
        """PostgreSQL: ``_apply_commit`` as one statement (see ``fenced``)."""
        statement = fenced.one_statement(ref, change, agent_id, lease_ttl)
        cur.execute(statement.text, statement.params)
        row = cur.fetchone()
        if row is None:
            raise _lease_lost(ref)
        version = row[1] if statement.state else None
        request.after.append(functools.partial(_written, list(change.entries), version, None))
        request.result = _RUN_STATUS[row[0]]
        return False  # the statement sent its own NOTIFY

    def _checkpoint(
        self,
        cur: Any,
        ref: RunRef,
        agent_id: str,
        name: str,
        entries: list[JournalEntry],
        t: Any,
    ) -> str:
        sql = self.sql
        cur.execute(sql.agent_state, (agent_id,))
        state, version = cur.fetchone()
        seq = entries[-1].seq if entries else None
        checkpoint_id = new_id("ckpt")
        cur.execute(
            sql.insert_checkpoint,
            (
                checkpoint_id,
                agent_id,
                name,
                json_text(self._json(state)),
                version,
                ref.run_id,
                seq,
                t,
            ),
        )
        data = {"checkpoint_id": checkpoint_id, "name": name, "version": version, "seq": seq}
        cur.execute(
            sql.insert_event,
            (
                ref.run_id,
                agent_id,
                EventType.CHECKPOINT_CREATED,
                json_text({**data, "actor": "run"}),
                t,
            ),
        )
        if seq is not None:
            cur.execute(sql.step_output, (json_text(checkpoint_id), ref.run_id, seq))
        return checkpoint_id

    def _json(self, value: Any) -> Any:
        """A stored JSON value as Python: SQLite hands back text, psycopg parsed values."""
        if self.sql.pg or value is None:
            return value
        return json.loads(value)  # SQLite columns hold JSON text (TEXT affinity)

    # -- submit and claim -----------------------------------------------------------------

    def _apply_submit(
        self, v: dict[str, Any], cur: Any, clock: _TransactionTime, request: _Request
    ) -> bool:
        sql, t = self.sql, self.sql.time(clock())
        agent_id = v["agent_id"]
        cur.execute(sql.agent_lifecycle, (agent_id,))
        row = cur.fetchone()
        if row is None:
            raise NotFound("agent", agent_id, "list agents with: tether agents list")
        if v["task_id"] is not None:
            cur.execute(sql.run_by_task, (agent_id, v["task_id"]))
            existing = cur.fetchone()
            if existing is not None:
                request.result = (existing[0], False)
                return False
        if row[0] != "active":
            raise Refused(
                f"agent {agent_id} is {row[0]}; only an active agent starts runs. "
                f"Activate it first: tether agents activate {agent_id}"
            )
        run_id = new_id("run")
        cur.execute(
            sql.insert_run,
            (
                run_id,
                agent_id,
                v["task_id"],
                json_text(v["task"]),
                v["priority"],
                v["max_concurrent"],
                v["parent_run_id"],
                v["forked_from"],
                v["forked_at_step"],
                v["state_version"],
                json_text(v["limits"]),
                t,
                t,
            ),
        )
        if v["forked_from"] is not None and v["copy_journal_to"] is not None:
            cur.execute(sql.copy_journal, (run_id, v["forked_from"], v["copy_journal_to"]))
        data: dict[str, Any] = {"task_id": v["task_id"], "priority": v["priority"]}
        if v["parent_run_id"]:
            data["parent_run_id"] = v["parent_run_id"]
        if v["forked_from"]:
            data.update(forked_from=v["forked_from"], from_step=v["forked_at_step"])
        cur.execute(
            sql.insert_event, (run_id, agent_id, EventType.RUN_SUBMITTED, json_text(data), t)
        )
        request.result = (run_id, True)
        return True

    def _apply_claim(
        self,
        worker_id: str,
        agent_types: list[str],
        limit: int,
        lease_ttl: float,
        cur: Any,
        clock: _TransactionTime,
        request: _Request,
    ) -> bool:
        request.result = self._claim(cur, clock, worker_id, agent_types, limit, lease_ttl)
        return False

    def _claim(
        self,
        cur: Any,
        clock: _TransactionTime,
        worker_id: str,
        agent_types: Sequence[str],
        limit: int,
        lease_ttl: float,
    ) -> list[Claim]:
        """The claim's statements (see ``claim``), inside the caller's transaction."""
        sql = self.sql
        sent = time.monotonic()  # the lease runs from after this
        now = None if sql.pg else clock()  # PostgreSQL reads its own clock for leases
        t = sql.time(now)
        claimed: list[Claim] = []
        if not agent_types or limit <= 0:
            return claimed
        wanted = limit * 4  # more than needed: some may belong to agents already at their cap
        at = () if sql.pg else (t,)
        due = sql.time(self.clock())  # deadlines of waits are the app's time

        def runnable(types: Sequence[str]) -> tuple[Any, ...]:
            return (*types, wanted, *types, due, wanted, *types, *at, wanted)

        # Capped types (agent_types): how many more runs of each may be claimed now.
        room: dict[str, int] = {}
        locked: set[str] | None = None
        types = agent_types
        if sql.pg:
            cur.execute(sql.lock_agents(len(agent_types)), (*agent_types, *runnable(agent_types)))
            rows = cur.fetchall()
            if not rows:
                return claimed
            locked = {row[0] for row in rows}
            types = sorted({row[1] for row in rows})  # only the locked agents' runs are taken
            capped = sorted({row[1] for row in rows if row[2]})
            if capped:  # claims of a capped type take turns: agents, then types, then runs
                cur.execute(sql.lock_types(len(capped)), capped)
                room = self._type_room(cur, capped, t)
        else:  # the claim holds the database's write lock: the counts are exact
            room = self._type_room(cur, agent_types, t)
        if room:  # a type whose caps are spent takes no place among the candidates
            types = [name for name in types if room.get(name, 1) > 0]
            if not types:
                return claimed
        cur.execute(sql.candidates(len(types)), (*runnable(types), *at))
        candidates = sorted(
            (c for c in cur.fetchall() if locked is None or c[1] in locked),
            key=lambda c: (-c[5], c[6]),
        )[:wanted]
        if not candidates:
            return claimed
        busy = {c[1]: c[8] for c in candidates}
        lease = None if now is None else sql.time(now + dt.timedelta(seconds=lease_ttl))
        for run_id, agent_id, max_concurrent, status, fence, _, _, type_, _ in candidates:
            if len(claimed) >= limit or busy.get(agent_id, 0) >= max_concurrent:
                continue
            if room.get(type_, 1) <= 0:
                continue
            recovered = status == RunStatus.RUNNING.value
            event = EventType.RUN_RECOVERED if recovered else EventType.RUN_CLAIMED
            if sql.pg:
                cur.execute(sql.claim, (worker_id, lease_ttl, run_id, fence, event, worker_id))
                row = cur.fetchone()
                if row is None:
                    continue
            else:
                cur.execute(sql.claim, (worker_id, lease, t, t, t, run_id, fence))
                updated = cur.fetchone()
                if updated is None:
                    continue
                if status != RunStatus.PENDING.value or updated[3] > 1:
                    # It may have waited (a run's first claim never has): withdraw its waits.
                    cur.execute(sql.delete_waits, (run_id,))
                cur.execute(sql.claimed_agent, (agent_id,))
                row = (*updated[:-1], *cur.fetchone())
                data = json_text({"worker": worker_id, "fence": row[0]})
                cur.execute(sql.insert_event, (run_id, agent_id, event, data, t))
            busy[agent_id] = busy.get(agent_id, 0) + 1
            if type_ in room:
                room[type_] -= 1
            ref = RunRef(run_id, worker_id, row[0])
            claimed.append(self._load(cur, ref, recovered, row[1:], sent))
        return claimed

    def _type_room(self, cur: Any, types: Sequence[str], now: Any) -> dict[str, int]:
        """How many more runs of each capped type among ``types`` may be claimed now: the
        fewer of its concurrency cap less its running runs and its rate cap less its claims
        in the window. Uncapped types are left out."""
        cur.execute(self.sql.type_usage(len(types)), (*(() if self.sql.pg else (now, now)), *types))
        room = {}
        for name, concurrency, running, rate, _, claims in cur.fetchall():
            left = [cap - used for cap, used in ((concurrency, running), (rate, claims)) if cap]
            room[name] = min(left)
        return room

    def _load(
        self, cur: Any, ref: RunRef, recovered: bool, run: Sequence[Any], sent: float
    ) -> Claim:
        """What replay needs: the claimed run and its agent (``run``, as the claim returned
        them), its journal and the states it refers to. ``sent``: when the claim was sent."""
        sql = self.sql
        (
            agent_id,
            task,
            attempts,
            parent,
            start_version,
            forked_at_step,
            stalls,
            message_seq,
            limits,
            agent_type,
            config,
            agent_state,
            agent_version,
        ) = run
        journal: dict[int, JournalEntry] = {}
        # A run's first claim finds an empty journal, unless it is a fork (given its
        # original's steps when it was submitted): most claims skip this query.
        if attempts > 1 or forked_at_step is not None:
            cur.execute(sql.load_journal, (ref.run_id,))
            journal = {
                seq: JournalEntry(
                    seq=seq,
                    name=name,
                    kind=kind,
                    status=StepStatus(status),
                    output=self._json(output),
                    error=self._json(error),
                    attempts=tries,
                    state_version=version,
                    stored=True,
                    tool=tool,
                    cost=cost,
                    tokens=tokens,
                )
                for (
                    seq, name, kind, status, output, error, tries, version, tool, cost, tokens
                ) in cur.fetchall()
            }  # fmt: skip
        limits = self._json(limits) or {}
        holders = [ref.run_id, *limits.get("holders", ())]
        # Only a run that ran before (or spends against its ancestors') has a ledger to read.
        found = (
            ledger.load(cur, self.lg, ref.run_id, holders, lock=False)
            if attempts > 1 or len(holders) > 1
            else []
        )
        agent_state = self._json(agent_state)
        docs = {agent_version: agent_state}  # the agent's current state is its newest version
        wanted = sorted(
            ({start_version} | {e.state_version for e in journal.values() if e.state_version})
            - {agent_version}
        )
        if wanted:
            cur.execute(sql.load_states(len(wanted)), (agent_id, *wanted))
            docs.update((version, self._json(state)) for version, state in cur.fetchall())
        return Claim(
            ref=ref,
            agent_id=agent_id,
            agent_type=agent_type,
            config=self._json(config),
            input=self._json(task),
            attempts=attempts,
            recovered=recovered,
            parent_run_id=parent,
            start_state=docs.get(start_version, {}),
            start_version=start_version,
            journal=journal,
            state_docs=docs,
            agent_state=agent_state,
            agent_version=agent_version,
            forked_at_step=forked_at_step,
            stalls=stalls,
            message_seq=message_seq,
            lease_from=sent,
            limits=limits,
            ledger=found,
        )


class _TransactionTime:
    """The time of a batch's transaction, read when first needed: on PostgreSQL a query, which
    a claim or a one-statement write (reading ``now()`` themselves) never sends."""

    def __init__(self, cur: Any, pg: bool) -> None:
        self._cur = cur
        self._pg = pg
        self._value: dt.datetime | None = None

    def __call__(self) -> dt.datetime:
        if self._value is None:
            if self._pg:
                self._cur.execute("SELECT now()")
                self._value = self._cur.fetchone()[0].astimezone(dt.UTC)
            else:
                self._value = dt.datetime.now(dt.UTC)
        return self._value


def _written(entries: list[JournalEntry], version: int | None, checkpoint_id: str | None) -> None:
    """Once a write committed: its entries are stored, the last one with the state version it
    wrote, and a checkpoint entry with its checkpoint's id."""
    for entry in entries:
        entry.stored = True
    if entries and version is not None:
        entries[-1].state_version = version
    if entries and checkpoint_id is not None:
        entries[-1].output = checkpoint_id


_FINAL_VALUES = frozenset(s.value for s in FINAL_RUN_STATUSES)


def _ledger_rows(ref: RunRef, change: Commit) -> tuple[str, ...]:
    """The runs whose ledger rows a write takes (its own with the budgets it charges)."""
    found: tuple[str, ...] = ()
    if change.reserve is not None:
        found = (ref.run_id, *change.reserve.holders)
    if change.ledger is not None:
        found += (ref.run_id, *change.ledger.holders)
    return found


def _outcome(run: dict[str, Any]) -> dict[str, Any]:
    """How a child run ended, as journaled in its parent."""
    return {k: run[k] for k in ("run_id", "agent_id", "status", "result", "error")}


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _lease_lost(ref: RunRef) -> LeaseLost:
    return LeaseLost(
        f"run {ref.run_id}: this worker ({ref.owner}, epoch {ref.fence}) no longer owns it; "
        "another worker took it over"
    )


def _dbapi_error(exc: BaseException) -> Any:
    """Wrap a raw driver error the way SQLAlchemy would, so shared helpers can classify it."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        return exc
    module = type(exc).__module__
    if module.startswith(("sqlite3", "psycopg")):
        return DBAPIError.instance(None, None, exc, Exception)  # type: ignore[arg-type]
    return None
