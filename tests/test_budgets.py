"""Budgets and policies, on both databases, for sync and async handlers: each limit and each
breach action, steps a policy denies never start, a tool that needs approval asks per call, a
child's usage rolls up to every ancestor, a child cannot widen its parent's policy, a replay
charges nothing again, and every decision is an event."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus

WORK = {"timeout": 30.0}
RAN: Counter[str] = Counter()
FINAL = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.NEEDS_ATTENTION)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    RAN.clear()


def call(name: str, *args: Any) -> str:
    RAN[name] += 1
    return f"{name}{args}"


def report(name: str, cost: float, tokens: int) -> str:
    RAN[name] += 1
    tether.current_step().report(cost=cost, tokens=tokens)
    return name


def ended(run: tether.RunHandle) -> Any:
    return lambda: run.status() in FINAL


def waiting(run: tether.RunHandle) -> Any:
    return lambda: run.status() == RunStatus.WAITING


def events(app: tether.App, run_id: str, prefix: str) -> list[dict[str, Any]]:
    return [
        {"type": e.type, **(e.data or {})}
        for e in app.events(run_id=run_id, limit=10_000)
        if e.type.startswith(prefix)
    ]


def spender(app: tether.App, flavor: str, steps: int = 5, **step: Any) -> None:
    """``spender``: ``steps`` steps of tool ``web``, each with ``step``'s options."""

    def handler(ctx: Any, task: Any) -> Any:
        done = []
        for i in range(task.get("steps", steps)):
            done.append((yield ctx.step(call, "web", i, name=f"s{i}", **step)))
        return {"done": len(done)}

    register(app, flavor, "spender", handler)
    active_agent(app, "spender", "sp")


LIMITS = [
    (tether.Budget(max_steps=3), {"tool": "web"}, "max_steps=3"),
    (tether.Budget(max_cost=1.0), {"tool": "web", "cost": 0.4}, "max_cost=1"),
    (tether.Budget(max_tokens=250), {"tool": "web", "tokens": 100}, "max_tokens=250"),
    (tether.Budget(max_calls={"web": 2}), {"tool": "web"}, "max_calls[web]=2"),
]


@pytest.mark.parametrize(("budget", "options", "limit"), LIMITS, ids=[x[2] for x in LIMITS])
def test_each_limit_fails_the_run_before_the_step_that_would_go_over(
    app: tether.App, flavor: str, budget: tether.Budget, options: dict[str, Any], limit: str
) -> None:
    spender(app, flavor, **options)
    run = app.submit("sp", {}, budget=budget)
    work_until(app, ended(run), **WORK)
    info = run.info()
    assert info.status == RunStatus.FAILED
    assert info.error is not None and info.error["type"] == "BudgetExceeded"
    assert limit in info.error["message"] and info.error["step"] in info.error["message"]
    ran = RAN["web"]
    assert ran == {"max_steps=3": 3, "max_cost=1": 2, "max_tokens=250": 2}.get(limit, 2)
    usage = app.usage(run.run_id)
    assert usage.usage.steps == ran and usage.usage.calls == {"web": ran}
    exceeded = events(app, run.run_id, "budget.exceeded")
    assert len(exceeded) == 1 and exceeded[0]["action"] == "fail"
    settled = events(app, run.run_id, "budget.settled")
    assert len(settled) == ran
    # The run alone spends against its budget: each step reserved in memory, recorded with
    # its settlement.
    assert all(e["reserved"] is True for e in settled)
    assert events(app, run.run_id, "budget.reserved") == []


def test_the_tightest_limit_of_type_agent_run_and_app_applies(db_url: str, flavor: str) -> None:
    app = tether.App(db_url, budget=tether.Budget(max_steps=10, max_cost=100))

    def handler(ctx: Any, task: Any) -> Any:
        for i in range(10):
            yield ctx.step(call, "web", i, name=f"s{i}", cost=1.0)

    register(app, flavor, "layered", handler, budget=tether.Budget(max_steps=8))
    app.create_agent("layered", "lay", config={"budget": {"max_cost": 6.5}})
    app.initialize("lay")
    app.activate("lay")
    run = app.submit("lay", {}, budget={"max_steps": 9})
    work_until(app, ended(run), **WORK)
    assert run.info().error["limit"] == "max_cost=6.5"
    assert RAN["web"] == 6
    app.close()


