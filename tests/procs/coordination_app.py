"""An app for crash tests of messages and delegation: every step appends to an outside effect
log (one line, written before the step returns), the ground truth of what really ran.

Run a worker of it: ``python -m tests.procs.coordination_app SECONDS CONCURRENCY [--until-idle]``
(without ``--until-idle`` it works until killed or ``SECONDS`` have passed).

Configured by environment like ``tests/procs/crash_app.py``: TETHER_TEST_DB (URL),
TETHER_TEST_LOG (log path), TETHER_TEST_LEASE (lease seconds).

Log lines (fields separated by spaces, the writing process's pid last):

- ``MADE run i token pid``: a producer or sender made the value of its message ``i``.
- ``PROC message_id logical_id idempotency_key run seq token pid``: a consumer processed a
  message it received (the step's idempotency key names the run and journal position).
- ``PLAN parent i pid``: a parent is about to start its child ``i``.
- ``CHILD child_run parent i token pid``: a child did its work.
- ``AFTER run attempt pid``: a sender's step after its send (it hangs on the first attempt).
- ``READY run pid``, ``ENTER run time pid``, ``LEFT run time pid``: a racer is claimed and
  waiting for the go file, is about to call ``receive``, and left it (returned or parked).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import tether

LOG = os.environ.get("TETHER_TEST_LOG", "effects.log")


def _append(*fields: object) -> None:
    with open(LOG, "a") as log:
        log.write("\n" + " ".join(str(f) for f in (*fields, os.getpid())))


# -- messages -------------------------------------------------------------------------------


def made(i: int) -> str:
    token = uuid.uuid4().hex
    _append("MADE", tether.current_step().run_id, i, token)
    time.sleep(0.002)
    return token


def processed(message_id: str, logical_id: str) -> str:
    step = tether.current_step()
    token = uuid.uuid4().hex
    _append("PROC", message_id, logical_id, step.idempotency_key, step.run_id, step.seq, token)
    time.sleep(0.002)
    return token


def producer(ctx: tether.RunContext, task: dict[str, Any]) -> list[str]:
    """Sends ``count`` messages, round robin to the agents ``to``, each carrying the output of
    the step before it; odd ones with a key of their own, even ones with the default key."""
    sent = []
    for i in range(task["count"]):
        value = ctx.step(made, i, name="make")
        to = task["to"][i % len(task["to"])]
        logical_id = f"{ctx.run_id}/{i}"
        key = f"key/{logical_id}" if i % 2 else None
        sent.append(ctx.send(to, {"id": logical_id, "value": value}, key=key))
    return sent


def consumer(ctx: tether.RunContext, task: dict[str, Any]) -> list[list[str]]:
    """Receives ``count`` messages and processes each in a step."""
    got = []
    for _ in range(task["count"]):
        message = ctx.receive()
        assert message is not None
        token = ctx.step(processed, message.message_id, message.payload["id"], name="process")
        got.append([message.message_id, message.payload["value"], token])
    return got


# -- delegation -----------------------------------------------------------------------------


def plan(i: int) -> int:
    _append("PLAN", tether.current_step().run_id, i)
    time.sleep(0.002)
    return i


def work(i: int) -> str:
    run = tether.current_run()
    token = uuid.uuid4().hex
    _append("CHILD", run.run_id, run.parent_run_id, i, token)
    time.sleep(0.002)
    return token


def parent(ctx: tether.RunContext, task: dict[str, Any]) -> list[dict[str, Any]]:
    """Spawns ``fan`` children, waits for all of them, then calls one more: their results,
    in order."""
    handles = []
    for i in range(task["fan"]):
        ctx.step(plan, i, name="plan")
        handles.append(ctx.spawn(task["kid"], {"i": i}))
    results = ctx.wait(handles)
    ctx.step(plan, task["fan"], name="plan")
    results.append(ctx.call(task["kid"], {"i": task["fan"]}))
    return results


def child(ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
    return {"i": task["i"], "token": ctx.step(work, task["i"], name="work")}


# -- a send, then a crash before the next commit ---------------------------------------------


def hang(attempt: int) -> None:
    _append("AFTER", tether.current_step().run_id, attempt)
    if attempt == 1:
        time.sleep(120)  # the test kills the worker here


def sender(ctx: tether.RunContext, task: dict[str, Any]) -> str:
    value = ctx.step(made, 0, name="make")
    message_id = ctx.send(task["to"], {"value": value}, key=task.get("key"))
    ctx.step(hang, ctx.attempt, name="after-send")
    return message_id


# -- racers for one message ------------------------------------------------------------------


def racer(ctx: tether.RunContext, task: dict[str, Any]) -> str:
    """Waits (claimed, in its worker) until the go file exists, then receives one message."""
    _append("READY", ctx.run_id)
    go = Path(task["go"])
    while not go.exists():
        time.sleep(0.002)
    _append("ENTER", ctx.run_id, repr(time.time()))
    try:
        message = ctx.receive()
    finally:
        _append("LEFT", ctx.run_id, repr(time.time()))
    assert message is not None
    return message.message_id


def register(app: tether.App) -> None:
    """Register the agent types on ``app`` (the tests' own app too: it submits with the
    types' options)."""
    for handler in (producer, consumer, parent, child, sender, racer):
        app.agent(handler.__name__, max_concurrent_runs=8)(handler)


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
