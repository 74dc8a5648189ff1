"""Checkpoints, restore and state history on a real database (SQLite and PostgreSQL).

A checkpoint is a named copy of an agent's state; restoring it writes that copy as a new state
version, so history only ever grows. Restoring under a running run is refused, because the
run's next commit would write over the restored state. Every test that runs a handler runs it
for a sync and an async one (``tests/flavors.py``); the others never start a run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import tether
from tests.flavors import register
from tether.context import RunContext
from tether.lifecycle import LifecycleState
from tether.testing import active_agent
from tether.types import RunStatus

TIMEOUT = 20.0


def work(app: tether.App) -> None:
    """Run a worker until nothing can progress without a person (bounded, so a bug fails)."""
    app.work(until_idle=True, timeout=TIMEOUT)


DEEP = {
    "notes": ["first", {"nested": [1, 2.5, -3, None, True, False, [], {}]}],
    "unicode": 'naïve café, 日本語, 🦉, "quoted", \\ back, \u2028 end',
    "numbers": {"int": 2**53 + 1, "negative": -7, "float": 0.1, "zero": 0, "exp": 1e-300},
    "empty": {},
    "keys with spaces / slashes ~ tildes": {"": "empty key"},
}


def exact(doc: Any) -> str:
    """A canonical text: ``1`` and ``1.0``, or ``True`` and ``1``, compare different."""
    return json.dumps(doc, sort_keys=True, ensure_ascii=False)


@pytest.fixture
def plain(app: tether.App) -> str:
    """An active agent ``p1`` for tests that start no run (so its handler never executes)."""

    @app.agent("plain")
    def handle(ctx: RunContext, task: Any) -> None:
        return None

    return active_agent(app, "plain", "p1").agent_id


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


@contextmanager
def worker_in_background(app: tether.App) -> Iterator[threading.Thread]:
    """``app.work(until_idle=True)`` on a thread; joined (and checked) on the way out."""
    thread = threading.Thread(
        target=app.work, kwargs={"until_idle": True, "timeout": TIMEOUT}, daemon=True
    )
    thread.start()
    try:
        yield thread
    finally:
        thread.join(25)
        assert not thread.is_alive(), "the worker did not finish"


# -- checkpoint, change, restore ---------------------------------------------------------------


def test_restore_gives_back_exactly_the_checkpointed_state(app: tether.App, plain: str) -> None:
    app.set_state(plain, DEEP)
    ckpt = app.checkpoint(plain, "before-edits")
    app.set_state(plain, {"replaced": True})
    app.patch_state(plain, {"replaced": None, "numbers": {"int": 1}})

    info = app.restore(ckpt.checkpoint_id)

    assert exact(info.state) == exact(DEEP)
    assert exact(app.get_agent(plain).state) == exact(DEEP)
    assert exact(app.get_checkpoint(ckpt.checkpoint_id).state) == exact(DEEP)


def test_restore_writes_a_new_version_and_keeps_the_old_ones(app: tether.App, plain: str) -> None:
    app.set_state(plain, DEEP)
    ckpt = app.checkpoint(plain, "good")
    changed = app.set_state(plain, {"broken": True})
    patched = app.patch_state(plain, {"also": [1]})

    info = app.restore(ckpt.checkpoint_id)

    assert ckpt.version < changed.version < patched.version < info.version
    assert info.version == patched.version + 1
    by_version = {v.version: v for v in app.state_versions(plain)}
    assert exact(by_version[ckpt.version].state) == exact(DEEP)
    assert by_version[changed.version].state == {"broken": True}
    assert by_version[patched.version].state == {"broken": True, "also": [1]}
    restored = by_version[info.version]
    assert exact(restored.state) == exact(DEEP)
    assert ckpt.checkpoint_id in restored.reason and "restore" in restored.reason


def test_restore_is_recorded_as_an_event(app: tether.App, plain: str) -> None:
    ckpt = app.checkpoint(plain, "good")
    app.set_state(plain, {"x": 1})

    info = app.restore(ckpt.checkpoint_id, actor="alice")

    [event] = app.events(agent_id=plain, types=["checkpoint.restored"])
    assert event.data == {
        "checkpoint_id": ckpt.checkpoint_id,
        "name": "good",
        "from_version": ckpt.version,
        "new_version": info.version,
        "actor": "alice",
    }


def test_checkpoint_records_the_state_and_version_it_copied(app: tether.App, plain: str) -> None:
    current = app.set_state(plain, DEEP)

    ckpt = app.checkpoint(plain, "named")

    assert (ckpt.agent_id, ckpt.name, ckpt.version) == (plain, "named", current.version)
    assert (ckpt.run_id, ckpt.seq) == (None, None)
    assert exact(ckpt.state) == exact(DEEP)
    assert app.get_checkpoint(ckpt.checkpoint_id) == ckpt


# -- inside a run ------------------------------------------------------------------------------


def test_ctx_checkpoint_snapshots_the_runs_uncommitted_changes_once(
    app: tether.App, flavor: str
) -> None:
    calls: list[str] = []

    def fetch() -> str:
        calls.append("fetch")
        return "data"

    def finish() -> str:
        calls.append("finish")
        return "done"

    def handler(ctx: Any, task: Any) -> Any:
        ctx.state["fetched"] = yield ctx.step(fetch, name="fetch")  # committed with the next write
        ctx.state["phase"] = "checkpointed"  # not committed by any step yet
        checkpoint_id = yield ctx.checkpoint("mid-run")
        yield ctx.sleep(0.05)  # parks the run: it resumes by replaying the checkpoint call
        yield ctx.step(finish, name="finish")
        return checkpoint_id

    register(app, flavor, "snapper", handler)
    active_agent(app, "snapper", "s1")
    run = app.submit("s1")
    work(app)

    checkpoint_id = run.result(timeout=1)
    assert app.get_run(run.run_id).attempts == 2  # the handler really ran twice
    assert calls == ["fetch", "finish"]
    assert [c.checkpoint_id for c in app.list_checkpoints("s1")] == [checkpoint_id]
    assert len(app.events(agent_id="s1", types=["checkpoint.created"])) == 1
    ckpt = app.get_checkpoint(checkpoint_id)
    assert ckpt.state == {"fetched": "data", "phase": "checkpointed"}
    assert (ckpt.run_id, ckpt.seq, ckpt.name) == (run.run_id, 2, "mid-run")
    assert app.get_state("s1", ckpt.version).state == ckpt.state
    steps = app.run_steps(run.run_id)
    assert [(s.seq, s.kind, s.name) for s in steps] == [
        (1, "step", "fetch"),
        (2, "checkpoint", "mid-run"),
        (3, "sleep", "sleep"),
        (4, "step", "finish"),
    ]
    assert steps[1].output == checkpoint_id


# -- listing and finding -----------------------------------------------------------------------


def test_checkpoints_are_listed_newest_first_and_filtered_by_agent(
    app: tether.App, plain: str
) -> None:
    app.create_agent("plain", "p2")
    first = app.checkpoint(plain, "one")
    other = app.checkpoint("p2", "elsewhere")
    second = app.checkpoint(plain, "two")

    assert [c.checkpoint_id for c in app.list_checkpoints()] == [
        second.checkpoint_id,
        other.checkpoint_id,
        first.checkpoint_id,
    ]
    assert [c.name for c in app.list_checkpoints(plain)] == ["two", "one"]
    assert [c.name for c in app.list_checkpoints(plain, limit=1)] == ["two"]
    assert app.list_checkpoints("nobody") == []


def test_unknown_checkpoint_is_not_found(app: tether.App, plain: str) -> None:
    with pytest.raises(tether.NotFound, match="ckpt_missing"):
        app.get_checkpoint("ckpt_missing")
    with pytest.raises(tether.NotFound, match="ckpt_missing"):
        app.restore("ckpt_missing")
    assert len(app.state_versions(plain)) == 1


def test_checkpoint_of_an_unknown_agent_is_not_found(app: tether.App) -> None:
    with pytest.raises(tether.NotFound, match="ghost"):
        app.checkpoint("ghost", "x")
    assert app.list_checkpoints() == []


# -- restore and runs --------------------------------------------------------------------------


@pytest.fixture
def blocking(app: tether.App, flavor: str) -> tuple[str, threading.Event, threading.Event]:
    """Agent ``b1`` whose run writes its state, then blocks in a step until released."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> str:
        entered.set()
        assert release.wait(20), "the test never released the step"
        return "released"

    def after() -> str:
        return "after"

    def handler(ctx: Any, task: Any) -> Any:
        ctx.state["run"] = "holding"
        yield ctx.step(hold)
        ctx.state["run"] = "after"
        return str((yield ctx.step(after)))

    register(app, flavor, "blocker", handler)
    active_agent(app, "blocker", "b1")
    return "b1", entered, release


