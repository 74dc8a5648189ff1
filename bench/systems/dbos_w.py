"""DBOS Transact (Python) on its SQLite system database, as documented.

``DBOS(config={"name": ..., "system_database_url": "sqlite:///..."})``, ``@DBOS.workflow()``
and ``@DBOS.step()``; every step's output is checkpointed before the workflow goes on.
DBOS sets no journal mode or synchronous pragma of its own, so SQLite's defaults apply
(rollback journal, ``synchronous=FULL``): power-loss safe.

``--journal wal`` (the "DBOS-WAL" peer) adds a SQLAlchemy ``connect`` listener on the
``Engine`` class before ``DBOS.launch()``, the way SQLAlchemy documents setting SQLite pragmas
on engines one does not create: every connection of the engine DBOS builds for its system
database runs :func:`common.set_wal_full` (WAL, ``synchronous=FULL``) when it is opened, next
to DBOS's own listener (``IMMEDIATE`` transactions, busy timeout, foreign keys), which stays.
Passing DBOS a ``system_database_engine`` of our own would drop that listener; its
``db_engine_kwargs`` cannot set pragmas. Only the pragmas differ: DBOS still writes the same
transactions per step. The run fails unless every connection on the file that can be read
back says WAL/FULL after the timed part.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from typing import Any

import common
import sqlalchemy as sa
from dbos import DBOS, DBOSConfig, SetWorkflowID

SIDE_FILE = os.environ.get("BENCH_SIDE_FILE", "")
STEP_SLEEP = float(os.environ.get("BENCH_STEP_SLEEP", "0.02"))


@DBOS.step()
def noop(i: int) -> int:
    """A trivial step: its output is all there is to record."""
    return i


@DBOS.step()
def effect(i: int) -> int:
    """W2's step: sleep, then leave a visible side effect (step number and wall time)."""
    time.sleep(STEP_SLEEP)
    common.append_line(SIDE_FILE, f"{i} {time.time():.6f} {os.getpid()}")
    return i


@DBOS.workflow()
def trivial(steps: int) -> int:
    """W1's workflow: ``steps`` journaled no-op steps."""
    for i in range(steps):
        noop(i)
    return steps


@DBOS.workflow()
def crashy(steps: int) -> int:
    """W2's workflow: ``steps`` steps with side effects."""
    for i in range(steps):
        effect(i)
    return steps


def wal_full_on_connect(dbapi_conn: Any, _record: Any) -> None:
    """SQLAlchemy ``connect`` listener: every new sqlite3 connection in WAL, FULL."""
    if isinstance(dbapi_conn, sqlite3.Connection):
        common.set_wal_full(dbapi_conn)


def launch(db: str, fresh: bool, journal: str = "default") -> None:
    """Configure and launch the DBOS singleton on a SQLite system database."""
    path = common.fresh(db) if fresh else db
    if journal == "wal":
        sa.event.listen(sa.Engine, "connect", wal_full_on_connect)
    config: DBOSConfig = {
        "name": "tether-bench",
        "system_database_url": f"sqlite:///{os.path.abspath(path)}",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()


def w1(args: argparse.Namespace) -> None:
    """R runs of S trivial steps, one or ``--inflight`` at a time."""
    spy = common.SqliteSpy(count=args.count).install()
    launch(args.db, fresh=True, journal=args.journal)
    commits_before, bytes_before = spy.commits_for(args.db), common.logical_bytes(args.db)
    with common.timed() as elapsed:
        if args.inflight <= 1:
            for _ in range(args.runs):
                trivial(args.steps)
        else:
            with ThreadPoolExecutor(args.inflight) as pool:
                list(pool.map(trivial, [args.steps] * args.runs))
    if args.journal == "wal":
        spy.require(args.db, "WAL", "FULL")
    common.w1_result("dbos", version("dbos"), args, elapsed[0], spy, commits_before, bytes_before)
    DBOS.destroy()


def w2(args: argparse.Namespace) -> None:
    """Start the workflow (phase ``start``, to be killed) or let launch recover it."""
    launch(args.db, fresh=args.phase == "start", journal=args.journal)
    if args.phase == "start":
        with SetWorkflowID("w2"):
            crashy(args.steps)
        common.fail("the start phase finished before it was killed")
    # DBOS.launch() has already begun recovering this executor's pending workflows.
    ready = time.time()
    result = DBOS.retrieve_workflow("w2").get_result()
    common.emit(system="dbos", ready_at=ready, done_at=time.time(), result=result)
    DBOS.destroy()


def main() -> None:
    """Run one workload and print its JSON result line."""
    p = common.parser(__doc__ or "")
    common.journal_option(p)
    args = p.parse_args()
    if args.workload == "version":
        common.emit(system="dbos", version=version("dbos"))
    elif args.workload == "W1":
        w1(args)
    elif args.workload == "W2":
        w2(args)
    else:
        common.fail(f"DBOS is not measured in {args.workload}")


if __name__ == "__main__":
    main()
