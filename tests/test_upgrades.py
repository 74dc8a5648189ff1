"""Upgrades lose nothing: a populated database at every schema revision this tether ships is
upgraded to head on both databases, everything in it is still there, and its runs in flight
finish; a ``kill -9`` during ``tether db upgrade`` leaves a database that the next upgrade
completes.

The population and the checks are in ``tests/upgradekit.py``, its seed for each revision in
``tests/upgradeseeds.py``, whose docstring says how a new migration joins.

``TETHER_STRESS=1`` kills 40 upgrades per database instead of 5; ``TETHER_UPGRADE_SEED``
replays a sequence of kills.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, inspect, select, text, update
from sqlalchemy.engine import Connection

import tether
from tests import upgradekit as kit
from tests import upgradeseeds as seeds
from tests.clikit import cli_invoker, ok
from tests.test_migrations import schema_diff
from tether.store import migrate, parse_url, schema
from tether.store.database import Database

ROOT = Path(__file__).resolve().parent.parent
REVISIONS = migrate.known_revisions()
STRESS = bool(os.environ.get("TETHER_STRESS"))
KILLS = int(os.environ.get("TETHER_UPGRADE_KILLS", "40" if STRESS else "5"))
BULK = 300
"""Runs added to the population of the kill test, so that its upgrade has rows to move. The
kills are aimed by statement (``upgradekit.traced``), not by making the upgrade slow."""


@pytest.fixture
def executed() -> Iterator[list[tuple[str, str]]]:
    """The step bodies that really ran during the test, as (run, step)."""
    kit.EXECUTED.clear()
    yield kit.EXECUTED
    kit.EXECUTED.clear()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def upgrade(url: str, to: str | None = None) -> str:
    db = Database(parse_url(url))
    try:
        return migrate.upgrade(db, to)
    finally:
        db.dispose()


def check_finished(app: tether.App, pop: kit.Population, executed: list[tuple[str, str]]) -> None:
    """The runs in flight completed, replaying their journals: each returned the outputs its
    journal held, and only the steps the journal lacked ran."""
    for run in pop.in_flight:
        info = app.get_run(run.run_id)
        assert info.status == tether.RunStatus.COMPLETED, (run.run_id, info.status, info.error)
        assert info.result == kit.expected_result(run), run.run_id
        outputs = {s.name: s.output for s in app.run_steps(run.run_id)}
        assert {name: outputs[name] for name in run.replayed} == run.replayed, run.run_id
    assert sorted(executed) == kit.expected_executions(pop)
    retried = [s for s in app.run_steps("run-retry") if s.name == "b"]
    assert [s.attempts for s in retried] == [2]  # the attempt its retry timer was waiting for
    later = app.get_run("run-later")
    timer = pop.run("run-later").timer
    assert timer is not None
    assert (later.status, later.wake_at) == (tether.RunStatus.WAITING, timer.due)


# -- every revision, upgraded to head -----------------------------------------------------------


def test_every_schema_revision_has_a_seed() -> None:
    missing = [r for r in REVISIONS if r not in seeds.SEEDS]
    assert not missing, (
        f"migration(s) {missing} have no seed: add SEEDS[revision] to tests/upgradeseeds.py "
        "(its docstring says how)"
    )
    assert sorted(seeds.SEEDS) == REVISIONS


@pytest.mark.parametrize("revision", REVISIONS)
def test_a_database_at_every_revision_upgrades_losing_nothing_and_its_runs_in_flight_finish(
    db_url: str, revision: str, executed: list[tuple[str, str]]
) -> None:
    pop = kit.population(now(), bulk=20)
    seeds.seed(db_url, revision, pop)
    before = kit.row_counts(db_url)

    assert upgrade(db_url) == migrate.head()

    after = kit.row_counts(db_url)
    shrunk = {t: (n, after[t]) for t, n in before.items() if t in after and after[t] < n}
    assert shrunk == {}, "tables lost rows (before, after)"
    db = Database(parse_url(db_url))
    with db.read() as conn:
        assert schema_diff(conn) == []
    db.dispose()
    with kit.head_app(db_url) as app:
        kit.verify(app, pop)
        kit.finish(app, pop)
        check_finished(app, pop, executed)


# -- the checks can fail --------------------------------------------------------------------

MUTATIONS: dict[str, Callable[[Connection], Any]] = {
    "a journal entry": lambda c: c.execute(
        delete(schema.steps).where(schema.steps.c.run_id == "run-due", schema.steps.c.seq == 1)
    ),
    "a step's output": lambda c: c.execute(
        update(schema.steps)
        .where(schema.steps.c.run_id == "run-done-2", schema.steps.c.seq == 3)
        .values(output={"step": "b"})
    ),
    "an event": lambda c: c.execute(
        delete(schema.events).where(
            schema.events.c.seq == select(func.max(schema.events.c.seq)).scalar_subquery()
        )
    ),
    "a state version": lambda c: c.execute(
        delete(schema.state_versions).where(
            schema.state_versions.c.agent_id == "alpha", schema.state_versions.c.version == 4
        )
    ),
    "a lifecycle transition": lambda c: c.execute(
        delete(schema.agent_history).where(
            schema.agent_history.c.agent_id == "beta",
            schema.agent_history.c.action == "activate",
        )
    ),
    "a checkpoint": lambda c: c.execute(
        delete(schema.checkpoints).where(schema.checkpoints.c.checkpoint_id == "ckpt-by-hand")
    ),
    "an open incident": lambda c: c.execute(update(schema.incidents).values(status="resolved")),
    "a timer": lambda c: c.execute(
        delete(schema.waits).where(schema.waits.c.run_id == "run-later")
    ),
    "a fencing epoch": lambda c: c.execute(
        update(schema.runs).where(schema.runs.c.run_id == "run-orphan").values(fence=0)
    ),
    "a dead worker": lambda c: c.execute(delete(schema.workers)),
}


@pytest.mark.parametrize("lost", MUTATIONS)
def test_verify_fails_when_anything_seeded_is_lost_or_changed(sqlite_url: str, lost: str) -> None:
    """The checks are the same code on both databases: they are tested on one."""
    pop = kit.population(now())
    seeds.seed(sqlite_url, migrate.head(), pop)
    with kit.head_app(sqlite_url) as app:
        kit.verify(app, pop)
        with app.store.db.write() as conn:
            MUTATIONS[lost](conn)
        with pytest.raises(AssertionError):
            kit.verify(app, pop)


def test_finishing_fails_when_a_replayed_step_runs_again(
    sqlite_url: str, executed: list[tuple[str, str]]
) -> None:
    pop = kit.population(now())
    seeds.seed(sqlite_url, migrate.head(), pop)
    with kit.head_app(sqlite_url) as app:
        with app.store.db.write() as conn:
            MUTATIONS["a journal entry"](conn)  # run-due's step a: replay must run it again
        kit.finish(app, pop)
        with pytest.raises(AssertionError):
            check_finished(app, pop, executed)


# -- how migrations run -----------------------------------------------------------------------

_REBUILD_RUNS = '''"""a column added to runs and dropped: SQLite drops it by rebuilding the table

