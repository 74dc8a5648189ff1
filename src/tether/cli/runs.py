"""``tether runs ...``: submit runs, read their journal and timeline, wait, cancel, retry, and
see and raise what they may spend."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from tether.cli.common import (
    CliState,
    Column,
    JsonParam,
    OrderedGroup,
    Row,
    compact_json,
    dump_json,
    emit,
    emit_one,
    error,
    limit_option,
    output_option,
    pass_state,
)
from tether.errors import Refused, RunFailed
from tether.types import RunStatus

if TYPE_CHECKING:
    from tether.app import App, RunHandle
    from tether.types import Event, LimitInfo, RunUsage, Usage

RUN_COLUMNS: list[Column] = [
    ("run", "run_id"),
    ("agent", "agent_id"),
    ("status", "status"),
    ("steps", "steps"),
    ("claims", "attempts"),
    ("created", "created_at"),
    ("finished", "finished_at"),
]
STEP_COLUMNS: list[Column] = [
    ("seq", "seq"),
    ("name", "name"),
    ("kind", "kind"),
    ("status", "status"),
    ("attempts", "attempts"),
    ("output or error", "outcome"),
    ("finished", "finished_at"),
]
EVENT_COLUMNS: list[Column] = [
    ("at (UTC)", "time"),
    ("event", "type"),
    ("data", "details"),
]
USAGE_COLUMNS: list[Column] = [
    ("run", "run"),
    ("agent", "agent_id"),
    ("status", "status"),
    ("steps", "steps"),
    ("cost", "cost"),
    ("tokens", "tokens"),
    ("calls", "calls"),
]
LIMIT_COLUMNS: list[Column] = [
    ("holder", "holder"),
    ("limit", "limit"),
    ("max", "max"),
    ("used", "used"),
    ("reserved", "reserved"),
    ("left", "left"),
    ("action", "action"),
]

FORK_BUDGETS = ("fresh", "inherit")
"""``App.fork``'s ``budget`` choices, for the option's help (command modules import
``tether.app`` only inside functions, see ``tether.cli``; a test holds the two equal)."""

ANY_JSON = JsonParam()


def _wait_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--wait`` (for WHAT, printed as JSON) and ``--timeout``: for commands starting a run.

    The command receives ``wait`` and ``timeout``; ``_answer_started`` answers with them.
    """
    options = [
        click.option("--wait", is_flag=True, help=f"Wait for {what} and print it (JSON)."),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0),
            metavar="SECONDS",
            help="With --wait: give up after this long (exit 124).",
        ),
    ]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@click.group(cls=OrderedGroup)
def runs() -> None:
    """Submit runs, follow their journal and timeline, wait for results, cancel and retry;
    see what they used and raise their budgets."""


@runs.command()
@click.argument("agent_id")
@click.argument("task", metavar="[TASK_JSON]", required=False, type=ANY_JSON)
@click.option("--task-id", metavar="ID", help="Idempotency key: submitting it again is a no-op.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option(
    "--budget",
    type=ANY_JSON,
    metavar="JSON",
    help="What the run and everything it delegates may spend, as tether.Budget's fields: "
    '\'{"max_cost": 5, "on_breach": "pause"}\' or @file.json.',
)
@click.option(
    "--policy",
    type=ANY_JSON,
    metavar="JSON",
    help="Which tools it may call and to whom it may send, as tether.Policy's fields: "
    '\'{"allowed_tools": ["web_search"]}\' or @file.json.',
)
@_wait_options("the result")
@output_option()
@pass_state
def submit(
    state: CliState,
    agent_id: str,
    task: Any,
    task_id: str | None,
    priority: int,
    budget: Any,
    policy: Any,
    wait: bool,
    timeout: float | None,
    output: str,
) -> None:
    """Start a run of TASK_JSON (inline JSON or @file.json) on the active agent AGENT_ID.

    Prints the run id; a worker executes the run. With --wait, prints the run's result
    instead: exit 0 if it completed, 1 if it failed or was cancelled, 124 on --timeout.
    A --budget or --policy that is not valid is refused (exit 2) and no run is created.
    """
    app = state.get_app()
    handle = app.submit(
        agent_id, task, task_id=task_id, priority=priority, budget=budget, policy=policy
    )
    if wait:
        click.echo(f"submitted run {handle.run_id}; waiting for its result", err=True)
    _answer_started(app, handle, wait, timeout, output)


