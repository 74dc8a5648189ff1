"""Replay is checked: a handler that asks for a different call than its journal holds becomes
an incident with ``NonDeterminismError``, never a silent divergence (SQLite and PostgreSQL).

Each test runs a handler up to a sleep, "deploys" different code while the run is parked (a
flag the handler reads), and lets the replay meet the journal. Every test runs for a sync and an
async handler (``tests/flavors.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.app import RunHandle
from tether.testing import active_agent, work_until
from tether.types import RunStatus

WORK = {"until_idle": True, "timeout": 20.0}
PARK = 0.3
"""How long a run sleeps while the test changes its code; far longer than one worker pass."""


class Deployable:
    """An agent type whose code changes with ``version``, counting what really executes."""

    def __init__(self, app: tether.App, flavor: str, *, swallow: bool = False) -> None:
        self.version = 1
        self.calls = Counter[str]()
        calls = self.calls

        def a() -> str:
            calls["a"] += 1
            return "a"

        def b() -> str:
            calls["b"] += 1
            return "b"

        def c(first: str) -> str:
            calls["c"] += 1
            return first + "c"

        def handler(ctx: Any, task: Any) -> Any:
            calls["handler"] += 1
            try:
                if self.version == 2:
                    first = yield ctx.step(b, name="b")
                else:
                    first = yield ctx.step(a, name="a")
            except Exception:
                if not swallow:
                    raise
                first = "swallowed"  # a careless handler: the divergence must still surface
            yield ctx.sleep(PARK)
            if self.version == 3:
                return first  # v3 drops the last step: replay is fine, the journal ends early
            return (yield ctx.step(c, first, name="c"))

        register(app, flavor, "deployable", handler)
        active_agent(app, "deployable", "d1")


def park(app: tether.App, agent: Deployable) -> RunHandle:
    """Submit a run and execute it up to its sleep with the current code."""
    run = app.submit("d1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)  # the sleep is not due yet
    assert agent.calls == Counter(handler=1, a=1)
    return run


def test_a_changed_control_flow_becomes_a_non_determinism_incident(
    app: tether.App, flavor: str
) -> None:
    agent = Deployable(app, flavor)
    run = park(app, agent)

    agent.version = 2  # the new code asks for step b where the journal holds step a
    app.work(**WORK)

    info = run.info()
    assert info.status == RunStatus.NEEDS_ATTENTION
    assert agent.calls == Counter(handler=2, a=1)  # neither b nor c ran
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert (incident.kind, incident.seq) == ("non_determinism", 1)
    assert incident.error["type"] == "NonDeterminismError"
    assert (incident.error["expected"], incident.error["got"]) == ("step a", "step b")
    message = incident.error["message"]
    assert "the journal holds 'step a' but the handler asked for 'step b'" in message
    assert "retry the incident" in message
    assert "skip" not in message  # skipping a non-determinism incident is refused
    assert [s.name for s in app.run_steps(run.run_id)] == ["a", "sleep"]


def test_a_handler_that_swallows_the_divergence_still_becomes_an_incident(
    app: tether.App, flavor: str
) -> None:
    agent = Deployable(app, flavor, swallow=True)
    run = park(app, agent)

    agent.version = 2
    app.work(**WORK)

    assert run.status() == RunStatus.NEEDS_ATTENTION
    assert agent.calls == Counter(handler=2, a=1)
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "non_determinism"
    assert (incident.error["expected"], incident.error["got"]) == ("step a", "step b")


def test_a_handler_that_swallows_the_divergence_and_returns_still_becomes_an_incident(
    app: tether.App, flavor: str
) -> None:
    """Even when the handler returns without another journaled call, nothing is committed."""
    calls = Counter[str]()
    code = {"version": 1}

    def step_a() -> str:
        calls["a"] += 1
        return "a"

    def step_b() -> str:
        calls["b"] += 1
        return "b"

    def handler(ctx: Any, task: Any) -> Any:
        if code["version"] == 1:
            yield ctx.step(step_a, name="a")
            yield ctx.sleep(PARK)
            return "v1"
        try:
            yield ctx.step(step_b, name="b")
        except Exception:
            pass
        return "v2"

    register(app, flavor, "careless", handler)
    active_agent(app, "careless", "k1")
    run = app.submit("k1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)

    code["version"] = 2
    app.work(**WORK)

    info = run.info()
    assert info.status == RunStatus.NEEDS_ATTENTION
    assert info.result is None
    assert calls == Counter(a=1)
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.kind == "non_determinism"


def test_retrying_after_restoring_the_code_completes_the_run(app: tether.App, flavor: str) -> None:
    agent = Deployable(app, flavor)
    run = park(app, agent)
    agent.version = 2
    app.work(**WORK)
    [incident] = app.incidents(status="open", run_id=run.run_id)

    agent.version = 1  # roll back
    app.resolve_incident(incident.incident_id, "retry")
    app.work(**WORK)

    assert run.result(timeout=1) == "ac"
    assert agent.calls == Counter(handler=3, a=1, c=1)  # a was replayed, never re-executed
    assert app.incidents(status="open", run_id=run.run_id) == []


def test_retrying_without_restoring_the_code_opens_a_new_incident(
    app: tether.App, flavor: str
) -> None:
    agent = Deployable(app, flavor)
    run = park(app, agent)
    agent.version = 2
    app.work(**WORK)
    [first] = app.incidents(status="open", run_id=run.run_id)

    app.resolve_incident(first.incident_id, "retry")
    app.work(**WORK)

    assert run.status() == RunStatus.NEEDS_ATTENTION
    [second] = app.incidents(status="open", run_id=run.run_id)
    assert second.incident_id != first.incident_id
    assert second.kind == "non_determinism"
    assert agent.calls["b"] == 0


def test_skipping_a_non_determinism_incident_is_refused(app: tether.App, flavor: str) -> None:
    agent = Deployable(app, flavor)
    run = park(app, agent)
    agent.version = 2
    app.work(**WORK)
    [incident] = app.incidents(status="open", run_id=run.run_id)

    with pytest.raises(tether.Refused, match="non-determinism"):
        app.resolve_incident(incident.incident_id, "skip", output="b")
    assert app.get_incident(incident.incident_id).status.value == "open"
    assert run.status() == RunStatus.NEEDS_ATTENTION

    app.resolve_incident(incident.incident_id, "abort")
    assert run.status() == RunStatus.FAILED


def test_code_that_ends_before_the_journal_does_is_not_a_divergence(
    app: tether.App, flavor: str
) -> None:
    agent = Deployable(app, flavor)
    run = park(app, agent)

    agent.version = 3  # same calls up to the sleep, then returns without step c
    app.work(**WORK)

    assert run.result(timeout=1) == "a"
    assert agent.calls == Counter(handler=2, a=1)


def test_a_different_kind_of_call_at_the_same_position_is_a_divergence(
    app: tether.App, flavor: str
) -> None:
    code = {"version": 1}
    calls = Counter[str]()

    def fetch() -> str:
        calls["fetch"] += 1
        return "x"

    def handler(ctx: Any, task: Any) -> Any:
        if code["version"] == 1:
            yield ctx.step(fetch, name="fetch")
        else:
            ctx.now()  # the new code reads the clock where the journal holds a step
        yield ctx.sleep(PARK)
        return "done"

    register(app, flavor, "shifty", handler)
    active_agent(app, "shifty", "s1")
    run = app.submit("s1")
    work_until(app, lambda: run.status() == RunStatus.WAITING)
    code["version"] = 2
    app.work(**WORK)

    assert run.status() == RunStatus.NEEDS_ATTENTION
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert (incident.error["expected"], incident.error["got"]) == ("step fetch", "now now")
    assert calls["fetch"] == 1
