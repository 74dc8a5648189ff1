"""Budgets outside a run: usage of a run and its subtree, the ledger's limits, and a person
raising a limit."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from tether.errors import NotFound
from tether.limits import Limit, describe_limit
from tether.store import ledger, wakeups
from tether.store.common import utcnow
from tether.store.coordination import CoordinationSql, DriverCursor
from tether.store.database import Database
from tether.store.schema import runs
from tether.types import LimitInfo, RunUsage, Usage

_SUBTREE = (
    "WITH RECURSIVE tree(run_id, depth) AS (SELECT run_id, 0 FROM runs WHERE run_id = {p} "
    "UNION ALL SELECT r.run_id, tree.depth + 1 FROM runs r JOIN tree "
    "ON r.parent_run_id = tree.run_id WHERE tree.depth < 64) "
    "SELECT r.run_id, r.agent_id, r.status, tree.depth FROM tree JOIN runs r "
    "ON r.run_id = tree.run_id ORDER BY tree.depth, r.created_at, r.run_id"
)
_USAGE = (
    "SELECT s.run_id, SUM(CASE WHEN s.kind = 'step' AND s.status = 'completed' THEN 1 ELSE 0 "
    "END), SUM(s.cost), SUM(s.tokens) FROM steps s JOIN runs r ON r.run_id = s.run_id "
    "WHERE s.run_id IN ({marks}) AND s.seq > COALESCE(r.forked_at_step, 0) GROUP BY s.run_id"
)
_CALLS = (
    "SELECT s.run_id, s.tool, SUM(s.attempts) FROM steps s JOIN runs r ON r.run_id = s.run_id "
    "WHERE s.run_id IN ({marks}) AND s.tool IS NOT NULL AND s.seq > COALESCE(r.forked_at_step, "
    "0) GROUP BY s.run_id, s.tool"
)


def _doc(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_OWN_SINCE = (
    "SELECT SUM(CASE WHEN s.status = 'completed' THEN 1 ELSE 0 END), SUM(s.cost), "
    "SUM(s.tokens) FROM steps s JOIN runs r ON r.run_id = s.run_id WHERE s.run_id = {p} "
    "AND s.kind = 'step' AND s.seq > {p} AND s.seq > COALESCE(r.forked_at_step, 0)"
)
_OWN_CALLS_SINCE = (
    "SELECT s.tool, SUM(s.attempts) FROM steps s JOIN runs r ON r.run_id = s.run_id "
    "WHERE s.run_id = {p} AND s.kind = 'step' AND s.tool IS NOT NULL AND s.seq > {p} "
    "AND s.seq > COALESCE(r.forked_at_step, 0) GROUP BY s.tool"
)


def _with_unsynced(conn: Connection, p: str, limits: list[Limit]) -> list[Limit]:
    """The limits with their holders' own steps since ``synced`` added: a run alone with its
    budget adds them to its rows only when it parks or ends (or a crash stopped it first)."""
    for holder in {lim.holder for lim in limits}:
        since = min(lim.synced for lim in limits if lim.holder == holder)
        steps, cost, tokens = conn.exec_driver_sql(_OWN_SINCE.format(p=p), (holder, since)).one()
        extra = {"steps": float(steps or 0), "cost": float(cost or 0), "tokens": float(tokens or 0)}
        for tool, count in conn.exec_driver_sql(_OWN_CALLS_SINCE.format(p=p), (holder, since)):
            extra[f"calls:{tool}"] = float(count or 0)
        for lim in limits:
            if lim.holder == holder and lim.synced == since:
                lim.used += extra.get(lim.key, 0.0)
    return limits


class BudgetQueries:
    """Usage and limits (``tether runs usage``), and raising a limit (``tether runs budget``)."""

    db: Database

    def run_usage(self, run_id: str) -> RunUsage:
        """The run's usage, its subtree's, and the limits of the budgets it spends against."""
        with self.db.read() as conn:
            row = conn.execute(select(runs.c.limits).where(runs.c.run_id == run_id)).first()
            if row is None:
                raise NotFound("run", run_id, "list runs with: tether runs list")
            given = _doc(row.limits) or {}
            pg = conn.dialect.name == "postgresql"
            p = "%s" if pg else "?"
            tree = conn.exec_driver_sql(_SUBTREE.format(p=p), (run_id,)).all()
            ids = tuple(r[0] for r in tree)
            marks = ", ".join([p] * len(ids))
            usage: dict[str, Usage] = {}
            for rid, count, cost, tokens in conn.exec_driver_sql(
                _USAGE.format(marks=marks), ids
            ).all():
                usage[rid] = Usage(
                    int(count or 0),
                    None if cost is None else float(cost),
                    None if tokens is None else int(tokens),
                )
            for rid, tool, count in conn.exec_driver_sql(_CALLS.format(marks=marks), ids).all():
                usage[rid].calls[tool] = int(count or 0)
            holders = [run_id, *given.get("holders", ())]
            limits = ledger.load(DriverCursor(conn), ledger.LedgerSql(pg), "", holders, False)
            limits = _with_unsynced(conn, p, limits)
        total = Usage()
        for rid in ids:
            total = total + usage.get(rid, Usage())
        return RunUsage(
            run_id=run_id,
            usage=usage.get(run_id, Usage()),
            total=total,
            runs=[
                {
                    "run_id": rid,
                    "agent_id": agent,
                    "status": status,
                    "depth": depth,
                    "usage": usage.get(rid, Usage()).to_dict(),
                }
                for rid, agent, status, depth in tree
            ],
            limits=[
                LimitInfo(
                    holder=lim.holder,
                    limit=describe_limit(lim.key, lim.max, lim.window).partition("=")[0],
                    max=lim.max,
                    used=round(lim.used, 9),
                    reserved=round(lim.reserved, 9),
                    action=lim.action,
                    warn_at=lim.warn_at,
                )
                for lim in limits
            ],
            budget=given.get("budget"),
        )

    def run_limits(self, run_id: str) -> dict[str, Any]:
        """The budget and policy given to the run, and the budgets it spends against."""
        with self.db.read() as conn:
            row = conn.execute(select(runs.c.limits).where(runs.c.run_id == run_id)).first()
        if row is None:
            raise NotFound("run", run_id, "list runs with: tether runs list")
        return dict(_doc(row.limits) or {})

    def raise_budget(self, run_id: str, values: Mapping[str, float], actor: str) -> list[str]:
        """Set limits of the run's budget (by ledger key) and wake the runs waiting for it;
        returns them."""

        def work(conn: Connection) -> list[str]:
            if conn.execute(select(runs.c.run_id).where(runs.c.run_id == run_id)).first() is None:
                raise NotFound("run", run_id, "list runs with: tether runs list")
            pg = conn.dialect.name == "postgresql"
            now = utcnow()
            at = now if pg else now.timestamp()
            cur = DriverCursor(conn)
            woken = ledger.raise_limits(cur, CoordinationSql(pg), run_id, values, actor, at)
            if woken:
                wakeups.notify(conn)
            return woken

        return self.db.transact(work)
