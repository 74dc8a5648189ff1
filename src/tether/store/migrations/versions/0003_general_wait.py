"""general wait: a waits table (kind, key, deadline) replaces runs.wake_at and runs.wait; runs
count claims without progress (poison runs)

Revision ID: 0003
Revises: 0002

Runs waiting on a timer (a sleep or a retry delay) keep waiting: their wake-up time becomes a
``timer`` or ``retry`` wait at the same journal position, with the same deadline.
"""

import json

import sqlalchemy as sa
from alembic import op

import tether.store.schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_KINDS = {"sleep": "timer", "retry": "retry"}
"""0002's ``runs.wait.kind`` -> 0003's wait kind."""


def upgrade() -> None:
    op.create_table(
        "waits",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("deadline", tether.store.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", tether.store.schema.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('timer', 'retry', 'message', 'child', 'approval')",
            name=op.f("ck_waits_kind_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_waits_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "seq", "kind", "key", name=op.f("pk_waits")),
    )
    with op.batch_alter_table("waits", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_waits_deadline"), ["deadline"], unique=False)
        batch_op.create_index(batch_op.f("ix_waits_kind_key"), ["kind", "key"], unique=False)

    conn = op.get_bind()
    runs = sa.table(
        "runs",
        sa.column("run_id", sa.String()),
        sa.column("status", sa.String()),
        sa.column("wake_at", tether.store.schema.UTCDateTime()),
        sa.column("wait", sa.Text()),
        sa.column("created_at", tether.store.schema.UTCDateTime()),
    )
    waits = sa.table(
        "waits",
        sa.column("run_id", sa.String()),
        sa.column("seq", sa.Integer()),
        sa.column("kind", sa.String()),
        sa.column("key", sa.String()),
        sa.column("deadline", tether.store.schema.UTCDateTime()),
        sa.column("created_at", tether.store.schema.UTCDateTime()),
    )
    parked = conn.execute(
        sa.select(
            runs.c.run_id, runs.c.wake_at, sa.cast(runs.c.wait, sa.Text), runs.c.created_at
        ).where(runs.c.wake_at.is_not(None), runs.c.status.in_(["waiting", "paused"]))
    ).all()
    rows = []
    for run_id, wake_at, wait, created_at in parked:
        doc = json.loads(wait) if wait else {}
        if doc.get("seq") is None:
            continue  # no journal position to wait at: made pending below
        kind = _KINDS.get(str(doc.get("kind")), "timer")
        rows.append(
            {
                "run_id": run_id,
                "seq": int(doc["seq"]),
                "kind": kind,
                "key": "",
                "deadline": wake_at,
                "created_at": created_at,
            }
        )
    if rows:
        conn.execute(sa.insert(waits), rows)
    # A waiting run with nothing left to wait for would never be claimed: replay re-parks it.
    conn.execute(
        sa.update(runs)
        .where(runs.c.status == "waiting", runs.c.run_id.not_in(sa.select(waits.c.run_id)))
        .values(status="pending")
    )

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_status_wake_at")
        # SQLite rebuilds the table here, and a rebuilt index would lose its DESC (the claim
        # order): dropped now, made again below as 0002 made it.
        batch_op.drop_index("ix_runs_claim_order")
        batch_op.drop_column("wake_at")
        batch_op.drop_column("wait")
        batch_op.add_column(sa.Column("progress", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("stalls", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
    op.create_index(
        "ix_runs_claim_order", "runs", ["status", sa.text("priority DESC"), "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_runs_claim_order", table_name="runs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("stalls")
        batch_op.drop_column("progress")
        batch_op.add_column(sa.Column("wait", tether.store.schema.JsonDocument(), nullable=True))
        batch_op.add_column(
            sa.Column("wake_at", tether.store.schema.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_runs_status_wake_at", ["status", "wake_at"], unique=False)
    op.create_index(
        "ix_runs_claim_order", "runs", ["status", sa.text("priority DESC"), "created_at"]
    )
    op.drop_table("waits")
