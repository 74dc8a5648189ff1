"""Race helper: apply lifecycle actions at agreed instants, from a separate OS process.

Usage: python race_transition.py DATABASE_URL PLAN_JSON

PLAN_JSON is a list of ``[agent_id, action]``, one per round. The process opens the database,
prints ``ready``, then reads one line from stdin: the wall-clock start time ``t0`` shared by
every racer. Round ``i`` starts at ``t0 + i * GAP``. For each round it prints one JSON line:
``{"round": i, "agent_id", "action", "outcome": "ok" | error class name, "started",
"finished"}`` (wall-clock times, to see how closely the racers overlapped).
"""

from __future__ import annotations

import json
import os
import sys
import time

import tether

GAP = 0.1


def wait_until(instant: float) -> None:
    remaining = instant - time.time()
    if remaining > 0.005:
        time.sleep(remaining - 0.005)
    while time.time() < instant:  # spin the last few milliseconds for a tight start
        pass


def main() -> int:
    url, plan = sys.argv[1], json.loads(sys.argv[2])
    app = tether.App(url, require_types=False)
    for agent_id, _ in plan:  # open the database and warm the connection pool
        app.get_agent(agent_id)
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    results = []
    for i, (agent_id, action) in enumerate(plan):
        wait_until(t0 + i * GAP)
        started = time.time()
        try:
            getattr(app, action)(agent_id, reason="race", actor=f"pid-{os.getpid()}")
            outcome = "ok"
        except tether.ConflictError as exc:  # InvalidTransition is a ConflictError
            outcome = type(exc).__name__
        results.append(
            {
                "round": i,
                "agent_id": agent_id,
                "action": action,
                "outcome": outcome,
                "started": started,
                "finished": time.time(),
            }
        )
    for result in results:
        print(json.dumps(result), flush=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