@runs.command("list")
@click.option("--agent", "agent_id", metavar="ID", help="Only runs of this agent.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in RunStatus], case_sensitive=False),
    help="Only runs in this status (repeatable).",
)
@limit_option(default=50)
@output_option()
@pass_state
def list_(
    state: CliState, agent_id: str | None, statuses: tuple[str, ...], limit: int, output: str
) -> None:
    """List runs, newest first. A pending run held back by a cap says so (waiting for)."""
    app = state.get_app()
    found = app.list_runs(agent_id=agent_id, status=list(statuses), limit=limit)
    pending = [r.run_id for r in found if r.status == RunStatus.PENDING]
    reasons = app.pending_reasons(pending) if pending else {}
    rows = [Row(r.to_dict() | {"waiting_for": reasons.get(r.run_id)}) for r in found]
    columns = [*RUN_COLUMNS, ("waiting for", "waiting_for")] if pending else RUN_COLUMNS
    emit(rows, output, columns, id_key="run_id")


@runs.command()
@click.argument("run_id", metavar="RUN")
@output_option()
@pass_state
def show(state: CliState, run_id: str, output: str) -> None:
    """Show one run (input, status, result or error, times, usage) and its journal of steps.

    Usage is the run's own and its subtree's (``total``); ``tether runs usage`` details it.
    """
    app = state.get_app()
    run = app.get_run(run_id).to_dict()
    pending = run["status"] == RunStatus.PENDING.value
    run["waiting_for"] = app.pending_reasons([run_id]).get(run_id) if pending else None
    used = app.usage(run_id)
    run["usage"] = {"usage": used.usage.to_dict(), "total": used.total.to_dict()}
    journal = [s.to_dict() for s in app.run_steps(run_id)]
    if output in ("json", "jsonl"):
        whole = {**run, "journal": journal}
        click.echo(dump_json(whole) if output == "json" else json.dumps(whole, ensure_ascii=False))
        return
    if output == "ids":
        click.echo(run_id)
        return
    failure = run.get("error")
    if isinstance(failure, dict) and "traceback" in failure:
        short = {k: v for k, v in failure.items() if k != "traceback"}
        run = {**run, "error": {**short, "traceback": "(see -o json)"}}
    run["usage"] = _usage_line(used)
    emit_one(Row(run), "table")
    rows = [Row({**s, "outcome": _outcome(s)}) for s in journal]
    emit(rows, "table", STEP_COLUMNS, title=f"journal of {run_id}")