def test_reported_usage_replaces_the_declared_and_is_committed_with_the_step(
    app: tether.App, flavor: str
) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(report, "llm", 0.25, 1200, name="llm", tool="llm", cost=0.1, tokens=10)
        yield ctx.step(call, "plain", name="plain")
        yield ctx.step(call, "priced", name="priced", cost=0.05)
        return ctx.budget.remaining

    register(app, flavor, "meter", handler)
    active_agent(app, "meter", "m")
    run = app.submit("m", budget=tether.Budget(max_cost=1.0, max_tokens=5000))
    work_until(app, ended(run), **WORK)
    assert run.result() == {"max_cost": pytest.approx(0.7), "max_tokens": 3800}
    usage = app.usage(run.run_id)
    assert usage.usage.cost == pytest.approx(0.3) and usage.usage.tokens == 1200
    assert usage.usage.steps == 3 and usage.usage.calls == {"llm": 1}
    steps = {s.name: s for s in app.run_steps(run.run_id)}
    assert steps["llm"].cost == pytest.approx(0.25) and steps["llm"].tokens == 1200
    assert steps["plain"].cost is None
    limits = {lim.limit: lim for lim in usage.limits}
    assert limits["max_cost"].used == pytest.approx(0.3) and limits["max_cost"].reserved == 0
    completed = events(app, run.run_id, "step.completed")
    assert completed[0]["cost"] == 0.25 and completed[0]["tokens"] == 1200


def test_usage_is_recorded_without_any_budget(app: tether.App, flavor: str) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(report, "llm", 0.5, 10, tool="llm")
        yield ctx.step(call, "web", tool="web", cost=0.25)

    register(app, flavor, "free", handler)
    active_agent(app, "free", "f")
    run = app.submit("f")
    work_until(app, ended(run), **WORK)
    usage = app.usage(run.run_id)
    assert usage.total.cost == pytest.approx(0.75) and usage.total.tokens == 10
    assert usage.limits == [] and events(app, run.run_id, "budget.") == []


def test_pause_waits_for_a_person_to_raise_the_limit_then_continues(
    app: tether.App, flavor: str
) -> None:
    spender(app, flavor, tool="web", cost=0.5)
    run = app.submit("sp", {"steps": 4}, budget=tether.Budget(max_cost=1.0, on_breach="pause"))
    work_until(app, waiting(run), **WORK)
    assert RAN["web"] == 2
    assert [e["kind"] for e in events(app, run.run_id, "run.waiting")] == ["budget"]
    with pytest.raises(tether.NotFound, match="max_cost=1"):
        app.raise_budget(run.run_id, max_tokens=10)
    woken = app.raise_budget(run.run_id, max_cost=5, actor="alice")
    assert woken == [run.run_id]
    work_until(app, ended(run), **WORK)
    assert run.result() == {"done": 4} and RAN["web"] == 4
    raised = events(app, run.run_id, "budget.raised")
    assert raised == [
        {"type": "budget.raised", "holder": run.run_id, "limit": "max_cost=5", "from": 1.0,
         "to": 5.0, "actor": "alice"}
    ]  # fmt: skip


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "rejected"])
def test_ask_raises_the_limit_to_the_approved_data_or_fails(
    app: tether.App, flavor: str, approve: bool
) -> None:
    spender(app, flavor, tool="web", cost=0.5)
    run = app.submit("sp", {"steps": 4}, budget=tether.Budget(max_cost=1.0, on_breach="ask"))
    work_until(app, waiting(run), **WORK)
    (asked,) = app.approvals(run_id=run.run_id)
    assert asked.subject == {"budget": run.run_id, "limit": "cost"}
    assert asked.data == 2.0 and "max_cost=1" in asked.title
    app.decide(asked.approval_id, approve=approve, data=3.0 if approve else None, actor="bob")
    work_until(app, ended(run), **WORK)
    if approve:
        assert run.result() == {"done": 4} and RAN["web"] == 4
        (limit,) = app.usage(run.run_id).limits
        assert limit.max == 3.0 and limit.used == 2.0
    else:
        info = run.info()
        assert info.status == RunStatus.FAILED and info.error["type"] == "BudgetExceeded"
        assert "rejected by bob" in info.error["message"] and RAN["web"] == 2


def test_max_duration_and_rate_follow_the_apps_clock(db_url: str, flavor: str) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)

    def handler(ctx: Any, task: Any) -> Any:
        for i in range(3):
            yield ctx.step(call, "llm", i, name=f"llm{i}", tool="llm")
        yield ctx.sleep(600)
        yield ctx.step(call, "late", name="late")

    register(app, flavor, "timed", handler)
    active_agent(app, "timed", "t")
    budget = tether.Budget(max_duration=300, rate={"llm": "2/min"})
    run = app.submit("t", budget=budget)
    work_until(app, waiting(run), **WORK)
    assert RAN["llm"] == 2  # the third call waits for the window to move on
    (rate,) = events(app, run.run_id, "run.waiting")
    assert rate["kind"] == "timer" and "rate[llm]=2/min" in rate["reason"]
    clock.advance(61)
    work_until(app, lambda: RAN["llm"] == 3 and run.status() == RunStatus.WAITING, **WORK)
    clock.advance(601)
    work_until(app, ended(run), **WORK)
    assert run.info().error["limit"] == "max_duration=300" and RAN["late"] == 0
    app.close()


