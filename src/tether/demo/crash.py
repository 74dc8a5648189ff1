"""``tether demo --crash``: kill a real worker mid-run, resume on another, prove the journal.

A run of ``STEPS`` short steps is submitted; each step first appends a line (run, step, pid) to
a side-effect file next to the database, then works for 50-95 ms. A worker process
(``python -m tether worker --app tether.demo.agents:app``) starts on it and is killed with
SIGKILL as step ``KILL_AT`` begins. A second worker process recovers the run at start-up (the
first one's process is gone, so there is no lease to wait for) and finishes it by replay; it is
then stopped with SIGTERM. The side-effect file is the ground truth of what really ran: every
step that had finished (was journaled) before the kill must appear exactly once. The step in
flight at the kill may appear twice; that is at-least-once, and the report says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tether.app import App
from tether.demo.agents import Pipeline, build_app, effects_path
from tether.types import RunStatus, StepStatus

STEPS = 20
KILL_AT = 8
"""The worker is killed as soon as this step has begun (the steps before it are journaled)."""
WORKER_APP = "tether.demo.agents:app"
START_TIMEOUT = 60.0
FINISH_TIMEOUT = 60.0


@dataclass
class Worker:
    """A worker subprocess and what it printed."""

    number: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    state: str = "running"

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid

    def output(self) -> str:
        """Everything it wrote on stdout and stderr."""
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")


@dataclass
class Progress:
    """What the side-effect file and the journal say about the run now."""

    executions: Counter[int] = field(default_factory=Counter)
    pids: defaultdict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    committed: set[int] = field(default_factory=set)
    status: RunStatus = RunStatus.PENDING


def run_crash_demo(url: str | None, console: Console) -> int:
    """Run the crash scenario on ``url`` (default ``TETHER_DATABASE_URL``, else ./tether.db).

    Returns:
        0 when no step that had finished before the kill ran again and the run completed.
    """
    from tether.store.database import DEFAULT_URL

    given, url = url, url or os.environ.get("TETHER_DATABASE_URL") or DEFAULT_URL
    with build_app(url) as app:
        target = app.store.target
        where = f"{target.sqlite_path.resolve()} (SQLite)" if target.sqlite_path else target.display
        effects = effects_path(target.sqlite_path)
        console.print(f"[bold]tether demo --crash[/] on {where}")
        agent_id = f"pipeline-{uuid.uuid4().hex[:6]}"
        app.create_agent(Pipeline.type, agent_id)
        app.initialize(agent_id, reason="crash demo")
        app.activate(agent_id, reason="crash demo")
        run_id = app.submit(agent_id, {"steps": STEPS, "effects": str(effects)}).run_id
        console.print(
            f"run {run_id} on agent {agent_id}: {STEPS} steps of 50-95 ms; each step first "
            f"appends a line to {effects}"
        )
        workers: list[Worker] = []
        try:
            code = _scenario(app, console, url, run_id, effects, workers)
            console.print(
                f"Explore{'' if given is None else ' (with the same --db)'}: "
                f"tether runs timeline {run_id}; tether runs show {run_id}"
            )
            return code
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
                w.log.close()


def _scenario(
    app: App, console: Console, url: str, run_id: str, effects: Path, workers: list[Worker]
) -> int:
    first = _start_worker(url, 1)
    workers.append(first)
    console.print(f"worker 1 started: pid {first.pid} (python -m tether worker --app {WORKER_APP})")
    progress = Progress()
    live = Live(console=console, refresh_per_second=20, auto_refresh=console.is_terminal)
    with live if console.is_terminal else _NoLive(live):
        deadline = time.monotonic() + START_TIMEOUT
        while progress.executions[KILL_AT] == 0:
            progress = _read(app, run_id, effects)
            live.update(_view(progress, workers))
            if first.proc.poll() is not None or time.monotonic() > deadline:
                console.print(f"[red]worker 1 did not reach step {KILL_AT}[/]")
                console.print(first.output())
                return 1
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait()  # reaped: its pid is gone, which is how the next worker knows
        first.state = "killed (SIGKILL)"
        at_kill = _read(app, run_id, effects)
        live.update(_view(at_kill, workers))
        in_flight = sorted(set(at_kill.executions) - at_kill.committed)
        live.console.print(
            f"[bold red]kill -9[/] worker 1 (pid {first.pid}): "
            f"{_span(at_kill.committed)} journaled, "
            f"{_span(set(in_flight)) if in_flight else 'no step'} in flight"
        )
        killed_at = time.monotonic()
        second = _start_worker(url, 2)
        workers.append(second)
        live.console.print(
            f"worker 2 started: pid {second.pid}; at start-up it recovers runs of dead workers "
            "on this host (no lease to wait for) and resumes them by replay"
        )
        deadline = time.monotonic() + FINISH_TIMEOUT
        progress = at_kill
        while not progress.status.is_final:
            progress = _read(app, run_id, effects)
            live.update(_view(progress, workers))
            if second.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        took = time.monotonic() - killed_at
        if second.proc.poll() is None:
            second.proc.send_signal(signal.SIGTERM)
            try:
                second.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                second.proc.kill()
                second.proc.wait()
        second.state = f"stopped by SIGTERM (exit {second.proc.returncode})"
        progress = _read(app, run_id, effects)
        live.update(_view(progress, workers))
    console.print(f"run {run_id} is {progress.status.value}, {took:.1f}s after the kill")
    return _prove(app, console, run_id, at_kill, progress, workers)


def _start_worker(url: str, number: int) -> Worker:
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by run_crash_demo, after reading)
    command = [sys.executable, "-m", "tether", "worker", "--app", WORKER_APP, "--db", url]
    proc = subprocess.Popen(
        [*command, "--log-level", "warning"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TETHER_DATABASE_URL": url},
    )
    return Worker(number, proc, log)


def _read(app: App, run_id: str, effects: Path) -> Progress:
    progress = Progress()
    try:
        lines = effects.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == run_id:
            seq, pid = int(parts[1]), int(parts[2])
            progress.executions[seq] += 1
            progress.pids[seq].append(pid)
    progress.committed = {s.seq for s in app.run_steps(run_id) if s.status == StepStatus.COMPLETED}
    progress.status = app.get_run(run_id).status
    return progress


def _view(progress: Progress, workers: list[Worker]) -> Group:
    lines = [
        Text.assemble(
            (f"worker {w.number}", "bold"),
            f"  pid {w.pid}  ",
            (w.state, "red" if "killed" in w.state else "green"),
        )
        for w in workers
    ]
    strip = Text()
    for seq in range(1, STEPS + 1):
        runs = progress.executions[seq]
        if seq in progress.committed:
            style = "black on green" if runs <= 1 else "black on yellow"
        elif runs:
            style = "black on cyan"
        else:
            style = "dim"
        strip.append(f"{seq:02d}", style)
        strip.append(" ")
    legend = Text.assemble(
        (" done ", "black on green"),
        " ",
        (" running ", "black on cyan"),
        " ",
        (" done, ran twice ", "black on yellow"),
        f"   journal: {len(progress.committed)}/{STEPS} steps, run {progress.status.value}",
    )
    return Group(*lines, strip, legend)


def _prove(
    app: App,
    console: Console,
    run_id: str,
    at_kill: Progress,
    final: Progress,
    workers: list[Worker],
) -> int:
    """The report: each step's executions and journal entry, and the verdict."""
    who = {w.pid: f"worker {w.number}" for w in workers}
    steps = {s.seq: s for s in app.run_steps(run_id)}
    table = Table(title=f"proof for run {run_id}", title_justify="left")
    for header in ("step", "executed", "by", "journal", "note"):
        table.add_column(header)
    twice_after_finish: list[int] = []
    again_in_flight: list[int] = []
    for seq in range(1, STEPS + 1):
        runs = final.executions[seq]
        entry = steps.get(seq)
        journaled = entry is not None and entry.status == StepStatus.COMPLETED
        note = ""
        if runs > 1 and seq in at_kill.committed:
            twice_after_finish.append(seq)
            note = "[bold red]finished before the kill, yet ran again[/]"
        elif runs > 1:
            again_in_flight.append(seq)
            note = "[yellow]in flight at the kill: ran again (at-least-once)[/]"
        elif seq in at_kill.committed:
            note = "[dim]journaled before the kill: replayed, not re-run[/]"
        table.add_row(
            f"{seq:02d}",
            f"{runs}x",
            ", ".join(dict.fromkeys(who.get(p, f"pid {p}") for p in final.pids[seq])) or "-",
            "[green]completed[/]" if journaled else "[red]missing[/]",
            note,
        )
    console.print(table)
    events = [e for e in app.timeline(run_id) if not e.type.startswith("step.")]
    console.print("run events: " + " -> ".join(_label(e.type, e.data, who) for e in events))
    all_journaled = all(
        steps.get(seq) is not None and steps[seq].status == StepStatus.COMPLETED
        for seq in range(1, STEPS + 1)
    )
    all_ran = all(final.executions[seq] >= 1 for seq in range(1, STEPS + 1))
    graceful = workers[-1].proc.returncode == 0
    if all_journaled and final.status == RunStatus.COMPLETED:
        console.print(f"[green]ok[/] every one of the {STEPS} steps completed in the journal")
    else:
        console.print(f"[red]FAILED[/] the run is {final.status.value}; not every step completed")
    if not twice_after_finish:
        console.print(
            f"[green]ok[/] no finished step ran twice: {_span(at_kill.committed)} had finished "
            "before the kill and were replayed from the journal, not executed again"
        )
    else:
        console.print(f"[red]FAILED[/] finished steps ran twice: {_span(set(twice_after_finish))}")
    for seq in again_in_flight:
        console.print(
            f"[yellow]at-least-once: step {seq} was in flight at the kill[/] and ran again in "
            "worker 2; pass tether.current_step().idempotency_key to outside systems so they "
            "can deduplicate such an effect, or declare the step at_most_once"
        )
    if not all_ran:
        console.print("[red]FAILED[/] some steps never ran")
    console.print(
        f"{'[green]ok[/]' if graceful else '[red]FAILED[/]'} worker 2 stopped gracefully on "
        f"SIGTERM (exit {workers[-1].proc.returncode})"
    )
    if not graceful:
        console.print(workers[-1].output())
    ok = all_journaled and all_ran and not twice_after_finish and graceful
    return 0 if ok and final.status == RunStatus.COMPLETED else 1


def _label(kind: str, data: dict[str, Any], who: dict[int, str]) -> str:
    """``run.claimed (worker 2)``: an event named with the demo's worker that caused it."""
    worker = data.get("worker")
    if not worker:
        return kind
    parts = str(worker).split(":")  # host:pid:random
    pid = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
    return f"{kind} ({who.get(pid, worker)})"


def _span(seqs: set[int]) -> str:
    """``steps 1-7`` for a contiguous set, else the list."""
    if not seqs:
        return "no steps"
    ordered = sorted(seqs)
    if len(ordered) == 1:
        return f"step {ordered[0]}"
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"steps {ordered[0]}-{ordered[-1]}"
    return "steps " + ", ".join(map(str, ordered))


class _NoLive:
    """Off a terminal: no live display; the last view is printed once at the end."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def __enter__(self) -> Live:
        return self.live

    def __exit__(self, *exc: object) -> None:
        self.live.console.print(self.live.renderable)
