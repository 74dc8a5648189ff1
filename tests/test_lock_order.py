"""Pausing and resuming an agent while its run commits steps that change the agent's state: both
lock the agent's row and the run's, and they take them in the same order (agent, then run), so
neither deadlocks nor fails. On PostgreSQL the server's own deadlock counter must not move."""

from __future__ import annotations

import random
import time
from typing import Any

import tether
from tests.flavors import register
from tether.testing import active_agent, background_worker

STEPS = 150
TOGGLES = 400


def deadlocks(app: tether.App) -> int | None:
    """PostgreSQL's count of deadlocks detected in this database (None on SQLite)."""
    if app.store.dialect != "postgresql":
        return None
    from sqlalchemy import text

    with app.store.db.read() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
        )


def tick(n: int) -> int:
    time.sleep(0.002)  # long enough a run for pauses to land while it executes
    return n


def test_pausing_an_agent_while_its_run_commits_state_neither_deadlocks_nor_fails(
    app: tether.App, flavor: str
) -> None:
    def handler(ctx: Any, task: Any) -> Any:
        for n in range(1, STEPS + 1):
            ctx.state["n"] = n  # every step's write changes the agent's row too
            yield ctx.step(tick, n, name="tick")
        return ctx.state["n"]

    register(app, flavor, "ticker", handler)
    active_agent(app, "ticker", "t1")
    before = deadlocks(app)
    run = app.submit("t1")
    errors: list[BaseException] = []
    rng = random.Random()

    def landed_mid_run() -> bool:
        return "run.paused_at_boundary" in [e.type for e in app.timeline(run.run_id)]

    with background_worker(app, concurrency=2):
        # Toggle until a pause has landed between two of the run's commits (the racers
        # overlapped), and then a few times more.
        for toggle in range(TOGGLES):
            if run.status().is_final or (toggle % 10 == 9 and landed_mid_run()):
                break
            try:
                app.pause("t1", reason="race")
                time.sleep(rng.uniform(0, 0.01))
                app.resume("t1", reason="race")
            except Exception as exc:
                errors.append(exc)
            time.sleep(rng.uniform(0, 0.02))
        assert run.result(timeout=120) == STEPS

    assert errors == []
    timeline = [e.type for e in app.timeline(run.run_id)]
    # The racers overlapped: pauses landed while the run was executing, between its commits.
    assert "run.paused_at_boundary" in timeline
    assert app.incidents(run_id=run.run_id) == []
    assert app.get_agent("t1").state == {"n": STEPS}
    if before is not None:
        time.sleep(1.0)  # the server publishes its counters about once a second
        assert deadlocks(app) == before
