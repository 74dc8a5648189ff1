"""Real OS processes race on the same agent: the compare-and-set lets exactly one win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import tether
from tether import lifecycle
from tether.lifecycle import LifecycleState as S

RACER = Path(__file__).parent / "procs" / "race_transition.py"
ROUNDS = 5
RACERS = 3
LOSING = {"InvalidTransition", "ConflictError"}


def race(db_url: str, plans: list[list[tuple[str, str]]], cwd: Path) -> list[dict[str, Any]]:
    """Start one process per plan, release them together, and return every outcome."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(RACER), db_url, json.dumps(plan)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for plan in plans
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                proc.kill()
                raise AssertionError(f"racer did not start: {line!r} {proc.communicate()[1]}")
        t0 = time.time() + 0.05
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{t0!r}\n")
            proc.stdin.flush()
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            outcomes.extend(json.loads(line) for line in out.splitlines())
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def replay(history: list[tether.types.HistoryEntry]) -> S:
    state = S.CREATED
    for entry in history[1:]:
        assert entry.from_state == state
        assert lifecycle.check("replay", state, entry.action) == entry.to_state
        state = entry.to_state
    return state


def test_racing_activations_let_exactly_one_process_win(db_url: str, tmp_path: Path) -> None:
    agents = [f"race-{i}" for i in range(ROUNDS)]
    with tether.App(db_url, require_types=False) as app:
        for agent_id in agents:
            app.create_agent("racer", agent_id)
            app.initialize(agent_id)

    plan = [(agent_id, "activate") for agent_id in agents]
    outcomes = race(db_url, [plan] * RACERS, tmp_path)

    assert len(outcomes) == ROUNDS * RACERS
    with tether.App(db_url, require_types=False) as app:
        for agent_id in agents:
            results = Counter(o["outcome"] for o in outcomes if o["agent_id"] == agent_id)
            assert results["ok"] == 1, (agent_id, results)
            assert set(results) - {"ok"} <= LOSING, (agent_id, results)
            actions = [h.action for h in app.agent_history(agent_id)]
            assert actions == ["create", "initialize", "activate"]
            assert app.get_agent(agent_id).lifecycle == S.ACTIVE


def test_racing_different_actions_record_exactly_what_callers_were_told(
    db_url: str, tmp_path: Path
) -> None:
    agents = [f"mixed-{i}" for i in range(ROUNDS)]
    with tether.App(db_url, require_types=False) as app:
        for agent_id in agents:
            app.create_agent("racer", agent_id)
            app.initialize(agent_id)
            app.activate(agent_id)

    actions = ["pause", "terminate", "fail"]
    plans = [[(agent_id, action) for agent_id in agents] for action in actions]
    outcomes = race(db_url, plans, tmp_path)

    with tether.App(db_url, require_types=False) as app:
        for agent_id in agents:
            mine = [o for o in outcomes if o["agent_id"] == agent_id]
            won = Counter(o["action"] for o in mine if o["outcome"] == "ok")
            assert won, f"no racer won on {agent_id}"
            assert {o["outcome"] for o in mine} - {"ok"} <= LOSING
            history = app.agent_history(agent_id)
            raced = Counter(h.action for h in history[3:])
            assert raced == won, (agent_id, mine)
            assert replay(history) == app.get_agent(agent_id).lifecycle


def test_a_racer_that_loses_reports_the_error_instead_of_crashing(
    sqlite_url: str, tmp_path: Path
) -> None:
    with tether.App(sqlite_url, require_types=False) as app:
        app.create_agent("racer", "done")
        app.terminate("done")
    outcomes = race(sqlite_url, [[("done", "activate")]] * 2, tmp_path)
    assert [o["outcome"] for o in outcomes] == ["InvalidTransition"] * 2
