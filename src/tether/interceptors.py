"""Interceptors: code around every executed step attempt (``App(interceptors=[...])``).

The engine's step driver (``tether.engine.steps``) calls them; budgets, policies, approvals
before tools and telemetry are interceptors. This module only declares them, so that
``import tether`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepAttempt:
    """What interceptors see of an attempt about to run (or that just ran)."""

    run_id: str
    agent_id: str
    seq: int
    name: str
    attempt: int
    idempotency_key: str
    tool: str | None
    cost: float | None
    tokens: int | None
    at_most_once: bool


class Interceptor:
    """Code around every executed step attempt; override what you need.

    Hooks run on the handler's thread (the event loop for async handlers): keep them quick.
    """

    def before_step(self, step: StepAttempt) -> None:
        """The attempt's body is about to start; raise to fail the attempt instead."""

    def after_step(self, step: StepAttempt, output: Any) -> None:
        """The body returned ``output`` (its commit follows)."""

    def step_failed(self, step: StepAttempt, error: BaseException) -> None:
        """The body (or a ``before_step``) raised ``error``; the retry decision follows."""
