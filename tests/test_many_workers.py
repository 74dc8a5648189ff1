"""Several real worker processes share one database: every step runs exactly once (no crash
here), every run completes, and no agent ever executes more runs at once than it allows.

Each test also proves that the workers really worked at the same time: a run where one worker
did everything, or where they took turns, would prove nothing about sharing.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

import tether
from tests.crashkit import Effects, start_worker, worker_env
from tether.store.schema import workers as workers_table

WORKERS = 3
AGENTS = 4
RUNS_PER_AGENT = 6
STEPS = 4
BUSY_AGENTS = 4


@contextmanager
def workers_ready(app: tether.App, db_url: str, log: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Start the worker processes and enter once every one is up and looking for work, so all
    of them race for the work submitted in the block from its start. Until the block ends, a
    run that no worker may claim (its cap is 0) keeps the first ones up from leaving idle."""
    app.create_agent("crasher", "doorstop")
    app.initialize("doorstop")
    app.activate("doorstop")
    [doorstop, _] = app.store.submit_run("doorstop", {}, task_id=None, priority=0, max_concurrent=0)
    procs = [start_worker(worker_env(db_url, log, lease=5.0)) for _ in range(WORKERS)]
    try:
        deadline = time.monotonic() + 60
        while up(app) < WORKERS:
            assert time.monotonic() < deadline, f"{up(app)} of {WORKERS} workers started"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        yield procs
        app.cancel(doorstop.run_id)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise


def up(app: tether.App) -> int:
    """How many worker processes have registered and not stopped."""
    with app.store.db.read() as conn:
        query = select(func.count()).where(workers_table.c.stopped_at.is_(None))
        return int(conn.execute(query).scalar_one())


def workers_inside_at_once(log: Path) -> int:
    """The most worker processes that were inside step bodies at one moment. Every process
    appends its BEGIN and DONE lines (each ending with its pid) to the one effect log, so the
    log's order is one order of all their events: no clock is needed."""
    inside: Counter[str] = Counter()
    most = 0
    for line in log.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("BEGIN", "DONE"):
            inside[fields[-1]] += 1 if fields[0] == "BEGIN" else -1
            most = max(most, sum(1 for n in inside.values() if n > 0))
    return most


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
        with workers_ready(app, db_url, log) as workers:
            run_ids = [
                app.submit(f"a{a}", {"steps": STEPS, "sleep": 0.05}).run_id
                for a in range(AGENTS)
                for _ in range(RUNS_PER_AGENT)
            ]
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
        # Several of them were inside step bodies at one moment: they shared the work at once
        # (all three at once is the usual case, but two cores cannot promise it).
        assert workers_inside_at_once(log) >= 2, "the workers took turns"
        claims = [e for e in app.events(types=["run.claimed"])]
        assert len({e.run_id for e in claims}) == len(run_ids)
    finally:
        app.close()


@pytest.mark.timeout(180)
def test_an_agent_never_runs_two_runs_at_once_across_worker_processes(
    db_url: str, tmp_path: Path
) -> None:
    """The crash app allows 8 concurrent runs per agent; this agent type allows one. Other
    agents' runs keep every worker busy, so each claims again and again while the agent runs."""
    log = tmp_path / "effects.log"
    app = tether.App(db_url, require_types=False)
    try:
        for agent_id in ["solo", *(f"busy{a}" for a in range(BUSY_AGENTS))]:
            app.create_agent("crasher", agent_id)
            app.initialize(agent_id)
            app.activate(agent_id)
        run_ids: list[str] = []
        busy_ids: list[str] = []
        with workers_ready(app, db_url, log) as workers:
            for _ in range(8):
                # Submitted as max_concurrent=1 (what an agent type's default would give), and
                # first in line for every claim.
                [run, _] = app.store.submit_run(
                    "solo", {"steps": 2, "sleep": 0.02}, task_id=None, priority=1, max_concurrent=1
                )
                run_ids.append(run.run_id)
                for a in range(BUSY_AGENTS):
                    busy_ids.append(app.submit(f"busy{a}", {"steps": 2, "sleep": 0.02}).run_id)
        for worker in workers:
            _, err = worker.communicate(timeout=150)
            assert worker.returncode == 0, err

        # From the journal: each run's [claim, completion] never overlaps another's.
        spans = []
        for run_id in run_ids:
            events = app.timeline(run_id)
            claimed = [e for e in events if e.type in ("run.claimed", "run.recovered")]
            completed = [e.at for e in events if e.type == "run.completed"]
            assert len(claimed) == 1 and len(completed) == 1
            spans.append((claimed[0].at, completed[0], claimed[0].data["worker"]))
        spans.sort()
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            assert start >= end, f"two runs of one agent overlapped: {spans}"
        # The cap was contested: while a run of the agent executed on one worker (and its next
        # run waited, first in line), another worker claimed; that claim was refused the
        # agent's run by the cap, and took another agent's.
        others = [e for e in app.events(types=["run.claimed"]) if e.run_id in busy_ids]
        contested = [
            e.run_id
            for start, end, holder in spans[:-1]
            for e in others
            if start < e.at < end and e.data["worker"] != holder
        ]
        assert contested, f"no worker claimed while another ran the agent: {spans}"
        assert {app.get_run(run_id).status.value for run_id in busy_ids} == {"completed"}
    finally:
        app.close()
