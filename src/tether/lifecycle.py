"""The agent lifecycle as data.

::

    created --initialize--> initialized --activate--> active <--pause/resume--> paused
    any state but terminated --terminate--> terminated (final)
    any state but terminated --fail--> error --recover--> initialized

``TRANSITIONS`` maps each action to the states it may start from and the state it leads to.
The table is checked when this module is imported, and renders itself as a Mermaid diagram
(``diagram()``) for the docs. The store applies a transition as one compare-and-set
``UPDATE ... WHERE lifecycle IN (sources)``, so two racing processes cannot both succeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tether import graph
from tether.errors import InvalidTransition


class LifecycleState(StrEnum):
    """Where an agent is in its life."""

    CREATED = "created"
    INITIALIZED = "initialized"
    ACTIVE = "active"
    PAUSED = "paused"
    TERMINATED = "terminated"
    ERROR = "error"


S = LifecycleState
_LIVE = frozenset(S) - {S.TERMINATED}


@dataclass(frozen=True)
class Transition:
    """One lifecycle action: from which states it may be taken and where it leads."""

    action: str
    sources: frozenset[LifecycleState]
    target: LifecycleState


TRANSITIONS: dict[str, Transition] = {
    t.action: t
    for t in (
        Transition("initialize", frozenset({S.CREATED}), S.INITIALIZED),
        Transition("activate", frozenset({S.INITIALIZED}), S.ACTIVE),
        Transition("pause", frozenset({S.ACTIVE}), S.PAUSED),
        Transition("resume", frozenset({S.PAUSED}), S.ACTIVE),
        Transition("terminate", _LIVE, S.TERMINATED),
        Transition("fail", _LIVE, S.ERROR),
        Transition("recover", frozenset({S.ERROR}), S.INITIALIZED),
    )
}

INITIAL = S.CREATED
FINAL = frozenset({S.TERMINATED})


def allowed_actions(state: LifecycleState | str) -> list[str]:
    """The actions that may be taken from ``state``, in table order."""
    state = LifecycleState(state)
    return [t.action for t in TRANSITIONS.values() if state in t.sources]


def transition(action: str) -> Transition:
    """Look up an action by name; an unknown one is a ``ValueError`` naming the known ones."""
    try:
        return TRANSITIONS[action]
    except KeyError:
        known = ", ".join(TRANSITIONS)
        raise ValueError(f"unknown lifecycle action {action!r}; known: {known}") from None


def check(subject: str, current: LifecycleState | str, action: str) -> LifecycleState:
    """Return the target of ``action`` from ``current``, or raise ``InvalidTransition``."""
    t = transition(action)
    current = LifecycleState(current)
    if current not in t.sources:
        raise InvalidTransition(subject, current.value, action, allowed_actions(current))
    return t.target


def edges() -> list[graph.Edge]:
    """Every ``(from, to, action)`` the table allows, in table order."""
    return [
        (source, t.target, t.action) for t in TRANSITIONS.values() for source in sorted(t.sources)
    ]


def diagram() -> str:
    """The lifecycle as a Mermaid state diagram."""
    return graph.mermaid(INITIAL, edges(), FINAL)


def _validate() -> None:
    """Every state is reachable from the initial one, and final states have no way out."""
    missing = set(LifecycleState) - graph.reachable(INITIAL, edges())
    if missing:
        raise AssertionError(f"lifecycle states unreachable from {INITIAL}: {sorted(missing)}")
    for t in TRANSITIONS.values():
        if t.sources & FINAL:
            raise AssertionError(f"action {t.action!r} leaves a final state")
        if not t.sources:
            raise AssertionError(f"action {t.action!r} has no source state")


_validate()
