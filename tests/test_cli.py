"""The ``tether`` command line: commands, output formats, exit codes, ``--app`` loading."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.clikit import app_module, cli_invoker, error_line
from tether.cli import cli
from tether.store import migrate

Tether = Callable[..., Result]


@pytest.fixture
def tether() -> Tether:
    """Run ``tether ARGS...`` in-process with a clean environment; exceptions are not hidden."""
    return cli_invoker()


def history(tether: Tether, db_url: str, agent_id: str) -> list[dict[str, object]]:
    result = tether("--db", db_url, "agents", "history", agent_id, "-o", "json")
    assert result.exit_code == 0, result.output
    entries: list[dict[str, object]] = json.loads(result.stdout)
    return entries


def ids_of(tether: Tether, db_url: str, *args: str) -> list[str]:
    result = tether("--db", db_url, "agents", "list", *args, "-o", "ids")
    assert result.exit_code == 0, result.output
    return result.stdout.split()


# -- help and start-up --------------------------------------------------------------------


def test_help_lists_the_command_groups_and_exit_codes(tether: Tether) -> None:
    result = tether("--help")
    assert result.exit_code == 0
    for name in ("init", "demo", "agents", "db"):
        assert f"\n  {name} " in result.stdout
    assert "69  database unavailable" in result.stdout


HELP_AND_LIST_MODULES = """
import atexit, sys
atexit.register(lambda: print(*sorted(sys.modules), file=sys.stderr))
sys.argv = ["tether", "--help"]
from tether.cli import main
main()
"""


def test_help_runs_without_importing_the_database_layer_or_rich() -> None:
    result = subprocess.run(
        [sys.executable, "-c", HELP_AND_LIST_MODULES], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "agents" in result.stdout
    imported = set(result.stderr.split())
    assert "tether.cli.agents" in imported  # help imports every command module, so they...
    heavy = {m for m in imported if m.split(".")[0] in ("sqlalchemy", "rich", "alembic")}
    heavy |= {m for m in imported if m.startswith("tether.store")}
    assert not heavy  # ...must leave the database layer and rich for later


# -- agents and their lifecycle -------------------------------------------------------------


def test_history_json_shows_each_transition_with_reason_actor_and_time(
    tether: Tether, db_url: str
) -> None:
    assert tether("--db", db_url, "agents", "create", "worker", "r1").exit_code == 0
    result = tether("--db", db_url, "agents", "initialize", "r1", "--reason", "set up")
    assert result.exit_code == 0, result.output
    assert result.stdout == "agent r1 is now initialized\n"
    assert tether("--db", db_url, "agents", "activate", "r1", "--reason", "go").exit_code == 0

    entries = history(tether, db_url, "r1")

    steps = [(e["action"], e["from_state"], e["to_state"], e["reason"]) for e in entries]
    assert steps == [
        ("create", None, "created", "created"),
        ("initialize", "created", "initialized", "set up"),
        ("activate", "initialized", "active", "go"),
    ]
    assert {e["actor"] for e in entries} == {"tester"}
    times = [str(e["at"]) for e in entries]
    assert all(t.endswith("Z") for t in times)
    parsed = [dt.datetime.fromisoformat(t) for t in times]
    assert all(p.utcoffset() == dt.timedelta(0) for p in parsed)
    assert parsed == sorted(parsed)


def test_activating_a_terminated_agent_exits_5_and_writes_nothing(
    tether: Tether, db_url: str
) -> None:
    tether("--db", db_url, "agents", "create", "worker", "r1")
    tether("--db", db_url, "agents", "terminate", "r1", "--reason", "done")
    before = history(tether, db_url, "r1")

    result = tether("--db", db_url, "agents", "activate", "r1")

    assert result.exit_code == 5
    assert error_line(result) == (
        "error: cannot activate agent r1: it is terminated; "
        "allowed from terminated: none (final state)"
    )
    assert history(tether, db_url, "r1") == before
    shown = json.loads(tether("--db", db_url, "agents", "show", "r1", "--json").stdout)
    assert shown["lifecycle"] == "terminated"


def test_an_illegal_transition_names_the_allowed_ones(tether: Tether, db_url: str) -> None:
    tether("--db", db_url, "agents", "create", "worker", "r1")
    result = tether("--db", db_url, "agents", "pause", "r1")
    assert result.exit_code == 5
    assert "allowed from created: initialize, terminate, fail" in error_line(result)


@pytest.mark.parametrize("command", ["show", "history", "state", "initialize", "terminate"])
def test_an_unknown_agent_exits_4(tether: Tether, db_url: str, command: str) -> None:
    result = tether("--db", db_url, "agents", command, "ghost")
    assert result.exit_code == 4
    assert "agent 'ghost' not found" in error_line(result)


def test_creating_an_agent_twice_exits_5(tether: Tether, db_url: str) -> None:
    assert tether("--db", db_url, "agents", "create", "worker", "r1").exit_code == 0
    result = tether("--db", db_url, "agents", "create", "worker", "r1")
    assert result.exit_code == 5
    assert "already exists" in error_line(result)


@pytest.mark.parametrize(
    ("config", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")],
)
def test_bad_config_json_is_a_usage_error_and_creates_nothing(
    tether: Tether, sqlite_url: str, config: str, message: str
) -> None:
    result = tether("--db", sqlite_url, "agents", "create", "worker", "r1", "--config", config)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--config" in result.stderr
    assert message in result.stderr
    assert ids_of(tether, sqlite_url) == []


def test_config_and_state_are_stored_and_state_is_printed_as_json(
    tether: Tether, db_url: str, tmp_path: Path
) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text('{"model": "small", "tools": ["search"]}')
    result = tether(
        "--db", db_url, "agents", "create", "worker", "r1",
        "--config", f"@{config_file}", "--state", '{"notes": []}', "-o", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert created["config"] == {"model": "small", "tools": ["search"]}
    assert created["lifecycle"] == "created"

    state = tether("--db", db_url, "agents", "state", "r1")
    assert state.exit_code == 0
    assert json.loads(state.stdout) == {"notes": []}
    assert tether("--db", db_url, "agents", "state", "r1", "--version", "2").exit_code == 4


def test_list_filters_by_type_lifecycle_and_limit(tether: Tether, db_url: str) -> None:
    for agent_type, agent_id in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")]:
        tether("--db", db_url, "agents", "create", agent_type, agent_id)
    tether("--db", db_url, "agents", "initialize", "a2")

    assert ids_of(tether, db_url) == ["a1", "b1", "a2", "a3"]
    assert ids_of(tether, db_url, "--type", "a") == ["a1", "a2", "a3"]
    assert ids_of(tether, db_url, "--lifecycle", "INITIALIZED") == ["a2"]
    assert ids_of(tether, db_url, "--type", "a", "--limit", "2") == ["a1", "a2"]
    bad = tether("--db", db_url, "agents", "list", "--lifecycle", "sleeping")
    assert bad.exit_code == 2


def test_output_formats_ids_jsonl_json_and_table(tether: Tether, db_url: str) -> None:
    tether("--db", db_url, "agents", "create", "worker", "r1")
    tether("--db", db_url, "agents", "create", "worker", "r2")

    assert tether("--db", db_url, "agents", "list", "-o", "ids").stdout == "r1\nr2\n"
    lines = tether("--db", db_url, "agents", "list", "-o", "jsonl").stdout.splitlines()
    assert [json.loads(line)["agent_id"] for line in lines] == ["r1", "r2"]
    as_json = json.loads(tether("--db", db_url, "agents", "list", "--json").stdout)
    assert [a["agent_id"] for a in as_json] == ["r1", "r2"]
    assert as_json[0]["created_at"].endswith("Z")
    table = tether("--db", db_url, "agents", "list").stdout
    assert "lifecycle" in table
    assert "r1" in table
    assert "created" in table


def test_an_empty_list_prints_an_empty_json_array(tether: Tether, db_url: str) -> None:
    result = tether("--db", db_url, "agents", "list", "-o", "json")
    assert result.exit_code == 0
    assert result.stdout == "[]\n"
    assert tether("--db", db_url, "agents", "list", "-o", "ids").stdout == ""


def test_lifecycle_verbs_without_app_warn_that_hooks_did_not_run(
    tether: Tether, sqlite_url: str
) -> None:
    tether("--db", sqlite_url, "agents", "create", "worker", "r1")
    initialized = tether("--db", sqlite_url, "agents", "initialize", "r1")
    assert initialized.stderr.count("\n") == 1
    assert initialized.stderr.startswith("warning: the on_initialize hook of agent type 'worker'")
    assert "no --app was given" in initialized.stderr
    tether("--db", sqlite_url, "agents", "activate", "r1")
    tether("--db", sqlite_url, "agents", "pause", "r1")
    resumed = tether("--db", sqlite_url, "agents", "resume", "r1")  # resume has no hook
    assert resumed.exit_code == 0
    assert resumed.stderr == ""


def test_interrupt_exits_130(
    tether: Tether, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.app import App

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(App, "list_agents", interrupted)
    result = tether("--db", sqlite_url, "agents", "list")
    assert result.exit_code == 130
    assert error_line(result) == "error: interrupted"


# -- databases ------------------------------------------------------------------------------


def test_init_creates_the_database_and_db_upgrade_reports_the_revision(
    tether: Tether, db_url: str
) -> None:
    result = tether("--db", db_url, "init")
    assert result.exit_code == 0, result.output
    assert "created tether database" in result.stdout
    assert f"schema revision {migrate.head()}" in result.stdout
    if db_url.startswith("sqlite"):
        assert str(Path(db_url.removeprefix("sqlite:///")).resolve()) in result.stdout

    again = tether("--db", db_url, "db", "upgrade")
    assert again.exit_code == 0
    assert f"already at schema revision {migrate.head()}" in again.stdout


def test_an_unsupported_url_exits_2_with_one_line(tether: Tether) -> None:
    result = tether("--db", "mysql://x", "agents", "list")
    assert result.exit_code == 2
    assert "'mysql' is not supported" in error_line(result)


def test_the_database_url_can_come_from_the_environment(sqlite_url: str) -> None:
    runner = CliRunner(env={"TETHER_DATABASE_URL": sqlite_url, "TETHER_APP": None})
    runner.invoke(cli, ["agents", "create", "worker", "r1"], catch_exceptions=False)
    listed = CliRunner().invoke(cli, ["--db", sqlite_url, "agents", "list", "-o", "ids"])
    assert listed.stdout == "r1\n"


def test_an_unreachable_postgresql_exits_69_without_showing_the_password(tether: Tether) -> None:
    url = "postgresql://tether:s3cret-pw@127.0.0.1:1/tether"
    result = tether("--db", url, "agents", "list")
    assert result.exit_code == 69
    line = error_line(result)
    assert "cannot reach PostgreSQL" in line
    assert "s3cret-pw" not in result.output


def test_a_corrupted_sqlite_file_exits_69_and_is_left_alone(tether: Tether, tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)

    result = tether("--db", f"sqlite:///{path}", "agents", "list")

    assert result.exit_code == 69
    assert "corrupted" in error_line(result)
    assert path.read_bytes() == garbage


# -- --app -----------------------------------------------------------------------------------

APP_MODULE = """
import tether

