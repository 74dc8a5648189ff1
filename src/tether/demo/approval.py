"""The human approval of ``tether demo``: the coordinator asks a person before it publishes.

The coordinator's run parks on ``ctx.approve("Publish the report?", ...)`` (see
``tether.demo.agents``), holding no thread. By default a simulated reviewer decides after a
moment: it approves with the title edited (the approval's schema lets only the title change),
naming the digest of the data it saw. With ``--interactive`` the person at the terminal
decides instead (``ask_person``): the live display stops, the approval's title, data and
digest are shown, and they approve, reject or edit the title (an edit the schema refuses is
shown and asked again), then comment; the decision is recorded as theirs (the OS user).
Afterwards ``check_gated`` reads the database: one decision, taken once by the run, and the
gated step executed once after an approval, never after a rejection.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import time
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from tether.app import App
from tether.approvals import validation_errors
from tether.errors import ConflictError, InvalidInput, Refused
from tether.types import ApprovalInfo, RunInfo, RunStatus

REVIEWER = "reviewer (simulated)"
REVIEWER_PAUSE = 0.4
"""Seconds the simulated reviewer takes to read the approval before deciding."""
EDITED_TITLE = "Durable agents: how a run survives a crash"
"""The title the simulated reviewer prefers."""
COMMENT = "a sharper title; ship it"
INTERACTIVE_TIMEOUT = 600.0
"""Seconds a person at the terminal has to decide (the simulated reviewer needs far less)."""
GATED_STEP = "publish"
"""The coordinator's step that runs only once a person has approved."""
EXECUTED = ("step.completed", "step.failed")
"""Events written each time a step's body ran."""
CHOICES = {"a": "approve", "r": "reject", "e": "edit"}


class Reviewer:
    """Decides the approvals the runs of the live view wait for: simulated, or the person
    at the terminal (``interactive``)."""

    def __init__(self, interactive: bool = False) -> None:
        self.interactive = interactive
        self.noticed: dict[str, float] = {}
        """When each pending approval was first seen."""

    def look(self, app: App, live: Live, infos: dict[str, RunInfo]) -> None:
        """Decide the pending approvals of waiting runs (the simulated reviewer after a
        moment, so the view shows the run parked)."""
        for run_id, info in infos.items():
            if info.status != RunStatus.WAITING:
                continue
            for approval in app.approvals(status="pending", run_id=run_id):
                first_seen = self.noticed.setdefault(approval.approval_id, time.monotonic())
                if self.interactive:
                    with paused(live):
                        ask_person(app, approval, live.console, getpass.getuser())
                elif time.monotonic() - first_seen >= REVIEWER_PAUSE:
                    decide_simulated(app, approval, live.console)


@contextlib.contextmanager
def paused(live: Live) -> Iterator[None]:
    """Stop the live display (if it runs) while a person answers, then start it again."""
    running = live.is_started
    if running:
        live.stop()
    try:
        yield
    finally:
        if running:
            live.start()


def decide_simulated(app: App, approval: ApprovalInfo, console: Console) -> ApprovalInfo:
    """The simulated reviewer approves ``approval`` with a sharper title, on the digest it
    saw."""
    edited = {**approval.data, "title": EDITED_TITLE}
    decided = app.decide(
        approval.approval_id,
        approve=True,
        comment=COMMENT,
        data=edited,
        digest=approval.digest,
        actor=REVIEWER,
    )
    console.print(
        f"  [bold magenta]{REVIEWER}[/] approves {approval.approval_id} on the digest it saw "
        f"({approval.digest[:12]}...), with the title edited: "
        f"{escape(repr(approval.data['title']))} -> {escape(repr(EDITED_TITLE))}"
    )
    return decided


