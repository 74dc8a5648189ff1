"""The SQL of approvals: a run's write creates one (the request) and parks on it, a person's
decision wakes the run, and the run's next write consumes the decision at the journal position
that asked. A timeout's default is applied by the run's own write when the deadline is due.

Lock order (see docs/architecture.md): the approval's row before the run's, both in a run's
write (the approval is locked before the fence) and in a decision (decided, then the run is
woken), so the two cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from tether import codec
from tether.errors import ConflictError, NotFound, Refused
from tether.store import coordination, ledger, wakeups
from tether.store.common import utcnow
from tether.store.coordination import CoordinationSql, DriverCursor
from tether.store.database import Database
from tether.store.schema import approvals, json_text
from tether.types import ApprovalInfo
from tether.vocabulary import EventType, WaitKind

PENDING = "pending"
WITHDRAWN = "withdrawn"
COLUMNS = (
    "approval_id, run_id, seq, agent_id, kind, title, data, digest, schema, status, decision, "
    "comment, decided_by, decided_at, deadline, created_at, on_timeout, approvers, source, "
    "consumed_at"
)


class ApprovalSql:
    """The statements a run's write issues, for one dialect."""

    def __init__(self, pg: bool) -> None:
        p = "%s" if pg else "?"
        j = "CAST(%s AS jsonb)" if pg else "?"
        self.pg = pg
        self.create = (
            "INSERT INTO approvals (approval_id, run_id, seq, agent_id, kind, title, data, "
            "digest, schema, status, deadline, created_at, on_timeout, approvers, subject) "
            f"VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {j}, {p}, {j}, '{PENDING}', {p}, {p}, {j}, "
            f"{j}, {j}) ON CONFLICT (approval_id) DO NOTHING"
        )
        lock = " FOR UPDATE" if pg else ""
        self.row = (
            "SELECT status, decision, digest, on_timeout, consumed_at FROM approvals "
            f"WHERE approval_id = {p}{lock}"
        )
        self.expire = (
            f"UPDATE approvals SET status = {p}, decision = {j}, source = 'timeout', "
            f"decided_at = {p} WHERE approval_id = {p} AND status = '{PENDING}'"
        )
        self.withdraw = (
            f"UPDATE approvals SET status = '{WITHDRAWN}', decided_at = {p} "
            f"WHERE run_id = {p} AND status = '{PENDING}' RETURNING approval_id, agent_id"
        )
        self.consume = (
            f"UPDATE approvals SET consumed_at = {p} WHERE approval_id = {p} "
            "AND consumed_at IS NULL"
        )


def create(
    cur: Any,
    sql: ApprovalSql,
    co: CoordinationSql,
    *,
    approval_id: str,
    run_id: str,
    seq: int,
    agent_id: str,
    request: dict[str, Any],
    deadline: Any,
    at: Any,
) -> None:
    """Insert the approval a run asks for (nothing if this write was already made)."""
    cur.execute(
        sql.create,
        (
            approval_id,
            run_id,
            seq,
            agent_id,
            request["kind"],
            request["title"],
            json_text(request.get("data")),
            request["digest"],
            json_text(request.get("schema")),
            deadline,
            at,
            json_text(request.get("on_timeout")),
            json_text(request.get("approvers")),
            json_text(request.get("subject")),
        ),
    )
    if cur.rowcount == 1:
        data = {
            "approval_id": approval_id,
            "kind": request["kind"],
            "title": request["title"],
            "digest": request["digest"],
            "deadline": coordination._iso(deadline),
            "on_timeout": request.get("on_timeout"),
            "approvers": request.get("approvers"),
        }
        if request.get("subject"):
            data["subject"] = request["subject"]
        cur.execute(
            co.insert_event,
            (run_id, agent_id, EventType.APPROVAL_REQUESTED.value, json_text(data), at),
        )


def withdraw(cur: Any, co: CoordinationSql, run_ids: Sequence[str], at: Any) -> None:
    """The pending approvals of these runs, which ended (cancelled, failed) before anyone
    decided: withdrawn, so nobody decides what no run will take."""
    sql = ApprovalSql(co.pg)
    for run_id in run_ids:
        cur.execute(sql.withdraw, (at, run_id))
        for approval_id, agent_id in cur.fetchall():
            data = json_text({"approval_id": approval_id})
            event = EventType.APPROVAL_WITHDRAWN.value
            cur.execute(co.insert_event, (run_id, agent_id, event, data, at))


