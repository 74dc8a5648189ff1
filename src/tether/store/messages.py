"""Queries for messages from outside a run (App.send, App.publish, subscriptions, listings),
and the wake-ups that changes made by a person owe to waiting runs.

They run the statements of ``store.coordination`` through SQLAlchemy's ``exec_driver_sql``
(same placeholders), so each piece of SQL is written once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from tether.store import approvals, coordination, wakeups
from tether.store.common import utcnow
from tether.store.coordination import DriverCursor
from tether.store.database import Database
from tether.store.schema import agents, messages, subscriptions
from tether.vocabulary import WaitKind


class MessageQueries:
    """Messages and subscriptions, outside a run."""

    db: Database

    @property
    def co(self) -> coordination.CoordinationSql:
        return self.committer.co  # type: ignore[attr-defined,no-any-return]

    def _time(self, value: Any) -> Any:
        return value if self.db.dialect == "postgresql" else value.timestamp()

    def send_message(
        self,
        recipient: str | None,
        topic: str,
        key: str,
        payload: Any,
        sender: str | None,
    ) -> tuple[list[str], bool]:
        """Send to ``recipient`` (or publish to ``topic``'s subscribers when None), in one
        transaction; returns the message ids and whether anything new was stored."""

        def work(conn: Connection) -> tuple[list[str], bool]:
            cur, co = DriverCursor(conn), self.co
            if recipient is not None:
                coordination.check_recipient(cur, co, recipient)
            to = coordination.recipients(cur, co, recipient, topic)
            coordination.lock_agents(cur, co, to)
            at = self._time(utcnow())
            sent = [
                coordination.send(
                    cur,
                    co,
                    recipient=agent_id,
                    topic=topic,
                    key=key,
                    payload=payload,
                    sender_agent=sender,
                    sender_run=None,
                    at=at,
                )
                for agent_id in to
            ]
            if any(runnable for _, _, runnable in sent):
                wakeups.notify(conn)  # a woken receiver or a mailbox run: workers, look
            return [message_id for message_id, _, _ in sent], any(new for _, new, _ in sent)

        return self.db.transact(work)

    def runs_ended(self, conn: Connection, run_ids: Iterable[str], reason: str) -> None:
        """Runs that a person ended (cancelled, aborted, their agent terminated), in ``conn``:
        the children each started are cancelled unless detached, a parent waiting for one is
        woken, and the approvals they were waiting for are withdrawn."""
        cur, at = DriverCursor(conn), self._time(utcnow())
        for run_id in list(run_ids):
            below = coordination.cancel_subtree(cur, self.co, run_id, reason, at)
            coordination.wake(cur, self.co, WaitKind.CHILD, run_id, at)
            approvals.withdraw(cur, self.co, [run_id, *below], at)

    def subscribe(self, agent_id: str, topic: str) -> bool:
        """Subscribe an agent to a topic; False if it already was."""

        def work(conn: Connection) -> bool:
            found = conn.execute(select(agents.c.agent_id).where(agents.c.agent_id == agent_id))
            if found.first() is None:
                from tether.errors import NotFound

                raise NotFound("agent", agent_id, "list agents with: tether agents list")
            try:
                with conn.begin_nested():
                    conn.execute(insert(subscriptions), {"topic": topic, "agent_id": agent_id})
            except IntegrityError:
                return False
            return True

        return self.db.transact(work)

    def unsubscribe(self, agent_id: str, topic: str) -> bool:
        """Stop an agent's subscription to a topic; False if it had none."""

        def work(conn: Connection) -> bool:
            done = conn.execute(
                delete(subscriptions).where(
                    subscriptions.c.agent_id == agent_id, subscriptions.c.topic == topic
                )
            )
            return bool(done.rowcount)

        return self.db.transact(work)

    def subscriptions_of(self, agent_id: str | None = None) -> list[tuple[str, str]]:
        """(agent, topic) pairs, optionally of one agent."""
        query = select(subscriptions.c.agent_id, subscriptions.c.topic).order_by(
            subscriptions.c.agent_id, subscriptions.c.topic
        )
        if agent_id is not None:
            query = query.where(subscriptions.c.agent_id == agent_id)
        with self.db.read() as conn:
            return [(r.agent_id, r.topic) for r in conn.execute(query)]

    def list_messages(
        self,
        agent_id: str | None = None,
        topic: str | None = None,
        pending: bool = False,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Messages, newest first."""
        query = select(messages).order_by(messages.c.seq.desc())
        if agent_id is not None:
            query = query.where(messages.c.recipient == agent_id)
        if topic is not None:
            query = query.where(messages.c.topic == topic)
        if pending:
            query = query.where(messages.c.consumed_by.is_(None))
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
