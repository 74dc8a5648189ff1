"""Workers ride out a database that goes away: a real PostgreSQL restart under a real worker
process. The worker reconnects with backoff, says so in its log, and finishes its runs without
running a finished step twice; the App's first write after the restart works."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import tether
from tests.conftest import IN_CI
from tests.crashkit import Effects, start_worker, wait_for_lines, worker_env

STEPS = 30


def checkpoint_postgres() -> None:
    """A checkpoint now, so that a restart does not wait for a slow spread one to finish."""
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", "CHECKPOINT"], check=True, timeout=120
    )


def restart_postgres() -> None:
    """Restart the local PostgreSQL server (root, Debian's pg_ctlcluster); wait until it is up."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        if IN_CI:
            pytest.fail("no local PostgreSQL cluster to restart (CI requires this test)")
        pytest.skip("no local PostgreSQL cluster to restart")
    command = [
        *("pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"),
        *("--mode", "fast"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        message = f"cannot restart PostgreSQL: {done.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(["pg_isready", "-h", "127.0.0.1", "-t", "30"], check=True, timeout=40)


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_a_worker_rides_out_a_postgresql_restart(pg_url: str, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    env = worker_env(pg_url, log, lease=4.0)
    app = tether.App(pg_url, require_types=False)
    try:
        app.create_agent("crasher", "c1")
        app.initialize("c1")
        app.activate("c1")
        run_id = app.submit("c1", {"steps": STEPS, "sleep": 0.2}).run_id
        checkpoint_postgres()

        worker = start_worker(env, timeout=180)
        assert wait_for_lines(log, "BEGIN", 2, worker), "the worker never started"
        restart_postgres()
        assert not wait_for_lines(log, "DONE", STEPS, worker, timeout=0.1), "it was over"
        _, err = worker.communicate(timeout=200)

        assert worker.returncode == 0, err
        assert "cannot reach PostgreSQL" in err, err  # it said so in its log, and carried on
        info = app.get_run(run_id)
        assert info.status.value == "completed", (info, err)
        journal = {s.seq: s.output for s in app.run_steps(run_id)}
        assert sorted(journal) == list(range(1, STEPS + 1))
        effects = Effects.read(log)
        ran_again = [seq for seq in journal if len(effects.done[(run_id, seq)]) > 1]
        assert len(ran_again) <= 1, ran_again  # only a step in flight at the restart may
        for seq, output in journal.items():
            assert output in {token for token, _ in effects.done[(run_id, seq)]}

        # The App's own first write after the restart goes through.
        assert app.submit("c1", {"steps": 1}).run_id
    finally:
        app.close()
