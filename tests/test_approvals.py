"""Approvals and questions, on both databases, for sync and async handlers: a decision with
who, what and where it came from, consumed once; edits and answers validated against their
schema; decided once (an equal repeat is the stored decision, another is a conflict, two
racing deciders: one wins); a stale digest refused; a timeout applies the default and says so;
a replay that asks about other data is an incident; pending approvals hold no threads."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from typing import Any

import pydantic
import pytest

import tether
from tests.flavors import register
from tests.racekit import assert_all_inside, gate
from tether import codec
from tether.store.schema import approvals as approvals_table
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus

WORK = {"until_idle": True, "timeout": 30.0}
TITLE_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 3}},
    "required": ["title"],
}
RAN: Counter[str] = Counter()
HOUR = dt.timedelta(hours=1)


def publish(title: str) -> str:
    RAN[title] += 1
    return f"published {title}"


def gated(app: tether.App, flavor: str, **approve: Any) -> None:
    """``publisher``: asks to publish ``task`` (its data), then publishes what was approved."""

    def handler(ctx: Any, task: Any) -> Any:
        decision = yield ctx.approve("Publish?", task, **approve)
        if not decision:
            return {"published": None, "decision": summary(decision)}
        done = yield ctx.step(publish, decision.data["title"], name="publish")
        return {"published": done, "decision": summary(decision)}

    register(app, flavor, "publisher", handler)
    active_agent(app, "publisher", "pub")


def summary(decision: tether.Decision) -> dict[str, Any]:
    return {
        "approved": decision.approved,
        "data": decision.data,
        "edited": decision.edited,
        "by": decision.decided_by,
        "comment": decision.comment,
        "source": decision.source,
    }


def parked(app: tether.App, run: tether.RunHandle) -> tether.ApprovalInfo:
    work_until(app, lambda: run.status() == RunStatus.WAITING)
    [pending] = app.approvals(run_id=run.run_id)
    assert pending.status == "pending" and app.get_run(run.run_id).owner is None
    return pending


def event_types(app: tether.App, run_id: str) -> list[str]:
    return [e.type for e in app.events(run_id=run_id) if e.type.startswith("approval.")]


def test_a_decision_reaches_the_run_with_who_and_why_and_is_consumed_once(
    app: tether.App, flavor: str
) -> None:
    gated(app, flavor)
    RAN.clear()
    run = app.submit("pub", {"title": "Q3 report"})
    pending = parked(app, run)
    assert pending.data == {"title": "Q3 report"}
    assert pending.digest == codec.digest({"title": "Q3 report"})

    app.decide(pending.approval_id, True, comment="ship it", digest=pending.digest, actor="ann")
    app.work(**WORK)

    assert run.result(timeout=1) == {
        "published": "published Q3 report",
        "decision": {
            "approved": True,
            "data": {"title": "Q3 report"},
            "edited": False,
            "by": "ann",
            "comment": "ship it",
            "source": "human",
        },
    }
    assert Counter({"Q3 report": 1}) == RAN
    done = app.get_approval(pending.approval_id)
    assert (done.status, done.source, done.decided_by) == ("approved", "human", "ann")
    assert done.consumed_at is not None
    [entry] = [s for s in app.run_steps(run.run_id) if s.kind == "approve"]
    assert entry.output["approval"]["approval_id"] == pending.approval_id
    assert event_types(app, run.run_id) == [
        "approval.requested",
        "approval.decided",
        "approval.consumed",
    ]


def test_an_edit_is_validated_against_the_schema_and_reaches_the_run_marked_edited(
    app: tether.App, flavor: str
) -> None:
    class Title(pydantic.BaseModel):
        title: str = pydantic.Field(min_length=3)

    gated(app, flavor, schema=Title)
    run = app.submit("pub", {"title": "draft"})
    pending = parked(app, run)
    assert pending.schema == Title.model_json_schema()

    with pytest.raises(tether.InvalidInput) as refused:
        app.decide(pending.approval_id, True, data={"title": "x"}, digest=pending.digest)
    assert "title" in refused.value.errors[0]
    assert app.get_approval(pending.approval_id).status == "pending"  # nothing decided
    assert event_types(app, run.run_id) == ["approval.requested"]

    app.decide(pending.approval_id, True, data={"title": "Final"}, digest=pending.digest)
    app.work(**WORK)
    outcome = run.result(timeout=1)
    assert outcome["published"] == "published Final"
    assert outcome["decision"]["data"] == {"title": "Final"} and outcome["decision"]["edited"]


def test_an_approval_without_a_schema_takes_no_edits(app: tether.App, flavor: str) -> None:
    gated(app, flavor)
    pending = parked(app, app.submit("pub", {"title": "as is"}))
    with pytest.raises(tether.ConfigurationError, match="takes no edits"):
        app.decide(pending.approval_id, True, data={"title": "other"})
    assert app.get_approval(pending.approval_id).status == "pending"


def test_a_question_gets_a_validated_answer_and_an_invalid_one_leaves_it_pending(
    app: tether.App, flavor: str
) -> None:
    class Budget(pydantic.BaseModel):
        amount: int = pydantic.Field(ge=1)
        currency: str = "EUR"

    def handler(ctx: Any, task: Any) -> Any:
        budget = yield ctx.ask("What budget?", Budget)
        count = yield ctx.ask("How many?", {"type": "integer", "minimum": 1})
        assert isinstance(budget, Budget)
        return {"budget": budget.model_dump(), "count": count}

    register(app, flavor, "planner", handler)
    active_agent(app, "planner", "plan")
    run = app.submit("plan")
    first = parked(app, run)
    assert first.kind == "ask" and first.data["question"] == "What budget?"

    with pytest.raises(tether.InvalidInput) as refused:
        app.decide(first.approval_id, True, data={"amount": 0})
    assert any("amount" in line for line in refused.value.errors)
    assert app.get_approval(first.approval_id).status == "pending"
    with pytest.raises(tether.ConfigurationError, match="answer it with data"):
        app.decide(first.approval_id, True)

    app.decide(first.approval_id, True, data={"amount": 500})
    work_until(app, lambda: len(app.approvals(run_id=run.run_id, status="pending")) == 1)
    [second] = app.approvals(run_id=run.run_id, status="pending")
    app.decide(second.approval_id, True, data=3)
    app.work(**WORK)
    assert run.result(timeout=1) == {"budget": {"amount": 500, "currency": "EUR"}, "count": 3}
    assert app.get_approval(first.approval_id).status == "answered"


def test_a_decision_is_made_once(app: tether.App, flavor: str) -> None:
    gated(app, flavor)
    pending = parked(app, app.submit("pub", {"title": "once"}))
    first = app.decide(pending.approval_id, False, comment="no", actor="ann")
    again = app.decide(pending.approval_id, False, comment="no", actor="ann")
    assert again == first  # the same decision: the stored one
    with pytest.raises(tether.ConflictError, match="already decided"):
        app.decide(pending.approval_id, True, actor="ann")
    with pytest.raises(tether.ConflictError):
        app.decide(pending.approval_id, False, actor="bob")
    decided = [e for e in app.events(types=["approval.decided"])]
    assert len(decided) == 1 and decided[0].data["decided_by"] == "ann"


def test_a_stale_digest_or_a_decider_not_allowed_is_refused_and_nothing_is_written(
    app: tether.App, flavor: str
) -> None:
    gated(app, flavor, approvers=["ann"])
    run = app.submit("pub", {"title": "v2"})
    pending = parked(app, run)
    stale = codec.digest({"title": "v1"})
    with pytest.raises(tether.Refused, match="digest"):
        app.decide(pending.approval_id, True, digest=stale, actor="ann")
    with pytest.raises(tether.Refused, match="only ann"):
        app.decide(pending.approval_id, True, digest=pending.digest, actor="mallory")
    assert app.get_approval(pending.approval_id).status == "pending"
    assert event_types(app, run.run_id) == ["approval.requested"]
    with pytest.raises(tether.NotFound):
        app.decide("apr_nothing", True)


@pytest.mark.parametrize("default", ["reject", "approve"])
def test_a_timeout_applies_the_default_and_records_it_as_a_timeout(
    db_url: str, flavor: str, default: str
) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)
    try:
        gated(app, flavor, timeout=3600, default=default)
        RAN.clear()
        run = app.submit("pub", {"title": "late"})
        pending = parked(app, run)
        assert pending.deadline is not None
        assert app.get_run(run.run_id).wake_at == pending.deadline == clock() + HOUR
        clock.advance(3601)
        app.work(**WORK)

        outcome = run.result(timeout=1)
        assert outcome["decision"]["source"] == "timeout"
        assert outcome["decision"]["by"] is None
        assert outcome["decision"]["approved"] is (default == "approve")
        assert (Counter({"late": 1}) if default == "approve" else Counter()) == RAN
        done = app.get_approval(pending.approval_id)
        assert done.source == "timeout" and done.decided_by is None
        assert done.status == ("approved" if default == "approve" else "rejected")
        assert event_types(app, run.run_id) == [
            "approval.requested",
            "approval.expired",
            "approval.consumed",
        ]
        with pytest.raises(tether.ConflictError, match="by timeout"):
            app.decide(pending.approval_id, default != "approve")
    finally:
        app.close()


def test_approvals_in_a_loop_each_have_their_own_id_and_decision(
    app: tether.App, flavor: str
) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        verdicts = []
        for item in task:
            verdicts.append(bool((yield ctx.approve("Send this?", item))))
        return verdicts

    register(app, flavor, "looper", handler)
    active_agent(app, "looper", "loop")
    run = app.submit("loop", ["a", "a", "b"])  # the same data twice: still two approvals
    seen = []
    for approve in (True, False, True):
        work_until(app, lambda: len(app.approvals(run_id=run.run_id, status="pending")) == 1)
        [pending] = app.approvals(run_id=run.run_id, status="pending")
        seen.append(pending.approval_id)
        app.decide(pending.approval_id, approve, digest=pending.digest)
    app.work(**WORK)
    assert run.result(timeout=1) == [True, False, True]
    assert len(set(seen)) == 3


def test_a_replay_that_asks_about_other_data_is_an_incident_not_a_reuse(
    app: tether.App, flavor: str
) -> None:
    asked = {"title": "first version"}

    def handler(ctx: Any, task: Any) -> Any:
        decision = yield ctx.approve("Publish?", dict(asked))
        return decision.data

    register(app, flavor, "changing", handler)
    active_agent(app, "changing", "chg")
    run = app.submit("chg")
    pending = parked(app, run)
    app.decide(pending.approval_id, True, digest=pending.digest)
    asked["title"] = "another version"  # the code now asks about something else
    app.work(**WORK)

    assert run.status() == RunStatus.NEEDS_ATTENTION
    [incident] = app.incidents(run_id=run.run_id)
    assert incident.kind == "non_determinism"
    assert codec.digest({"title": "another version"})[:12] in str(incident.error)
    # The decision was not handed to a run asking about other data.
    assert app.get_approval(pending.approval_id).consumed_at is not None  # journaled once
    assert all(s.kind != "step" for s in app.run_steps(run.run_id))


def test_two_deciders_racing_for_one_approval_one_wins(app: tether.App, flavor: str) -> None:
    gated(app, flavor)
    run = app.submit("pub", {"title": "race"})
    pending = parked(app, run)
    outcomes: dict[str, Any] = {}
    calls: list[dict[str, Any]] = []

    def decide(actor: str, approve: bool) -> None:
        started = time.time()
        try:
            outcomes[actor] = app.decide(pending.approval_id, approve, actor=actor)
        except tether.ConflictError as exc:
            outcomes[actor] = exc
        calls.append({"actor": actor, "started": started, "finished": time.time()})

    racers = [
        threading.Thread(target=decide, args=("ann", True)),
        threading.Thread(target=decide, args=("bob", False)),
    ]
    with gate(app, [pending.approval_id], approvals_table) as held:
        for racer in racers:
            racer.start()
        held.hold_until_queued(2)
    for racer in racers:
        racer.join(30)
    assert_all_inside(held.opened, calls)

    won = [a for a, o in outcomes.items() if isinstance(o, tether.ApprovalInfo)]
    lost = [a for a, o in outcomes.items() if isinstance(o, tether.ConflictError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    stored = app.get_approval(pending.approval_id)
    assert stored.decided_by == won[0]
    app.work(**WORK)
    assert run.result(timeout=1)["decision"]["by"] == won[0]
    assert len(app.events(types=["approval.decided"])) == 1


def test_many_pending_approvals_hold_no_threads(db_url: str) -> None:
    count = 1000
    app = tether.App(db_url)

    @app.agent("asker", max_concurrent_runs=count)
    def asker(ctx: tether.RunContext, task: Any) -> Any:
        return ctx.approve("ok?", task).approved

    try:
        active_agent(app, "asker", "ask")
        baseline = threading.active_count()
        runs = [app.submit("ask", i) for i in range(count)]
        app.work(until_idle=True, timeout=120, concurrency=8)
        assert {r.status() for r in runs} == {RunStatus.WAITING}
        assert len(app.approvals(status="pending", limit=None)) == count
        assert threading.active_count() <= baseline + 1  # the worker's threads are gone
    finally:
        app.close()


def test_the_approvals_of_a_run_that_ends_undecided_are_withdrawn(
    app: tether.App, flavor: str
) -> None:
    gated(app, flavor)

    def boss(ctx: Any, task: Any) -> Any:
        return (yield ctx.call("pub", task))

    register(app, flavor, "boss", boss)
    active_agent(app, "boss", "b1")
    alone = app.submit("pub", {"title": "alone"})
    tree = app.submit("b1", {"title": "child's"})
    work_until(app, lambda: len(app.approvals(status="pending")) == 2)
    [mine] = app.approvals(run_id=alone.run_id)
    [childs] = [a for a in app.approvals(status="pending") if a.run_id != alone.run_id]

    app.cancel(alone.run_id)
    app.cancel(tree.run_id)  # its child, waiting for a person, is cancelled with it

    for approval in (mine, childs):
        found = app.get_approval(approval.approval_id)
        assert found.status == "withdrawn" and found.decided_by is None
        with pytest.raises(tether.ConflictError, match="withdrawn"):
            app.decide(approval.approval_id, True)
    assert app.approvals(status="pending") == []
    withdrawn = app.events(types=["approval.withdrawn"])
    assert sorted(e.data["approval_id"] for e in withdrawn) == sorted(
        [mine.approval_id, childs.approval_id]
    )
