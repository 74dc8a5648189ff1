"""approvals: what a timeout applies, who may decide, where a decision came from, when the run
consumed it and when the request was announced

Revision ID: 0005
Revises: 0004

The approvals table of 0001 was never written by any release; it gains its columns here.
"""

import sqlalchemy as sa
from alembic import op

import tether.store.schema

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TIME = tether.store.schema.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("on_timeout", tether.store.schema.JsonDocument()))
        batch_op.add_column(sa.Column("approvers", tether.store.schema.JsonDocument()))
        batch_op.add_column(sa.Column("source", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("consumed_at", _TIME, nullable=True))
        batch_op.add_column(sa.Column("notified_at", _TIME, nullable=True))
        batch_op.create_index(batch_op.f("ix_approvals_run_id"), ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approvals_run_id"))
        batch_op.drop_column("notified_at")
        batch_op.drop_column("consumed_at")
        batch_op.drop_column("source")
        batch_op.drop_column("approvers")
        batch_op.drop_column("on_timeout")
