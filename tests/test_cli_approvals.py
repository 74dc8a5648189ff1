"""``tether approvals`` on a real database (SQLite and PostgreSQL): the inbox, a person's
decision recorded as the OS user on the data they were shown, refusals that write nothing, a
timeout never shown as a person's decision, and waiting.

The invoker sets ``TETHER_ACTOR=tester``: the decider must still be the OS user.
"""

from __future__ import annotations

import json
import os
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tether
from tests.clikit import Invoke, cli_invoker, error_line, ok
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus

PLAN = {"service": "api", "replicas": 3}
PLAN_SCHEMA = {
    "type": "object",
    "properties": {"service": {"type": "string"}, "replicas": {"type": "integer", "minimum": 1}},
    "required": ["service", "replicas"],
}
REPLICAS_SCHEMA = {"type": "integer", "minimum": 1}
ME = pwd.getpwuid(os.getuid()).pw_name  # what the CLI records, whatever $USER says


def seeded(db_url: str, clock: FakeClock | None = None) -> tether.App:
    """An app with ``d1``, whose runs ask to approve PLAN (options from the task), and ``a1``,
    whose runs ask how many replicas (default 1)."""
    app = tether.App(db_url, clock=clock)

    @app.agent("deployer")
    def deployer(ctx: tether.RunContext, task: dict[str, Any]) -> Any:
        decision = ctx.approve(
            task.get("title", "deploy api"),
            PLAN,
            schema=PLAN_SCHEMA if task.get("schema", True) else None,
            timeout=task.get("timeout"),
            approvers=task.get("approvers"),
        )
        return {
            "approved": decision.approved,
            "data": decision.data,
            "edited": decision.edited,
            "comment": decision.comment,
            "decided_by": decision.decided_by,
            "source": decision.source,
        }

    @app.agent("asker")
    def asker(ctx: tether.RunContext, task: Any) -> Any:
        return ctx.ask("how many replicas?", REPLICAS_SCHEMA, default=1)

    active_agent(app, "deployer", "d1")
    active_agent(app, "asker", "a1")
    return app


@pytest.fixture
def app(db_url: str) -> Iterator[tether.App]:
    """The seeded app on a fresh database, closed after the test."""
    application = seeded(db_url)
    try:
        yield application
    finally:
        application.close()


@pytest.fixture
def tether_(db_url: str) -> Invoke:
    """``tether --db URL ...`` on the test's database."""
    return cli_invoker("--db", db_url)


def asked(
    app: tether.App, agent_id: str, task: dict[str, Any] | None = None
) -> tuple[tether.RunHandle, tether.ApprovalInfo]:
    """Start a run of ``agent_id`` and work it until it waits on its approval."""
    run = app.submit(agent_id, task or {})
    work_until(app, lambda: run.status() == RunStatus.WAITING)
    [approval] = app.approvals(run_id=run.run_id)
    return run, approval


def finished(app: tether.App, run: tether.RunHandle) -> Any:
    """Work the run to its end and return its result."""
    app.work(until_idle=True, timeout=30)
    return run.result(timeout=1)


def assert_nothing_decided(app: tether.App, approval_id: str) -> None:
    assert app.get_approval(approval_id).status == "pending"
    assert app.events(types=["approval.decided"]) == []


def field(shown: str, name: str) -> str:
    """The (first line of the) value ``tether approvals show`` prints for ``name``."""
    [line] = [line for line in shown.splitlines() if line.startswith(name + "  ")]
    return line[len(name) :].strip()


def table_line(stdout: str, approval_id: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith(approval_id)]
    return line


# -- list and show ---------------------------------------------------------------------------


