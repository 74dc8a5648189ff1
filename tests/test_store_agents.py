"""Agents on a real database (SQLite and PostgreSQL): creation, lifecycle, hooks, state versions."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

import tether
from tether import HookContext
from tether.lifecycle import LifecycleState as S

TABLES = ("agents", "agent_history", "state_versions", "events")


def row_counts(app: tether.App) -> dict[str, int]:
    """Rows per table, counted with SQL so nothing in the store's own reads can hide a write."""
    with app.store.db.read() as conn:
        return {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in TABLES
        }


class Plain(tether.Agent):
    type = "plain"

    def handle(self, ctx: Any, task: Any) -> None:
        return None


class Other(Plain):
    type = "other"


class Notebook(Plain):
    """on_initialize writes the state; on_activate counts activations."""

    type = "notebook"

    def on_initialize(self, ctx: HookContext) -> None:
        ctx.state["notes"] = []
        ctx.state["model"] = self.config.get("model", "none")

    def on_activate(self, ctx: HookContext) -> None:
        ctx.state["activations"] = ctx.state.get("activations", 0) + 1


class Broken(Plain):
    """on_activate raises, so activating it moves the agent to error."""

    type = "broken"

    def on_activate(self, ctx: HookContext) -> None:
        ctx.state["half"] = "written"
        raise RuntimeError("tool registry is down")


class AsyncNotebook(Plain):
    type = "async-notebook"

    async def on_initialize(self, ctx: HookContext) -> None:
        await asyncio.sleep(0)
        ctx.state["ready"] = True

    async def on_pause(self, ctx: HookContext) -> None:
        await asyncio.sleep(0)
        raise ValueError("cannot pause now")


class Untouched(Plain):
    """A hook that leaves the state alone must not create a state version."""

    type = "untouched"

    def on_initialize(self, ctx: HookContext) -> None:
        ctx.state.get("anything")


@pytest.fixture
def agents_app(app: tether.App) -> tether.App:
    for cls in (Plain, Other, Notebook, Broken, AsyncNotebook, Untouched):
        app.register(cls)
    return app


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    s = socket.socket()
    try:
        yield s
    finally:
        s.close()


# -- create, get, list ----------------------------------------------------------------------


def test_create_agent_stores_it_in_created_with_state_version_1(agents_app: tether.App) -> None:
    info = agents_app.create_agent("plain", "a1", {"model": "m"}, state={"k": [1, 2]})
    assert (info.agent_id, info.type, info.lifecycle) == ("a1", "plain", S.CREATED)
    assert info.config == {"model": "m"}
    assert (info.state, info.version, info.error) == ({"k": [1, 2]}, 1, None)
    assert info.created_at.tzinfo is not None
    assert agents_app.get_agent("a1") == info


def test_created_agent_is_read_back_by_a_second_app_on_the_same_database(
    agents_app: tether.App, db_url: str
) -> None:
    agents_app.create_agent("plain", "a1", {"x": 1})
    with tether.App(db_url, require_types=False) as other:
        assert other.get_agent("a1").config == {"x": 1}


def test_list_agents_returns_every_agent_oldest_first(agents_app: tether.App) -> None:
    for agent_id in ("c", "a", "b"):
        agents_app.create_agent("plain", agent_id)
    assert [a.agent_id for a in agents_app.list_agents()] == ["c", "a", "b"]


def test_list_agents_filters_by_type_lifecycle_and_limit(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "p1")
    agents_app.create_agent("plain", "p2")
    agents_app.create_agent("other", "o1")
    agents_app.initialize("p2")
    assert [a.agent_id for a in agents_app.list_agents(type="plain")] == ["p1", "p2"]
    assert [a.agent_id for a in agents_app.list_agents(lifecycle="created")] == ["p1", "o1"]
    assert [a.agent_id for a in agents_app.list_agents(type="plain", lifecycle="initialized")] == [
        "p2"
    ]
    assert [a.agent_id for a in agents_app.list_agents(limit=2)] == ["p1", "p2"]
    assert agents_app.list_agents(type="nobody") == []


def test_list_agents_with_an_unknown_lifecycle_filter_is_a_configuration_error(
    agents_app: tether.App,
) -> None:
    with pytest.raises(tether.ConfigurationError, match="unknown lifecycle state 'sleeping'"):
        agents_app.list_agents(lifecycle="sleeping")


