"""Real OS processes race on the same agent: the compare-and-set lets exactly one win.

Each round is gated (``tests.racekit``): the racers read the agent, queue behind a transaction
that holds its row, and go when it commits; a round fails unless every racer's call spans
that moment, so a race whose racers took turns cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import tether
from tests import racekit
from tether import lifecycle
from tether.lifecycle import LifecycleState as S

RACER = Path(__file__).parent / "procs" / "race_transition.py"
ROUNDS = 5
RACERS = 3
LOSING = {"InvalidTransition", "ConflictError"}

Plan = list[tuple[str, str]]


def race(
    db_url: str, plans: list[Plan], cwd: Path, gate_first: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Start one process per plan, race them round by round through the gate, and return
    every outcome, each with the time its round's gate opened (``opened``). ``gate_first``
    (agent, action) is applied by the gate itself, in its transaction, before it opens."""
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
            expect(proc, "ready")
        outcomes = []
        with tether.App(db_url, require_types=False) as app:
            for round_ in range(len(plans[0])):
                raced = sorted({plan[round_][0] for plan in plans})
                opened = gated(app, raced, procs, gate_first)
                mine = [json.loads(expect(proc)) for proc in procs]
                racekit.assert_all_inside(opened, mine)
                outcomes.extend({**outcome, "opened": opened} for outcome in mine)
        for proc in procs:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def gated(
    app: tether.App,
    agent_ids: list[str],
    procs: list[subprocess.Popen[str]],
    first: tuple[str, str] | None,
) -> float:
    """Tell every racer to go, wait until all are queued behind the gate, apply ``first`` if
    given, then open the gate; returns the time it opened."""
    with racekit.gate(app, agent_ids) as gate:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            expect(proc, "entering")
        gate.hold_until_queued(len(procs))
        if first is not None:
            agent_id, action = first
            app.store.transition_agent(
                agent_id, action, reason="race", actor="gate", conn=gate.conn
            )
    return gate.opened


def expect(proc: subprocess.Popen[str], line: str | None = None) -> str:
    """The racer's next line (which must be ``line`` if given); fails with its stderr."""
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    if not got or (line is not None and got != line):
        proc.kill()
        raise AssertionError(f"racer said {got!r}, not {line!r}: {proc.communicate()[1]}")
    return got


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


def test_racers_that_lose_report_the_error_instead_of_crashing(db_url: str, tmp_path: Path) -> None:
    with tether.App(db_url, require_types=False) as app:
        app.create_agent("racer", "done")
        app.initialize("done")
    # Both racers find the agent initialized and queue to activate it; the gate terminates it.
    outcomes = race(
        db_url, [[("done", "activate")]] * 2, tmp_path, gate_first=("done", "terminate")
    )

    assert len(outcomes) == 2
    assert {o["outcome"] for o in outcomes} <= LOSING, outcomes
    with tether.App(db_url, require_types=False) as app:
        assert [h.action for h in app.agent_history("done")][2:] == ["terminate"]
        assert app.get_agent("done").lifecycle == S.TERMINATED