Revision ID: 9999
Revises: {previous}
"""

import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{previous}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch_op:
        batch_op.add_column(sa.Column("scratch", sa.Integer(), nullable=True))
    with op.batch_alter_table("runs") as batch_op:  # SQLite: a copy of runs replaces it
        batch_op.drop_column("scratch")
    {more}
'''


def with_migration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: str) -> None:
    """Ship one more migration (9999, after head) in a copy of the migrations folder."""
    folder = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / "9999_test.py").write_text(body)
    monkeypatch.setattr(migrate, "MIGRATIONS", folder)


def test_a_migration_rebuilding_a_table_keeps_the_rows_that_refer_to_it(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the rebuild drops the old table; with foreign keys on, that would delete every
    journal entry and incident through ON DELETE CASCADE."""
    pop = kit.population(now())
    seeds.seed(db_url, migrate.head(), pop)
    before = kit.row_counts(db_url)
    with_migration(monkeypatch, tmp_path, _REBUILD_RUNS.format(previous=migrate.head(), more=""))
    db = Database(parse_url(db_url))
    try:
        assert migrate.upgrade(db) == "9999"
        with db.read() as conn:  # the connection that migrated, back from the pool
            if db.dialect == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.dispose()
    assert kit.row_counts(db_url) == before


