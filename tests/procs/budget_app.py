"""An app for crash and race tests of budgets: every metered step appends to an outside effect
log (one line, written before the step returns), the ground truth of what really ran.

Run a worker of it: ``python -m tests.procs.budget_app SECONDS CONCURRENCY [--until-idle]``
(without ``--until-idle`` it works until killed or ``SECONDS`` have passed).

Configured by environment like ``tests/procs/coordination_app.py``: TETHER_TEST_DB (URL),
TETHER_TEST_LOG (log path), TETHER_TEST_LEASE (lease seconds).

Agents:

- ``tree``: metered steps, then (above depth 0) children of its own agent, the first of them
  with a budget of its own, waited for together, and one more called; then more steps.
- ``fanout``: spawns ``kids`` children, then waits for each, going on without those that
  failed (a child that would go over the budget fails with ``BudgetExceeded``).
- ``kid``: waits until the ``go`` file exists (claimed, holding its worker's slot), then runs
  ``steps`` steps that declare ``cost``, each reporting ``report`` if given.

Log lines (fields separated by spaces, the writing process's pid last):

- ``BEGIN run seq pid``: a step body starts (after its reservation).
- ``DONE run seq token pid``: it did its work; the step returns ``token`` (its commit follows).
- ``READY run pid``: a ``kid`` is claimed and waits for the go file.
- ``BODY run seq started finished pid``: a ``kid`` step's body ran from ``started`` to
  ``finished`` (wall clock).
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tether

LOG = os.environ.get("TETHER_TEST_LOG", "effects.log")


def _append(*fields: object) -> None:
    with open(LOG, "a") as log:
        log.write("\n" + " ".join(str(f) for f in (*fields, os.getpid())))


@dataclass(frozen=True)
class Meter:
    """How a kind of step of ``tree`` is metered: what it declares up front and what its body
    reports. Amounts are sums of powers of two, so float sums are exact in any order."""

    tool: str | None
    cost: float | None
    tokens: int | None
    reported_cost: float | None = None
    reported_tokens: int | None = None

    @property
    def used(self) -> tuple[float | None, int | None]:
        """What a completed step commits: the reported usage, else the declared."""
        cost = self.cost if self.reported_cost is None else self.reported_cost
        tokens = self.tokens if self.reported_tokens is None else self.reported_tokens
        return cost, tokens


METERS = (
    Meter("web", 0.125, None),
    Meter("llm", 0.25, 64, reported_cost=0.375, reported_tokens=96),
    Meter(None, 0.0625, 32, reported_tokens=48),
)
"""Step ``s{i}`` of ``tree`` is metered by ``METERS[i % 3]``."""

TREE_BUDGET = tether.Budget(max_cost=1000.0, max_steps=100_000, max_tokens=10_000_000)
"""The budget a test gives each ``tree`` root: wide enough that no step is refused."""
CHILD_BUDGET = tether.Budget(max_cost=500.0, max_steps=50_000, max_tokens=5_000_000)
"""The budget of its own that the first child of every ``tree`` gets."""


def metered(meter: int) -> str:
    """A step body: a BEGIN line, its usage reported, some work, then a DONE line naming this
    execution."""
    step = tether.current_step()
    kind = METERS[meter]
    token = uuid.uuid4().hex
    _append("BEGIN", step.run_id, step.seq)
    if kind.reported_cost is not None or kind.reported_tokens is not None:
        step.report(cost=kind.reported_cost, tokens=kind.reported_tokens)
    time.sleep(0.003)
    _append("DONE", step.run_id, step.seq, token)
    return token


def _steps(ctx: tether.RunContext, first: int, last: int) -> list[str]:
    tokens = []
    for i in range(first, last):
        meter = i % len(METERS)
        kind = METERS[meter]
        token = ctx.step(
            metered, meter, name=f"s{i}", tool=kind.tool, cost=kind.cost, tokens=kind.tokens
        )
        tokens.append(token)
    return tokens


def tree(ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """``steps`` metered steps, half before its children and half after; above depth 0,
    ``fan`` children of its own agent (the first with ``CHILD_BUDGET``) waited for together,
    then one more called. Its result: its steps' outputs and its children's results."""
    half = task["steps"] // 2
    tokens = _steps(ctx, 0, half)
    kids: list[Any] = []
    if task["depth"] > 0:
        below = {**task, "depth": task["depth"] - 1}
        handles = [
            ctx.spawn(ctx.agent_id, below, budget=CHILD_BUDGET if j == 0 else None)
            for j in range(task["fan"])
        ]
        kids = ctx.wait(handles)
        kids.append(ctx.call(ctx.agent_id, below))
    tokens += _steps(ctx, half, task["steps"])
    return {"tokens": tokens, "kids": kids}


def body(shortest: float, longest: float, report: float | None) -> str:
    """A ``kid`` step body: one BODY line with when it ran, written when it ends. Bodies take
    different times, so children commit and ask for more while others are in flight."""
    step = tether.current_step()
    started = time.time()
    if report is not None:
        step.report(cost=report)
    time.sleep(random.uniform(shortest, longest))
    _append("BODY", step.run_id, step.seq, repr(started), repr(time.time()))
    return f"{step.run_id}/{step.seq}"


def kid(ctx: tether.RunContext, task: dict[str, Any]) -> list[str]:
    _append("READY", ctx.run_id)
    go, deadline = Path(task["go"]), time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    shortest, longest = task["sleep"]
    report, cost = task.get("report"), task["cost"]
    return [
        ctx.step(body, shortest, longest, report, name=f"k{i}", tool="web", cost=cost)
        for i in range(task["steps"])
    ]


def fanout(ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """Spawns ``kids`` children of ``kid`` with ``task["child"]``, then waits for each: the
    results of those that completed and the errors of those that failed."""
    handles = [ctx.spawn(task["kid"], task["child"]) for _ in range(task["kids"])]
    done: dict[str, Any] = {}
    failed: dict[str, Any] = {}
    for handle in handles:
        try:
            [done[handle.run_id]] = ctx.wait(handle)
        except tether.ChildRunFailed as exc:
            failed[handle.run_id] = exc.error
    return {"done": done, "failed": failed}


def register(app: tether.App) -> None:
    """Register the agent types on ``app`` (the tests' own app too: it submits with the
    types' options)."""
    for handler in (tree, fanout, kid):
        app.agent(handler.__name__, max_concurrent_runs=32)(handler)


if __name__ == "__main__":
    import logging

    app = tether.App(
        os.environ.get("TETHER_TEST_DB"),
        lease_ttl=float(os.environ.get("TETHER_TEST_LEASE", "2")),
    )
    register(app)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    seconds, concurrency = float(sys.argv[1]), int(sys.argv[2])
    worker = app.worker(concurrency=concurrency, poll_interval=0.05)
    worker.run(until_idle="--until-idle" in sys.argv, timeout=seconds)