def test_warn_at_writes_one_event_per_limit(app: tether.App, flavor: str) -> None:
    spender(app, flavor, tool="web", cost=0.25)
    run = app.submit("sp", {"steps": 4}, budget=tether.Budget(max_cost=1.0, warn_at=0.5))
    work_until(app, ended(run), **WORK)
    warned = events(app, run.run_id, "budget.warned")
    assert [(w["limit"], w["used"]) for w in warned] == [("max_cost=1", 0.5)]


# -- policies -------------------------------------------------------------------------------


def tools(app: tether.App, flavor: str, name: str = "tooler", **options: Any) -> None:
    """``tooler``: calls each tool of ``task`` in turn, going on after a denial."""

    def handler(ctx: Any, task: Any) -> Any:
        out = []
        for tool in task:
            try:
                out.append((yield ctx.step(call, tool, name=tool, tool=tool, cost=0.01)))
            except tether.PolicyDenied as exc:
                out.append(f"denied: {exc.rule}")
        yield ctx.sleep(0.05)  # the run resumes by replay: nothing is decided again
        return out

    register(app, flavor, name, handler, **options)
    active_agent(app, name, name)


def test_a_denied_tool_never_starts_and_the_denial_replays(app: tether.App, flavor: str) -> None:
    policy = tether.Policy(allowed_tools=["web", "shell"], denied_tools=["shell"])
    tools(app, flavor, policy=policy)
    run = app.submit("tooler", ["web", "shell", "mail"])
    work_until(app, ended(run), **WORK)
    assert run.result() == ["web()", "denied: denied_tools", "denied: allowed_tools"]
    assert Counter({"web": 1}) == RAN
    decisions = [(e["type"], e.get("rule")) for e in events(app, run.run_id, "policy.")]
    assert decisions == [
        ("policy.allowed", "allowed_tools"),
        ("policy.denied", "denied_tools"),
        ("policy.denied", "allowed_tools"),
    ]
    assert run.info().attempts == 2  # resumed after the sleep: the denials were replayed


def test_an_uncaught_denial_is_an_incident(app: tether.App, flavor: str) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(call, "shell", tool="shell")

    register(app, flavor, "strict", handler, policy=tether.Policy(denied_tools=["shell"]))
    active_agent(app, "strict", "st")
    run = app.submit("st")
    work_until(app, ended(run), **WORK)
    assert run.status() == RunStatus.NEEDS_ATTENTION and RAN["shell"] == 0
    (incident,) = app.incidents(run_id=run.run_id)
    assert incident.error["type"] == "PolicyDenied"


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "rejected"])
def test_a_tool_that_needs_approval_asks_before_each_call_with_its_arguments(
    app: tether.App, flavor: str, approve: bool
) -> None:
    tools(app, flavor, policy=tether.Policy(require_approval=["publish"]))
    run = app.submit("tooler", ["web", "publish"])
    work_until(app, waiting(run), **WORK)
    (asked,) = app.approvals(run_id=run.run_id)
    assert asked.data == {"tool": "publish", "step": "publish", "args": ["publish"], "kwargs": {}}
    assert asked.title == "Allow publish (publish)?"
    app.decide(asked.approval_id, approve=approve, digest=asked.digest, actor="carol")
    work_until(app, ended(run), **WORK)
    expected = "publish()" if approve else "denied: require_approval"
    assert run.result() == ["web()", expected]
    assert RAN["publish"] == (1 if approve else 0)
    if approve:
        assert [e["rule"] for e in events(app, run.run_id, "policy.asked")] == ["require_approval"]


def test_unpriced_tools_follow_on_unpriced(app: tether.App, flavor: str) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(call, "priced", tool="priced", cost=0.1)
        try:
            yield ctx.step(call, "unpriced", tool="unpriced")
        except tether.PolicyDenied as exc:
            return exc.rule

    register(app, flavor, "pricey", handler, policy=tether.Policy(on_unpriced="deny"))
    active_agent(app, "pricey", "pr")
    run = app.submit("pr")
    work_until(app, ended(run), **WORK)
    assert run.result() == "on_unpriced" and Counter({"priced": 1}) == RAN


