"""``tether demo``: run the demo scenario (see ``tether.demo``)."""

from __future__ import annotations

import click

from tether.cli.common import CliState, console, pass_state, target_options


@click.command()
@target_options(app=False)
@click.option(
    "--crash",
    is_flag=True,
    help="Kill a real worker process mid-run (SIGKILL) and show a new one resume it.",
)
@pass_state
def demo(state: CliState, crash: bool) -> None:
    """Run a short scenario, offline, on the database (default ./tether.db).

    Agents go through their lifecycle; a worker runs their tasks while a live view shows
    retries with backoff, a longer timeout, durable sleeps, and an incident resolved by a
    simulated operator. Then a checkpoint is restored and a finished run is forked.
    Everything stays in the database for `tether runs` and the rest.
    """
    if crash:
        from tether.demo import run_crash_demo

        code = run_crash_demo(state.url, console())
    else:
        from tether.demo import run_demo

        code = run_demo(state.url, console())
    if code:
        raise click.exceptions.Exit(code)
