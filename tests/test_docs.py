"""The docs stay true: their examples run, and what they show matches the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tether
from tether import lifecycle

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(tmp_path)
    return env


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    readme = ROOT / "README.md"
    python = _blocks(readme, "python")
    (tmp_path / "agents.py").write_text(next(b for b in python if b.startswith("# agents.py")))
    commands = [
        line[2:]
        for block in _blocks(readme, "console")
        for line in block.splitlines()
        if line.startswith("$ ")
    ]
    assert len(commands) >= 10, "the tour lost its commands"
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
        text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert "exit 5" in done.stdout  # the refused illegal transition
    assert "allowed from terminated" in done.stderr

    (tmp_path / "tour.py").write_text(next(b for b in python if not b.startswith("# agents")))
    done = subprocess.run(
        [sys.executable, "tour.py"], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sources say durable agents survive crashes" in done.stdout

    # The tour goes on: every later example runs on its own too.
    for index, block in enumerate(python[2:]):
        (tmp_path / f"tour{index}.py").write_text(block)
        done = subprocess.run(
            [sys.executable, f"tour{index}.py"], cwd=tmp_path, env=_env(tmp_path),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("index", range(len(_blocks(ROOT / "docs" / "howto.md", "python"))))
def test_every_howto_example_runs(tmp_path: Path, index: int) -> None:
    example = _blocks(ROOT / "docs" / "howto.md", "python")[index]
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


SPEC_PROGRAM = """\
import tether

app = tether.App()  # TETHER_DATABASE_URL, else sqlite:///tether.db


class Researcher(tether.Agent):
    type = "researcher"
    budget = tether.Budget(max_steps=200, max_cost=2.00, on_breach="ask")

    def on_initialize(self, ctx):
        ctx.state["notes"] = []

    def handle(self, ctx: tether.RunContext, task: dict) -> dict:
        hits = ctx.step(search_web, task["query"], tool="web_search", cost=0.01,
                        retry=tether.Retry(max_attempts=5))          # journaled, retried by error class
        ctx.state["notes"].extend(hits)                               # persisted with the step
        summary = ctx.call("writer", {"hits": hits})                  # child run on another agent
        if not ctx.approve("Publish this summary?", data=summary, timeout=3600, default="reject"):
            return {"published": False}
        ctx.step(publish, summary, at_most_once=True)                 # never repeated after a crash
        return {"published": True}


app.register(Researcher)
"""  # noqa: E501 (as the specification writes it)
"""The example program of the product specification ("How a user's program reads"), exactly
as written there."""

SPEC_STUBS = """
published: list[str] = []


def search_web(query: str) -> list[str]:
    return [f"{query}: source {i}" for i in range(3)]


def publish(summary: str) -> int:
    published.append(summary)
    return len(published)


@app.agent("writer")
def writer(ctx: tether.RunContext, task: dict) -> str:
    return ctx.step(lambda hits: f"{len(hits)} sources agree", task["hits"], name="write")
"""
"""What the program leaves to its reader: the two tools it calls and the agent it delegates to."""

SPEC_DRIVER = """
import myagents
from myagents import app
from tether.testing import work_until

for agent_type, agent_id in (("researcher", "r1"), ("writer", "writer")):
    app.create_agent(agent_type, agent_id)
    app.initialize(agent_id)
    app.activate(agent_id)
run = app.submit("r1", {"query": "durable agents"})
# Until the approval is asked (app.work(until_idle=True) would wait for its hour's deadline).
work_until(app, lambda: app.approvals(run_id=run.run_id, status="pending"), timeout=60)
[asked] = app.approvals(run_id=run.run_id, status="pending")
assert (asked.title, asked.data) == ("Publish this summary?", "3 sources agree"), asked
app.decide(asked.approval_id, True, comment="ship it", digest=asked.digest, actor="tester")
app.work(until_idle=True, timeout=30)
assert run.result() == {"published": True}, run.info()
assert myagents.published == ["3 sources agree"]
assert app.get_agent("r1").state == {"notes": [f"durable agents: source {i}" for i in range(3)]}

usage = app.usage(run.run_id)
assert usage.usage.calls == {"web_search": 1} and usage.usage.cost == 0.01, usage
assert usage.usage.steps == 2 and usage.total.steps == 3  # search, publish; the writer's step
assert usage.total.calls == {"web_search": 1} and usage.total.cost == 0.01, usage
assert [(r["agent_id"], r["depth"]) for r in usage.runs] == [("r1", 0), ("writer", 1)]
limits = {lim.limit: (lim.holder, lim.max, lim.used, lim.reserved) for lim in usage.limits}
assert limits == {
    "max_cost": (run.run_id, 2.0, 0.01, 0.0),
    "max_steps": (run.run_id, 200.0, 3.0, 0.0),  # the writer spends against it too
}, limits
print("spec program ok")
"""


def test_the_specifications_example_program_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "myagents.py").write_text(SPEC_PROGRAM + SPEC_STUBS)
    (tmp_path / "drive.py").write_text(SPEC_DRIVER)
    env = _env(tmp_path)
    env["TETHER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'spec.db'}"
    done = subprocess.run(
        [sys.executable, "drive.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "spec program ok" in done.stdout
    assert (tmp_path / "spec.db").exists() and not (tmp_path / "tether.db").exists()


def test_the_lifecycle_diagram_in_the_docs_is_the_enforced_table() -> None:
    (diagram,) = _blocks(ROOT / "docs" / "concepts.md", "mermaid")
    assert diagram.strip() == lifecycle.diagram().strip()


def test_the_reference_page_is_generated_from_the_current_code() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_reference.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, "docs/reference.md is stale: run python docs/gen_reference.py"


def test_the_public_api_is_exactly_this() -> None:
    assert sorted(tether.__all__) == [
        "Agent", "AlreadyExists", "App", "ApprovalInfo", "AsyncRunContext", "Budget",
        "BudgetExceeded", "Checkpoint", "ChildCancelled", "ChildHandle", "ChildRunFailed",
        "ConfigurationError", "ConflictError", "ControlSignal", "DatabaseUnavailable",
        "Decision", "HookContext", "Interceptor", "InvalidInput", "InvalidTransition",
        "LeaseLost", "LifecycleState", "LimitInfo", "Message", "MessageInfo",
        "NonDeterminismError", "NotFound", "Policy", "PolicyDenied", "Ready", "Receive",
        "Refused", "Retention", "Retry", "RunContext", "RunFailed", "RunHandle", "RunScope",
        "RunStatus", "RunUsage", "SerializationError", "StepAttempt", "StepScope",
        "StorageFull", "Strategy", "TetherError", "Usage", "WaitTimeout", "__version__",
        "current_run", "current_step",
    ]  # fmt: skip
    for name in tether.__all__:
        assert hasattr(tether, name), name


def test_import_tether_does_not_load_sqlalchemy() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tether; print('sqlalchemy' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == "False"
