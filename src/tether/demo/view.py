"""The live view of ``tether demo``: events and messages in words as they happen, the tree of
runs (a coordinator's run and the child runs it started) and the messages between agents, then
a summary and the journals and timelines of runs.

``watch`` works the runs on a worker thread in this process and redraws the board until every
run of the tree is final; on each pass it hands the runs to the scenario (``act``), which is
where the simulated operator and the reviewer live (a person at the terminal stops the live
display while they answer). The tree is read from the database (``RunInfo`` and the
runs' ``parent_run_id``), so the children appear as the coordinator spawns them. Off a
terminal (a pipe, a test) the board is printed once at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tether import codec
from tether.app import App
from tether.types import Event, MessageInfo, RunInfo, RunStatus, StepInfo

STATUS_STYLE = {
    RunStatus.PENDING: "dim",
    RunStatus.RUNNING: "bold blue",
    RunStatus.WAITING: "cyan",
    RunStatus.PAUSED: "yellow",
    RunStatus.COMPLETED: "bold green",
    RunStatus.FAILED: "bold red",
    RunStatus.CANCELLED: "red",
    RunStatus.NEEDS_ATTENTION: "bold magenta",
}
"""How each run status is drawn."""

Act = Callable[[App, Live, dict[str, RunInfo]], None]
"""What the scenario does on each pass of the view, given the runs as they are now; it prints
on the live display's console (and may stop the display to ask a person, then start it)."""

Tree = list[tuple[str, RunInfo]]
"""Runs depth first, each with the prefix that draws its branch (``""`` for the root)."""

TIME_LIMIT = 60.0
"""Seconds ``watch`` waits for the runs to finish before it gives up (not counting the time
``act`` takes: a person deciding at the terminal)."""


def run_tree(app: App, root_id: str) -> Tree:
    """``root_id`` and every run below it, depth first, children in the order they started."""
    rows: Tree = []

    def visit(info: RunInfo, branch: str, below: str) -> None:
        rows.append((branch, info))
        children = sorted(
            app.store.list_runs(parent_run_id=info.run_id, limit=None),
            key=lambda r: (r.created_at, r.run_id),
        )
        for n, child in enumerate(children):
            last = n == len(children) - 1
            visit(child, below + ("└─ " if last else "├─ "), below + ("   " if last else "│  "))

    visit(app.get_run(root_id), "", "")
    return rows


def watch(app: App, console: Console, root_id: str, roles: dict[str, str], act: Act) -> Tree:
    """Work the run ``root_id`` and its children on a worker thread; show events and messages
    as they happen, and the tree of runs and the messages as a board.

    Args:
        app: The App the runs are on.
        console: Where to draw.
        root_id: The run at the root of the tree (the coordinator's).
        roles: The role shown for each agent, by agent id; their messages are shown.
        act: Called on each pass with the runs' current state (the simulated operator, the
            reviewer).

    Returns:
        The tree of runs, once all are final (or after ``TIME_LIMIT`` seconds).
    """
    last_seq = app.timeline(root_id)[0].seq - 1
    latest: dict[str, str] = {}
    said: set[tuple[str, str]] = set()
    """(message id, "sent" or "consumed"): what the view has told already."""
    worker = app.worker(concurrency=4)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            worker.run()
        except BaseException as exc:  # shown below; the loop then stops waiting
            failure.append(exc)

    thread = threading.Thread(target=work, name="tether-demo-worker", daemon=True)
    thread.start()
    started, epoch = time.monotonic(), time.time()
    acting = 0.0
    """Seconds spent in ``act``: a person's time does not count against ``TIME_LIMIT``."""
    tree = run_tree(app, root_id)
    mail = inbox(app, roles)
    # Off a terminal (a pipe, a test) the board is printed once at the end instead.
    live = Live(
        board(tree, roles, latest, mail),
        console=console,
        refresh_per_second=20,
        auto_refresh=console.is_terminal,
    )
    try:
        with live if console.is_terminal else contextlib.nullcontext(live):
            while True:
                events = app.events(after_seq=last_seq)  # before the tree: it has their runs
                tree, mail = run_tree(app, root_id), inbox(app, roles)
                ours = {info.run_id: info for _, info in tree}
                lines: list[tuple[float, int, str]] = []
                for event in events:
                    last_seq = event.seq
                    if event.run_id not in ours or event.type in BOOKKEEPING:
                        continue
                    text, style = describe(event)
                    latest[event.run_id] = text
                    if event.type not in QUIET or event.data.get("parent_run_id"):
                        role = roles.get(ours[event.run_id].agent_id, "")
                        line = f"{role:<11} [{style}]{escape(text)}[/]"
                        lines.append((_at(event.at, epoch), 1, line))
                lines.extend(_mail_lines(mail, roles, said, epoch))
                for at, _, line in sorted(lines, key=lambda each: each[:2]):
                    live.console.print(f"  [dim]{at:5.2f}s[/] {line}")
                before = time.monotonic()
                act(app, live, ours)
                acting += time.monotonic() - before
                live.update(board(tree, roles, latest, mail))
                if all(info.status.is_final for info in ours.values()):
                    break
                if failure:
                    raise failure[0]
                if time.monotonic() - started - acting > TIME_LIMIT:
                    live.console.print(f"[red]the runs did not finish within {TIME_LIMIT:g}s[/]")
                    break
                time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(timeout=30)
    if not console.is_terminal:
        console.print(board(tree, roles, latest, mail))
    return tree


