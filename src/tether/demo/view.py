"""The live view of ``tether demo``: events in words as they happen, a board of the runs, then a
summary and one run's timeline and journal.

``watch`` works the runs on a worker thread in this process and redraws the board until every
run is final; on each pass it hands the runs to the scenario (``act``), which is where the
simulated operator lives. Off a terminal (a pipe, a test) the board is printed once at the end.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tether.app import App
from tether.types import Event, RunInfo, RunStatus

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

Act = Callable[[App, Console, dict[str, RunInfo]], None]
"""What the scenario does on each pass of the view, given the runs as they are now."""


def watch(app: App, console: Console, run_ids: dict[str, str], act: Act) -> dict[str, RunInfo]:
    """Work the runs on a worker thread; show events as they happen and a table of runs.

    Args:
        app: The App the runs are on.
        console: Where to draw.
        run_ids: The runs to watch, by the role shown for each.
        act: Called on each pass with the runs' current state (the simulated operator).

    Returns:
        The runs, once all are final (or after 60 seconds).
    """
    ours = {run_id: role for role, run_id in run_ids.items()}
    last_seq = min(app.timeline(run_id)[0].seq for run_id in ours) - 1
    latest: dict[str, str] = {}
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
                act(app, live.console, infos)
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


def summary(app: App, infos: dict[str, RunInfo]) -> Table:
    """A row per run: status, steps, failed attempts, how its incident was resolved, time."""
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
