"""The population of ``tests/upgradekit.py`` written in the tables of each schema revision.

A seed is the list of writers that fill a revision's tables, in an order the foreign keys
accept. Each writer is named for the revision that gave its table the shape it writes
(``runs_0001``) and is never edited afterwards: it stands for the databases users have.

How a new migration joins: when migration NNNN changes tables, write a ``<table>_NNNN`` for
each table it changed or added (a new table, a column moved: what NNNN's own data migration
reads from the older shape), and add ``SEEDS["NNNN"]``: the previous revision's writers with
those replaced or added. ``test_every_schema_revision_has_a_seed`` fails until it is there.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tests.upgradekit import Population
from tether.store import migrate, parse_url
from tether.store.database import Database


class Json:
    """A value for a JSON column."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Rows:
    """Plain INSERTs of untyped columns: values are encoded as the schema stores them since
    0001 (JSON as text on SQLite and ``jsonb`` on PostgreSQL, times as epoch seconds on SQLite
    and ``timestamptz`` on PostgreSQL), and the database converts each to its column's type."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"

    def _value(self, value: Any) -> Any:
        if isinstance(value, Json):
            if value.value is None:
                return None
            return json.dumps(value.value, separators=(",", ":"), ensure_ascii=False)
        if isinstance(value, dt.datetime) and not self.pg:
            return value.timestamp()
        return value

    def insert(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (dicts with the same keys) into the table ``name``."""
        if rows:
            table = sa.table(name, *(sa.column(c) for c in rows[0]))
            values = [{c: self._value(v) for c, v in row.items()} for row in rows]
            self.conn.execute(sa.insert(table), values)


Writer = Callable[[Rows, Population], None]


def agents_0001(rows: Rows, pop: Population) -> None:
    """Agents, their lifecycle history and every version of their state."""
    rows.insert(
        "agents",
        [
            {
                "agent_id": a.agent_id,
                "type": a.type,
                "config": Json(a.config),
                "lifecycle": a.lifecycle,
                "state": Json(a.state),
                "version": a.version,
                "error": Json(a.error),
                "created_at": a.created_at,
                "updated_at": a.updated_at,
            }
            for a in pop.agents
        ],
    )
    history = ("from_state", "to_state", "action", "reason", "actor", "at")
    rows.insert(
        "agent_history",
        [
            {"agent_id": a.agent_id, **{c: getattr(h, c) for c in history}}
            for a in pop.agents
            for h in a.history
        ],
    )
    rows.insert(
        "state_versions",
        [
            {
                "agent_id": a.agent_id,
                "version": v.version,
                "state": Json(v.state),
                "reason": v.reason,
                "run_id": v.run_id,
                "at": v.at,
            }
            for a in pop.agents
            for v in a.states
        ],
    )


def workers_0001(rows: Rows, pop: Population) -> None:
    """Workers, alive or dead."""
    columns = ("worker_id", "hostname", "pid", "started_at", "heartbeat_at", "stopped_at")
    rows.insert("workers", [{c: getattr(w, c) for c in columns} for w in pop.workers])


def runs_0001(rows: Rows, pop: Population) -> None:
    """Runs, up to 0002: a waiting (or paused) run's timer is ``wake_at`` and ``wait``."""
    plain = (
        *("run_id", "agent_id", "status", "attempts", "priority", "max_concurrent", "owner"),
        *("forked_from", "forked_at_step", "fence", "lease_until", "state_version"),
        *("created_at", "updated_at", "started_at", "finished_at"),
    )
    rows.insert(
        "runs",
        [
            {
                **{c: getattr(r, c) for c in plain},
                "task_id": None,
                "parent_run_id": None,
                "input": Json(r.input),
                "result": Json(r.result),
                "error": Json(r.error),
                "usage": Json(None),
                "wake_at": r.wake_at,
                "wait": Json(r.timer.doc() if r.timer else None),
            }
            for r in pop.runs
        ],
    )