def test_list_shows_every_approval_newest_first_as_json_ids_and_a_table(
    app: tether.App, tether_: Invoke
) -> None:
    deploy_run, deploy = asked(app, "d1", {"title": "[urgent] deploy api"})
    _, question = asked(app, "a1")
    app.decide(question.approval_id, data=2, actor="carol")

    listed = json.loads(ok(tether_("approvals", "list", "-o", "json")))
    assert [a["approval_id"] for a in listed] == [question.approval_id, deploy.approval_id]
    assert listed[1] == app.get_approval(deploy.approval_id).to_dict()
    inbox = ok(tether_("approvals", "list", "--status", "pending", "-o", "ids")).split()
    assert inbox == [deploy.approval_id]
    by_agent = ok(tether_("approvals", "list", "--agent", "a1", "-o", "ids")).split()
    assert by_agent == [question.approval_id]
    by_run = ok(tether_("approvals", "list", "--run", deploy_run.run_id, "-o", "ids")).split()
    assert by_run == [deploy.approval_id]

    table = ok(tether_("approvals", "list"))
    header = " ".join(table.splitlines()[0].split())
    assert header == "approval status kind title agent run deadline decided by"
    assert table_line(table, deploy.approval_id).split()[1:6] == [
        "pending",
        "approve",
        "[urgent]",  # the title as written, not eaten as markup
        "deploy",
        "api",
    ]
    answered = table_line(table, question.approval_id).split()
    assert answered[1:3] == ["answered", "ask"] and answered[-1] == "carol"


def test_show_prints_the_data_its_digest_the_schema_who_may_decide_and_the_default(
    app: tether.App, tether_: Invoke
) -> None:
    _, approval = asked(app, "d1", {"approvers": ["alice", "bob"], "timeout": 600})

    result = tether_("approvals", "show", approval.approval_id)

    shown = ok(result)
    assert field(shown, "digest") == approval.digest
    assert field(shown, "status") == "pending"
    assert '"replicas": 3' in shown and '"minimum": 1' in shown  # data and schema, pretty
    assert field(shown, "who may decide") == "alice, bob"
    assert field(shown, "at the deadline") == "reject"
    assert field(shown, "decision") == "none yet"
    assert f"--digest {approval.digest}" in result.stderr

    as_json = json.loads(ok(tether_("approvals", "show", approval.approval_id, "-o", "json")))
    assert as_json == app.get_approval(approval.approval_id).to_dict()


def test_show_says_anyone_may_decide_and_what_a_question_answers_at_its_deadline(
    app: tether.App, tether_: Invoke
) -> None:
    _, approval = asked(app, "d1", {"schema": False})

    shown = ok(tether_("approvals", "show", approval.approval_id))
    assert field(shown, "who may decide") == "anyone"
    assert field(shown, "schema") == "none: approve or reject the data as it is"
    assert field(shown, "deadline") == "none: it waits until someone decides"


# -- deciding --------------------------------------------------------------------------------


def test_approve_is_recorded_as_the_os_user_with_the_comment_on_the_data_shown(
    app: tether.App, tether_: Invoke
) -> None:
    run, approval = asked(app, "d1")

    result = tether_("approvals", "approve", approval.approval_id, "--comment", "looks good")

    assert ok(result).strip() == (
        f"approval {approval.approval_id} approved by {ME}: run {run.run_id} continues on a worker"
    )
    assert result.stderr.strip() == f"deciding on data {approval.digest[:12]}..."
    decided = app.get_approval(approval.approval_id)
    assert (decided.status, decided.source, decided.comment) == ("approved", "human", "looks good")
    assert decided.decided_by == ME  # not TETHER_ACTOR, which the invoker sets to "tester"
    [event] = app.events(types=["approval.decided"])
    assert event.data["digest"] == approval.digest and event.data["decided_by"] == ME
    assert finished(app, run) == {
        "approved": True,
        "data": PLAN,
        "edited": False,
        "comment": "looks good",
        "decided_by": ME,
        "source": "human",
    }


def test_approve_with_edited_data_gives_the_run_the_edit(app: tether.App, tether_: Invoke) -> None:
    run, approval = asked(app, "d1")
    edit = {"service": "api", "replicas": 5}

    result = tether_("approvals", "approve", approval.approval_id, "--data", json.dumps(edit))

    assert "approved with edited data" in ok(result)
    decided = app.get_approval(approval.approval_id)
    assert decided.edited and decided.decided_data == edit and decided.data == PLAN
    outcome = finished(app, run)
    assert outcome["data"] == edit and outcome["edited"] is True