def inbox(app: App, roles: dict[str, str]) -> list[MessageInfo]:
    """Every message to the agents of ``roles``, oldest first."""
    found = [m for agent_id in roles for m in app.messages(agent_id=agent_id, limit=None)]
    return sorted(found, key=lambda m: m.seq)


def _at(when: dt.datetime | None, epoch: float) -> float:
    return max(0.0, when.timestamp() - epoch) if when else 0.0


def _mail_lines(
    mail: Iterable[MessageInfo], roles: dict[str, str], said: set[tuple[str, str]], epoch: float
) -> list[tuple[float, int, str]]:
    """What happened to the messages since the last pass, in words, with when; at the same
    moment, a message is sent before the events of its write and taken after them."""
    lines = []
    for m in mail:
        sender, recipient = _who(m.sender_agent, roles), _who(m.recipient, roles)
        on = f"on {m.topic!r}" if m.topic else "directly"
        if (m.message_id, "sent") not in said:
            said.add((m.message_id, "sent"))
            lines.append(
                (
                    _at(m.created_at, epoch),
                    0,
                    f"{sender:<11} [bold]sends {recipient} a message {escape(on)}:[/] "
                    f"{escape(_short(m.payload, 60))}",
                )
            )
        if m.consumed_by is not None and (m.message_id, "consumed") not in said:
            said.add((m.message_id, "consumed"))
            lines.append(
                (
                    _at(m.consumed_at, epoch),
                    2,
                    f"{recipient:<11} [bold]takes the message from {sender}[/] (journal entry "
                    f"{m.consumed_seq}: consumed once, in the same write)",
                )
            )
    return lines


def _who(agent_id: str | None, roles: dict[str, str]) -> str:
    if agent_id is None:
        return "(outside)"
    return roles.get(agent_id, agent_id)


def _short(value: Any, width: int = 48) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def board(
    tree: Tree, roles: dict[str, str], latest: dict[str, str], mail: list[MessageInfo]
) -> Group:
    """The tree of runs with their status and latest event, and the messages so far."""
    runs = Table(title="runs: the coordinator's run and its children", title_justify="left")
    for header in ("agent", "run", "status", "steps", "latest"):
        runs.add_column(header, overflow="fold")
    for branch, info in tree:
        runs.add_row(
            f"{branch}{info.agent_id}",
            info.run_id,
            f"[{STATUS_STYLE.get(info.status, '')}]{info.status.value}[/]",
            str(info.steps),
            escape(latest.get(info.run_id, "")),
        )
    return Group(runs, messages(mail, roles)) if mail else Group(runs)


def messages(mail: list[MessageInfo], roles: dict[str, str]) -> Table:
    """A row per message: who sent it to whom, on which topic, and which run consumed it."""
    table = Table(title="messages between the agents", title_justify="left")
    for header in ("from", "to", "topic", "payload", "consumed by"):
        table.add_column(header, overflow="fold")
    for m in mail:
        consumed = "[yellow]pending[/]"
        if m.consumed_by is not None:
            consumed = f"[green]{m.consumed_by}[/] (entry {m.consumed_seq})"
        table.add_row(
            _who(m.sender_agent, roles),
            _who(m.recipient, roles),
            escape(m.topic or "(direct)"),
            escape(_short(m.payload)),
            consumed,
        )
    return table


