"""The scenario behind ``tether demo``: real agents and a real worker on a real database.

Four agents are created, initialized (their ``on_initialize`` hook writes their first state)
and activated; one is paused and resumed, one subscribes to a topic. The coordinator gets one
run (see ``tether.demo.agents``) and delegates: it spawns a child run on each of the other
three (fan-out) and gathers their results (fan-in). The agents talk: the researcher reports its
sources to the coordinator, which briefs the writer, then publishes the writer's draft on a
topic the reviewer subscribes to; each message is consumed exactly once. Inside the children: a
flaky search retried with backoff, paid searches that run out of the budget the coordinator
gave the researcher (the run waits until a simulated operator raises the limit; see
``tether.demo.budget``), a slow fetch retried with a longer deadline, durable sleeps, a tool
the researcher's policy denies, and a parser error that becomes an incident, which the
simulated operator resolves by supplying the step's output. Before it publishes the report, the
coordinator asks a person (``ctx.approve``) and parks, holding no thread, until a simulated
reviewer (or, with ``--interactive``, the person at the terminal) decides; see
``tether.demo.approval``. A worker executes the runs in this process while a live view
(``tether.demo.view``) shows the tree of runs and the messages, then a summary of the tree, the
messages, the coordinator's journal, a child's timeline, what its budget did and what it spent,
and the approval and what it gated. Then an agent's state is checkpointed, overwritten and
restored, and a finished run is forked from its first step (see ``tether.demo.history``). Last,
the agents are terminated and an illegal transition is refused. Everything stays in the
database for ``tether runs`` (``tether runs usage`` for what a run spent), ``tether
incidents``, ``tether approvals`` and the rest. Ids carry a fresh suffix, so the demo can run
again and again on the same database.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from tether.app import App
from tether.demo.agents import (
    APPROVAL_TIMEOUT,
    BRIEF,
    CRAWL_DELAY,
    FETCH_TIMEOUT,
    FOLLOW_UPS,
    PROGRESS,
    RESEARCH_BUDGET,
    SEARCH_COST,
    SECOND_OPINION_DELAY,
    SHELL,
    WEB_SEARCH,
    build_app,
)
from tether.demo.approval import GATED_STEP, INTERACTIVE_TIMEOUT, Reviewer, check_gated
from tether.demo.budget import check_budget, paused_on, raise_limit
from tether.demo.history import show_checkpoint_and_restore, show_fork
from tether.demo.view import inbox, journal, summary, timeline, watch
from tether.errors import InvalidTransition
from tether.types import MessageInfo, RunInfo, RunStatus

ROLES = {
    "coordinator": "demo-coordinator",
    "researcher": "demo-researcher",
    "writer": "demo-writer",
    "reviewer": "demo-reviewer",
}
WORKERS = ("researcher", "writer", "reviewer")
"""The roles the coordinator delegates to, in the order it spawns them."""
RESULT_OF = {"researcher": "research", "writer": "draft", "reviewer": "review"}
"""Where each child's result is in the coordinator's."""
OPERATOR = "operator (simulated)"
OPERATOR_PAUSE = 0.4
"""Seconds the simulated operator takes to look at an incident or a spent budget before
acting."""


def run_demo(url: str | None, console: Console, interactive: bool = False) -> int:
    """Run the scenario against ``url`` (default ``TETHER_DATABASE_URL``, else ./tether.db).

    Args:
        url: The database URL.
        console: Where to show it.
        interactive: Ask the person at the terminal (stdin) to decide the approval, instead
            of the simulated reviewer.

    Returns:
        The process exit code: 0 when every run completed as the scenario expects.
    """
    suffix = uuid.uuid4().hex[:6]
    ids = {role: f"{role}-{suffix}" for role in ROLES}
    roles = {agent_id: role for role, agent_id in ids.items()}
    drafts = f"drafts-{suffix}"
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
        app.subscribe(ids["reviewer"], drafts)
        console.print(f"  {ids['reviewer']:<18} subscribes to the topic {drafts!r}")

        console.rule("runs: a coordinator delegates to three agents; a worker executes, live")
        timeout = INTERACTIVE_TIMEOUT if interactive else APPROVAL_TIMEOUT
        decider = "you decide, at this terminal" if interactive else "a simulated reviewer"
        budget = RESEARCH_BUDGET
        for line in (
            f"{ids['coordinator']}: spawns a child run on each of the three (fan-out), the "
            f"researcher's with a budget of max_cost={budget.max_cost:g} "
            f"(on_breach={budget.on_breach}, warn_at={budget.warn_at:g}); waits for "
            f"the researcher's word on {PROGRESS!r}; briefs the writer on {BRIEF!r}; waits for "
            f"the draft and publishes it on {drafts!r}; gathers all three results (fan-in); "
            f"asks a person to approve the step {GATED_STEP!r} (the reviewer may edit the "
            f"title; {decider}; after {timeout:g}s the default applies: reject)",
            f"{ids['researcher']}: search (drops the connection twice: retried with backoff), "
            f"{len(FOLLOW_UPS)} narrower searches (each {WEB_SEARCH} call costs "
            f"{SEARCH_COST:g}: the last would go over its budget, so the run waits for the "
            f"operator to raise it), fetch (overruns its {FETCH_TIMEOUT:g}s deadline: retried "
            f"with a longer one), a message to the coordinator, a durable {CRAWL_DELAY:g}s "
            f"sleep, OCR of the scanned PDF (its policy denies the tool {SHELL!r}), extract (a "
            "ValueError: an incident for a person)",
            f"{ids['writer']}: waits for the brief (a message), then three sections, one step each",
            f"{ids['reviewer']}: waits for the draft (published on {drafts!r}), checks claims, a "
            f"durable {SECOND_OPINION_DELAY:g}s sleep, score",
        ):
            console.print(f"  [dim]{escape(line)}[/]")
        task = {
            "topic": "durable agents",
            "sections": ["intro", "design", "results"],
            "team": {role: ids[role] for role in WORKERS},
            "drafts": drafts,
            "approval_timeout": timeout,
        }
        root = app.submit(ids["coordinator"], task).run_id
        operator, reviewer = Operator(), Reviewer(interactive)

        def act(app: App, live: Live, infos: dict[str, RunInfo]) -> None:
            operator.look(app, live.console, infos)
            reviewer.look(app, live, infos)

        started = time.monotonic()
        tree = watch(app, console, root, roles, act)
        took = time.monotonic() - started

        failed = [info for _, info in tree if info.status != RunStatus.COMPLETED]
        console.print(
            f"the coordinator's run and its {len(tree) - 1} children finished in {took:.1f}s"
        )
        console.print(summary(app, tree))
        mail = inbox(app, roles)  # shown with the runs just above
        console.print(
            journal(
                app, root, f"the coordinator's journal ({root}): its children, messages and waits"
            )
        )
        child = {roles[info.agent_id]: info for _, info in tree if info.run_id != root}
        budgeted = False
        if "researcher" in child:
            console.print(timeline(app, child["researcher"].run_id, ids["researcher"]))
            budgeted = check_budget(app, console, child["researcher"].run_id)
        gathered = not failed and _fan_in(console, tree[0][1], child)
        delivered = _delivered_once(console, mail)
        gated = check_gated(app, console, root)

        history_ok = True
        if not failed:  # a fork needs the finished run it starts from
            console.rule("checkpoint and restore an agent's state; fork a finished run")
            history_ok = show_checkpoint_and_restore(app, console, ids["researcher"])
            history_ok = show_fork(app, console, child["writer"].run_id) and history_ok

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
        if not (history_ok and gathered and delivered and gated and budgeted):
            return 1
        research = child["researcher"].run_id
        console.print(
            f"Explore{'' if url is None else ' (with the same --db)'}: tether runs list; "
            f"tether runs show {root}; tether runs timeline {research}; "
            f"tether runs usage {research}; "
            f"tether incidents list --run {research}; tether approvals list; "
            f"tether agents history {ids['researcher']}; tether checkpoints list"
        )
    return 0


def _fan_in(console: Console, coordinator: RunInfo, child: dict[str, RunInfo]) -> bool:
    """Say what the coordinator gathered; False unless it holds each child's result."""
    result: dict[str, Any] = coordinator.result or {}
    missing = [
        role
        for role in WORKERS
        if role not in child or result.get(RESULT_OF[role]) != child[role].result
    ]
    if missing:
        console.print(
            f"[red]BUG: the coordinator's result lacks the results of {', '.join(missing)}[/]"
        )
        return False
    research, draft, review = (result[RESULT_OF[role]] for role in WORKERS)
    console.print(
        f"fan-in: the coordinator's result holds its {len(WORKERS)} children's results, each "
        f"equal to the child's own: research ({research['sources']} sources, "
        f"{len(research['facts'])} facts), draft ({len(draft['sections'])} sections), review "
        f"({review['verdict']}, {review['claims_checked']} claims checked)"
    )
    return True