def lock(cur: Any, sql: ApprovalSql, approval_id: str) -> tuple[Any, ...] | None:
    """The approval's row (locked on PostgreSQL): status, decision, digest, on_timeout,
    consumed_at."""
    cur.execute(sql.row, (approval_id,))
    row = cur.fetchone()
    return None if row is None else tuple(row)


def take(
    cur: Any,
    sql: ApprovalSql,
    co: CoordinationSql,
    row: tuple[Any, ...],
    *,
    approval_id: str,
    run_id: str,
    seq: int,
    due: bool,
    at: Any,
) -> dict[str, Any] | None:
    """The decision for the run to journal, consumed now; None while the approval is pending
    and its deadline not due. A due pending one gets its default, recorded as a timeout."""
    status, decision, _digest, on_timeout, _consumed = row
    decision = coordination._json(decision, sql.pg)
    if status == PENDING:
        if not due:
            return None
        fallback = coordination._json(on_timeout, sql.pg) or {"approved": False, "data": None}
        decision = {
            "approved": bool(fallback.get("approved")),
            "data": fallback.get("data"),
            "edited": False,
            "comment": None,
            "decided_by": None,
            "decided_at": coordination._iso(at),
            "source": "timeout",
        }
        status = _status(decision["approved"], fallback.get("kind", "approve"))
        cur.execute(sql.expire, (status, json_text(decision), at, approval_id))
        data = {"approval_id": approval_id, "approved": decision["approved"]}
        cur.execute(
            co.insert_event, (run_id, None, EventType.APPROVAL_EXPIRED.value, json_text(data), at)
        )
    cur.execute(sql.consume, (at, approval_id))
    if cur.rowcount == 1:
        data = {"approval_id": approval_id, "seq": seq}
        cur.execute(
            co.insert_event, (run_id, None, EventType.APPROVAL_CONSUMED.value, json_text(data), at)
        )
    return {**decision, "approval_id": approval_id, "digest": row[2]}


def _status(approved: bool, kind: str) -> str:
    if kind == "ask":
        return "answered" if approved else "rejected"
    return "approved" if approved else "rejected"


def info(row: Any) -> ApprovalInfo:
    """An approval as the API shows it."""
    m = row._mapping
    decision = m["decision"] or {}
    return ApprovalInfo(
        approval_id=m["approval_id"],
        run_id=m["run_id"],
        seq=m["seq"],
        agent_id=m["agent_id"],
        kind=m["kind"],
        title=m["title"],
        data=m["data"],
        digest=m["digest"],
        schema=m["schema"],
        status=m["status"],
        approved=decision.get("approved") if m["status"] != PENDING else None,
        decided_data=decision.get("data"),
        edited=bool(decision.get("edited")),
        comment=m["comment"],
        decided_by=m["decided_by"],
        decided_at=m["decided_at"],
        source=m["source"],
        deadline=m["deadline"],
        on_timeout=m["on_timeout"],
        approvers=m["approvers"],
        created_at=m["created_at"],
        consumed_at=m["consumed_at"],
        subject=m["subject"],
    )


