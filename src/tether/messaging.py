"""Messages between agents, from inside a run: send, publish, receive.

A message sent from a run is written in the same transaction as the journal entry that sends
it, so replay never sends it twice; its key defaults to the run and journal position, and a
second send with a key already used for that recipient stores nothing new. ``receive`` takes
the oldest unconsumed message of the agent on a topic (FIFO per recipient and topic) in the
transaction that journals it: exactly once, however many workers race; when there is none the
run parks on the general wait, holding nothing, until a message arrives or its timeout.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tether import codec
from tether.errors import ConfigurationError
from tether.vocabulary import StepKind

if TYPE_CHECKING:
    from tether.engine.executor import Execution

NAME_LENGTH = 255


@dataclass(frozen=True)
class Message:
    """A message as a run receives it."""

    message_id: str
    recipient: str
    topic: str | None
    """``None`` for a message sent to the agent directly; else the topic it was sent on."""
    payload: Any
    sender_agent: str | None
    """The agent whose run sent it; ``None`` when it came from outside a run."""
    sender_run: str | None
    sent_at: dt.datetime | None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Message:
        """The record from its journaled form."""
        sent = doc.get("sent_at")
        return cls(
            message_id=doc["message_id"],
            recipient=doc["recipient"],
            topic=doc.get("topic") or None,
            payload=doc.get("payload"),
            sender_agent=doc.get("sender_agent"),
            sender_run=doc.get("sender_run"),
            sent_at=dt.datetime.fromisoformat(sent.replace("Z", "+00:00")) if sent else None,
        )


def topic_of(topic: str | None) -> str:
    """The stored form of a topic: ``''`` for a direct message."""
    if topic is None:
        return ""
    codec.check_text("topic", topic, NAME_LENGTH)
    if not topic.strip():
        raise ConfigurationError("a topic must be a non-empty name (or None for direct messages)")
    return topic


def send(ex: Execution, to: str, payload: Any, topic: str | None, key: str | None) -> str:
    """``ctx.send``: returns the message id (the first one's, for a key used before)."""
    codec.check_text("recipient", to, NAME_LENGTH)
    stored_topic = topic_of(topic)
    doc = codec.check(payload, "payload")
    if key is not None:
        codec.check_text("key", key, NAME_LENGTH)
    if ex.guard is not None:
        from tether.policies import check_recipient

        check_recipient(ex, to)

    from tether.journal import Outgoing

    def build(seq: int) -> dict[str, Any]:
        the_key = key or f"{ex.run_id}:{seq}"
        return {"output": None, "outgoing": [Outgoing(seq, to, stored_topic, the_key, doc)]}

    return str(ex.journal_write(to, StepKind.SEND, build))


def publish(ex: Execution, topic: str, payload: Any, key: str | None) -> int:
    """``ctx.publish``: one copy to every agent subscribed to ``topic`` now; returns how many."""
    if topic is None:
        raise ConfigurationError("publish needs a topic")
    stored_topic = topic_of(topic)
    doc = codec.check(payload, "payload")

    from tether.journal import Outgoing

    def build(seq: int) -> dict[str, Any]:
        the_key = key or f"{ex.run_id}:{seq}"
        return {"output": 0, "outgoing": [Outgoing(seq, None, stored_topic, the_key, doc)]}

    return int(ex.journal_write(topic, StepKind.PUBLISH, build))


def receive(ex: Execution, topic: str | None, timeout: float | None) -> Message | None:
    """``ctx.receive``: the oldest message of the topic for this agent, or None on timeout."""
    if timeout is not None and timeout < 0:
        raise ConfigurationError(f"receive timeout must not be negative, got {timeout}")
    stored_topic = topic_of(topic)
    alternatives = (("message", stored_topic),)
    outcome = ex.settle(stored_topic or "*", StepKind.RECEIVE, alternatives, timeout)
    if outcome.get("timeout"):
        return None
    return Message.from_dict(outcome["message"])