def _delivered_once(console: Console, mail: list[MessageInfo]) -> bool:
    """Say how the messages went; False unless every one was consumed, by one run."""
    pending = [m for m in mail if m.consumed_by is None]
    if pending or not mail:
        console.print(f"[red]BUG: {len(pending)} of {len(mail)} messages were never consumed[/]")
        return False
    console.print(
        f"messages: {len(mail)} sent between the agents, each consumed exactly once, in the "
        "write that journaled its receipt"
    )
    return True


def _transition(console: Console, app: App, action: str, agent_id: str, reason: str) -> None:
    before = app.get_agent(agent_id).lifecycle.value
    info = getattr(app, action)(agent_id, reason=reason)
    console.print(f"  {agent_id:<18} {before:>11} -> {info.lifecycle.value:<11} [dim]{reason}[/]")


class Operator:
    """The simulated operator: looks at a run that needs attention, then skips its step;
    raises the limit a run waits on (see ``tether.demo.budget``)."""

    def __init__(self) -> None:
        self.noticed: dict[str, float] = {}
        """When each run that needs attention, and each budget breach, was first seen."""
        self.raised: set[int] = set()
        """The ``budget.exceeded`` events (by seq) whose limit was raised."""

    def look(self, app: App, console: Console, infos: dict[str, RunInfo]) -> None:
        """Resolve the open incidents of runs that have needed attention for a moment; raise
        the limit of a budget a run has waited on for a moment."""
        for run_id, info in infos.items():
            if info.status == RunStatus.WAITING:
                self._raise(app, console, run_id)
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

    def _raise(self, app: App, console: Console, run_id: str) -> None:
        hit = paused_on(app, run_id, self.raised)
        if hit is None:
            return
        first_seen = self.noticed.setdefault(f"budget:{hit.seq}", time.monotonic())
        if time.monotonic() - first_seen >= OPERATOR_PAUSE:
            raise_limit(app, console, hit, OPERATOR)
            self.raised.add(hit.seq)