# -- what happened, in words ---------------------------------------------------------------

QUIET = {"run.submitted", "run.claimed", "run.needs_attention"}
"""Events the live view does not print (the table shows them), but for a child's start."""

BOOKKEEPING = {"budget.reserved", "budget.settled", "policy.allowed"}
"""Events of every metered step: the live view leaves them to the timeline (a completed
step's line says what it cost)."""

WAITING_FOR = {
    "message": "a message",
    "child": "its children",
    "approval": "a person",
    "budget": "a person to raise its budget",
}
WOKEN_BY = {
    "message": "a message came",
    "child": "a child run ended",
    "timer": "its timer",
    "approval": "a person decided",
    "budget": "its budget was raised",
}
ON_BREACH = {
    "pause": "the step does not start; the run waits until a person raises the limit",
    "ask": "the step does not start; a person is asked to raise the limit",
    "fail": "the step does not start; the run fails",
}
"""What each ``on_breach`` action does, in words."""


def describe(event: Event) -> tuple[str, str]:
    """An event in words, with a rich style."""
    d = event.data
    step = f"step {d.get('seq')} {d.get('name', '')}".rstrip()
    kind = event.type
    if kind == "run.submitted":
        if d.get("parent_run_id"):
            return f"spawned by run {d['parent_run_id']}: a child run", "blue"
        return "submitted", "dim"
    if kind in ("run.claimed", "run.recovered"):
        worker, fence = d.get("worker"), d.get("fence")
        if fence == 1:
            return f"claimed by worker {worker}", "dim"
        return f"claimed by worker {worker} (epoch {fence}): replays its journal", "dim"
    if kind == "step.completed":
        again = f" on attempt {d['attempt']}" if d.get("attempt") else ""
        cost = f" (cost {d['cost']:g})" if d.get("cost") is not None else ""
        return f"{step} completed{again}{cost}", "green"
    if kind == "step.failed":
        return (
            f"{step} attempt {d.get('attempt')} failed: {d.get('error_type')}: {d.get('error')}",
            "red",
        )
    if kind == "step.retry_scheduled":
        strategy = d.get("strategy")
        if d.get("delay"):
            return (
                f"  -> {strategy}: attempt {d.get('next_attempt')} in {d['delay']:.2f}s "
                "(a durable timer)",
                "yellow",
            )
        deadline = f" with a {d['timeout']:g}s deadline" if d.get("timeout") else ""
        return f"  -> {strategy}: attempt {d.get('next_attempt')} now{deadline}", "yellow"
    if kind == "run.waiting" and d.get("kind") in WAITING_FOR:
        until = f", or until {str(d['until'])[11:23]} UTC" if d.get("until") else ""
        if d["kind"] == "approval" and event.run_id and d.get("seq") is not None:
            # The approval's id is derived from the run and the journal position that asked.
            until = f": approval {codec.approval_id(event.run_id, d['seq'])}{until}"
        return (
            f"waits for {WAITING_FOR[d['kind']]}{until}: parked in the database, holding no thread",
            "cyan",
        )
    if kind == "run.woken":
        woken_by = str(d.get("kind"))
        return f"woken: {WOKEN_BY.get(woken_by, woken_by)}", "cyan"
    if kind == "run.waiting":
        until = str(d.get("until", ""))[11:23]
        return (
            f"{d.get('kind')} until {until} UTC: parked in the database, holding no thread",
            "cyan",
        )
    if kind == "incident.opened":
        return f"incident: {d.get('kind')} at step {d.get('seq')}: {d.get('error')}", "bold red"
    if kind == "run.needs_attention":
        return "needs attention: waiting for a person", "magenta"
    if kind == "incident.resolved":
        comment = f' ("{d["comment"]}")' if d.get("comment") else ""
        return f"{d.get('actor')} decided {d.get('action')}{comment}", "bold magenta"
    if kind == "approval.requested":
        fallback = "approve" if (d.get("on_timeout") or {}).get("approved") else "reject"
        deadline = str(d.get("deadline") or "")[11:19]
        after = f"; at {deadline} UTC the default applies: {fallback}" if deadline else ""
        return (
            f"asks a person: {d.get('title')!r} (approval {d.get('approval_id')}, on data with "
            f"digest {str(d.get('digest'))[:12]}...{after})",
            "bold cyan",
        )
    if kind == "approval.decided":
        verdict = "approved" if d.get("approved") else "rejected"
        edited = ", with the data edited" if d.get("edited") else ""
        comment = f' ("{d["comment"]}")' if d.get("comment") else ""
        return (
            f"{d.get('decided_by')} {verdict} {d.get('approval_id')} on digest "
            f"{str(d.get('digest'))[:12]}...{edited}{comment}",
            "bold magenta",
        )
    if kind == "approval.expired":
        verdict = "approve" if d.get("approved") else "reject"
        return f"nobody decided {d.get('approval_id')} in time: the default, {verdict}", "yellow"
    if kind == "approval.consumed":
        return (
            f"takes the decision on {d.get('approval_id')} (journal entry {d.get('seq')}: "
            "consumed once, in the same write)",
            "cyan",
        )
    if kind.startswith(("budget.", "policy.")):
        return describe_limits(event)
    if kind == "run.completed":
        return f"completed ({d.get('steps')} journal entries)", "bold green"
    if kind == "run.released":
        return f"handed back at step {d.get('seq')}: {d.get('reason')}", "yellow"
    if kind == "run.lease_expired":
        return "its worker is gone: claimable again", "yellow"
    data = " ".join(f"{k}={v}" for k, v in d.items())
    return f"{kind} {data}".strip(), "dim"


