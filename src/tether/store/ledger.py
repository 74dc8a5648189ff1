"""The SQL of the budget ledger: limits, what was used of them, and reservations.

A run with a budget has one ``ledger`` row per limit. Every step of that run or of a run below
it is charged (``settle``) in the step's own transaction, so the ledger is exact after any
crash and a replay charges nothing again. Where other runs spend against the same budget (a
delegation tree), a step first ``reserve``s its declared usage against its run's budget and
every ancestor's in one transaction, which takes the ledger rows' locks (in key order on
PostgreSQL; BEGIN IMMEDIATE on SQLite) so concurrent children see each other's reservations.

Lock order (see docs/architecture.md): ledger rows are taken after every run row of the same
transaction (a step's fence, a wake-up), never before one.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tether.limits import Limit, describe_limit, field_name
from tether.store.schema import json_text
from tether.types import FINAL_RUN_STATUSES
from tether.vocabulary import EventType


class LedgerSql:
    """The ledger's statements for one dialect."""

    def __init__(self, pg: bool) -> None:
        p = "%s" if pg else "?"
        j = "CAST(%s AS jsonb)" if pg else "?"
        self.pg = pg
        self.p = p
        self.create = (
            "INSERT INTO ledger (run_id, key, max, used, period, recent, action, warn_at, "
            f"updated_at) VALUES ({p}, {p}, {p}, 0, {p}, {j}, {p}, {p}, {p}) "
            "ON CONFLICT (run_id, key) DO NOTHING"
        )
        self._charges: dict[tuple[int, int], str] = {}
        self.greatest = "GREATEST" if pg else "MAX"
        self.set_recent = f"UPDATE ledger SET recent = {j} WHERE run_id = {p} AND key = {p}"
        self.reserve = (
            "INSERT INTO reservations (holder, key, run_id, seq, amount, created_at) "
            f"VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
        )
        self.release_step = f"DELETE FROM reservations WHERE run_id = {p} AND seq = {p}"
        self.release_run = f"DELETE FROM reservations WHERE run_id = {p}"
        self.raise_limit = (
            f"UPDATE ledger SET max = {p}, updated_at = {p} WHERE run_id = {p} AND key = {p} "
            "RETURNING max"
        )

    def marks(self, count: int) -> str:
        return ", ".join([self.p] * count)

    def charge(self, keys: int, holders: int) -> str:
        """Add an amount per key to ``keys`` limits of ``holders`` budgets, in one statement
        (parameters: key and amount per key, the time, the holders, the keys)."""
        found = self._charges.get((keys, holders))
        if found is None:
            amount = f"CAST({self.p} AS double precision)" if self.pg else self.p
            cases = " ".join([f"WHEN {self.p} THEN {amount}"] * keys)
            found = (
                f"UPDATE ledger SET used = used + CASE key {cases} ELSE 0 END, "
                f"synced = CASE WHEN run_id = {self.p} THEN {self.greatest}(synced, {self.p}) "
                f"ELSE synced END, updated_at = {self.p} "
                f"WHERE run_id IN ({self.marks(holders)}) AND key IN ({self.marks(keys)}) "
                "RETURNING run_id, key, used, max, warn_at"
            )
            self._charges[(keys, holders)] = found
        return found

    def sync(self, keys: int) -> str:
        """A run alone with its budget adds its own steps' usage since the last sync (an
        amount per key) and moves ``synced`` on (parameters: key and amount per key, the
        position, the time, the run)."""
        amount = f"CAST({self.p} AS double precision)" if self.pg else self.p
        cases = " ".join([f"WHEN {self.p} THEN {amount}"] * keys)
        added = f"used + CASE key {cases} ELSE 0 END" if keys else "used"
        return (
            f"UPDATE ledger SET used = {added}, synced = {self.greatest}(synced, {self.p}), "
            f"updated_at = {self.p} WHERE run_id = {self.p}"
        )

    def rows(self, count: int, lock: bool) -> str:
        """The ledger rows of ``count`` runs (locked, in key order, on PostgreSQL)."""
        tail = " ORDER BY run_id, key FOR UPDATE" if lock and self.pg else ""
        return (
            "SELECT run_id, key, max, used, period, recent, action, warn_at, synced FROM ledger "
            f"WHERE run_id IN ({self.marks(count)}){tail}"
        )

    def reserved(self, count: int) -> str:
        """What other runs' steps hold reserved against ``count`` budgets, per limit."""
        return (
            "SELECT holder, key, SUM(amount) FROM reservations "
            f"WHERE holder IN ({self.marks(count)}) AND run_id <> {self.p} GROUP BY holder, key"
        )

    def prune(self, count: int) -> str:
        """Reservations against ``count`` budgets left by runs that ended without settling
        them (a crash, then a cancel): nothing will ever settle them."""
        final = ", ".join(f"'{s.value}'" for s in sorted(FINAL_RUN_STATUSES))
        return (
            f"DELETE FROM reservations WHERE holder IN ({self.marks(count)}) AND run_id IN "
            f"(SELECT run_id FROM runs WHERE status IN ({final}))"
        )


