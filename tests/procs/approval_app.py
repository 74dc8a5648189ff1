"""An app for crash tests of approvals: a run prepares, asks a person, and only if approved
runs its gated step; every step appends to an outside effect log (one line, written before
the step returns), the ground truth of what really ran.

Run a worker of it: ``python -m tests.procs.approval_app SECONDS CONCURRENCY [--until-idle]``
(without ``--until-idle`` it works until killed or ``SECONDS`` have passed).

Configured by environment like ``tests/procs/coordination_app.py``: TETHER_TEST_DB (URL),
TETHER_TEST_LOG (log path), TETHER_TEST_LEASE (lease seconds), and TETHER_TEST_HANG: a
worker started with it stops at that point of every run it executes, until it is killed:

- ``approve``: in the handler, right before ``ctx.approve`` (on a replay after the decision:
  the claim is committed, the decision not consumed yet);
- ``decided``: in the handler, right after ``ctx.approve`` returns (the decision consumed and
  journaled, the gated step not started);
- ``after``: inside the step after the gated one (the decision consumed, the gated step
  journaled).

Log lines (fields separated by spaces, the writing process's pid last):

- ``ENTER run attempt pid``: the handler starts (its first execution, or a replay).
- ``PREP run token pid``: the step before the approval.
- ``HANG run point attempt pid``: this worker stops here until killed.
- ``SHIP run token pid``: the gated step, run only when approved.
- ``AFTER run attempt token pid``: the step after it.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import tether

LOG = os.environ.get("TETHER_TEST_LOG", "effects.log")
HANG = os.environ.get("TETHER_TEST_HANG", "")


def _append(*fields: object) -> None:
    with open(LOG, "a") as log:
        log.write("\n" + " ".join(str(f) for f in (*fields, os.getpid())))


def _hang(point: str, run_id: str, attempt: int) -> None:
    if point == HANG:
        _append("HANG", run_id, point, attempt)
        time.sleep(300)  # the test kills the worker here


def prepare() -> str:
    token = uuid.uuid4().hex
    _append("PREP", tether.current_step().run_id, token)
    time.sleep(0.002)
    return token


def ship() -> str:
    """The gated effect."""
    token = uuid.uuid4().hex
    _append("SHIP", tether.current_step().run_id, token)
    time.sleep(0.002)
    return token


def after(attempt: int) -> str:
    token = uuid.uuid4().hex
    _append("AFTER", tether.current_step().run_id, attempt, token)
    _hang("after", tether.current_step().run_id, attempt)
    time.sleep(0.002)
    return token


def gatekeeper(ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """Prepares, asks whether to ship ``{"n": task["n"]}``, ships only if approved, then
    runs one more step. The result: the steps' outputs and the decision received."""
    _append("ENTER", ctx.run_id, ctx.attempt)
    prepared = ctx.step(prepare, name="prepare")
    _hang("approve", ctx.run_id, ctx.attempt)
    decision = ctx.approve("Ship?", {"n": task["n"]})
    _hang("decided", ctx.run_id, ctx.attempt)
    shipped = ctx.step(ship, name="ship") if decision else None
    finished = ctx.step(after, ctx.attempt, name="after")
    return {
        "prepared": prepared,
        "shipped": shipped,
        "after": finished,
        "decision": {
            "approved": decision.approved,
            "decided_by": decision.decided_by,
            "source": decision.source,
            "comment": decision.comment,
            "approval_id": decision.approval_id,
        },
    }


def register(app: tether.App) -> None:
    """Register the agent type on ``app`` (the tests' own app too: it submits with the
    type's options)."""
    app.agent("gatekeeper", max_concurrent_runs=8)(gatekeeper)


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
