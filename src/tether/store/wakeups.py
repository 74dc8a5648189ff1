"""Wake-ups: telling idle workers, at once, that a run became runnable.

A wake-up is only a hint; a worker's poll stays the source of truth, so a lost wake-up costs
at most one poll interval and a spurious one a claim that finds nothing. Two paths:

- **In this process**, on both databases: the callbacks registered on the Store (each running
  worker's ``wake``) are called right after a write that made a run runnable commits. The
  committer calls them after such a batch; a SQLAlchemy transaction says so with ``notify``,
  and they are called when its connection goes back to the pool (after the commit; a
  rollback forgets it).
- **Across processes**, on PostgreSQL only: ``notify`` also sends ``NOTIFY tether_runs`` in
  the transaction, which every listening worker receives (``Listener.listen``). Workers of
  other processes on SQLite find the run at their next poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("tether.store")

CHANNEL = "tether_runs"
"""The PostgreSQL channel of wake-ups."""

_MARK = "tether.wake"
"""Set in a connection's ``info`` by ``notify``: wake this process's workers after commit."""


def notify(conn: Connection) -> None:
    """In ``conn``'s transaction: it makes a run runnable, so wake the workers once it commits
    (those of this process, and on PostgreSQL every listening one)."""
    conn.info[_MARK] = True
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"NOTIFY {CHANNEL}"))


class Wakeups:
    """The wake-up callbacks of one Store's engine (its workers' ``wake``)."""

    def __init__(self, engine: Engine) -> None:
        self._callbacks: tuple[Callable[[], None], ...] = ()
        self._lock = threading.Lock()
        event.listen(engine, "rollback", _forget)
        event.listen(engine, "checkin", self._checked_in)

    def add(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every write of this process that makes a run runnable."""
        with self._lock:
            self._callbacks = (*self._callbacks, callback)

    def remove(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (added before; removing it twice is harmless)."""
        with self._lock:
            callbacks = list(self._callbacks)
            if callback in callbacks:
                callbacks.remove(callback)
            self._callbacks = tuple(callbacks)

    def wake(self) -> None:
        """Call every callback now (from the thread that committed: they must be quick)."""
        for callback in self._callbacks:  # a tuple, replaced whole: no lock needed to read
            try:
                callback()
            except Exception as exc:  # a hint that failed: polling finds the run anyway
                log.warning("wake-up callback %r failed: %s", callback, exc)

    def _checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info.pop(_MARK, False):
            self.wake()


def _forget(conn: Connection) -> None:
    conn.info.pop(_MARK, None)