@runs.command()
@click.argument("run_id", metavar="RUN")
@output_option(ids=False)
@pass_state
def timeline(state: CliState, run_id: str, output: str) -> None:
    """Everything that happened to a run, in order: steps, retries, waits, incidents, decisions.

    The table shows each event's data compactly; -o json gives the full events.
    """
    events = state.get_app().timeline(run_id)
    if output != "table":
        emit(events, output, EVENT_COLUMNS)
        return
    emit([_event_row(e) for e in events], "table", EVENT_COLUMNS, title=f"timeline of {run_id}")


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--wait", is_flag=True, help="Wait until the run finishes.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait at most this long (implies --wait), then exit 124.",
)
@pass_state
def result(state: CliState, run_id: str, wait: bool, timeout: float | None) -> None:
    """Print a run's result (JSON): exit 0 if it completed, 1 if it failed or was cancelled.

    A run that has not finished is refused (1), unless --wait waits for it.
    """
    app = state.get_app()
    if wait or timeout is not None:
        _print_result(app, run_id, timeout)
        return
    info = app.get_run(run_id)
    if info.status == RunStatus.COMPLETED:
        click.echo(dump_json(info.result))
    elif info.status.is_final:
        raise RunFailed(run_id, info.status.value, (info.error or {}).get("message"))
    elif info.status == RunStatus.NEEDS_ATTENTION:
        raise Refused(
            f"run {run_id} needs attention and has no result; see its incident: "
            f"tether incidents list --run {run_id}"
        )
    else:
        raise Refused(
            f"run {run_id} is {info.status.value} and has no result yet; wait for it with: "
            f"tether runs result {run_id} --wait"
        )


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--reason", default="", help="Why; recorded with the cancellation.")
@output_option()
@pass_state
def cancel(state: CliState, run_id: str, reason: str, output: str) -> None:
    """Cancel an unfinished run (and its child runs); a worker stops it at its next step."""
    info = state.get_app().cancel(run_id, reason=reason)
    if output == "table":
        click.echo(f"run {info.run_id} is now cancelled")
    else:
        emit_one(info, output, id_key="run_id")


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--comment", default="", help="Recorded with the decision.")
@output_option()
@pass_state
def retry(state: CliState, run_id: str, comment: str, output: str) -> None:
    """Retry a run that needs attention: its failed step runs again on a worker.

    This resolves the run's open incident with ``retry`` (see ``tether incidents``).
    """
    incident = state.get_app().retry_run(run_id, comment=comment)
    if output == "table":
        click.echo(
            f"run {run_id} will be retried: incident {incident.incident_id} resolved with "
            "retry; a worker resumes the run"
        )
    else:
        emit_one(incident, output, id_key="incident_id")


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option(
    "--from-step",
    "from_step",
    type=click.IntRange(min=0),
    required=True,
    metavar="N",
    help="Reuse the journal up to step N (0: none) and execute the rest afresh.",
)
@click.option(
    "--task", type=ANY_JSON, help="Run the rest with this task instead (JSON or @file.json)."
)
@click.option(
    "--budget",
    type=click.Choice(FORK_BUDGETS),
    default="fresh",
    show_default=True,
    help="fresh: the fork spends against a budget of its own, from zero; inherit: also against "
    "RUN's, which holds what RUN used.",
)
@_wait_options("the fork's result")
@output_option()
@pass_state
def fork(
    state: CliState,
    run_id: str,
    from_step: int,
    task: Any,
    budget: str,
    wait: bool,
    timeout: float | None,
    output: str,
) -> None:
    """Start a new run from RUN's finished step N: steps 1..N are reused from its journal,
    the rest execute afresh on a worker. RUN itself is not touched.

    Prints the new run id; with --wait, its result (as runs submit --wait). Refused (exit 1)
    past RUN's last finished step.
    """
    app = state.get_app()
    handle = app.fork(run_id, from_step, task=task, budget=budget)
    reused = {0: "no step reused", 1: "step 1 reused"}.get(from_step, f"steps 1-{from_step} reused")
    click.echo(f"forked run {run_id} from step {from_step} ({reused}): {handle.run_id}", err=True)
    _answer_started(app, handle, wait, timeout, output)


@runs.command()
@click.argument("run_id", metavar="RUN")
@output_option(ids=False)
@pass_state
def usage(state: CliState, run_id: str, output: str) -> None:
    """What RUN and every run below it used (steps, cost, tokens, calls per tool), and the
    limits it is held to: its own budget's, then its ancestors'.

    -o json gives App.usage(RUN) as it is.
    """
    found = state.get_app().usage(run_id)
    if output != "table":
        emit_one(found, output)
        return
    rows = [
        Row(
            {
                "run": "  " * run["depth"] + run["run_id"],
                "agent_id": run["agent_id"],
                "status": run["status"],
                **_usage_cells(run["usage"]),
            }
        )
        for run in found.runs
    ]
    emit(rows, "table", USAGE_COLUMNS, title=f"usage of {run_id} and the runs below it")
    counted = f" of {len(found.runs)} runs" if len(found.runs) > 1 else ""
    click.echo(f"total{counted}: {_summary(found.total)}\n")
    _print_limits(found)


