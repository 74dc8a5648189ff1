"""Where code is running: in which run (``current_run()``) and in which step (``current_step()``).

Both are context variables, so they follow the code into threads started by the engine (a
step with a timeout) and into ``await``-ed coroutines, and framework adapters can find the run
they execute in without a ``ctx`` being passed down.
"""

from __future__ import annotations

import contextvars
import numbers
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunScope:
    """What code inside a handler can learn about the run it executes in."""

    run_id: str
    agent_id: str
    agent_type: str
    attempt: int
    """How many times the run has been claimed (1 on its first execution)."""
    parent_run_id: str | None


class Meter:
    """What a step attempt reported of its usage from inside (``StepScope.report``)."""

    __slots__ = ("cost", "tokens")

    def __init__(self) -> None:
        self.cost: float | None = None
        self.tokens: int | None = None


def _amount(name: str, value: Any, whole: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0:
        raise ValueError(f"report({name}=...) needs a number >= 0, got {value!r}")
    if whole and int(float(value)) != float(value):
        raise ValueError(f"report(tokens=...) needs a whole number, got {value!r}")
    return int(float(value)) if whole else float(value)


@dataclass(frozen=True)
class StepScope:
    """What a step function can learn about the step it runs in (``tether.current_step()``)."""

    run_id: str
    seq: int
    name: str
    attempt: int
    idempotency_key: str
    """Stable across attempts and crashes: pass it to outside systems to deduplicate effects."""
    tool: str | None = None
    """The tool the step declared (``ctx.step(..., tool=...)``), if any."""
    meter: Meter | None = field(default=None, repr=False, compare=False)

    def report(self, *, cost: float | None = None, tokens: int | None = None) -> None:
        """Report what this attempt actually used (added to earlier reports of it): it is
        committed with the step's result and charged to the budgets instead of what the step
        declared up front (``ctx.step(..., cost=, tokens=)``)."""
        meter = self.meter
        if meter is None:
            return
        if cost is not None:
            meter.cost = (meter.cost or 0.0) + _amount("cost", cost, False)
        if tokens is not None:
            meter.tokens = (meter.tokens or 0) + _amount("tokens", tokens, True)


ScopeFields = tuple[str, int, str, int, str, str | None, Meter]
"""A ``StepScope``'s fields, in order: what a step body carries until it asks for its scope
(most never do, and every step would pay for the object)."""

_run: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar("tether_run", default=None)
_step: contextvars.ContextVar[StepScope | ScopeFields | None] = contextvars.ContextVar(
    "tether_step", default=None
)


def current_run() -> RunScope:
    """The run being executed; raises ``RuntimeError`` outside a run's handler."""
    scope = _run.get()
    if scope is None:
        raise RuntimeError("tether.current_run() is only available while a run executes")
    return scope


def current_step() -> StepScope:
    """The step being executed; raises ``RuntimeError`` outside a step body."""
    scope = _step.get()
    if scope is None:
        raise RuntimeError("tether.current_step() is only available inside a step function")
    if isinstance(scope, tuple):
        scope = StepScope(*scope)
        _step.set(scope)
    return scope


def in_step_body() -> StepScope | None:
    """The step whose body is running here, or None (between steps, or outside a run)."""
    return None if _step.get() is None else current_step()


body_running = _step.get
"""Truthy while a step body runs here (cheaper than ``in_step_body`` on the hot path)."""


def enter_run(scope: RunScope) -> contextvars.Token[RunScope | None]:
    """Mark the current context as executing ``scope``'s run; undo with ``leave_run``."""
    return _run.set(scope)


def leave_run(token: contextvars.Token[RunScope | None]) -> None:
    """Undo ``enter_run``."""
    _run.reset(token)


enter_step = _step.set
"""Mark the current context as running a step body (its ``StepScope`` or its fields); undo
with ``leave_step``."""

leave_step = _step.reset
"""Undo ``enter_step``."""
