"""The SQL of messages and delegation, run inside a run's fenced write (or an App's write): send,
publish, consume, start child runs, cancel a subtree, and wake the runs waiting for what
happened. Spelled once per dialect; executed on a DBAPI cursor, or through SQLAlchemy's
``exec_driver_sql`` from the store's other queries (the same placeholders).

Lock order (see docs/architecture.md): a write that sends to an agent, or consumes from it,
locks that agent's row first (PostgreSQL), so a receiver deciding to wait and a sender looking
for a waiting receiver take turns; a parent deciding to wait for children reads their rows
``FOR SHARE`` before it locks its own, so a child that ends meanwhile sees the parent's wait.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.engine import Connection, CursorResult

from tether import run_status
from tether.errors import ConfigurationError, NotFound, Refused
from tether.lifecycle import LifecycleState
from tether.store.common import new_id
from tether.store.schema import json_text
from tether.types import FINAL_RUN_STATUSES, RunStatus
from tether.vocabulary import EventType, WaitKind

MAX_DEPTH = 64
"""Deepest delegation chain: a run this many levels below its root cannot start a child (a
chain this deep is almost always an agent calling itself back without end)."""

FINAL = run_status.sql_list(sorted(s.value for s in FINAL_RUN_STATUSES))
LIVE = run_status.sql_list(run_status.sources("cancel"))


class DriverCursor:
    """A DBAPI-cursor face over a SQLAlchemy connection, for ``store.coordination``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.result: CursorResult[Any] | None = None

    def execute(self, statement: str, params: Iterable[Any] = ()) -> None:
        self.result = self.conn.exec_driver_sql(statement, tuple(params))

    def fetchone(self) -> Any:
        assert self.result is not None
        return self.result.fetchone()

    def fetchall(self) -> list[Any]:
        assert self.result is not None
        return list(self.result.fetchall())

    @property
    def rowcount(self) -> int:
        assert self.result is not None
        return int(self.result.rowcount)


