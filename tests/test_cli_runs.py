"""``tether worker``, ``recover``, ``runs`` and ``incidents``: the run-level command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

import tether
from tests.clikit import app_module, cli_invoker, error_line, ok

Tether = Callable[..., Result]

APP_MODULE = """
import time
from pathlib import Path

import tether

app = tether.App("sqlite:///own.db", retry=tether.Retry(initial_delay=0.01, jitter=0))


def parse(text):
    if text == "bad" or Path("broken").exists():
        raise ValueError("cannot parse " + text)
    return text.upper()


def nap(seconds):
    time.sleep(seconds)
    return seconds


class Echo(tether.Agent):
    type = "echo"

    def handle(self, ctx, task):
        word = ctx.step(parse, task.get("text", "ok"))
        for n in range(task.get("naps", 0)):
            ctx.step(nap, task.get("nap", 0.05), name=f"nap-{n}")
        if task.get("sleep"):
            ctx.sleep(task["sleep"])
        return {"word": word}


app.register(Echo)
"""


@pytest.fixture
def tether_cli() -> Tether:
    """Run ``tether ARGS...`` in-process with a clean environment; exceptions are not hidden."""
    return cli_invoker()


@pytest.fixture
def user_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``module:app`` of an app module written in the (temporary) working directory."""
    with app_module(tmp_path, monkeypatch, APP_MODULE, prefix="run_agents") as name:
        yield f"{name}:app"


@pytest.fixture
def run(tether_cli: Tether, db_url: str, user_app: str) -> Callable[..., Result]:
    """``tether --app APP --db URL ARGS...``."""

    def invoke(*args: str) -> Result:
        return tether_cli("--app", user_app, "--db", db_url, *args)

    return invoke


def active_agent(run: Callable[..., Result], agent_id: str = "e1") -> str:
    for verb in (("create", "echo", agent_id), ("initialize", agent_id), ("activate", agent_id)):
        ok(run("agents", *verb))
    return agent_id


def submit(run: Callable[..., Result], task: str, agent_id: str = "e1") -> str:
    run_id = ok(run("runs", "submit", agent_id, task)).strip()
    assert run_id.startswith("run_")
    return run_id


def work(run: Callable[..., Result]) -> Result:
    result = run("worker", "--until-idle", "--timeout", "30")
    assert result.exit_code == 0, result.output
    return result


def shown(run: Callable[..., Result], run_id: str) -> dict[str, object]:
    value: dict[str, object] = json.loads(ok(run("runs", "show", run_id, "-o", "json")))
    return value


# -- worker, submit, result --------------------------------------------------------------------


def test_a_submitted_run_is_executed_by_worker_until_idle_and_its_result_printed(
    run: Callable[..., Result],
) -> None:
    active_agent(run)
    run_id = submit(run, '{"text": "hi"}')

    worked = work(run)

    lines = worked.stderr.splitlines()
    assert lines[0].startswith("worker ") and "started" in lines[0] and "echo" in lines[0]
    assert "is idle" in lines[-1] and "1 execution " in lines[-1]
    assert json.loads(ok(run("runs", "result", run_id))) == {"word": "HI"}


def test_worker_without_app_refuses_with_exit_2(tether_cli: Tether, sqlite_url: str) -> None:
    result = tether_cli("--db", sqlite_url, "worker", "--until-idle")
    assert result.exit_code == 2
    assert "a worker needs the code of your agent types" in error_line(result)


def test_worker_until_idle_exits_124_when_its_timeout_ends_first(
    run: Callable[..., Result],
) -> None:
    active_agent(run)
    submit(run, '{"sleep": 60}')
    result = run("worker", "--until-idle", "--timeout", "0.5")
    assert result.exit_code == 124
    assert "timed out after 0.5s with 1 run(s) unfinished" in result.stderr