def _max_calls(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, int]:
    """``--max-calls TOOL=N ...`` as ``{TOOL: N}``."""
    counts: dict[str, int] = {}
    for value in values:
        tool, equals, text = value.rpartition("=")
        tool = tool.strip()
        if not equals or not tool:
            raise click.BadParameter(f"{value!r} is not TOOL=N, e.g. --max-calls web_search=20")
        try:
            count = int(text)
        except ValueError:
            count = -1
        if count < 0:
            raise click.BadParameter(f"{value!r}: N must be a whole number >= 0, got {text!r}")
        if tool in counts:
            raise click.BadParameter(f"{tool} is given twice ({tool}={counts[tool]}, {value})")
        counts[tool] = count
    return counts


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--max-steps", type=click.IntRange(min=0), metavar="N", help="Steps completed.")
@click.option(
    "--max-cost", type=click.FloatRange(min=0), metavar="X", help="Cost, in the unit steps declare."
)
@click.option("--max-tokens", type=click.IntRange(min=0), metavar="N", help="Tokens.")
@click.option(
    "--max-duration",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Seconds from the run's start.",
)
@click.option(
    "--max-calls",
    multiple=True,
    callback=_max_calls,
    metavar="TOOL=N",
    help="Calls of TOOL (repeatable).",
)
@output_option(ids=False)
@pass_state
def budget(
    state: CliState,
    run_id: str,
    max_steps: int | None,
    max_cost: float | None,
    max_tokens: int | None,
    max_duration: float | None,
    max_calls: dict[str, int],
    output: str,
) -> None:
    """Set limits of RUN's own budget (usually to raise them) and wake the runs waiting for
    it (on_breach "pause"), then print the limits RUN is held to.

    RUN is the holder that a BudgetExceeded error or tether runs usage names. A limit its
    budget does not have, or a run with no budget in the ledger, is not found (exit 4); of
    several limits, either all are set or none. Each change is a budget.raised event.
    """
    if all(v is None for v in (max_steps, max_cost, max_tokens, max_duration)) and not max_calls:
        raise click.UsageError(
            "name a limit to set: --max-steps N, --max-cost X, --max-tokens N, "
            "--max-duration SECONDS or --max-calls TOOL=N (repeatable)"
        )
    app = state.get_app()
    woken = app.raise_budget(
        run_id,
        max_steps=max_steps,
        max_cost=max_cost,
        max_tokens=max_tokens,
        max_duration=max_duration,
        max_calls=max_calls,
    )
    found = app.usage(run_id)
    if output == "table":
        _print_limits(found)
    else:
        limits = [limit.to_dict() for limit in found.limits]
        emit_one(Row({"run_id": run_id, "woken": woken, "limits": limits}), output)
    if woken:
        runs_ = "run" if len(woken) == 1 else "runs"
        click.echo(
            f"woke {len(woken)} {runs_} waiting for this budget: {', '.join(woken)}", err=True
        )
    else:
        click.echo("no run was waiting for this budget", err=True)


# -- helpers --------------------------------------------------------------------------------


def _answer_started(
    app: App, handle: RunHandle, wait: bool, timeout: float | None, output: str
) -> None:
    """After a run was started: its result with ``--wait``, else its id, or the run record."""
    if wait:
        _print_result(app, handle.run_id, timeout)
    elif output == "table":
        click.echo(handle.run_id)
    else:
        emit_one(handle.info(), output, id_key="run_id")


def _print_result(app: App, run_id: str, timeout: float | None) -> None:
    """Wait for the run; print its result, or exit 1 (failed, cancelled) or 124 (timeout)."""
    try:
        value = app.run(run_id).result(timeout=timeout)
    except TimeoutError:
        info = app.get_run(run_id)
        if info.status == RunStatus.NEEDS_ATTENTION:
            hint = f"; it needs a person: tether incidents list --run {run_id}"
        elif info.status in (RunStatus.PENDING, RunStatus.WAITING):
            hint = "; is a worker running? (tether worker --app module:attr)"
        else:
            hint = ""
        error(f"run {run_id} is still {info.status.value} after {timeout:g}s{hint}")
        raise click.exceptions.Exit(124) from None
    click.echo(dump_json(value))


def _amount(value: float | None) -> str:
    """A number as a person reads it: ``5`` not ``5.0``, ``0.3`` not ``0.30000000000000004``."""
    if value is None:
        return "-"
    rounded = round(float(value), 9)
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def _calls(calls: dict[str, int]) -> str:
    return " ".join(f"{tool}={count}" for tool, count in sorted(calls.items())) or "-"


