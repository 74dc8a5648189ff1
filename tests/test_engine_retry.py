"""Retry strategies chosen by the error's class, and incidents for what none of them fixes.

The first half checks the pure decision logic (``classify`` and ``decide``); the second runs
real steps on SQLite and PostgreSQL, for a sync and an async handler (``tests/flavors.py``),
and reads the delays and timeouts the engine chose back from what it recorded: the
``step.retry_scheduled`` and ``run.waiting`` events, the step's error and the run's wake-up
time. Retry delays run on a ``FakeClock``: a test moves time instead of waiting for it.
"""

from __future__ import annotations

import datetime as dt
import errno
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether import Retry, Strategy
from tether.engine.retry import StepTimeout, classify, decide
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus, StepStatus

WORK = {"until_idle": True, "timeout": 20.0}


@pytest.fixture
def clock() -> FakeClock:
    """Time that stands still until the test moves it."""
    return FakeClock()


@pytest.fixture
def timed_app(db_url: str, clock: FakeClock) -> Iterator[tether.App]:
    """An App on a fresh database whose time is ``clock``."""
    application = tether.App(db_url, clock=clock)
    try:
        yield application
    finally:
        application.close()


def later(clock: FakeClock, seconds: float) -> dt.datetime:
    """``seconds`` after the clock's current time."""
    return clock() + dt.timedelta(seconds=seconds)


def scheduled(app: tether.App, run_id: str) -> list[dict[str, Any]]:
    """The data of every ``step.retry_scheduled`` event of a run, in order."""
    return [e.data for e in app.events(run_id=run_id, types=["step.retry_scheduled"])]


def waited(app: tether.App, run_id: str) -> list[tuple[str, dt.datetime]]:
    """What a run parked for, in order: each ``run.waiting`` event's kind and deadline."""
    events = app.events(run_id=run_id, types=["run.waiting"])
    return [(e.data["kind"], dt.datetime.fromisoformat(e.data["until"])) for e in events]


def park(app: tether.App, run: tether.RunHandle, times: int = 1) -> None:
    """Work until ``run`` is waiting for the ``times``-th time."""
    work_until(
        app,
        lambda: run.status() == RunStatus.WAITING and len(waited(app, run.run_id)) == times,
    )


def stays_waiting(app: tether.App, run: tether.RunHandle) -> None:
    """A worker that is around leaves the run alone while its wait is not due."""
    app.work(until_idle=False, timeout=0.5)
    assert run.status() == RunStatus.WAITING


def handed_over(app: tether.App, run_id: str) -> list[str]:
    """The run's failures and hand-overs to a person, in the order they were recorded."""
    kinds = ("step.failed", "incident.opened")
    return [e.type for e in app.timeline(run_id) if e.type in kinds]


# -- classify: the error's class chooses the strategy ----------------------------------------


class ReadTimeout(Exception):
    """Named like httpx.ReadTimeout, without importing any HTTP client."""


class ConnectError(Exception):
    """Named like httpx.ConnectError."""


class TransportSubclass(ConnectError):
    """A subclass of a well-known name is matched through its MRO."""


