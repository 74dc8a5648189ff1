"""The scenario behind ``tether demo``: real agents and a real worker on a real database.

Three agents are created, initialized (their ``on_initialize`` hook writes their first state)
and activated; one is paused and resumed. Each gets a run (see ``tether.demo.agents``): a
flaky search retried with backoff, a slow fetch retried with a longer deadline, durable
sleeps, and a parser error that becomes an incident, which a simulated operator resolves by
supplying the step's output. A worker executes the runs in this process while a live view
(``tether.demo.view``) shows what happens, then a summary of the runs and a timeline of one.
Then an agent's state is checkpointed, overwritten and restored, and a finished run is forked
from its first step (see ``tether.demo.history``). Last, the agents are terminated and an
illegal transition is refused. Everything stays in the database for ``tether runs``,
``tether incidents`` and the rest. Ids carry a fresh suffix, so the demo can run again and
again on the same database.
"""

from __future__ import annotations

import json
import time
import uuid

from rich.console import Console
from rich.markup import escape

from tether.app import App
from tether.demo.agents import CRAWL_DELAY, FETCH_TIMEOUT, SECOND_OPINION_DELAY, build_app
from tether.demo.history import show_checkpoint_and_restore, show_fork
from tether.demo.view import summary, timeline, watch
from tether.errors import InvalidTransition
from tether.types import RunInfo, RunStatus

ROLES = {"researcher": "demo-researcher", "writer": "demo-writer", "reviewer": "demo-reviewer"}
OPERATOR = "operator (simulated)"
OPERATOR_PAUSE = 0.4
"""Seconds the simulated operator takes to look at an incident before deciding."""


def run_demo(url: str | None, console: Console) -> int:
    """Run the scenario against ``url`` (default ``TETHER_DATABASE_URL``, else ./tether.db).

    Returns:
        The process exit code: 0 when every run completed as the scenario expects.
    """
    suffix = uuid.uuid4().hex[:6]
    ids = {role: f"{role}-{suffix}" for role in ROLES}
    with build_app(url) as app:
        target = app.store.target
        where = f"{target.sqlite_path.resolve()} (SQLite)" if target.sqlite_path else target.display
        console.print(f"[bold]tether demo[/] on {where}")

        console.rule("agents: create, initialize (a hook writes their state), activate")
        for role, agent_id in ids.items():
            app.create_agent(ROLES[role], agent_id, {"role": role})
            _transition(console, app, "initialize", agent_id, "demo setup")
            _transition(console, app, "activate", agent_id, "ready for work")
        _transition(console, app, "pause", ids["researcher"], "waiting for sources")
        _transition(console, app, "resume", ids["researcher"], "sources arrived")

        console.rule("runs: a worker executes them, live")
        tasks = {
            "researcher": {"topic": "durable agents"},
            "writer": {"sections": ["intro", "design", "results"]},
            "reviewer": {"sections": 3},
        }
        for line in (
            f"{ids['researcher']}: search (drops the connection twice: retried with backoff), "
            f"fetch (overruns its {FETCH_TIMEOUT:g}s deadline: retried with a longer one), "
            f"a durable {CRAWL_DELAY:g}s sleep, extract (a ValueError: an incident for a person)",
            f"{ids['writer']}: three sections, one step each",
            f"{ids['reviewer']}: check claims, a durable {SECOND_OPINION_DELAY:g}s sleep, score",
        ):
            console.print(f"  [dim]{escape(line)}[/]")
        run_ids = {role: app.submit(ids[role], tasks[role]).run_id for role in ROLES}
        started = time.monotonic()
        infos = watch(app, console, run_ids, Operator().look)
        took = time.monotonic() - started

        failed = [r for r in infos.values() if r.status != RunStatus.COMPLETED]
        console.print(f"all runs finished in {took:.1f}s")
        console.print(summary(app, infos))
        console.print(timeline(app, run_ids["researcher"], ids["researcher"]))

        history_ok = True
        if not failed:  # a fork needs the finished run it starts from
            console.rule("checkpoint and restore an agent's state; fork a finished run")
            history_ok = show_checkpoint_and_restore(app, console, ids["researcher"])
            history_ok = show_fork(app, console, run_ids["writer"]) and history_ok

        console.rule("terminate; an illegal transition is refused")
        for agent_id in ids.values():
            _transition(console, app, "terminate", agent_id, "demo finished")
        victim = ids["reviewer"]
        before = app.agent_history(victim)
        try:
            app.activate(victim, reason="try to bring it back")
        except InvalidTransition as exc:
            console.print(f"[red]refused:[/] {escape(str(exc))}")
        else:
            console.print(f"[red]BUG: activating terminated agent {victim} was allowed[/]")
            return 1
        if app.agent_history(victim) != before:
            console.print(f"[red]BUG: the refused transition wrote to {victim}'s history[/]")
            return 1
        console.print(f"history of {victim} unchanged: {len(before)} entries, nothing written")
        researcher = app.get_agent(ids["researcher"])
        console.print(
            f"state of {researcher.agent_id} (version {researcher.version}, written by its hooks, "
            f"steps and the restore): {escape(json.dumps(researcher.state))}"
        )
        if failed:
            for info in failed:
                console.print(f"[red]run {info.run_id} ended {info.status.value}[/]")
            return 1
        if not history_ok:
            return 1
        console.print(
            f"Explore{'' if url is None else ' (with the same --db)'}: tether runs list; "
            f"tether runs timeline {run_ids['researcher']}; "
            f"tether incidents list --run {run_ids['researcher']}; "
            f"tether agents history {ids['researcher']}; tether checkpoints list"
        )
    return 0


def _transition(console: Console, app: App, action: str, agent_id: str, reason: str) -> None:
    before = app.get_agent(agent_id).lifecycle.value
    info = getattr(app, action)(agent_id, reason=reason)
    console.print(f"  {agent_id:<18} {before:>11} -> {info.lifecycle.value:<11} [dim]{reason}[/]")


class Operator:
    """The simulated operator: looks at a run that needs attention, then skips its step."""

    def __init__(self) -> None:
        self.noticed: dict[str, float] = {}
        """When each run that needs attention was first seen."""

    def look(self, app: App, console: Console, infos: dict[str, RunInfo]) -> None:
        """Resolve the open incidents of runs that have needed attention for a moment."""
        for run_id, info in infos.items():
            if info.status != RunStatus.NEEDS_ATTENTION:
                continue
            first_seen = self.noticed.setdefault(run_id, time.monotonic())
            if time.monotonic() - first_seen < OPERATOR_PAUSE:
                continue
            for incident in app.incidents(status="open", run_id=run_id):
                facts = [
                    "tether journals every step",
                    "a crashed run resumes from its journal",
                    "(read from the scanned PDF by hand)",
                ]
                app.resolve_incident(
                    incident.incident_id,
                    "skip",
                    output=facts,
                    actor=OPERATOR,
                    comment="read the scanned PDF by hand",
                )
                console.print(
                    f"  [bold magenta]{OPERATOR}[/] resolves {incident.incident_id}: skip step "
                    f"{incident.seq} with a supplied output {escape(json.dumps(facts))}"
                )
            self.noticed.pop(run_id, None)