def test_restore_during_a_running_run_is_refused(
    app: tether.App, blocking: tuple[str, threading.Event, threading.Event]
) -> None:
    agent, entered, release = blocking
    ckpt = app.checkpoint(agent, "start")
    run = app.submit(agent)

    with worker_in_background(app):
        assert entered.wait(10)
        try:
            with pytest.raises(tether.Refused) as refused:
                app.restore(ckpt.checkpoint_id)
            versions = len(app.state_versions(agent))
        finally:
            release.set()

    message = str(refused.value)
    assert run.run_id in message
    assert "pause" in message.lower()
    assert versions == 1  # the refused restore wrote nothing
    assert run.result(timeout=1) == "after"
    assert app.events(agent_id=agent, types=["checkpoint.restored"]) == []


def test_restore_with_pause_waits_for_the_step_boundary_and_leaves_the_agent_paused(
    app: tether.App, blocking: tuple[str, threading.Event, threading.Event]
) -> None:
    agent, entered, release = blocking
    app.set_state(agent, {"restored": "yes"})
    ckpt = app.checkpoint(agent, "start")
    run = app.submit(agent)
    outcome: dict[str, Any] = {}

    def restore() -> None:
        try:
            outcome["info"] = app.restore(ckpt.checkpoint_id, pause=True, wait=15)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    with worker_in_background(app):
        assert entered.wait(10)
        restorer = threading.Thread(target=restore, daemon=True)
        restorer.start()
        try:
            wait_for(lambda: app.get_agent(agent).lifecycle == LifecycleState.PAUSED)
            time.sleep(0.2)
            # The agent is paused, but the run is still inside its step: restore must wait.
            assert restorer.is_alive()
            assert app.get_run(run.run_id).owner is not None
        finally:
            release.set()
        restorer.join(20)

    assert "error" not in outcome, outcome.get("error")
    info = outcome["info"]
    assert info.state == {"restored": "yes"}
    assert info.lifecycle == LifecycleState.PAUSED
    stopped = app.get_run(run.run_id)
    assert (stopped.status, stopped.owner) == (RunStatus.PAUSED, None)
    # The run committed its blocked step before the restore was written, so the restored
    # version is the newest one.
    assert app.state_versions(agent)[-1].version == info.version
    assert app.get_agent(agent).lifecycle == LifecycleState.PAUSED

    app.resume(agent)
    work(app)
    assert run.result(timeout=1) == "after"


