"""``tether.testing``, the kit for users' own tests: what it promises when things go wrong.

The rest of the suite uses the kit for its everyday path; these tests pin down the failures a
user must see plainly instead of a hanging test or a silent pass.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import tether
from tether.context import RunContext
from tether.lifecycle import LifecycleState
from tether.testing import active_agent, background_worker, work_until
from tether.types import RunStatus


@pytest.fixture
def napper(app: tether.App) -> tether.App:
    """An app with agent type ``napper``, whose runs sleep for an hour."""

    @app.agent("napper")
    def handle(ctx: RunContext, task: Any) -> None:
        ctx.sleep(3600)

    return app


def worker_threads() -> list[threading.Thread]:
    """The kit's worker threads still alive."""
    return [t for t in threading.enumerate() if t.name == "tether-testing-worker"]


def test_active_agent_creates_an_active_agent_with_its_config(napper: tether.App) -> None:
    info = active_agent(napper, "napper", "n1", {"model": "small"})

    assert (info.agent_id, info.lifecycle, info.config) == (
        "n1",
        LifecycleState.ACTIVE,
        {"model": "small"},
    )
    assert [e.action for e in napper.agent_history("n1")] == ["create", "initialize", "activate"]


def test_work_until_stops_the_worker_once_the_condition_holds(napper: tether.App) -> None:
    active_agent(napper, "napper", "n1")
    run = napper.submit("n1")

    work_until(napper, lambda: run.status() == RunStatus.WAITING)

    assert run.status() == RunStatus.WAITING
    assert not worker_threads()


def test_work_until_raises_timeout_error_naming_the_condition(napper: tether.App) -> None:
    active_agent(napper, "napper", "n1")
    napper.submit("n1")

    def run_completed() -> bool:
        return False

    with pytest.raises(TimeoutError, match=r"run_completed did not hold within 0\.3s"):
        work_until(napper, run_completed, timeout=0.3)
    assert not worker_threads()


@pytest.mark.timeout(60)
def test_a_failing_worker_is_raised_in_the_test_not_hidden_behind_a_timeout(
    napper: tether.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(napper.store, "claim_runs", unreachable)

    # Raised when the worker died: the condition's timeout is far past the test's own.
    with pytest.raises(RuntimeError, match="the database went away"):
        work_until(napper, lambda: False, timeout=3600)


def test_background_worker_is_stopped_and_joined_when_the_block_ends(napper: tether.App) -> None:
    with background_worker(napper) as worker:
        assert not worker.stopping
        assert worker_threads()

    assert worker.stopping
    assert not worker_threads()
