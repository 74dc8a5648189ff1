"""What the command-line tests share: ``tether`` in-process, its result checks, an app module."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tether.cli import cli

Invoke = Callable[..., Result]
"""``invoke("agents", "list")``: run one ``tether`` command line, return its result."""


def cli_invoker(*prefix: str) -> Invoke:
    """Run ``tether PREFIX... ARGS...`` in-process with a clean environment.

    Exceptions are not hidden, the actor is ``tester`` and tables are 200 columns wide.
    """
    runner = CliRunner(
        env={
            "TETHER_DATABASE_URL": None,
            "TETHER_APP": None,
            "TETHER_ACTOR": "tester",
            "COLUMNS": "200",
        }
    )

    def invoke(*args: str) -> Result:
        return runner.invoke(cli, [*prefix, *args], catch_exceptions=False)

    return invoke


def ok(result: Result) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.exit_code == 0, result.output
    return result.stdout


def error_line(result: Result) -> str:
    """The single ``error: ...`` line a failed command prints, with nothing on stdout."""
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@contextmanager
def app_module(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    *,
    prefix: str,
    importable: bool = False,
) -> Iterator[str]:
    """Write ``source`` as a uniquely named module in ``folder``, made the working directory.

    ``--app`` finds it there by itself; ``importable`` also puts the folder on ``sys.path``, for
    tests that import the module too. ``sys.path`` is restored and the module forgotten after.

    Yields:
        The module's name.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(source)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path] if importable else list(sys.path))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)
