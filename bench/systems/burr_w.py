"""Apache Burr with its SQLite persister, as documented for persistence.

An ``ApplicationBuilder`` application whose ``step`` action loops until the count is reached,
with ``SQLitePersister`` as state persister (state saved and committed after every action) and
initializer. The persister sets no pragmas, so SQLite's defaults apply (rollback journal,
``synchronous=FULL``): power-loss safe.

``--journal wal`` (the "Burr-WAL" peer) gives the persister its connection through its
documented ``connection=`` argument: opened as the persister opens its own
(``sqlite3.connect(db_path)``, Python's default transaction handling), then switched to WAL
with ``synchronous=FULL`` by :func:`common.set_wal_full`. Only the pragmas differ: the
persister still inserts one row and commits once per action. The run fails unless every
connection on the file reads back WAL/FULL after the timed part.
"""

from __future__ import annotations

import argparse
import sqlite3
from importlib.metadata import version

import common
from burr.core import ApplicationBuilder, State, action, default, expr
from burr.core.persistence import SQLitePersister


@action(reads=["i"], writes=["i"])
def step(state: State) -> State:
    """A trivial step: advance the counter."""
    return state.update(i=state["i"] + 1)


@action(reads=[], writes=[])
def done(state: State) -> State:
    """The terminal action; the run halts before it."""
    return state


def w1(args: argparse.Namespace) -> None:
    """R runs (applications) of S trivial steps, one at a time."""
    if args.inflight > 1:
        common.fail("Burr's SQLitePersister is one connection, not for concurrent runs")
    spy = common.SqliteSpy(count=args.count).install()
    path = common.fresh(args.db)
    persister = SQLitePersister(
        db_path=str(path), table_name="burr_state", connection=connect(args)
    )
    persister.initialize()
    commits_before, bytes_before = spy.commits_for(path), common.logical_bytes(path)
    with common.timed() as elapsed:
        for run in range(args.runs):
            app = (
                ApplicationBuilder()
                .with_actions(step=step, done=done)
                .with_transitions(
                    ("step", "step", expr(f"i < {args.steps}")), ("step", "done", default)
                )
                .initialize_from(
                    persister,
                    resume_at_next_action=True,
                    default_state={"i": 0},
                    default_entrypoint="step",
                )
                .with_state_persister(persister)
                .with_identifiers(app_id=f"r{run}")
                .build()
            )
            app.run(halt_before=["done"])
    if args.journal == "wal":
        spy.require(path, "WAL", "FULL")
    common.w1_result("burr", version("burr"), args, elapsed[0], spy, commits_before, bytes_before)
    persister.cleanup()


def connect(args: argparse.Namespace) -> sqlite3.Connection | None:
    """The persister's connection for ``--journal wal``; None lets it open its own."""
    if args.journal != "wal":
        return None
    conn = sqlite3.connect(args.db)  # what SQLitePersister does when given no connection
    common.set_wal_full(conn)
    return conn


def main() -> None:
    """Run one workload and print its JSON result line."""
    p = common.parser(__doc__ or "")
    common.journal_option(p)
    args = p.parse_args()
    if args.workload == "version":
        common.emit(system="burr", version=version("burr"))
    elif args.workload == "W1":
        w1(args)
    else:
        common.fail(f"Burr is not measured in {args.workload}")


if __name__ == "__main__":
    main()
