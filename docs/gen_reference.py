"""Write docs/reference.md from the code itself, so the reference cannot drift.

Run ``python docs/gen_reference.py`` after changing a public signature or docstring; a test
fails when the checked-in page differs from what this script produces.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from typing import Any

import click

import tether
from tether import errors, run_status, types, vocabulary
from tether.cli import COMMANDS, cli
from tether.context import AsyncRunContext, RunContext

OUT = Path(__file__).with_name("reference.md")


def _first_paragraph(obj: Any) -> str:
    doc = obj if isinstance(obj, str) else (inspect.getdoc(obj) or "")
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _members(cls: type) -> list[str]:
    lines = []
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or name in cls.__dict__.get("__reference_skip__", ()):
            continue
        if isinstance(member, property):
            lines.append(f"- `{name}` — {_first_paragraph(member)}")
            continue
        if not callable(member):
            continue
        signature = str(inspect.signature(member)).replace("'", "")
        signature = signature.replace("(self, ", "(").replace("(self)", "()")
        lines.append(f"- `{name}{signature}` — {_first_paragraph(member)}")
    return lines


def _field_docs(cls: type) -> list[str]:
    """Dataclass fields with the docstring written under each one."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    lines = []
    for node, after in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            default = ast.unparse(node.value) if node.value is not None else "required"
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                doc = " ".join(str(after.value.value).split())
            lines.append(f"- `{node.target.id}` (default `{default}`) — {doc}")
    return lines


def _cli() -> list[str]:
    lines = []
    ctx = click.Context(cli, info_name="tether")
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                subcommand = command.get_command(ctx, sub)
                assert subcommand is not None
                usage = " ".join(subcommand.collect_usage_pieces(ctx))
                lines.append(
                    f"- `tether {name} {sub} {usage}` — {_first_paragraph(subcommand.help or '')}"
                )
        else:
            usage = " ".join(command.collect_usage_pieces(ctx))
            lines.append(f"- `tether {name} {usage}` — {_first_paragraph(command.help or '')}")
    return lines


def _errors() -> list[str]:
    """The error trees drawn in ``tether.errors``, then what its docstring says of them."""
    lines = (inspect.getdoc(errors) or "").split("::", 1)[1].strip("\n").splitlines()
    end = next(i for i, line in enumerate(lines) if line and not line.startswith(" "))
    tree = "\n".join(lines[:end]).rstrip()
    prose = " ".join(" ".join(lines[end:]).split())
    return ["```", inspect.cleandoc(tree), "```", "", prose, ""]


def _catalog(title: str, what: str, catalog: dict[Any, str]) -> list[str]:
    lines = [f"### {title}", "", what, "", "| name | meaning |", "| --- | --- |"]
    lines += [f"| `{member.value}` | {meaning} |" for member, meaning in catalog.items()]
    return [*lines, ""]


def _run_statuses() -> list[str]:
    lines = [
        "### Run statuses",
        "",
        _first_paragraph(run_status),
        "",
        "| action | from | to | by |",
        "| --- | --- | --- | --- |",
    ]
    for t in run_status.TRANSITIONS.values():
        sources = ", ".join(f"`{s.value}`" for s in sorted(t.sources))
        lines.append(f"| `{t.action}` | {sources} | `{t.target.value}` | {t.by} |")
    lines += ["", "What a person decided holds against a worker's next write:", ""]
    for held, targets in run_status.HELD.items():
        kept = ", ".join(f"`{s.value}`" for s in sorted(targets))
        lines.append(f"- a `{held.value}` run stays `{held.value}` when a worker writes {kept}")
    for action, status in run_status.STILL_HELD.items():
        lines.append(
            f"- `{action}` of a run its worker still holds (paused between two of its commits) "
            f"makes it `{status.value}` again: that execution goes on"
        )
    lines += ["", "An agent's lifecycle action acts on its runs in the same transaction:", ""]
    for action, run_action in run_status.ON_AGENT.items():
        lines.append(f"- agent `{action}` → runs `{run_action}`")
    return [*lines, "", "```mermaid", run_status.diagram(), "```", ""]


def render() -> str:
    """The whole page."""
    parts = [
        "# Reference",
        "",
        "Generated from the code by `docs/gen_reference.py`; do not edit by hand.",
        "",
        "## Python: `import tether`",
        "",
        "Public names: " + ", ".join(f"`{n}`" for n in tether.__all__) + ".",
        "",
    ]
    for cls in (
        tether.App,
        tether.RunHandle,
        RunContext,
        AsyncRunContext,
        tether.Agent,
        tether.Interceptor,
    ):
        parts += [f"### `tether.{cls.__name__}`", "", _first_paragraph(cls), ""]
        parts += [*_members(cls), ""]
    for cls in (types.Retry, types.Retention):
        parts += [f"### `tether.{cls.__name__}`", "", _first_paragraph(cls), ""]
        parts += [*_field_docs(cls), ""]
    parts += [
        "### `tether.current_step()`",
        "",
        _first_paragraph(tether.current_step)
        + " Fields of the returned `StepScope`: "
        + ", ".join(f"`{f}`" for f in tether.StepScope.__dataclass_fields__)
        + ".",
        "",
        "### `tether.current_run()`",
        "",
        _first_paragraph(tether.current_run)
        + " Fields of the returned `RunScope`: "
        + ", ".join(f"`{f}`" for f in tether.RunScope.__dataclass_fields__)
        + ". Interceptors see a `StepAttempt`: "
        + ", ".join(f"`{f}`" for f in tether.StepAttempt.__dataclass_fields__)
        + ".",
        "",
        *_run_statuses(),
        "## Vocabulary",
        "",
        _first_paragraph(vocabulary),
        "",
        *_catalog(
            "Events",
            "Every event has `seq` (its order), `type`, `run_id`, `agent_id`, `data` and `at`.",
            vocabulary.EVENTS,
        ),
        *_catalog(
            "Incident kinds",
            "Why a run needs a person (`Incident.kind`).",
            vocabulary.INCIDENT_KINDS,
        ),
        *_catalog(
            "Incident actions",
            "What a person does with an open incident.",
            vocabulary.INCIDENT_ACTIONS,
        ),
        *_catalog("Journal entry kinds", "`StepInfo.kind`.", vocabulary.STEP_KINDS),
        *_catalog("Wait kinds", "What a waiting run waits for.", vocabulary.WAIT_KINDS),
        "## Errors",
        "",
        *_errors(),
        "## Command line",
        "",
        "Global options: `--db URL` (else `TETHER_DATABASE_URL`, else `sqlite:///tether.db`), "
        "`--app module:attr` (else `TETHER_APP`). Listings take `-o table|json|jsonl|ids` "
        "(`--json` = `-o json`). Data goes to stdout; progress and errors to stderr.",
        "",
        *_cli(),
        "",
        "Exit codes: 0 success, 1 refused or failed, 2 usage error, 4 not found, 5 conflict or "
        "illegal transition, 69 database unavailable, 124 a wait timed out, 130 interrupted.",
        "",
        "## Configuration",
        "",
        "- `TETHER_DATABASE_URL`: `sqlite:///path.db` (options `?synchronous=normal`, "
        "`?busy_timeout=SECONDS`) or `postgresql://user@host:port/db` (also "
        "`postgresql+psycopg://`).",
        "- `TETHER_APP`: `module:attr` of your `tether.App`, for the CLI and workers.",
        "- `TETHER_ACTOR`: who is recorded as acting (default: the OS user).",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
