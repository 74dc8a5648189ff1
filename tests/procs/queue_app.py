"""An app for the queue tests: agent types with caps whose step bodies log when they begin and
end (with the worker's pid) to an outside log, the ground truth of what ran at once.

Run a worker with ``python -m tests.procs.queue_app [seconds] [concurrency]`` (until idle).
Configured by environment: TETHER_TEST_DB (URL), TETHER_TEST_LOG (log path),
TETHER_TEST_LEASE (lease seconds).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import tether

CAP = 3
"""Runs of type ``capped`` executing at once, across all workers."""
RATE = "4/s"
"""Claims of type ``metered`` per window."""

app = tether.App(
    os.environ.get("TETHER_TEST_DB"),
    lease_ttl=float(os.environ.get("TETHER_TEST_LEASE", "5")),
)
LOG = os.environ.get("TETHER_TEST_LOG", "queue.log")


def _append(line: str) -> None:
    with open(LOG, "a") as log:
        log.write(f"{line} {os.getpid()}\n")


def body(seconds: float) -> None:
    """A step body: a BEGIN line, some work, then a DONE line."""
    run_id = tether.current_step().run_id
    _append(f"BEGIN {run_id}")
    time.sleep(seconds)
    _append(f"DONE {run_id}")


@app.agent("capped", max_concurrent_runs=8, type_concurrency=CAP)
def capped(ctx: tether.RunContext, task: dict) -> None:
    ctx.step(body, task["sleep"])


@app.agent("metered", max_concurrent_runs=8, rate_limit=RATE)
def metered(ctx: tether.RunContext, task: dict) -> None:
    ctx.step(body, task.get("sleep", 0.0))


@app.agent("doorstop", max_concurrent_runs=1)
def doorstop(ctx: tether.RunContext, task: dict) -> None:
    """Never claimed (its run is submitted with a cap of 0): keeps idle workers looking."""


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    app.work(until_idle=True, concurrency=concurrency, timeout=timeout)
