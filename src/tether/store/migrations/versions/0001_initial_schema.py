"""initial schema

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

import tether.store.schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("config", tether.store.schema.JsonDocument(), nullable=False),
        sa.Column("lifecycle", sa.String(length=16), nullable=False),
        sa.Column("state", tether.store.schema.JsonDocument(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("error", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "lifecycle IN ('created', 'initialized', 'active', 'paused', 'terminated', 'error')",
            name=op.f("ck_agents_lifecycle_valid"),
        ),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agents")),
    )
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agents_lifecycle"), ["lifecycle"], unique=False)
        batch_op.create_index(batch_op.f("ix_agents_type"), ["type"], unique=False)

    op.create_table(
        "events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("agent_id", sa.String(length=255), nullable=True),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("data", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_events_agent_id_seq"),
            ["agent_id", "seq"],
            unique=False,
            sqlite_where=sa.text("agent_id IS NOT NULL"),
            postgresql_where=sa.text("agent_id IS NOT NULL"),
        )
        batch_op.create_index(batch_op.f("ix_events_run_id_seq"), ["run_id", "seq"], unique=False)

    op.create_table(
        "messages",
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("sender", sa.String(length=255), nullable=True),
        sa.Column("recipient", sa.String(length=255), nullable=True),
        sa.Column("topic", sa.String(length=255), nullable=True),
        sa.Column("payload", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("consumed_by", sa.String(length=64), nullable=True),
        sa.Column("consumed_seq", sa.Integer(), nullable=True),
        sa.Column("consumed_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_messages")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_messages_idempotency_key")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_messages_recipient_topic_consumed_by"),
            ["recipient", "topic", "consumed_by"],
            unique=False,
        )

    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_workers")),
    )
    op.create_table(
        "agent_history",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_agent_history_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_history")),
    )
    with op.batch_alter_table("agent_history", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_agent_history_agent_id_id"), ["agent_id", "id"], unique=False
        )

    op.create_table(
        "checkpoints",
        sa.Column("checkpoint_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("state", tether.store.schema.JsonDocument(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_checkpoints_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("checkpoint_id", name=op.f("pk_checkpoints")),
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_checkpoints_agent_id_created_at"),
            ["agent_id", "created_at"],
            unique=False,
        )

    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("task_id", sa.String(length=255), nullable=True),
        sa.Column("input", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("result", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("error", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=False),
        sa.Column("parent_run_id", sa.String(length=64), nullable=True),
        sa.Column("forked_from", sa.String(length=64), nullable=True),
        sa.Column("forked_at_step", sa.Integer(), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("lease_until", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("wake_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("wait", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("usage", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("state_version", sa.Integer(), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'waiting', 'paused', 'completed', 'failed', 'cancelled', 'needs_attention')",
            name=op.f("ck_runs_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_runs_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_run_id"], ["runs.run_id"], name=op.f("fk_runs_parent_run_id_runs")
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
        sa.UniqueConstraint("agent_id", "task_id", name=op.f("uq_runs_agent_id_task_id")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_runs_agent_id_status"), ["agent_id", "status"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_runs_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_parent_run_id"), ["parent_run_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_runs_status_wake_at"), ["status", "wake_at"], unique=False
        )

    op.create_table(
        "state_versions",
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", tether.store.schema.JsonDocument(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_state_versions_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "version", name=op.f("pk_state_versions")),
    )
    op.create_table(
        "subscriptions",
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_subscriptions_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("topic", "agent_id", name=op.f("pk_subscriptions")),
    )
    op.create_table(
        "approvals",
        sa.Column("approval_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("data", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("schema", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decision", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.String(length=255), nullable=True),
        sa.Column("decided_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("deadline", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_approvals_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("approval_id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("run_id", "seq", name=op.f("uq_approvals_run_id_seq")),
    )
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_approvals_status_created_at"), ["status", "created_at"], unique=False
        )

    op.create_table(
        "incidents",
        sa.Column("incident_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("error", tether.store.schema.JsonDocument(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("resolution", sa.String(length=16), nullable=True),
        sa.Column("resolution_data", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("resolved_by", sa.String(length=255), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('open', 'resolved')", name=op.f("ck_incidents_status_valid")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_incidents_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("incident_id", name=op.f("pk_incidents")),
    )
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_incidents_run_id"), ["run_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_incidents_status_created_at"), ["status", "created_at"], unique=False
        )

    op.create_table(
        "steps",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("output", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("error", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state_version", sa.Integer(), nullable=True),
        sa.Column("started_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('started', 'completed', 'failed', 'waiting')",
            name=op.f("ck_steps_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_steps_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "seq", name=op.f("pk_steps")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("steps")
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_incidents_status_created_at"))
        batch_op.drop_index(batch_op.f("ix_incidents_run_id"))

    op.drop_table("incidents")
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approvals_status_created_at"))

    op.drop_table("approvals")
    op.drop_table("subscriptions")
    op.drop_table("state_versions")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_status_wake_at"))
        batch_op.drop_index(batch_op.f("ix_runs_parent_run_id"))
        batch_op.drop_index(batch_op.f("ix_runs_created_at"))
        batch_op.drop_index(batch_op.f("ix_runs_agent_id_status"))

    op.drop_table("runs")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_agent_id_created_at"))

    op.drop_table("checkpoints")
    with op.batch_alter_table("agent_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_history_agent_id_id"))

    op.drop_table("agent_history")
    op.drop_table("workers")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_messages_recipient_topic_consumed_by"))

    op.drop_table("messages")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_run_id_seq"))
        batch_op.drop_index(
            batch_op.f("ix_events_agent_id_seq"),
            sqlite_where=sa.text("agent_id IS NOT NULL"),
            postgresql_where=sa.text("agent_id IS NOT NULL"),
        )

    op.drop_table("events")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agents_type"))
        batch_op.drop_index(batch_op.f("ix_agents_lifecycle"))

    op.drop_table("agents")