def test_waiting_for_a_result_nobody_produces_exits_124(run: Callable[..., Result]) -> None:
    active_agent(run)
    waited = run("runs", "submit", "e1", '{"text": "x"}', "--wait", "--timeout", "0.2")
    assert waited.exit_code == 124
    assert waited.stdout == ""
    assert "is still pending after 0.2s; is a worker running?" in waited.stderr
    run_id = ok(run("runs", "list", "-o", "ids")).strip()

    result = run("runs", "result", run_id, "--wait", "--timeout", "0.2")

    assert result.exit_code == 124
    assert "still pending after 0.2s" in error_line(result)
    not_yet = run("runs", "result", run_id)
    assert not_yet.exit_code == 1
    assert "is pending and has no result yet" in error_line(not_yet)
    work(run)
    assert json.loads(ok(run("runs", "result", run_id, "--wait", "--timeout", "5"))) == {
        "word": "X"
    }


def test_submitting_a_task_id_twice_returns_the_same_run(run: Callable[..., Result]) -> None:
    active_agent(run)
    first = ok(run("runs", "submit", "e1", "{}", "--task-id", "t-1"))
    again = ok(run("runs", "submit", "e1", "{}", "--task-id", "t-1"))
    assert first == again
    assert ok(run("runs", "list", "-o", "ids")) == first


def test_submitting_to_an_agent_that_is_not_active_is_refused(run: Callable[..., Result]) -> None:
    ok(run("agents", "create", "echo", "e1"))
    result = run("runs", "submit", "e1", "{}")
    assert result.exit_code == 1
    assert "only an active agent starts runs" in error_line(result)


# -- list, show, timeline -------------------------------------------------------------------


def test_list_filters_by_agent_and_status_newest_first_with_a_limit(
    run: Callable[..., Result],
) -> None:
    active_agent(run, "e1")
    active_agent(run, "e2")
    good = submit(run, '{"text": "a"}', "e1")
    bad = submit(run, '{"text": "bad"}', "e1")
    other = submit(run, '{"text": "b"}', "e2")
    work(run)

    def ids(*args: str) -> list[str]:
        return ok(run("runs", "list", *args, "-o", "ids")).split()

    assert ids() == [other, bad, good]
    assert ids("--agent", "e1") == [bad, good]
    assert ids("--status", "completed") == [other, good]
    assert ids("--status", "NEEDS_ATTENTION", "--status", "failed") == [bad]
    assert ids("--limit", "1") == [other]
    listed = json.loads(ok(run("runs", "list", "--json")))
    assert [r["status"] for r in listed] == ["completed", "needs_attention", "completed"]
    assert run("runs", "list", "--status", "sleeping").exit_code == 2


def test_an_empty_run_list_is_an_empty_json_array(run: Callable[..., Result]) -> None:
    assert run("runs", "list", "-o", "json").stdout == "[]\n"


def test_show_gives_the_run_and_its_journal(run: Callable[..., Result]) -> None:
    active_agent(run)
    run_id = submit(run, '{"text": "hi", "naps": 2, "nap": 0.01}')
    work(run)

    record = shown(run, run_id)

    assert record["run_id"] == run_id
    assert record["status"] == "completed"
    assert record["result"] == {"word": "HI"}
    journal = record["journal"]
    assert isinstance(journal, list)
    assert [(s["seq"], s["name"], s["status"]) for s in journal] == [
        (1, "parse", "completed"),
        (2, "nap-0", "completed"),
        (3, "nap-1", "completed"),
    ]
    table = ok(run("runs", "show", run_id))
    assert "journal of" in table and "nap-1" in table


def test_timeline_lists_every_event_in_order(run: Callable[..., Result]) -> None:
    active_agent(run)
    run_id = submit(run, '{"text": "hi", "sleep": 0.05}')
    work(run)

    events = json.loads(ok(run("runs", "timeline", run_id, "-o", "json")))

    types = [e["type"] for e in events]
    assert types[0] == "run.submitted"
    assert types[-1] == "run.completed"
    assert "step.completed" in types and "run.waiting" in types
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert all(e["run_id"] == run_id and e["at"].endswith("Z") for e in events)
    table = ok(run("runs", "timeline", run_id))
    assert "run.waiting" in table
    assert "kind=timer" in table


# -- cancel, retry ----------------------------------------------------------------------------