app = tether.App("sqlite:///own.db")


class Greeter(tether.Agent):
    type = "greeter"

    def on_initialize(self, ctx):
        if self.config.get("explode"):
            raise RuntimeError("kaboom")
        ctx.state["greeting"] = "hello " + self.config["name"]

    def handle(self, ctx, task):
        return task


app.register(Greeter)
not_an_app = 42
"""


@pytest.fixture
def user_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module defining a tether.App, written in the working directory; yields its name."""
    with app_module(tmp_path, monkeypatch, APP_MODULE, prefix="user_agents") as name:
        yield name


def test_app_hooks_run_on_initialize(tether: Tether, db_url: str, user_app: str) -> None:
    app = f"{user_app}:app"
    created = tether("--app", app, "--db", db_url, "agents", "create", "greeter", "g1",
                     "--config", '{"name": "ann"}')  # fmt: skip
    assert created.exit_code == 0, created.output

    result = tether("--app", app, "--db", db_url, "agents", "initialize", "g1")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no "hooks did not run" warning
    state = tether("--db", db_url, "agents", "state", "g1")
    assert json.loads(state.stdout) == {"greeting": "hello ann"}
    assert not Path("own.db").exists()  # --db wins over the app's own URL


def test_a_hook_that_raises_leaves_the_agent_in_error_and_exits_1(
    tether: Tether, db_url: str, user_app: str
) -> None:
    app = f"{user_app}:app"
    tether("--app", app, "--db", db_url, "agents", "create", "greeter", "g1",
           "--config", '{"explode": true}')  # fmt: skip

    result = tether("--app", app, "--db", db_url, "agents", "initialize", "g1")

    assert result.exit_code == 1
    line = error_line(result)
    assert "on_initialize raised RuntimeError: kaboom" in line
    assert "tether agents recover g1" in line
    shown = json.loads(tether("--db", db_url, "agents", "show", "g1", "-o", "json").stdout)
    assert shown["lifecycle"] == "error"
    assert shown["error"]["message"] == "kaboom"
    assert shown["state"] == {}


