"""Plumbing shared by the per-system benchmark modules (standard library only).

Every module in ``bench/systems/`` runs in its own process, in the interpreter that has its
system installed (tether in ``.venv``, the peers in ``bench/.peers``), and prints exactly one
JSON line: ``{"ok": true, ...figures}`` or ``{"ok": false, "error": ...}``.

Measuring at equal durability needs two facts from inside each system: the pragmas of the
connection it really writes with, and how many transactions it commits per step. All of the
systems measured here reach SQLite through the standard ``sqlite3`` module (SQLAlchemy's
pysqlite driver included), so :class:`SqliteSpy` wraps ``sqlite3.connect`` and, when counting
is on, traces every statement: a ``COMMIT`` after rows changed, or a write statement outside a
transaction, is one durable commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sqlite3.dbapi2
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE", "WITH")
MARK_DIR = "/dev/null/tether-bench-mark-"


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every system module shares: ``WORKLOAD --runs --steps --db ...``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "workload",
        choices=["W1", "W2", "W3", "W4", "W6", "W7", "W8", "W9", "W10", "worker", "version"],
    )
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--db", default="", help="database file (or URL for tether on PostgreSQL)")
    p.add_argument("--sync", default="full", choices=["full", "normal"])
    p.add_argument("--inflight", type=int, default=1, help="runs in flight at once")
    p.add_argument("--count", action="store_true", help="count commits (slower; not timed)")
    p.add_argument(
        "--phase", default="start", help="W2/W4: start (to be killed) or resume; W4 also measure"
    )
    p.add_argument("--side", default="", help="W2/W4: side-effect file")
    p.add_argument("--sleep", type=float, default=0.02, help="seconds each W2/W6 step sleeps")
    p.add_argument("--workers", type=int, default=1, help="W6: worker processes")
    p.add_argument("--concurrency", type=int, default=8, help="W3/W6-W9: runs per worker")
    p.add_argument("--trips", type=int, default=200, help="W7: message round trips")
    p.add_argument("--children", type=int, default=100, help="W8: child runs")
    p.add_argument("--agents", type=int, default=10, help="W8: agents the children run on")
    p.add_argument("--decisions", type=int, default=100, help="W9: decisions one run asks for")
    return p


def journal_option(p: argparse.ArgumentParser) -> None:
    """``--journal wal``: a peer's SQLite file in WAL with ``synchronous=FULL`` (see
    :func:`set_wal_full`), instead of the library's own journal settings."""
    p.add_argument(
        "--journal",
        default="default",
        choices=["default", "wal"],
        help="'wal': WAL with synchronous=FULL, as tether's default; 'default': the library's",
    )


def set_wal_full(conn: sqlite3.Connection) -> None:
    """Switch a connection to WAL with ``synchronous=FULL``: tether's default durability.

    In WAL, FULL syncs the log at every commit, so a commit survives power loss, with one
    fsync per commit (the rollback journal's FULL needs several). ``journal_mode`` persists in
    the file; ``synchronous`` is per connection, so every connection that writes needs this.
    Pragmas only: what a library commits per step does not change. Nothing here proves that the
    switch took (a connection inside a transaction silently keeps its mode):
    :meth:`SqliteSpy.require` reads the pragmas back from the library's own connections.
    """
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")


def emit(**fields: Any) -> None:
    """Print the one JSON result line (``ok`` defaults to true)."""
    fields.setdefault("ok", True)
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def fail(message: str, **fields: Any) -> None:
    """Print a failed result and exit with status 1."""
    emit(ok=False, error=message, **fields)
    sys.exit(1)


def fresh(path: str | Path) -> Path:
    """Delete a SQLite file and its companions so a run starts from nothing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{p}{suffix}").unlink(missing_ok=True)
    return p


def mark(name: str) -> None:
    """Leave a marker in an ``strace`` log (an ``openat`` that fails harmlessly).

    The orchestrator counts fsync calls between ``begin`` and ``end`` markers, so set-up and
    shutdown do not pollute the per-step figure.
    """
    try:
        os.open(MARK_DIR + name, os.O_RDONLY)
    except OSError:
        pass


def logical_bytes(path: str | Path) -> int:
    """Size the database file has after a checkpoint: page_count x page_size, WAL included."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)
    finally:
        conn.close()


class _Connection(sqlite3.Connection):
    """A plain connection that can be weakly referenced (the base class cannot)."""


