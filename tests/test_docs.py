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