def test_the_app_url_is_used_when_no_db_is_given(tether: Tether, user_app: str) -> None:
    result = tether("--app", f"{user_app}:app", "agents", "create", "greeter", "g1")
    assert result.exit_code == 0, result.output
    assert Path("own.db").exists()


def test_an_app_with_an_unregistered_type_refuses_it(tether: Tether, user_app: str) -> None:
    result = tether("--app", f"{user_app}:app", "agents", "create", "writer", "w1")
    assert result.exit_code == 2
    assert "'writer' is not registered" in error_line(result)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_module_xyz:app", "no module named 'no_such_module_xyz'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:not_an_app", "not_an_app is of type int, not a tether.App"),
        ("{module}", "must look like module:attribute"),
    ],
)
def test_a_bad_app_reference_is_a_usage_error(
    tether: Tether, sqlite_url: str, user_app: str, ref: str, message: str
) -> None:
    result = tether("--app", ref.format(module=user_app), "--db", sqlite_url, "agents", "list")
    assert result.exit_code == 2
    assert message in error_line(result)


def test_an_app_module_that_fails_to_import_is_reported_in_one_line(
    tether: Tether, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "import tether\n\nraise ValueError('bad setting')\n"
    with app_module(tmp_path, monkeypatch, source, prefix="broken") as name:
        result = tether("--app", f"{name}:app", "agents", "list")
    assert result.exit_code == 2
    assert f"importing {name} failed: ValueError: bad setting ({name}.py:3)" in error_line(result)


# -- demo and the real executable ------------------------------------------------------------


def test_demo_walks_agents_through_their_lifecycle_and_can_run_twice(
    tether: Tether, sqlite_url: str
) -> None:
    first = tether("--db", sqlite_url, "demo")
    assert first.exit_code == 0, first.output
    assert "refused: cannot activate" in first.stdout
    assert tether("--db", sqlite_url, "demo").exit_code == 0

    agents = json.loads(tether("--db", sqlite_url, "agents", "list", "--json").stdout)
    assert len(agents) == 8  # the demo's four agents, twice
    assert {a["lifecycle"] for a in agents} == {"terminated"}
    assert all("role" in a["state"] for a in agents)  # on_initialize ran
    actions = {
        a["agent_id"]: [e["action"] for e in history(tether, sqlite_url, a["agent_id"])]
        for a in agents
    }
    assert ["create", "initialize", "activate", "pause", "resume", "terminate"] in actions.values()


def test_python_dash_m_tether_runs_commands_in_a_real_process(sqlite_url: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", "--db", sqlite_url, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = run("agents", "create", "worker", "p1", "-o", "json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["agent_id"] == "p1"
    missing = run("agents", "show", "nobody")
    assert missing.returncode == 4
    assert missing.stderr.startswith("error: agent 'nobody' not found")
    assert "Traceback" not in missing.stderr
