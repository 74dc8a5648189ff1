"""``tether runs usage``, ``runs budget``, and budgets on ``runs submit``, ``runs show`` and
``runs fork``, on a real database (SQLite and PostgreSQL): a paused run continues once a person
raises its limit, usage is ``App.usage`` as it is, and every refusal exits with its code and
writes nothing.

The app (its agent types) lives in the test; the command line opens the same database with
``--db``. The invoker sets ``TETHER_ACTOR=tester``: a raised limit is recorded under it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

import tether
import tether.app
from tests.clikit import Invoke, cli_invoker, error_line, ok
from tether.cli import runs as runs_cli
from tether.testing import active_agent, work_until
from tether.types import RunInfo, RunStatus

PAUSE_AT_1 = '{"max_cost": 1, "on_breach": "pause"}'


def web(i: int) -> int:
    return i


def seeded(db_url: str) -> tether.App:
    """An app with ``sp``, whose runs take ``steps`` steps of tool ``web`` at ``cost`` each,
    then call ``children`` child runs of one such step, one after the other."""
    app = tether.App(db_url)

    @app.agent("spender")
    def spender(ctx: tether.RunContext, task: dict[str, Any]) -> Any:
        steps = task.get("steps", 1)
        for i in range(steps):
            ctx.step(web, i, name=f"s{i}", tool="web", cost=task.get("cost", 0.5))
        called = [ctx.call("sp", {"steps": 1}) for _ in range(task.get("children", 0))]
        return {"done": steps, "children": len(called)}

    active_agent(app, "spender", "sp")
    return app


@pytest.fixture
def app(db_url: str) -> Iterator[tether.App]:
    """The seeded app on a fresh database, closed after the test."""
    application = seeded(db_url)
    try:
        yield application
    finally:
        application.close()


@pytest.fixture
def tether_(db_url: str) -> Invoke:
    """``tether --db URL ...`` on the test's database."""
    return cli_invoker("--db", db_url)


def submitted(tether_: Invoke, task: dict[str, Any], *options: str) -> str:
    """Submit ``task`` to ``sp`` through the command line; the run id."""
    run_id = ok(tether_("runs", "submit", "sp", json.dumps(task), *options)).strip()
    assert run_id.startswith("run_")
    return run_id


def finished(app: tether.App, run_id: str) -> RunInfo:
    app.work(until_idle=True, timeout=30)
    info = app.get_run(run_id)
    assert info.status == RunStatus.COMPLETED, info.error
    return info


def family(app: tether.App, tether_: Invoke) -> tuple[str, list[str]]:
    """A finished run (4 steps at 0.5, budget max_cost 5) that called two children (one step
    each); its id and theirs, in the order they were called."""
    parent = submitted(tether_, {"steps": 4, "children": 2}, "--budget", '{"max_cost": 5}')
    finished(app, parent)
    children = [r["run_id"] for r in app.usage(parent).runs if r["depth"] == 1]
    assert len(children) == 2
    return parent, children


def raised(app: tether.App, run_id: str) -> list[dict[str, Any]]:
    return [e.data for e in app.events(run_id=run_id, types=["budget.raised"])]


def limits(app: tether.App, run_id: str) -> dict[str, tuple[float, float]]:
    """The run's limits as ``{limit: (max, used)}``."""
    return {lim.limit: (lim.max, lim.used) for lim in app.usage(run_id).limits}


def row(stdout: str, first: str) -> list[str]:
    """The cells of the one table line that starts with ``first`` (indentation kept)."""
    [line] = [line for line in stdout.splitlines() if line.startswith(first + " ")]
    return line.split()


def field(shown: str, name: str) -> str:
    """The value ``tether runs show`` prints for ``name``."""
    [line] = [line for line in shown.splitlines() if line.startswith(name + "  ")]
    return line[len(name) :].strip()


