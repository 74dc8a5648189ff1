"""``tether messages ...``: send a message to an agent (or publish to a topic), list messages,
and manage subscriptions."""

from __future__ import annotations

from typing import Any

import click

from tether.cli.common import (
    CliState,
    Column,
    JsonParam,
    OrderedGroup,
    emit,
    limit_option,
    output_option,
    pass_state,
)

MESSAGE_COLUMNS: list[Column] = [
    ("message", "message_id"),
    ("to", "recipient"),
    ("topic", "topic"),
    ("from", "sender_agent"),
    ("payload", "payload"),
    ("sent", "created_at"),
    ("consumed by", "consumed_by"),
]


@click.group(cls=OrderedGroup)
def messages() -> None:
    """Durable messages between agents: send, publish, list, subscribe."""


@messages.command()
@click.argument("agent_id", metavar="AGENT")
@click.argument("payload", type=JsonParam(), required=False)
@click.option("--topic", help="The topic to send it on (a run receives it with that topic).")
@click.option("--key", help="Idempotency key: a repeat with the same key stores nothing new.")
@pass_state
def send(state: CliState, agent_id: str, payload: Any, topic: str | None, key: str | None) -> None:
    """Send PAYLOAD (JSON, or @file.json) to AGENT; prints the message id."""
    click.echo(state.get_app().send(agent_id, payload, topic=topic, key=key, sender=None))


@messages.command()
@click.argument("topic")
@click.argument("payload", type=JsonParam(), required=False)
@click.option("--key", help="Idempotency key: a repeat with the same key stores nothing new.")
@pass_state
def publish(state: CliState, topic: str, payload: Any, key: str | None) -> None:
    """Send one copy of PAYLOAD to every agent subscribed to TOPIC; prints the message ids."""
    ids = state.get_app().publish(topic, payload, key=key)
    for message_id in ids:
        click.echo(message_id)
    click.echo(f"{len(ids)} subscriber(s) of {topic}", err=True)


@messages.command("list")
@click.option("--agent", "agent_id", metavar="AGENT", help="Only messages to this agent.")
@click.option("--topic", help="Only messages on this topic.")
@click.option("--pending", is_flag=True, help="Only messages not consumed yet.")
@limit_option()
@output_option()
@pass_state
def list_(
    state: CliState,
    agent_id: str | None,
    topic: str | None,
    pending: bool,
    limit: int | None,
    output: str,
) -> None:
    """List messages, newest first."""
    found = state.get_app().messages(agent_id=agent_id, topic=topic, pending=pending, limit=limit)
    emit(found, output, MESSAGE_COLUMNS, id_key="message_id")


@messages.command()
@click.argument("agent_id", metavar="AGENT")
@click.argument("topic")
@pass_state
def subscribe(state: CliState, agent_id: str, topic: str) -> None:
    """Subscribe AGENT to TOPIC: it gets a copy of what is published from now on."""
    new = state.get_app().subscribe(agent_id, topic)
    click.echo(f"{agent_id} {'is now' if new else 'was already'} subscribed to {topic}", err=True)


@messages.command()
@click.argument("agent_id", metavar="AGENT")
@click.argument("topic")
@pass_state
def unsubscribe(state: CliState, agent_id: str, topic: str) -> None:
    """End AGENT's subscription to TOPIC."""
    gone = state.get_app().unsubscribe(agent_id, topic)
    click.echo(
        f"{agent_id} {'is no longer' if gone else 'was not'} subscribed to {topic}", err=True
    )
