"""An app for crash tests: every step appends to an outside side-effect log, then returns a
token that identifies that one execution. The log is the ground truth of what really ran.

Configured by environment: TETHER_TEST_DB (URL), TETHER_TEST_LOG (log path),
TETHER_TEST_LEASE (lease seconds).
"""

from __future__ import annotations

import os
import time
import uuid

import tether

app = tether.App(
    os.environ.get("TETHER_TEST_DB"),
    lease_ttl=float(os.environ.get("TETHER_TEST_LEASE", "2")),
)
LOG = os.environ.get("TETHER_TEST_LOG", "effects.log")


def _append(line: str) -> None:
    with open(LOG, "a") as log:
        log.write("\n" + line)


def effect(seq: int, seconds: float) -> str:
    """The side effect: a BEGIN line, some work, then a DONE line naming this execution."""
    step = tether.current_step()
    token = uuid.uuid4().hex
    _append(f"BEGIN {step.run_id} {seq} {os.getpid()}")
    time.sleep(seconds)
    _append(f"DONE {step.run_id} {seq} {token} {os.getpid()}")
    return token


@app.agent("crasher", max_concurrent_runs=8)
def crasher(ctx: tether.RunContext, task: dict) -> list[str]:
    return [
        ctx.step(effect, seq, task.get("sleep", 0.005), name=f"effect-{seq}")
        for seq in range(1, task["steps"] + 1)
    ]


@app.agent("swallower", max_concurrent_runs=8)
def swallower(ctx: tether.RunContext, task: dict) -> list[str | None]:
    """Written as users do: every step in a ``try/except Exception`` that logs and goes on.
    The engine's control signals must get through it."""
    tokens: list[str | None] = []
    for seq in range(1, task["steps"] + 1):
        try:
            tokens.append(ctx.step(effect, seq, task.get("sleep", 0.005), name=f"effect-{seq}"))
        except Exception:
            tokens.append(None)
    return tokens
