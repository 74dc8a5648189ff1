"""``tether demo``: run the demo scenario (see ``tether.demo``)."""

from __future__ import annotations

import sys

import click

from tether.cli.common import CliState, console, pass_state, target_options
from tether.errors import ConfigurationError


@click.command()
@target_options(app=False)
@click.option(
    "--crash",
    is_flag=True,
    help="Kill a real worker process mid-run (SIGKILL) and show a new one resume it.",
)
@click.option(
    "--interactive",
    is_flag=True,
    help="Decide the approval yourself, at this terminal, instead of a simulated reviewer.",
)
@pass_state
def demo(state: CliState, crash: bool, interactive: bool) -> None:
    """Run a short scenario, offline, on the database (default ./tether.db).

    Agents go through their lifecycle; a worker runs their tasks while a live view shows
    retries with backoff, a longer timeout, durable sleeps, a budget hit (the run waits until
    a simulated operator raises the limit), a tool a policy denies, an incident resolved by a
    simulated operator, and a human approval that gates publishing the report (decided by a
    simulated reviewer, or by you with --interactive). Then a checkpoint is restored and a
    finished run is forked. Everything stays in the database for `tether runs` and the rest.
    """
    if interactive and crash:
        raise ConfigurationError(
            "--interactive and --crash do not go together: the crash demo asks nobody; "
            "run them one at a time"
        )
    if interactive and not sys.stdin.isatty():
        raise ConfigurationError(
            "--interactive asks you to decide at the terminal, but stdin is not a terminal; "
            "run tether demo --interactive in a terminal, or leave out --interactive to let "
            "a simulated reviewer decide"
        )
    if crash:
        from tether.demo import run_crash_demo

        code = run_crash_demo(state.url, console())
    else:
        from tether.demo import run_demo

        code = run_demo(state.url, console(), interactive=interactive)
    if code:
        raise click.exceptions.Exit(code)
