"""Queries for runs: submit, claim under a lease, the fenced journal commit, reads.

Every write a worker makes for a run goes through ``commit``, and ``commit`` first updates the
run row *conditional on the worker's owner id and fencing epoch*; if that matches no row the
worker lost its lease and ``LeaseLost`` is raised before anything else is written. A claim
increments the epoch, so a paused or partitioned "zombie" worker can never commit again.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Row, and_, case, delete, func, insert, or_, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from tether import run_status
from tether.errors import NotFound, Refused
from tether.journal import Claim, Commit, Committed, RunRef
from tether.lifecycle import LifecycleState
from tether.store.committer import Committer
from tether.store.common import append_event, utcnow
from tether.store.database import Database
from tether.store.schema import (
    agents,
    events,
    incidents,
    runs,
    steps,
    waits,
    workers,
)
from tether.store.wakeups import CHANNEL, notify
from tether.types import (
    Event,
    Incident,
    IncidentStatus,
    RunInfo,
    RunStatus,
    StepInfo,
    StepStatus,
)
from tether.vocabulary import EventType, IncidentAction, IncidentKind, WaitKind

_RUN_HINT = "list runs with: tether runs list"


STEP_COUNT = (
    select(func.coalesce(func.max(steps.c.seq), 0))
    .where(steps.c.run_id == runs.c.run_id)
    .scalar_subquery()
    .label("steps")
)
WAKE_AT = (
    select(func.min(waits.c.deadline))
    .where(waits.c.run_id == runs.c.run_id)
    .scalar_subquery()
    .label("wake_at")
)
RUN_COLUMNS = (*runs.c, STEP_COUNT, WAKE_AT)
"""A run row plus its progress (the last journal position, read from the journal's key) and
the earliest deadline it waits for."""


def run_from_row(row: Row[Any]) -> RunInfo:
    """Build the public record from a ``runs`` row."""
    m = row._mapping
    return RunInfo(
        run_id=m["run_id"],
        agent_id=m["agent_id"],
        task_id=m["task_id"],
        input=m["input"],
        status=RunStatus(m["status"]),
        result=m["result"],
        error=m["error"],
        attempts=m["attempts"],
        priority=m["priority"],
        parent_run_id=m["parent_run_id"],
        forked_from=m["forked_from"],
        forked_at_step=m["forked_at_step"],
        steps=m["steps"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        wake_at=_utc(m["wake_at"]),
        owner=m["owner"],
    )


def _utc(value: Any) -> dt.datetime | None:
    """A time from an aggregate (which bypasses the column type): epoch seconds on SQLite."""
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromtimestamp(float(value), dt.UTC)


def incident_from_row(row: Row[Any]) -> Incident:
    """Build the public record from an ``incidents`` row."""
    m = row._mapping
    return Incident(
        incident_id=m["incident_id"],
        run_id=m["run_id"],
        agent_id=m["agent_id"],
        seq=m["seq"],
        kind=m["kind"],
        error=m["error"],
        status=IncidentStatus(m["status"]),
        resolution=m["resolution"],
        resolved_by=m["resolved_by"],
        created_at=m["created_at"],
        resolved_at=m["resolved_at"],
    )


class RunQueries:
    """Every SQL statement about runs, their journal, events and incidents."""

    db: Database
    committer: Committer

    # -- time -----------------------------------------------------------------------------

    def db_now(self, conn: Connection) -> dt.datetime:
        """The database's clock: PostgreSQL's ``now()``; on SQLite the (same-host) OS clock."""
        if self.db.dialect == "postgresql":
            value = conn.execute(text("SELECT now()")).scalar_one()
            return value.astimezone(dt.UTC)  # type: ignore[no-any-return]
        return utcnow()

    # -- submit ---------------------------------------------------------------------------

    def submit_run(
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
    ) -> tuple[RunInfo, bool]:
        """Insert a pending run for an active agent; an existing ``task_id`` returns that run.

        Returns the run and whether it was created now (see ``Committer.submit``).
        """
        run_id, created = self.committer.submit(
            agent_id,
            task,
            task_id=task_id,
            priority=priority,
            max_concurrent=max_concurrent,
            parent_run_id=parent_run_id,
            forked_from=forked_from,
            forked_at_step=forked_at_step,
            copy_journal_to=copy_journal_to,
            state_version=state_version,
            limits=limits,
        )
        return self.get_run(run_id), created

    def _notify(self, conn: Connection) -> None:
        """``conn``'s transaction makes a run runnable: wake workers once it commits."""
        notify(conn)

    # -- claim ----------------------------------------------------------------------------

    def claim_runs(
        self, worker_id: str, agent_types: Iterable[str], limit: int, lease_ttl: float
    ) -> list[Claim]:
        """Claim up to ``limit`` runnable runs for ``worker_id`` (see ``Committer.claim``)."""
        return self.committer.claim(worker_id, list(agent_types), limit, lease_ttl)

    # -- the fenced write -----------------------------------------------------------------

    def commit(self, ref: RunRef, change: Commit, agent_id: str, lease_ttl: float) -> Committed:
        """Write a run's progress in one transaction, only if ``ref`` still owns the run.

        Returns the run's status after the write, so the caller sees a pause or cancel that
        a person requested (it then stops at this step boundary), and the runs claimed for
        ``change.then_claim``. See ``committer``.
        """
        return self.committer.commit(ref, change, agent_id, lease_ttl)

    def heartbeat(self, worker_id: str, run_ids: Sequence[str], lease_ttl: float) -> set[str]:
        """Extend the leases of these runs (executing in ``worker_id``) and the worker's own
        heartbeat; returns the ids it still owns.

        Runs the worker holds but no longer executes (an execution that stopped when its
        write did not complete) are handed back once half their lease has run out, rather
        than when all of it has: a run claimed a moment ago keeps more than half of its lease.
        """

        def work(conn: Connection) -> set[str]:
            now = self.db_now(conn)
            held = list(run_ids)
            owned = conn.execute(
                update(runs)
                .where(runs.c.owner == worker_id, runs.c.run_id.in_(held))
                .values(lease_until=now + dt.timedelta(seconds=lease_ttl))
                .returning(runs.c.run_id)
            ).scalars()
            result = set(owned)
            self._hand_back(
                conn,
                now,
                and_(
                    runs.c.owner == worker_id,
                    runs.c.run_id.not_in(held),
                    runs.c.lease_until < now + dt.timedelta(seconds=lease_ttl / 2),
                ),
                EventType.RUN_RELEASED,
                {"reason": "its worker no longer executes it (a write that did not complete)"},
            )
            conn.execute(
                update(workers).where(workers.c.worker_id == worker_id).values(heartbeat_at=now)
            )
            return result

        return self.db.transact(work)

    def renew_lease(self, ref: RunRef, lease_ttl: float) -> bool:
        """Extend one run's lease if ``ref`` still owns it (same owner, same epoch)."""

        def work(conn: Connection) -> bool:
            now = self.db_now(conn)
            row = conn.execute(
                update(runs)
                .where(
                    runs.c.run_id == ref.run_id,
                    runs.c.owner == ref.owner,
                    runs.c.fence == ref.fence,
                )
                .values(lease_until=now + dt.timedelta(seconds=lease_ttl))
                .returning(runs.c.run_id)
            ).first()
            return row is not None

        return self.db.transact(work)

    def deliver(
        self, conn: Connection, kind: WaitKind, key: str, outcome: Any, at: dt.datetime
    ) -> list[str]:
        """Satisfy every wait of ``kind`` for ``key``, in the caller's transaction: journal
        ``outcome`` at each waiting run's wait position, withdraw the run's other waits, and
        make it runnable (a paused run stays paused). Returns the runs woken.

        Lock order: each run's row before its waits, as claims take them.
        """
        candidates = conn.execute(
            select(waits.c.run_id, waits.c.seq).where(waits.c.kind == kind, waits.c.key == key)
        ).all()
        waiting = run_status.sources("wake")
        woken = []
        for run_id, seq in candidates:
            row = conn.execute(
                select(runs.c.status, runs.c.agent_id)
                .where(runs.c.run_id == run_id)
                .with_for_update()
            ).first()
            if row is None or row.status not in (*waiting, RunStatus.PAUSED.value):
                continue
            still = conn.execute(
                select(waits.c.seq).where(
                    waits.c.run_id == run_id,
                    waits.c.seq == seq,
                    waits.c.kind == kind,
                    waits.c.key == key,
                )
            ).first()
            if still is None:  # withdrawn meanwhile (claimed at its deadline)
                continue
            conn.execute(delete(waits).where(waits.c.run_id == run_id))
            conn.execute(
                update(steps)
                .where(
                    steps.c.run_id == run_id,
                    steps.c.seq == seq,
                    steps.c.status == StepStatus.WAITING.value,
                )
                .values(
                    status=StepStatus.COMPLETED.value,
                    output={"kind": kind.value, "key": key, "value": outcome},
                    finished_at=at,
                )
            )
            conn.execute(
                update(runs)
                .where(runs.c.run_id == run_id, runs.c.status.in_(waiting))
                .values(status=run_status.target("wake"), updated_at=at)
            )
            append_event(
                conn,
                EventType.RUN_WOKEN,
                run_id=run_id,
                agent_id=row.agent_id,
                data={"kind": kind.value, "key": key, "seq": seq},
                at=at,
            )
            woken.append(run_id)
        if woken:
            self._notify(conn)
        return woken

    def register_worker(self, worker_id: str, hostname: str, pid: int) -> None:
        """Record a worker process (its id is unique per process start)."""

        def work(conn: Connection) -> None:
            now = utcnow()
            conn.execute(
                insert(workers),
                {
                    "worker_id": worker_id,
                    "hostname": hostname,
                    "pid": pid,
                    "started_at": now,
                    "heartbeat_at": now,
                },
            )

        self.db.transact(work)

    def stop_worker(self, worker_id: str) -> int:
        """Mark a worker stopped and hand its unfinished runs back; returns how many."""

        def work(conn: Connection) -> int:
            now = utcnow()
            released = self._hand_back(conn, now, runs.c.owner == worker_id)
            conn.execute(
                update(workers).where(workers.c.worker_id == worker_id).values(stopped_at=now)
            )
            return len(released)

        return self.db.transact(work)

    def _hand_back(
        self,
        conn: Connection,
        now: dt.datetime,
        which: ColumnElement[bool],
        event: EventType | None = None,
        data: dict[str, Any] | None = None,
    ) -> list[str]:
        """Release the held runs matching ``which``: no owner, no lease, and a running one
        pending again (``release``), so any worker may claim it; ``event`` for each, and a
        wake-up for workers. Returns their ids."""
        release = run_status.transition("release")
        running = [s.value for s in release.sources]
        handed_back = list(
            conn.execute(
                update(runs)
                .where(runs.c.owner.is_not(None), which)
                .values(
                    owner=None,
                    lease_until=None,
                    status=case(
                        (runs.c.status.in_(running), release.target.value), else_=runs.c.status
                    ),
                    updated_at=now,
                )
                .returning(runs.c.run_id)
            ).scalars()
        )
        if event is not None:
            for run_id in handed_back:
                append_event(conn, event, run_id=run_id, data=data, at=now)
        if handed_back:
            self._notify(conn)
        return handed_back

    def run_owners(self) -> list[str]:
        """The distinct workers that hold a lease on some run now."""
        with self.db.read() as conn:
            return list(
                conn.execute(
                    select(runs.c.owner).where(runs.c.owner.is_not(None)).distinct()
                ).scalars()
            )

    def expire_leases(self, owners: Sequence[str] = ()) -> list[str]:
        """Hand back runs whose lease expired, and every run held by ``owners`` (workers known
        to be dead), so they are claimable now. Returns the run ids."""

        def work(conn: Connection) -> list[str]:
            now = self.db_now(conn)
            held = runs.c.lease_until < now
            if owners:
                held = or_(held, runs.c.owner.in_(list(owners)))
            return self._hand_back(conn, now, held, EventType.RUN_LEASE_EXPIRED)

        return self.db.transact(work)

    # -- changes from outside a run -------------------------------------------------------

    def cancel_run(self, run_id: str, reason: str, actor: str) -> RunInfo:
        """Cancel a run that has not finished (and its children); a worker stops at a boundary.

        The cancelled runs' waits are withdrawn: nothing can wake a cancelled run."""
        cancellable = run_status.sources("cancel")

        def work(conn: Connection) -> RunInfo:
            now = utcnow()
            row = conn.execute(
                update(runs)
                .where(runs.c.run_id == run_id, runs.c.status.in_(cancellable))
                .values(
                    status=RunStatus.CANCELLED.value,
                    finished_at=now,
                    updated_at=now,
                    error={"type": "Cancelled", "message": reason, "actor": actor},
                )
                .returning(runs.c.agent_id)
            ).first()
            if row is None:
                existing = self._run_status(conn, run_id)
                raise Refused(
                    f"run {run_id} is already {existing}; only an unfinished run can be cancelled"
                )
            append_event(
                conn,
                EventType.RUN_CANCELLED,
                run_id=run_id,
                agent_id=row.agent_id,
                data={"reason": reason, "actor": actor},
                at=now,
            )
            parents, cancelled = [run_id], [run_id]
            while parents:  # the whole delegation tree, level by level
                children = conn.execute(
                    select(runs.c.run_id, runs.c.agent_id, runs.c.parent_run_id).where(
                        runs.c.parent_run_id.in_(parents), runs.c.status.in_(cancellable)
                    )
                ).all()
                for child in children:
                    cause = f"parent {child.parent_run_id} cancelled"
                    conn.execute(
                        update(runs)
                        .where(runs.c.run_id == child.run_id)
                        .values(
                            status=RunStatus.CANCELLED.value,
                            finished_at=now,
                            updated_at=now,
                            error={"type": "Cancelled", "message": cause},
                        )
                    )
                    append_event(
                        conn,
                        EventType.RUN_CANCELLED,
                        run_id=child.run_id,
                        agent_id=child.agent_id,
                        data={"reason": cause, "actor": actor},
                        at=now,
                    )
                parents = [child.run_id for child in children]
                cancelled.extend(child.run_id for child in children)
            conn.execute(delete(waits).where(waits.c.run_id.in_(cancelled)))
            self.runs_ended(conn, cancelled, reason)  # type: ignore[attr-defined]
            row = conn.execute(select(*RUN_COLUMNS).where(runs.c.run_id == run_id)).one()
            return run_from_row(row)

        return self.db.transact(work)

    def _run_status(self, conn: Connection, run_id: str) -> str:
        status = conn.execute(select(runs.c.status).where(runs.c.run_id == run_id)).scalar()
        if status is None:
            raise NotFound("run", run_id, _RUN_HINT)
        return str(status)

    # -- incidents ------------------------------------------------------------------------

    def resolve_incident(
        self, incident_id: str, action: str, *, output: Any, actor: str, comment: str
    ) -> Incident:
        """Resolve an open incident: ``retry`` the step, ``skip`` it with an output, ``abort``."""

        def work(conn: Connection) -> Incident:
            now = utcnow()
            row = conn.execute(
                select(incidents).where(incidents.c.incident_id == incident_id)
            ).first()
            if row is None:
                raise NotFound("incident", incident_id, "list them with: tether incidents list")
            incident = incident_from_row(row)
            if incident.status != IncidentStatus.OPEN:
                raise Refused(
                    f"incident {incident_id} was already resolved ({incident.resolution} by "
                    f"{incident.resolved_by}); nothing to do"
                )
            current = self._run_status(conn, incident.run_id)
            if current not in run_status.sources(action):
                raise Refused(
                    f"run {incident.run_id} is {current}, not needs_attention; the incident "
                    "cannot be applied to it"
                )
            if action == IncidentAction.SKIP and incident.seq is None:
                raise Refused(
                    f"incident {incident_id} is not about a step ({incident.kind}); it can be "
                    "retried or aborted, not skipped"
                )
            if action == IncidentAction.SKIP and incident.kind == IncidentKind.NON_DETERMINISM:
                raise Refused(
                    f"incident {incident_id} is a non-determinism error; fix or restore the "
                    "handler and retry, or abort"
                )
            run_values: dict[str, Any] = {
                "updated_at": now,
                "owner": None,
                "lease_until": None,
                "status": run_status.target(action),
                # A person looked: the run gets its full count of claims again.
                "stalls": 0,
                "progress": None,
            }
            if action == IncidentAction.RETRY:
                if incident.seq is not None and incident.kind != IncidentKind.NON_DETERMINISM:
                    conn.execute(
                        delete(steps).where(
                            steps.c.run_id == incident.run_id,
                            steps.c.seq == incident.seq,
                            steps.c.status != StepStatus.COMPLETED.value,
                        )
                    )
                run_values.update(error=None)
            elif action == IncidentAction.SKIP:
                conn.execute(
                    update(steps)
                    .where(steps.c.run_id == incident.run_id, steps.c.seq == incident.seq)
                    .values(
                        status=StepStatus.COMPLETED.value,
                        output=output,
                        error=None,
                        finished_at=now,
                    )
                )
                run_values.update(error=None)
            elif action == IncidentAction.ABORT:
                run_values.update(
                    finished_at=now,
                    error={
                        "type": "Aborted",
                        "message": comment or "aborted by a person",
                        "incident": incident_id,
                        "cause": incident.error.get("message"),
                    },
                )
            else:
                raise ValueError(f"unknown incident action {action!r}; use retry, skip or abort")
            conn.execute(update(runs).where(runs.c.run_id == incident.run_id).values(run_values))
            if action == IncidentAction.ABORT:
                reason = f"run {incident.run_id} was aborted"
                self.runs_ended(conn, [incident.run_id], reason)  # type: ignore[attr-defined]
            resolved = conn.execute(
                update(incidents)
                .where(
                    incidents.c.incident_id == incident_id,
                    incidents.c.status == IncidentStatus.OPEN.value,
                )
                .values(
                    status=IncidentStatus.RESOLVED.value,
                    resolution=action,
                    resolution_data={"output": output, "comment": comment},
                    resolved_by=actor,
                    resolved_at=now,
                )
                .returning(*incidents.c)
            ).one()
            append_event(
                conn,
                EventType.INCIDENT_RESOLVED,
                run_id=incident.run_id,
                agent_id=incident.agent_id,
                data={
                    "incident_id": incident_id,
                    "action": action,
                    "actor": actor,
                    "comment": comment,
                },
                at=now,
            )
            if action != IncidentAction.ABORT:
                self._notify(conn)
            return incident_from_row(resolved)

        return self.db.transact(work)

    def list_incidents(
        self, status: str | None = None, run_id: str | None = None, limit: int | None = None
    ) -> list[Incident]:
        """Incidents, newest first."""
        query = select(incidents).order_by(incidents.c.created_at.desc())
        if status is not None:
            query = query.where(incidents.c.status == IncidentStatus(status).value)
        if run_id is not None:
            query = query.where(incidents.c.run_id == run_id)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [incident_from_row(r) for r in conn.execute(query)]

    def get_incident(self, incident_id: str) -> Incident:
        """One incident, or ``NotFound``."""
        with self.db.read() as conn:
            row = conn.execute(
                select(incidents).where(incidents.c.incident_id == incident_id)
            ).first()
        if row is None:
            raise NotFound("incident", incident_id, "list them with: tether incidents list")
        return incident_from_row(row)

    # -- reads ----------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunInfo:
        """One run, or ``NotFound``."""
        with self.db.read() as conn:
            row = conn.execute(select(*RUN_COLUMNS).where(runs.c.run_id == run_id)).first()
        if row is None:
            raise NotFound("run", run_id, _RUN_HINT)
        return run_from_row(row)

    def list_runs(
        self,
        *,
        agent_id: str | None = None,
        status: Sequence[str] = (),
        limit: int | None = 50,
        parent_run_id: str | None = None,
    ) -> list[RunInfo]:
        """Runs, newest first (keyset-friendly: ordered by the indexed creation time)."""
        query = select(*RUN_COLUMNS).order_by(runs.c.created_at.desc(), runs.c.run_id.desc())
        if agent_id is not None:
            query = query.where(runs.c.agent_id == agent_id)
        if status:
            query = query.where(runs.c.status.in_([RunStatus(s).value for s in status]))
        if parent_run_id is not None:
            query = query.where(runs.c.parent_run_id == parent_run_id)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [run_from_row(r) for r in conn.execute(query)]

    def run_steps(self, run_id: str) -> list[StepInfo]:
        """A run's journal, in order."""
        with self.db.read() as conn:
            self._run_status(conn, run_id)
            rows = conn.execute(
                select(steps).where(steps.c.run_id == run_id).order_by(steps.c.seq)
            ).all()
        return [
            StepInfo(
                run_id=r.run_id,
                seq=r.seq,
                name=r.name,
                kind=r.kind,
                status=StepStatus(r.status),
                output=r.output,
                error=r.error,
                attempts=r.attempts,
                started_at=r.started_at,
                finished_at=r.finished_at,
                tool=r.tool,
                cost=r.cost,
                tokens=r.tokens,
            )
            for r in rows
        ]

    def list_events(
        self,
        *,
        run_id: str | None = None,
        agent_id: str | None = None,
        types: Sequence[str] = (),
        after_seq: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events in append order, filtered by run, agent, type prefix and time."""
        query = select(events).order_by(events.c.seq)
        conditions: list[ColumnElement[bool]] = []
        if run_id is not None:
            conditions.append(events.c.run_id == run_id)
        if agent_id is not None:
            conditions.append(events.c.agent_id == agent_id)
        if types:
            conditions.append(
                or_(
                    *[
                        events.c.type == t if "." in t else events.c.type.like(f"{t}.%")
                        for t in types
                    ]
                )
            )
        if after_seq is not None:
            conditions.append(events.c.seq > after_seq)
        if since is not None:
            conditions.append(events.c.at >= since)
        if until is not None:
            conditions.append(events.c.at < until)
        if conditions:
            query = query.where(*conditions)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [
                Event(
                    seq=r.seq,
                    type=r.type,
                    run_id=r.run_id,
                    agent_id=r.agent_id,
                    data=r.data or {},
                    at=r.at,
                )
                for r in conn.execute(query)
            ]

    def count_unfinished(self, agent_types: Iterable[str]) -> tuple[int, dt.datetime | None]:
        """How many runs of these types could still progress without a person (runnable, or
        waiting with a deadline), and the earliest deadline among the waiting ones (``None``
        when none is set)."""
        of_types = and_(
            agents.c.type.in_(list(agent_types)),
            agents.c.lifecycle == LifecycleState.ACTIVE.value,
        )
        with self.db.read() as conn:
            runnable = conn.execute(
                select(func.count())
                .select_from(runs.join(agents, agents.c.agent_id == runs.c.agent_id))
                .where(
                    of_types,
                    runs.c.status.in_([RunStatus.PENDING.value, RunStatus.RUNNING.value]),
                )
            ).scalar_one()
            timed, first = conn.execute(
                select(func.count(func.distinct(waits.c.run_id)), func.min(waits.c.deadline))
                .select_from(
                    waits.join(runs, runs.c.run_id == waits.c.run_id).join(
                        agents, agents.c.agent_id == runs.c.agent_id
                    )
                )
                .where(
                    of_types,
                    runs.c.status == RunStatus.WAITING.value,
                    waits.c.deadline.is_not(None),
                )
            ).one()
            return int(runnable) + int(timed), _utc(first)


class Listener:
    """PostgreSQL ``LISTEN`` as a wake-up hint; polling stays the source of truth."""

    target: Any

    def listen(
        self,
        wake: Callable[[], None],
        stop: threading.Event,
        listening: Callable[[int], None] | None = None,
    ) -> None:
        """Call ``wake()`` on each notification until ``stop`` is set.

        ``listening(backend_pid)`` is called once ``LISTEN`` is in effect (notifications sent
        before then are not received). Raises when the connection fails or is lost.
        """
        import psycopg

        url = self.target.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=10,
            # A connection that died silently (a partitioned server) is noticed, not waited on.
            keepalives=1,
            keepalives_idle=30,
            application_name="tether-listen",
        ) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            if listening is not None:
                listening(conn.info.backend_pid)
            while not stop.is_set():
                for _ in conn.notifies(timeout=1.0):
                    wake()