def test_a_recipient_the_policy_does_not_allow_is_never_sent_to(
    app: tether.App, flavor: str
) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.send("friend", {"hi": 1})
        try:
            yield ctx.send("stranger", {"hi": 2})
        except tether.PolicyDenied as exc:
            return exc.subject

    register(app, flavor, "talker", handler, policy=tether.Policy(allowed_recipients=["friend"]))
    active_agent(app, "talker", "tk")
    for other in ("friend", "stranger"):
        app.create_agent("talker", other)
    run = app.submit("tk")
    work_until(app, ended(run), **WORK)
    assert run.result() == "stranger"
    assert [m.recipient for m in app.messages()] == ["friend"]


# -- trees --------------------------------------------------------------------------------


def tree(app: tether.App, flavor: str, child_policy: tether.Policy | None = None) -> None:
    """``boss`` calls ``helper`` with a list of tools; the helper calls each at cost 0.25."""

    def boss(ctx: Any, task: Any) -> Any:
        yield ctx.step(call, "plan", tool="plan", cost=0.5)
        return (yield ctx.call("helper", task))

    register(app, flavor, "boss", boss)
    tools(app, flavor, name="helper", policy=child_policy)
    active_agent(app, "boss", "boss")


def test_a_childs_usage_rolls_up_to_every_ancestor(app: tether.App, flavor: str) -> None:
    tree(app, flavor)
    run = app.submit("boss", ["a", "b", "c"], budget=tether.Budget(max_cost=10))
    work_until(app, ended(run), **WORK)
    assert run.status() == RunStatus.COMPLETED
    usage = app.usage(run.run_id)
    assert usage.usage.cost == pytest.approx(0.5)
    assert usage.total.cost == pytest.approx(0.53) and usage.total.steps == 4
    assert [r["depth"] for r in usage.runs] == [0, 1]
    (limit,) = usage.limits
    assert limit.used == pytest.approx(0.53) and limit.reserved == 0
    # The child spends against its parent's budget: its steps reserve in the ledger first.
    child = usage.runs[1]["run_id"]
    reserved = events(app, child, "budget.reserved")
    assert [(e["name"], e["holders"]) for e in reserved] == [
        (tool, [run.run_id]) for tool in ("a", "b", "c")
    ]


def test_a_child_stops_at_its_parents_budget(app: tether.App, flavor: str) -> None:
    tree(app, flavor)
    run = app.submit("boss", ["a", "b", "c", "d"], budget=tether.Budget(max_cost=0.52))
    work_until(app, ended(run), **WORK)
    info = run.info()
    assert info.status == RunStatus.NEEDS_ATTENTION  # the boss did not catch ChildRunFailed
    child = app.usage(run.run_id).runs[1]
    assert app.get_run(child["run_id"]).error["holder"] == run.run_id
    assert RAN["a"] + RAN["b"] + RAN["c"] + RAN["d"] == 2


def test_a_child_can_never_be_allowed_more_than_its_parent(app: tether.App, flavor: str) -> None:
    tree(app, flavor, child_policy=tether.Policy(allowed_tools=["a", "b", "shell"]))
    parent = tether.Policy(allowed_tools=["plan", "a", "shell"], denied_tools=["shell"])
    run = app.submit("boss", ["a", "b", "shell"], policy=parent)
    work_until(app, ended(run), **WORK)
    assert run.result() == ["a()", "denied: allowed_tools", "denied: denied_tools"]
    assert Counter({"plan": 1, "a": 1}) == RAN


def test_a_replay_charges_nothing_again(app: tether.App, flavor: str) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(call, "one", tool="web", cost=0.25)
        yield ctx.sleep(0.05)
        yield ctx.step(call, "two", tool="web", cost=0.25)

    register(app, flavor, "sleeper", handler)
    active_agent(app, "sleeper", "sl")
    run = app.submit("sl", budget=tether.Budget(max_cost=1))
    work_until(app, ended(run), **WORK)
    assert run.info().attempts == 2  # replayed step one after the sleep
    (limit,) = app.usage(run.run_id).limits
    assert limit.used == 0.5 and Counter({"one": 1, "two": 1}) == RAN