def test_cancel_a_pending_run_then_its_result_fails_and_a_second_cancel_is_refused(
    run: Callable[..., Result],
) -> None:
    active_agent(run)
    run_id = submit(run, "{}")

    assert ok(run("runs", "cancel", run_id, "--reason", "not needed")) == (
        f"run {run_id} is now cancelled\n"
    )

    assert shown(run, run_id)["status"] == "cancelled"
    result = run("runs", "result", run_id)
    assert result.exit_code == 1
    assert "ended cancelled: not needed" in error_line(result)
    again = run("runs", "cancel", run_id)
    assert again.exit_code == 1
    assert "already cancelled" in error_line(again)


def test_runs_retry_runs_the_failed_step_again(run: Callable[..., Result], tmp_path: Path) -> None:
    active_agent(run)
    (tmp_path / "broken").touch()
    run_id = submit(run, '{"text": "fine"}')
    work(run)
    assert shown(run, run_id)["status"] == "needs_attention"
    (tmp_path / "broken").unlink()

    retried = ok(run("runs", "retry", run_id, "--comment", "fixed the parser"))

    assert f"run {run_id} will be retried" in retried
    work(run)
    assert json.loads(ok(run("runs", "result", run_id))) == {"word": "FINE"}


def test_retrying_a_run_without_an_open_incident_is_refused(run: Callable[..., Result]) -> None:
    active_agent(run)
    run_id = submit(run, "{}")
    work(run)
    result = run("runs", "retry", run_id)
    assert result.exit_code == 1
    assert "is completed with no open incident" in error_line(result)


# -- incidents --------------------------------------------------------------------------------


def failed_run(run: Callable[..., Result]) -> tuple[str, str]:
    """A run whose first step raised ValueError; returns (run id, incident id)."""
    active_agent(run)
    run_id = submit(run, '{"text": "bad"}')
    work(run)
    incident_id = ok(run("incidents", "list", "--run", run_id, "-o", "ids")).strip()
    assert incident_id.startswith("inc_")
    return run_id, incident_id


def test_an_incident_is_listed_shown_and_skipped_with_a_supplied_output(
    run: Callable[..., Result],
) -> None:
    run_id, incident_id = failed_run(run)

    listed = json.loads(ok(run("incidents", "list", "--status", "open", "--json")))
    assert [(i["incident_id"], i["run_id"], i["seq"]) for i in listed] == [(incident_id, run_id, 1)]
    shown_incident = json.loads(ok(run("incidents", "show", incident_id, "-o", "json")))
    assert shown_incident["error"]["type"] == "ValueError"
    assert shown_incident["error"]["message"] == "cannot parse bad"
    assert "Traceback" in shown_incident["error"]["traceback"]
    assert "cannot parse bad" in ok(run("incidents", "list"))

    skipped = run("incidents", "skip", incident_id, "--output", '"FIXED"', "--comment", "by hand")

    assert ok(skipped).startswith(f"incident {incident_id} resolved with skip")
    work(run)
    assert json.loads(ok(run("runs", "result", run_id))) == {"word": "FIXED"}
    resolved = json.loads(ok(run("incidents", "list", "--status", "resolved", "-o", "json")))
    assert [(i["resolution"], i["resolved_by"]) for i in resolved] == [("skip", "tester")]
    assert ok(run("incidents", "list", "--status", "open", "-o", "json")) == "[]\n"


def test_a_second_decision_on_a_resolved_incident_is_refused(run: Callable[..., Result]) -> None:
    run_id, incident_id = failed_run(run)
    ok(run("incidents", "abort", incident_id, "--comment", "give up"))

    again = run("incidents", "skip", incident_id, "--output", "1")

    assert again.exit_code == 1
    assert "already resolved (abort by tester)" in error_line(again)
    result = run("runs", "result", run_id)
    assert result.exit_code == 1
    assert "ended failed: give up" in error_line(result)


def test_incidents_retry_runs_the_step_again(run: Callable[..., Result], tmp_path: Path) -> None:
    (tmp_path / "broken").touch()
    active_agent(run)
    run_id = submit(run, '{"text": "later"}')
    work(run)
    incident_id = ok(run("incidents", "list", "--run", run_id, "-o", "ids")).strip()
    (tmp_path / "broken").unlink()

    decided = json.loads(ok(run("incidents", "retry", incident_id, "--json")))

    assert decided["status"] == "resolved" and decided["resolution"] == "retry"
    work(run)
    assert json.loads(ok(run("runs", "result", run_id))) == {"word": "LATER"}