def test_edited_data_can_come_from_a_file_but_not_from_both_places(
    app: tether.App, tether_: Invoke, tmp_path: Path
) -> None:
    run, approval = asked(app, "d1")
    edit = tmp_path / "edit.json"
    edit.write_text(json.dumps({"service": "api", "replicas": 7}))

    both = tether_(
        "approvals", "approve", approval.approval_id, "--data", "{}", "--data-file", str(edit)
    )
    assert both.exit_code == 2 and "not both" in both.stderr
    assert_nothing_decided(app, approval.approval_id)

    ok(tether_("approvals", "approve", approval.approval_id, "--data-file", str(edit)))
    assert finished(app, run)["data"] == {"service": "api", "replicas": 7}


def test_an_edit_that_fails_the_schema_exits_2_with_its_errors_and_decides_nothing(
    app: tether.App, tether_: Invoke
) -> None:
    _, approval = asked(app, "d1")

    result = tether_(
        "approvals",
        "approve",
        approval.approval_id,
        "--data",
        '{"service": 7, "replicas": 0}',
        "--digest",
        approval.digest,
    )

    assert result.exit_code == 2
    line = error_line(result)
    assert "does not match its schema" in line
    assert "replicas: 0 is less than the minimum of 1" in line
    assert "service: 7 is not of type 'string'" in line
    assert_nothing_decided(app, approval.approval_id)


def test_reject_gives_the_run_a_rejection_by_the_os_user(app: tether.App, tether_: Invoke) -> None:
    run, approval = asked(app, "d1")

    result = tether_("approvals", "reject", approval.approval_id, "--comment", "not today")

    assert f"approval {approval.approval_id} rejected by {ME}" in ok(result)
    outcome = finished(app, run)
    assert (outcome["approved"], outcome["data"], outcome["comment"]) == (False, PLAN, "not today")
    assert outcome["decided_by"] == ME


@pytest.mark.parametrize("verb", ["approve", "reject"])
def test_a_stale_digest_is_refused_with_exit_1_and_nothing_is_written(
    app: tether.App, tether_: Invoke, verb: str
) -> None:
    _, approval = asked(app, "d1")

    result = tether_("approvals", verb, approval.approval_id, "--digest", "0" * 64)

    assert result.exit_code == 1
    line = error_line(result)
    assert f"digest {approval.digest[:12]}..., not 000000000000..." in line
    assert f"tether approvals show {approval.approval_id}" in line
    assert_nothing_decided(app, approval.approval_id)


def test_a_user_not_among_the_approvers_is_refused_and_nothing_is_written(
    app: tether.App, tether_: Invoke
) -> None:
    _, approval = asked(app, "d1", {"approvers": [f"not-{ME}"]})

    result = tether_("approvals", "approve", approval.approval_id, "--digest", approval.digest)

    assert result.exit_code == 1
    assert f"{ME} may not decide approval {approval.approval_id}" in error_line(result)
    assert_nothing_decided(app, approval.approval_id)


def test_a_listed_approver_decides(app: tether.App, tether_: Invoke) -> None:
    _, approval = asked(app, "d1", {"approvers": ["alice", ME]})

    ok(tether_("approvals", "approve", approval.approval_id))

    assert app.get_approval(approval.approval_id).decided_by == ME


def test_a_different_second_decision_is_a_conflict_exit_5(app: tether.App, tether_: Invoke) -> None:
    _, approval = asked(app, "d1")
    ok(tether_("approvals", "approve", approval.approval_id))

    result = tether_("approvals", "reject", approval.approval_id, "--digest", approval.digest)

    assert result.exit_code == 5
    assert f"was already decided (approved by {ME}" in error_line(result)
    assert app.get_approval(approval.approval_id).status == "approved"
    assert len(app.events(types=["approval.decided"])) == 1


def test_the_same_decision_again_exits_0_and_changes_nothing(
    app: tether.App, tether_: Invoke
) -> None:
    _, approval = asked(app, "d1")
    ok(tether_("approvals", "approve", approval.approval_id, "--comment", "first"))

    again = ok(tether_("approvals", "approve", approval.approval_id, "--comment", "second"))

    assert f"was already approved by {ME}: the same decision, nothing changed" in again
    assert app.get_approval(approval.approval_id).comment == "first"
    assert len(app.events(types=["approval.decided"])) == 1


