"""budgets and policies: a run's own budget and policy, the usage of each step, the ledger of
limits and reservations, budget questions on approvals, and a wait for a raised budget

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

import tether.store.schema

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TIME = tether.store.schema.UTCDateTime(timezone=True)
_KINDS = "'timer', 'retry', 'message', 'child', 'approval'"


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("limits", tether.store.schema.JsonDocument()))
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tool", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("cost", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("tokens", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject", tether.store.schema.JsonDocument()))
    with op.batch_alter_table("waits", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_waits_kind_valid"), type_="check")
        batch_op.create_check_constraint("kind_valid", sa.text(f"kind IN ({_KINDS}, 'budget')"))
    op.create_table(
        "ledger",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("max", sa.Float(), nullable=False),
        sa.Column("used", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("period", sa.Float(), nullable=True),
        sa.Column("recent", tether.store.schema.JsonDocument(), nullable=True),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("warn_at", sa.Float(), nullable=True),
        sa.Column("synced", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_ledger_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "key", name=op.f("pk_ledger")),
    )
    op.create_table(
        "reservations",
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["holder"],
            ["runs.run_id"],
            name=op.f("fk_reservations_holder_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("holder", "key", "run_id", "seq", name=op.f("pk_reservations")),
    )
    op.create_index(op.f("ix_reservations_run_id"), "reservations", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_reservations_run_id"), table_name="reservations")
    op.drop_table("reservations")
    op.drop_table("ledger")
    op.execute("DELETE FROM waits WHERE kind = 'budget'")
    with op.batch_alter_table("waits", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_waits_kind_valid"), type_="check")
        batch_op.create_check_constraint("kind_valid", sa.text(f"kind IN ({_KINDS})"))
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_column("subject")
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("tokens")
        batch_op.drop_column("cost")
        batch_op.drop_column("tool")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("limits")
