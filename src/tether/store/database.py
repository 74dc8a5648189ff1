"""Opening a database: URL rules, connection settings, transactions and error translation.

SQLite: WAL, ``synchronous=FULL`` (``?synchronous=normal`` opts out), a busy timeout in
seconds, foreign keys on, and every write transaction ``BEGIN IMMEDIATE`` so a writer waits
for the lock instead of failing with ``SQLITE_BUSY_SNAPSHOT``. PostgreSQL: psycopg 3, READ
COMMITTED, conditional writes; ``postgresql://`` and ``postgresql+psycopg://`` both work.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from tether.errors import ConfigurationError, DatabaseUnavailable

DEFAULT_URL = "sqlite:///tether.db"
SQLITE_SYNCHRONOUS = ("full", "normal", "extra")
PAGE_SIZE = 2048
"""Bytes per page of a new SQLite database (an existing file keeps the size it was made with)."""
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """A parsed database URL: which dialect, the SQLAlchemy URL, and tether's own options."""

    dialect: str
    url: URL
    synchronous: str = "full"
    busy_timeout: float = 30.0

    @property
    def display(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        return self.url.render_as_string(hide_password=True)

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a SQLite URL, or None for memory / PostgreSQL."""
        if self.dialect != "sqlite" or not self.url.database or self.url.database == ":memory:":
            return None
        return Path(self.url.database)


def parse_url(raw: str | None) -> Target:
    """Validate a database URL and split out tether's options, or raise ``ConfigurationError``."""
    raw = raw or os.environ.get("TETHER_DATABASE_URL") or DEFAULT_URL
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigurationError(
            f"database URL {_hide(raw)!r} is malformed; expected sqlite:///path/to/file.db or "
            "postgresql://user@host:5432/dbname"
        ) from None
    backend, _, driver = url.drivername.partition("+")
    query = dict(url.query)
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ConfigurationError(f"SQLite driver {driver!r} is not supported; use sqlite:///")
        if not url.database or url.database == ":memory:":
            raise ConfigurationError(
                "an in-memory SQLite database cannot be shared by a worker and the CLI; "
                "give a file path, e.g. sqlite:///tether.db"
            )
        sync = str(query.pop("synchronous", "full")).lower()
        if sync not in SQLITE_SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous={sync!r} is not supported; use one of {', '.join(SQLITE_SYNCHRONOUS)}"
                " (full is power-loss safe, normal survives process crashes only)"
            )
        busy = _seconds(query.pop("busy_timeout", "30"), "busy_timeout")
        return Target(
            "sqlite", url.set(drivername="sqlite+pysqlite", query=query), sync, busy_timeout=busy
        )
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise ConfigurationError(
                f"PostgreSQL driver {driver!r} is not supported; use postgresql:// or "
                "postgresql+psycopg:// (psycopg 3)"
            )
        return Target("postgresql", url.set(drivername="postgresql+psycopg"))
    raise ConfigurationError(
        f"database URL scheme {url.drivername!r} is not supported; use sqlite:/// or postgresql://"
    )


def _seconds(value: Any, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}={value!r} must be a number of seconds") from None
    if seconds < 0:
        raise ConfigurationError(f"{name}={value!r} must not be negative")
    return seconds


def _hide(raw: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", raw)


def create(target: Target) -> Engine:
    """An engine with tether's connection settings applied on every new connection."""
    if target.dialect == "sqlite":
        return _sqlite_engine(target)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "PostgreSQL needs psycopg 3: pip install 'tether[postgres]'"
        ) from None
    return create_engine(
        target.url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 30,
            "application_name": "tether",
        },
    )


