"""``tether checkpoints ...``: snapshot an agent's state, read snapshots, restore one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from tether.cli.common import (
    CliState,
    Column,
    OrderedGroup,
    Row,
    emit,
    emit_one,
    limit_option,
    output_option,
    pass_state,
)
from tether.errors import Refused
from tether.types import RunStatus

if TYPE_CHECKING:
    from tether.app import App

CHECKPOINT_COLUMNS: list[Column] = [
    ("checkpoint", "checkpoint_id"),
    ("agent", "agent_id"),
    ("name", "name"),
    ("version", "version"),
    ("run", "run_id"),
    ("step", "seq"),
    ("created", "created_at"),
]


@click.group(cls=OrderedGroup)
def checkpoints() -> None:
    """Named snapshots of agents' state: create, list, show, and restore one as current."""


@checkpoints.command("list")
@click.option("--agent", "agent_id", metavar="ID", help="Only checkpoints of this agent.")
@limit_option()
@output_option()
@pass_state
def list_(state: CliState, agent_id: str | None, limit: int | None, output: str) -> None:
    """List checkpoints, newest first (-o json includes each one's state)."""
    found = state.get_app().list_checkpoints(agent_id, limit)
    emit(found, output, CHECKPOINT_COLUMNS, id_key="checkpoint_id")


@checkpoints.command()
@click.argument("agent_id")
@click.argument("name")
@output_option()
@pass_state
def create(state: CliState, agent_id: str, name: str, output: str) -> None:
    """Snapshot the current state of AGENT_ID under NAME; prints the checkpoint id."""
    ckpt = state.get_app().checkpoint(agent_id, name)
    if output == "table":
        click.echo(
            f"checkpoint {ckpt.checkpoint_id} ({ckpt.name!r}) holds version {ckpt.version} of "
            f"agent {ckpt.agent_id}'s state; restore it with: tether checkpoints restore "
            f"{ckpt.checkpoint_id}",
            err=True,
        )
    emit_one(ckpt, "ids" if output == "table" else output, id_key="checkpoint_id")


@checkpoints.command()
@click.argument("checkpoint_id", metavar="ID")
@output_option()
@pass_state
def show(state: CliState, checkpoint_id: str, output: str) -> None:
    """Show one checkpoint: agent, name, version, where it was taken, and its state."""
    ckpt = state.get_app().get_checkpoint(checkpoint_id)
    if output != "table":
        emit_one(ckpt, output, id_key="checkpoint_id")
        return
    values = ckpt.to_dict()
    state_doc = values.pop("state")
    emit_one(Row({**values, "state": state_doc}), "table")  # the document last, where it fits


@checkpoints.command()
@click.argument("checkpoint_id", metavar="ID")
@click.option(
    "--pause",
    is_flag=True,
    help="Pause the agent first (its runs stop at their next step boundary); it stays paused.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="With --pause: how long to wait for runs to reach a step boundary [default 30].",
)
@output_option()
@pass_state
def restore(
    state: CliState, checkpoint_id: str, pause: bool, wait: float | None, output: str
) -> None:
    """Make a checkpoint's state the agent's current state, as a new version.

    Refused (exit 1) while the agent has a run in progress: use --pause, or wait for the runs
    to finish. Prints the agent's new state version.
    """
    if wait is not None and not pause:
        raise click.UsageError("--wait applies only with --pause")
    seconds = 30.0 if wait is None else wait
    app = state.get_app()
    ckpt = app.get_checkpoint(checkpoint_id)
    try:
        info = app.restore(checkpoint_id, pause=pause, wait=seconds)
    except Refused:
        if not pause:
            raise
        raise _still_held(app, ckpt.agent_id, seconds) from None
    if output != "table":
        emit_one(info, output, id_key="agent_id")
        return
    click.echo(
        f"restored checkpoint {ckpt.checkpoint_id} ({ckpt.name!r}): agent {info.agent_id}'s "
        f"state is now version {info.version}, a copy of version {ckpt.version}"
    )
    if pause:
        click.echo(
            f"agent {info.agent_id} is {info.lifecycle.value}; resume it when ready: "
            f"tether agents resume {info.agent_id}",
            err=True,
        )


def _still_held(app: App, agent_id: str, wait: float) -> Refused:
    """The refusal after --pause: runs still inside a step when the wait ended."""
    live = [s.value for s in RunStatus if not s.is_final]
    runs = app.list_runs(agent_id=agent_id, status=live, limit=None)
    held = [r.run_id for r in runs if r.owner is not None]
    listed = ", ".join(held) or "its runs"
    return Refused(
        f"agent {agent_id} is paused, but {listed} did not reach a step boundary within "
        f"{wait:g}s; nothing was restored. Try again with a longer --wait"
    )
