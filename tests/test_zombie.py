"""A zombie worker: stopped (SIGSTOP) past its lease while another worker takes the run over,
then continued (SIGCONT). It must commit nothing (its fencing epoch is stale) and start no
further step body, whatever its handler catches: counted from the outside effect log."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

import tether
from tests.crashkit import Effects, start_worker, wait_for_lines, worker_env

LEASE = 1.0
STEPS = 4
TRIALS = 10 if os.environ.get("TETHER_STRESS") else 1


def begins_by(log: Path, pid: int, after: int) -> list[str]:
    """BEGIN lines the process ``pid`` wrote after the first ``after`` bytes of the log."""
    with log.open() as f:
        f.seek(after)
        return [
            line
            for line in f.read().splitlines()
            if line.startswith("BEGIN") and line.endswith(f" {pid}")
        ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("agent_type", ["crasher", "swallower"])
def test_a_worker_stopped_past_its_lease_commits_and_starts_nothing_after_it_continues(
    db_url: str, tmp_path: Path, agent_type: str
) -> None:
    rng = random.Random()
    app = tether.App(db_url, require_types=False)
    try:
        for trial in range(TRIALS):
            log = tmp_path / f"effects-{trial}.log"
            env = worker_env(db_url, log, lease=LEASE)
            agent_id = f"z{trial}"
            app.create_agent(agent_type, agent_id)
            app.initialize(agent_id)
            app.activate(agent_id)
            run_id = app.submit(agent_id, {"steps": STEPS, "sleep": 0.3}).run_id

            zombie = start_worker(env)
            assert wait_for_lines(log, "BEGIN", 1, zombie), "the first worker never started a step"
            # Freeze it inside a body, or between two. On SQLite only inside one (bodies take
            # 0.3 s): a process stopped in its commit holds the database's one write lock, and
            # no other process can write until it continues.
            time.sleep(rng.uniform(0.0, 0.6 if "postgresql" in db_url else 0.15))
            zombie.send_signal(signal.SIGSTOP)
            frozen_at = log.stat().st_size
            try:
                time.sleep(LEASE * 1.5)  # its heartbeats stop; the lease runs out
                successor = start_worker(env)
                _, err = successor.communicate(timeout=60)
                assert successor.returncode == 0, err
                assert app.get_run(run_id).status.value == "completed"
            finally:
                zombie.send_signal(signal.SIGCONT)
            _, zombie_err = zombie.communicate(timeout=30)

            # Once continued, the zombie starts no step body: not even with `except Exception`.
            successor_begins = begins_by(log, successor.pid, 0)
            assert successor_begins, "the successor did not take the run over"
            assert begins_by(log, zombie.pid, frozen_at) == []
            journal = {s.seq: s.output for s in app.run_steps(run_id)}
            effects = Effects.read(log)
            zombie_tokens = {
                token for runs in effects.done.values() for token, pid in runs if pid == zombie.pid
            }
            # Nothing the zombie produced after its lease ran out reached the journal.
            committed_by_zombie = zombie_tokens & set(journal.values())
            for seq, output in journal.items():
                assert (output, successor.pid) in effects.done[(run_id, seq)] or (
                    output in committed_by_zombie
                )
            assert len(journal) == STEPS
            assert app.get_run(run_id).result == [journal[i] for i in range(1, STEPS + 1)]
            assert "no longer owns" in zombie_err or not zombie_tokens - committed_by_zombie
    finally:
        app.close()
