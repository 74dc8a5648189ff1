"""``tether agents ...``: create agents, move them through their lifecycle, read them."""

from __future__ import annotations

from typing import Any

import click

from tether.agent import HOOKS
from tether.cli.common import (
    JSON_OBJECT,
    CliState,
    Column,
    OrderedGroup,
    Row,
    compact_json,
    dump_json,
    emit,
    emit_one,
    limit_option,
    output_option,
    pass_state,
    warn,
)
from tether.lifecycle import TRANSITIONS, LifecycleState, Transition

AGENT_COLUMNS: list[Column] = [
    ("agent", "agent_id"),
    ("type", "type"),
    ("lifecycle", "lifecycle"),
    ("version", "version"),
    ("updated", "updated_at"),
]
DIFF_COLUMNS: list[Column] = [("op", "op"), ("path", "path"), ("from", "from"), ("to", "to")]
HISTORY_COLUMNS: list[Column] = [
    ("at", "at"),
    ("action", "action"),
    ("from", "from_state"),
    ("to", "to_state"),
    ("reason", "reason"),
    ("actor", "actor"),
]


@click.group(cls=OrderedGroup)
def agents() -> None:
    """Create agents, move them through their lifecycle, read their state and history."""


@agents.command("list")
@click.option("--type", "type_", metavar="TYPE", help="Only agents of this type.")
@click.option(
    "--lifecycle",
    type=click.Choice([s.value for s in LifecycleState], case_sensitive=False),
    help="Only agents in this lifecycle state.",
)
@limit_option(help="At most this many (oldest first).")
@output_option()
@pass_state
def list_(
    state: CliState, type_: str | None, lifecycle: str | None, limit: int | None, output: str
) -> None:
    """List agents, oldest first."""
    found = state.get_app().list_agents(type=type_, lifecycle=lifecycle, limit=limit)
    emit(found, output, AGENT_COLUMNS, id_key="agent_id")


@agents.command()
@click.argument("agent_id")
@output_option()
@pass_state
def show(state: CliState, agent_id: str, output: str) -> None:
    """Show one agent: lifecycle state, config, state document, version, times."""
    emit_one(state.get_app().get_agent(agent_id), output, id_key="agent_id")


@agents.command()
@click.argument("type_", metavar="TYPE")
@click.argument("agent_id")
@click.option(
    "--config", type=JSON_OBJECT, help="The agent's configuration: a JSON object or @file.json."
)
@click.option("--state", "initial", type=JSON_OBJECT, help="Initial state: a JSON object or @file.")
@click.option("--reason", default="created", show_default=True, help="Recorded in the history.")
@output_option()
@pass_state
def create(
    state: CliState,
    type_: str,
    agent_id: str,
    config: dict[str, Any] | None,
    initial: dict[str, Any] | None,
    reason: str,
    output: str,
) -> None:
    """Create an agent of TYPE called AGENT_ID, in the created state."""
    info = state.get_app().create_agent(type_, agent_id, config, state=initial, reason=reason)
    if output == "table":
        click.echo(f"created agent {info.agent_id} (type {info.type})")
    else:
        emit_one(info, output, id_key="agent_id")


def _transition_command(t: Transition) -> click.Command:
    """A command for one lifecycle action, described from the transition table."""
    sources = ", ".join(s.value for s in LifecycleState if s in t.sources)
    hook = HOOKS.get(t.action)
    summary = f"Move an agent from {sources} to {t.target.value}"
    doc = f"{summary}{f' (runs its {hook} hook)' if hook else ''}."

    @click.argument("agent_id")
    @click.option("--reason", default="", help="Why; recorded in the agent's history.")
    @output_option()
    @pass_state
    def command(state: CliState, agent_id: str, reason: str, output: str) -> None:
        app = state.get_app()
        info = getattr(app, t.action)(agent_id, reason=reason)
        if hook is not None and not state.has_user_app:
            warn(
                f"the {hook} hook of agent type {info.type!r} (if any) did not run because no "
                "--app was given; pass --app module:attr to run your hooks"
            )
        if output == "table":
            click.echo(f"agent {info.agent_id} is now {info.lifecycle.value}")
        else:
            emit_one(info, output, id_key="agent_id")

    command.__doc__ = doc
    return click.command(t.action, short_help=f"{summary}.")(command)


for _transition in TRANSITIONS.values():
    agents.add_command(_transition_command(_transition))


@agents.command()
@click.argument("agent_id")
@output_option(ids=False)
@pass_state
def history(state: CliState, agent_id: str, output: str) -> None:
    """Show every lifecycle transition of an agent: action, from, to, reason, actor, time."""
    entries = state.get_app().agent_history(agent_id)
    emit(entries, output, HISTORY_COLUMNS, title=f"agent {agent_id}")


@agents.command("state")
@click.argument("agent_id")
@click.option("--version", type=click.IntRange(min=1), help="An earlier version of the state.")
@click.option(
    "--diff",
    "other",
    type=click.IntRange(min=1),
    metavar="V2",
    help="Show what changed from --version (default: the current one) to version V2.",
)
@output_option(ids=False)
@pass_state
def state_(
    state: CliState, agent_id: str, version: int | None, other: int | None, output: str
) -> None:
    """Print an agent's state document (JSON), now or at an earlier --version.

    With --diff V2, print the operations turning that version into version V2 instead:
    add, remove or replace, at a JSON pointer path, with the values before and after.
    """
    app = state.get_app()
    if other is None:
        doc = app.get_state(agent_id, version).state
        click.echo(compact_json(doc) if output == "jsonl" else dump_json(doc))
        return
    start = app.get_agent(agent_id).version if version is None else version
    ops = app.state_diff(agent_id, start, other)
    if output != "table":
        emit([Row(op) for op in ops], output, DIFF_COLUMNS)
        return
    if not ops:
        click.echo(f"versions {start} and {other} of agent {agent_id}'s state are equal", err=True)
        return
    rows = [
        Row({**op, **{k: compact_json(op[k]) if k in op else "" for k in ("from", "to")}})
        for op in ops
    ]
    emit(rows, "table", DIFF_COLUMNS, title=f"agent {agent_id}: version {start} -> {other}")