def _doc(value: Any, pg: bool) -> Any:
    if pg or value is None:
        return value
    return json.loads(value)


def load(cur: Any, sql: LedgerSql, run_id: str, holders: Sequence[str], lock: bool) -> list[Limit]:
    """The limits of these budgets with what is used and reserved by runs other than
    ``run_id``; ``lock`` takes their rows for a reservation."""
    if not holders:
        return []
    cur.execute(sql.rows(len(holders), lock), tuple(holders))
    rows = cur.fetchall()
    if not rows:
        return []
    cur.execute(sql.reserved(len(holders)), (*holders, run_id))
    held = {(h, k): float(amount or 0) for h, k, amount in cur.fetchall()}
    order = {h: i for i, h in enumerate(holders)}
    found = [
        Limit(
            holder=h,
            key=key,
            max=float(top),
            used=float(used),
            reserved=held.get((h, key), 0.0),
            window=window,
            recent=tuple(_doc(recent, sql.pg) or ()),
            action=action,
            warn_at=warn_at,
            synced=synced,
        )
        for h, key, top, used, window, recent, action, warn_at, synced in rows
    ]
    return sorted(found, key=lambda lim: (order[lim.holder], lim.key))


def lock(cur: Any, sql: LedgerSql, holders: Sequence[str]) -> None:
    """PostgreSQL: lock every ledger row of these budgets, in key order."""
    cur.execute(sql.rows(len(holders), True), tuple(holders))
    cur.fetchall()


def prune(cur: Any, sql: LedgerSql, holders: Sequence[str]) -> int:
    """Drop reservations against these budgets held by runs that ended; how many."""
    cur.execute(sql.prune(len(holders)), tuple(holders))
    return int(cur.rowcount or 0)


def create(
    cur: Any,
    sql: LedgerSql,
    run_id: str,
    limits: Mapping[str, tuple[float, float | None]],
    action: str,
    warn_at: float | None,
    started: float,
    at: Any,
) -> None:
    """The ledger rows of a run's budget (nothing where a row exists: a person may have
    raised it). ``started``: the run's start on the app's clock, for ``max_duration``."""
    for key, (top, window) in sorted(limits.items()):
        recent = [started] if key == "duration" else None
        cur.execute(sql.create, (run_id, key, top, window, json_text(recent), action, warn_at, at))


def reserve(
    cur: Any,
    sql: LedgerSql,
    run_id: str,
    seq: int,
    amounts: Mapping[str, float],
    limits: Iterable[Limit],
    now: float,
    at: Any,
) -> None:
    """Hold ``amounts`` against every budget of ``limits`` (checked, and locked, by the
    caller) for step ``seq`` of ``run_id``; a call of a rated tool is recorded as made now."""
    cur.execute(sql.release_run, (run_id,))  # what an earlier execution of it left
    for limit in limits:
        amount = amounts.get(limit.key)
        if amount is None:
            continue
        if limit.key.startswith("rate:"):
            assert limit.window is not None
            recent = [t for t in limit.recent if t > now - limit.window] + [now]
            cur.execute(sql.set_recent, (json_text(recent), limit.holder, limit.key))
            continue
        if limit.key == "duration":
            continue
        cur.execute(sql.reserve, (limit.holder, limit.key, run_id, seq, amount, at))


