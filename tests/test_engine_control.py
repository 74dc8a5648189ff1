"""The engine's decisions hold whatever the handler does: control signals cannot be swallowed,
a lost run starts no further step body, a step body cannot journal, and tether's step options
never reach the step function. Every test runs on both databases, for a sync and an async
handler (``tests/flavors.py``)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import update

import tether
from tests.flavors import register
from tether.store.schema import runs
from tether.testing import active_agent, work_until
from tether.types import RunStatus

WORK = {"until_idle": True, "timeout": 20.0}


def steal(app: tether.App, run_id: str) -> None:
    """Another worker takes the run over, as a claim after an expired lease would."""
    with app.store.db.write() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.run_id == run_id)
            .values(owner="another-worker:1:beef", fence=runs.c.fence + 1)
        )


# -- a lost run starts no further step body ----------------------------------------------


@pytest.mark.parametrize("catch", [Exception, BaseException])
def test_a_handler_that_catches_everything_cannot_run_a_step_body_after_losing_its_run(
    app: tether.App, flavor: str, catch: type[BaseException]
) -> None:
    bodies = Counter[str]()

    def first() -> str:
        bodies["first"] += 1
        steal(app, tether.current_step().run_id)  # taken over while this body runs
        return "done"

    def second() -> str:
        bodies["second"] += 1
        return "done"

    def handler(ctx: Any, task: Any) -> Any:
        try:
            try:
                yield ctx.step(first)
            except catch:
                bodies["swallowed"] += 1
            try:
                yield ctx.step(second)
            except catch:
                bodies["swallowed"] += 1
            return "finished anyway"
        finally:
            bodies["exited"] += 1

    register(app, flavor, "lossy", handler)
    active_agent(app, "lossy", "l1")
    run = app.submit("l1")
    work_until(app, lambda: bodies["exited"] == 1)

    assert bodies["first"] == 1
    assert bodies["second"] == 0
    assert bodies["swallowed"] == (2 if catch is BaseException else 0)
    info = app.get_run(run.run_id)
    assert info.status == RunStatus.RUNNING and info.owner == "another-worker:1:beef"
    assert app.run_steps(run.run_id) == []  # the first step's commit was refused too
    assert "run.completed" not in [e.type for e in app.timeline(run.run_id)]


def test_a_run_taken_over_between_two_steps_starts_no_further_body(
    db_url: str, flavor: str
) -> None:
    app = tether.App(db_url, lease_ttl=0.6)
    bodies = Counter[str]()

    def first() -> str:
        bodies["first"] += 1
        return "one"

    def second() -> str:
        bodies["second"] += 1
        return "two"

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(first)
        if bodies["exited"]:
            return  # the run came back after its lease expired: nothing more to show
        steal(app, ctx.run_id)
        time.sleep(0.5)  # frozen between steps: the heartbeat finds the run gone
        try:
            try:
                yield ctx.step(second)
            except BaseException:
                bodies["swallowed"] += 1
            try:
                yield ctx.step(second)
            except BaseException:
                bodies["swallowed"] += 1
        finally:
            bodies["exited"] += 1

    try:
        register(app, flavor, "frozen", handler)
        active_agent(app, "frozen", "f1")
        run = app.submit("f1")
        work_until(app, lambda: bodies["exited"] == 1)

        assert bodies == Counter(first=1, swallowed=2, exited=1)
        assert [s.seq for s in app.run_steps(run.run_id)] == [1]
    finally:
        app.close()


def test_a_swallowed_suspension_still_parks_the_run_and_runs_nothing_more(
    app: tether.App, flavor: str
) -> None:
    bodies = Counter[str]()

    def after() -> None:
        bodies["after"] += 1

    def handler(ctx: Any, task: Any) -> Any:
        try:
            yield ctx.sleep(3600)
        except BaseException:
            bodies["swallowed"] += 1
        yield ctx.step(after)
        return "not now"

    register(app, flavor, "napper", handler)
    active_agent(app, "napper", "n1")
    run = app.submit("n1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)

    assert bodies == Counter(swallowed=1)


def test_a_control_signal_is_not_an_ordinary_exception() -> None:
    assert issubclass(tether.LeaseLost, tether.ControlSignal)
    assert not issubclass(tether.ControlSignal, Exception)


# -- a step body is plain code ------------------------------------------------------------


def test_a_step_started_inside_another_steps_body_is_refused_at_once(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def inner() -> str:
        calls["inner"] += 1
        return "inner"

    def outer(ctx: Any) -> str:
        calls["outer"] += 1
        ctx.step(inner)  # wrong: a step body cannot journal (the async face is not awaited
        return "outer"  # here, but the sync one is refused before it starts anything)

    def handler(ctx: Any, task: Any) -> Any:
        if isinstance(ctx, tether.AsyncRunContext):
            nested = ctx.step(inner)
            try:
                return (yield ctx.step(_await_in_body, nested))
            finally:
                nested.close()
        return (yield ctx.step(outer, ctx))

    register(app, flavor, "nester", handler)
    active_agent(app, "nester", "n1")
    run = app.submit("n1")
    app.work(**WORK)

    assert calls["inner"] == 0
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "step_failed"
    assert "inside the body of step 1" in incident.error["message"]
    assert incident.error["type"] == "ConfigurationError"
    assert [s.seq for s in app.run_steps(run.run_id)] == [1]  # nothing journaled at 2


async def _await_in_body(nested: Any) -> str:
    return str(await nested)


def test_current_run_and_current_step_tell_code_where_it_runs(app: tether.App, flavor: str) -> None:
    seen: dict[str, Any] = {}

    def look() -> dict[str, Any]:
        run, step = tether.current_run(), tether.current_step()
        return {"run": run.run_id, "agent": run.agent_id, "step": step.seq, "tool": step.tool}

    def handler(ctx: Any, task: Any) -> Any:
        seen["handler"] = tether.current_run().run_id
        return (yield ctx.step(look, tool="lookup"))

    register(app, flavor, "looker", handler)
    active_agent(app, "looker", "k1")
    run = app.submit("k1")
    app.work(**WORK)

    assert seen["handler"] == run.run_id
    assert run.result(timeout=1) == {"run": run.run_id, "agent": "k1", "step": 1, "tool": "lookup"}
    with pytest.raises(RuntimeError, match="only available while a run executes"):
        tether.current_run()


# -- step options are tether's ------------------------------------------------------------


def test_step_options_never_reach_the_step_function(app: tether.App, flavor: str) -> None:
    received: list[tuple[Any, ...]] = []

    def search_web(query: str, *, limit: int = 3) -> list[str]:
        received.append((query, limit))
        return [f"{query} {i}" for i in range(limit)]

    def handler(ctx: Any, task: Any) -> Any:
        return (
            yield ctx.step(
                search_web,
                task["query"],
                limit=2,
                tool="web_search",
                cost=0.01,
                tokens=120,
                retry=tether.Retry(max_attempts=5),
                timeout=10,
            )
        )

    register(app, flavor, "researcher", handler)
    active_agent(app, "researcher", "r1")
    run = app.submit("r1", {"query": "durable agents"})
    app.work(**WORK)

    assert run.result(timeout=1) == ["durable agents 0", "durable agents 1"]
    assert received == [("durable agents", 2)]
    [completed] = [e for e in app.timeline(run.run_id) if e.type == "step.completed"]
    assert completed.data["tool"] == "web_search"
    assert completed.data["cost"] == 0.01 and completed.data["tokens"] == 120


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cost": -1}, "cost must be a number >= 0"),
        ({"tokens": 1.5}, "tokens must be a whole number"),
        ({"tool": ""}, "tool must be a non-empty name"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"on_ambiguous": "maybe"}, "on_ambiguous='maybe'"),
    ],
)
def test_bad_step_options_are_refused_before_anything_runs(
    app: tether.App, flavor: str, options: dict[str, Any], message: str
) -> None:
    calls = Counter[str]()

    def work() -> None:
        calls["work"] += 1

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(work, **options)

    register(app, flavor, "picky", handler)
    active_agent(app, "picky", "p1")
    run = app.submit("p1")
    app.work(**WORK)

    assert calls["work"] == 0
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "handler_error" and message in incident.error["message"]


# -- interceptors ---------------------------------------------------------------------------


class Recorder(tether.Interceptor):
    def __init__(self, log: list[str], deny: str | None = None) -> None:
        self.log = log
        self.deny = deny

    def before_step(self, step: tether.StepAttempt) -> None:
        self.log.append(f"before {step.name}#{step.attempt} tool={step.tool}")
        if step.name == self.deny:
            raise PermissionError(f"{step.name} is not allowed")

    def after_step(self, step: tether.StepAttempt, output: Any) -> None:
        self.log.append(f"after {step.name}={output}")

    def step_failed(self, step: tether.StepAttempt, error: BaseException) -> None:
        self.log.append(f"failed {step.name}: {type(error).__name__}")


def test_interceptors_see_every_executed_attempt_and_no_replayed_one(
    db_url: str, flavor: str
) -> None:
    log: list[str] = []
    app = tether.App(db_url, interceptors=[Recorder(log)])
    calls = Counter[str]()

    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("reset")
        return "ok"

    def handler(ctx: Any, task: Any) -> Any:
        out = yield ctx.step(flaky, name="flaky", tool="net", retry=tether.Retry(initial_delay=0))
        yield ctx.sleep(0.05)  # parks the run: the next claim replays flaky
        return out

    try:
        register(app, flavor, "watched", handler)
        active_agent(app, "watched", "w1")
        run = app.submit("w1")
        app.work(**WORK)

        assert run.result(timeout=1) == "ok"
        assert log == [
            "before flaky#1 tool=net",
            "failed flaky: ConnectionError",
            "before flaky#2 tool=net",
            "after flaky=ok",
        ]
    finally:
        app.close()


def test_an_interceptor_that_raises_fails_the_attempt_before_its_body_runs(
    db_url: str, flavor: str
) -> None:
    log: list[str] = []
    app = tether.App(db_url, interceptors=[Recorder(log, deny="launch")])
    calls = Counter[str]()

    def launch() -> str:
        calls["launch"] += 1
        return "launched"

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(launch, name="launch"))

    try:
        register(app, flavor, "guarded", handler)
        active_agent(app, "guarded", "g1")
        run = app.submit("g1")
        app.work(**WORK)

        assert calls["launch"] == 0
        [incident] = app.incidents(status="open", run_id=run.run_id)
        assert incident.error["type"] == "PermissionError"
        assert log == ["before launch#1 tool=None", "failed launch: PermissionError"]
    finally:
        app.close()
