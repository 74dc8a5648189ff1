"""Opening a database: URL rules, connection settings, transactions and error translation.

SQLite: WAL, ``synchronous=FULL`` (``?synchronous=normal`` opts out), a busy timeout in
seconds, foreign keys on, and every write transaction ``BEGIN IMMEDIATE`` so a writer waits
for the lock instead of failing with ``SQLITE_BUSY_SNAPSHOT``. PostgreSQL: psycopg 3, READ
COMMITTED, conditional writes; ``postgresql://`` and ``postgresql+psycopg://`` both work.

A password is never shown: ``Target.display`` and every message hide it, whatever the URL
looks like (``parse_url`` says where a password may end). Driver errors that mean the
database is unusable become one-line ``DatabaseUnavailable`` errors; a full disk is
``StorageFull``, whose write was rolled back, so freeing space is all it takes to go on.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import NullPool

from tether.codec import check_text
from tether.errors import ConfigurationError, DatabaseUnavailable, StorageFull, TetherError

DEFAULT_URL = "sqlite:///tether.db"
SQLITE_SYNCHRONOUS = ("full", "normal", "extra")
PAGE_SIZE = 2048
"""Bytes per page of a new SQLite database (an existing file keeps the size it was made with)."""
FULL_BELOW = 1024 * 1024
"""Free bytes under which an SQLite I/O error is taken for a full disk (SQLite reports some
writes that found no space, such as growing the ``-shm`` file, as a plain I/O error)."""
_SECRET_QUERY_KEYS = ("password", "sslpassword")
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
        """The URL with any password hidden (in the user info or the query), for messages."""
        query = {
            k: "***" if k.lower() in _SECRET_QUERY_KEYS else v for k, v in self.url.query.items()
        }
        shown = self.url.set(query=query).render_as_string(hide_password=True)
        return shown.replace("%2A%2A%2A", "***")

    def redact(self, text: str) -> str:
        """``text`` (a driver's message) with this URL's passwords replaced by ``***``."""
        secrets = [self.url.password, *(self.url.query.get(k) for k in _SECRET_QUERY_KEYS)]
        for secret in secrets:
            if isinstance(secret, str) and secret:
                text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
        return text

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a SQLite URL, or None for memory / PostgreSQL."""
        if self.dialect != "sqlite" or not self.url.database or self.url.database == ":memory:":
            return None
        return Path(self.url.database)


def parse_url(raw: str | None) -> Target:
    """Validate a database URL and split out tether's options, or raise ``ConfigurationError``.

    The user info ends at the URL's last ``@``, so a password may hold ``@``, ``/``, ``:``,
    ``?`` or ``#`` without percent-encoding (encoded ones are decoded as usual); an ``@`` after
    the host, in a query value, must then be written ``%40``.
    """
    raw = raw or os.environ.get("TETHER_DATABASE_URL") or DEFAULT_URL
    try:
        url = make_url(_encode_userinfo(raw))
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        why = "its port is not a number" if isinstance(exc, ValueError) else "not a URL"
        raise ConfigurationError(
            f"database URL {_hide(raw)!r} is malformed ({why}); expected sqlite:///path/to/file.db"
            " or postgresql://user:password@host:5432/dbname"
        ) from None
    if url.port is not None and not 0 < url.port < 65536:
        raise ConfigurationError(
            f"database URL {_hide(raw)!r} is malformed (port {url.port} is not between 1 and "
            "65535); expected postgresql://user:password@host:5432/dbname"
        )
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


def _split_userinfo(raw: str) -> tuple[str, str, str | None, str] | None:
    """``scheme://user:password@rest`` as (``scheme://``, user, password, ``@rest``).

    The user info ends at the *last* ``@``: passwords are often made with ``@``, ``/``, ``:``,
    ``?`` or ``#`` and not percent-encoded, and ending them at the first ``@`` (as SQLAlchemy
    does) would read the rest of the password as the host and show it in messages. So an
    ``@`` after the host (in a query value) must be written ``%40``. A URL whose part before
    the ``@`` starts with a path (``sqlite:////data/a@b.db``) has no user info.
    """
    scheme, sep, rest = raw.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if "/" in user or "?" in user:
        return None
    return scheme + sep, user, password if colon else None, rest[at:]


def _encode_userinfo(raw: str) -> str:
    """``raw`` with its user name and password percent-encoded, so ``make_url`` reads them
    whole (an already encoded ``%40`` stays the ``@`` it stands for)."""
    parts = _split_userinfo(raw)
    if parts is None:
        return raw
    start, user, password, rest = parts
    userinfo = quote(unquote(user), safe="")
    if password is not None:
        userinfo += ":" + quote(unquote(password), safe="")
    return start + userinfo + rest


def _hide(raw: str) -> str:
    """A URL that did not parse, with anything that may be a password replaced by ``***``."""
    parts = _split_userinfo(raw)
    if parts is not None:
        start, user, password, rest = parts
        raw = start + user + (":***" if password is not None else "") + rest
    elif "://" not in raw and "@" in raw:  # not a URL at all: keep only what follows the '@'
        raw = "***" + raw[raw.rfind("@") :]
    keys = "|".join(_SECRET_QUERY_KEYS)
    return re.sub(rf"([?&](?:{keys})=)[^&]*", r"\1***", raw, flags=re.IGNORECASE)


def create(target: Target) -> Engine:
    """An engine with tether's connection settings applied on every new connection."""
    engine = _sqlite_engine(target) if target.dialect == "sqlite" else _postgres_engine(target)
    event.listen(engine, "before_cursor_execute", _refuse_unstorable_text)
    return engine


def _refuse_unstorable_text(
    _conn: Connection,
    _cursor: Any,
    _statement: str,
    parameters: Any,
    _context: Any,
    executemany: bool,
) -> None:
    """Refuse text that one of the databases cannot hold (NUL, lone surrogates) in every
    statement, reads included, so both answer alike. The API names the field before this;
    this catches what reaches the database unchecked. The committer's hot path writes values
    checked by the codec, on its own cursor."""
    for row in parameters if executemany else (parameters,):
        for value in row.values() if isinstance(row, dict) else row or ():
            if type(value) is str and not (value.isascii() and "\x00" not in value):
                check_text("a text value sent to the database", value, max_length=len(value))


def _postgres_engine(target: Target) -> Engine:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "PostgreSQL needs psycopg 3: pip install 'tether[postgres]'"
        ) from None
    engine = create_engine(
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

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # tether's transactions last milliseconds. One left open between two statements is a
        # process that froze (SIGSTOP, a swapped-out VM) while holding row locks, which would
        # stall every claim of those agents: the server ends such a session instead.
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}'")
        finally:
            cursor.close()
        dbapi_connection.commit()

    return engine


