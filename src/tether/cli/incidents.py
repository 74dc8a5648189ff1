"""``tether incidents ...``: failures no strategy fixed, and a person's decision on each."""

from __future__ import annotations

from typing import Any

import click

from tether.cli.common import (
    CliState,
    Column,
    JsonParam,
    OrderedGroup,
    Row,
    dump_json,
    emit,
    emit_one,
    limit_option,
    output_option,
    pass_state,
)

INCIDENT_COLUMNS: list[Column] = [
    ("incident", "incident_id"),
    ("run", "run_id"),
    ("step", "seq"),
    ("kind", "kind"),
    ("error", "message"),
    ("status", "status"),
    ("decision", "resolution"),
    ("opened", "created_at"),
]

WHAT_NEXT = {
    "retry": "the failed step runs again on a worker",
    "skip": "the step has the supplied output and the run continues on a worker",
    "abort": "the run is now failed",
}

REFUSED_TWICE = "A second decision on a resolved incident is refused (exit 1)."


@click.group(cls=OrderedGroup)
def incidents() -> None:
    """Failures no retry strategy fixed: inspect them, then retry, skip or abort each."""


@incidents.command("list")
@click.option(
    "--status",
    type=click.Choice(["open", "resolved"], case_sensitive=False),
    help="Only open or only resolved incidents.",
)
@click.option("--run", "run_id", metavar="RUN", help="Only incidents of this run.")
@limit_option()
@output_option()
@pass_state
def list_(
    state: CliState, status: str | None, run_id: str | None, limit: int | None, output: str
) -> None:
    """List incidents, newest first."""
    found = state.get_app().incidents(status=status, run_id=run_id, limit=limit)
    if output == "table":
        emit([Row(_with_message(i.to_dict())) for i in found], output, INCIDENT_COLUMNS)
    else:
        emit(found, output, INCIDENT_COLUMNS, id_key="incident_id")


@incidents.command()
@click.argument("incident_id", metavar="ID")
@output_option()
@pass_state
def show(state: CliState, incident_id: str, output: str) -> None:
    """Show one incident: its run and step, the error (with traceback), the decision."""
    incident = state.get_app().get_incident(incident_id)
    if output != "table":
        emit_one(incident, output, id_key="incident_id")
        return
    values = incident.to_dict()
    error = dict(values["error"]) if isinstance(values["error"], dict) else {}
    traceback = error.pop("traceback", None)
    emit_one(Row({**values, "error": error}), output)
    if traceback:
        click.echo(f"\n{str(traceback).rstrip()}")
    if values["status"] == "open":
        click.echo(
            f"\ndecide with: tether incidents retry|skip|abort {incident_id} "
            "(skip needs --output JSON)",
            err=True,
        )


_comment = click.option("--comment", default="", help="Why; recorded with the decision.")
_as_json = click.option("--json", "as_json", is_flag=True, help="Print the incident as JSON.")


@incidents.command()
@click.argument("incident_id", metavar="ID")
@_comment
@_as_json
@pass_state
def retry(state: CliState, incident_id: str, comment: str, as_json: bool) -> None:
    """Run the failed step again (a worker picks the run up)."""
    _decide(state, incident_id, "retry", None, comment, as_json)


@incidents.command()
@click.argument("incident_id", metavar="ID")
@click.option(
    "--output",
    "step_output",
    type=JsonParam(),
    required=True,
    metavar="JSON",
    help="The step's output, as if it had returned it: JSON or @file.json.",
)
@_comment
@_as_json
@pass_state
def skip(state: CliState, incident_id: str, step_output: Any, comment: str, as_json: bool) -> None:
    """Give the failed step the --output JSON and continue the run."""
    _decide(state, incident_id, "skip", step_output, comment, as_json)


@incidents.command()
@click.argument("incident_id", metavar="ID")
@_comment
@_as_json
@pass_state
def abort(state: CliState, incident_id: str, comment: str, as_json: bool) -> None:
    """Fail the run, with this incident (and --comment) as the cause."""
    _decide(state, incident_id, "abort", None, comment, as_json)


for _command in (retry, skip, abort):
    _command.help = f"{_command.help}\n\n{REFUSED_TWICE}"


def _decide(
    state: CliState, incident_id: str, action: str, output: Any, comment: str, as_json: bool
) -> None:
    resolved = state.get_app().resolve_incident(incident_id, action, output=output, comment=comment)
    if as_json:
        click.echo(dump_json(resolved.to_dict()))
    else:
        click.echo(
            f"incident {incident_id} resolved with {action}: {WHAT_NEXT[action]} "
            f"(run {resolved.run_id})"
        )


def _with_message(values: dict[str, Any]) -> dict[str, Any]:
    error = values.get("error")
    return {**values, "message": error.get("message") if isinstance(error, dict) else error}