def test_restore_while_only_finished_runs_exist_works(app: tether.App, flavor: str) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(lambda: "done", name="finish"))

    register(app, flavor, "finisher", handler)
    agent = active_agent(app, "finisher", "f1").agent_id
    app.set_state(agent, {"value": "checkpointed"})
    ckpt = app.checkpoint(agent, "good")
    done = app.submit(agent)
    cancelled = app.submit(agent)
    app.cancel(cancelled.run_id)
    work(app)
    assert done.status() == RunStatus.COMPLETED
    app.set_state(agent, {"value": "later"})

    info = app.restore(ckpt.checkpoint_id)

    assert info.state == {"value": "checkpointed"}
    assert info.lifecycle == LifecycleState.ACTIVE


# -- state history and diffs -------------------------------------------------------------------


def test_every_state_version_is_kept_and_readable(app: tether.App, plain: str) -> None:
    written = [{"n": n, "items": list(range(n))} for n in range(1, 6)]
    for doc in written:
        app.set_state(plain, doc, reason=f"write {doc['n']}")

    versions = app.state_versions(plain)

    assert [v.version for v in versions] == [1, 2, 3, 4, 5, 6]
    assert [v.state for v in versions] == [{}, *written]
    assert [v.reason for v in versions[1:]] == [f"write {n}" for n in range(1, 6)]
    for version in versions:
        assert app.get_state(plain, version.version) == version
    assert app.get_state(plain) == versions[-1]
    with pytest.raises(tether.NotFound):
        app.get_state(plain, 7)


def test_state_diff_lists_operations_with_json_pointer_paths(app: tether.App, plain: str) -> None:
    before = app.set_state(
        plain,
        {
            "a/b": 1,
            "m~n": "old",
            "same": {"deep": [1, 2]},
            "nested": {"x": 1, "list": [1, 2], "gone": {"k": "v"}},
            "kind": 1,
        },
    ).version
    after = app.set_state(
        plain,
        {
            "m~n": "new",
            "same": {"deep": [1, 2]},
            "nested": {"x": 1, "list": [1, 3], "added": {"k": None}},
            "kind": 1.0,
            "~/": True,
        },
    ).version

    assert app.state_diff(plain, before, after) == [
        {"op": "remove", "path": "/a~1b", "from": 1},
        {"op": "replace", "path": "/kind", "from": 1, "to": 1.0},
        {"op": "replace", "path": "/m~0n", "from": "old", "to": "new"},
        {"op": "add", "path": "/nested/added", "to": {"k": None}},
        {"op": "remove", "path": "/nested/gone", "from": {"k": "v"}},
        {"op": "replace", "path": "/nested/list", "from": [1, 2], "to": [1, 3]},
        {"op": "add", "path": "/~0~1", "to": True},
    ]


def test_state_diff_of_equal_versions_is_empty(app: tether.App, plain: str) -> None:
    first = app.set_state(plain, DEEP).version
    second = app.set_state(plain, json.loads(json.dumps(DEEP))).version

    assert app.state_diff(plain, first, first) == []
    assert app.state_diff(plain, first, second) == []
    assert app.state_diff(plain, second, first) == []


def test_state_diff_of_the_root_replaced_by_a_different_value(app: tether.App, plain: str) -> None:
    first = app.set_state(plain, {"a": 1}).version
    second = app.set_state(plain, {}).version

    assert app.state_diff(plain, first, second) == [{"op": "remove", "path": "/a", "from": 1}]
    assert app.state_diff(plain, second, first) == [{"op": "add", "path": "/a", "to": 1}]
