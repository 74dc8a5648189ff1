"""Steps on a real database (SQLite and PostgreSQL): the journal, replay, state and queues.

Every test counts how many times step functions really executed, so "replay returns the stored
output" is checked against the function's own counter, not against what tether reports. Every
test of a handler runs for a sync and an async one, from one handler written once
(``tests/flavors.py``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tests.flavors import Handler, agent, run_async, run_sync
from tether.app import RunHandle
from tether.context import RunContext, current_step
from tether.testing import active_agent
from tether.types import RunStatus, StepStatus

WORK = {"until_idle": True, "timeout": 20.0}


def event_types(app: tether.App, run_id: str) -> list[str]:
    return [e.type for e in app.timeline(run_id)]


# -- the journal and replay ------------------------------------------------------------------


def test_step_output_is_journaled_and_returned(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()

    def double(n: int) -> dict[str, int]:
        calls["double"] += 1
        return {"value": n * 2}

    @agent(app, flavor, "doubler")
    def handle(ctx: Any, task: dict[str, int]) -> Any:
        out = yield ctx.step(double, task["n"], name="double")
        return {"got": out}

    active_agent(app, "doubler", "d1")
    run = app.submit("d1", {"n": 21})
    app.work(**WORK)

    assert run.result(timeout=1) == {"got": {"value": 42}}
    assert calls["double"] == 1
    [step] = app.run_steps(run.run_id)
    assert (step.seq, step.name, step.kind) == (1, "double", "step")
    assert step.status == StepStatus.COMPLETED
    assert step.output == {"value": 42}
    assert step.attempts == 1
    assert event_types(app, run.run_id) == [
        "run.submitted",
        "run.claimed",
        "step.completed",
        "run.completed",
    ]


def test_replay_returns_stored_outputs_without_calling_the_function_again(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def first() -> str:
        calls["first"] += 1
        return f"token-{calls['first']}"

    def second(token: str) -> str:
        calls["second"] += 1
        return token.upper()

    @agent(app, flavor, "replayer")
    def handle(ctx: Any, task: Any) -> Any:
        calls["handler"] += 1
        token = yield ctx.step(first)
        yield ctx.sleep(0.05)  # parks the run: the rest runs in a second execution, by replay
        return str((yield ctx.step(second, token)))

    active_agent(app, "replayer", "r1")
    run = app.submit("r1")
    app.work(**WORK)

    assert run.result(timeout=1) == "TOKEN-1"
    assert calls == Counter(handler=2, first=1, second=1)
    assert app.get_run(run.run_id).attempts == 2
    steps = app.run_steps(run.run_id)
    assert [(s.kind, s.status) for s in steps] == [
        ("step", StepStatus.COMPLETED),
        ("sleep", StepStatus.COMPLETED),
        ("step", StepStatus.COMPLETED),
    ]
    assert steps[0].output == "token-1"


def test_a_step_can_call_a_sync_or_an_async_function_and_both_replay(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def sync_fetch(n: int) -> int:
        calls["sync"] += 1
        return n + 1

    async def async_fetch(n: int) -> int:
        calls["async"] += 1
        return n * 10

    @agent(app, flavor, "mixed")
    def handle(ctx: Any, task: dict[str, int]) -> Any:
        calls["handler"] += 1
        a = yield ctx.step(sync_fetch, task["n"])
        b = yield ctx.step(async_fetch, a)
        yield ctx.sleep(0.05)  # the second execution replays both kinds of step
        return int(b)

    active_agent(app, "mixed", "m1")
    run = app.submit("m1", {"n": 1})
    app.work(**WORK)

    assert run.result(timeout=1) == 20
    assert calls == Counter(handler=2, sync=1, **{"async": 1})
    assert [s.kind for s in app.run_steps(run.run_id)] == ["step", "step", "sleep"]


def test_idempotency_key_is_run_id_and_seq_and_stable_across_attempts(
    app: tether.App, flavor: str
) -> None:
    seen: list[tuple[str, int, int]] = []

    def warm_up() -> None:
        return None

    def charge() -> str:
        scope = current_step()
        seen.append((scope.idempotency_key, scope.seq, scope.attempt))
        if len(seen) == 1:
            raise ConnectionError("connection reset by peer")
        return scope.idempotency_key

    @agent(app, flavor, "payer")
    def handle(ctx: Any, task: Any) -> Any:
        yield ctx.step(warm_up)
        return (yield ctx.step(charge, retry=tether.Retry(initial_delay=0.01, jitter=0)))

    active_agent(app, "payer", "p1")
    run = app.submit("p1")
    app.work(**WORK)

    key = f"{run.run_id}:2"
    assert run.result(timeout=1) == key
    assert seen == [(key, 2, 1), (key, 2, 2)]


def test_current_step_outside_a_step_body_raises() -> None:
    with pytest.raises(RuntimeError, match="only available inside a step"):
        current_step()


# -- agent state -----------------------------------------------------------------------------


def test_state_changes_are_committed_with_the_step(
    app: tether.App, db_url: str, flavor: str
) -> None:
    seen_from_outside: list[dict[str, Any]] = []

    def remember() -> None:
        return None

    def look_from_another_process() -> None:
        # A second App is what any other process would see: the change is already durable.
        with tether.App(db_url, require_types=False) as other:
            seen_from_outside.append(other.get_state("s1").state)

    @agent(app, flavor, "stateful")
    def handle(ctx: Any, task: Any) -> Any:
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        yield ctx.step(remember)
        yield ctx.step(look_from_another_process)

    active_agent(app, "stateful", "s1")
    before = app.get_state("s1")
    run = app.submit("s1")
    app.work(**WORK)

    assert app.get_run(run.run_id).status == RunStatus.COMPLETED
    assert seen_from_outside == [{"count": 1}]
    after = app.get_state("s1")
    assert after.state == {"count": 1}
    assert after.version == before.version + 1
    assert after.run_id == run.run_id


def test_state_changes_survive_replay_without_duplication(app: tether.App, flavor: str) -> None:
    def mark(label: str) -> str:
        return label

    @agent(app, flavor, "collector")
    def handle(ctx: Any, task: Any) -> Any:
        ctx.state.setdefault("items", [])
        ctx.state["items"].append("before")
        yield ctx.step(mark, "before")
        ctx.state["items"].append("just-before-sleep")  # committed with the sleep itself
        yield ctx.sleep(0.05)
        ctx.state["items"].append("after")
        yield ctx.step(mark, "after")
        return list(ctx.state["items"])

    active_agent(app, "collector", "c1")
    run = app.submit("c1")
    app.work(**WORK)

    expected = ["before", "just-before-sleep", "after"]
    assert run.result(timeout=1) == expected
    assert app.get_state("c1").state == {"items": expected}
    assert app.get_run(run.run_id).attempts == 2


def test_a_run_resuming_after_a_wait_keeps_state_other_runs_committed_meanwhile(
    app: tether.App, flavor: str
) -> None:
    def noop() -> None:
        return None

    @agent(app, flavor, "ledger")
    def handle(ctx: Any, task: str) -> Any:
        ctx.state.setdefault("log", []).append(f"{task}:start")
        yield ctx.step(noop)
        if task == "slow":
            yield ctx.sleep(0.2)  # the fast run executes, start to end, while this one waits
        ctx.state["log"].append(f"{task}:end")
        yield ctx.step(noop)

    active_agent(app, "ledger", "l1")
    slow = app.submit("l1", "slow")
    fast = app.submit("l1", "fast")
    app.work(**WORK)

    assert slow.status() == fast.status() == RunStatus.COMPLETED
    assert sorted(app.get_state("l1").state["log"]) == [
        "fast:end",
        "fast:start",
        "slow:end",
        "slow:start",
    ]


def agent_class(flavor: str, name: str, handler: Handler) -> type[tether.Agent]:
    """A ``tether.Agent`` subclass of type ``name`` whose ``handle`` runs ``handler`` (a
    generator, see ``tests/flavors.py``) as a sync or an async method."""
    if flavor == "sync":

        class SyncAgent(tether.Agent):
            type = name

            def handle(self, ctx: Any, task: Any) -> Any:
                return run_sync(handler(ctx, task))

        return SyncAgent

    class AsyncAgent(tether.Agent):
        type = name

        async def handle(self, ctx: Any, task: Any) -> Any:
            return await run_async(handler(ctx, task))

    return AsyncAgent


def test_an_agent_class_keeps_state_across_steps_and_waits(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()

    async def lookup(word: str) -> str:
        calls["lookup"] += 1
        return word[::-1]

    def reverse_words(ctx: Any, task: list[str]) -> Any:
        out = []
        for word in task:
            reversed_ = yield ctx.step(lookup, word)
            ctx.state.setdefault("seen", []).append(reversed_)
            out.append(reversed_)
            yield ctx.sleep(0.01)
        return out

    app.register(agent_class(flavor, "reverser", reverse_words))
    active_agent(app, "reverser", "rv1")
    run = app.submit("rv1", ["abc", "xy"])
    app.work(**WORK)

    assert run.result(timeout=1) == ["cba", "yx"]
    assert calls["lookup"] == 2
    assert app.get_state("rv1").state == {"seen": ["cba", "yx"]}


def test_now_uuid_and_random_return_the_same_values_on_replay(app: tether.App, flavor: str) -> None:
    executions: list[tuple[str, str, float]] = []

    @agent(app, flavor, "dice")
    def handle(ctx: Any, task: Any) -> Any:
        values = (ctx.now().isoformat(), str(ctx.uuid()), ctx.random())
        executions.append(values)
        yield ctx.sleep(0.05)
        return list(values)

    active_agent(app, "dice", "x1")
    run = app.submit("x1")
    app.work(**WORK)

    assert len(executions) == 2
    assert executions[0] == executions[1]
    now, uid, rnd = executions[0]
    uuid.UUID(uid)
    assert 0.0 <= rnd < 1.0
    assert run.result(timeout=1) == [now, uid, rnd]
    kinds = [s.kind for s in app.run_steps(run.run_id)]
    assert kinds == ["now", "uuid", "random", "sleep"]


def test_a_non_json_step_output_becomes_an_incident(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()

    def make_socketish() -> object:
        calls["bad"] += 1
        return object()

    @agent(app, flavor, "badoutput")
    def handle(ctx: Any, task: Any) -> Any:
        yield ctx.step(make_socketish, name="bad")
        calls["after"] += 1

    active_agent(app, "badoutput", "b1")
    run = app.submit("b1")
    app.work(**WORK)

    assert app.get_run(run.run_id).status == RunStatus.NEEDS_ATTENTION
    assert calls == Counter(bad=1)
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "serialization"
    assert incident.seq == 1
    assert incident.error["type"] == "SerializationError"
    assert incident.error["message"].startswith("step bad output: object of type object")
    assert "not JSON" in incident.error["message"]
    [step] = app.run_steps(run.run_id)
    assert step.status == StepStatus.FAILED


# -- queues ----------------------------------------------------------------------------------


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_one_agent_never_executes_two_runs_at_once(app: tether.App, flavor: str) -> None:
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def busy() -> None:
        start = time.monotonic()
        time.sleep(0.2)
        with lock:
            intervals.append((start, time.monotonic()))

    @agent(app, flavor, "actor")  # max_concurrent_runs defaults to 1
    def handle(ctx: Any, task: Any) -> Any:
        yield ctx.step(busy)

    active_agent(app, "actor", "solo")
    runs = [app.submit("solo", i) for i in range(3)]
    app.work(concurrency=4, **WORK)

    assert all(r.status() == RunStatus.COMPLETED for r in runs)
    assert len(intervals) == 3
    for i, a in enumerate(intervals):
        for b in intervals[i + 1 :]:
            assert not _overlap(a, b), intervals


def test_two_agents_run_their_runs_in_parallel(app: tether.App, flavor: str) -> None:
    intervals: dict[str, tuple[float, float]] = {}

    def busy(agent_id: str) -> None:
        start = time.monotonic()
        time.sleep(0.3)
        intervals[agent_id] = (start, time.monotonic())

    @agent(app, flavor, "parallel")
    def handle(ctx: Any, task: Any) -> Any:
        yield ctx.step(busy, ctx.agent_id)

    for agent_id in ("left", "right"):
        active_agent(app, "parallel", agent_id)
        app.submit(agent_id)
    app.work(concurrency=4, **WORK)

    assert set(intervals) == {"left", "right"}
    assert _overlap(intervals["left"], intervals["right"]), intervals


def test_max_concurrent_runs_lets_one_agent_run_that_many_at_once(
    app: tether.App, flavor: str
) -> None:
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def busy() -> None:
        start = time.monotonic()
        time.sleep(0.3)
        with lock:
            intervals.append((start, time.monotonic()))

    @agent(app, flavor, "pair", max_concurrent_runs=2)
    def handle(ctx: Any, task: Any) -> Any:
        yield ctx.step(busy)

    active_agent(app, "pair", "duo")
    for i in range(3):
        app.submit("duo", i)
    app.work(concurrency=4, **WORK)

    assert len(intervals) == 3
    at_once = max(sum(1 for s, e in intervals if s <= point < e) for point, _ in intervals)
    assert at_once == 2, intervals


# -- submitting ------------------------------------------------------------------------------


def test_task_id_makes_submit_idempotent(app: tether.App) -> None:
    calls = Counter[str]()

    def once(task: Any) -> Any:
        calls["once"] += 1
        return task

    @app.agent("idem")
    def handle(ctx: RunContext, task: Any) -> Any:
        return ctx.step(once, task)

    active_agent(app, "idem", "i1")
    first = app.submit("i1", {"n": 1}, task_id="order-7")
    again = app.submit("i1", {"n": 1}, task_id="order-7")
    assert again.run_id == first.run_id
    app.work(**WORK)
    after_done = app.submit("i1", {"n": 1}, task_id="order-7")
    app.work(**WORK)

    assert after_done.run_id == first.run_id
    assert [r.run_id for r in app.list_runs(agent_id="i1")] == [first.run_id]
    assert calls["once"] == 1
    assert len(app.events(types=["run.submitted"])) == 1


@pytest.mark.parametrize("lifecycle", ["created", "initialized", "paused", "terminated"])
def test_submit_to_an_agent_that_is_not_active_is_refused_and_writes_no_run(
    app: tether.App, lifecycle: str
) -> None:
    @app.agent("idle")
    def handle(ctx: RunContext, task: Any) -> None:
        return None

    app.create_agent("idle", "n1")
    path = {
        "created": [],
        "initialized": [app.initialize],
        "paused": [app.initialize, app.activate, app.pause],
        "terminated": [app.terminate],
    }[lifecycle]
    for action in path:
        action("n1")
    assert app.get_agent("n1").lifecycle.value == lifecycle

    with pytest.raises(tether.Refused, match="only an active agent starts runs"):
        app.submit("n1", {"x": 1})
    assert app.list_runs(agent_id="n1") == []
    assert app.events(types=["run"]) == []


# -- at most once ----------------------------------------------------------------------------


def test_an_at_most_once_step_commits_its_intent_before_its_body_runs(
    app: tether.App, db_url: str, flavor: str
) -> None:
    seen_from_outside: list[tuple[int, StepStatus]] = []

    def publish() -> str:
        with tether.App(db_url, require_types=False) as other:
            steps = other.run_steps(current_step().run_id)
        seen_from_outside.extend((s.seq, s.status) for s in steps)
        return "published"

    @agent(app, flavor, "publisher")
    def handle(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(publish, at_most_once=True))

    active_agent(app, "publisher", "pub1")
    run = app.submit("pub1")
    app.work(**WORK)

    assert run.result(timeout=1) == "published"
    assert seen_from_outside == [(1, StepStatus.STARTED)]
    [step] = app.run_steps(run.run_id)
    assert (step.status, step.output) == (StepStatus.COMPLETED, "published")
    types = event_types(app, run.run_id)
    assert types.index("step.started") < types.index("step.completed")


class WorkerCrash(BaseException):
    """Stops a run's execution dead in the middle of a step body, as a crash would.

    The engine turns ``Exception`` into retries and incidents; a ``BaseException`` unwinds the
    execution without another write, so the journal keeps whatever was committed before the
    body ran (for an at-most-once step: its intent, ``started``) and the run stays ``running``
    while nothing executes it. The worker's heartbeat hands such a run back (``run.released``),
    or its short lease expires; either way the same in-process worker takes it up again
    moments later, exactly as another worker would after a real crash (the real ``kill -9``
    version lives in the crash suite).
    """


@pytest.fixture
def short_lease(db_url: str) -> Iterator[tether.App]:
    """An App whose leases expire quickly, so a crashed run is recovered within the test."""
    application = tether.App(db_url, lease_ttl=0.5)
    try:
        yield application
    finally:
        application.close()


def crash_in_step(app: tether.App, flavor: str, **options: Any) -> tuple[RunHandle, Counter[str]]:
    """Run a handler whose step body crashes on its first execution; work until idle."""
    calls = Counter[str]()

    def transfer() -> str:
        calls["transfer"] += 1
        if calls["transfer"] == 1:
            raise WorkerCrash
        return "sent"

    @agent(app, flavor, "bank")
    def handle(ctx: Any, task: Any) -> Any:
        calls["handler"] += 1
        return {"transfer": (yield ctx.step(transfer, **options))}

    active_agent(app, "bank", "bank1")
    run = app.submit("bank1")
    app.work(**WORK)
    return run, calls


def test_a_plain_step_interrupted_by_a_crash_runs_again_after_recovery(
    short_lease: tether.App, flavor: str
) -> None:
    run, calls = crash_in_step(short_lease, flavor)

    assert run.result(timeout=1) == {"transfer": "sent"}
    assert calls == Counter(handler=2, transfer=2)  # at least once
    # handed back by its worker's heartbeat, found expired, or claimed as such
    recovery = {"run.released", "run.lease_expired", "run.recovered"}
    assert recovery & set(event_types(short_lease, run.run_id))


def test_an_interrupted_at_most_once_step_is_not_run_again_but_asks_a_person(
    short_lease: tether.App, flavor: str
) -> None:
    app = short_lease
    run, calls = crash_in_step(app, flavor, at_most_once=True)

    assert run.status() == RunStatus.NEEDS_ATTENTION
    assert calls == Counter(handler=2, transfer=1)
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert (incident.kind, incident.seq) == ("ambiguous_step", 1)
    assert incident.error["type"] == "AmbiguousStep"
    [step] = app.run_steps(run.run_id)
    assert step.status == StepStatus.STARTED

    # The person checked the bank: the transfer went through. Skip it with what happened.
    app.resolve_incident(incident.incident_id, "skip", output="sent (verified by hand)")
    app.work(**WORK)
    assert run.result(timeout=1) == {"transfer": "sent (verified by hand)"}
    assert calls["transfer"] == 1


def test_an_interrupted_at_most_once_step_fails_the_run_when_told_to(
    short_lease: tether.App, flavor: str
) -> None:
    run, calls = crash_in_step(short_lease, flavor, at_most_once=True, on_ambiguous="fail")

    info = run.info()
    assert info.status == RunStatus.FAILED
    assert info.error is not None
    assert info.error["type"] == "AmbiguousStep"
    assert calls == Counter(handler=2, transfer=1)
    assert short_lease.incidents(run_id=run.run_id) == []


def test_an_interrupted_at_most_once_step_runs_again_when_told_to_retry(
    short_lease: tether.App, flavor: str
) -> None:
    run, calls = crash_in_step(short_lease, flavor, at_most_once=True, on_ambiguous="retry")

    assert run.result(timeout=1) == {"transfer": "sent"}
    assert calls == Counter(handler=2, transfer=2)
    [step] = short_lease.run_steps(run.run_id)
    assert (step.status, step.attempts) == (StepStatus.COMPLETED, 2)


def test_an_unknown_on_ambiguous_choice_is_a_configuration_error(
    app: tether.App, flavor: str
) -> None:
    @agent(app, flavor, "confused")
    def handle(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(lambda: 1, at_most_once=True, on_ambiguous="hope"))

    active_agent(app, "confused", "q1")
    run = app.submit("q1")
    app.work(**WORK)

    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "handler_error"
    assert incident.error["type"] == "ConfigurationError"
    assert "on_ambiguous='hope'" in incident.error["message"]