class CoordinationSql:
    """The statements, for one dialect (``?`` on SQLite, ``%s`` on PostgreSQL)."""

    def __init__(self, pg: bool) -> None:
        self.pg = pg
        p = "%s" if pg else "?"
        j = "CAST(%s AS jsonb)" if pg else "?"
        self.p = p
        self.agent = f"SELECT lifecycle, type FROM agents WHERE agent_id = {p}"
        self.lock_agent = f"SELECT 1 FROM agents WHERE agent_id = {p} FOR NO KEY UPDATE"
        self.subscribers = (
            f"SELECT s.agent_id FROM subscriptions s JOIN agents a ON a.agent_id = s.agent_id "
            f"WHERE s.topic = {p} AND a.lifecycle <> '{LifecycleState.TERMINATED.value}' "
            "ORDER BY s.agent_id"
        )
        conflict = "ON CONFLICT (recipient, key) DO NOTHING"
        self.insert_message = (
            "INSERT INTO messages (message_id, recipient, topic, key, payload, sender_agent, "
            f"sender_run, created_at) VALUES ({p}, {p}, {p}, {p}, {j}, {p}, {p}, {p}) {conflict} "
            "RETURNING seq"
        )
        self.message_by_key = (
            f"SELECT message_id, seq FROM messages WHERE recipient = {p} AND key = {p}"
        )
        lock = " FOR UPDATE SKIP LOCKED" if pg else ""
        self.oldest = (
            "SELECT seq, message_id, topic, payload, sender_agent, sender_run, created_at "
            f"FROM messages WHERE recipient = {p} AND topic = {p} AND consumed_by IS NULL "
            f"ORDER BY seq LIMIT 1{lock}"
        )
        self.consume = (
            f"UPDATE messages SET consumed_by = {p}, consumed_seq = {p}, consumed_at = {p} "
            f"WHERE seq = {p} AND consumed_by IS NULL"
        )
        waiting = RunStatus.WAITING.value
        woken = run_status.target("wake")
        # The oldest run waiting for (kind, key), or all of them: the woken run's waits are
        # withdrawn; a paused one keeps its status (and is claimable once resumed).
        self.waiting_for = (
            "SELECT w.run_id FROM waits w JOIN runs r ON r.run_id = w.run_id "
            f"WHERE w.kind = {p} AND w.key = {p} ORDER BY w.created_at, w.run_id"
        )
        self.wake_run = (
            f"UPDATE runs SET status = CASE WHEN status = '{waiting}' THEN '{woken}' "
            f"ELSE status END, updated_at = {p} WHERE run_id = {p}"
        )
        self.withdraw = f"DELETE FROM waits WHERE run_id = {p}"
        self.insert_child = (
            "INSERT INTO runs (run_id, agent_id, task_id, input, status, attempts, priority, "
            "max_concurrent, parent_run_id, fence, detached, limits, created_at, updated_at) "
            f"SELECT {p}, {p}, {p}, {j}, '{RunStatus.PENDING.value}', 0, {p}, "
            "COALESCE((SELECT t.max_concurrent_runs FROM agent_types t WHERE t.type = a.type), "
            f"1), {p}, 0, {p}, {j}, {p}, {p} FROM agents a WHERE a.agent_id = {p}"
        )
        # A message no waiting receive takes starts a run of a mailbox type (on_message),
        # the message consumed by that run, in the send's transaction.
        self.insert_mailbox_run = (
            "INSERT INTO runs (run_id, agent_id, input, status, attempts, priority, "
            "max_concurrent, fence, message_seq, created_at, updated_at) "
            f"SELECT {p}, a.agent_id, {j}, '{RunStatus.PENDING.value}', 0, 0, "
            f"t.max_concurrent_runs, 0, {p}, {p}, {p} FROM agents a JOIN agent_types t "
            f"ON t.type = a.type WHERE a.agent_id = {p} AND t.mailbox"
        )
        self.chain = (
            "WITH RECURSIVE up(run_id, agent_id, parent_run_id, depth) AS ("
            f"SELECT run_id, agent_id, parent_run_id, 0 FROM runs WHERE run_id = {p} "
            "UNION ALL SELECT r.run_id, r.agent_id, r.parent_run_id, up.depth + 1 FROM runs r "
            f"JOIN up ON r.run_id = up.parent_run_id WHERE up.depth < {MAX_DEPTH + 1}) "
            "SELECT agent_id FROM up ORDER BY depth DESC"
        )
        share = " FOR SHARE" if pg else ""
        self.children = (
            "SELECT run_id, agent_id, status, result, error, parent_run_id FROM runs "
            "WHERE run_id IN ({marks}) ORDER BY run_id" + share
        )
        self.subtree = (
            "WITH RECURSIVE tree(run_id) AS ("
            f"SELECT run_id FROM runs WHERE parent_run_id = {p} AND NOT detached "
            "UNION ALL SELECT r.run_id FROM runs r JOIN tree ON r.parent_run_id = tree.run_id "
            f"WHERE NOT r.detached) SELECT r.run_id, r.agent_id FROM runs r JOIN tree "
            f"ON tree.run_id = r.run_id WHERE r.status IN {LIVE} ORDER BY r.run_id"
        )
        self.cancel_run = (
            f"UPDATE runs SET status = '{RunStatus.CANCELLED.value}', finished_at = {p}, "
            f"updated_at = {p}, error = {j} WHERE run_id = {p} AND status IN {LIVE}"
        )
        self.insert_event = (
            f"INSERT INTO events (run_id, agent_id, type, data, at) VALUES ({p}, {p}, {p}, {j}, "
            f"{p})"
        )
        self.notify = "NOTIFY tether_runs"

    def marks(self, count: int) -> str:
        """``count`` placeholders."""
        return ", ".join([self.p] * count)


def check_recipient(cur: Any, sql: CoordinationSql, agent_id: str) -> None:
    """Refuse a message to an agent that does not exist or is terminated."""
    cur.execute(sql.agent, (agent_id,))
    row = cur.fetchone()
    if row is None:
        raise NotFound(
            "agent", agent_id, "a message needs an existing recipient; see: tether agents list"
        )
    if row[0] == LifecycleState.TERMINATED.value:
        raise Refused(
            f"agent {agent_id} is terminated: it receives no messages any more; send to another"
        )


