"""The scenario behind ``tether demo``: real agents on a real database, start to finish.

Three agents of one demo type are created, initialized (their ``on_initialize`` hook writes
their first state), activated, paused and resumed, and terminated. Then an illegal transition
is attempted and refused, with nothing written, and every agent's recorded history is shown.
Agent ids carry a fresh suffix, so the demo can run again and again on the same database.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from rich.console import Console
from rich.table import Table

from tether.agent import Agent, HookContext
from tether.app import App
from tether.errors import InvalidTransition

ROLES = ("researcher", "writer", "reviewer")


class DemoAgent(Agent):
    """A small agent type whose hooks record what happened to it in its state."""

    type = "demo"

    def on_initialize(self, ctx: HookContext) -> None:
        """Give the agent its first state: its role and an empty notebook."""
        ctx.state["role"] = self.config.get("role", "assistant")
        ctx.state["notes"] = []

    def on_activate(self, ctx: HookContext) -> None:
        """Count activations, to show state versions growing with the lifecycle."""
        ctx.state["activations"] = int(ctx.state.get("activations", 0)) + 1

    def handle(self, ctx: Any, task: Any) -> Any:
        """Echo the task (runs arrive with the execution engine)."""
        return {"echo": task}


def run_demo(url: str | None, console: Console) -> int:
    """Run the scenario against ``url`` (default ``TETHER_DATABASE_URL``, else ./tether.db).

    Returns:
        The process exit code: 0 when every step behaved as the lifecycle promises.
    """
    suffix = uuid.uuid4().hex[:6]
    ids = {role: f"{role}-{suffix}" for role in ROLES}
    app = App(url)
    app.register(DemoAgent)
    with app:
        target = app.store.target
        where = target.sqlite_path.resolve() if target.sqlite_path else target.display
        console.print(f"[bold]tether demo[/] on {where}")

        console.rule("create, initialize, activate")
        for role, agent_id in ids.items():
            app.create_agent(DemoAgent.type, agent_id, {"role": role})
            _step(console, app, "initialize", agent_id, "demo setup")
            _step(console, app, "activate", agent_id, "ready for work")

        console.rule("pause and resume")
        _step(console, app, "pause", ids["researcher"], "waiting for sources")
        _step(console, app, "resume", ids["researcher"], "sources arrived")

        console.rule("terminate")
        for agent_id in ids.values():
            _step(console, app, "terminate", agent_id, "demo finished")

        console.rule("an illegal transition is refused")
        victim = ids["reviewer"]
        before = app.agent_history(victim)
        try:
            app.activate(victim, reason="try to bring it back")
        except InvalidTransition as exc:
            console.print(f"[red]refused:[/] {exc}")
        else:
            console.print(f"[red]BUG: activating terminated agent {victim} was allowed[/]")
            return 1
        unchanged = app.agent_history(victim) == before
        console.print(f"history of {victim} unchanged: {len(before)} entries, nothing written")
        if not unchanged:
            return 1

        for agent_id in ids.values():
            console.print(_history_table(app, agent_id))
        writer = app.get_agent(ids["writer"])
        console.print(
            f"state of {writer.agent_id} (version {writer.version}, written by its hooks): "
            f"{json.dumps(writer.state)}"
        )
        console.print(
            f"Explore: tether agents list --type {DemoAgent.type}; "
            f"tether agents history {ids['researcher']}; tether agents state {ids['writer']}"
        )
    return 0


def _step(console: Console, app: App, action: str, agent_id: str, reason: str) -> None:
    before = app.get_agent(agent_id).lifecycle.value
    info = getattr(app, action)(agent_id, reason=reason)
    console.print(f"  {agent_id:<18} {before:>11} -> {info.lifecycle.value:<11} [dim]{reason}[/]")


def _history_table(app: App, agent_id: str) -> Table:
    table = Table(title=f"history of {agent_id}", title_justify="left")
    for header in ("at (UTC)", "action", "from", "to", "reason", "actor"):
        table.add_column(header)
    for entry in app.agent_history(agent_id):
        table.add_row(
            entry.at.strftime("%H:%M:%S.%f")[:-3],
            entry.action,
            entry.from_state.value if entry.from_state else "-",
            entry.to_state.value,
            entry.reason,
            entry.actor,
        )
    return table