class SqliteSpy:
    """Watches every ``sqlite3`` connection the process opens, to read back what it really does.

    Args:
        count: also count durable commits per database file (adds a trace callback).
    """

    def __init__(self, count: bool = False) -> None:
        self.count = count
        self.commits: dict[str, int] = {}
        self._conns: list[tuple[str, weakref.ref[sqlite3.Connection]]] = []
        self._lock = threading.Lock()
        self._connect: Callable[..., sqlite3.Connection] = sqlite3.connect

    def install(self) -> SqliteSpy:
        """Replace ``sqlite3.connect`` (and the ``dbapi2`` alias SQLAlchemy uses)."""
        sqlite3.connect = self._spied_connect  # type: ignore[assignment]
        sqlite3.dbapi2.connect = self._spied_connect  # type: ignore[assignment]
        return self

    def _spied_connect(self, database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", _Connection)
        conn = self._connect(database, *args, **kwargs)
        key = os.path.realpath(str(database)) if str(database) != ":memory:" else ":memory:"
        with self._lock:
            self._conns.append((key, weakref.ref(conn)))
        if self.count:
            conn.set_trace_callback(self._tracer(key, weakref.ref(conn)))
        return conn

    def _tracer(self, key: str, ref: weakref.ref[sqlite3.Connection]) -> Callable[[str], None]:
        changes_at_begin = [0]

        def trace(sql: str) -> None:
            conn = ref()
            if conn is None:
                return
            verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
            if verb == "BEGIN":
                changes_at_begin[0] = conn.total_changes
            elif verb in ("COMMIT", "END"):
                if conn.in_transaction and conn.total_changes > changes_at_begin[0]:
                    self._add(key)
            elif verb in WRITE_VERBS and not conn.in_transaction:
                self._add(key)  # autocommit write: the statement is its own transaction

        return trace

    def _add(self, key: str) -> None:
        with self._lock:
            self.commits[key] = self.commits.get(key, 0) + 1

    def commits_for(self, path: str | Path) -> int:
        """Durable commits counted so far on one database file."""
        return self.commits.get(os.path.realpath(str(path)), 0)

    def pragmas(self, path: str | Path) -> dict[str, str]:
        """``journal_mode`` and ``synchronous`` as read back from the system's own connection."""
        key = os.path.realpath(str(path))
        for conn_key, ref in reversed(self._conns):
            conn = ref()
            if conn_key != key or conn is None:
                continue
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            except (sqlite3.ProgrammingError, sqlite3.OperationalError):
                continue  # closed, or owned by another thread: try an older one
            return {"journal_mode": str(mode).upper(), "synchronous": SYNC_NAMES.get(sync, "?")}
        return {"journal_mode": "?", "synchronous": "?"}

    def require(self, path: str | Path, journal_mode: str, synchronous: str) -> int:
        """Fail the run unless every connection on the file that can be read back (those of
        this thread, or shared across threads) has these pragmas, and a WAL file has its log.

        Returns how many connections were read back; a run where none could be is failed too,
        so a variant that silently kept the rollback journal can never be reported as WAL.
        """
        key = os.path.realpath(str(path))
        if journal_mode == "WAL" and not Path(f"{key}-wal").exists():
            fail(f"{path} has no -wal file: it is not in WAL mode")
        checked, wrong = 0, []
        for conn_key, ref in self._conns:
            conn = ref()
            if conn_key != key or conn is None:
                continue
            try:
                mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).upper()
                sync = SYNC_NAMES.get(conn.execute("PRAGMA synchronous").fetchone()[0], "?")
            except (sqlite3.ProgrammingError, sqlite3.OperationalError):
                continue  # closed, or owned by another thread
            checked += 1
            if (mode, sync) != (journal_mode, synchronous):
                wrong.append(f"{mode}/{sync}")
        if wrong or not checked:
            found = ", ".join(wrong) or "no connection could be read back"
            fail(f"expected {journal_mode}/{synchronous} on {path}; found {found}")
        return checked


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t:`` leaves the elapsed seconds in ``t[0]``, between strace markers."""
    out = [0.0]
    mark("begin")
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - start
        mark("end")


def w1_result(
    system: str,
    version: str,
    args: argparse.Namespace,
    seconds: float,
    spy: SqliteSpy,
    commits_before: int,
    bytes_before: int,
    **extra: Any,
) -> None:
    """Emit the standard W1 result line for a SQLite-backed system."""
    steps = args.runs * args.steps
    commits = spy.commits_for(args.db) - commits_before if args.count else None
    emit(
        system=system,
        version=version,
        steps=steps,
        seconds=seconds,
        steps_per_s=steps / seconds if seconds else None,
        commits=commits,
        bytes_setup=bytes_before,
        bytes_end=logical_bytes(args.db),
        sqlite=sqlite3.sqlite_version,
        **spy.pragmas(args.db),
        **extra,
    )


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all cores' time that was busy between two :func:`cpu_jiffies` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def append_line(path: str, text: str) -> None:
    """Append one line to a side-effect file (survives a SIGKILL: it is in the page cache)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)
