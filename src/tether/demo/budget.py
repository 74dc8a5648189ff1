"""The budget of ``tether demo``: the researcher's searches are paid for, and its budget runs
out.

The coordinator spawns the researcher's run with a budget (``RESEARCH_BUDGET`` in
``tether.demo.agents``: three searches' worth, ``on_breach="pause"``). Each search declares
its cost on its step; the ledger reserves it before the step starts and charges it in the
step's own write. The fourth search would go over the limit: it does not start, a
``budget.exceeded`` event says why, and the run waits (kind ``budget``), holding no thread,
until a person raises the limit. The simulated operator does (``raise_limit``, through
``App.raise_budget``: a ``budget.raised`` event), which wakes the run; the search runs and the
run goes on. Afterwards ``check_budget`` reads the database: one breach, one raise after it,
the step that waited executed only after the raise, the run completed, and the ledger's usage
equal to the sum of the costs committed with its steps (``App.usage``).
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether.app import App
from tether.types import Event, RunStatus

EXECUTED = ("step.completed", "step.failed")
"""Events written each time a step's body ran."""


def paused_on(app: App, run_id: str, handled: set[int]) -> Event | None:
    """The breach a waiting run ``run_id`` waits on until a person raises a limit: its newest
    ``budget.exceeded`` event, if its action is ``pause`` and its seq is not in ``handled``."""
    found = app.events(run_id=run_id, types=["budget.exceeded"])
    if not found or found[-1].seq in handled or found[-1].data.get("action") != "pause":
        return None
    return found[-1]


def raise_limit(app: App, console: Console, hit: Event, actor: str) -> float:
    """As ``actor``, raise the limit that ``hit`` (a ``budget.exceeded`` event) names to twice
    its maximum, or to what the refused step needs if that is more; returns the new maximum."""
    d = hit.data
    field = str(d["limit"]).partition("=")[0]
    needs = float(d["used"]) + float(d["reserved"]) + float(d["needed"])
    top = max(2 * float(d["max"]), needs)
    change: dict[str, Any] = {field: top}
    if field.startswith("max_calls["):  # max_calls[web_search]: a count per tool
        change = {"max_calls": {field[len("max_calls[") : -1]: math.ceil(top)}}
    elif field in ("max_steps", "max_tokens"):
        change = {field: math.ceil(top)}
    woken = app.raise_budget(d["holder"], actor=actor, **change)
    console.print(
        f"  [bold magenta]{escape(actor)}[/] raises {field} of run {d['holder']}'s budget: "
        f"{float(d['max']):g} -> {top:g} (App.raise_budget); wakes {', '.join(woken) or 'nobody'}"
    )
    return top


def check_budget(app: App, console: Console, run_id: str) -> bool:
    """Say what the budget of ``run_id`` did, from the database, with its usage; False unless
    the run hit its budget once and waited, the limit was raised once after that, the step
    that waited executed only after the raise, the run completed, and the ledger's usage is
    the sum of the costs committed with the run's steps."""
    info = app.get_run(run_id)
    events = app.timeline(run_id)
    hits = [e for e in events if e.type == "budget.exceeded"]
    raises = [e for e in events if e.type == "budget.raised"]
    waits = [e for e in events if e.type == "run.waiting" and e.data.get("kind") == "budget"]
    if len(hits) != 1 or len(raises) != 1 or len(waits) != 1 or raises[0].seq < hits[0].seq:
        console.print(
            f"[red]BUG: run {run_id} hit its budget {len(hits)} times, waited {len(waits)} "
            f"times and had it raised {len(raises)} times: not once each, in that order[/]"
        )
        return False
    hit, raised = hits[0].data, raises[0].data
    ran = [e for e in events if e.type in EXECUTED and e.data.get("seq") == hit["seq"]]
    if info.status != RunStatus.COMPLETED or not ran or ran[0].seq < raises[0].seq:
        console.print(
            f"[red]BUG: run {run_id} ended {info.status.value}; step {hit['seq']} "
            f"{escape(str(hit['step']))} ran {len(ran)} times, the first before the raise: "
            f"{bool(ran) and ran[0].seq < raises[0].seq}[/]"
        )
        return False
    field = str(hit["limit"]).partition("=")[0]
    usage = app.usage(run_id)
    steps = [s for s in app.run_steps(run_id) if s.cost is not None]
    spent = sum(s.cost or 0.0 for s in steps)
    [ledger] = [lim for lim in usage.limits if lim.holder == run_id and lim.limit == field]
    if not (
        math.isclose(ledger.used, spent, abs_tol=1e-9)
        and usage.usage.cost is not None
        and math.isclose(usage.usage.cost, spent, abs_tol=1e-9)
        and ledger.max == raised["to"]
    ):
        console.print(
            f"[red]BUG: the ledger says run {run_id} used {ledger.used:g} of {field} (max "
            f"{ledger.max:g}), its steps' costs add up to {spent:g}, App.usage says "
            f"{usage.usage.cost}[/]"
        )
        return False
    table = Table(title=f"what run {run_id} spent, step by step", title_justify="left")
    for header in ("seq", "step", "tool", "attempts", "cost"):
        table.add_column(header, overflow="fold")
    for s in steps:
        table.add_row(str(s.seq), s.name, s.tool or "-", str(s.attempts), f"{s.cost:g}")
    table.add_row("", f"ledger: {field}", "", "", f"{ledger.used:g} of {ledger.max:g}")
    console.print(table)
    console.print(
        f"budget: run {run_id} hit {hit['limit']} at step {hit['seq']} {escape(hit['step'])} "
        f"(used {hit['used']:g}, needed {hit['needed']:g} more) and waited, holding no thread; "
        f"{escape(str(raised['actor']))} raised it {raised['from']:g} -> {raised['to']:g}; the "
        f"step then ran once and the run completed, having spent {ledger.used:g}: the ledger's "
        f"usage is the sum of its {len(steps)} steps' costs (App.usage; tether runs usage "
        f"{run_id})"
    )
    return True