def describe_limits(event: Event) -> tuple[str, str]:
    """A budget or policy event in words, with a rich style."""
    d = event.data
    step = f"step {d.get('seq')} {d.get('name') or d.get('step') or ''}".rstrip()
    kind = event.type
    if kind == "budget.exceeded":
        return (
            f"budget hit: {d.get('limit')} of run {d.get('holder')} (used {d.get('used'):g}); "
            f"step {d.get('seq')} {d.get('step')} needs {d.get('needed'):g} more: "
            f"{ON_BREACH.get(str(d.get('action')), str(d.get('action')))}",
            "bold red",
        )
    if kind == "budget.warned":
        share = d["used"] / d["max"] if d.get("max") else 1.0
        return (
            f"budget warning: {d.get('limit')} of run {d.get('holder')} is {share:.0%} used "
            f"({d.get('used'):g})",
            "yellow",
        )
    if kind == "budget.raised":
        field = str(d.get("limit")).partition("=")[0]
        return (
            f"{d.get('actor')} raised {field} of run {d.get('holder')}'s budget: "
            f"{d.get('from'):g} -> {d.get('to'):g}",
            "bold magenta",
        )
    if kind in ("budget.settled", "budget.reserved"):
        amounts = d.get("usage") if kind == "budget.settled" else d.get("amounts")
        verb = "spent" if kind == "budget.settled" else "reserves"
        return f"{step} {verb} {_amounts(amounts or {})}", "dim"
    what = f"tool {d['tool']}" if d.get("tool") else f"{d.get('kind')} to {d.get('subject')}"
    if d.get("recipient"):
        what = f"a message to {d['recipient']}"
    if kind == "policy.denied":
        if d.get("kind") == "step":
            what = f"tool {d.get('subject')}"
        return (
            f"the policy denies {step}: {what} ({d.get('rule')}); it never starts",
            "bold red",
        )
    if kind == "policy.asked":
        return f"the policy asks a person before {step}: {what} ({d.get('rule')})", "cyan"
    return f"the policy allows {what} at step {d.get('seq')} ({d.get('rule')})", "dim"


def _amounts(amounts: dict[str, Any]) -> str:
    """A step's usage by ledger key, in words: ``1 step, cost 0.01, 1 call of web_search``."""
    said = []
    for key, value in amounts.items():
        if key.startswith("calls:"):
            said.append(f"{value:g} call{'' if value == 1 else 's'} of {key[6:]}")
        elif key == "steps":
            said.append(f"{value:g} step{'' if value == 1 else 's'}")
        else:
            said.append(f"{key} {value:g}")
    return ", ".join(said) or "nothing"


