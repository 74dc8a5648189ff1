"""The tables, declared once with SQLAlchemy Core; the same schema on SQLite and PostgreSQL.

Migrations under ``migrations/versions`` create and evolve these tables; a test compares a
migrated database with this metadata and fails on any drift.

Times are stored as UTC: ``timestamptz`` on PostgreSQL and epoch seconds (REAL) on SQLite,
which is smaller than text and compares correctly.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from tether.lifecycle import LifecycleState
from tether.types import IncidentStatus, RunStatus, StepStatus
from tether.vocabulary import WaitKind


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime: ``timestamptz`` on PostgreSQL, epoch seconds on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Float())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        if dialect.name == "sqlite":
            return value.timestamp()
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, int | float):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        if isinstance(value, dt.datetime):
            return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
        raise TypeError(f"unexpected stored time {value!r}")


class JsonDocument(TypeDecorator[Any]):
    """A JSON document: JSONB on PostgreSQL; compact text on SQLite.

    On SQLite the column has TEXT affinity on purpose: a column declared ``JSON`` gets NUMERIC
    affinity, which silently turns a stored ``12345678901234567890`` into a rounded REAL.
    Python ``None`` is SQL NULL.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            # Imported here: the PostgreSQL dialect costs a SQLite user 50 ms at start-up.
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return encode_json(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return json.loads(value)


encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Compact JSON text, non-ASCII kept as is: how JSON values are written to the database."""


def json_text(value: Any) -> str | None:
    """A value as the JSON text of a column or parameter; ``None`` stays SQL NULL."""
    return None if value is None else encode_json(value)


def Json() -> TypeEngine[Any]:
    """The type of every JSON column."""
    return JsonDocument()


def _one_of(column: str, values: Any) -> CheckConstraint:
    allowed = ", ".join(f"'{v.value}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=f"{column}_valid")


SEQ = BigInteger().with_variant(Integer(), "sqlite")
"""Autoincrementing 64-bit keys; on SQLite an INTEGER PRIMARY KEY is the 64-bit rowid."""

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

agents = Table(
    "agents",
    metadata,
    Column("agent_id", String(255), primary_key=True),
    Column("type", String(255), nullable=False),
    Column("config", Json(), nullable=False),
    Column("lifecycle", String(16), nullable=False),
    Column("state", Json(), nullable=False),
    Column("version", Integer, nullable=False),
    Column("error", Json(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    _one_of("lifecycle", LifecycleState),
    Index(None, "type"),
    Index(None, "lifecycle"),
)

agent_history = Table(
    "agent_history",
    metadata,
    Column("id", SEQ, primary_key=True, autoincrement=True),
    Column(
        "agent_id", String(255), ForeignKey("agents.agent_id", ondelete="CASCADE"), nullable=False
    ),
    Column("from_state", String(16), nullable=True),
    Column("to_state", String(16), nullable=False),
    Column("action", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Index(None, "agent_id", "id"),
)

state_versions = Table(
    "state_versions",
    metadata,
    Column(
        "agent_id", String(255), ForeignKey("agents.agent_id", ondelete="CASCADE"), primary_key=True
    ),
    Column("version", Integer, primary_key=True),
    Column("state", Json(), nullable=False),
    Column("reason", Text, nullable=False),
    Column("run_id", String(64), nullable=True),
    Column("at", UTCDateTime(), nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column(
        "agent_id", String(255), ForeignKey("agents.agent_id", ondelete="CASCADE"), nullable=False
    ),
    Column("task_id", String(255), nullable=True),
    Column("input", Json(), nullable=True),
    Column("status", String(24), nullable=False),
    Column("result", Json(), nullable=True),
    Column("error", Json(), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("priority", Integer, nullable=False, default=0),
    Column("max_concurrent", Integer, nullable=False, default=1),
    Column("parent_run_id", String(64), ForeignKey("runs.run_id"), nullable=True),
    Column("forked_from", String(64), nullable=True),
    Column("forked_at_step", Integer, nullable=True),
    Column("owner", String(128), nullable=True),
    Column("fence", Integer, nullable=False, default=0),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("usage", Json(), nullable=True),
    Column("state_version", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    # Poison runs: ``progress`` fingerprints the journal at the last claim; a claim that finds
    # it unchanged counts a stall, and ``stalls`` claims in a row without a commit stop the run.
    Column("progress", Integer, nullable=True),
    Column("stalls", Integer, nullable=False, server_default=text("0")),
    # Delegation and queues (0004): a child that outlives its parent; when a run was last
    # claimed (rate caps); the message a mailbox run was started for.
    Column("detached", Boolean, nullable=False, server_default=false()),
    Column("claimed_at", UTCDateTime(), nullable=True),
    Column("message_seq", BigInteger().with_variant(Integer(), "sqlite"), nullable=True),
    # Budgets and policies (0006): the run's own budget and policy as given at submit (or by
    # its parent), and the runs above it whose budgets it spends against (``holders``).
    Column("limits", Json(), nullable=True),
    _one_of("status", RunStatus),
    UniqueConstraint("agent_id", "task_id"),
    Index(None, "agent_id", "status"),
    Index(None, "created_at"),
    Index(None, "parent_run_id"),
)
# The claim's order among pending runs, read straight off the index: a claim costs the same
# with ten or ten thousand runs queued.
Index("ix_runs_claim_order", runs.c.status, runs.c.priority.desc(), runs.c.created_at)

steps = Table(
    "steps",
    metadata,
    Column("run_id", String(64), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("output", Json(), nullable=True),
    Column("error", Json(), nullable=True),
    Column("attempts", Integer, nullable=False, default=1),
    Column("state_version", Integer, nullable=True),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    # Usage (0006): the tool a step declared and what it cost, committed with its result.
    Column("tool", String(255), nullable=True),
    Column("cost", Float, nullable=True),
    Column("tokens", BigInteger, nullable=True),
    _one_of("status", StepStatus),
    sqlite_with_rowid=False,
)

events = Table(
    "events",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=True),
    Column("agent_id", String(255), nullable=True),
    Column("type", String(64), nullable=False),
    Column("data", Json(), nullable=True),
    Column("at", UTCDateTime(), nullable=False),
    Index(None, "run_id", "seq"),
    # Step events (the bulk) carry no agent_id: a partial index keeps them out of it, so a
    # step commit touches one index page fewer.
    Index(
        None,
        "agent_id",
        "seq",
        sqlite_where=text("agent_id IS NOT NULL"),
        postgresql_where=text("agent_id IS NOT NULL"),
    ),
)

waits = Table(
    "waits",
    metadata,
    Column("run_id", String(64), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("deadline", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    _one_of("kind", WaitKind),
    # What can satisfy a wait, found by what happened (a message's topic, a child's run id).
    Index(None, "kind", "key"),
    # Due deadlines, read in order by claims.
    Index(None, "deadline"),
)
"""What each waiting run waits for: one row per alternative of its current wait (a run waits
at one journal position at a time). Rows exist only while a run is waiting or paused."""

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("checkpoint_id", String(64), primary_key=True),
    Column(
        "agent_id", String(255), ForeignKey("agents.agent_id", ondelete="CASCADE"), nullable=False
    ),
    Column("name", String(255), nullable=False),
    Column("state", Json(), nullable=False),
    Column("version", Integer, nullable=False),
    Column("run_id", String(64), nullable=True),
    Column("seq", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Index(None, "agent_id", "created_at"),
)

messages = Table(
    "messages",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, unique=True),
    Column(
        "recipient",
        String(255),
        ForeignKey("agents.agent_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("payload", Json(), nullable=True),
    Column("sender_agent", String(255), nullable=True),
    Column("sender_run", String(64), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("consumed_by", String(64), nullable=True),
    Column("consumed_seq", Integer, nullable=True),
    Column("consumed_at", UTCDateTime(), nullable=True),
    # One message per key and recipient: a repeated send stores nothing new.
    UniqueConstraint("recipient", "key"),
    # A recipient's unconsumed messages of a topic, oldest first (FIFO).
    Index(
        "ix_messages_unconsumed",
        "recipient",
        "topic",
        "seq",
        sqlite_where=text("consumed_by IS NULL"),
        postgresql_where=text("consumed_by IS NULL"),
    ),
    Index(None, "sender_run"),
)
"""Durable messages: to an agent (``topic`` is ``''``) or one copy per subscriber of a topic,
each consumed once, by a run's ``receive`` or by a run of the agent's ``on_message``."""

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column(
        "agent_id", String(255), ForeignKey("agents.agent_id", ondelete="CASCADE"), primary_key=True
    ),
)

approvals = Table(
    "approvals",
    metadata,
    Column("approval_id", String(64), primary_key=True),
    Column("run_id", String(64), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("agent_id", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("title", Text, nullable=False),
    Column("data", Json(), nullable=True),
    Column("digest", String(64), nullable=False),
    Column("schema", Json(), nullable=True),
    Column("status", String(16), nullable=False),
    Column("decision", Json(), nullable=True),
    Column("comment", Text, nullable=True),
    Column("decided_by", String(255), nullable=True),
    Column("decided_at", UTCDateTime(), nullable=True),
    Column("deadline", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # Approvals (0005): what a timeout applies (the default decision, or ask's default
    # answer), who may decide (None: anyone), where the decision came from (human, timeout,
    # policy), when the run consumed it, and when the request was announced (the hook).
    Column("on_timeout", Json(), nullable=True),
    Column("approvers", Json(), nullable=True),
    Column("source", String(16), nullable=True),
    Column("consumed_at", UTCDateTime(), nullable=True),
    Column("notified_at", UTCDateTime(), nullable=True),
    # What the runtime asked about (0006): a budget's limit ({"budget": run, "limit": key}),
    # raised in the decision's transaction when approved; None for a run's own question.
    Column("subject", Json(), nullable=True),
    UniqueConstraint("run_id", "seq"),
    Index(None, "status", "created_at"),
    Index(None, "run_id"),
)

incidents = Table(
    "incidents",
    metadata,
    Column("incident_id", String(64), primary_key=True),
    Column("run_id", String(64), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("agent_id", String(255), nullable=False),
    Column("seq", Integer, nullable=True),
    Column("kind", String(32), nullable=False),
    Column("error", Json(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("resolution", String(16), nullable=True),
    Column("resolution_data", Json(), nullable=True),
    Column("resolved_by", String(255), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("resolved_at", UTCDateTime(), nullable=True),
    _one_of("status", IncidentStatus),
    Index(None, "status", "created_at"),
    Index(None, "run_id"),
)

ledger = Table(
    "ledger",
    metadata,
    Column("run_id", String(64), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(300), primary_key=True),
    Column("max", Float, nullable=False),
    Column("used", Float, nullable=False, server_default=text("0")),
    Column("period", Float, nullable=True),
    Column("recent", Json(), nullable=True),
    Column("action", String(8), nullable=False),
    Column("warn_at", Float, nullable=True),
    Column("synced", Integer, nullable=False, server_default=text("0")),
    Column("updated_at", UTCDateTime(), nullable=False),
)
"""The budgets being enforced: one row per limit of a run that has a budget (``steps``,
``cost``, ``tokens``, ``duration``, ``calls:TOOL``, ``rate:TOOL``), with what the run and
every run below it have used of it. Runs below it are charged in the transactions of their
steps; the run's own steps after journal position ``synced`` are not in ``used`` yet (a run
alone with its budget adds them when it parks, ends or starts sharing it), and are read
from the steps themselves."""

reservations = Table(
    "reservations",
    metadata,
    Column("holder", String(64), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(300), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("amount", Float, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index(None, "run_id"),
)
"""Usage reserved against a budget (``holder``'s) by a step about to run (``run_id``,
``seq``), until the step's own transaction settles it; only where other runs spend against
the same budget (a tree)."""

agent_types = Table(
    "agent_types",
    metadata,
    Column("type", String(255), primary_key=True),
    Column("max_concurrent_runs", Integer, nullable=False),
    Column("type_concurrency", Integer, nullable=True),
    Column("rate_limit", Integer, nullable=True),
    Column("rate_window", Float, nullable=True),
    Column("mailbox", Boolean, nullable=False, server_default=false()),
    Column("updated_at", UTCDateTime(), nullable=False),
)
"""What the code of each agent type declares that other processes must know: its caps (claims
enforce them across workers) and whether it has a mailbox (``on_message``). Written by the
apps that register the type."""

workers = Table(
    "workers",
    metadata,
    Column("worker_id", String(128), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("stopped_at", UTCDateTime(), nullable=True),
)
