"""A zombie worker: stopped (SIGSTOP) past its lease while another worker takes the run over,
then continued (SIGCONT). It must commit nothing: its fencing epoch is stale."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

import tether
from tests.crashkit import Effects, start_worker, wait_for_lines, worker_env

LEASE = 1.0
STEPS = 3


@pytest.mark.timeout(120)
def test_a_worker_stopped_past_its_lease_commits_nothing_after_it_continues(
    db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "effects.log"
    env = worker_env(db_url, log, lease=LEASE)
    app = tether.App(db_url, require_types=False)
    try:
        app.create_agent("crasher", "z1")
        app.initialize("z1")
        app.activate("z1")
        run_id = app.submit("z1", {"steps": STEPS, "sleep": 0.6}).run_id

        zombie = start_worker(env)
        assert wait_for_lines(log, "BEGIN", 1, zombie), "the first worker never started a step"
        zombie.send_signal(signal.SIGSTOP)
        try:
            time.sleep(LEASE * 1.5)  # its heartbeats stop; the lease runs out
            successor = start_worker(env)
            _, err = successor.communicate(timeout=60)
            assert successor.returncode == 0, err
            assert app.get_run(run_id).status.value == "completed"
        finally:
            zombie.send_signal(signal.SIGCONT)
        _, zombie_err = zombie.communicate(timeout=30)

        successor_pid = successor.pid
        journal = {s.seq: s.output for s in app.run_steps(run_id)}
        effects = Effects.read(log)
        zombie_tokens = {
            token for runs in effects.done.values() for token, pid in runs if pid == zombie.pid
        }
        # The zombie did finish its step body after SIGCONT (at-least-once) ...
        assert zombie_tokens, "the zombie never finished its step body"
        # ... but nothing it produced reached the journal, and it noticed it lost the run.
        assert not zombie_tokens & set(journal.values())
        for seq, output in journal.items():
            assert (output, successor_pid) in effects.done[(run_id, seq)]
        assert "no longer owns" in zombie_err
        completed = [e for e in app.timeline(run_id) if e.type == "step.completed"]
        assert len(completed) == STEPS
        assert app.get_run(run_id).result == [journal[i] for i in range(1, STEPS + 1)]
    finally:
        app.close()
