"""Queues: an agent type's concurrency cap and rate cap hold across workers and machines, a
run over a cap stays pending holding nothing, and a pending run says what holds it back.

The caps live in the database's registry of agent types, written by the apps that register
the types; claims enforce them on both databases (on PostgreSQL, claims of a capped type take
turns on its registry row, after the agents' rows).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError

import tether
from tests import racekit
from tests.clikit import cli_invoker, ok
from tests.crashkit import ROOT, worker_env
from tests.procs import queue_app
from tether.agent import format_rate, parse_rate
from tether.store.schema import runs
from tether.store.schema import workers as workers_table
from tether.store.types import TypeDeclaration
from tether.testing import active_agent

WORKER = "test-worker"
WORKERS = 3


def nothing(ctx: tether.RunContext, task: Any) -> None:
    return None


def claim(app: tether.App, type_: str, limit: int) -> list[Any]:
    """The tasks of the runs one claim for ``type_`` takes."""
    return [c.input for c in app.store.claim_runs(WORKER, (type_,), limit, lease_ttl=30)]


def finish(app: tether.App, tasks: list[Any]) -> None:
    """Mark the claimed runs with these tasks completed, as their worker would."""
    with app.store.db.write() as conn:
        for task in tasks:
            conn.execute(
                update(runs)
                .where(runs.c.status == "running", runs.c.input == task)
                .values(status="completed", owner=None, lease_until=None)
            )


# -- the options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("type_concurrency", 0),
        ("type_concurrency", -1),
        ("type_concurrency", True),
        ("type_concurrency", 2.5),
        ("rate_limit", "0/min"),
        ("rate_limit", "30/mn"),
        ("rate_limit", "30"),
        ("rate_limit", "1.5/s"),
        ("rate_limit", 30),
    ],
)
def test_a_bad_cap_is_refused_at_registration_naming_the_type_and_option(
    tmp_path: Path, option: str, value: Any
) -> None:
    app = tether.App(f"sqlite:///{tmp_path / 'never-opened.db'}")

    with pytest.raises(tether.ConfigurationError) as decorated:
        app.agent("summarizer", **{option: value})(nothing)

    class Summarizer(tether.Agent):
        type = "summarizer"

        def handle(self, ctx: Any, task: Any) -> None:
            return None

    setattr(Summarizer, option, value)
    with pytest.raises(tether.ConfigurationError) as declared:
        app.register(Summarizer)

    for error in (decorated, declared):
        assert "'summarizer'" in str(error.value) and option in str(error.value)
    assert app.agent_types == {}
    assert not (tmp_path / "never-opened.db").exists()


@pytest.mark.parametrize(
    ("written", "claims", "window", "shown"),
    [
        ("30/min", 30, 60.0, "30/min"),
        ("5/s", 5, 1.0, "5/s"),
        ("100/h", 100, 3600.0, "100/h"),
        ("1000/day", 1000, 86400.0, "1000/day"),
        ("10/5min", 10, 300.0, "10/5min"),
        ("2 / 90 seconds", 2, 90.0, "2/90s"),
        ("7/2hours", 7, 7200.0, "7/2h"),
    ],
)
def test_a_rate_cap_reads_as_people_write_it(
    written: str, claims: int, window: float, shown: str
) -> None:
    assert parse_rate(written) == (claims, window)
    assert format_rate(claims, window) == shown


def test_every_process_sees_the_caps_the_registered_types_declare(db_url: str) -> None:
    first = tether.App(db_url)
    first.agent("summarizer", type_concurrency=2, rate_limit="30/min")(nothing)
    first.agent("plain")(nothing)
    first.list_agents()  # opening the database declares the types
    operator = tether.App(db_url, require_types=False)  # the CLI without the code
    newer = tether.App(db_url)  # a redeploy with other caps, whose worker starts
    try:
        assert operator.store.declared_types() == [
            TypeDeclaration("plain", 1, None, None, None),
            TypeDeclaration("summarizer", 1, 2, 30, 60.0),
        ]
        assert first.store.declare_types([TypeDeclaration("plain")]) == 0  # no change, no write

        first.agent("late", rate_limit="5/s")(nothing)  # registered after opening
        newer.agent("summarizer", max_concurrent_runs=3, type_concurrency=5)(nothing)
        newer.worker()

        assert operator.store.declared_types() == [
            TypeDeclaration("late", 1, None, 5, 1.0),
            TypeDeclaration("plain", 1, None, None, None),
            TypeDeclaration("summarizer", 3, 5, None, None),
        ]
    finally:
        for app in (first, operator, newer):
            app.close()


# -- one claim --------------------------------------------------------------------------


def test_a_claim_takes_no_more_runs_of_a_type_than_its_cap(app: tether.App) -> None:
    app.agent("summarizer", max_concurrent_runs=5, type_concurrency=2)(nothing)
    for agent_id in ("s1", "s2", "s3"):
        active_agent(app, "summarizer", agent_id)
        for i in range(2):
            app.submit(agent_id, f"{agent_id}-{i}")

    taken = claim(app, "summarizer", 5)
    assert taken == ["s1-0", "s1-1"]
    assert claim(app, "summarizer", 5) == []  # both still hold a live lease

    finish(app, taken[:1])
    assert claim(app, "summarizer", 5) == ["s2-0"]
    assert claim(app, "summarizer", 5) == []


def test_a_type_at_its_cap_does_not_crowd_the_other_types_out(app: tether.App) -> None:
    app.agent("summarizer", max_concurrent_runs=50, type_concurrency=1)(nothing)
    app.agent("plain")(nothing)
    active_agent(app, "summarizer", "s1")
    active_agent(app, "plain", "p1")
    for i in range(20):  # urgent, and far more than a claim reads ahead
        app.submit("s1", f"capped-{i}", priority=5)
    app.submit("p1", "plain-0")
    types = ("summarizer", "plain")

    first = [c.input for c in app.store.claim_runs(WORKER, types, 1, lease_ttl=30)]
    second = [c.input for c in app.store.claim_runs(WORKER, types, 1, lease_ttl=30)]

    assert (first, second) == (["capped-0"], ["plain-0"])


def test_a_claim_takes_no_more_runs_of_a_type_than_its_rate_in_a_window(app: tether.App) -> None:
    app.agent("metered", max_concurrent_runs=10, rate_limit="3/h")(nothing)
    active_agent(app, "metered", "m1")
    for i in range(5):
        app.submit("m1", i)

    taken = claim(app, "metered", 5)
    assert taken == [0, 1, 2]
    finish(app, taken)
    assert claim(app, "metered", 5) == []  # nothing runs, but the hour holds 3 claims

    # An hour and a second later (the claims moved back, rather than the clock forward):
    with app.store.db.write() as conn:
        claimed = conn.execute(select(runs.c.run_id, runs.c.input, runs.c.claimed_at)).all()
        assert sorted(task for _, task, at in claimed if at is not None) == taken
        for run_id, _, at in claimed:
            if at is not None:
                earlier = at - dt.timedelta(hours=1, seconds=1)
                conn.execute(update(runs).where(runs.c.run_id == run_id).values(claimed_at=earlier))
    assert claim(app, "metered", 5) == [3, 4]


def test_pending_runs_say_what_holds_them_back(app: tether.App, db_url: str) -> None:
    app.agent("solo")(nothing)
    app.agent("summarizer", max_concurrent_runs=5, type_concurrency=1)(nothing)
    app.agent("metered", max_concurrent_runs=5, rate_limit="1/h")(nothing)
    app.agent("plain")(nothing)
    for type_, agent_id in [
        ("solo", "o1"), ("summarizer", "s1"), ("summarizer", "s2"), ("metered", "m1"),
        ("plain", "p1"),
    ]:  # fmt: skip
        active_agent(app, type_, agent_id)
    runs_ = {
        name: app.submit(agent_id, name).run_id
        for name, agent_id in [
            ("solo-0", "o1"), ("solo-1", "o1"), ("sum-0", "s1"), ("sum-1", "s2"),
            ("metered-0", "m1"), ("metered-1", "m1"), ("plain-0", "p1"),
        ]
    }  # fmt: skip
    assert claim(app, "solo", 1) == ["solo-0"]
    assert claim(app, "summarizer", 1) == ["sum-0"]
    assert claim(app, "metered", 1) == ["metered-0"]
    finish(app, ["metered-0"])  # done: the rate alone holds metered-1 back

    expected = {
        runs_["solo-1"]: "agent busy (1/1 running)",
        runs_["sum-1"]: "type cap (1/1 running)",
        runs_["metered-1"]: "rate 1/h reached",
    }
    assert app.pending_reasons(list(runs_.values())) == expected

    # The CLI, without the code (from the registry), says the same.
    run = cli_invoker("--db", db_url)
    listed = json.loads(ok(run("runs", "list", "--status", "pending", "-o", "json")))
    assert {row["run_id"]: row["waiting_for"] for row in listed} == {
        **expected,
        runs_["plain-0"]: None,
    }
    table = ok(run("runs", "list", "--status", "pending"))
    assert "waiting for" in table and "type cap (1/1 running)" in table
    shown = json.loads(ok(run("runs", "show", runs_["metered-1"], "-o", "json")))
    assert shown["waiting_for"] == "rate 1/h reached"


@pytest.mark.postgres
def test_claims_of_a_capped_type_take_turns_on_its_row_after_locking_the_agents(
    pg_url: str,
) -> None:
    """What makes a type's cap exact across machines: a claim locks the type's row of
    ``agent_types`` (after its agents' rows), so claims of one type count one at a time."""
    app = tether.App(pg_url)
    claimer = tether.App(pg_url, require_types=False)
    try:
        app.agent("summarizer", type_concurrency=2)(nothing)
        app.agent("plain")(nothing)
        active_agent(app, "summarizer", "s1")
        active_agent(app, "plain", "p1")
        app.submit("s1", "capped")
        app.submit("p1", "plain")
        claimer.get_agent("s1")  # connect before the gate, not behind it
        result: dict[str, Any] = {}

        def claim_capped() -> None:
            claims = claimer.store.claim_runs("w-capped", ("summarizer",), 4, lease_ttl=30)
            result["taken"] = [c.input for c in claims]

        thread = threading.Thread(target=claim_capped)
        with app.store.db.write() as conn:
            conn.execute(text("SELECT 1 FROM agent_types WHERE type = 'summarizer' FOR UPDATE"))
            gate = racekit.Gate(app, conn)
            thread.start()
            gate.hold_until_queued(1)  # the claim waits for the type's row,
            # ...holding its agent's row: the agents first, then the type.
            nowait = text("SELECT 1 FROM agents WHERE agent_id = 's1' FOR UPDATE NOWAIT")
            with app.store.db.engine.connect() as other, pytest.raises(OperationalError):
                other.execute(nowait)
            # An uncapped type's claim takes no type lock: it does not wait.
            assert claim(app, "plain", 4) == ["plain"]
            assert "taken" not in result
        thread.join(30)
        assert result["taken"] == ["capped"]
    finally:
        app.close()
        claimer.close()


# -- across worker processes ----------------------------------------------------------


def start_worker(env: dict[str, str], concurrency: int = 2) -> subprocess.Popen[str]:
    """A real worker process of the queue app, running until idle."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.procs.queue_app", "120", str(concurrency)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def workers_up(app: tether.App) -> int:
    with app.store.db.read() as conn:
        query = select(func.count()).where(workers_table.c.stopped_at.is_(None))
        return int(conn.execute(query).scalar_one())


@contextmanager
def workers_racing(app: tether.App, db_url: str, log: Path) -> Iterator[None]:
    """Start the workers, and enter once all of them are up and looking for work, so they race
    for what the block submits from its start; then let them finish it and stop. Until the
    block ends, a run no worker may claim (its cap is 0) keeps the first ones up from
    leaving."""
    active_agent(app, "doorstop", "door")
    [door, _] = app.store.submit_run("door", {}, task_id=None, priority=0, max_concurrent=0)
    procs = [start_worker(worker_env(db_url, log, lease=5.0)) for _ in range(WORKERS)]
    try:
        deadline = time.monotonic() + 60
        while workers_up(app) < WORKERS:
            assert time.monotonic() < deadline, f"{workers_up(app)} of {WORKERS} workers up"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        yield
        app.cancel(door.run_id)
        for proc in procs:
            _, err = proc.communicate(timeout=150)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def log_lines(log: Path) -> list[tuple[str, str, str]]:
    """(BEGIN or DONE, run id, pid) in the order the processes appended them: one order of
    all their step bodies' starts and ends, no clock needed."""
    return [tuple(line.split()) for line in log.read_text().splitlines() if line]  # type: ignore[misc]


@pytest.mark.timeout(240)
def test_a_type_never_runs_more_than_its_cap_at_once_across_worker_processes(
    db_url: str, tmp_path: Path
) -> None:
    """Three workers of two slots each, six slots for a type capped at three: the cap, not the
    slots, is what holds runs back."""
    log = tmp_path / "bodies.log"
    app = tether.App(db_url, require_types=False)
    try:
        for a in range(4):
            active_agent(app, "capped", f"k{a}")
        with workers_racing(app, db_url, log):
            run_ids = [
                app.submit(f"k{a}", {"sleep": 0.15}).run_id for a in range(4) for _ in range(3)
            ]
        assert {app.get_run(r).status.value for r in run_ids} == {"completed"}

        inside: dict[str, str] = {}  # run -> pid, of the bodies running at this point
        begun: set[str] = set()
        crowded = []  # (pids inside, runs not begun yet) whenever the cap was full
        for kind, run_id, pid in log_lines(log):
            if kind == "BEGIN":
                inside[run_id] = pid
                begun.add(run_id)
            else:
                del inside[run_id]
            assert len(inside) <= queue_app.CAP, f"{len(inside)} runs of the type at once"
            if len(inside) == queue_app.CAP:
                crowded.append((set(inside.values()), len(run_ids) - len(begun)))
        assert len(begun) == len(run_ids)
        # The cap was contested: full, on several worker processes at once, while runs waited.
        assert any(len(pids) > 1 and waiting for pids, waiting in crowded), crowded
    finally:
        app.close()


@pytest.mark.timeout(240)
def test_a_type_claims_no_more_than_its_rate_across_worker_processes(
    db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "bodies.log"
    app = tether.App(db_url, require_types=False)
    try:
        for a in range(4):
            active_agent(app, "metered", f"m{a}")
        with workers_racing(app, db_url, log):
            # Bodies long enough that one worker's two slots cannot take a whole window's
            # claims: the others must claim too.
            run_ids = [
                app.submit(f"m{a}", {"sleep": 0.3}).run_id for a in range(4) for _ in range(3)
            ]
        assert {app.get_run(r).status.value for r in run_ids} == {"completed"}

        claims = sorted(
            (e.at, e.data["worker"])
            for e in app.events(types=["run.claimed", "run.recovered"])
            if e.run_id in run_ids
        )
        assert len(claims) == len(run_ids)  # each claimed once
        limit, window = parse_rate(queue_app.RATE)
        spacing = [(later - first).total_seconds() for (first, _), (later, _) in zip(
            claims, claims[limit:], strict=False
        )]  # fmt: skip
        assert min(spacing) >= window, spacing  # never more than `limit` in one window
        # The cap was contested: a window was full (claims as fast as the workers could), and
        # several worker processes claimed.
        full = [
            (claims[i + limit - 1][0] - claims[i][0]).total_seconds()
            for i in range(len(claims) - limit + 1)
        ]
        assert min(full) < window, full
        assert len({worker for _, worker in claims}) > 1
    finally:
        app.close()