def test_a_question_is_answered_with_data(app: tether.App, tether_: Invoke) -> None:
    run, question = asked(app, "a1")

    result = tether_("approvals", "approve", question.approval_id, "--data", "4")

    assert f"approval {question.approval_id} answered by {ME}" in ok(result)
    answered = app.get_approval(question.approval_id)
    assert (answered.status, answered.decided_data, answered.edited) == ("answered", 4, False)
    assert finished(app, run) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", '"four"'], "answer for approval"),
        (["--data", "0"], "(top): 0 is less than the minimum of 1"),
        ([], "asks a question: answer it with data"),
    ],
    ids=["wrong-type", "too-small", "no-answer"],
)
def test_a_missing_or_invalid_answer_exits_2_and_decides_nothing(
    app: tether.App, tether_: Invoke, args: list[str], message: str
) -> None:
    _, question = asked(app, "a1")

    result = tether_(
        "approvals", "approve", question.approval_id, *args, "--digest", question.digest
    )

    assert result.exit_code == 2
    assert message in error_line(result)
    assert_nothing_decided(app, question.approval_id)


def test_a_declined_question_gives_the_run_its_default(app: tether.App, tether_: Invoke) -> None:
    run, question = asked(app, "a1")

    ok(tether_("approvals", "reject", question.approval_id))

    assert app.get_approval(question.approval_id).status == "rejected"
    assert finished(app, run) == 1


# -- timeouts --------------------------------------------------------------------------------


def test_a_default_applied_at_the_deadline_is_shown_as_a_timeout_never_as_a_person(
    db_url: str, tether_: Invoke
) -> None:
    clock = FakeClock()
    app = seeded(db_url, clock)
    try:
        run, approval = asked(app, "d1", {"timeout": 60})
        clock.advance(61)
        assert finished(app, run)["source"] == "timeout"

        line = table_line(ok(tether_("approvals", "list")), approval.approval_id)
        assert line.split()[1:3] == ["rejected", "(timeout)"]
        assert line.split()[-1] == "-"  # decided by nobody
        shown = ok(tether_("approvals", "show", approval.approval_id))
        assert field(shown, "status") == "rejected (timeout)"
        assert field(shown, "decision").endswith(
            "nobody decided by the deadline, the default applied"
        )
        assert ok(tether_("approvals", "wait", approval.approval_id)).strip() == (
            "rejected (timeout)"
        )

        late = tether_("approvals", "approve", approval.approval_id, "--digest", approval.digest)
        assert late.exit_code == 5
        assert "already decided (rejected by timeout" in error_line(late)
        assert app.events(types=["approval.decided"]) == []
    finally:
        app.close()


# -- waiting ---------------------------------------------------------------------------------


def test_wait_exits_124_while_the_approval_is_pending(app: tether.App, tether_: Invoke) -> None:
    _, approval = asked(app, "d1")

    result = tether_("approvals", "wait", approval.approval_id, "--timeout", "0.2")

    assert result.exit_code == 124
    assert f"approval {approval.approval_id} is still pending after 0.2s" in error_line(result)


def test_wait_returns_the_status_once_someone_decides(app: tether.App, tether_: Invoke) -> None:
    _, approval = asked(app, "d1")
    decider = threading.Timer(0.3, app.decide, (approval.approval_id, True), {"actor": "carol"})
    decider.start()
    try:
        result = tether_("approvals", "wait", approval.approval_id, "--timeout", "30")
    finally:
        decider.join()

    assert ok(result).strip() == "approved"
    assert app.get_approval(approval.approval_id).decided_by == "carol"


# -- not found -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["show"], ["approve"], ["reject"], ["wait", "--timeout", "1"]],
    ids=["show", "approve", "reject", "wait"],
)
def test_an_unknown_approval_is_not_found_exit_4(
    app: tether.App, tether_: Invoke, command: list[str]
) -> None:
    result = tether_("approvals", command[0], "apr_missing", *command[1:])

    assert result.exit_code == 4
    assert "approval 'apr_missing' not found" in error_line(result)