def test_skip_needs_an_output(run: Callable[..., Result]) -> None:
    _, incident_id = failed_run(run)
    result = run("incidents", "skip", incident_id)
    assert result.exit_code == 2
    assert "--output" in result.stderr
    bad_json = run("incidents", "skip", incident_id, "--output", "{nope")
    assert bad_json.exit_code == 2
    assert "not valid JSON" in bad_json.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("runs", "show", "run_nope"),
        ("runs", "timeline", "run_nope"),
        ("runs", "result", "run_nope"),
        ("runs", "result", "run_nope", "--wait", "--timeout", "1"),
        ("runs", "cancel", "run_nope"),
        ("runs", "retry", "run_nope"),
        ("runs", "submit", "ghost", "{}"),
        ("incidents", "show", "inc_nope"),
        ("incidents", "retry", "inc_nope"),
        ("incidents", "skip", "inc_nope", "--output", "1"),
        ("incidents", "abort", "inc_nope"),
    ],
)
def test_unknown_runs_agents_and_incidents_exit_4(
    run: Callable[..., Result], args: tuple[str, ...]
) -> None:
    result = run(*args)
    assert result.exit_code == 4
    assert "not found" in error_line(result)


def test_recover_with_nothing_to_recover_prints_an_empty_list(run: Callable[..., Result]) -> None:
    result = run("recover", "-o", "json")
    assert result.exit_code == 0
    assert result.stdout == "[]\n"
    assert "nothing to recover" in result.stderr


# -- real worker processes --------------------------------------------------------------------


def start_worker(db_url: str, app_ref: str, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "tether", "worker", "--app", app_ref, "--db", db_url, *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_steps(app: tether.App, run_id: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while app.get_run(run_id).steps < count:
        assert time.monotonic() < deadline, f"run {run_id} did not reach step {count}"
        time.sleep(0.02)


def test_sigterm_stops_a_worker_process_gracefully_and_hands_its_run_back(
    run: Callable[..., Result], db_url: str, user_app: str, tmp_path: Path
) -> None:
    active_agent(run)
    run_id = submit(run, '{"naps": 40, "nap": 0.05}')
    proc = start_worker(db_url, user_app, tmp_path)
    with tether.App(db_url, require_types=False) as app:
        wait_for_steps(app, run_id, 4)

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)

        assert proc.returncode == 0, stderr
        assert "SIGTERM: stopping" in stderr
        assert "stopped by SIGTERM" in stderr.splitlines()[-1]
        info = app.get_run(run_id)
        assert info.status == tether.RunStatus.PENDING
        assert info.owner is None
        assert 4 <= info.steps < 41
        released = [e for e in app.timeline(run_id) if e.type == "run.released"]
        assert released and released[0].data["reason"] == "worker shutting down"

        second = start_worker(db_url, user_app, tmp_path)
        try:
            result = run("runs", "result", run_id, "--wait", "--timeout", "60")
        finally:
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=30)
        assert json.loads(ok(result)) == {"word": "OK"}
        assert second.returncode == 0
        assert all(step.attempts == 1 for step in app.run_steps(run_id))


def test_a_second_interrupt_exits_130_at_once(
    run: Callable[..., Result], db_url: str, user_app: str, tmp_path: Path
) -> None:
    active_agent(run)
    run_id = submit(run, '{"naps": 2, "nap": 20}')
    proc = start_worker(db_url, user_app, tmp_path)
    with tether.App(db_url, require_types=False) as app:
        wait_for_steps(app, run_id, 1)
        time.sleep(0.2)  # inside the 20-second step now
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting for the step in flight to finish
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)  # not the rest of the 20-second step
        assert proc.returncode == 130
        assert "SIGINT again: exiting now" in stderr
        assert "Traceback" not in stderr

        recovered = run("recover", "-o", "ids")
        assert ok(recovered).split() == [run_id]
        assert app.get_run(run_id).status == tether.RunStatus.PENDING
