"""The ``tether`` command line.

Commands live in their own modules and are imported only when used: to add a group, write
``cli/runs.py`` with a ``click.Group`` called ``runs`` and add one line to ``COMMANDS``.
Keep command modules cheap to import (``tether --help`` imports each to show its summary):
import ``rich``, ``tether.app`` and ``tether.store`` inside functions, not at the top.

Errors: a ``TetherError`` becomes one ``error: ...`` line on stderr and exits with the error's
``exit_code``; click usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from tether import __version__
from tether.cli.common import CliState, OrderedGroup, error
from tether.errors import TetherError

COMMANDS: dict[str, str] = {
    "init": "tether.cli.db:init",
    "demo": "tether.cli.demo:demo",
    "worker": "tether.cli.worker:worker",
    "recover": "tether.cli.worker:recover",
    "agents": "tether.cli.agents:agents",
    "runs": "tether.cli.runs:runs",
    "incidents": "tether.cli.incidents:incidents",
    "messages": "tether.cli.messages:messages",
    "approvals": "tether.cli.approvals:approvals",
    "checkpoints": "tether.cli.checkpoints:checkpoints",
    "gc": "tether.cli.gc:gc",
    "db": "tether.cli.db:db",
}
"""Command name -> ``module:attribute`` of its click command, in the order help lists them."""

EPILOG = """\b
Exit codes:
  0   success
  1   refused or failed
  2   usage error (bad option, URL, JSON or --app)
  4   not found
  5   conflict or illegal transition
  69  database unavailable
  124 a wait timed out
  130 interrupted
"""


class LazyGroup(OrderedGroup):
    """A group that imports each subcommand from ``module:attr`` the first time it is needed."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The lazy commands in table order, then any added eagerly."""
        eager = [name for name in super().list_commands(ctx) if name not in self.lazy_commands]
        return [*self.lazy_commands, *eager]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import the command on first use."""
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is a {type(command).__name__}, not a click command")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, turning tether's errors and Ctrl-C into exit codes."""
        try:
            return super().invoke(ctx)
        except TetherError as exc:
            error(str(exc))
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            error("interrupted")
            ctx.exit(130)
        except Exception as exc:
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            # A database error tether did not expect (a schema changed by hand, a dropped
            # table): one line, not a traceback.
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            error(
                f"database error: {detail}; the database does not match this tether's schema "
                "(check it with tether db upgrade, or use another --db)"
            )
            ctx.exit(1)


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--db",
    "url",
    envvar="TETHER_DATABASE_URL",
    metavar="URL",
    help="Database URL [env TETHER_DATABASE_URL; default sqlite:///tether.db, or the --app's].",
)
@click.option(
    "--app",
    "app_ref",
    envvar="TETHER_APP",
    metavar="MODULE:ATTR",
    help="Import your tether.App (and its agent types and hooks) [env TETHER_APP].",
)
@click.version_option(__version__, "-V", "--version", prog_name="tether")
@click.pass_context
def cli(ctx: click.Context, url: str | None, app_ref: str | None) -> None:
    """tether: a durable runtime for AI agents."""
    state = CliState(url=url or None, app_ref=app_ref or None)
    ctx.obj = state
    ctx.call_on_close(state.close)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tether`` script and ``python -m tether``."""
    try:
        cli.main(args=argv, prog_name="tether")
    except BrokenPipeError:
        # The reader went away (`tether agents list -o ids | head -1`): exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


__all__ = ["COMMANDS", "LazyGroup", "cli", "main"]
