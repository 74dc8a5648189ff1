"""The agent lifecycle: the table is the spec's, and the App enforces it on a real database."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import tether
from tether import lifecycle
from tether.lifecycle import LifecycleState as S

# The spec, written out by hand so that a change to the table has to change this too:
#   created --initialize--> initialized --activate--> active <--pause/resume--> paused
#   any state but terminated --terminate--> terminated (final)
#   any state but terminated --fail--> error --recover--> initialized
LIVE = [S.CREATED, S.INITIALIZED, S.ACTIVE, S.PAUSED, S.ERROR]
SPEC: set[tuple[S, str, S]] = {
    (S.CREATED, "initialize", S.INITIALIZED),
    (S.INITIALIZED, "activate", S.ACTIVE),
    (S.ACTIVE, "pause", S.PAUSED),
    (S.PAUSED, "resume", S.ACTIVE),
    *((state, "terminate", S.TERMINATED) for state in LIVE),
    *((state, "fail", S.ERROR) for state in LIVE),
    (S.ERROR, "recover", S.INITIALIZED),
}
ACTIONS = sorted({action for _, action, _ in SPEC})
TABLES = ("agents", "agent_history", "state_versions", "events")


def table_triples() -> set[tuple[S, str, S]]:
    return {
        (source, t.action, t.target) for t in lifecycle.TRANSITIONS.values() for source in t.sources
    }


def row_counts(app: tether.App) -> dict[str, int]:
    with app.store.db.read() as conn:
        return {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in TABLES
        }


class Plain(tether.Agent):
    type = "plain"

    def handle(self, ctx: object, task: object) -> None:
        return None


# -- the table ------------------------------------------------------------------------------


def test_table_is_exactly_the_spec() -> None:
    assert table_triples() == SPEC


def test_initial_state_is_created_and_terminated_is_the_only_final_state() -> None:
    assert lifecycle.INITIAL == S.CREATED
    final_states = set(lifecycle.FINAL)
    assert final_states == {S.TERMINATED}


def test_terminated_allows_no_action() -> None:
    assert lifecycle.allowed_actions(S.TERMINATED) == []


@pytest.mark.parametrize("state", list(S))
def test_allowed_actions_are_those_the_spec_lists_for_the_state(state: S) -> None:
    expected = {action for source, action, _ in SPEC if source == state}
    assert set(lifecycle.allowed_actions(state)) == expected


@pytest.mark.parametrize(("state", "action"), list(itertools.product(list(S), ACTIONS)))
def test_check_returns_the_target_of_a_legal_action_and_refuses_the_rest(
    state: S, action: str
) -> None:
    targets = {target for source, a, target in SPEC if source == state and a == action}
    if targets:
        assert lifecycle.check("agent a1", state, action) == targets.pop()
    else:
        with pytest.raises(tether.InvalidTransition):
            lifecycle.check("agent a1", state, action)


def test_invalid_transition_names_the_current_state_and_the_allowed_actions() -> None:
    with pytest.raises(tether.InvalidTransition) as caught:
        lifecycle.check("agent a1", S.PAUSED, "activate")
    error = caught.value
    assert error.current == "paused"
    assert error.action == "activate"
    assert set(error.allowed) == {"resume", "terminate", "fail"}
    message = str(error)
    assert "agent a1" in message
    assert "it is paused" in message
    for action in ("resume", "terminate", "fail"):
        assert action in message


def test_invalid_transition_from_the_final_state_says_nothing_is_allowed() -> None:
    with pytest.raises(tether.InvalidTransition) as caught:
        lifecycle.check("agent a1", S.TERMINATED, "recover")
    assert caught.value.allowed == ()
    assert "final state" in str(caught.value)


def test_invalid_transition_is_a_conflict_error() -> None:
    assert issubclass(tether.InvalidTransition, tether.ConflictError)


def test_unknown_action_is_a_value_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown lifecycle action 'explode'") as caught:
        lifecycle.transition("explode")
    for action in ACTIONS:
        assert action in str(caught.value)


def test_diagram_renders_every_transition() -> None:
    lines = set(lifecycle.diagram().splitlines())
    assert "stateDiagram-v2" in lines
    assert "    [*] --> created" in lines
    assert "    terminated --> [*]" in lines
    for source, action, target in SPEC:
        assert f"    {source.value} --> {target.value}: {action}" in lines
    transition_lines = [line for line in lines if ": " in line]
    assert len(transition_lines) == len(SPEC)


def test_validation_rejects_an_action_that_leaves_the_final_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = lifecycle.Transition("revive", frozenset({S.TERMINATED}), S.ACTIVE)
    monkeypatch.setitem(lifecycle.TRANSITIONS, "revive", bad)
    with pytest.raises(AssertionError, match="revive"):
        lifecycle._validate()


def test_validation_rejects_an_unreachable_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(lifecycle.TRANSITIONS, "pause")
    with pytest.raises(AssertionError, match="paused"):
        lifecycle._validate()


# -- the table enforced through tether.App on a real database -------------------------------


def replay(history: list[tether.types.HistoryEntry]) -> S:
    """Walk the stored history from ``created`` through the table; return where it ends."""
    first, *rest = history
    assert (first.from_state, first.to_state, first.action) == (None, S.CREATED, "create")
    state = S.CREATED
    for entry in rest:
        assert entry.from_state == state, f"history jumps from {state} to {entry}"
        assert lifecycle.check("replay", state, entry.action) == entry.to_state
        state = entry.to_state
    return state


def test_any_sequence_of_actions_follows_the_table(db_url: str) -> None:
    examples = 30 if db_url.startswith("sqlite") else 12
    ids = itertools.count()
    with tether.App(db_url) as app:
        app.register(Plain)

        @settings(max_examples=examples, deadline=None, database=None)
        @given(data=st.data(), length=st.integers(min_value=0, max_value=15))
        def apply(data: st.DataObject, length: int) -> None:
            agent_id = f"agent-{next(ids)}"
            app.create_agent("plain", agent_id)
            state, taken = S.CREATED, []
            for _ in range(length):
                allowed = lifecycle.allowed_actions(state)
                # Half legal, half anything: random actions alone rarely get past two steps.
                choices = st.sampled_from(ACTIONS)
                if allowed:
                    choices = st.one_of(st.sampled_from(allowed), choices)
                action = data.draw(choices, label="action")
                if action in allowed:
                    info = getattr(app, action)(agent_id, reason=f"why {action}", actor="prop")
                    state = lifecycle.TRANSITIONS[action].target
                    taken.append(action)
                    assert info.lifecycle == state
                    continue
                before = row_counts(app)
                with pytest.raises(tether.InvalidTransition) as caught:
                    getattr(app, action)(agent_id, actor="prop")
                assert caught.value.current == state.value
                assert set(caught.value.allowed) == set(allowed)
                assert row_counts(app) == before

            info = app.get_agent(agent_id)
            assert info.lifecycle in set(S)
            assert info.lifecycle == state
            history = app.agent_history(agent_id)
            assert replay(history) == info.lifecycle
            assert [entry.action for entry in history[1:]] == taken
            assert {entry.actor for entry in history[1:]} <= {"prop"}

        apply()
