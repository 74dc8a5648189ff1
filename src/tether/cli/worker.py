"""``tether worker`` and ``tether recover``: execute runs, and hand back runs of dead workers."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from tether.cli.common import CliState, emit, output_option, pass_state, target_options
from tether.cli.runs import RUN_COLUMNS
from tether.errors import ConfigurationError

if TYPE_CHECKING:
    from tether.engine.worker import Worker

RECOVERED_COLUMNS = [c for c in RUN_COLUMNS if c[1] in ("run_id", "agent_id", "status", "steps")]
"""The run table's columns that say which runs recovery handed back, and how far they got."""


@click.command()
@target_options()
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Runs executing at once in this process.",
)
@click.option(
    "--until-idle",
    is_flag=True,
    help="Exit once nothing can progress without a person (timers are waited for).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Stop after this long; with --until-idle, exit 124 if work was left.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="What the worker logs on stderr.",
)
@pass_state
def worker(
    state: CliState,
    concurrency: int,
    until_idle: bool,
    timeout: float | None,
    log_level: str,
) -> None:
    """Claim and execute runs of the --app's agent types until stopped.

    SIGTERM or Ctrl-C stops it gracefully: no new claims, and runs in flight are handed
    back at their next step, for this or another worker to resume. A second signal exits
    at once (130); a run then in flight is resumed by the next worker that starts.
    Start as many workers as you like (on several machines with PostgreSQL).
    """
    if not state.has_user_app:
        raise ConfigurationError(
            "a worker needs the code of your agent types to run them: pass --app module:attr "
            "(or set TETHER_APP), e.g. tether worker --app myagents:app"
        )
    app = state.get_app()
    runner = app.worker(concurrency=concurrency)
    where = app.store.target
    database = f"{where.sqlite_path.resolve()} (SQLite)" if where.sqlite_path else where.display
    click.echo(
        f"worker {runner.id} started on {database}: agent types "
        f"{', '.join(runner.agent_types)}; concurrency {concurrency}",
        err=True,
    )
    signals: list[str] = []
    previous = _install_signal_handlers(runner, signals)
    logger = logging.getLogger("tether")
    handler, level = _log_to_stderr(logger), logger.level
    logger.setLevel(log_level.upper())
    started = time.monotonic()
    try:
        executions = runner.run(until_idle=until_idle, timeout=timeout)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for signum, action in previous.items():
            signal.signal(signum, action)
    elapsed = time.monotonic() - started
    timed_out = timeout is not None and elapsed >= timeout
    left = 0
    if signals:
        why = f"stopped by {signals[0]}"
    elif until_idle and timed_out:
        left = app.store.count_unfinished(runner.agent_types)[0]
        why = f"timed out after {timeout:g}s with {left} run(s) unfinished" if left else "is idle"
    elif until_idle:
        why = "is idle (nothing left can progress without a person)"
    else:
        why = "stopped at its --timeout" if timed_out else "stopped"
    plural = "" if executions == 1 else "s"
    click.echo(
        f"worker {runner.id} {why}: {executions} execution{plural} in {elapsed:.1f}s", err=True
    )
    if left:
        raise click.exceptions.Exit(124)


def _install_signal_handlers(runner: Worker, signals: list[str]) -> dict[int, Any]:
    """SIGTERM/SIGINT stop the worker gracefully; a second one exits at once with 130."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signals:
            _say(f"{name} again: exiting now; a run in flight resumes on the next worker")
            os._exit(130)  # no graceful path left: leave the runs to recovery
        signals.append(name)
        _say(
            f"{name}: stopping; runs in flight are handed back at their next step "
            f"({name} again exits at once)"
        )
        runner.stop()

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    return previous


def _say(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, RuntimeError):  # stderr closed, or re-entered mid-write: say nothing
        pass


def _log_to_stderr(logger: logging.Logger) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    return handler


@click.command()
@target_options(app=False)
@output_option()
@pass_state
def recover(state: CliState, output: str) -> None:
    """Make runs of dead workers claimable now, without waiting for their leases to expire.

    A run is recovered when its lease expired or its worker's process on this host no longer
    exists. A worker resumes it by replay (workers also do this by themselves at start-up).
    """
    app = state.get_app()
    run_ids = app.recover_runs()
    if run_ids:
        click.echo(
            f"made {len(run_ids)} run(s) of dead workers claimable again; a worker resumes them "
            "(tether worker --app module:attr)",
            err=True,
        )
    else:
        click.echo("nothing to recover: every claimed run is held by a live worker", err=True)
    if output != "table" or run_ids:
        emit(
            [app.get_run(run_id) for run_id in run_ids], output, RECOVERED_COLUMNS, id_key="run_id"
        )
