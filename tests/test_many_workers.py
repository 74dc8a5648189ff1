"""Several real worker processes share one database: every step runs exactly once (no crash
here), every run completes, and no agent ever executes more runs at once than it allows."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

import tether
from tests.crashkit import Effects, start_worker, worker_env

WORKERS = 3
AGENTS = 4
RUNS_PER_AGENT = 6
STEPS = 4


@pytest.mark.timeout(180)
def test_worker_processes_share_the_work_without_doing_any_of_it_twice(
    db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "effects.log"
    app = tether.App(db_url, require_types=False)
    try:
        for a in range(AGENTS):
            app.create_agent("crasher", f"a{a}")
            app.initialize(f"a{a}")
            app.activate(f"a{a}")
        run_ids = [
            app.submit(f"a{a}", {"steps": STEPS, "sleep": 0.05}).run_id
            for a in range(AGENTS)
            for _ in range(RUNS_PER_AGENT)
        ]
        workers = [start_worker(worker_env(db_url, log, lease=5.0)) for _ in range(WORKERS)]
        for worker in workers:
            _, err = worker.communicate(timeout=150)
            assert worker.returncode == 0, err

        effects = Effects.read(log)
        pids = set()
        for run_id in run_ids:
            run = app.get_run(run_id)
            assert run.status.value == "completed"
            for seq in range(1, STEPS + 1):
                executions = effects.done[(run_id, seq)]
                assert len(executions) == 1, f"{run_id} step {seq}: {executions}"
                pids.add(executions[0][1])
        assert len(pids) > 1, "one worker did everything: the test did not share any work"
        claims = [e for e in app.events(types=["run.claimed"])]
        assert len({e.run_id for e in claims}) == len(run_ids)
    finally:
        app.close()


@pytest.mark.timeout(180)
def test_an_agent_never_runs_two_runs_at_once_across_worker_processes(
    db_url: str, tmp_path: Path
) -> None:
    """The crash app allows 8 concurrent runs per agent; this agent type allows one."""
    log = tmp_path / "effects.log"
    app = tether.App(db_url, require_types=False)
    try:
        app.create_agent("crasher", "solo")
        app.initialize("solo")
        app.activate("solo")
        # Submitted as max_concurrent=1 (what an agent type's default would give).
        run_ids = [
            app.store.submit_run(
                "solo", {"steps": 2, "sleep": 0.02}, task_id=None, priority=0, max_concurrent=1
            )[0].run_id
            for _ in range(8)
        ]
        workers = [start_worker(worker_env(db_url, log, lease=5.0)) for _ in range(WORKERS)]
        for worker in workers:
            _, err = worker.communicate(timeout=150)
            assert worker.returncode == 0, err

        # From the journal: each run's [first step start, last step end] never overlaps another's.
        spans = []
        for run_id in run_ids:
            events = app.timeline(run_id)
            claimed = [e.at for e in events if e.type in ("run.claimed", "run.recovered")]
            completed = [e.at for e in events if e.type == "run.completed"]
            assert len(claimed) == 1 and len(completed) == 1
            spans.append((claimed[0], completed[0]))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two runs of one agent overlapped: {spans}"
    finally:
        app.close()