def check_child_agent(cur: Any, sql: CoordinationSql, agent_id: str, run_id: str) -> None:
    """Refuse a child run on an agent that cannot start runs, or one level too deep."""
    cur.execute(sql.agent, (agent_id,))
    row = cur.fetchone()
    if row is None:
        raise NotFound(
            "agent", agent_id, "a child run needs an existing agent; see: tether agents list"
        )
    if row[0] != LifecycleState.ACTIVE.value:
        raise Refused(
            f"agent {agent_id} is {row[0]}; only an active agent starts runs. Activate it "
            f"first: tether agents activate {agent_id}"
        )
    cur.execute(sql.chain, (run_id,))
    chain = [r[0] for r in cur.fetchall()]
    if len(chain) >= MAX_DEPTH:
        shown = " -> ".join([*chain[:3], "...", *chain[-3:], agent_id])
        raise ConfigurationError(
            f"run {run_id} is {len(chain)} levels below its root; a child on {agent_id} would "
            f"go past the limit of {MAX_DEPTH}: {shown}. An agent that delegates back to the "
            "agents that called it needs a way to stop"
        )


def lock_agents(cur: Any, sql: CoordinationSql, agent_ids: Sequence[str]) -> None:
    """PostgreSQL: lock these agents' rows, in id order (the lock order: agents first)."""
    if sql.pg:
        for agent_id in sorted(set(agent_ids)):
            cur.execute(sql.lock_agent, (agent_id,))


def recipients(cur: Any, sql: CoordinationSql, recipient: str | None, topic: str) -> list[str]:
    """Who a message goes to: its recipient, or the topic's subscribers now."""
    if recipient is not None:
        return [recipient]
    cur.execute(sql.subscribers, (topic,))
    return [r[0] for r in cur.fetchall()]


def send(
    cur: Any,
    sql: CoordinationSql,
    *,
    recipient: str,
    topic: str,
    key: str,
    payload: Any,
    sender_agent: str | None,
    sender_run: str | None,
    at: Any,
) -> tuple[str, bool, bool]:
    """Store one message (nothing new if its key was used for this recipient) and wake the
    oldest run waiting for a message of this topic, or else start a run of the recipient's
    mailbox. Returns its id, whether it is new, and whether a run became runnable."""
    message_id = new_id("msg")
    cur.execute(
        sql.insert_message,
        (message_id, recipient, topic, key, json_text(payload), sender_agent, sender_run, at),
    )
    stored = cur.fetchone()
    if stored is None:
        cur.execute(sql.message_by_key, (recipient, key))
        return str(cur.fetchone()[0]), False, False
    if not wake(cur, sql, WaitKind.MESSAGE, message_key(recipient, topic), at, first=True):
        message = {
            "message_id": message_id,
            "recipient": recipient,
            "topic": topic or None,
            "payload": payload,
            "sender_agent": sender_agent,
            "sender_run": sender_run,
            "sent_at": _iso(at),
        }
        return message_id, True, _start_mailbox_run(cur, sql, message, stored[0], at)
    return message_id, True, True


def _start_mailbox_run(
    cur: Any, sql: CoordinationSql, message: dict[str, Any], seq: int, at: Any
) -> bool:
    """If the recipient's type has a mailbox (``on_message``), start a run of it for this
    message (``seq``), which the run consumes now (at its journal position 0)."""
    run_id = new_id("run")
    agent_id = message["recipient"]
    cur.execute(
        sql.insert_mailbox_run, (run_id, json_text({**message, "seq": seq}), seq, at, at, agent_id)
    )
    if cur.rowcount != 1:
        return False  # no mailbox: the message waits for a receive
    cur.execute(sql.consume, (run_id, 0, at, seq))
    data = {"message_id": message["message_id"], "mailbox": True}
    cur.execute(
        sql.insert_event, (run_id, agent_id, EventType.RUN_SUBMITTED.value, json_text(data), at)
    )
    if sql.pg:
        cur.execute(sql.notify)
    return True


def message_key(agent_id: str, topic: str) -> str:
    """The key of a wait for a message of ``topic`` to ``agent_id``."""
    return agent_id + "\x1f" + topic