def ask_person(
    app: App, approval: ApprovalInfo, console: Console, actor: str
) -> ApprovalInfo | None:
    """Ask the person at the terminal to decide ``approval`` (prompts on stdin): approve,
    reject, or edit the title first (an edit the approval's schema refuses is shown and
    asked again), then a comment.

    Returns:
        The decided approval, or None when it could not be decided any more (its deadline
        applied the default meanwhile).
    """
    original: dict[str, Any] = approval.data
    data = original
    fallback = "approve" if (approval.on_timeout or {}).get("approved") else "reject"
    deadline = f"{approval.deadline:%H:%M:%S} UTC" if approval.deadline else "never"
    console.print()
    console.print(
        f"[bold]approval {approval.approval_id}[/] from run {approval.run_id} "
        f"({approval.agent_id}): [bold]{escape(approval.title)}[/]"
    )
    console.print(f"data (digest {approval.digest}):")
    console.print(escape(json.dumps(original, indent=2, ensure_ascii=False)))
    console.print(
        f"you may edit the title (the approval's schema lets only that change); "
        f"if nobody decides by {deadline}, the default applies: {fallback}"
    )
    while True:
        choice = _choose()
        if choice == "e":
            data = _edit_title(approval, data, console)
            console.print(f"edited: {escape(json.dumps(data, ensure_ascii=False))}")
            continue
        comment = click.prompt("comment", default="", show_default=False).strip()
        approve = choice == "a"
        try:
            decided = app.decide(
                approval.approval_id,
                approve=approve,
                comment=comment or None,
                data=data if approve and data != original else None,
                digest=approval.digest,
                actor=actor,
            )
        except InvalidInput as exc:  # the schema is checked here too; say why, ask again
            for problem in exc.errors:
                console.print(f"  [red]not accepted:[/] {escape(problem)}")
            data = original
            continue
        except (ConflictError, Refused) as exc:
            console.print(f"[yellow]too late:[/] {escape(str(exc))}")
            return None
        edited = ", with the title edited" if decided.edited else ""
        console.print(
            f"  [bold magenta]{escape(actor)}[/] {decided.status} {approval.approval_id} on "
            f"digest {approval.digest[:12]}...{edited}"
        )
        return decided


def _choose() -> str:
    """``a``, ``r`` or ``e``: asked until the answer is one of them (or their word)."""
    while True:
        answer = click.prompt("approve, reject or edit the title? [a/r/e]").strip().lower()
        if answer[:1] in CHOICES and CHOICES[answer[:1]].startswith(answer):
            return answer[:1]
        click.echo("type a (approve), r (reject) or e (edit the title)")


def _edit_title(approval: ApprovalInfo, data: dict[str, Any], console: Console) -> dict[str, Any]:
    """``data`` with a new title, asked until the approval's schema accepts it."""
    while True:
        title = click.prompt("new title", default=data["title"])
        candidate = {**data, "title": title}
        problems = validation_errors(approval.schema, candidate) if approval.schema else []
        if not problems:
            return candidate
        for problem in problems:
            console.print(f"  [red]not accepted:[/] {escape(problem)}")


def check_gated(app: App, console: Console, run_id: str) -> bool:
    """Say who decided the run's approval and what it gated; False unless the run asked
    once, took the decision once, and the gated step ran once after an approval (never
    after a rejection)."""
    found = app.approvals(run_id=run_id, limit=None)
    if len(found) != 1:
        console.print(f"[red]BUG: run {run_id} has {len(found)} approvals, not 1[/]")
        return False
    [approval] = found
    events = app.timeline(run_id)
    consumed = [n for n, e in enumerate(events) if e.type == "approval.consumed"]
    gated = [s for s in app.run_steps(run_id) if s.name == GATED_STEP]
    at = {s.seq for s in gated}
    ran = [n for n, e in enumerate(events) if e.type in EXECUTED and e.data.get("seq") in at]
    who = approval.decided_by or "its deadline (nobody decided)"
    edit = ""
    if approval.edited:
        before, after = approval.data["title"], approval.decided_data["title"]
        edit = f", the title edited ({before!r} -> {after!r})"
    comment = f' ("{approval.comment}")' if approval.comment else ""
    said = (
        f"approval {approval.approval_id}: {approval.status} by {who} on digest "
        f"{approval.digest[:12]}...{edit}{comment}"
    )
    if len(consumed) != 1 or approval.consumed_at is None:
        console.print(f"[red]BUG: {escape(said)}, yet the run took it {len(consumed)} times[/]")
        return False
    said += f"; the run took the decision once (journal entry {approval.seq})"
    if approval.status != "approved":
        if gated or ran:
            console.print(f"[red]BUG: {escape(said)}, yet the gated step {GATED_STEP} ran[/]")
            return False
        console.print(f"{escape(said)}; the gated step {GATED_STEP} never ran")
        return True
    if len(gated) != 1 or len(ran) != 1 or ran[0] < consumed[0]:
        console.print(
            f"[red]BUG: {escape(said)}, yet the gated step {GATED_STEP} ran {len(ran)} times[/]"
        )
        return False
    console.print(
        f"{escape(said)}; the gated step {GATED_STEP} ran once, after it (journal entry "
        f"{gated[0].seq}): {escape(json.dumps(gated[0].output, ensure_ascii=False))}"
    )
    return True