def test_a_sqlite_upgrade_that_leaves_a_dangling_reference_is_rolled_back(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite migrates with foreign keys off and checks them before committing (PostgreSQL
    enforces them on every statement)."""
    pop = kit.population(now())
    seeds.seed(sqlite_url, migrate.head(), pop)
    before = kit.row_counts(sqlite_url)
    orphaning = "op.execute(\"DELETE FROM runs WHERE run_id = 'run-done-2'\")"
    with_migration(
        monkeypatch, tmp_path, _REBUILD_RUNS.format(previous=migrate.head(), more=orphaning)
    )
    with pytest.raises(tether.Refused, match=r"rolled back: it left 3 row\(s\) referring"):
        upgrade(sqlite_url)
    assert kit.revision_of(sqlite_url) == REVISIONS[-1]
    assert kit.row_counts(sqlite_url) == before


# -- kill -9 during tether db upgrade -----------------------------------------------------------


class Trials:
    """Databases seeded with one population at one revision, one per trial: on SQLite copies
    of one seeded file, on PostgreSQL the test's schema emptied and seeded again."""

    def __init__(self, url: str, folder: Path, revision: str, pop: kit.Population) -> None:
        self.url, self.folder, self.revision, self.pop = url, folder, revision, pop
        self.template: Path | None = None
        if url.startswith("sqlite"):
            self.template = folder / "template.db"
            seeds.seed(f"sqlite:///{self.template}", revision, pop)

    def fresh(self, trial: int) -> str:
        """The URL of a new seeded database."""
        if self.template is not None:
            path = self.folder / f"trial-{trial}.db"
            shutil.copyfile(self.template, path)
            return f"sqlite:///{path}"
        db = Database(parse_url(self.url))
        try:
            with db.write() as conn:
                for table in inspect(conn).get_table_names():
                    conn.execute(text(f'DROP TABLE "{table}" CASCADE'))
        finally:
            db.dispose()
        seeds.seed(self.url, self.revision, self.pop)
        return self.url


def _killable_upgrade(url: str, trace: Path, stop_at: int | None) -> subprocess.Popen[str]:
    """``tether --db URL db upgrade`` in a process of its own, writing each statement to
    ``trace`` before sending it; with ``stop_at``, it stops for good on that line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if stop_at is not None:
        env["TETHER_TEST_STOP_AT"] = str(stop_at)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.upgradekit", str(trace), "--db", url, "db", "upgrade"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines(trace: Path) -> list[str]:
    return trace.read_text().splitlines() if trace.exists() else []


def _wait_for_line(trace: Path, count: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(_lines(trace)) < count and proc.poll() is None:
        assert time.monotonic() < deadline, f"the upgrade never reached line {count}"
        time.sleep(0.001)


def tether_db_upgrade(url: str) -> str:
    """``tether --db URL db upgrade``, in this process; its output."""
    return ok(cli_invoker("--db", url)("db", "upgrade"))


@pytest.mark.timeout(900)
def test_kill_9_during_db_upgrade_leaves_a_database_the_next_upgrade_completes(
    db_url: str, tmp_path: Path, executed: list[tuple[str, str]]
) -> None:
    """Each trial SIGKILLs ``tether db upgrade`` of a database seeded at the oldest revision:
    stopped right before one of its statements or its commit, or at a random moment after
    one. The kill leaves the database exactly as it was (revision, tables, indexes, rows) or,
    once the commit went through, exactly at head; the next ``tether db upgrade`` completes
    and nothing is lost; after the last one, the runs in flight finish."""
    oldest, head = REVISIONS[0], migrate.head()
    seed = int(os.environ.get("TETHER_UPGRADE_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    print(f"upgrade kill seed={seed} kills={KILLS} db={db_url.split(':')[0]}")
    pop = kit.population(now(), bulk=BULK)
    trials = Trials(db_url, tmp_path, oldest, pop)

    # A control: the upgrade not killed gives its statements and both states to expect.
    url = trials.fresh(0)
    shapes, counts = {oldest: kit.shape(url)}, {oldest: kit.row_counts(url)}
    with kit.traced(tmp_path / "control.log"):
        tether_db_upgrade(url)
    statements = _lines(tmp_path / "control.log")
    assert kit.revision_of(url) == head
    shapes[head], counts[head] = kit.shape(url), kit.row_counts(url)
    commits = [i for i, line in enumerate(statements, 1) if line == "COMMIT"]
    # Kills are aimed at the upgrade's own transaction (the CLI first reads the revision).
    first, last_commit = commits[0] + 1, commits[-1]

    outcomes = []
    for trial in range(1, KILLS + 1):
        url = trials.fresh(trial)
        trace = tmp_path / f"trial-{trial}.log"
        # The first trial stops right before the commit, when all the work is done.
        stopped = trial == 1 or rng.random() < 0.5
        line = last_commit if trial == 1 else rng.randint(first, len(statements))
        what = f"trial {trial} (seed {seed}): kill {'at' if stopped else 'after'} line {line}"
        proc = _killable_upgrade(url, trace, line if stopped else None)
        try:
            _wait_for_line(trace, line, proc)
            if stopped:
                assert proc.poll() is None, f"{what}: the upgrade did not stop there"
            else:
                time.sleep(rng.choice([0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.05)]))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        left = kit.revision_of(url)
        outcomes.append(f"{what} {statements[line - 1][:60]!r}: left {left}")
        assert left in ({oldest} if stopped else {oldest, head}), what
        assert left is not None
        assert kit.shape(url) == shapes[left], what
        assert kit.row_counts(url) == counts[left], what
        if url.startswith("sqlite"):
            db = Database(parse_url(url))
            with db.read() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok", what
            db.dispose()

        said = tether_db_upgrade(url)
        assert (f"-> {head}" if left != head else "nothing to do") in said, what
        with kit.head_app(url) as app:
            kit.verify(app, pop)
            if trial == KILLS:
                kit.finish(app, pop)
                check_finished(app, pop, executed)
    print("\n".join(outcomes))
