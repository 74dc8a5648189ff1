"""Riding out a database outage: wait with backoff, say so each time, give up after a limit.

Used where waiting is safe because nothing was written: a write that could not reach the
database (or found the disk full), and the worker's loop looking for work.
"""

from __future__ import annotations

import logging
import random
import time

log = logging.getLogger("tether.outage")

DEFAULT_OUTAGE_LIMIT = 300.0
"""Seconds a worker (or a write) rides out an unreachable database or a full disk."""
FIRST_DELAY = 0.1
MAX_DELAY = 5.0


class Outage:
    """One outage as one caller sees it: ``wait(error)`` after each failure; ``over()`` once
    the database answers again.

    Args:
        where: the database, as it may be shown (no password).
        limit: seconds of outage after which ``wait`` gives up (returns False).
    """

    def __init__(self, where: str, limit: float) -> None:
        self.where = where
        self.limit = limit
        self.started: float | None = None
        self.attempts = 0

    def wait(self, error: BaseException) -> bool:
        """Sleep before the next try and return True, or return False once the outage has
        lasted ``limit`` seconds. The first retry is immediate: after a server restart a dead
        connection is replaced at once."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        down = now - self.started
        if down >= self.limit:
            log.error(
                "%s; giving up after %.1fs of outage (the limit is %gs)", error, down, self.limit
            )
            return False
        self.attempts += 1
        backoff = FIRST_DELAY * 2 ** (self.attempts - 2)
        delay = 0.0 if self.attempts == 1 else min(MAX_DELAY, backoff)
        delay = min(delay * (1 + random.random() / 4), max(0.0, self.limit - down))
        log.warning(
            "%s; retrying in %.2fs (unavailable for %.1fs; giving up after %gs)",
            error,
            delay,
            down,
            self.limit,
        )
        time.sleep(delay)
        return True

    def over(self) -> None:
        """The database answered: log how long it was away, if it was."""
        if self.started is not None:
            log.warning(
                "%s is back after %.1fs; carrying on", self.where, time.monotonic() - self.started
            )
        self.started = None
        self.attempts = 0
