"""The scenario behind ``tether demo``: real agents and a real worker on a real database.

Three agents are created, initialized (their ``on_initialize`` hook writes their first state)
and activated; one is paused and resumed. Each gets a run (see ``tether.demo_agents``): a
flaky search retried with backoff, a slow fetch retried with a longer deadline, durable
sleeps, and a parser error that becomes an incident, which a simulated operator resolves by
supplying the step's output. A worker executes the runs in this process while a live view
shows what happens, then a summary of the runs and a timeline of one. Then an agent's state is
checkpointed, overwritten and restored, and a finished run is forked from its first step (see
``tether.demo_history``). Last, the agents are terminated and an illegal transition is
refused. Everything stays in the database for ``tether runs``, ``tether incidents`` and the
rest. Ids carry a fresh suffix, so the demo can run again and again on the same database.
``tether demo --crash`` is in ``tether.demo_crash``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tether.app import App
from tether.demo_agents import CRAWL_DELAY, FETCH_TIMEOUT, SECOND_OPINION_DELAY, build_app
from tether.demo_history import show_checkpoint_and_restore, show_fork
from tether.errors import InvalidTransition
from tether.types import Event, RunInfo, RunStatus

ROLES = {"researcher": "demo-researcher", "writer": "demo-writer", "reviewer": "demo-reviewer"}
OPERATOR = "operator (simulated)"
OPERATOR_PAUSE = 0.4
"""Seconds the simulated operator takes to look at an incident before deciding."""

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
        infos = _watch(app, console, run_ids)
        took = time.monotonic() - started

        failed = [r for r in infos.values() if r.status != RunStatus.COMPLETED]
        console.print(f"all runs finished in {took:.1f}s")
        console.print(_summary(app, infos))
        console.print(_timeline(app, run_ids["researcher"], ids["researcher"]))

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


# -- the live part -------------------------------------------------------------------------


def _watch(app: App, console: Console, run_ids: dict[str, str]) -> dict[str, RunInfo]:
    """Work the runs on a worker thread; show events as they happen and a table of runs;
    resolve the incident as an operator would. Returns the runs once all are final."""
    ours = {run_id: role for role, run_id in run_ids.items()}
    last_seq = app.timeline(run_ids["researcher"])[0].seq - 1
    latest: dict[str, str] = {}
    noticed: dict[str, float] = {}
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
    infos = {run_id: app.get_run(run_id) for run_id in ours}
    # Off a terminal (a pipe, a test) the board is printed once at the end instead.
    live = Live(
        _board(infos, ours, latest),
        console=console,
        refresh_per_second=20,
        auto_refresh=console.is_terminal,
    )
    try:
        with live if console.is_terminal else contextlib.nullcontext(live):
            while True:
                for event in app.events(after_seq=last_seq):
                    last_seq = event.seq
                    if event.run_id not in ours:
                        continue
                    text, style = describe(event)
                    latest[event.run_id] = text
                    if event.type not in QUIET:
                        at = event.at.timestamp() - epoch if event.at else 0.0
                        live.console.print(
                            f"  [dim]{max(0.0, at):5.2f}s[/] {ours[event.run_id]:<10} "
                            f"[{style}]{escape(text)}[/]"
                        )
                infos = {run_id: app.get_run(run_id) for run_id in ours}
                _operate(app, live.console, infos, noticed)
                live.update(_board(infos, ours, latest))
                if all(info.status.is_final for info in infos.values()):
                    break
                if failure:
                    raise failure[0]
                if time.monotonic() - started > 60:
                    live.console.print("[red]the runs did not finish within 60s[/]")
                    break
                time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(timeout=30)
    if not console.is_terminal:
        console.print(_board(infos, ours, latest))
    return infos


def _operate(
    app: App, console: Console, infos: dict[str, RunInfo], noticed: dict[str, float]
) -> None:
    """The simulated operator: looks at a run that needs attention, then skips its step."""
    for run_id, info in infos.items():
        if info.status != RunStatus.NEEDS_ATTENTION:
            continue
        first_seen = noticed.setdefault(run_id, time.monotonic())
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
        noticed.pop(run_id, None)


def _board(infos: dict[str, RunInfo], ours: dict[str, str], latest: dict[str, str]) -> Table:
    table = Table(title="runs", title_justify="left", expand=False)
    for header in ("agent", "run", "status", "steps", "latest"):
        table.add_column(header, overflow="fold")
    for run_id, info in infos.items():
        table.add_row(
            info.agent_id,
            run_id,
            f"[{STATUS_STYLE.get(info.status, '')}]{info.status.value}[/]",
            str(info.steps),
            escape(latest.get(run_id, "")),
        )
    return table


# -- what happened, in words ---------------------------------------------------------------

QUIET = {"run.submitted", "run.claimed", "run.needs_attention"}
"""Events the live view does not print (the table shows them)."""


def describe(event: Event) -> tuple[str, str]:
    """An event in words, with a rich style."""
    d = event.data
    step = f"step {d.get('seq')} {d.get('name', '')}".rstrip()
    kind = event.type
    if kind == "run.submitted":
        return "submitted", "dim"
    if kind in ("run.claimed", "run.recovered"):
        worker, fence = d.get("worker"), d.get("fence")
        if fence == 1:
            return f"claimed by worker {worker}", "dim"
        return f"claimed by worker {worker} (epoch {fence}): replays its journal", "dim"
    if kind == "step.completed":
        again = f" on attempt {d['attempt']}" if d.get("attempt") else ""
        return f"{step} completed{again}", "green"
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
    if kind == "run.completed":
        return f"completed ({d.get('steps')} journal entries)", "bold green"
    if kind == "run.released":
        return f"handed back at step {d.get('seq')}: {d.get('reason')}", "yellow"
    if kind == "run.lease_expired":
        return "its worker is gone: claimable again", "yellow"
    data = " ".join(f"{k}={v}" for k, v in d.items())
    return f"{kind} {data}".strip(), ""


def _summary(app: App, infos: dict[str, RunInfo]) -> Table:
    table = Table(title="summary of the runs", title_justify="left")
    for header in ("agent", "run", "status", "steps", "failed attempts", "incident", "took"):
        table.add_column(header, overflow="fold")
    for run_id, info in infos.items():
        events = app.timeline(run_id)
        failures = sum(1 for e in events if e.type == "step.failed")
        decisions = [e.data.get("action") for e in events if e.type == "incident.resolved"]
        took = "-"
        if info.finished_at is not None:
            took = f"{(info.finished_at - info.created_at).total_seconds():.2f}s"
        table.add_row(
            info.agent_id,
            run_id,
            f"[{STATUS_STYLE.get(info.status, '')}]{info.status.value}[/]",
            str(info.steps),
            str(failures),
            ", ".join(f"resolved: {d}" for d in decisions) or "-",
            took,
        )
    return table


def _timeline(app: App, run_id: str, agent_id: str) -> Group:
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
    steps = Table(title="its journal", title_justify="left")
    for header in ("seq", "name", "kind", "status", "attempts", "output"):
        steps.add_column(header, overflow="fold")
    for s in app.run_steps(run_id):
        output = json.dumps(s.output, ensure_ascii=False)
        steps.add_row(
            str(s.seq),
            s.name,
            s.kind,
            s.status.value,
            str(s.attempts),
            escape(output if len(output) <= 48 else output[:45] + "..."),
        )
    return Group(table, steps)
