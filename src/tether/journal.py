"""The records the engine and the store exchange about one run's journal. No I/O here."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.types import RunStatus, StepStatus
from tether.vocabulary import WaitKind

__all__ = [
    "Child",
    "Claim",
    "ClaimSpec",
    "Commit",
    "Committed",
    "JournalEntry",
    "Lease",
    "LedgerChange",
    "OpenLedger",
    "Outgoing",
    "Reserve",
    "RunRef",
    "Settle",
    "Wait",
]


@dataclass(frozen=True)
class RunRef:
    """Which run, owned by which worker, under which fencing epoch."""

    run_id: str
    owner: str
    fence: int


@dataclass
class JournalEntry:
    """One step of a run's journal, as the executor sees it."""

    seq: int
    name: str
    kind: str
    status: StepStatus
    output: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 1
    state_version: int | None = None
    stored: bool = False
    """True once the row exists in the database (later writes update it)."""
    tool: str | None = None
    cost: float | None = None
    tokens: int | None = None
    """A step's tool and the usage committed with it (all its attempts')."""


@dataclass
class Claim:
    """A run this worker now owns, with everything needed to replay it."""

    ref: RunRef
    agent_id: str
    agent_type: str
    config: dict[str, Any]
    input: Any
    attempts: int
    recovered: bool
    parent_run_id: str | None
    start_state: dict[str, Any]
    start_version: int
    journal: dict[int, JournalEntry]
    state_docs: dict[int, dict[str, Any]]
    agent_state: dict[str, Any] = field(default_factory=dict)
    """The agent's state as stored when the run was claimed."""
    agent_version: int = 0
    forked_at_step: int | None = None
    stalls: int = 0
    """Claims in a row (this one included) that found nothing committed since the last one:
    the run's executions keep dying before they write anything."""
    message_seq: int | None = None
    """For a run its agent's mailbox started: the message it was started for (the run's
    input is that message, and ``on_message`` handles it)."""
    lease_from: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` just before the claim was sent: the lease runs from (after) it."""
    limits: dict[str, Any] = field(default_factory=dict)
    """The run's own budget and policy as given (``budget``, ``policy``), and the runs whose
    budgets it spends against besides its own (``holders``)."""
    ledger: Sequence[Any] = ()
    """The limits of those budgets and its own as the ledger held them at the claim
    (``tether.limits.Limit``)."""

    @property
    def last_written_version(self) -> int | None:
        """The state version this run itself wrote last (its start version if none); None for
        a fork that has not written anything of its own yet."""
        own = [
            e.state_version
            for seq, e in self.journal.items()
            if e.state_version is not None and seq > (self.forked_at_step or 0)
        ]
        if own:
            return max(own)
        return None if self.forked_at_step is not None else self.start_version


@dataclass(frozen=True)
class ClaimSpec:
    """Which runs a worker would take, and how many: a claim made inside another write."""

    worker_id: str
    agent_types: tuple[str, ...]
    limit: int
    lease_ttl: float


@dataclass(frozen=True)
class Wait:
    """One thing a waiting run waits for, at journal position ``seq``: a kind, a key (what
    satisfies it; empty for a deadline alone) and an optional deadline. A run waits at one
    position at a time, for the first of its waits; the others are withdrawn with it."""

    seq: int
    kind: WaitKind
    key: str = ""
    deadline: dt.datetime | None = None


class Lease:
    """This process's view of its lease on one run, shared by the execution (which checks it
    before starting a step body) and the worker's heartbeat (which renews it or finds it lost).

    Times are ``time.monotonic()``: a process frozen past its lease sees the lease as expired
    when it continues.
    """

    def __init__(self, ttl: float, granted_at: float) -> None:
        self.ttl = ttl
        self.deadline = granted_at + ttl
        self.check_after = self.deadline - ttl / 2
        """Past this ``time.monotonic()``, less than half the lease is left: the heartbeat is
        late, and an execution asks the database before it starts a step body."""
        self.lost = False

    def renewed(self, sent_at: float) -> None:
        """The database extended the lease by a statement sent at ``sent_at``."""
        if sent_at + self.ttl > self.deadline:
            self.deadline = sent_at + self.ttl
            self.check_after = self.deadline - self.ttl / 2

    def needs_check(self) -> bool:
        """Less than half the lease is left: the heartbeat is late; ask the database."""
        return time.monotonic() > self.check_after


@dataclass(frozen=True)
class Outgoing:
    """A message a run's write sends: to ``recipient``, or (``recipient`` None) one copy to
    each agent subscribed to ``topic`` now. ``key`` makes it idempotent per recipient."""

    seq: int
    """The journal position that sends it; its entry's output becomes the message id (or,
    for a publish, the number of copies)."""
    recipient: str | None
    topic: str
    key: str
    payload: Any


@dataclass(frozen=True)
class Child:
    """A child run a run's write starts (``ctx.spawn``)."""

    seq: int
    run_id: str
    agent_id: str
    task: Any
    task_id: str | None = None
    priority: int = 0
    detached: bool = False
    limits: dict[str, Any] | None = None
    """What the child inherits: its parent's policy and the budgets it spends against."""


@dataclass(frozen=True)
class Settle:
    """A wait decided inside the write: the first alternative that is ready now settles it
    (journaled at ``seq``), else the run parks on all of them (and ``deadline``).

    Alternatives are ``("message", topic)`` (the oldest unconsumed message of this agent on
    that topic is consumed), ``("child", run_id)`` (that child run has ended) and
    ``("approval", approval_id)`` (a person decided, or its deadline applied the default). With
    ``every`` the wait settles only once every child alternative has ended."""

    seq: int
    name: str
    kind: str
    stored: bool
    alternatives: tuple[tuple[str, str], ...]
    deadline: dt.datetime | None = None
    every: bool = False
    request: dict[str, Any] | None = None
    """For ``("approval", id)``: the approval to create with the first try (kind, title,
    data, digest, schema, on_timeout, approvers)."""


@dataclass(frozen=True)
class OpenLedger:
    """A run's budget, to write to the ledger the first time its execution needs it there."""

    limits: dict[str, tuple[float, float | None]]
    action: str
    warn_at: float | None
    started: float
    """When the run started, on the app's clock (epoch seconds): ``max_duration`` runs from it."""


@dataclass(frozen=True)
class Reserve:
    """A fenced write that reserves a step's usage against budgets (``Committed.verdict``)."""

    seq: int
    holders: tuple[str, ...]
    amounts: dict[str, float]
    now: float
    open: OpenLedger | None = None
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    """Written with the reservation when it is made."""
    step: str = ""
    park: bool = False
    sync: LedgerChange | None = None
    """The run's own usage not yet in its ledger rows, added before the check."""
    """If the step does not fit and the breached budget's action is to pause, park the run
    in this same write (waiting for the budget, ``WaitKind.BUDGET``), so that a raise
    committed before it is seen and one committed after it wakes the run."""


@dataclass(frozen=True)
class LedgerChange:
    """What a write charges to budgets: ``usage`` (by ledger key) to every budget of
    ``holders``, and the reservations it drops."""

    holders: tuple[str, ...] = ()
    seq: int | None = None
    usage: dict[str, float] = field(default_factory=dict)
    release: str | None = None
    """``step``: drop the reservation of step ``seq``; ``run``: every one of the run's."""
    open: OpenLedger | None = None
    synced: int | None = None
    """A run alone with its budget: ``usage`` is its own since its last sync, through this
    journal position (``holders`` is just the run)."""


@dataclass
class Commit:
    """What one fenced transaction writes for a run."""

    entries: Sequence[JournalEntry] = ()
    state: dict[str, Any] | None = None
    events: Sequence[tuple[str, dict[str, Any]]] = ()
    status: RunStatus | None = None
    """New status; never overrides ``cancelled``, and ``waiting`` never overrides ``paused``."""
    result: Any = None
    error: dict[str, Any] | None = None
    waits: Sequence[Wait] = ()
    """With ``status=waiting``: what the run now waits for."""
    release: bool = False
    """Give the run up (clear owner and lease) after this write."""
    incident: dict[str, Any] | None = None
    checkpoint: str | None = None
    """Name of a checkpoint to take of the agent's state as of this write."""
    then_claim: ClaimSpec | None = None
    """With ``release``: claim the worker's next runs in the same transaction (the slot this
    run gives back), sparing the worker a transaction (and an fsync) of its own per run."""
    outgoing: Sequence[Outgoing] = ()
    """Messages this write sends (waking a receiver waiting for each)."""
    children: Sequence[Child] = ()
    """Child runs this write starts (none once the run is cancelled)."""
    ended: bool = False
    """The run ends with this write: its attached children, if any, are cancelled."""
    wakes: Sequence[tuple[WaitKind, str]] = ()
    """Wake the runs waiting for these (kind, key): a parent waiting for this run's end."""
    settle: Settle | None = None
    """A wait to decide in this write (``Committed.settled`` says how it went)."""
    ledger: LedgerChange | None = None
    """Usage charged to budgets with this write (a step's settlement)."""
    reserve: Reserve | None = None
    """A reservation to make in this write (``Committed.verdict`` says how it went)."""


@dataclass(frozen=True)
class Committed:
    """What a fenced write returns."""

    status: RunStatus
    """The run's status after the write: a pause or cancel a person asked for shows here."""
    claimed: Sequence[Claim] = ()
    """Runs claimed for ``Commit.then_claim``, now this worker's to execute."""
    settled: Any = None
    """For a write with a ``Settle``: what settled the wait (journaled), or None: parked."""
    verdict: Any = None
    """For a write with a ``Reserve``: ``(breach or throttle or None, the limits as read,
    whether the run was parked on the breach)``."""
