"""``tether approvals ...``: the inbox of what runs asked people (``ctx.approve``,
``ctx.ask``), and a person's decision on each.

Whoever decides is the OS user running the command (from the password database, not
``$USER``), never an option or an environment variable, and a decision names the digest of the
data it was made on: data that changed since it was shown is refused rather than approved
unseen.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tether.cli.common import (
    CliState,
    Column,
    JsonParam,
    OrderedGroup,
    Row,
    cell,
    dump_json,
    emit,
    emit_one,
    error,
    limit_option,
    output_option,
    pass_state,
)
from tether.errors import Refused

if TYPE_CHECKING:
    from tether.types import ApprovalInfo

STATUSES = ("pending", "approved", "rejected", "answered", "withdrawn")

APPROVAL_COLUMNS: list[Column] = [
    ("approval", "approval_id"),
    ("status", "status"),
    ("kind", "kind"),
    ("title", "title"),
    ("agent", "agent_id"),
    ("run", "run_id"),
    ("deadline", "deadline"),
    ("decided by", "decided_by"),
]

TWICE = (
    "The same decision again changes nothing (exit 0); a different one on a decided approval "
    "is refused (exit 5)."
)


@click.group(cls=OrderedGroup)
def approvals() -> None:
    """What runs asked people (ctx.approve, ctx.ask): list, show, approve, reject, wait."""


@approvals.command("list")
@click.option(
    "--status",
    type=click.Choice(STATUSES, case_sensitive=False),
    help="Only approvals with this status (pending: the inbox).",
)
@click.option("--agent", "agent_id", metavar="AGENT", help="Only approvals asked by this agent.")
@click.option("--run", "run_id", metavar="RUN", help="Only approvals asked by this run.")
@limit_option()
@output_option()
@pass_state
def list_(
    state: CliState,
    status: str | None,
    agent_id: str | None,
    run_id: str | None,
    limit: int | None,
    output: str,
) -> None:
    """List approvals and questions, newest first (all of them; --status pending for the
    inbox)."""
    found = state.get_app().approvals(status=status, agent_id=agent_id, run_id=run_id, limit=limit)
    if output == "table":
        emit([Row(_table_row(a)) for a in found], output, APPROVAL_COLUMNS)
    else:
        emit(found, output, APPROVAL_COLUMNS, id_key="approval_id")


@approvals.command()
@click.argument("approval_id", metavar="ID")
@output_option()
@pass_state
def show(state: CliState, approval_id: str, output: str) -> None:
    """Show one approval: its data and digest, the schema, who may decide, the deadline and
    its default, and the decision."""
    approval = state.get_app().get_approval(approval_id)
    if output != "table":
        emit_one(approval, output, id_key="approval_id")
        return
    emit_one(Row(_details(approval)), output)
    if approval.status == "pending":
        if approval.kind == "ask":
            hint = (
                f"answer with: tether approvals approve {approval_id} --data JSON "
                f"--digest {approval.digest} (reject declines: the run gets its default)"
            )
        else:
            hint = (
                f"decide with: tether approvals approve|reject {approval_id} "
                f"--digest {approval.digest}"
            )
        click.echo(f"\n{hint}", err=True)


_comment = click.option("--comment", help="Why; recorded with the decision.")
_digest = click.option(
    "--digest",
    metavar="DIGEST",
    help="The digest of the data you decided on (from show); refused (exit 1) if the data "
    "is no longer that. Default: the digest of the data as read just before deciding.",
)
_as_json = click.option("--json", "as_json", is_flag=True, help="Print the approval as JSON.")


@approvals.command()
@click.argument("approval_id", metavar="ID")
@_comment
@click.option(
    "--data",
    type=JsonParam(),
    metavar="JSON",
    help="Edited data (only when the run gave a schema for it), or the answer to a question: "
    "JSON or @file.json.",
)
@click.option(
    "--data-file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Like --data, read from a JSON file.",
)
@_digest
@_as_json
@pass_state
def approve(
    state: CliState,
    approval_id: str,
    comment: str | None,
    data: Any,
    data_file: Path | None,
    digest: str | None,
    as_json: bool,
) -> None:
    """Approve ID, with --data as edited data or a question's answer; its run continues."""
    if data is not None and data_file is not None:
        raise click.UsageError("give either --data or --data-file, not both")
    if data_file is not None:
        data = _read_json(data_file)
    _decide(state, approval_id, True, comment, data, digest, as_json)


@approvals.command()
@click.argument("approval_id", metavar="ID")
@_comment
@_digest
@_as_json
@pass_state
def reject(
    state: CliState, approval_id: str, comment: str | None, digest: str | None, as_json: bool
) -> None:
    """Reject ID (a declined question gets its default answer); its run continues."""
    _decide(state, approval_id, False, comment, None, digest, as_json)


for _command in (approve, reject):  # one-line docstrings: click dedents the help as a whole
    _command.help = f"{_command.help}\n\n{TWICE}"


