"""The registry of agent types (``agent_types``): what each type's code declares that every
process must know, and how the runs waiting in a type's queue stand against its caps.

Apps write their registered types' declarations when they open the database and when a
worker starts; claims read the caps from there (``Statements.type_usage``), so every worker,
and the CLI without the code, sees the same ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from tether.store.committer import Committer
from tether.store.common import utcnow
from tether.store.database import Database
from tether.store.schema import agent_types, agents, runs
from tether.types import RunStatus

_DECLARED = [c for c in agent_types.c if c.name != "updated_at"]
"""The columns of a declaration, in ``TypeDeclaration``'s order."""


@dataclass(frozen=True)
class TypeDeclaration:
    """One agent type's declaration, as its code states it."""

    type: str
    max_concurrent_runs: int = 1
    """Runs of one agent executing at once."""
    type_concurrency: int | None = None
    """Runs of the type executing at once across all workers (``None``: no cap)."""
    rate_limit: int | None = None
    """Claims of the type's runs per ``rate_window`` (``None``: no cap)."""
    rate_window: float | None = None
    """The rate cap's window, in seconds."""
    mailbox: bool = False
    """The type defines ``on_message``: a message no ``receive`` takes starts a run."""


@dataclass(frozen=True)
class QueueState:
    """What holds a pending run back, in numbers, as the database says now."""

    lifecycle: str
    """Its agent's lifecycle state (only an active agent's runs are claimed)."""
    agent_running: int
    """Runs of its agent under a live lease."""
    agent_cap: int
    """Runs of its agent that may execute at once."""
    type: str
    type_running: int | None = None
    """Runs of its type under a live lease, when the type has a concurrency cap."""
    type_cap: int | None = None
    claims: int | None = None
    """Claims of its type in the rate window, when the type has a rate cap."""
    rate_limit: int | None = None
    rate_window: float | None = None


class TypeQueries:
    """The registry's statements."""

    db: Database
    committer: Committer

    def declare_types(self, declarations: Sequence[TypeDeclaration]) -> int:
        """Write these declarations to the registry, newest wins; returns how many rows
        changed. Rows that already say the same are left alone, so that opening an app
        costs one read, not a write."""
        wanted = {d.type: d for d in declarations}
        if not wanted:
            return 0
        with self.db.read() as conn:
            query = select(*_DECLARED).where(agent_types.c.type.in_(list(wanted)))
            stored = {row[0]: TypeDeclaration(*row) for row in conn.execute(query)}
        changed = [d for name, d in wanted.items() if stored.get(name) != d]
        if not changed:
            return 0
        dialect = postgresql if self.db.dialect == "postgresql" else sqlite
        statement = dialect.insert(agent_types)
        upsert = statement.on_conflict_do_update(
            index_elements=[agent_types.c.type],
            set_={c.name: statement.excluded[c.name] for c in agent_types.c if c.name != "type"},
        )
        now = utcnow()
        rows = [
            dict(zip([c.name for c in _DECLARED], astuple(d), strict=True)) | {"updated_at": now}
            for d in changed
        ]
        self.db.transact(lambda conn: conn.execute(upsert, rows))
        return len(changed)

    def declared_types(self) -> list[TypeDeclaration]:
        """Every declaration in the registry, by type name."""
        with self.db.read() as conn:
            rows = conn.execute(select(*_DECLARED).order_by(agent_types.c.type)).all()
        return [TypeDeclaration(*row) for row in rows]

    def queue_states(self, run_ids: Sequence[str]) -> dict[str, QueueState]:
        """For each of these runs that is pending: its agent's and its type's standing
        against their caps (``QueueState``), counted now, as a claim would count them."""
        sql = self.committer.sql
        pending = RunStatus.PENDING.value
        with self.db.read() as conn:
            rows = conn.execute(
                select(runs.c.run_id, runs.c.agent_id, runs.c.max_concurrent, agents.c.type)
                .add_columns(agents.c.lifecycle)
                .join(agents, agents.c.agent_id == runs.c.agent_id)
                .where(runs.c.run_id.in_(list(run_ids)), runs.c.status == pending)
            ).all()
            if not rows:
                return {}
            now = _db_now(conn)
            agent_ids = sorted({row.agent_id for row in rows})
            running: dict[str, int] = dict(
                conn.execute(
                    select(runs.c.agent_id, func.count())
                    .where(
                        runs.c.agent_id.in_(agent_ids),
                        runs.c.status == RunStatus.RUNNING.value,
                        runs.c.lease_until >= now,
                    )
                    .group_by(runs.c.agent_id)
                ).all()
            )
            names = sorted({row.type for row in rows})
            at: tuple[Any, ...] = () if sql.pg else (now.timestamp(),) * 2
            usage = {
                u[0]: u
                for u in conn.exec_driver_sql(sql.type_usage(len(names)), (*at, *names)).all()
            }
        states = {}
        for run_id, agent_id, cap, type_, lifecycle in rows:
            _, concurrency, type_running, rate, window, claims = usage.get(type_, _UNCAPPED)
            states[run_id] = QueueState(
                lifecycle=lifecycle,
                agent_running=running.get(agent_id, 0),
                agent_cap=cap,
                type=type_,
                type_running=type_running if concurrency is not None else None,
                type_cap=concurrency,
                claims=claims if rate is not None else None,
                rate_limit=rate,
                rate_window=window,
            )
        return states


_UNCAPPED = (None,) * 6


def _db_now(conn: Connection) -> dt.datetime:
    """The time a claim would count with: PostgreSQL's clock, else this machine's."""
    if conn.dialect.name == "postgresql":
        value = conn.exec_driver_sql("SELECT statement_timestamp()").scalar_one()
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]
    return utcnow()