def settle(
    cur: Any,
    sql: LedgerSql,
    run_id: str,
    seq: int | None,
    release: str | None,
    holders: Sequence[str],
    usage: Mapping[str, float],
    at: Any,
) -> list[tuple[str, dict[str, Any]]]:
    """Charge ``usage`` to every budget of ``holders`` and drop the step's reservation
    (``release="step"``) or all of the run's (``"run"``); returns the ``budget.warned``
    events of the limits it took past their warning fraction."""
    if release == "run":
        cur.execute(sql.release_run, (run_id,))
    elif release == "step":
        cur.execute(sql.release_step, (run_id, seq))
    events: list[tuple[str, dict[str, Any]]] = []
    keys = [key for key, amount in usage.items() if amount]
    if not keys or not holders:
        return events
    params: list[Any] = []
    for key in keys:
        params += (key, usage[key])
    # The run's own rows count its steps through ``seq`` now (see ``sync``).
    position = seq if seq is not None else 0
    cur.execute(
        sql.charge(len(keys), len(holders)),
        (*params, run_id, position, at, *holders, *keys),
    )
    for holder, key, used, top, warn_at in cur.fetchall():
        amount = usage[key]
        if warn_at is not None and used - amount < warn_at * top <= used:
            data = {
                "holder": holder,
                "limit": describe_limit(key, top),
                "used": round(used, 9),
                "max": top,
            }
            events.append((EventType.BUDGET_WARNED.value, data))
    return events


def sync(
    cur: Any, sql: LedgerSql, run_id: str, usage: Mapping[str, float], synced: int, at: Any
) -> None:
    """Add the run's own usage since its last sync to its budget, through position
    ``synced``."""
    params: list[Any] = []
    keys = [key for key, amount in usage.items() if amount]
    for key in keys:
        params += (key, usage[key])
    cur.execute(sql.sync(len(keys)), (*params, synced, at, run_id))


def raise_limit(
    cur: Any, sql: LedgerSql, holder: str, key: str, value: float, at: Any
) -> float | None:
    """Set a limit of ``holder``'s budget to ``value``; the old maximum, or None if the budget
    has no such limit."""
    cur.execute(sql.rows(1, True).replace("WHERE run_id IN", f"WHERE key = {sql.p} AND run_id IN"),
                (key, holder))  # fmt: skip
    row = cur.fetchone()
    if row is None:
        return None
    cur.execute(sql.raise_limit, (value, at, holder, key))
    return float(row[2])


def when(value: dt.datetime) -> float:
    """A time as the ledger's epoch seconds."""
    return value.timestamp()


def raise_limits(
    cur: Any,
    co: Any,
    holder: str,
    values: Mapping[str, float],
    actor: str,
    at: Any,
    *,
    approval_id: str | None = None,
) -> list[str]:
    """A person sets limits of ``holder``'s budget (by ledger key): each one recorded as a
    ``budget.raised`` event, and every run waiting for that budget woken to try again.
    Returns the woken runs. Raises ``NotFound`` naming the limits the budget has."""
    from tether.errors import NotFound
    from tether.store import coordination
    from tether.vocabulary import WaitKind

    sql = LedgerSql(co.pg)
    cur.execute(sql.rows(1, True), (holder,))
    rows = {row[1]: row for row in cur.fetchall()}
    missing = sorted(set(values) - set(rows))
    if missing:  # refused before anything is written
        known = sorted(describe_limit(key, row[2], row[4]) for key, row in rows.items())
        raise NotFound(
            "budget limit",
            f"{', '.join(field_name(key) for key in missing)} of run {holder}",
            f"its budget has {', '.join(known)}"
            if known
            else "that run has no budget in the ledger (it has no budget, or has not run a "
            "metered step yet)",
        )
    for key, value in sorted(values.items()):
        before = raise_limit(cur, sql, holder, key, value, at)
        data = {
            "holder": holder,
            "limit": describe_limit(key, value),
            "from": before,
            "to": value,
            "actor": actor,
        }
        if approval_id is not None:
            data["approval_id"] = approval_id
        cur.execute(
            co.insert_event, (holder, None, EventType.BUDGET_RAISED.value, json_text(data), at)
        )
    return coordination.wake(cur, co, WaitKind.BUDGET, holder, at)
