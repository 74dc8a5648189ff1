"""The physical limit: one INSERT and one COMMIT per step, in WAL mode, with python's sqlite3.

This is what any SQLite-backed runtime that commits every step on its own can at best reach:
``isolation_level=None`` and an explicit ``BEGIN IMMEDIATE`` per step, as tether does.
"""

from __future__ import annotations

import sqlite3

import common


def main() -> None:
    """Run one workload and print its JSON result line."""
    args = common.parser(__doc__ or "").parse_args()
    if args.workload == "version":
        common.emit(system="raw", version=sqlite3.sqlite_version)
        return
    if args.workload != "W1":
        common.fail(f"raw SQLite has no {args.workload}")
    spy = common.SqliteSpy(count=args.count).install()
    path = common.fresh(args.db)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={args.sync.upper()}")
    conn.execute(
        "CREATE TABLE steps (run_id INTEGER NOT NULL, step INTEGER NOT NULL, output TEXT,"
        " PRIMARY KEY (run_id, step))"
    )
    commits_before, bytes_before = spy.commits_for(path), common.logical_bytes(path)
    with common.timed() as elapsed:
        for run in range(args.runs):
            for step in range(args.steps):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO steps VALUES (?, ?, ?)", (run, step, str(step)))
                conn.execute("COMMIT")
    common.w1_result(
        "raw", sqlite3.sqlite_version, args, elapsed[0], spy, commits_before, bytes_before
    )
    conn.close()


if __name__ == "__main__":
    main()
