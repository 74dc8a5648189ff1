"""``tether demo``: run the demo scenario (see ``tether.demo``)."""

from __future__ import annotations

import click

from tether.cli.common import CliState, console, pass_state


@click.command()
@pass_state
def demo(state: CliState) -> None:
    """Run a short scenario on the database: agents through their lifecycle, recorded."""
    from tether.demo import run_demo

    code = run_demo(state.url, console())
    if code:
        raise click.exceptions.Exit(code)