def test_a_fork_starts_fresh_or_inherits_the_originals_budget(app: tether.App, flavor: str) -> None:
    spender(app, flavor, tool="web", cost=0.25)
    run = app.submit("sp", {"steps": 3}, budget=tether.Budget(max_cost=2))
    work_until(app, ended(run), **WORK)
    fresh = app.fork(run.run_id, 1)
    inherit = app.fork(run.run_id, 1, budget="inherit")
    work_until(app, lambda: ended(fresh)() and ended(inherit)(), **WORK)
    assert [lim.used for lim in app.usage(fresh.run_id).limits] == [0.5]
    assert [(lim.holder, lim.used) for lim in app.usage(inherit.run_id).limits] == [
        (inherit.run_id, 0.5),
        (run.run_id, 1.25),
    ]
    with pytest.raises(tether.ConfigurationError, match="fresh, inherit"):
        app.fork(run.run_id, 1, budget="shared")


BAD = [
    ({"max_cost": -1}, "max_cost must be a number >= 0"),
    ({"max_steps": 1.5}, "max_steps must be a whole number"),
    ({"on_breach": "explode"}, "choose one of fail, pause, ask"),
    ({"rate": {"llm": "fast"}}, "is not a rate"),
    ({"max_money": 3}, "unknown limit 'max_money'"),
    ({"warn_at": 2}, "warn_at must be a fraction"),
]


@pytest.mark.parametrize(("doc", "message"), BAD, ids=[m for _, m in BAD])
def test_a_bad_budget_is_refused_before_anything_is_written(
    app: tether.App, flavor: str, doc: dict[str, Any], message: str
) -> None:
    spender(app, flavor)
    with pytest.raises(tether.ConfigurationError, match=message):
        app.submit("sp", {}, budget=doc)
    assert app.list_runs() == []


def test_a_bad_policy_is_refused(app: tether.App) -> None:
    with pytest.raises(tether.ConfigurationError, match="allowed_tools must be a list"):
        tether.Policy(allowed_tools="web")
    with pytest.raises(tether.ConfigurationError, match="on_unpriced"):
        tether.Policy(on_unpriced="maybe")


def test_budget_and_policy_values() -> None:
    a = tether.Budget(max_cost=2, max_calls={"web": 3}, rate={"llm": "60/min"})
    b = tether.Budget(
        max_cost=1, max_calls={"web": 5, "mail": 1}, rate={"llm": "1/s"}, on_breach="ask"
    )
    from tether.limits import tightest

    both = tightest([b, a])
    assert both is not None and both.max_cost == 1 and both.on_breach == "ask"
    assert both.max_calls == {"web": 3, "mail": 1} and both.rate == {"llm": "60/min"}
    p = tether.Policy(allowed_tools=["a", "b"], require_approval=["b"]) & tether.Policy(
        allowed_tools=["b", "c"], on_unpriced="ask"
    )
    assert p.allowed_tools == frozenset({"b"}) and p.on_unpriced == "ask"
    assert p.tool_rule("b", priced=True) == ("ask", "require_approval")
    assert tether.Budget.from_doc(a.to_doc()) == a


def test_raise_budget_refuses_what_it_cannot_do(app: tether.App, flavor: str) -> None:
    spender(app, flavor)
    run = app.submit("sp", {"steps": 1})
    with pytest.raises(tether.ConfigurationError, match="name a limit"):
        app.raise_budget(run.run_id)
    with pytest.raises(tether.NotFound, match="no budget"):
        app.raise_budget(run.run_id, max_cost=1)
    with pytest.raises(tether.NotFound, match="run 'run_nope' not found"):
        app.raise_budget("run_nope", max_cost=1)


def test_a_limit_raised_while_the_run_executes_is_seen_before_it_would_pause(
    app: tether.App, flavor: str
) -> None:
    def raise_own(cost: float) -> str:
        RAN["raise"] += 1
        app.raise_budget(tether.current_run().run_id, max_cost=cost, actor="ops")
        return "raised"

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(call, "a", name="a", cost=0.5)
        yield ctx.step(raise_own, 5.0, name="raise")
        yield ctx.step(call, "b", name="b", cost=0.5)
        yield ctx.step(call, "c", name="c", cost=0.5)
        return ctx.budget.remaining["max_cost"]

    register(app, flavor, "raiser", handler)
    active_agent(app, "raiser", "rz")
    run = app.submit("rz", budget=tether.Budget(max_cost=1.0, on_breach="pause"))
    work_until(app, ended(run), **WORK)
    # The execution's own view said max_cost=1 was spent after b; the ledger, asked before
    # pausing, had 5: c ran, and the run did not wait for a raise that had already happened.
    assert run.result() == pytest.approx(3.5) and RAN["c"] == 1
    assert events(app, run.run_id, "budget.exceeded") == []
    (limit,) = app.usage(run.run_id).limits
    assert (limit.max, limit.used, limit.reserved) == (5.0, 1.5, 0.0)
