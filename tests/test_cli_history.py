"""``tether checkpoints``, ``runs fork``, ``agents state --diff`` and ``gc``: history on the
command line, on SQLite and PostgreSQL.

The agent type under test writes one line to a side-effect file each time a step body really
executes, so "a fork runs only the later steps" is checked against the step functions
themselves, not against what tether reports about them.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tether
from tests.clikit import Invoke, app_module, cli_invoker, error_line, ok
from tether.cli.gc import DURATION
from tether.testing import background_worker

APP_MODULE = """
import time
from pathlib import Path

import tether

HERE = Path(__file__).parent
app = tether.App("sqlite:///own.db", retry=tether.Retry(initial_delay=0.01, jitter=0))


def effect(name):
    step = tether.current_step()
    with open(HERE / "effects.log", "a") as log:
        log.write(f"{step.run_id} {name}\\n")
    return name.upper()


def hold():
    (HERE / "entered").touch()
    deadline = time.monotonic() + 20
    while not (HERE / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


class Counter(tether.Agent):
    type = "counter"

    def handle(self, ctx, task):
        for name in task.get("steps", ["a", "b", "c"]):
            ctx.state[name] = ctx.step(effect, name, name=name)
        if task.get("hold"):
            ctx.state["held"] = ctx.step(hold)
        return {"steps": task.get("steps", ["a", "b", "c"])}


app.register(Counter)
"""


@pytest.fixture
def module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of an app module written in the (temporary) working directory."""
    with app_module(
        tmp_path, monkeypatch, APP_MODULE, prefix="history_agents", importable=True
    ) as name:
        yield name


@pytest.fixture
def run(db_url: str, module_name: str) -> Invoke:
    """``tether --app MODULE:app --db URL ARGS...`` in-process, in a clean environment."""
    return cli_invoker("--app", f"{module_name}:app", "--db", db_url)


@pytest.fixture
def app(db_url: str) -> Iterator[tether.App]:
    """A plain App on the test database, to arrange and inspect what the CLI does."""
    with tether.App(db_url, require_types=False) as application:
        yield application


@contextmanager
def worker_thread(db_url: str, module_name: str) -> Iterator[None]:
    """A worker for the module's agent type in a background thread, on its own App."""
    module = importlib.import_module(module_name)
    with tether.App(db_url) as worker_app:
        worker_app.register(module.Counter)
        with background_worker(worker_app, concurrency=2):
            yield


def active_agent(run: Invoke, agent_id: str = "c1", state: str = "{}") -> str:
    ok(run("agents", "create", "counter", agent_id, "--state", state))
    ok(run("agents", "initialize", agent_id))
    ok(run("agents", "activate", agent_id))
    return agent_id


def submit(run: Invoke, task: str, agent_id: str = "c1") -> str:
    run_id = ok(run("runs", "submit", agent_id, task)).strip()
    assert run_id.startswith("run_")
    return run_id


def work(run: Invoke) -> None:
    ok(run("worker", "--until-idle", "--timeout", "30"))


def executions(tmp_path: Path, run_id: str) -> list[str]:
    """The steps whose body really executed for ``run_id``, in order."""
    path = tmp_path / "effects.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [name for run, name in (line.split() for line in lines) if run == run_id]


def wait_for_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


# -- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_create_list_show_restore_round_trip(run: Invoke, app: tether.App) -> None:
    active_agent(run, state='{"n": 1}')
    saved = app.get_agent("c1")

    created = run("checkpoints", "create", "c1", "first")

    ckpt_id = ok(created).strip()
    assert ckpt_id.startswith("ckpt_") and "\n" not in ckpt_id
    assert f"holds version {saved.version} of agent c1's state" in created.stderr
    work_run = submit(run, '{"steps": ["a", "b"]}')
    work(run)
    assert ok(run("runs", "result", work_run))
    changed = app.get_agent("c1")
    assert changed.state == {"n": 1, "a": "A", "b": "B"}

    listed = json.loads(ok(run("checkpoints", "list", "-o", "json")))
    assert [(c["checkpoint_id"], c["name"], c["version"]) for c in listed] == [
        (ckpt_id, "first", saved.version)
    ]
    assert listed[0]["state"] == {"n": 1}
    assert ok(run("checkpoints", "list", "--agent", "c1", "-o", "ids")).split() == [ckpt_id]
    assert ok(run("checkpoints", "list", "--agent", "other", "-o", "json")) == "[]\n"
    assert "first" in ok(run("checkpoints", "list"))
    shown = json.loads(ok(run("checkpoints", "show", ckpt_id, "-o", "json")))
    assert (shown["agent_id"], shown["state"]) == ("c1", {"n": 1})
    table = ok(run("checkpoints", "show", ckpt_id))
    assert "state" in table and '"n": 1' in table

    restored = ok(run("checkpoints", "restore", ckpt_id))

    after = app.get_agent("c1")
    assert after.state == {"n": 1}
    assert after.version == changed.version + 1
    assert f"state is now version {after.version}, a copy of version {saved.version}" in restored
    assert json.loads(ok(run("agents", "state", "c1"))) == {"n": 1}
    history = json.loads(ok(run("agents", "state", "c1", "--version", str(changed.version))))
    assert history == {"n": 1, "a": "A", "b": "B"}  # the overwritten version is still there


@pytest.mark.parametrize("verb", ["show", "restore"])
def test_an_unknown_checkpoint_exits_4(run: Invoke, verb: str) -> None:
    result = run("checkpoints", verb, "ckpt_nope")
    assert result.exit_code == 4
    assert "checkpoint 'ckpt_nope' not found" in error_line(result)


def test_wait_without_pause_is_a_usage_error(run: Invoke) -> None:
    result = run("checkpoints", "restore", "ckpt_x", "--wait", "5")
    assert result.exit_code == 2
    assert "--wait applies only with --pause" in result.stderr


def test_restore_is_refused_while_a_run_holds_and_pause_makes_it_succeed(
    run: Invoke, app: tether.App, db_url: str, module_name: str, tmp_path: Path
) -> None:
    active_agent(run, state='{"n": 1}')
    ckpt_id = ok(run("checkpoints", "create", "c1", "before")).strip()
    run_id = submit(run, '{"steps": ["a"], "hold": true}')

    with worker_thread(db_url, module_name):
        wait_for_file(tmp_path / "entered")
        versions = len(app.state_versions("c1"))

        refused = run("checkpoints", "restore", ckpt_id)

        assert refused.exit_code == 1
        message = error_line(refused)
        assert run_id in message and "--pause" in message
        assert len(app.state_versions("c1")) == versions  # nothing written

        threading.Timer(0.3, (tmp_path / "release").touch).start()
        paused = run("checkpoints", "restore", ckpt_id, "--pause", "--wait", "20")

        assert paused.exit_code == 0, paused.output
        assert "is paused; resume it when ready: tether agents resume c1" in paused.stderr
        agent = app.get_agent("c1")
        assert (agent.state, agent.lifecycle.value) == ({"n": 1}, "paused")
        assert f"state is now version {agent.version}" in paused.stdout
        ok(run("agents", "resume", "c1"))
        assert json.loads(ok(run("runs", "result", run_id, "--wait", "--timeout", "20"))) == {
            "steps": ["a"]
        }
    assert executions(tmp_path, run_id) == ["a"]  # the hold step logs nothing; "a" ran once


# -- fork -----------------------------------------------------------------------------------


def finished_run(run: Invoke, tmp_path: Path) -> str:
    active_agent(run)
    run_id = submit(run, '{"steps": ["a", "b", "c"]}')
    work(run)
    assert executions(tmp_path, run_id) == ["a", "b", "c"]
    return run_id


def test_fork_from_a_step_executes_only_the_later_steps(
    run: Invoke, app: tether.App, tmp_path: Path
) -> None:
    original = finished_run(run, tmp_path)
    before = json.loads(ok(run("runs", "show", original, "-o", "json")))

    forked = run("runs", "fork", original, "--from-step", "1")

    fork_id = ok(forked).strip()
    assert fork_id.startswith("run_") and fork_id != original
    assert f"forked run {original} from step 1 (step 1 reused)" in forked.stderr
    work(run)
    assert executions(tmp_path, fork_id) == ["b", "c"]
    assert executions(tmp_path, original) == ["a", "b", "c"]
    assert json.loads(ok(run("runs", "result", fork_id))) == {"steps": ["a", "b", "c"]}
    info = app.get_run(fork_id)
    assert (info.forked_from, info.forked_at_step) == (original, 1)
    assert json.loads(ok(run("runs", "show", original, "-o", "json"))) == before


def test_fork_with_a_new_task_and_wait_prints_the_result(
    run: Invoke, db_url: str, module_name: str, tmp_path: Path
) -> None:
    original = finished_run(run, tmp_path)

    with worker_thread(db_url, module_name):
        waited = run(
            "runs", "fork", original, "--from-step", "2", "--task", '{"steps": ["a", "b", "z"]}',
            "--wait", "--timeout", "20",
        )  # fmt: skip

    assert json.loads(ok(waited)) == {"steps": ["a", "b", "z"]}
    fork_id = waited.stderr.split()[-1]
    assert executions(tmp_path, fork_id) == ["z"]


def test_fork_past_the_last_finished_step_is_refused(run: Invoke, tmp_path: Path) -> None:
    original = finished_run(run, tmp_path)

    result = run("runs", "fork", original, "--from-step", "4")

    assert result.exit_code == 1
    assert "choose --from-step between 0 and 3" in error_line(result)
    assert len(json.loads(ok(run("runs", "list", "-o", "json")))) == 1


def test_fork_of_an_unknown_run_exits_4_and_from_step_is_required(run: Invoke) -> None:
    unknown = run("runs", "fork", "run_nope", "--from-step", "0")
    assert unknown.exit_code == 4
    assert "run 'run_nope' not found" in error_line(unknown)
    assert run("runs", "fork", "run_nope").exit_code == 2
    assert run("runs", "fork", "run_nope", "--from-step", "-1").exit_code == 2


# -- state diff -----------------------------------------------------------------------------


def test_agents_state_diff_lists_the_operations_between_two_versions(
    run: Invoke, app: tether.App
) -> None:
    active_agent(run, state='{"keep": 1, "drop": true, "nested": {"x": 1}}')
    first = app.get_agent("c1").version
    app.set_state("c1", {"keep": 1, "nested": {"x": 2}, "new": ["a"]})
    second = app.get_agent("c1").version

    as_json = json.loads(
        ok(run("agents", "state", "c1", "--version", str(first), "--diff", str(second), "--json"))
    )
    table = ok(run("agents", "state", "c1", "--diff", str(first)))

    assert as_json == [
        {"op": "remove", "path": "/drop", "from": True},
        {"op": "replace", "path": "/nested/x", "from": 1, "to": 2},
        {"op": "add", "path": "/new", "to": ["a"]},
    ]
    assert f"agent c1: version {second} -> {first}" in table
    lines = {line.split()[1]: line.split() for line in table.splitlines() if "/" in line}
    assert lines["/new"] == ["remove", "/new", '["a"]']
    assert lines["/drop"] == ["add", "/drop", "true"]
    assert lines["/nested/x"] == ["replace", "/nested/x", "2", "1"]
    same = run("agents", "state", "c1", "--diff", str(second))
    assert same.stdout == ""
    assert f"versions {second} and {second} of agent c1's state are equal" in same.stderr
    assert json.loads(ok(run("agents", "state", "c1"))) == app.get_agent("c1").state


def test_a_diff_with_an_unknown_version_exits_4(run: Invoke) -> None:
    active_agent(run)
    result = run("agents", "state", "c1", "--diff", "99")
    assert result.exit_code == 4
    assert "not found" in error_line(result)


# -- gc -------------------------------------------------------------------------------------


def test_gc_dry_run_removes_nothing_and_reports_what_gc_then_removes(
    run: Invoke, app: tether.App
) -> None:
    active_agent(run)
    for _ in range(2):
        submit(run, '{"steps": ["a"]}')
    work(run)
    flags = ("--older-than", "0", "--events-older-than", "0s", "--keep-versions", "1")
    events_before = len(app.events())

    dry = json.loads(ok(run("gc", "--dry-run", *flags, "-o", "json")))

    assert dry["dry_run"] is True
    assert dry["runs"] == 2 and dry["steps"] == 2 and dry["events"] > 0
    assert dry["state_versions"] > 0
    assert len(app.list_runs()) == 2 and len(app.events()) == events_before

    real = json.loads(ok(run("gc", *flags, "-o", "json")))

    assert real == {**dry, "dry_run": False}
    assert app.list_runs() == []
    assert len(app.state_versions("c1")) == 1
    again = json.loads(ok(run("gc", *flags, "--json")))
    assert (again["runs"], again["steps"], again["state_versions"]) == (0, 0, 0)


def test_gc_by_default_keeps_recent_runs_and_says_what_its_policy_removes(
    run: Invoke, app: tether.App
) -> None:
    active_agent(run)
    submit(run, "{}")
    work(run)

    result = run("gc", "--dry-run", "--keep-versions", "5")

    out = ok(result)
    assert "would remove" in out and "state versions" in out
    assert (
        "the policy removes finished runs older than 30d, events older than 30d, state "
        "versions beyond the newest 5 per agent" in result.stderr
    )
    assert "nothing was removed (--dry-run)" in result.stderr
    real = json.loads(ok(run("gc", "-o", "json")))
    assert real["runs"] == 0
    assert len(app.list_runs()) == 1


@pytest.mark.parametrize("value", ["3w", "-5", "10 days", "d", "1.5.2", ""])
def test_a_bad_duration_is_a_usage_error_naming_the_accepted_forms(run: Invoke, value: str) -> None:
    result = run("gc", "--older-than", value)
    assert result.exit_code == 2
    assert "30d, 12h, 15m, 45s" in result.stderr
    assert run("gc", "--events-older-than", value).exit_code == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("3600", 3600), ("1.5h", 5400)],
)
def test_durations_are_seconds_or_a_number_with_a_unit(text: str, seconds: float) -> None:
    assert DURATION.convert(text, None, None) == seconds