def test_duplicate_agent_id_is_already_exists_and_writes_nothing(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1", {"first": True})
    before = row_counts(agents_app)
    with pytest.raises(tether.AlreadyExists, match="agent 'a1' already exists"):
        agents_app.create_agent("other", "a1", {"second": True})
    assert row_counts(agents_app) == before
    assert agents_app.get_agent("a1").config == {"first": True}


@pytest.mark.parametrize("bad_id", ["", "   ", "has space", "tab\there", "x" * 256])
def test_malformed_agent_id_is_refused_and_writes_nothing(
    agents_app: tether.App, bad_id: str
) -> None:
    with pytest.raises(tether.ConfigurationError):
        agents_app.create_agent("plain", bad_id)
    assert row_counts(agents_app)["agents"] == 0


# -- unknown agents -------------------------------------------------------------------------

UNKNOWN_AGENT_CALLS = {
    "get_agent": lambda app: app.get_agent("ghost"),
    "initialize": lambda app: app.initialize("ghost"),
    "activate": lambda app: app.activate("ghost"),
    "terminate": lambda app: app.terminate("ghost"),
    "agent_history": lambda app: app.agent_history("ghost"),
    "get_state": lambda app: app.get_state("ghost"),
    "get_state_version": lambda app: app.get_state("ghost", version=1),
    "state_versions": lambda app: app.state_versions("ghost"),
    "set_state": lambda app: app.set_state("ghost", {"a": 1}),
    "patch_state": lambda app: app.patch_state("ghost", {"a": 1}),
}


@pytest.mark.parametrize("call", list(UNKNOWN_AGENT_CALLS))
def test_unknown_agent_is_not_found_and_writes_nothing(agents_app: tether.App, call: str) -> None:
    agents_app.create_agent("plain", "real")
    before = row_counts(agents_app)
    with pytest.raises(tether.NotFound, match="agent 'ghost' not found") as caught:
        UNKNOWN_AGENT_CALLS[call](agents_app)
    assert (caught.value.kind, caught.value.key) == ("agent", "ghost")
    assert row_counts(agents_app) == before


# -- transitions and history ----------------------------------------------------------------


def test_every_transition_appends_history_in_order(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1", actor="alice", reason="for the demo")
    steps = [
        ("initialize", "setup", "alice"),
        ("activate", "go", "bob"),
        ("pause", "lunch", "bob"),
        ("resume", "back", "carol"),
        ("fail", "broke", "carol"),
        ("recover", "fixed", "dave"),
        ("terminate", "done", "erin"),
    ]
    for action, reason, actor in steps:
        getattr(agents_app, action)("a1", reason=reason, actor=actor)

    history = agents_app.agent_history("a1")
    assert [(h.from_state, h.to_state, h.action, h.reason, h.actor) for h in history] == [
        (None, S.CREATED, "create", "for the demo", "alice"),
        (S.CREATED, S.INITIALIZED, "initialize", "setup", "alice"),
        (S.INITIALIZED, S.ACTIVE, "activate", "go", "bob"),
        (S.ACTIVE, S.PAUSED, "pause", "lunch", "bob"),
        (S.PAUSED, S.ACTIVE, "resume", "back", "carol"),
        (S.ACTIVE, S.ERROR, "fail", "broke", "carol"),
        (S.ERROR, S.INITIALIZED, "recover", "fixed", "dave"),
        (S.INITIALIZED, S.TERMINATED, "terminate", "done", "erin"),
    ]
    times = [h.at for h in history]
    assert all(t.tzinfo is not None and t.utcoffset() == dt.timedelta(0) for t in times)
    assert times == sorted(times)
    assert history[-1].at == agents_app.get_agent("a1").updated_at


def test_transition_without_reason_or_actor_records_the_action_and_the_default_actor(
    agents_app: tether.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_ACTOR", "ops-bot")
    agents_app.create_agent("plain", "a1")
    agents_app.initialize("a1")
    entry = agents_app.agent_history("a1")[-1]
    assert (entry.reason, entry.actor) == ("initialize", "ops-bot")


def test_every_transition_appends_a_lifecycle_event(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1")
    agents_app.initialize("a1", actor="alice")
    agents_app.activate("a1", actor="alice")
    with agents_app.store.db.read() as conn:
        rows = conn.execute(
            text("SELECT type FROM events WHERE agent_id = 'a1' ORDER BY seq")
        ).all()
    assert [r.type for r in rows] == ["agent.created", "agent.lifecycle", "agent.lifecycle"]


@pytest.mark.parametrize(
    ("setup", "action"),
    [
        ([], "activate"),
        ([], "recover"),
        (["initialize"], "pause"),
        (["initialize", "activate"], "initialize"),
        (["initialize", "activate", "pause"], "activate"),
        (["terminate"], "terminate"),
        (["terminate"], "fail"),
        (["fail"], "resume"),
    ],
)
def test_illegal_transition_raises_and_writes_nothing(
    agents_app: tether.App, setup: list[str], action: str
) -> None:
    agents_app.create_agent("notebook", "a1")
    for step in setup:
        getattr(agents_app, step)("a1")
    agent_before = agents_app.get_agent("a1")
    counts_before = row_counts(agents_app)
    with pytest.raises(tether.InvalidTransition) as caught:
        getattr(agents_app, action)("a1", reason="should not stick")
    assert caught.value.current == agent_before.lifecycle.value
    assert row_counts(agents_app) == counts_before
    assert agents_app.get_agent("a1") == agent_before


def test_terminated_agent_stays_terminated(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1")
    agents_app.terminate("a1")
    for action in ("initialize", "activate", "pause", "resume", "terminate", "fail", "recover"):
        with pytest.raises(tether.InvalidTransition, match="none \\(final state\\)"):
            getattr(agents_app, action)("a1")
    assert agents_app.get_agent("a1").lifecycle == S.TERMINATED


# -- hooks ----------------------------------------------------------------------------------


def test_on_initialize_sets_the_state_as_a_new_version(agents_app: tether.App) -> None:
    agents_app.create_agent("notebook", "n1", {"model": "gpt"}, state={"seed": 1})
    info = agents_app.initialize("n1")
    assert info.state == {"seed": 1, "notes": [], "model": "gpt"}
    assert info.version == 2
    versions = agents_app.state_versions("n1")
    assert [(v.version, v.reason) for v in versions] == [(1, "created"), (2, "initialize")]
    assert versions[1].state == info.state


def test_hook_state_and_transition_commit_together(agents_app: tether.App) -> None:
    agents_app.create_agent("notebook", "n1")
    agents_app.initialize("n1")
    agents_app.activate("n1")
    agents_app.pause("n1")
    agents_app.resume("n1")  # no hook for resume: the state does not change
    info = agents_app.get_agent("n1")
    assert (info.lifecycle, info.version, info.state["activations"]) == (S.ACTIVE, 3, 1)


def test_hook_that_leaves_state_alone_creates_no_version(agents_app: tether.App) -> None:
    agents_app.create_agent("untouched", "u1", state={"a": 1})
    info = agents_app.initialize("u1")
    assert (info.lifecycle, info.version) == (S.INITIALIZED, 1)
    assert len(agents_app.state_versions("u1")) == 1


def test_hook_that_raises_moves_the_agent_to_error_and_raises_refused(
    agents_app: tether.App,
) -> None:
    agents_app.create_agent("broken", "b1", state={"keep": True})
    agents_app.initialize("b1")
    with pytest.raises(tether.Refused, match="on_activate raised RuntimeError") as caught:
        agents_app.activate("b1", actor="alice")
    assert "tether agents recover b1" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)

    info = agents_app.get_agent("b1")
    assert info.lifecycle == S.ERROR
    assert info.error is not None
    assert info.error["type"] == "RuntimeError"
    assert info.error["message"] == "tool registry is down"
    assert "on_activate" in info.error["traceback"]
    assert info.state == {"keep": True}, "a failed hook's state changes are discarded"
    assert info.version == 1
    last = agents_app.agent_history("b1")[-1]
    assert (last.from_state, last.to_state, last.action, last.actor) == (
        S.INITIALIZED,
        S.ERROR,
        "fail",
        "alice",
    )
    assert "RuntimeError: tool registry is down" in last.reason


def test_recover_from_error_returns_to_initialized_and_clears_the_error(
    agents_app: tether.App,
) -> None:
    agents_app.create_agent("broken", "b1")
    agents_app.initialize("b1")
    with pytest.raises(tether.Refused):
        agents_app.activate("b1")
    info = agents_app.recover("b1", reason="patched")
    assert (info.lifecycle, info.error) == (S.INITIALIZED, None)
    assert agents_app.get_agent("b1").error is None
    assert [h.action for h in agents_app.agent_history("b1")] == [
        "create",
        "initialize",
        "fail",
        "recover",
    ]


def test_fail_records_no_error_document_but_reaches_error(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1")
    info = agents_app.fail("a1", reason="operator said so")
    assert info.lifecycle == S.ERROR
    assert agents_app.agent_history("a1")[-1].reason == "operator said so"


def test_async_hooks_run_and_their_state_is_stored(agents_app: tether.App) -> None:
    agents_app.create_agent("async-notebook", "n1")
    info = agents_app.initialize("n1")
    assert (info.state, info.version) == ({"ready": True}, 2)


def test_async_hook_that_raises_moves_the_agent_to_error(agents_app: tether.App) -> None:
    agents_app.create_agent("async-notebook", "n1")
    agents_app.initialize("n1")
    agents_app.activate("n1")
    with pytest.raises(tether.Refused, match="on_pause raised ValueError: cannot pause now"):
        agents_app.pause("n1")
    info = agents_app.get_agent("n1")
    assert (info.lifecycle, info.error and info.error["type"]) == (S.ERROR, "ValueError")


def test_hook_that_stores_a_non_json_value_moves_the_agent_to_error(
    agents_app: tether.App, sock: socket.socket
) -> None:
    class Leaky(Plain):
        type = "leaky"

        def on_initialize(self, ctx: HookContext) -> None:
            ctx.state["conn"] = sock

    agents_app.register(Leaky)
    agents_app.create_agent("leaky", "l1")
    with pytest.raises(tether.Refused, match=r"state\.conn: object of type socket"):
        agents_app.initialize("l1")
    info = agents_app.get_agent("l1")
    assert (info.lifecycle, info.state, info.version) == (S.ERROR, {}, 1)


# -- state documents ------------------------------------------------------------------------


def test_set_state_replaces_the_document_as_a_new_version(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1", state={"a": 1})
    info = agents_app.set_state("a1", {"b": 2}, expected_version=1, reason="rewrite")
    assert (info.state, info.version) == ({"b": 2}, 2)
    latest = agents_app.get_state("a1")
    assert (latest.version, latest.state, latest.reason) == (2, {"b": 2}, "rewrite")


def test_set_state_with_a_stale_expected_version_conflicts_and_writes_nothing(
    agents_app: tether.App,
) -> None:
    agents_app.create_agent("plain", "a1", state={"a": 1})
    agents_app.set_state("a1", {"a": 2})
    before = row_counts(agents_app)
    with pytest.raises(tether.ConflictError, match="version 2, not 1") as caught:
        agents_app.set_state("a1", {"a": "stale"}, expected_version=1)
    assert not isinstance(caught.value, tether.InvalidTransition)
    assert row_counts(agents_app) == before
    assert agents_app.get_agent("a1").state == {"a": 2}


def test_patch_state_applies_a_json_merge_patch_where_null_deletes(
    agents_app: tether.App,
) -> None:
    agents_app.create_agent(
        "plain", "a1", state={"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "keep": "me"}
    )
    info = agents_app.patch_state(
        "a1", {"a": None, "b": {"c": None, "x": 9}, "e": [3], "new": {"n": None, "m": 1}}
    )
    assert info.state == {"b": {"d": 3, "x": 9}, "e": [3], "keep": "me", "new": {"m": 1}}
    assert info.version == 2
    assert agents_app.get_state("a1", version=1).state["a"] == 1


def test_patch_state_of_a_missing_key_with_null_is_a_no_op_version(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1", state={"a": 1})
    info = agents_app.patch_state("a1", {"zzz": None})
    assert (info.state, info.version) == ({"a": 1}, 2)


def test_patch_state_with_a_stale_expected_version_conflicts_and_writes_nothing(
    agents_app: tether.App,
) -> None:
    agents_app.create_agent("plain", "a1", state={"a": 1})
    agents_app.patch_state("a1", {"a": 2})
    before = row_counts(agents_app)
    with pytest.raises(tether.ConflictError):
        agents_app.patch_state("a1", {"a": 3}, expected_version=1)
    assert row_counts(agents_app) == before
    assert agents_app.get_agent("a1").state == {"a": 2}


def test_every_earlier_state_version_stays_readable(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1", state={"v": 1})
    agents_app.set_state("a1", {"v": 2}, reason="second")
    agents_app.patch_state("a1", {"w": 3}, reason="third")
    for version, state in [(1, {"v": 1}), (2, {"v": 2}), (3, {"v": 2, "w": 3})]:
        assert agents_app.get_state("a1", version=version).state == state
    versions = agents_app.state_versions("a1")
    assert [(v.version, v.reason, v.state) for v in versions] == [
        (1, "created", {"v": 1}),
        (2, "second", {"v": 2}),
        (3, "third", {"v": 2, "w": 3}),
    ]
    assert agents_app.get_state("a1").version == 3


def test_a_state_version_that_does_not_exist_is_not_found(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1")
    with pytest.raises(tether.NotFound, match="state version 'a1@7' not found"):
        agents_app.get_state("a1", version=7)


def test_state_round_trips_nested_unicode_and_numbers_exactly(agents_app: tether.App) -> None:
    state = {"text": "héllo ✓ \n end", "big": 2**53 + 1, "f": 0.1, "n": None, "l": [[], {}]}
    agents_app.create_agent("plain", "a1", state=state)
    assert agents_app.get_state("a1").state == state


def test_a_nul_character_in_state_is_refused_alike_on_both_databases(
    agents_app: tether.App,
) -> None:
    agents_app.create_agent("plain", "a1")
    before = row_counts(agents_app)
    with pytest.raises(tether.SerializationError, match=r"^state\.notes\[0\]: contains a NUL"):
        agents_app.set_state("a1", {"notes": ["bad \x00 byte"]})
    assert row_counts(agents_app) == before


def test_non_json_state_is_refused_naming_the_path_and_writes_nothing(
    agents_app: tether.App, sock: socket.socket
) -> None:
    agents_app.create_agent("plain", "a1", state={"ok": True})
    before = row_counts(agents_app)
    with pytest.raises(
        tether.SerializationError, match=r"^state\.tools\[2\]: object of type socket"
    ):
        agents_app.set_state("a1", {"tools": [1, 2, sock]})
    with pytest.raises(tether.SerializationError, match=r"^patch\.x: .*is not valid JSON"):
        agents_app.patch_state("a1", {"x": float("nan")})
    assert row_counts(agents_app) == before
    assert agents_app.get_agent("a1").state == {"ok": True}


def test_non_json_state_or_config_at_creation_is_refused_and_writes_nothing(
    agents_app: tether.App, sock: socket.socket
) -> None:
    with pytest.raises(tether.SerializationError, match=r"^state\.s: object of type socket"):
        agents_app.create_agent("plain", "a1", state={"s": sock})
    with pytest.raises(tether.SerializationError, match=r"^config\.s: object of type socket"):
        agents_app.create_agent("plain", "a1", {"s": sock})
    assert row_counts(agents_app) == dict.fromkeys(TABLES, 0)


def test_oversized_state_is_refused_and_writes_nothing(agents_app: tether.App) -> None:
    agents_app.create_agent("plain", "a1")
    before = row_counts(agents_app)
    with pytest.raises(tether.SerializationError, match="byte limit"):
        agents_app.set_state("a1", {"blob": "x" * (3 * 1024 * 1024)})
    assert row_counts(agents_app) == before


# -- agent types ----------------------------------------------------------------------------


def test_unregistered_type_is_refused_when_types_are_required(app: tether.App) -> None:
    app.register(Plain)
    with pytest.raises(tether.ConfigurationError, match="agent type 'ghost' is not registered"):
        app.create_agent("ghost", "g1")
    assert row_counts(app)["agents"] == 0


def test_unregistered_type_is_allowed_when_types_are_not_required(db_url: str) -> None:
    with tether.App(db_url, require_types=False) as app:
        app.create_agent("ghost", "g1")
        info = app.initialize("g1")
        assert (info.type, info.lifecycle) == ("ghost", S.INITIALIZED)


def test_transition_of_an_agent_whose_type_is_not_registered_is_refused(db_url: str) -> None:
    with tether.App(db_url, require_types=False) as loose:
        loose.create_agent("ghost", "g1")
    with tether.App(db_url) as strict:
        before = row_counts(strict)
        with pytest.raises(tether.ConfigurationError, match="'ghost' is not registered"):
            strict.initialize("g1")
        assert row_counts(strict) == before
