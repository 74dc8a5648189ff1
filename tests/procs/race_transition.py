"""Race helper: apply lifecycle actions when told to, from a separate OS process.

Usage: python race_transition.py DATABASE_URL PLAN_JSON

PLAN_JSON is a list of ``[agent_id, action]``, one per round. The process opens the database
and prints ``ready``. For each round it then reads one line (``go``) from stdin, prints
``entering`` and applies the action, and prints one JSON line: ``{"round": i, "agent_id",
"action", "outcome": "ok" | error class name, "started", "finished"}`` (wall-clock times taken
just before and after the call, which tell whether the racers were inside their calls at once).
"""

from __future__ import annotations

import json
import os
import sys
import time

import tether


def main() -> int:
    url, plan = sys.argv[1], json.loads(sys.argv[2])
    app = tether.App(url, require_types=False)
    for agent_id, _ in plan:  # open the database and warm the connection pool
        app.get_agent(agent_id)
    print("ready", flush=True)
    for i, (agent_id, action) in enumerate(plan):
        if sys.stdin.readline().strip() != "go":
            return 1
        started = time.time()
        print("entering", flush=True)
        try:
            getattr(app, action)(agent_id, reason="race", actor=f"pid-{os.getpid()}")
            outcome = "ok"
        except tether.ConflictError as exc:  # InvalidTransition is a ConflictError
            outcome = type(exc).__name__
        result = {
            "round": i,
            "agent_id": agent_id,
            "action": action,
            "outcome": outcome,
            "started": started,
            "finished": time.time(),
        }
        print(json.dumps(result), flush=True)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