def summary(app: App, tree: Tree) -> Table:
    """A row per run of the tree: status, steps, failed attempts, what its steps cost, what
    a person decided (an incident, an approval, a budget), time."""
    table = Table(title="summary of the runs: the tree", title_justify="left")
    headers = ("agent", "run", "status", "steps", "failed attempts", "cost", "a person", "took")
    for header in headers:
        table.add_column(header, overflow="fold")
    for branch, info in tree:
        events = app.timeline(info.run_id)
        cost = app.usage(info.run_id).usage.cost
        failures = sum(1 for e in events if e.type == "step.failed")
        decisions = [_decision(e) for e in events if e.type in DECISIONS]
        took = "-"
        if info.finished_at is not None:
            took = f"{(info.finished_at - info.created_at).total_seconds():.2f}s"
        table.add_row(
            f"{branch}{info.agent_id}",
            info.run_id,
            f"[{STATUS_STYLE.get(info.status, '')}]{info.status.value}[/]",
            str(info.steps),
            str(failures),
            "-" if cost is None else f"{cost:g}",
            ", ".join(decisions) or "-",
            took,
        )
    return table


DECISIONS = ("incident.resolved", "approval.decided", "approval.expired", "budget.raised")
"""Events that record what a person decided (or a deadline, for them)."""


def _decision(event: Event) -> str:
    d = event.data
    if event.type == "incident.resolved":
        return f"incident resolved: {d.get('action')}"
    if event.type == "budget.raised":
        field = str(d.get("limit")).partition("=")[0]
        return f"budget raised: {field} {d.get('from'):g} -> {d.get('to'):g}"
    if event.type == "approval.expired":
        return f"approval expired: {'approved' if d.get('approved') else 'rejected'}"
    edited = ", edited" if d.get("edited") else ""
    return f"approval {'approved' if d.get('approved') else 'rejected'}{edited}"


def timeline(app: App, run_id: str, agent_id: str) -> Group:
    """Every event of ``run_id`` in words, then its journal."""
    events = app.timeline(run_id)
    table = Table(
        title=f"timeline of {run_id} ({agent_id}): every step, retry, wait, incident, decision",
        title_justify="left",
    )
    table.add_column("+s", justify="right")
    table.add_column("event")
    table.add_column("what happened", overflow="fold")
    start = events[0].at if events and events[0].at else None
    for event in events:
        offset = (event.at - start).total_seconds() if start and event.at else 0.0
        text, style = describe(event)
        table.add_row(f"{offset:.3f}", event.type, f"[{style}]{escape(text)}[/]")
    return Group(table, journal(app, run_id, "its journal"))


def journal(app: App, run_id: str, title: str) -> Table:
    """A run's journal: one row per entry, children and messages in words."""
    steps = Table(title=title, title_justify="left")
    for header in ("seq", "name", "kind", "status", "attempts", "output"):
        steps.add_column(header, overflow="fold")
    for s in app.run_steps(run_id):
        steps.add_row(
            str(s.seq), s.name, s.kind, s.status.value, str(s.attempts), escape(entry_text(s))
        )
    return steps


def entry_text(step: StepInfo) -> str:
    """What a journal entry holds, in a few words."""
    out = step.output if isinstance(step.output, dict) else {}
    if step.error and step.error.get("denied"):
        return f"denied by the policy ({step.error.get('rule')}): never started"
    if step.kind == "spawn":
        return f"child run {step.output} on {step.name}"
    if step.kind == "send":
        return f"message {step.output} to {step.name}"
    if step.kind == "publish":
        return f"{step.output} cop{'y' if step.output == 1 else 'ies'} on {step.name!r}"
    if "children" in out:
        ended = ", ".join(f"{c['agent_id']} {c['status']}" for c in out["children"])
        return f"all ended: {ended}"
    if "message" in out:
        message = out["message"]
        return f"message {message['message_id']} from {message.get('sender_agent')}"
    if "child" in out:
        return f"{out['child']['agent_id']} {out['child']['status']}"
    if "approval" in out:
        decision = out["approval"]
        verdict = "approved" if decision.get("approved") else "rejected"
        edited = ", data edited" if decision.get("edited") else ""
        who = decision.get("decided_by") or "the deadline's default"
        return f"{verdict} by {who}{edited} (approval {decision.get('approval_id')})"
    if out.get("timeout"):
        return "timed out"
    return _short(step.output)
