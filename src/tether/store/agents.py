"""Queries for agents: creation, lifecycle transitions (compare-and-set), state versions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, case, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from tether import lifecycle, run_status
from tether.errors import AlreadyExists, ConflictError, NotFound
from tether.lifecycle import LifecycleState
from tether.store.common import append_event, utcnow
from tether.store.database import Database
from tether.store.schema import agent_history, agents, runs, state_versions, waits
from tether.store.wakeups import notify
from tether.types import FINAL_RUN_STATUSES, AgentInfo, HistoryEntry, RunStatus, StateVersion
from tether.vocabulary import EventType

_AGENT_HINT = "list agents with: tether agents list"


def agent_from_row(row: Row[Any]) -> AgentInfo:
    """Build the public record from an ``agents`` row."""
    m = row._mapping
    return AgentInfo(
        agent_id=m["agent_id"],
        type=m["type"],
        config=m["config"],
        lifecycle=LifecycleState(m["lifecycle"]),
        state=m["state"],
        version=m["version"],
        error=m["error"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


class AgentQueries:
    """Every SQL statement about agents, their history and their state versions."""

    db: Database

    def create_agent(
        self,
        agent_id: str,
        type_: str,
        config: dict[str, Any],
        state: dict[str, Any],
        actor: str,
        reason: str = "created",
    ) -> AgentInfo:
        """Insert a new agent in ``created`` with state version 1, and its first history entry."""
        now = utcnow()

        def work(conn: Connection) -> AgentInfo:
            row = conn.execute(
                insert(agents).returning(*agents.c),
                {
                    "agent_id": agent_id,
                    "type": type_,
                    "config": config,
                    "lifecycle": lifecycle.INITIAL.value,
                    "state": state,
                    "version": 1,
                    "error": None,
                    "created_at": now,
                    "updated_at": now,
                },
            ).one()
            conn.execute(
                insert(agent_history),
                {
                    "agent_id": agent_id,
                    "from_state": None,
                    "to_state": lifecycle.INITIAL.value,
                    "action": "create",
                    "reason": reason,
                    "actor": actor,
                    "at": now,
                },
            )
            self._insert_state_version(conn, agent_id, 1, state, reason, None, now)
            append_event(
                conn,
                EventType.AGENT_CREATED,
                agent_id=agent_id,
                data={"type": type_, "actor": actor},
            )
            return agent_from_row(row)

        try:
            return self.db.transact(work)
        except IntegrityError:
            raise AlreadyExists("agent", agent_id) from None

    def transition_agent(
        self,
        agent_id: str,
        action: str,
        *,
        reason: str,
        actor: str,
        state: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        expected: LifecycleState | None = None,
        conn: Connection | None = None,
    ) -> AgentInfo:
        """Apply a lifecycle action as one compare-and-set, with history and event, atomically.

        ``state`` (optional) becomes the agent's new state version in the same transaction.
        ``expected`` narrows the allowed source to the state the caller saw (hooks ran on it).
        Raises ``InvalidTransition`` (nothing written) when the agent is not in a source state.
        """
        t = lifecycle.transition(action)
        subject = f"agent {agent_id}"

        def work(conn: Connection) -> AgentInfo:
            now = utcnow()
            current = self._lifecycle_of(conn, agent_id)
            if expected is not None and current != expected:
                raise ConflictError(
                    f"{subject} changed from {expected} to {current} while {action} was in "
                    "progress; try again"
                )
            lifecycle.check(subject, current, action)
            values: dict[str, Any] = {"lifecycle": t.target.value, "updated_at": now}
            values["error"] = error if t.target == LifecycleState.ERROR else None
            if state is not None:
                values["state"] = state
                values["version"] = agents.c.version + 1
            row = conn.execute(
                update(agents)
                .where(agents.c.agent_id == agent_id, agents.c.lifecycle == current.value)
                .values(values)
                .returning(*agents.c)
            ).first()
            if row is None:
                # Another transaction moved the agent between our read and our write.
                lifecycle.check(subject, self._lifecycle_of(conn, agent_id), action)
                raise ConflictError(f"{subject} changed while {action} was in progress; try again")
            info = agent_from_row(row)
            previous = current.value
            conn.execute(
                insert(agent_history),
                {
                    "agent_id": agent_id,
                    "from_state": previous,
                    "to_state": t.target.value,
                    "action": action,
                    "reason": reason,
                    "actor": actor,
                    "at": now,
                },
            )
            if state is not None:
                self._insert_state_version(conn, agent_id, info.version, state, action, None, now)
            if action in run_status.ON_AGENT:
                self.set_agent_runs(
                    conn, agent_id, run_status.ON_AGENT[action], f"agent {agent_id} {action}"
                )
            append_event(
                conn,
                EventType.AGENT_LIFECYCLE,
                agent_id=agent_id,
                data={"action": action, "from": previous, "to": t.target.value, "actor": actor},
                at=now,
            )
            return info

        if conn is not None:
            return work(conn)
        return self.db.transact(work)

    def _lifecycle_of(self, conn: Connection, agent_id: str) -> LifecycleState:
        value = conn.execute(
            select(agents.c.lifecycle).where(agents.c.agent_id == agent_id)
        ).scalar()
        if value is None:
            raise NotFound("agent", agent_id, _AGENT_HINT)
        return LifecycleState(value)

    def get_agent(self, agent_id: str, conn: Connection | None = None) -> AgentInfo:
        """One agent, or ``NotFound``."""

        def work(conn: Connection) -> AgentInfo:
            row = conn.execute(select(agents).where(agents.c.agent_id == agent_id)).first()
            if row is None:
                raise NotFound("agent", agent_id, _AGENT_HINT)
            return agent_from_row(row)

        return work(conn) if conn is not None else self.db.execute_read(work)

    def list_agents(
        self,
        type_: str | None = None,
        lifecycle_state: str | None = None,
        limit: int | None = None,
    ) -> list[AgentInfo]:
        """Agents, oldest first, optionally filtered by type and lifecycle state."""
        query = select(agents).order_by(agents.c.created_at, agents.c.agent_id)
        if type_ is not None:
            query = query.where(agents.c.type == type_)
        if lifecycle_state is not None:
            query = query.where(agents.c.lifecycle == LifecycleState(lifecycle_state).value)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [agent_from_row(r) for r in conn.execute(query)]

    def agent_history(self, agent_id: str) -> list[HistoryEntry]:
        """Every lifecycle transition of an agent, oldest first."""
        with self.db.read() as conn:
            self._lifecycle_of(conn, agent_id)
            rows = conn.execute(
                select(agent_history)
                .where(agent_history.c.agent_id == agent_id)
                .order_by(agent_history.c.id)
            )
            return [
                HistoryEntry(
                    agent_id=r.agent_id,
                    from_state=LifecycleState(r.from_state) if r.from_state else None,
                    to_state=LifecycleState(r.to_state),
                    action=r.action,
                    reason=r.reason,
                    actor=r.actor,
                    at=r.at,
                )
                for r in rows
            ]

    def write_state(
        self,
        agent_id: str,
        state: dict[str, Any],
        *,
        expected_version: int | None,
        reason: str,
        run_id: str | None = None,
        conn: Connection | None = None,
    ) -> AgentInfo:
        """Replace the state document as a new version; a stale ``expected_version`` conflicts."""

        def work(conn: Connection) -> AgentInfo:
            now = utcnow()
            query = update(agents).where(agents.c.agent_id == agent_id)
            if expected_version is not None:
                query = query.where(agents.c.version == expected_version)
            row = conn.execute(
                query.values(state=state, version=agents.c.version + 1, updated_at=now).returning(
                    *agents.c
                )
            ).first()
            if row is None:
                current = self.get_agent(agent_id, conn)
                raise ConflictError(
                    f"agent {agent_id} state is at version {current.version}, not "
                    f"{expected_version}; re-read the state and apply your change again"
                )
            info = agent_from_row(row)
            self._insert_state_version(conn, agent_id, info.version, state, reason, run_id, now)
            append_event(
                conn,
                EventType.AGENT_STATE,
                agent_id=agent_id,
                run_id=run_id,
                data={"version": info.version, "reason": reason},
                at=now,
            )
            return info

        if conn is not None:
            return work(conn)
        return self.db.transact(work)

    def state_versions(self, agent_id: str, version: int | None = None) -> list[StateVersion]:
        """All state versions of an agent (oldest first), or just ``version``."""
        query = (
            select(state_versions)
            .where(state_versions.c.agent_id == agent_id)
            .order_by(state_versions.c.version)
        )
        if version is not None:
            query = query.where(state_versions.c.version == version)
        with self.db.read() as conn:
            self._lifecycle_of(conn, agent_id)
            rows: Sequence[Row[Any]] = conn.execute(query).all()
        if version is not None and not rows:
            raise NotFound(
                "state version", f"{agent_id}@{version}", f"see: tether agents state {agent_id}"
            )
        return [
            StateVersion(
                agent_id=r.agent_id,
                version=r.version,
                state=r.state,
                reason=r.reason,
                run_id=r.run_id,
                at=r.at,
            )
            for r in rows
        ]

    def set_agent_runs(self, conn: Connection, agent_id: str, action: str, reason: str) -> int:
        """Apply a run action (``run_status``) to an agent's runs (agent pause, resume,
        terminate), in ``conn``.

        A running run that is paused or cancelled stops at its next step boundary: the
        worker's fenced write reports the new status back to it; one resumed before it got
        there just goes on (``run_status.STILL_HELD``). Cancelled runs' waits are withdrawn
        (a paused run keeps them: what it waits for may still arrive)."""
        now = utcnow()
        move = run_status.transition(action)
        target = move.target
        status: Any = target.value
        held = run_status.STILL_HELD.get(action)
        if held is not None:
            status = case((runs.c.owner.is_not(None), held.value), else_=target.value)
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if target in FINAL_RUN_STATUSES:
            values["finished_at"] = now
            values["error"] = {"type": "Cancelled", "message": reason}
        moved = conn.execute(
            update(runs)
            .where(runs.c.agent_id == agent_id, runs.c.status.in_(run_status.sources(action)))
            .values(values)
            .returning(runs.c.run_id, runs.c.status)
        ).all()
        if moved and target in FINAL_RUN_STATUSES:
            ended = [r.run_id for r in moved]
            conn.execute(delete(waits).where(waits.c.run_id.in_(ended)))
            self.runs_ended(conn, ended, reason)  # type: ignore[attr-defined]
        for run_id, now_status in moved:
            append_event(
                conn,
                EventType(f"run.{target.value}"),
                run_id=run_id,
                agent_id=agent_id,
                data={"reason": reason, "status": now_status},
                at=now,
            )
        if moved and target == RunStatus.PENDING:
            notify(conn)
        return len(moved)

    @staticmethod
    def _insert_state_version(
        conn: Connection,
        agent_id: str,
        version: int,
        state: dict[str, Any],
        reason: str,
        run_id: str | None,
        at: Any,
    ) -> None:
        conn.execute(
            insert(state_versions),
            {
                "agent_id": agent_id,
                "version": version,
                "state": state,
                "reason": reason,
                "run_id": run_id,
                "at": at,
            },
        )