class ApprovalQueries:
    """Approvals outside a run: the inbox and decisions."""

    db: Database

    def list_approvals(
        self,
        *,
        status: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = 100,
    ) -> list[ApprovalInfo]:
        """Approvals, newest first."""
        query = select(approvals).order_by(approvals.c.created_at.desc(), approvals.c.approval_id)
        if status is not None:
            query = query.where(approvals.c.status == status)
        if agent_id is not None:
            query = query.where(approvals.c.agent_id == agent_id)
        if run_id is not None:
            query = query.where(approvals.c.run_id == run_id)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [info(r) for r in conn.execute(query)]

    def get_approval(self, approval_id: str) -> ApprovalInfo:
        with self.db.read() as conn:
            row = conn.execute(
                select(approvals).where(approvals.c.approval_id == approval_id)
            ).first()
        if row is None:
            raise NotFound("approval", approval_id, "list them with: tether approvals list")
        return info(row)

    def decide_approval(
        self,
        approval_id: str,
        *,
        approved: bool,
        comment: str | None,
        actor: str,
        digest: str | None,
        check: Callable[[ApprovalInfo], tuple[Any, bool]],
    ) -> tuple[ApprovalInfo, bool]:
        """Record a person's decision once, and wake the run waiting for it. ``check(info)``
        validates the decision against the approval (raising to refuse) and returns the data
        to store and whether it is an edit. Returns the approval and whether this call
        decided it (False: the same decision was already stored)."""

        def work(conn: Connection) -> tuple[ApprovalInfo, bool]:
            query = select(approvals).where(approvals.c.approval_id == approval_id)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise NotFound("approval", approval_id, "list them with: tether approvals list")
            current = info(row)
            if digest is not None and digest != current.digest:
                raise Refused(
                    f"approval {approval_id} is about data with digest {current.digest[:12]}..., "
                    f"not {digest[:12]}... as this decision says: look at it again "
                    f"(tether approvals show {approval_id}) and decide on what it asks now"
                )
            who = current.approvers
            if who and actor not in who:
                raise Refused(
                    f"{actor} may not decide approval {approval_id}: only "
                    f"{', '.join(who)} may (set by the run that asked)"
                )
            if current.status == WITHDRAWN:
                raise ConflictError(
                    f"approval {approval_id} was withdrawn: run {current.run_id} ended before "
                    "anyone decided, so there is nothing to decide"
                )
            stored, edited = check(current)
            if current.status != PENDING:
                same = (
                    current.source == "human"
                    and current.approved == approved
                    and current.decided_by == actor
                    and codec.canonical(current.decided_data) == codec.canonical(stored)
                )
                if same:
                    return current, False
                how = "by timeout" if current.source == "timeout" else f"by {current.decided_by}"
                raise ConflictError(
                    f"approval {approval_id} was already decided ({current.status} {how} at "
                    f"{coordination._iso(current.decided_at)}); a different decision is refused"
                )
            at = utcnow()
            decision = {
                "approved": approved,
                "data": stored,
                "edited": edited,
                "comment": comment,
                "decided_by": actor,
                "decided_at": coordination._iso(at),
                "source": "human",
            }
            conn.execute(
                approvals.update()
                .where(approvals.c.approval_id == approval_id)
                .values(
                    status=_status(approved, current.kind),
                    decision=decision,
                    comment=comment,
                    decided_by=actor,
                    decided_at=at,
                    source="human",
                )
            )
            cur = DriverCursor(conn)
            moment = at if conn.dialect.name == "postgresql" else at.timestamp()
            event = {
                "approval_id": approval_id,
                "approved": approved,
                "edited": edited,
                "decided_by": actor,
                "digest": current.digest,
                "comment": comment,
            }
            co = self.committer.co  # type: ignore[attr-defined]
            cur.execute(
                co.insert_event,
                (
                    current.run_id,
                    current.agent_id,
                    EventType.APPROVAL_DECIDED.value,
                    json_text(event),
                    moment,
                ),
            )
            woken = coordination.wake(cur, co, WaitKind.APPROVAL, approval_id, moment)
            subject = current.subject or {}
            if approved and subject.get("budget"):
                woken += ledger.raise_limits(
                    cur,
                    co,
                    subject["budget"],
                    {subject["limit"]: float(stored)},
                    actor,
                    moment,
                    approval_id=approval_id,
                )
            if woken:
                wakeups.notify(conn)
            done = conn.execute(
                select(approvals).where(approvals.c.approval_id == approval_id)
            ).first()
            return info(done), True

        return self.db.transact(work)

    def unannounced_approvals(self, limit: int = 50) -> list[ApprovalInfo]:
        """Pending approvals the notification hook has not announced yet, oldest first."""
        query = (
            select(approvals)
            .where(approvals.c.notified_at.is_(None), approvals.c.status == PENDING)
            .order_by(approvals.c.created_at)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [info(r) for r in conn.execute(query)]

    def mark_announced(self, approval_ids: Sequence[str]) -> None:
        """Record that these approvals were announced."""
        if not approval_ids:
            return
        now = utcnow()
        self.db.transact(
            lambda conn: conn.execute(
                approvals.update()
                .where(approvals.c.approval_id.in_(list(approval_ids)))
                .values(notified_at=now)
            )
        )
