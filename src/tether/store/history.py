"""Queries for going back in time: checkpoints, restore, fork, and bounded retention."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, delete, func, insert, not_, or_, select, update
from sqlalchemy.engine import Connection

from tether.errors import NotFound, Refused
from tether.store.common import append_event, new_id, utcnow
from tether.store.database import Database
from tether.store.schema import (
    agent_history,
    agents,
    checkpoints,
    events,
    incidents,
    runs,
    state_versions,
    steps,
)
from tether.types import FINAL_RUN_STATUSES, AgentInfo, Checkpoint, RunStatus, StepStatus
from tether.vocabulary import EventType

_CHECKPOINT_HINT = "list them with: tether checkpoints list"
_FINAL = [s.value for s in FINAL_RUN_STATUSES]
_BUSY = [RunStatus.PENDING.value, RunStatus.RUNNING.value, RunStatus.WAITING.value]


@dataclass(frozen=True)
class GcReport:
    """What a retention pass removed (or would remove, on a dry run)."""

    runs: int
    steps: int
    events: int
    state_versions: int
    incidents: int
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "runs": self.runs,
            "steps": self.steps,
            "events": self.events,
            "state_versions": self.state_versions,
            "incidents": self.incidents,
            "dry_run": self.dry_run,
        }


def checkpoint_from_row(row: Row[Any]) -> Checkpoint:
    """Build the public record from a ``checkpoints`` row."""
    m = row._mapping
    return Checkpoint(
        checkpoint_id=m["checkpoint_id"],
        agent_id=m["agent_id"],
        name=m["name"],
        state=m["state"],
        version=m["version"],
        run_id=m["run_id"],
        seq=m["seq"],
        created_at=m["created_at"],
    )


class HistoryQueries:
    """Checkpoints, restore, fork support and garbage collection."""

    db: Database

    # -- checkpoints ----------------------------------------------------------------------

    def create_checkpoint(self, agent_id: str, name: str, actor: str) -> Checkpoint:
        """Snapshot the agent's current state under ``name``."""

        def work(conn: Connection) -> Checkpoint:
            row = conn.execute(
                select(agents.c.state, agents.c.version).where(agents.c.agent_id == agent_id)
            ).first()
            if row is None:
                raise NotFound("agent", agent_id, "list agents with: tether agents list")
            return self.insert_checkpoint(
                conn, agent_id, name, row.state, row.version, None, None, actor
            )

        return self.db.transact(work)

    @staticmethod
    def insert_checkpoint(
        conn: Connection,
        agent_id: str,
        name: str,
        state: dict[str, Any],
        version: int,
        run_id: str | None,
        seq: int | None,
        actor: str,
    ) -> Checkpoint:
        """Insert a checkpoint row and its event in the caller's transaction."""
        now = utcnow()
        values = {
            "checkpoint_id": new_id("ckpt"),
            "agent_id": agent_id,
            "name": name,
            "state": state,
            "version": version,
            "run_id": run_id,
            "seq": seq,
            "created_at": now,
        }
        conn.execute(insert(checkpoints), values)
        append_event(
            conn,
            EventType.CHECKPOINT_CREATED,
            agent_id=agent_id,
            run_id=run_id,
            data={
                "checkpoint_id": values["checkpoint_id"],
                "name": name,
                "version": version,
                "seq": seq,
                "actor": actor,
            },
            at=now,
        )
        return Checkpoint(**values)  # type: ignore[arg-type]

    def list_checkpoints(
        self, agent_id: str | None = None, limit: int | None = None
    ) -> list[Checkpoint]:
        """Checkpoints, newest first."""
        query = select(checkpoints).order_by(
            checkpoints.c.created_at.desc(), checkpoints.c.checkpoint_id.desc()
        )
        if agent_id is not None:
            query = query.where(checkpoints.c.agent_id == agent_id)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [checkpoint_from_row(r) for r in conn.execute(query)]

    def get_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """One checkpoint, or ``NotFound``."""
        with self.db.read() as conn:
            row = conn.execute(
                select(checkpoints).where(checkpoints.c.checkpoint_id == checkpoint_id)
            ).first()
        if row is None:
            raise NotFound("checkpoint", checkpoint_id, _CHECKPOINT_HINT)
        return checkpoint_from_row(row)

    def restore_checkpoint(self, checkpoint_id: str, actor: str) -> AgentInfo:
        """Make a checkpoint's state the agent's current state, as a new version.

        Refused while a run of the agent is in progress (pending, running or waiting, or
        paused but still held by a worker): it would write over the restored state.
        """
        from tether.store.agents import agent_from_row

        def work(conn: Connection) -> AgentInfo:
            ckpt = conn.execute(
                select(checkpoints).where(checkpoints.c.checkpoint_id == checkpoint_id)
            ).first()
            if ckpt is None:
                raise NotFound("checkpoint", checkpoint_id, _CHECKPOINT_HINT)
            busy = conn.execute(
                select(runs.c.run_id, runs.c.status)
                .where(
                    runs.c.agent_id == ckpt.agent_id,
                    or_(
                        runs.c.status.in_(_BUSY),
                        and_(runs.c.status == RunStatus.PAUSED.value, runs.c.owner.is_not(None)),
                    ),
                )
                .limit(3)
            ).all()
            if busy:
                listed = ", ".join(f"{r.run_id} ({r.status})" for r in busy)
                raise Refused(
                    f"agent {ckpt.agent_id} has runs in progress ({listed}); restoring now would "
                    "be overwritten by them. Pause the agent first (tether checkpoints restore "
                    f"{checkpoint_id} --pause), or wait for the runs to finish"
                )
            now = utcnow()
            row = conn.execute(
                update(agents)
                .where(agents.c.agent_id == ckpt.agent_id)
                .values(state=ckpt.state, version=agents.c.version + 1, updated_at=now)
                .returning(*agents.c)
            ).one()
            info = agent_from_row(row)
            conn.execute(
                insert(state_versions),
                {
                    "agent_id": ckpt.agent_id,
                    "version": info.version,
                    "state": ckpt.state,
                    "reason": f"restore {checkpoint_id} ({ckpt.name}, version {ckpt.version})",
                    "run_id": None,
                    "at": now,
                },
            )
            append_event(
                conn,
                EventType.CHECKPOINT_RESTORED,
                agent_id=ckpt.agent_id,
                data={
                    "checkpoint_id": checkpoint_id,
                    "name": ckpt.name,
                    "from_version": ckpt.version,
                    "new_version": info.version,
                    "actor": actor,
                },
                at=now,
            )
            return info

        return self.db.transact(work)

    def runs_held(self, agent_id: str) -> list[str]:
        """Runs of the agent that a worker still holds (it has not reached a step boundary)."""
        with self.db.read() as conn:
            return list(
                conn.execute(
                    select(runs.c.run_id).where(
                        runs.c.agent_id == agent_id, runs.c.owner.is_not(None)
                    )
                ).scalars()
            )

    # -- fork -----------------------------------------------------------------------------

    def fork_point(self, run_id: str, from_step: int) -> tuple[str, Any, int | None]:
        """Check that ``run_id`` can be forked after ``from_step``; returns its agent, input
        and starting state version."""
        with self.db.read() as conn:
            run = conn.execute(
                select(runs.c.agent_id, runs.c.input, runs.c.state_version, runs.c.status).where(
                    runs.c.run_id == run_id
                )
            ).first()
            if run is None:
                raise NotFound("run", run_id, "list runs with: tether runs list")
            journal = conn.execute(
                select(steps.c.seq, steps.c.status, steps.c.name)
                .where(steps.c.run_id == run_id)
                .order_by(steps.c.seq)
            ).all()
        finished = 0
        for row in journal:
            if row.seq != finished + 1 or row.status != StepStatus.COMPLETED.value:
                break
            finished = row.seq
        if not journal or run.state_version is None:
            raise Refused(
                f"run {run_id} never started (it is {run.status} with no finished step); "
                "there is nothing to fork from"
            )
        if from_step < 0 or from_step > finished:
            raise Refused(
                f"cannot fork run {run_id} from step {from_step}: its finished steps are 1.."
                f"{finished}; choose --from-step between 0 and {finished}"
            )
        return run.agent_id, run.input, run.state_version

    # -- retention ------------------------------------------------------------------------

    def collect_garbage(
        self,
        *,
        runs_before: dt.datetime | None,
        events_before: dt.datetime | None,
        keep_state_versions: int | None,
        dry_run: bool,
    ) -> GcReport:
        """Remove finished runs and events older than the cut-offs and old state versions.

        Never touches anything of an unfinished run, a named checkpoint, an agent's current
        state version, or a state version a kept run's journal refers to.
        """

        def work(conn: Connection) -> GcReport:
            counts = dict.fromkeys(("runs", "steps", "events", "state_versions", "incidents"), 0)
            doomed_ids: list[str] = []
            if runs_before is not None:
                child = runs.alias("child")
                doomed_ids = list(
                    conn.execute(
                        select(runs.c.run_id).where(
                            runs.c.status.in_(_FINAL),
                            runs.c.finished_at < runs_before,
                            not_(
                                select(child.c.run_id)
                                .where(child.c.parent_run_id == runs.c.run_id)
                                .exists()
                            ),
                        )
                    ).scalars()
                )
                for start in range(0, len(doomed_ids), 500):
                    batch = doomed_ids[start : start + 500]
                    counts["steps"] += _count(conn, steps, steps.c.run_id.in_(batch))
                    counts["incidents"] += _count(conn, incidents, incidents.c.run_id.in_(batch))
                    counts["events"] += _count(conn, events, events.c.run_id.in_(batch))
                    counts["runs"] += len(batch)
                    if not dry_run:
                        conn.execute(delete(events).where(events.c.run_id.in_(batch)))
                        conn.execute(delete(steps).where(steps.c.run_id.in_(batch)))
                        conn.execute(delete(incidents).where(incidents.c.run_id.in_(batch)))
                        conn.execute(delete(runs).where(runs.c.run_id.in_(batch)))
            # On a dry run the doomed runs are still there: leave them out of what follows, so
            # the report says what a real pass would remove.
            kept_runs = runs.c.run_id.not_in(doomed_ids) if dry_run and doomed_ids else None
            if events_before is not None:
                live = select(runs.c.run_id).where(runs.c.status.not_in(_FINAL))
                old = and_(
                    events.c.at < events_before,
                    or_(events.c.run_id.is_(None), events.c.run_id.not_in(live)),
                )
                if dry_run and doomed_ids:
                    old = and_(
                        old, or_(events.c.run_id.is_(None), events.c.run_id.not_in(doomed_ids))
                    )
                counts["events"] += _count(conn, events, old)
                if not dry_run:
                    conn.execute(delete(events).where(old))
            if keep_state_versions is not None:
                latest = (
                    select(func.max(agents.c.version))
                    .where(agents.c.agent_id == state_versions.c.agent_id)
                    .scalar_subquery()
                )
                agent_runs = [runs.c.agent_id == state_versions.c.agent_id]
                if kept_runs is not None:
                    agent_runs.append(kept_runs)
                # A join, not a nested IN: a subquery two levels down would not be correlated
                # with state_versions, and would protect any agent's version numbers.
                referenced = (
                    select(steps.c.state_version)
                    .join(runs, runs.c.run_id == steps.c.run_id)
                    .where(steps.c.state_version.is_not(None), *agent_runs)
                )
                started_from = select(runs.c.state_version).where(
                    *agent_runs, runs.c.state_version.is_not(None)
                )
                old_versions = and_(
                    state_versions.c.version <= latest - keep_state_versions,
                    state_versions.c.version.not_in(referenced),
                    state_versions.c.version.not_in(started_from),
                )
                counts["state_versions"] = _count(conn, state_versions, old_versions)
                if not dry_run:
                    conn.execute(delete(state_versions).where(old_versions))
            if not dry_run and any(counts.values()):
                append_event(conn, EventType.GC_COLLECTED, data=counts)
            return GcReport(dry_run=dry_run, **counts)

        return self.db.transact(work)

    def count_rows(self, tables: Sequence[str] = ()) -> dict[str, int]:
        """Row counts per table (for reports and tests)."""
        known = {
            t.name: t
            for t in (
                agents,
                agent_history,
                state_versions,
                runs,
                steps,
                events,
                checkpoints,
                incidents,
            )
        }
        names = list(tables) or list(known)
        with self.db.read() as conn:
            return {
                name: int(conn.execute(select(func.count()).select_from(known[name])).scalar_one())
                for name in names
            }


def _count(conn: Connection, table: Any, condition: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(condition)).scalar_one())