def _usage_cells(usage: dict[str, Any]) -> dict[str, str]:
    """A ``Usage.to_dict()`` as the cells of ``USAGE_COLUMNS``."""
    return {
        "steps": str(usage["steps"]),
        "cost": _amount(usage["cost"]),
        "tokens": _amount(usage["tokens"]),
        "calls": _calls(usage["calls"]),
    }


def _summary(usage: Usage) -> str:
    """``4 steps, cost 2, tokens -, calls web=4``."""
    cells = _usage_cells(usage.to_dict())
    steps = "1 step" if usage.steps == 1 else f"{usage.steps} steps"
    return f"{steps}, cost {cells['cost']}, tokens {cells['tokens']}, calls {cells['calls']}"


def _usage_line(found: RunUsage) -> str:
    """The run's own usage, and its subtree's when it has runs below it."""
    line = _summary(found.usage)
    below = len(found.runs) - 1
    if below:
        runs_ = "run" if below == 1 else "runs"
        line += f"; with the {below} {runs_} below it: {_summary(found.total)}"
    return line


def _limit_row(limit: LimitInfo) -> Row:
    values = limit.to_dict()
    cells = {key: _amount(values[key]) for key in ("max", "used", "reserved")}
    if limit.limit == "max_duration" or limit.limit.startswith("rate["):
        # Counted in time (since the start, within the window), not in ``used``.
        cells |= {"used": "-", "left": "-"}
    else:
        cells["left"] = _amount(max(0.0, limit.max - limit.used - limit.reserved))
    return Row(values | cells)


def _print_limits(found: RunUsage) -> None:
    """The limits table of ``runs usage`` and ``runs budget``."""
    if not found.limits:
        click.echo(
            f"no limits in the ledger for {found.run_id}: it has no budget, or has not run a "
            "metered step yet",
            err=True,
        )
        return
    rows = [_limit_row(limit) for limit in found.limits]
    emit(rows, "table", LIMIT_COLUMNS, title=f"limits {found.run_id} is held to")


def _outcome(step: dict[str, Any]) -> str:
    err = step.get("error")
    if isinstance(err, dict) and err:
        return f"{err.get('type', 'Error')}: {err.get('message', '')}"
    return compact_json(step.get("output"))


def _event_row(event: Event) -> Row:
    at = event.at
    # Milliseconds matter in a timeline (tables otherwise show times to the second).
    time = at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if at is not None else "-"
    return Row({"time": time, "type": event.type, "details": compact(event.data)})


def compact(data: dict[str, Any]) -> str:
    """``key=value`` pairs on one line: plain words as they are, anything else as JSON."""
    return " ".join(f"{key}={_word(value)}" for key, value in data.items() if value is not None)


def _word(value: Any) -> str:
    if (
        isinstance(value, str)
        and value
        and not any(c.isspace() for c in value)
        and '"' not in value
    ):
        return value
    return compact_json(value)


@runs.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as nested JSON.")
@pass_state
def tree(state: CliState, run_id: str, as_json: bool) -> None:
    """Show RUN and the runs it started, and theirs, with their statuses."""
    found = state.get_app().run_tree(run_id)
    if as_json:
        click.echo(json.dumps(_tree_json(found), indent=2))
        return
    for line in tree_lines(found):
        click.echo(line)


def tree_lines(
    node: dict[str, Any], prefix: str = "", last: bool = True, top: bool = True
) -> list[str]:
    """A run tree as indented lines: ``run_x  agent  status``."""
    run = node["run"]
    branch = "" if top else ("└── " if last else "├── ")
    lines = [f"{prefix}{branch}{run.run_id}  {run.agent_id}  {run.status.value}"]
    below = prefix if top else prefix + ("    " if last else "│   ")
    children = node["children"]
    for i, child in enumerate(children):
        lines += tree_lines(child, below, i == len(children) - 1, top=False)
    return lines


def _tree_json(node: dict[str, Any]) -> dict[str, Any]:
    return {**node["run"].to_dict(), "children": [_tree_json(c) for c in node["children"]]}