def refused_usage(result: Result, option: str) -> str:
    """The message of a click usage error (exit 2) about ``option``; nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    [message] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert option in message
    return message


# -- runs budget -------------------------------------------------------------------------------


def test_a_paused_run_continues_when_runs_budget_raises_its_limit(
    app: tether.App, tether_: Invoke
) -> None:
    run_id = submitted(tether_, {"steps": 4}, "--budget", PAUSE_AT_1)
    work_until(app, lambda: app.get_run(run_id).status == RunStatus.WAITING, timeout=30)
    [waiting] = app.events(run_id=run_id, types=["run.waiting"])
    assert waiting.data["kind"] == "budget"
    assert app.usage(run_id).usage.steps == 2

    result = tether_("runs", "budget", run_id, "--max-cost", "5")

    assert row(ok(result), run_id) == [run_id, "max_cost", "5", "1", "0", "4", "pause"]
    assert result.stderr == f"woke 1 run waiting for this budget: {run_id}\n"
    work_until(app, lambda: app.get_run(run_id).status.is_final, timeout=30)
    assert app.get_run(run_id).result == {"done": 4, "children": 0}
    assert raised(app, run_id) == [
        {"holder": run_id, "limit": "max_cost=5", "from": 1.0, "to": 5.0, "actor": "tester"}
    ]


def test_runs_budget_sets_several_limits_and_prints_them_as_json(
    app: tether.App, tether_: Invoke
) -> None:
    budget = '{"max_cost": 3, "max_steps": 4, "max_calls": {"web": 5}}'
    run_id = submitted(tether_, {"steps": 2}, "--budget", budget)
    finished(app, run_id)

    result = tether_("runs", "budget", run_id, "--max-calls", "web=9", "--max-steps", "7", "--json")

    shown = json.loads(ok(result))
    assert shown == {
        "run_id": run_id,
        "woken": [],
        "limits": [lim.to_dict() for lim in app.usage(run_id).limits],
    }
    assert limits(app, run_id) == {
        "max_calls[web]": (9.0, 2.0),
        "max_cost": (3.0, 1.0),
        "max_steps": (7.0, 2.0),
    }
    assert result.stderr == "no run was waiting for this budget\n"
    assert sorted(e["limit"] for e in raised(app, run_id)) == ["max_calls[web]=9", "max_steps=7"]


@pytest.fixture
def spent(app: tether.App, tether_: Invoke) -> str:
    """A finished run of two steps with a budget of max_cost 1 (so a ledger)."""
    run_id = submitted(tether_, {"steps": 2, "cost": 0.25}, "--budget", '{"max_cost": 1}')
    finished(app, run_id)
    assert limits(app, run_id) == {"max_cost": (1.0, 0.5)}
    return run_id


def test_runs_budget_without_a_limit_exits_2_naming_the_options(
    app: tether.App, tether_: Invoke, spent: str
) -> None:
    message = refused_usage(tether_("runs", "budget", spent), "name a limit to set")
    for option in ("--max-steps", "--max-cost", "--max-tokens", "--max-duration", "--max-calls"):
        assert option in message
    assert raised(app, spent) == []


BAD_VALUES = [
    (("--max-cost", "-1"), "--max-cost", "not in the range x>=0"),
    (("--max-cost", "lots"), "--max-cost", "'lots' is not a valid float"),
    (("--max-steps", "1.5"), "--max-steps", "'1.5' is not a valid integer"),
    (("--max-tokens", "-5"), "--max-tokens", "not in the range x>=0"),
    (("--max-calls", "web"), "--max-calls", "'web' is not TOOL=N"),
    (("--max-calls", "=3"), "--max-calls", "'=3' is not TOOL=N"),
    (("--max-calls", "web=-1"), "--max-calls", "N must be a whole number >= 0, got '-1'"),
    (("--max-calls", "web=2.5"), "--max-calls", "N must be a whole number >= 0, got '2.5'"),
    (("--max-calls", "web=2", "--max-calls", "web=3"), "--max-calls", "web is given twice"),
]


@pytest.mark.parametrize(("args", "option", "message"), BAD_VALUES, ids=[m for *_, m in BAD_VALUES])
def test_a_bad_limit_value_exits_2_and_sets_nothing(
    app: tether.App,
    tether_: Invoke,
    spent: str,
    args: tuple[str, ...],
    option: str,
    message: str,
) -> None:
    refused = refused_usage(tether_("runs", "budget", spent, "--max-cost", "2", *args), option)
    assert message in refused
    assert limits(app, spent) == {"max_cost": (1.0, 0.5)}
    assert raised(app, spent) == []


def test_an_infinite_limit_exits_2_with_the_budgets_message(
    app: tether.App, tether_: Invoke, spent: str
) -> None:
    result = tether_("runs", "budget", spent, "--max-cost", "inf")
    assert result.exit_code == 2
    assert "max_cost must be finite" in error_line(result)
    assert limits(app, spent) == {"max_cost": (1.0, 0.5)}


def test_a_limit_the_budget_lacks_exits_4_and_sets_none_of_the_others(
    app: tether.App, tether_: Invoke, spent: str
) -> None:
    result = tether_("runs", "budget", spent, "--max-cost", "9", "--max-tokens", "50")

    assert result.exit_code == 4
    line = error_line(result)
    assert f"budget limit 'max_tokens of run {spent}' not found; its budget has max_cost=1" in line
    assert limits(app, spent) == {"max_cost": (1.0, 0.5)}
    assert raised(app, spent) == []


def test_runs_budget_of_a_run_without_a_budget_exits_4(app: tether.App, tether_: Invoke) -> None:
    run_id = submitted(tether_, {"steps": 1})
    finished(app, run_id)

    result = tether_("runs", "budget", run_id, "--max-cost", "5")

    assert result.exit_code == 4
    assert "that run has no budget in the ledger" in error_line(result)
    assert raised(app, run_id) == []


@pytest.mark.parametrize(
    "args",
    [
        ("usage", "run_nope"),
        ("usage", "run_nope", "-o", "json"),
        ("budget", "run_nope", "--max-cost", "1"),
    ],
)
def test_usage_and_budget_of_an_unknown_run_exit_4(
    app: tether.App, tether_: Invoke, args: tuple[str, ...]
) -> None:
    result = tether_("runs", *args)
    assert result.exit_code == 4
    assert error_line(result) == (
        "error: run 'run_nope' not found; list runs with: tether runs list"
    )


# -- runs usage and runs show -----------------------------------------------------------------


def test_runs_usage_as_json_is_app_usage_of_the_run_and_of_a_child(
    app: tether.App, tether_: Invoke
) -> None:
    parent, [child, _] = family(app, tether_)

    for run_id in (parent, child):
        shown = json.loads(ok(tether_("runs", "usage", run_id, "-o", "json")))
        assert shown == app.usage(run_id).to_dict()
        one_line = ok(tether_("runs", "usage", run_id, "-o", "jsonl"))
        assert one_line.count("\n") == 1 and json.loads(one_line) == shown
    parent_usage = json.loads(ok(tether_("runs", "usage", parent, "--json")))
    assert parent_usage["total"] == {"steps": 6, "cost": 3.0, "tokens": None, "calls": {"web": 6}}
    assert parent_usage["budget"] == {"max_cost": 5, "warn_at": 0.8, "on_breach": "fail"}


def test_runs_usage_table_shows_the_subtree_indented_the_totals_and_the_limits(
    app: tether.App, tether_: Invoke
) -> None:
    parent, children = family(app, tether_)

    table, held_to = ok(tether_("runs", "usage", parent)).split(f"limits {parent} is held to")

    assert row(table, parent) == [parent, "sp", "completed", "4", "2", "-", "web=4"]
    for child in children:
        assert row(table, "  " + child) == [child, "sp", "completed", "1", "0.5", "-", "web=1"]
    assert "total of 3 runs: 6 steps, cost 3, tokens -, calls web=6" in table.splitlines()
    assert row(held_to, parent) == [parent, "max_cost", "5", "3", "0", "2", "fail"]
    child_table = ok(tether_("runs", "usage", children[0]))
    assert "total: 1 step, cost 0.5, tokens -, calls web=1" in child_table.splitlines()
    assert row(child_table.split("is held to")[1], parent)[1:3] == ["max_cost", "5"]


def test_runs_usage_of_a_run_without_a_budget_says_it_has_no_limits(
    app: tether.App, tether_: Invoke
) -> None:
    run_id = submitted(tether_, {"steps": 3, "cost": 0.25})
    finished(app, run_id)

    result = tether_("runs", "usage", run_id)

    assert row(ok(result), run_id) == [run_id, "sp", "completed", "3", "0.75", "-", "web=3"]
    assert "holder" not in result.stdout
    assert result.stderr.startswith(f"no limits in the ledger for {run_id}: it has no budget")


def test_runs_show_gives_the_runs_own_usage_and_its_subtrees(
    app: tether.App, tether_: Invoke
) -> None:
    parent, [child, _] = family(app, tether_)

    shown = json.loads(ok(tether_("runs", "show", parent, "-o", "json")))

    assert shown["usage"] == {
        "usage": {"steps": 4, "cost": 2.0, "tokens": None, "calls": {"web": 4}},
        "total": {"steps": 6, "cost": 3.0, "tokens": None, "calls": {"web": 6}},
    }
    assert [s["name"] for s in shown["journal"]][:4] == ["s0", "s1", "s2", "s3"]
    table = ok(tether_("runs", "show", parent))
    assert field(table, "usage") == (
        "4 steps, cost 2, tokens -, calls web=4; with the 2 runs below it: "
        "6 steps, cost 3, tokens -, calls web=6"
    )
    child_table = ok(tether_("runs", "show", child))
    assert field(child_table, "usage") == "1 step, cost 0.5, tokens -, calls web=1"


# -- runs submit --budget --policy --------------------------------------------------------------


def test_submit_takes_a_budget_from_a_file_and_a_policy_inline(
    app: tether.App, tether_: Invoke, tmp_path: Path
) -> None:
    (tmp_path / "budget.json").write_text('{"max_steps": 2, "on_breach": "fail"}')

    run_id = submitted(
        tether_,
        {"steps": 3},
        "--budget",
        f"@{tmp_path / 'budget.json'}",
        "--policy",
        '{"allowed_tools": ["web"]}',
    )

    assert app.usage(run_id).budget == {"max_steps": 2, "warn_at": 0.8, "on_breach": "fail"}
    app.work(until_idle=True, timeout=30)
    info = app.get_run(run_id)
    assert info.status == RunStatus.FAILED
    assert info.error is not None and info.error["limit"] == "max_steps=2"
    assert app.usage(run_id).usage.calls == {"web": 2}  # the policy allowed them


def test_submit_with_a_policy_denying_the_tool_stops_the_run_at_that_step(
    app: tether.App, tether_: Invoke
) -> None:
    run_id = submitted(tether_, {"steps": 2}, "--policy", '{"denied_tools": ["web"]}')

    app.work(until_idle=True, timeout=30)

    assert app.get_run(run_id).status == RunStatus.NEEDS_ATTENTION
    [incident] = app.incidents(run_id=run_id)
    assert incident.error["type"] == "PolicyDenied"
    assert app.usage(run_id).usage.steps == 0


BAD_LIMITS = [
    ("--budget", '{"max_cost": -1}', "the run's budget: Budget: max_cost must be a number >= 0"),
    ("--budget", '{"max_money": 3}', "unknown limit 'max_money'"),
    ("--budget", '{"on_breach": "explode"}', "choose one of fail, pause, ask"),
    ("--budget", "5", "the run's budget must be an object of limits, got 5"),
    ("--policy", '{"allowed_tools": "web"}', "the run's policy: Policy: allowed_tools must be"),
    ("--policy", '{"on_unpriced": "maybe"}', "on_unpriced='maybe'"),
]


@pytest.mark.parametrize(
    ("option", "value", "message"), BAD_LIMITS, ids=[m for *_, m in BAD_LIMITS]
)
def test_submit_with_a_bad_budget_or_policy_exits_2_and_creates_no_run(
    app: tether.App, tether_: Invoke, option: str, value: str, message: str
) -> None:
    result = tether_("runs", "submit", "sp", "{}", option, value)

    assert result.exit_code == 2
    assert message in error_line(result)
    assert app.list_runs() == []


def test_submit_with_a_budget_that_is_not_json_exits_2_and_creates_no_run(
    app: tether.App, tether_: Invoke
) -> None:
    result = tether_("runs", "submit", "sp", "{}", "--budget", '{"max_cost": ')
    assert "not valid JSON" in refused_usage(result, "--budget")
    assert app.list_runs() == []


# -- runs fork --budget -----------------------------------------------------------------------


def test_a_fork_starts_a_fresh_budget_by_default_or_inherits_the_originals(
    app: tether.App, tether_: Invoke
) -> None:
    original = submitted(tether_, {"steps": 3, "cost": 0.25}, "--budget", '{"max_cost": 2}')
    finished(app, original)

    def fork(*options: str) -> str:
        return ok(tether_("runs", "fork", original, "--from-step", "1", *options)).strip()

    fresh = fork()
    inherit = fork("--budget", "inherit")

    finished(app, fresh)
    finished(app, inherit)
    assert [(lim.holder, lim.used) for lim in app.usage(fresh).limits] == [(fresh, 0.5)]
    assert [(lim.holder, lim.used) for lim in app.usage(inherit).limits] == [
        (inherit, 0.5),
        (original, 1.25),
    ]


def test_a_fork_with_an_unknown_budget_choice_exits_2_and_starts_nothing(
    app: tether.App, tether_: Invoke
) -> None:
    original = submitted(tether_, {"steps": 1})
    finished(app, original)

    result = tether_("runs", "fork", original, "--from-step", "1", "--budget", "shared")

    assert "'shared' is not one of 'fresh', 'inherit'" in refused_usage(result, "--budget")
    assert [r.run_id for r in app.list_runs()] == [original]


def test_the_forks_budget_choices_are_the_apps() -> None:
    assert runs_cli.FORK_BUDGETS == tether.app.FORK_BUDGETS