def _sqlite_engine(target: Target) -> Engine:
    path = target.sqlite_path
    assert path is not None
    if path.exists() and path.is_dir():
        raise ConfigurationError(f"SQLite path {path} is a directory; give a file path")
    if not path.parent.exists():
        raise ConfigurationError(
            f"cannot create SQLite database {path}: folder {path.parent} does not exist"
        )
    engine = create_engine(
        target.url,
        connect_args={"check_same_thread": False, "timeout": target.busy_timeout},
        poolclass=NullPool if os.environ.get("TETHER_SQLITE_NULLPOOL") else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module: we issue BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # Takes effect only while the file is still empty (a new database). A commit
            # writes every page it dirtied to the WAL, and a step dirties a few pages for a
            # row of a hundred bytes: 2 KiB pages write half the bytes of 4 KiB ones.
            cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DatabaseUnavailable(
                    f"SQLite database {path} could not switch to WAL mode (got {mode}); WAL needs "
                    "a local disk, not a network filesystem"
                )
            cursor.execute(f"PRAGMA synchronous={target.synchronous.upper()}")
            cursor.execute(f"PRAGMA busy_timeout={int(target.busy_timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_size_limit=67108864")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("tether_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def translate(exc: BaseException, target: Target) -> BaseException:
    """Turn a driver error into a one-line tether error when it means the database is unusable."""
    if isinstance(exc, DatabaseUnavailable | ConfigurationError):
        return exc
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc) else ""
    lowered = message.lower()
    if target.dialect == "sqlite":
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return DatabaseUnavailable(
                f"SQLite file {target.sqlite_path} is not a tether database or is corrupted "
                f"({message}); restore it from a backup or point --db at another file"
            )
        if "unable to open" in lowered or "readonly" in lowered or "read-only" in lowered:
            return DatabaseUnavailable(
                f"cannot open SQLite database {target.sqlite_path} for writing ({message}); check "
                "the path and its permissions"
            )
        if "locked" in lowered or "busy" in lowered:
            return DatabaseUnavailable(
                f"SQLite database {target.sqlite_path} stayed locked for more than "
                f"{target.busy_timeout:g}s ({message}); another process holds a long write"
            )
    elif isinstance(exc, OperationalError) or _is_connection_error(exc):
        return DatabaseUnavailable(
            f"cannot reach PostgreSQL at {target.display} ({message}); check that the server is "
            "running and the URL is right"
        )
    return exc


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def is_transient(exc: BaseException, dialect: str) -> bool:
    """True for errors that a retry of the whole transaction can fix (lock, deadlock, restart)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if dialect == "sqlite":
        text_ = str(exc.orig).lower()
        return "locked" in text_ or "busy" in text_
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    return sqlstate in ("40001", "40P01", "55P03", "57P01") or sqlstate.startswith("08")


class Database:
    """An engine plus the two ways tether touches it: short reads and short write transactions."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.dialect = target.dialect
        self.engine = create(target)
        self._write_options = {"tether_write": True}

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A short read transaction (deferred on SQLite)."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except DBAPIError as exc:
            raise translate(exc, self.target) from None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A short write transaction: ``BEGIN IMMEDIATE`` on SQLite, committed on exit."""
        try:
            with (
                self.engine.connect().execution_options(**self._write_options) as conn,
                conn.begin(),
            ):
                yield conn
        except DBAPIError as exc:
            raise translate(exc, self.target) from None

    def transact(self, work: Callable[[Connection], T], attempts: int = 5) -> T:
        """Run ``work`` in a write transaction, retrying the whole of it on transient errors."""
        for attempt in range(1, attempts + 1):
            try:
                with (
                    self.engine.connect().execution_options(**self._write_options) as conn,
                    conn.begin(),
                ):
                    return work(conn)
            except DBAPIError as exc:
                if attempt == attempts or not is_transient(exc, self.dialect):
                    raise translate(exc, self.target) from None
                time.sleep(min(2.0, 0.05 * 2**attempt) * (1 + random.random()))
        raise AssertionError("unreachable")

    def execute_read(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a read transaction."""
        with self.read() as conn:
            return work(conn)

    def wal_checkpoint(self) -> None:
        """Fold the SQLite WAL back into the database so it cannot grow without bound."""
        if self.dialect != "sqlite":
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def ping(self) -> None:
        """Open a connection and run a trivial query; raise ``DatabaseUnavailable`` on failure."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            raise translate(exc, self.target) from None

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
