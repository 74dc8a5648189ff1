"""A gate for race tests: racers queue behind it, so all are inside their calls when it opens.

A race proves something only if the racers were inside their critical operation at the same
moment; left to the scheduler, they often take turns. The gate is a write transaction that
holds the raced agents' rows (on SQLite, the database's write lock). The test lets the racers
go, waits until every one is queued behind the gate, then opens it, and checks that each
racer's own start and finish times span the moment it opened.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, select, text
from sqlalchemy.engine import Connection

import tether
from tether.store.schema import agents

SETTLE = 0.05
"""Seconds SQLite racers get to reach ``BEGIN IMMEDIATE``: SQLite shows no lock waiters."""


@dataclass
class Gate:
    """The held transaction (``conn``) and, once the block has ended, when it opened."""

    app: tether.App
    conn: Connection
    opened: float = 0.0

    def hold_until_queued(self, racers: int, timeout: float = 10.0) -> None:
        """Return once ``racers`` sessions wait behind the gate; on PostgreSQL that is seen
        (and fails after ``timeout``), on SQLite the racers get a moment to get there."""
        if self.app.store.dialect != "postgresql":
            time.sleep(SETTLE)
            return
        pid = self.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        deadline = time.monotonic() + timeout
        while (queued := self.queued(pid)) < racers:
            assert time.monotonic() < deadline, f"{queued} of {racers} racers reached the gate"
            time.sleep(0.005)

    def queued(self, pid: int) -> int:
        """How many PostgreSQL sessions wait for a lock the session ``pid`` holds, directly or
        behind another waiter."""
        with self.app.store.db.read() as conn:
            waiting = conn.execute(
                text(
                    "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock'"
                )
            ).all()
        behind = {pid}
        grew = True
        while grew:
            grew = False
            for waiter, blockers in waiting:
                if waiter not in behind and behind & set(blockers):
                    behind.add(waiter)
                    grew = True
        return len(behind) - 1


@contextmanager
def gate(app: tether.App, ids: Sequence[str], table: Table = agents) -> Iterator[Gate]:
    """Hold these rows of ``table`` (agents by default; by primary key) and on SQLite the
    write lock until the block ends; then commit, which opens the gate (``Gate.opened``,
    wall-clock, is taken just before)."""
    [key] = table.primary_key.columns
    with app.store.db.write() as conn:
        conn.execute(select(key).where(key.in_(ids)).with_for_update())
        held = Gate(app, conn)
        yield held
        held.opened = time.time()


def assert_all_inside(opened: float, racers: Sequence[dict[str, Any]]) -> None:
    """Fail unless every racer's call (wall-clock ``started`` to ``finished``) spans the
    moment the gate opened: then all of them were inside their calls at once."""
    late = [r for r in racers if not r["started"] < opened < r["finished"]]
    assert not late, f"racers not inside their calls when the gate opened at {opened}: {late}"