def runs_0003(rows: Rows, pop: Population) -> None:
    """Runs from 0003: their waits live in ``waits``; nothing counted a stall yet."""
    plain = (
        *("run_id", "agent_id", "status", "attempts", "priority", "max_concurrent", "owner"),
        *("forked_from", "forked_at_step", "fence", "lease_until", "state_version"),
        *("created_at", "updated_at", "started_at", "finished_at"),
    )
    rows.insert(
        "runs",
        [
            {
                **{c: getattr(r, c) for c in plain},
                "task_id": None,
                "parent_run_id": None,
                "input": Json(r.input),
                "result": Json(r.result),
                "error": Json(r.error),
                "usage": Json(None),
                "progress": None,
                "stalls": 0,
            }
            for r in pop.runs
        ],
    )


_WAIT_KINDS_0003 = {"sleep": "timer", "retry": "retry"}


def waits_0003(rows: Rows, pop: Population) -> None:
    """What each waiting (or paused) run waits for: a timer or a retry delay, at its step."""
    rows.insert(
        "waits",
        [
            {
                "run_id": r.run_id,
                "seq": r.timer.seq,
                "kind": _WAIT_KINDS_0003[r.timer.kind],
                "key": "",
                "deadline": r.timer.due,
                "created_at": r.created_at,
            }
            for r in pop.runs
            if r.timer is not None
        ],
    )


def steps_0001(rows: Rows, pop: Population) -> None:
    """Journals; a sleep that has not ended is ``waiting``, with its end as its output."""
    rows.insert(
        "steps",
        [
            {
                "run_id": r.run_id,
                "seq": s.seq,
                "name": s.name,
                "kind": s.kind,
                "status": s.status,
                "output": Json(s.output),
                "error": Json(s.error),
                "attempts": s.attempts,
                "state_version": s.state_version,
                "started_at": None,
                "finished_at": s.finished_at,
            }
            for r in pop.runs
            for s in r.journal
        ],
    )


def checkpoints_0001(rows: Rows, pop: Population) -> None:
    """Checkpoints, taken by a person or by a run."""
    columns = ("checkpoint_id", "agent_id", "name", "version", "run_id", "seq", "created_at")
    rows.insert(
        "checkpoints",
        [{**{c: getattr(k, c) for c in columns}, "state": Json(k.state)} for k in pop.checkpoints],
    )


def incidents_0001(rows: Rows, pop: Population) -> None:
    """Open incidents."""
    columns = ("incident_id", "run_id", "agent_id", "seq", "kind", "status", "created_at")
    rows.insert(
        "incidents",
        [
            {
                **{c: getattr(i, c) for c in columns},
                "error": Json(i.error),
                "resolution": None,
                "resolution_data": Json(None),
                "resolved_by": None,
                "resolved_at": None,
            }
            for i in pop.incidents
        ],
    )


def events_0001(rows: Rows, pop: Population) -> None:
    """The event log, in order."""
    rows.insert(
        "events",
        [
            {
                "run_id": e.run_id,
                "agent_id": e.agent_id,
                "type": e.type,
                "data": Json(e.data),
                "at": e.at,
            }
            for e in pop.events
        ],
    )


_0001: list[Writer] = [
    agents_0001,
    workers_0001,
    runs_0001,
    steps_0001,
    checkpoints_0001,
    incidents_0001,
    events_0001,
]

_0003: list[Writer] = [
    agents_0001,
    workers_0001,
    runs_0003,
    steps_0001,
    waits_0003,
    checkpoints_0001,
    incidents_0001,
    events_0001,
]

SEEDS: dict[str, list[Writer]] = {
    "0001": _0001,
    "0002": _0001,  # 0002 added an index, nothing else
    "0003": _0003,  # the general wait: runs' timers became waits rows
    "0004": _0003,  # messages made again (none seeded yet); runs gained columns with defaults
    "0005": _0003,  # approvals gained nullable columns (none seeded: no release wrote any)
    "0006": _0003,  # nullable columns (limits, usage, subject), new tables, a wider wait check
}
"""The writers of every schema revision this tether ships."""


def seed(url: str, revision: str, pop: Population) -> None:
    """Create the schema of ``revision`` in an empty database and write ``pop`` into it."""
    db = Database(parse_url(url))
    try:
        assert migrate.upgrade(db, to=revision) == revision
        with db.write() as conn:
            rows = Rows(conn)
            for write in SEEDS[revision]:
                write(rows, pop)
    finally:
        db.dispose()