@approvals.command()
@click.argument("approval_id", metavar="ID")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Give up after this long (exit 124).",
)
@_as_json
@pass_state
def wait(state: CliState, approval_id: str, timeout: float | None, as_json: bool) -> None:
    """Block until ID is decided, then print its status (exit 0 whatever the decision)."""
    app = state.get_app()
    try:
        decided = app.wait_for_approval(approval_id, timeout=timeout)
    except TimeoutError:
        approval = app.get_approval(approval_id)
        hint = ""
        if approval.deadline is not None:
            hint = (
                f"; its deadline is {cell(approval.to_dict()['deadline'])}, when a worker "
                "resuming the run applies the default"
            )
        error(f"approval {approval_id} is still pending after {timeout:g}s{hint}")
        raise click.exceptions.Exit(124) from None
    if as_json:
        click.echo(dump_json(decided.to_dict()))
    else:
        click.echo(status_label(decided))


def status_label(approval: ApprovalInfo) -> str:
    """The status, and who decided when no person did: ``rejected (timeout)``."""
    if approval.source in (None, "human"):
        return approval.status
    return f"{approval.status} ({approval.source})"


def _decide(
    state: CliState,
    approval_id: str,
    approve: bool,
    comment: str | None,
    data: Any,
    digest: str | None,
    as_json: bool,
) -> None:
    app = state.get_app()
    actor = _os_user()
    shown = app.get_approval(approval_id)
    if digest is None:
        digest = shown.digest
        click.echo(f"deciding on data {digest[:12]}...", err=True)
    decided = app.decide(
        approval_id, approve, comment=comment, data=data, digest=digest, actor=actor
    )
    if as_json:
        click.echo(dump_json(decided.to_dict()))
    elif shown.status != "pending":
        click.echo(
            f"approval {approval_id} was already {status_label(decided)} by "
            f"{decided.decided_by}: the same decision, nothing changed"
        )
    else:
        edited = " with edited data" if decided.edited else ""
        click.echo(
            f"approval {approval_id} {decided.status}{edited} by {decided.decided_by}: "
            f"run {decided.run_id} continues on a worker"
        )


def _os_user() -> str:
    """Who is deciding: the OS user, the identity the decision is recorded under."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name  # not getpass: it reads $USER first
    except Exception as exc:
        raise Refused(
            f"cannot tell which OS user is deciding ({exc}); decide as a named user"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--data-file"
        ) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(
            f"{path} is not valid JSON ({exc})", param_hint="--data-file"
        ) from None


def _table_row(approval: ApprovalInfo) -> dict[str, Any]:
    """The approval's text for a table: timeouts labelled, text shown literally."""
    values = approval.to_dict()
    values["status"] = status_label(approval)
    return {key: _literal(value) for key, value in values.items()}


def _details(approval: ApprovalInfo) -> dict[str, Any]:
    """What ``show`` prints, in the order a person deciding reads it."""
    values = approval.to_dict()
    details: dict[str, Any] = {
        "approval": values["approval_id"],
        "title": values["title"],
        "kind": values["kind"],
        "status": status_label(approval),
        "run": f"{values['run_id']} (step {values['seq']})",
        "agent": values["agent_id"],
        "asked at": values["created_at"],
        "data": dump_json(values["data"]),
        "digest": values["digest"],
        "schema": _no_schema(approval) if approval.schema is None else dump_json(approval.schema),
        "who may decide": ", ".join(approval.approvers) if approval.approvers else "anyone",
        "deadline": values["deadline"] or "none: it waits until someone decides",
        "at the deadline": _default(approval) if approval.deadline is not None else "-",
        "decision": _decision(approval, values),
    }
    if approval.status != "pending" and (approval.edited or approval.kind == "ask"):
        details["decided data"] = dump_json(values["decided_data"])
    details["comment"] = values["comment"]
    return {key: _literal(value, pretty=True) for key, value in details.items()}


def _no_schema(approval: ApprovalInfo) -> str:
    return "none: approve or reject the data as it is" if approval.kind == "approve" else "none"


def _default(approval: ApprovalInfo) -> str:
    fallback = approval.on_timeout or {}
    if approval.kind == "ask":
        return f"answer {json.dumps(fallback.get('data'), ensure_ascii=False)}"
    return "approve" if fallback.get("approved") else "reject"


def _decision(approval: ApprovalInfo, values: dict[str, Any]) -> str:
    if approval.status == "pending":
        return "none yet"
    at = cell(values["decided_at"])
    if approval.source == "timeout":
        return f"{approval.status} at {at}: nobody decided by the deadline, the default applied"
    if approval.source == "human":
        return f"{approval.status} by {approval.decided_by} at {at}"
    return f"{approval.status} by {approval.source} at {at}"


def _literal(value: Any, *, pretty: bool = False) -> str:
    """A value as table text (tables print it as is, brackets and all)."""
    return cell(value, pretty=pretty)