def wake(
    cur: Any, sql: CoordinationSql, kind: WaitKind, key: str, at: Any, *, first: bool = False
) -> list[str]:
    """Wake the runs waiting for (``kind``, ``key``) (only the oldest with ``first``): their
    waits are withdrawn and a waiting one is runnable again; replay looks again."""
    cur.execute(sql.waiting_for, (kind.value, key))
    found = [r[0] for r in cur.fetchall()]
    woken = found[:1] if first else found
    for run_id in woken:
        cur.execute(sql.wake_run, (at, run_id))
        cur.execute(sql.withdraw, (run_id,))
        cur.execute(
            sql.insert_event,
            (run_id, None, EventType.RUN_WOKEN.value, json_text({"kind": kind.value}), at),
        )
    if woken and sql.pg:
        cur.execute(sql.notify)
    return woken


def consume(
    cur: Any, sql: CoordinationSql, agent_id: str, topic: str, run_id: str, seq: int, at: Any
) -> dict[str, Any] | None:
    """Take the oldest unconsumed message of ``topic`` for ``agent_id``, for this run's
    journal position ``seq``; None when there is none."""
    cur.execute(sql.oldest, (agent_id, topic))
    row = cur.fetchone()
    if row is None:
        return None
    seq_, message_id, topic_, payload, sender_agent, sender_run, created_at = row
    cur.execute(sql.consume, (run_id, seq, at, seq_))
    if cur.rowcount != 1:  # taken meanwhile (SQLite serializes writers: not expected)
        return None
    return {
        "message_id": message_id,
        "seq": seq_,
        "recipient": agent_id,
        "topic": topic_ or None,
        "payload": _json(payload, sql.pg),
        "sender_agent": sender_agent,
        "sender_run": sender_run,
        "sent_at": _iso(created_at),
    }


def start_child(
    cur: Any,
    sql: CoordinationSql,
    *,
    run_id: str,
    agent_id: str,
    task: Any,
    task_id: str | None,
    priority: int,
    parent_run_id: str,
    detached: bool,
    limits: dict[str, Any] | None,
    at: Any,
) -> None:
    """Insert a pending child run (its agent's concurrency from ``agent_types``)."""
    cur.execute(
        sql.insert_child,
        (run_id, agent_id, task_id, json_text(task), priority, parent_run_id, detached,
         json_text(limits or None), at, at, agent_id),
    )  # fmt: skip
    data = {"task_id": task_id, "priority": priority, "parent_run_id": parent_run_id}
    if detached:
        data["detached"] = True
    cur.execute(
        sql.insert_event, (run_id, agent_id, EventType.RUN_SUBMITTED.value, json_text(data), at)
    )


def children(cur: Any, sql: CoordinationSql, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """These runs' statuses and outcomes (read ``FOR SHARE`` on PostgreSQL)."""
    if not run_ids:
        return {}
    cur.execute(sql.children.format(marks=sql.marks(len(run_ids))), tuple(run_ids))
    return {
        run_id: {
            "run_id": run_id,
            "agent_id": agent_id,
            "status": status,
            "result": _json(result, sql.pg),
            "error": _json(error, sql.pg),
            "parent_run_id": parent,
        }
        for run_id, agent_id, status, result, error, parent in cur.fetchall()
    }


def cancel_subtree(cur: Any, sql: CoordinationSql, run_id: str, reason: str, at: Any) -> list[str]:
    """Cancel the live runs below ``run_id`` that are attached to it (children, their
    children, ...); their waits are withdrawn. Returns their ids."""
    cur.execute(sql.subtree, (run_id,))
    found = cur.fetchall()
    error = json_text({"type": "Cancelled", "message": reason})
    for child_id, agent_id in found:
        cur.execute(sql.cancel_run, (at, at, error, child_id))
        cur.execute(sql.withdraw, (child_id,))
        cur.execute(
            sql.insert_event,
            (child_id, agent_id, EventType.RUN_CANCELLED.value, json_text({"reason": reason}), at),
        )
    return [r[0] for r in found]


def _json(value: Any, pg: bool) -> Any:
    if pg or value is None:
        return value
    import json

    return json.loads(value)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromtimestamp(value, dt.UTC)
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