IDLE_IN_TRANSACTION = "10s"
"""How long PostgreSQL keeps a tether session that sits idle inside a transaction."""


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
    """Turn a driver error into a one-line tether error when it means the database is unusable
    (``DatabaseUnavailable``, ``StorageFull``) or a value cannot be stored in it
    (``ConfigurationError``); return any other error as it is."""
    if isinstance(exc, TetherError):
        return exc
    if isinstance(exc, UnicodeEncodeError):
        char = exc.object[exc.start] if isinstance(exc.object, str) else "?"
        return ConfigurationError(
            f"a text value sent to the database contains a lone surrogate (U+{ord(char):04X}), "
            "which is not valid Unicode (it usually comes from bytes decoded with "
            "errors='surrogateescape'); pass valid text"
        )
    orig = getattr(exc, "orig", None) or exc
    message = target.redact(str(orig).strip().splitlines()[0]) if str(orig).strip() else ""
    lowered = message.lower()
    if _is_disk_full(orig, lowered, target):
        where, disk = (
            (f"SQLite database {target.sqlite_path}", "that disk")
            if target.dialect == "sqlite"
            else (f"PostgreSQL at {target.display}", "the database server's disk")
        )
        return StorageFull(
            f"{where}: the disk is full ({message}); nothing committed is lost: free space on "
            f"{disk}, then retry (restart a worker that stopped)"
        )
    if "nul (0x00)" in lowered or getattr(orig, "sqlstate", None) == "22P05":
        return ConfigurationError(
            f"a text value contains a NUL character (U+0000), which PostgreSQL cannot store "
            f"({message}); remove it"
        )
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
        if "disk i/o error" in lowered:
            return DatabaseUnavailable(
                f"SQLite database {target.sqlite_path}: the disk failed a read or write "
                f"({message}); check the disk and the file system, then retry"
            )
    elif isinstance(exc, OperationalError) or _is_connection_error(exc):
        return DatabaseUnavailable(
            f"cannot reach PostgreSQL at {target.display} ({message}); check that the server is "
            "running and the URL is right"
        )
    return exc


def _is_disk_full(orig: BaseException, lowered: str, target: Target) -> bool:
    """True when the error means no space is left where the database writes."""
    if getattr(orig, "errno", None) == errno.ENOSPC or "no space left on device" in lowered:
        return True
    if target.dialect != "sqlite":
        return getattr(orig, "sqlstate", None) == "53100"  # disk_full
    if getattr(orig, "sqlite_errorname", None) == "SQLITE_FULL" or "disk is full" in lowered:
        return True
    # Growing the -shm file, or creating the -wal, on a full disk fails as an I/O error or as
    # "unable to open": look at the disk before blaming anything else.
    if "disk i/o error" in lowered or "unable to open" in lowered:
        path = target.sqlite_path
        try:
            return path is not None and shutil.disk_usage(path.parent).free < FULL_BELOW
        except OSError:
            return False
    return False


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


ROLLED_BACK = "rolled_back"
CONNECTION = "connection"


def failure_kind(exc: BaseException, dialect: str) -> str | None:
    """How a write failed, for deciding whether to do it again (a full disk is
    ``translate``'s ``StorageFull``).

    ``rolled_back``: a lock wait, a deadlock or a serialization failure; nothing was written,
    redo it now. ``connection``: the database went away; a statement in flight may or may not
    have been committed. ``None``: anything else.
    """
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    if dialect == "sqlite":
        code = getattr(orig, "sqlite_errorcode", None)
        text_ = str(orig).lower()
        if code in (5, 6) or "locked" in text_ or "busy" in text_:  # SQLITE_BUSY, _LOCKED
            return ROLLED_BACK
        return None
    sqlstate = getattr(orig, "sqlstate", None) or ""
    if sqlstate in ("40001", "40P01", "55P03"):
        return ROLLED_BACK
    if exc.connection_invalidated or sqlstate.startswith(("08", "57P")) or not sqlstate:
        return CONNECTION if isinstance(exc, OperationalError | InterfaceError) else None
    return None


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
        except (DBAPIError, UnicodeEncodeError) as exc:
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
        except (DBAPIError, UnicodeEncodeError) as exc:
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
            except UnicodeEncodeError as exc:
                raise translate(exc, self.target) from None
        raise AssertionError("unreachable")

    def execute_read(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a read transaction."""
        with self.read() as conn:
            return work(conn)

    def wal_checkpoint(self) -> None:
        """Fold the SQLite WAL back into the database so it cannot grow without bound."""
        if self.dialect != "sqlite":
            return
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except DBAPIError as exc:
            raise translate(exc, self.target) from None

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
