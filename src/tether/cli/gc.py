"""``tether gc``: apply the retention policy now (old finished runs, events, state versions)."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

import click

from tether.cli.common import CliState, Column, Row, dump_json, emit, output_option, pass_state

if TYPE_CHECKING:
    from tether.types import Retention

    _ParamType = click.ParamType[Any, Any]
else:  # click < 8.2 has no type parameters here
    _ParamType = click.ParamType

UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
"""Duration suffixes and their length in seconds."""

DURATION_FORMS = "seconds (3600) or a number with d, h, m or s (30d, 12h, 15m, 45s)"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms]?)")

GC_COLUMNS: list[Column] = [("removed", "what"), ("count", "count")]
DRY_RUN_COLUMNS: list[Column] = [("would remove", "what"), ("count", "count")]


class Duration(_ParamType):
    """A length of time: plain seconds, or a number followed by ``d``, ``h``, ``m`` or ``s``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The duration in seconds."""
        if isinstance(value, int | float):
            return float(value)
        match = _DURATION.fullmatch(str(value).strip().lower())
        if match is None:
            self.fail(f"{value!r} is not a duration; use {DURATION_FORMS}", param, ctx)
        number, unit = match.groups()
        return float(number) * UNITS[unit or "s"]


DURATION = Duration()


@click.command()
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@click.option(
    "--keep-versions",
    type=click.IntRange(min=1),
    metavar="N",
    help="State versions kept per agent (the newest) [default: the app's policy, 100].",
)
@click.option(
    "--older-than",
    type=DURATION,
    metavar="DURATION",
    help="Remove finished runs (journal, events) older than this [default: the app's, 30d].",
)
@click.option(
    "--events-older-than",
    type=DURATION,
    metavar="DURATION",
    help="Remove events of finished runs and of agents older than this [default: 30d].",
)
@output_option(ids=False)
@pass_state
def gc(
    state: CliState,
    dry_run: bool,
    keep_versions: int | None,
    older_than: float | None,
    events_older_than: float | None,
    output: str,
) -> None:
    """Remove old finished runs, old events and old state versions, as the retention policy
    says (the --app's tether.Retention, else the defaults), overridden by the options.

    Never removed: anything of an unfinished run, a checkpoint, an agent's current state
    version, or a state version a kept run's journal refers to. DURATION is seconds or a
    number with d, h, m or s: 30d, 12h, 15m, 45s.
    """
    app = state.get_app()
    overrides: dict[str, Any] = {
        "keep_state_versions": keep_versions,
        "finished_runs_older_than": older_than,
        "events_older_than": events_older_than,
    }
    policy = dataclasses.replace(
        app.retention, **{k: v for k, v in overrides.items() if v is not None}
    )
    report = app.gc(policy, dry_run=dry_run)
    counts = report.to_dict()
    if output == "json":
        click.echo(dump_json(counts))
        return
    if output == "jsonl":
        emit([report], output, GC_COLUMNS)
        return
    click.echo(f"{'dry run: ' if dry_run else ''}the policy removes {describe(policy)}", err=True)
    rows = [
        Row({"what": key.replace("_", " "), "count": count})
        for key, count in counts.items()
        if key != "dry_run"  # said in words instead
    ]
    emit(rows, "table", DRY_RUN_COLUMNS if dry_run else GC_COLUMNS)
    if dry_run:
        click.echo("nothing was removed (--dry-run)", err=True)


def describe(policy: Retention) -> str:
    """What the policy removes, in words: ``finished runs older than 30d, ...``."""
    parts = []
    if policy.finished_runs_older_than is not None:
        parts.append(f"finished runs older than {_age(policy.finished_runs_older_than)}")
    if policy.events_older_than is not None:
        parts.append(f"events older than {_age(policy.events_older_than)}")
    if policy.keep_state_versions is not None:
        parts.append(f"state versions beyond the newest {policy.keep_state_versions} per agent")
    return ", ".join(parts) or "nothing"


def _age(seconds: float) -> str:
    """``30d``, ``12h``, ``15m`` or ``45s``: the largest unit that divides it."""
    for unit, size in UNITS.items():
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