@pytest.mark.parametrize(
    ("error", "strategy"),
    [
        (TimeoutError("slow"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (StepTimeout("step x exceeded its 1s deadline"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (ReadTimeout("read"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (ConnectionError("down"), Strategy.RETRY_WITH_BACKOFF),
        (ConnectionResetError("reset"), Strategy.RETRY_WITH_BACKOFF),
        (socket.gaierror(-2, "Name or service not known"), Strategy.RETRY_WITH_BACKOFF),
        (ConnectError("refused"), Strategy.RETRY_WITH_BACKOFF),
        (TransportSubclass("x"), Strategy.RETRY_WITH_BACKOFF),
        (MemoryError(), Strategy.WAIT_AND_RETRY),
        (OSError(errno.ENOSPC, "No space left on device"), Strategy.WAIT_AND_RETRY),
        (ValueError("bad input"), Strategy.MANUAL_INTERVENTION),
        (KeyError("missing"), Strategy.MANUAL_INTERVENTION),
        (OSError(errno.ENOENT, "No such file"), Strategy.MANUAL_INTERVENTION),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classify_chooses_by_exception_type(error: BaseException, strategy: Strategy) -> None:
    assert classify(error) == strategy


@pytest.mark.parametrize(
    ("message", "strategy"),
    [
        ("connection reset", Strategy.RETRY_WITH_BACKOFF),
        ("DNS lookup failed", Strategy.RETRY_WITH_BACKOFF),
        ("operation timed out", Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        ("out of memory", Strategy.WAIT_AND_RETRY),
        ("resource temporarily exhausted", Strategy.WAIT_AND_RETRY),
        ("something odd happened", Strategy.MANUAL_INTERVENTION),
    ],
)
def test_classify_falls_back_to_the_message_for_untyped_errors(
    message: str, strategy: Strategy
) -> None:
    assert classify(Exception(message)) == strategy


@pytest.mark.parametrize(
    ("error", "strategy"),
    [
        (ConnectionError("request timed out"), Strategy.RETRY_WITH_BACKOFF),
        (TimeoutError("connection refused"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (MemoryError("network buffer"), Strategy.WAIT_AND_RETRY),
    ],
)
def test_classify_lets_the_type_win_over_the_message(
    error: BaseException, strategy: Strategy
) -> None:
    assert classify(error) == strategy


# -- decide: delays, timeouts, exhaustion ----------------------------------------------------


def test_backoff_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = Retry(max_attempts=10, initial_delay=0.5, backoff_factor=2.0, max_delay=3.0, jitter=0)
    delays = [decide(ConnectionError(), policy, n, None).delay for n in range(1, 6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_jitter_adds_at_most_its_fraction_and_never_passes_the_cap() -> None:
    policy = Retry(max_attempts=10, initial_delay=1.0, backoff_factor=2.0, jitter=0.25, max_delay=3)
    rng = random.Random(7)
    first = [decide(ConnectionError(), policy, 1, None, rng).delay for _ in range(200)]
    assert all(1.0 <= d <= 1.25 for d in first)
    assert len(set(first)) > 100  # really random, not a constant
    capped = [decide(ConnectionError(), policy, 3, None, rng).delay for _ in range(50)]
    assert all(d == 3.0 for d in capped)


def test_wait_and_retry_uses_a_fixed_delay_and_keeps_the_timeout() -> None:
    policy = Retry(max_attempts=5, wait_delay=2.5)
    decisions = [decide(MemoryError(), policy, n, 4.0) for n in (1, 2, 3)]
    assert [(d.strategy, d.retry, d.delay, d.timeout) for d in decisions] == [
        (Strategy.WAIT_AND_RETRY, True, 2.5, 4.0)
    ] * 3


def test_increased_timeout_grows_by_its_factor_and_is_capped() -> None:
    policy = Retry(max_attempts=5, timeout_factor=3.0, max_timeout=5.0)
    first = decide(TimeoutError(), policy, 1, 1.0)
    second = decide(TimeoutError(), policy, 2, first.timeout)
    assert (first.retry, first.delay, first.timeout) == (True, 0.0, 3.0)
    assert second.timeout == 5.0
    assert decide(TimeoutError(), policy, 1, None).timeout is None


def test_retries_are_exhausted_after_max_attempts() -> None:
    policy = Retry(max_attempts=3, jitter=0)
    assert decide(ConnectionError(), policy, 2, None).retry
    last = decide(ConnectionError(), policy, 3, None)
    assert not last.retry
    assert last.strategy == Strategy.RETRY_WITH_BACKOFF
    assert "3 attempts exhausted" in last.reason


def test_manual_intervention_never_retries() -> None:
    decision = decide(ValueError("bad"), Retry(max_attempts=10), 1, None)
    assert (decision.strategy, decision.retry) == (Strategy.MANUAL_INTERVENTION, False)


def test_a_forced_strategy_overrides_classification() -> None:
    waited = decide(ValueError("bad"), Retry(strategy="wait_and_retry", wait_delay=1.5), 1, None)
    assert (waited.strategy, waited.retry, waited.delay) == (Strategy.WAIT_AND_RETRY, True, 1.5)
    manual = decide(ConnectionError(), Retry(strategy=Strategy.MANUAL_INTERVENTION), 1, None)
    assert not manual.retry


def test_retry_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        Retry(max_attempts=0)
    with pytest.raises(ValueError, match="must not be negative"):
        Retry(initial_delay=-1)
    with pytest.raises(ValueError):
        Retry(strategy="pray")  # type: ignore[arg-type]


# -- strategies on real runs -----------------------------------------------------------------


def test_a_flaky_network_step_is_retried_with_backoff_until_it_succeeds(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    app = timed_app
    calls = Counter[str]()

    def fetch() -> str:
        calls["fetch"] += 1
        if calls["fetch"] < 3:
            raise ConnectionResetError("connection reset by peer")
        return "page"

    policy = Retry(max_attempts=5, initial_delay=10, backoff_factor=3.0, jitter=0)

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(fetch, retry=policy))

    register(app, flavor, "crawler", handler)
    active_agent(app, "crawler", "c1")
    run = app.submit("c1")
    first_retry, second_retry = later(clock, 10), later(clock, 40)

    park(app, run)
    assert calls["fetch"] == 1
    assert run.info().wake_at == first_retry
    stays_waiting(app, run)
    assert calls["fetch"] == 1

    clock.advance(10)
    park(app, run, times=2)
    assert calls["fetch"] == 2
    assert run.info().wake_at == second_retry

    clock.advance(30)
    app.work(**WORK)

    assert run.result(timeout=1) == "page"
    assert calls["fetch"] == 3
    plan = scheduled(app, run.run_id)
    assert [(p["strategy"], p["delay"], p["next_attempt"]) for p in plan] == [
        ("retry_with_backoff", 10, 2),
        ("retry_with_backoff", 30, 3),
    ]
    assert waited(app, run.run_id) == [("retry", first_retry), ("retry", second_retry)]
    failed = app.events(run_id=run.run_id, types=["step.failed"])
    assert [e.data["error_type"] for e in failed] == ["ConnectionResetError"] * 2
    [step] = app.run_steps(run.run_id)
    assert (step.status, step.attempts, step.output, step.error) == (
        StepStatus.COMPLETED,
        3,
        "page",
        None,
    )


def test_a_slow_step_is_retried_at_once_with_a_longer_timeout(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()
    release = threading.Event()

    def slow() -> str:
        calls["slow"] += 1
        if calls["slow"] == 1:
            release.wait(10)  # past its deadline, and still running when the retry starts
        return "done"

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(slow, timeout=0.1, retry=Retry(max_attempts=3)))

    register(app, flavor, "slowpoke", handler)
    active_agent(app, "slowpoke", "s1")
    run = app.submit("s1")
    try:
        app.work(**WORK)
    finally:
        release.set()

    assert run.result(timeout=1) == "done"
    assert calls["slow"] == 2
    [plan] = scheduled(app, run.run_id)
    assert plan["strategy"] == "retry_with_increased_timeout"
    assert plan["delay"] == 0
    assert plan["timeout"] == pytest.approx(0.2)
    assert waited(app, run.run_id) == []  # at once: the run never parked
    [failed] = app.events(run_id=run.run_id, types=["step.failed"])
    assert failed.data["error_type"] == "StepTimeout"
    # A sync body cannot be stopped: the event says the retry started while it still ran.
    assert failed.data["abandoned_attempt_running"] is True
    assert app.run_steps(run.run_id)[0].attempts == 2


def test_a_resource_error_waits_the_fixed_delay(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    app = timed_app
    calls = Counter[str]()

    def allocate() -> int:
        calls["allocate"] += 1
        if calls["allocate"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return 1

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(allocate, retry=Retry(wait_delay=30, initial_delay=600)))

    register(app, flavor, "hog", handler)
    active_agent(app, "hog", "h1")
    run = app.submit("h1")
    retry_at = later(clock, 30)

    park(app, run)
    assert run.info().wake_at == retry_at
    clock.advance(30)
    app.work(**WORK)

    assert run.result(timeout=1) == 1
    assert calls["allocate"] == 2
    [plan] = scheduled(app, run.run_id)
    assert (plan["strategy"], plan["delay"]) == ("wait_and_retry", 30)
    assert waited(app, run.run_id) == [("retry", retry_at)]
    claims = app.events(run_id=run.run_id, types=["run.claimed"])
    assert len(claims) == 2  # the delay parked the run; a second claim resumed it


def test_an_unclassified_error_goes_straight_to_a_person(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()

    def parse() -> None:
        calls["parse"] += 1
        raise ValueError("unexpected field 'foo'")

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(parse, retry=Retry(max_attempts=5))
        calls["after"] += 1

    register(app, flavor, "parser", handler)
    active_agent(app, "parser", "p1")
    run = app.submit("p1")
    app.work(**WORK)

    assert app.get_run(run.run_id).status == RunStatus.NEEDS_ATTENTION
    assert calls == Counter(parse=1)
    assert scheduled(app, run.run_id) == []
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert (incident.kind, incident.seq) == ("step_failed", 1)
    assert incident.error["type"] == "ValueError"
    assert incident.error["strategy"] == "manual_intervention"
    assert "unexpected field" in incident.error["message"]
    assert handed_over(app, run.run_id) == ["step.failed", "incident.opened"]


def test_exhausted_retries_become_an_incident(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    app = timed_app
    calls = Counter[str]()

    def unreachable() -> None:
        calls["unreachable"] += 1
        raise ConnectionRefusedError("connection refused")

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(unreachable, retry=Retry(max_attempts=3, initial_delay=5, jitter=0))

    register(app, flavor, "stubborn", handler)
    active_agent(app, "stubborn", "s1")
    run = app.submit("s1")
    park(app, run)
    clock.advance(5)
    park(app, run, times=2)
    clock.advance(10)
    app.work(**WORK)

    assert app.get_run(run.run_id).status == RunStatus.NEEDS_ATTENTION
    assert calls["unreachable"] == 3
    assert [p["delay"] for p in scheduled(app, run.run_id)] == [5, 10]
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "step_failed"
    assert incident.error["reason"] == "3 attempts exhausted"
    assert incident.error["strategy"] == "retry_with_backoff"
    assert handed_over(app, run.run_id) == ["step.failed"] * 3 + ["incident.opened"]


def test_retry_policy_precedence_is_step_then_agent_type_then_app(
    db_url: str, clock: FakeClock, flavor: str
) -> None:
    """Three runs fail once with a network error; the delay tells whose policy was used."""
    app = tether.App(db_url, clock=clock, retry=Retry(initial_delay=11, jitter=0))
    try:
        failures = Counter[str]()

        def flaky(key: str) -> str:
            failures[key] += 1
            if failures[key] == 1:
                raise ConnectionError("network is unreachable")
            return key

        def plain(ctx: Any, task: Any) -> Any:
            return (yield ctx.step(flaky, "plain"))

        def typed(ctx: Any, task: Any) -> Any:
            if task == "own":
                return (yield ctx.step(flaky, "own", retry=Retry(initial_delay=33, jitter=0)))
            return (yield ctx.step(flaky, "typed"))

        register(app, flavor, "plain", plain)
        register(app, flavor, "typed", typed, retry=Retry(initial_delay=22, jitter=0))
        active_agent(app, "plain", "a1")
        active_agent(app, "typed", "b1")
        active_agent(app, "typed", "b2")
        runs = {
            "app": app.submit("a1", "x"),
            "agent type": app.submit("b1", "typed"),
            "step": app.submit("b2", "own"),
        }
        work_until(app, lambda: all(r.status() == RunStatus.WAITING for r in runs.values()))

        wake = {level: r.info().wake_at for level, r in runs.items()}
        assert wake == {
            "app": later(clock, 11),
            "agent type": later(clock, 22),
            "step": later(clock, 33),
        }
        clock.advance(33)
        app.work(**WORK)

        delays = {
            level: [p["delay"] for p in scheduled(app, r.run_id)] for level, r in runs.items()
        }
        assert delays == {"app": [11], "agent type": [22], "step": [33]}
        assert all(r.status() == RunStatus.COMPLETED for r in runs.values())
    finally:
        app.close()


def test_a_retry_delay_is_a_durable_timer_not_a_sleeping_thread(
    timed_app: tether.App, clock: FakeClock, flavor: str
) -> None:
    app = timed_app
    calls = Counter[str]()

    def call_api() -> str:
        calls["api"] += 1
        if calls["api"] == 1:
            raise ConnectionError("connection reset")
        return "ok"

    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(call_api, retry=Retry(initial_delay=30, jitter=0)))

    register(app, flavor, "patient", handler)
    active_agent(app, "patient", "p1")
    run = app.submit("p1")
    retry_at = later(clock, 30)
    baseline = threading.active_count()
    park(app, run)  # the first attempt only

    info = app.get_run(run.run_id)
    assert info.wake_at == retry_at
    assert info.owner is None
    assert calls["api"] == 1
    [step] = app.run_steps(run.run_id)
    assert step.status == StepStatus.FAILED
    assert dt.datetime.fromisoformat(step.error["retry_at"]) == retry_at
    assert step.error["delay"] == 30
    assert waited(app, run.run_id) == [("retry", retry_at)]
    # Nothing in this process is holding the run: the worker's threads all went away.
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= baseline
    stays_waiting(app, run)
    assert calls["api"] == 1

    clock.advance(30)
    app.work(**WORK)
    assert run.result(timeout=1) == "ok"
    assert calls["api"] == 2


# -- incidents: a person's decision ----------------------------------------------------------


@pytest.fixture
def broken(app: tether.App, flavor: str) -> dict[str, Any]:
    """A run stuck on a step that raised ``ValueError`` once, and counters around it."""
    calls = Counter[str]()
    fixed = {"value": False}
    received: list[Any] = []

    def risky() -> str:
        calls["risky"] += 1
        if not fixed["value"]:
            raise ValueError("the model returned garbage")
        return "fine"

    def handler(ctx: Any, task: Any) -> Any:
        out = yield ctx.step(risky)
        received.append(out)
        return {"risky": out}

    register(app, flavor, "fragile", handler)
    active_agent(app, "fragile", "f1")
    run = app.submit("f1")
    app.work(**WORK)
    assert run.status() == RunStatus.NEEDS_ATTENTION
    [incident] = app.incidents(status="open", run_id=run.run_id)
    return {
        "run": run,
        "incident": incident,
        "calls": calls,
        "fixed": fixed,
        "received": received,
    }


def test_resolving_with_retry_runs_the_failed_step_again(
    app: tether.App, broken: dict[str, Any], flavor: str
) -> None:
    broken["fixed"]["value"] = True
    resolved = app.resolve_incident(broken["incident"].incident_id, "retry", actor="ops")
    assert (resolved.status.value, resolved.resolution, resolved.resolved_by) == (
        "resolved",
        "retry",
        "ops",
    )
    app.work(**WORK)

    assert broken["run"].result(timeout=1) == {"risky": "fine"}
    assert broken["calls"]["risky"] == 2
    assert app.incidents(status="open", run_id=broken["run"].run_id) == []


def test_resolving_with_skip_hands_the_supplied_output_to_the_handler(
    app: tether.App, broken: dict[str, Any], flavor: str
) -> None:
    app.resolve_incident(broken["incident"].incident_id, "skip", output={"manual": True})
    app.work(**WORK)

    assert broken["run"].result(timeout=1) == {"risky": {"manual": True}}
    assert broken["received"] == [{"manual": True}]
    assert broken["calls"]["risky"] == 1
    [step] = app.run_steps(broken["run"].run_id)
    assert (step.status, step.output) == (StepStatus.COMPLETED, {"manual": True})


def test_resolving_with_abort_fails_the_run(
    app: tether.App, broken: dict[str, Any], flavor: str
) -> None:
    app.resolve_incident(broken["incident"].incident_id, "abort", comment="not worth it")
    app.work(**WORK)

    info = broken["run"].info()
    assert info.status == RunStatus.FAILED
    assert info.error is not None
    assert info.error["type"] == "Aborted"
    assert info.error["message"] == "not worth it"
    assert broken["calls"]["risky"] == 1
    with pytest.raises(tether.RunFailed):
        broken["run"].result(timeout=1)


def test_an_incident_cannot_be_resolved_twice(
    app: tether.App, broken: dict[str, Any], flavor: str
) -> None:
    incident_id = broken["incident"].incident_id
    app.resolve_incident(incident_id, "abort")
    with pytest.raises(tether.Refused, match="already resolved"):
        app.resolve_incident(incident_id, "retry")
    assert app.get_incident(incident_id).resolution == "abort"
    assert broken["run"].status() == RunStatus.FAILED


def test_retry_run_resolves_the_open_incident_and_the_run_completes(
    app: tether.App, broken: dict[str, Any], flavor: str
) -> None:
    broken["fixed"]["value"] = True
    incident = app.retry_run(broken["run"].run_id)
    assert incident.incident_id == broken["incident"].incident_id
    assert incident.resolution == "retry"
    app.work(**WORK)

    assert broken["run"].result(timeout=1) == {"risky": "fine"}
    with pytest.raises(tether.Refused, match="no open incident"):
        app.retry_run(broken["run"].run_id)
