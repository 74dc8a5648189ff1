"""The run status rules as data: which action moves a run from which statuses to which.

::

    pending --claim--> running --complete/fail/escalate--> completed / failed / needs_attention
    running --wait--> waiting --wake (due, or an outcome delivered)--> pending
    running --release (worker stops, lease expired)--> pending
    pending/running/waiting --pause--> paused --resume--> pending
    any unfinished --cancel--> cancelled (final)
    needs_attention --retry/skip--> pending, --abort--> failed

``TRANSITIONS`` is checked when this module is imported and renders itself as a diagram for
the docs. The store builds its SQL status lists from it, and the fenced write's status rule
from ``HELD``: what a person decided (cancel, pause) is not undone by a worker's next write.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether import graph
from tether.types import FINAL_RUN_STATUSES, RunStatus

R = RunStatus
LIVE = frozenset(R) - FINAL_RUN_STATUSES
"""Statuses of a run that has not finished."""


@dataclass(frozen=True)
class RunTransition:
    """One thing that happens to a run: from which statuses, to which, and who does it."""

    action: str
    sources: frozenset[RunStatus]
    target: RunStatus
    by: str
    """``worker`` (the run's own execution), ``person`` (CLI, API, App) or ``delivery`` (an
    outcome the run waited for arrived)."""


TRANSITIONS: dict[str, RunTransition] = {
    t.action: t
    for t in (
        RunTransition("claim", frozenset({R.PENDING, R.WAITING, R.RUNNING}), R.RUNNING, "worker"),
        RunTransition("wait", frozenset({R.RUNNING}), R.WAITING, "worker"),
        RunTransition("release", frozenset({R.RUNNING}), R.PENDING, "worker"),
        RunTransition("complete", frozenset({R.RUNNING}), R.COMPLETED, "worker"),
        RunTransition("fail", frozenset({R.RUNNING}), R.FAILED, "worker"),
        RunTransition("escalate", frozenset({R.RUNNING}), R.NEEDS_ATTENTION, "worker"),
        RunTransition("wake", frozenset({R.WAITING}), R.PENDING, "delivery"),
        RunTransition("pause", frozenset({R.PENDING, R.RUNNING, R.WAITING}), R.PAUSED, "person"),
        RunTransition("resume", frozenset({R.PAUSED}), R.PENDING, "person"),
        RunTransition("cancel", LIVE, R.CANCELLED, "person"),
        RunTransition("retry", frozenset({R.NEEDS_ATTENTION}), R.PENDING, "person"),
        RunTransition("skip", frozenset({R.NEEDS_ATTENTION}), R.PENDING, "person"),
        RunTransition("abort", frozenset({R.NEEDS_ATTENTION}), R.FAILED, "person"),
    )
}
"""Every way a run's status changes. ``claim`` takes a waiting run only when its deadline
is due, and a running one only when its worker's lease expired."""

HELD: dict[RunStatus, frozenset[RunStatus]] = {
    R.CANCELLED: frozenset(R),
    R.PAUSED: frozenset({R.WAITING, R.PENDING}),
}
"""Statuses a person set that a worker's write does not override: the worker's target is
ignored when the run is in the key status and the target is in the value set. A cancelled run
stays cancelled; a paused run stays paused instead of waiting or being handed back."""

STILL_HELD: dict[str, RunStatus] = {"resume": R.RUNNING}
"""Where an action leads a run that its worker still holds (it was paused between two of its
commits and has not stopped yet): resuming it lets that execution go on, instead of making the
run claimable by another while the first still runs."""

ON_AGENT: dict[str, str] = {
    "pause": "pause",
    "fail": "pause",
    "resume": "resume",
    "activate": "resume",
    "terminate": "cancel",
}
"""What an agent's lifecycle action does to its runs, in the same transaction."""


def transition(action: str) -> RunTransition:
    """Look up a run action; an unknown one is a ``ValueError`` naming the known ones."""
    try:
        return TRANSITIONS[action]
    except KeyError:
        raise ValueError(
            f"unknown run action {action!r}; known: {', '.join(TRANSITIONS)}"
        ) from None


def sources(action: str) -> list[str]:
    """The statuses ``action`` may start from, as SQL values in a stable order."""
    return sorted(s.value for s in transition(action).sources)


def target(action: str) -> str:
    """The status ``action`` leads to, as an SQL value."""
    return transition(action).target.value


def sql_list(values: list[str]) -> str:
    """Status values as an SQL list literal: ``('a', 'b')``."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def edges() -> list[graph.Edge]:
    """Every ``(from, to, action)`` the table allows, in table order."""
    return [
        (source, t.target, t.action) for t in TRANSITIONS.values() for source in sorted(t.sources)
    ]


def diagram() -> str:
    """The run statuses as a Mermaid state diagram."""
    return graph.mermaid(R.PENDING, edges(), FINAL_RUN_STATUSES)


def _validate() -> None:
    """Every status is reachable from pending; final statuses have no way out; the agent
    effects and the held rules name real actions and statuses."""
    unreachable = set(R) - graph.reachable(R.PENDING, edges())
    if unreachable:
        raise AssertionError(f"run statuses unreachable from pending: {unreachable}")
    for t in TRANSITIONS.values():
        if t.sources & FINAL_RUN_STATUSES:
            raise AssertionError(f"run action {t.action!r} leaves a final status")
        if t.by not in ("worker", "person", "delivery"):
            raise AssertionError(f"run action {t.action!r}: unknown actor {t.by!r}")
    for action in ON_AGENT.values():
        transition(action)
    for action in STILL_HELD:
        transition(action)
    for held in HELD:
        if not any(t.target == held and t.by == "person" for t in TRANSITIONS.values()):
            raise AssertionError(f"{held} is held but no person sets it")


_validate()
