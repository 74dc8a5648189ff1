"""Storage: the only package that imports SQLAlchemy or issues SQL.

``Store`` speaks in the runtime's verbs (create an agent, transition it, claim a run, append a
step, ...); its methods are grouped by subject in the modules of this package.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from tether.outage import DEFAULT_OUTAGE_LIMIT
from tether.store import migrate
from tether.store.agents import AgentQueries
from tether.store.approvals import ApprovalQueries
from tether.store.budgets import BudgetQueries
from tether.store.committer import Committer
from tether.store.common import utcnow
from tether.store.database import Database, Target, parse_url
from tether.store.history import GcReport, HistoryQueries
from tether.store.messages import MessageQueries
from tether.store.runs import Listener, RunQueries
from tether.store.types import TypeQueries
from tether.store.wakeups import Wakeups

__all__ = ["Database", "GcReport", "Store", "Target", "parse_url"]


class Store(
    AgentQueries,
    RunQueries,
    HistoryQueries,
    MessageQueries,
    ApprovalQueries,
    BudgetQueries,
    TypeQueries,
    Listener,
):
    """One database, opened and checked: the schema is created on first use, refused if newer."""

    def __init__(
        self,
        url: str | None = None,
        *,
        create: bool = True,
        clock: Callable[[], dt.datetime] = utcnow,
        outage_limit: float | None = None,
    ) -> None:
        self.target = parse_url(url)
        self.db = Database(self.target)
        self.clock = clock
        """The app's clock: deadlines of waits are compared with it."""
        limit = DEFAULT_OUTAGE_LIMIT if outage_limit is None else outage_limit
        self.wakeups = Wakeups(self.db.engine)
        self.committer = Committer(self.db, clock=clock, outage_limit=limit, wake=self.wakeups.wake)
        try:
            migrate.check(self.db, create=create)
        except BaseException:
            self.db.dispose()
            raise

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.db.dialect

    def add_wake_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` right after this process commits a write that makes a run
        runnable (a submit, a release, a retry, a resume, a delivered wait), through this
        Store. It runs on the committing thread: it must be quick (``Event.set``)."""
        self.wakeups.add(callback)

    def remove_wake_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (see ``add_wake_listener``)."""
        self.wakeups.remove(callback)

    def close(self) -> None:
        """Release every connection."""
        self.committer.close()
        self.db.dispose()
