"""The history part of ``tether demo``: a checkpoint, a restore, and a fork.

An agent's state is checkpointed, wiped by a careless edit, and restored: the restore is a
new state version equal to the checkpointed one, and the diff shows what it gave back. Then
a finished run is forked from its first step: the new run reuses that step from the journal
(the writer's first entry is the brief it received, so the fork takes no message again) and
executes only the later ones, which the events of each run show step by step (a step's
``step.completed`` or ``step.failed`` event is written only when its body really ran), and
the original run is left exactly as it was.
"""

from __future__ import annotations

import json
from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether.app import App

FORK_FROM = 1
"""The step the demo forks the writer's run from."""

EXECUTED = ("step.completed", "step.failed")
"""Events written each time a step's body ran (retries included)."""


def show_checkpoint_and_restore(app: App, console: Console, agent_id: str) -> bool:
    """Checkpoint ``agent_id``'s state, overwrite it, restore it; False if that went wrong."""
    ckpt = app.checkpoint(agent_id, "after-research")
    console.print(
        f"  checkpoint {ckpt.checkpoint_id} [bold]{ckpt.name}[/]: {agent_id}'s state at "
        f"version {ckpt.version}"
    )
    wiped = app.set_state(agent_id, {"role": ckpt.state.get("role")}, reason="careless cleanup")
    console.print(
        f"  a careless cleanup script overwrites it: version {wiped.version} "
        f"[red]{escape(json.dumps(wiped.state))}[/]"
    )
    restored = app.restore(ckpt.checkpoint_id)
    same = restored.state == ckpt.state
    console.print(
        f"  restore {ckpt.checkpoint_id}: version {restored.version}, "
        + ("[green]equal to the checkpoint[/]" if same else "[red]NOT equal to the checkpoint[/]")
        + " (every earlier version is kept)"
    )
    table = Table(
        title=f"what the restore gave back: version {wiped.version} -> {restored.version}",
        title_justify="left",
    )
    for header in ("op", "path", "from", "to"):
        table.add_column(header, overflow="fold")
    for op in app.state_diff(agent_id, wiped.version, restored.version):
        before, after = (_compact(op[k]) if k in op else "" for k in ("from", "to"))
        table.add_row(op["op"], op["path"], escape(before), escape(after))
    console.print(table)
    if not same:
        console.print(f"[red]BUG: restoring {ckpt.checkpoint_id} did not give back its state[/]")
    return same


def show_fork(app: App, console: Console, run_id: str) -> bool:
    """Fork the finished ``run_id`` from ``FORK_FROM`` and run the fork; False on a surprise."""
    original, journal = app.get_run(run_id), app.run_steps(run_id)
    fork = app.fork(run_id, from_step=FORK_FROM)
    console.print(
        f"  fork {original.agent_id}'s run {run_id} from step {FORK_FROM}: the new run "
        f"{fork.run_id} reuses step {FORK_FROM} from the journal and executes the rest"
    )
    app.work(until_idle=True, timeout=30)
    info = fork.info()
    ran = {rid: _executions(app, rid) for rid in (run_id, fork.run_id)}
    table = Table(title="executions of each step, from the runs' events", title_justify="left")
    for header in ("step", "name", "original run", "fork"):
        table.add_column(header, overflow="fold")
    for step in app.run_steps(fork.run_id):
        again = ran[fork.run_id][step.seq]
        reused = "[dim]reused from the journal (0x)[/]"
        if step.kind == "receive":
            reused = "[dim]reused from the journal (0x): no message taken again[/]"
        table.add_row(
            str(step.seq),
            f"{step.name} ({step.kind})" if step.kind != "step" else step.name,
            f"ran {ran[run_id][step.seq]}x" if step.kind == "step" else "[dim]no body to run[/]",
            f"ran {again}x" if again else reused,
        )
    console.print(table)
    untouched = app.get_run(run_id) == original and app.run_steps(run_id) == journal
    console.print(
        f"  fork {fork.run_id} {info.status.value}; original {run_id} "
        + ("untouched: same status, journal and result" if untouched else "[red]CHANGED[/]")
    )
    expected = set(range(FORK_FROM + 1, len(journal) + 1))
    if set(ran[fork.run_id]) != expected or not untouched or info.status.value != "completed":
        console.print(f"[red]BUG: the fork of {run_id} did not behave as a fork should[/]")
        return False
    return True


def _executions(app: App, run_id: str) -> Counter[int]:
    """How many times each step's body ran in ``run_id``, from its events."""
    return Counter(e.data["seq"] for e in app.timeline(run_id) if e.type in EXECUTED)


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
