"""Crash suite: real worker processes killed with SIGKILL at random moments.

Every step of the test app appends to an outside effect log before it returns, and returns a
token naming that one execution. After each kill a new worker resumes; then, for every run:

- the run completed and its journal holds steps 1..N, each completed (nothing lost);
- every step completed in the journal right after the kill still holds the same output;
- the execution whose output the journal holds is the *last* execution of that step in the
  effect log: once a step's result was committed, the step never ran again;
- a step ran at most once more than the number of kills (a step in flight at a kill may rerun).

``TETHER_STRESS=1`` runs 300 trials per database instead of 30; ``TETHER_CRASH_SEED`` replays
a failing trial sequence.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

import tether
from tests.crashkit import Effects, start_worker, wait_for_lines, worker_env

STRESS = bool(os.environ.get("TETHER_STRESS"))
TRIALS = int(os.environ.get("TETHER_CRASH_TRIALS", "300" if STRESS else "30"))
RUNS_PER_TRIAL = 3
STEPS_PER_RUN = 6


def _journal(app: tether.App, run_ids: list[str]) -> dict[str, dict[int, object]]:
    return {
        run_id: {s.seq: s.output for s in app.run_steps(run_id) if s.status.value == "completed"}
        for run_id in run_ids
    }


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_never_repeats_a_finished_step_nor_loses_one(
    db_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("TETHER_CRASH_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    print(f"crash suite seed={seed} trials={TRIALS} db={db_url.split(':')[0]}")
    log = tmp_path / "effects.log"
    env = worker_env(db_url, log, lease=2.0)
    app = tether.App(db_url, require_types=False)
    app.create_agent("crasher", "c1")
    app.initialize("c1")
    app.activate("c1")
    totals = {"kills": 0, "reruns_in_flight": 0, "finished_rerun": 0, "lost": 0, "runs": 0}
    try:
        for trial in range(TRIALS):
            run_ids = [
                app.submit("c1", {"steps": STEPS_PER_RUN}).run_id for _ in range(RUNS_PER_TRIAL)
            ]
            # Kill on seeing the k-th BEGIN (inside a step body) or DONE (between a step's effect
            # and its commit), after a random extra pause: anywhere in a step, commit or claim.
            marker = rng.choice(["BEGIN", "DONE"])
            before = log.read_text().count(f"\n{marker} ") if log.exists() else 0
            target = rng.randint(1, RUNS_PER_TRIAL * STEPS_PER_RUN - 1)
            first = start_worker(env)
            wait_for_lines(log, marker, before + target, first)
            time.sleep(rng.choice([0.0, 0.0, rng.random() * 0.01]))
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            totals["kills"] += 1
            committed = _journal(app, run_ids)

            second = start_worker(env)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 0, f"trial {trial} (seed {seed}): worker failed:\n{err}"

            effects = Effects.read(log)
            final = _journal(app, run_ids)
            for run_id in run_ids:
                totals["runs"] += 1
                run = app.get_run(run_id)
                assert run.status.value == "completed", f"trial {trial}: {run_id} {run.status}"
                journal = final[run_id]
                assert sorted(journal) == list(range(1, STEPS_PER_RUN + 1)), (
                    f"trial {trial} (seed {seed}): journal of {run_id} has holes: {sorted(journal)}"
                )
                assert run.result == [journal[i] for i in range(1, STEPS_PER_RUN + 1)]
                for seq, output in committed[run_id].items():
                    if journal.get(seq) != output:
                        totals["lost"] += 1
                for seq, output in journal.items():
                    executions = [token for token, _pid in effects.done[(run_id, seq)]]
                    assert output in executions, f"{run_id} step {seq}: output never executed"
                    if executions[-1] != output:
                        totals["finished_rerun"] += 1
                    assert len(executions) <= 2, (
                        f"trial {trial} (seed {seed}): {run_id} step {seq} executed "
                        f"{len(executions)} times with one kill"
                    )
                    totals["reruns_in_flight"] += len(executions) - 1
            if app.store.dialect == "sqlite":
                with app.store.db.read() as conn:
                    assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    finally:
        print(f"crash suite totals: {totals}")
        app.close()
    assert totals["finished_rerun"] == 0, f"finished steps executed again: {totals} seed={seed}"
    assert totals["lost"] == 0, f"committed steps lost: {totals} seed={seed}"
