"""Forking a run from a step (SQLite and PostgreSQL): what runs again, what does not.

The agent under test runs five steps and every step function counts its own executions, so
"the fork reuses the journal up to step N" is checked against the functions themselves, not
against what tether reports about them. Every test that runs the agent runs it as a sync and as
an async handler (``tests/flavors.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.testing import active_agent
from tether.types import RunStatus, StepStatus

TIMEOUT = 20.0


def work(app: tether.App) -> None:
    """Run a worker until nothing can progress without a person (bounded, so a bug fails)."""
    app.work(until_idle=True, timeout=TIMEOUT)


STEPS = ("s1", "s2", "s3", "s4", "s5")


def register_five_steps(app: tether.App, flavor: str) -> Counter[str]:
    """Register ``five``: five steps named s1..s5, each counted per execution.

    Before each step the handler appends ``"<tag>:<step>"`` to ``ctx.state["trail"]``, so the
    change is committed with that step and recorded as the state version of its journal entry.
    Each step returns ``"<tag>:<step>"`` too, and the run returns the five outputs.
    """
    calls = Counter[str]()

    def make(name: str) -> Any:
        def body(tag: str) -> str:
            calls[name] += 1
            return f"{tag}:{name}"

        return body

    bodies = {name: make(name) for name in STEPS}

    def handler(ctx: Any, task: dict[str, str]) -> Any:
        outputs = []
        for name in STEPS:
            ctx.state.setdefault("trail", []).append(f"{task['tag']}:{name}")
            outputs.append((yield ctx.step(bodies[name], task["tag"], name=name)))
        return outputs

    register(app, flavor, "five", handler)
    return calls


def finished_original(app: tether.App, flavor: str) -> tuple[Counter[str], str]:
    """A completed five-step run of task ``{"tag": "a"}`` on agent ``f1``."""
    calls = register_five_steps(app, flavor)
    active_agent(app, "five", "f1")
    run = app.submit("f1", {"tag": "a"})
    work(app)
    assert run.result(timeout=1) == [f"a:{name}" for name in STEPS]
    assert calls == Counter(dict.fromkeys(STEPS, 1))
    return calls, run.run_id


@pytest.mark.parametrize("from_step", [0, 2, 5])
def test_fork_executes_only_the_steps_after_from_step(
    app: tether.App, flavor: str, from_step: int
) -> None:
    calls, original = finished_original(app, flavor)

    fork = app.fork(original, from_step=from_step)
    work(app)

    assert fork.result(timeout=1) == [f"a:{name}" for name in STEPS]
    kept, redone = STEPS[:from_step], STEPS[from_step:]
    assert calls == Counter({**dict.fromkeys(kept, 1), **dict.fromkeys(redone, 2)})
    assert [(s.seq, s.name, s.status) for s in app.run_steps(fork.run_id)] == [
        (i, name, StepStatus.COMPLETED) for i, name in enumerate(STEPS, start=1)
    ]


@pytest.mark.parametrize("from_step", [0, 2, 5])
def test_fork_records_where_it_came_from(app: tether.App, flavor: str, from_step: int) -> None:
    _, original = finished_original(app, flavor)

    fork = app.fork(original, from_step=from_step)

    info = fork.info()
    assert (info.forked_from, info.forked_at_step) == (original, from_step)
    assert info.status == RunStatus.PENDING
    [submitted] = [e for e in app.timeline(fork.run_id) if e.type == "run.submitted"]
    assert submitted.data["forked_from"] == original
    assert submitted.data["from_step"] == from_step


def test_fork_leaves_the_original_run_untouched(app: tether.App, flavor: str) -> None:
    _, original = finished_original(app, flavor)
    run_before = app.get_run(original)
    steps_before = app.run_steps(original)
    events_before = app.timeline(original)

    fork = app.fork(original, from_step=2)
    work(app)
    fork.result(timeout=1)

    assert app.get_run(original) == run_before
    assert app.run_steps(original) == steps_before
    assert app.timeline(original) == events_before


def test_fork_with_a_new_task_uses_it_for_the_re_executed_steps(
    app: tether.App, flavor: str
) -> None:
    calls, original = finished_original(app, flavor)

    fork = app.fork(original, from_step=3, task={"tag": "b"})
    work(app)

    # Steps 1..3 come from the original's journal (task "a"); 4 and 5 run with the new task.
    assert fork.result(timeout=1) == ["a:s1", "a:s2", "a:s3", "b:s4", "b:s5"]
    assert fork.info().input == {"tag": "b"}
    assert calls == Counter(s1=1, s2=1, s3=1, s4=2, s5=2)


@pytest.mark.parametrize("from_step", [0, 2])
def test_fork_continues_from_the_agent_state_as_of_from_step(
    app: tether.App, flavor: str, from_step: int
) -> None:
    _, original = finished_original(app, flavor)
    # Move the agent's state away from anything the original run wrote: if the fork started
    # from the agent's current state instead of the state as of step N, "outside" would show.
    app.set_state("f1", {"trail": ["outside"]})

    fork = app.fork(original, from_step=from_step, task={"tag": "b"})
    work(app)
    fork.result(timeout=1)

    # While replaying steps 1..N the handler appends "b:sK", but each replayed step puts back
    # the state version the original journal recorded for it, so the first N entries are the
    # original's ("a:..."). Steps N+1..5 then append to that state and commit it as new
    # versions: the trail is the original's prefix up to N followed by the re-executed steps.
    expected = [f"a:{name}" for name in STEPS[:from_step]]
    expected += [f"b:{name}" for name in STEPS[from_step:]]
    assert app.get_agent("f1").state == {"trail": expected}
    assert app.state_versions("f1")[-1].run_id == fork.run_id


def test_fork_from_the_last_step_leaves_the_agent_in_the_state_of_that_step(
    app: tether.App, flavor: str
) -> None:
    _, original = finished_original(app, flavor)
    app.set_state("f1", {"trail": ["outside"]})

    fork = app.fork(original, from_step=5)
    work(app)
    fork.result(timeout=1)

    # Nothing is re-executed, but the fork ran with the state as of step 5; the agent's state
    # must be the one the fork ended with, not whatever was current when it was forked.
    assert app.get_agent("f1").state == {"trail": [f"a:{name}" for name in STEPS]}


def runs_count(app: tether.App) -> int:
    return app.store.count_rows(["runs"])["runs"]


@pytest.mark.parametrize("from_step", [6, 99])
def test_fork_past_the_last_finished_step_is_refused(
    app: tether.App, flavor: str, from_step: int
) -> None:
    _, original = finished_original(app, flavor)
    before = runs_count(app)

    with pytest.raises(tether.Refused, match=r"finished steps are 1\.\.5"):
        app.fork(original, from_step=from_step)

    assert runs_count(app) == before


def test_fork_from_a_negative_step_is_refused(app: tether.App, flavor: str) -> None:
    _, original = finished_original(app, flavor)
    before = runs_count(app)

    with pytest.raises(tether.Refused, match="from step -1"):
        app.fork(original, from_step=-1)

    assert runs_count(app) == before


def test_fork_past_a_failed_step_is_refused(app: tether.App, flavor: str) -> None:
    def ok() -> str:
        return "ok"

    def broken() -> str:
        raise ValueError("no strategy fixes this")

    def handler(ctx: Any, task: Any) -> Any:
        yield ctx.step(ok)
        yield ctx.step(broken, retry=tether.Retry(max_attempts=1))

    register(app, flavor, "breaks", handler)
    active_agent(app, "breaks", "b1")
    run = app.submit("b1")
    work(app)
    assert run.status() == RunStatus.NEEDS_ATTENTION
    before = runs_count(app)

    with pytest.raises(tether.Refused, match=r"finished steps are 1\.\.1"):
        app.fork(run.run_id, from_step=2)

    assert runs_count(app) == before
    assert app.fork(run.run_id, from_step=1).info().forked_at_step == 1


def test_fork_of_a_run_that_never_started_is_refused(app: tether.App) -> None:
    register_five_steps(app, "sync")  # never executed: no worker runs here
    active_agent(app, "five", "f1")
    # No worker runs in this test, so the run stays pending; the agent stays active so the
    # refusal cannot come from "only an active agent starts runs".
    pending = app.submit("f1", {"tag": "a"})
    before = runs_count(app)

    with pytest.raises(tether.Refused, match="never started"):
        app.fork(pending.run_id, from_step=0)

    assert runs_count(app) == before
    assert pending.status() == RunStatus.PENDING


def test_fork_of_an_unknown_run_is_not_found(app: tether.App) -> None:
    register_five_steps(app, "sync")  # never executed: no run starts here
    active_agent(app, "five", "f1")
    before = runs_count(app)

    with pytest.raises(tether.NotFound, match="run_missing"):
        app.fork("run_missing", from_step=0)

    assert runs_count(app) == before
