"""messages and delegation: messages ordered per recipient and topic, keyed per recipient;
runs may be detached from their parent, remember their last claim and the message that started
them; agent types declare their caps and mailbox

Revision ID: 0004
Revises: 0003

The messages table of 0001 was never written by any release; it is made again in its new
shape, keeping any row it holds.
"""

import sqlalchemy as sa
from alembic import op

import tether.store.schema

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Read what the old table holds (nothing any release wrote), then make it again: its
    # constraint names are the new table's.
    old = sa.table(
        "messages",
        *(
            sa.column(name)
            for name in (
                "message_id",
                "sender",
                "recipient",
                "topic",
                "idempotency_key",
                "created_at",
                "consumed_by",
                "consumed_seq",
                "consumed_at",
            )
        ),
        sa.column("payload", tether.store.schema.JsonDocument()),
    )
    kept = op.get_bind().execute(sa.select(old).order_by(old.c.created_at)).mappings().all()
    op.drop_table("messages")
    op.create_table(
        "messages",
        sa.Column("seq", _SEQ, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("recipient", sa.String(length=255), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("payload", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("sender_agent", sa.String(length=255), nullable=True),
        sa.Column("sender_run", sa.String(length=64), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("consumed_by", sa.String(length=64), nullable=True),
        sa.Column("consumed_seq", sa.Integer(), nullable=True),
        sa.Column("consumed_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["recipient"],
            ["agents.agent_id"],
            name=op.f("fk_messages_recipient_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_messages")),
        sa.UniqueConstraint("message_id", name=op.f("uq_messages_message_id")),
        sa.UniqueConstraint("recipient", "key", name=op.f("uq_messages_recipient_key")),
    )
    op.create_index(
        "ix_messages_unconsumed",
        "messages",
        ["recipient", "topic", "seq"],
        sqlite_where=sa.text("consumed_by IS NULL"),
        postgresql_where=sa.text("consumed_by IS NULL"),
    )
    op.create_index(op.f("ix_messages_sender_run"), "messages", ["sender_run"])
    agents = {row[0] for row in op.get_bind().execute(sa.text("SELECT agent_id FROM agents"))}
    rows = [
        {
            "message_id": m["message_id"],
            "recipient": m["recipient"],
            "topic": m["topic"] or "",
            "key": m["idempotency_key"] or m["message_id"],
            "payload": m["payload"],
            "sender_agent": m["sender"],
            "created_at": m["created_at"],
            "consumed_by": m["consumed_by"],
            "consumed_seq": m["consumed_seq"],
            "consumed_at": m["consumed_at"],
        }
        for m in kept
        if m["recipient"] in agents
    ]
    if rows:
        new = sa.table("messages", *(sa.column(name) for name in rows[0]))
        op.get_bind().execute(sa.insert(new), rows)

    op.add_column(
        "runs", sa.Column("detached", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column(
        "runs",
        sa.Column("claimed_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
    )
    op.add_column("runs", sa.Column("message_seq", _SEQ, nullable=True))

    op.create_table(
        "agent_types",
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("max_concurrent_runs", sa.Integer(), nullable=False),
        sa.Column("type_concurrency", sa.Integer(), nullable=True),
        sa.Column("rate_limit", sa.Integer(), nullable=True),
        sa.Column("rate_window", sa.Float(), nullable=True),
        sa.Column("mailbox", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("updated_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("type", name=op.f("pk_agent_types")),
    )


def downgrade() -> None:
    op.drop_table("agent_types")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("message_seq")
        batch_op.drop_column("claimed_at")
        batch_op.drop_column("detached")
    op.drop_index(op.f("ix_messages_sender_run"), table_name="messages")
    op.drop_index("ix_messages_unconsumed", table_name="messages")
    op.drop_table("messages")
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
