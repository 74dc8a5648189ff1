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
from tether import errors, types
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
    for cls in (tether.App, tether.RunHandle, RunContext, AsyncRunContext, tether.Agent):
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
        "### Errors",
        "",
        "```",
        inspect.getdoc(errors).split("::")[1].strip("\n") if errors.__doc__ else "",
        "```",
        "",
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
