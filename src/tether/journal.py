"""The records the engine and the store exchange about one run's journal. No I/O here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.types import RunStatus, StepStatus

__all__ = ["Claim", "ClaimSpec", "Commit", "Committed", "JournalEntry", "RunRef"]


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
    wake_at: dt.datetime | None = None
    wait: dict[str, Any] | None = None
    release: bool = False
    """Give the run up (clear owner and lease) after this write."""
    incident: dict[str, Any] | None = None
    checkpoint: str | None = None
    """Name of a checkpoint to take of the agent's state as of this write."""
    then_claim: ClaimSpec | None = None
    """With ``release``: claim the worker's next runs in the same transaction (the slot this
    run gives back), sparing the worker a transaction (and an fsync) of its own per run."""


@dataclass(frozen=True)
class Committed:
    """What a fenced write returns."""

    status: RunStatus
    """The run's status after the write: a pause or cancel a person asked for shows here."""
    claimed: Sequence[Claim] = ()
    """Runs claimed for ``Commit.then_claim``, now this worker's to execute."""
