"""Plain records and enums that tether hands out. No I/O happens here.

Records are frozen dataclasses with a ``to_dict()`` that gives their JSON form (times in
RFC 3339 UTC), which is what the CLI and HTTP API print.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tether.lifecycle import LifecycleState

__all__ = [
    "AgentInfo",
    "Checkpoint",
    "Event",
    "HistoryEntry",
    "Incident",
    "IncidentStatus",
    "LifecycleState",
    "MessageInfo",
    "Retention",
    "Retry",
    "RunInfo",
    "RunStatus",
    "StateVersion",
    "StepInfo",
    "StepStatus",
    "Strategy",
]


class RunStatus(StrEnum):
    """Where a run is. ``completed``, ``failed`` and ``cancelled`` are final."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NEEDS_ATTENTION = "needs_attention"

    @property
    def is_final(self) -> bool:
        """True for a status a run never leaves."""
        return self in FINAL_RUN_STATUSES


FINAL_RUN_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class StepStatus(StrEnum):
    """A journal entry's state. ``started`` is an at-most-once intent without a result yet."""

    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    WAITING = "waiting"


class IncidentStatus(StrEnum):
    """An incident is open until a person resolves it."""

    OPEN = "open"
    RESOLVED = "resolved"


class Strategy(StrEnum):
    """How a failed step is retried."""

    RETRY_WITH_INCREASED_TIMEOUT = "retry_with_increased_timeout"
    WAIT_AND_RETRY = "wait_and_retry"
    RETRY_WITH_BACKOFF = "retry_with_backoff"
    MANUAL_INTERVENTION = "manual_intervention"


@dataclass(frozen=True)
class Retry:
    """A retry policy, set per step, per agent type or per app (the most specific wins).

    The strategy is chosen by the error's class unless ``strategy`` forces one.
    """

    max_attempts: int = 3
    """Attempts in all, the first included. At 1 a failure goes straight to a person."""

    strategy: Strategy | None = None
    """Force one strategy for every error; ``None`` chooses by error class."""

    initial_delay: float = 0.5
    """Seconds before the first retry under ``retry_with_backoff``."""

    backoff_factor: float = 2.0
    """Each backoff delay is the previous one times this."""

    max_delay: float = 60.0
    """Cap on any single delay, in seconds."""

    jitter: float = 0.1
    """Random extra fraction (0..jitter) added to backoff delays, to spread retry storms."""

    wait_delay: float = 5.0
    """Fixed delay in seconds between attempts under ``wait_and_retry``."""

    timeout_factor: float = 2.0
    """Under ``retry_with_increased_timeout``, each attempt's timeout is the last one times this."""

    max_timeout: float = 3600.0
    """Cap on a grown timeout, in seconds."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"Retry.max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("initial_delay", "max_delay", "wait_delay", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"Retry.{name} must not be negative")
        if self.backoff_factor < 1 or self.timeout_factor < 1:
            raise ValueError("Retry.backoff_factor and Retry.timeout_factor must be at least 1")
        if self.strategy is not None:
            object.__setattr__(self, "strategy", Strategy(self.strategy))


@dataclass(frozen=True)
class Retention:
    """What ``tether gc`` (and a worker on a schedule) may remove.

    Never removed: anything of an unfinished run, a checkpoint (until deleted), an agent's
    current state version, or a state version that a kept run's journal refers to.
    """

    keep_state_versions: int | None = 100
    """State versions kept per agent (the newest ones); ``None`` keeps all."""

    finished_runs_older_than: float | None = 30 * 86400.0
    """Seconds after which a finished run (with its journal and events) is removed."""

    events_older_than: float | None = 30 * 86400.0
    """Seconds after which events of finished runs and of agents are removed."""

    interval: float | None = None
    """Seconds between passes when a worker applies the policy; ``None`` means never."""

    def __post_init__(self) -> None:
        if self.keep_state_versions is not None and self.keep_state_versions < 1:
            raise ValueError("Retention.keep_state_versions must be at least 1 (or None)")
        for name in ("finished_runs_older_than", "events_older_than", "interval"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Retention.{name} must not be negative")


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values; times as RFC 3339 UTC strings."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, dt.datetime):
                value = _iso(value)
            elif isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, _Record):
                value = value.to_dict()
            elif isinstance(value, list) and value and isinstance(value[0], _Record):
                value = [v.to_dict() for v in value]
            out[f.name] = value
        return out


@dataclass(frozen=True)
class AgentInfo(_Record):
    """An agent as stored: identity, lifecycle state and its state document."""

    agent_id: str
    type: str
    config: dict[str, Any]
    lifecycle: LifecycleState
    state: dict[str, Any]
    version: int
    error: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class HistoryEntry(_Record):
    """One lifecycle transition of an agent."""

    agent_id: str
    from_state: LifecycleState | None
    to_state: LifecycleState
    action: str
    reason: str
    actor: str
    at: dt.datetime


@dataclass(frozen=True)
class StateVersion(_Record):
    """One version of an agent's state document."""

    agent_id: str
    version: int
    state: dict[str, Any]
    reason: str
    run_id: str | None
    at: dt.datetime


@dataclass(frozen=True)
class RunInfo(_Record):
    """A run as stored."""

    run_id: str
    agent_id: str
    task_id: str | None
    input: Any
    status: RunStatus
    result: Any
    error: dict[str, Any] | None
    attempts: int
    priority: int
    parent_run_id: str | None
    forked_from: str | None
    forked_at_step: int | None
    steps: int
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    wake_at: dt.datetime | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Usage(_Record):
    """What runs used, from the usage committed with their steps."""

    steps: int = 0
    """Steps completed."""
    cost: float | None = None
    """None when no step reported or declared a cost (unknown is not zero)."""
    tokens: int | None = None
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    """Attempts per tool (each attempt called it)."""

    def __add__(self, other: Usage) -> Usage:
        def plus(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else a + b

        calls = dict(self.calls)
        for tool, count in other.calls.items():
            calls[tool] = calls.get(tool, 0) + count
        return Usage(
            self.steps + other.steps,
            plus(self.cost, other.cost),
            plus(self.tokens, other.tokens),
            calls,
        )


@dataclass(frozen=True)
class LimitInfo(_Record):
    """One limit of a budget in the ledger."""

    holder: str
    """The run whose budget it is."""
    limit: str
    """As ``Budget`` names it: ``max_cost``, ``max_calls[web_search]``, ``rate[llm]``."""
    max: float
    used: float
    """What the holder and every run below it have used of it."""
    reserved: float
    """Held by steps that are about to run."""
    action: str
    """``on_breach``: fail, pause or ask."""
    warn_at: float | None


@dataclass(frozen=True)
class RunUsage(_Record):
    """A run's usage, its subtree's, and the limits it is held to."""

    run_id: str
    usage: Usage
    """The run's own steps (a fork's: those it executed itself)."""
    total: Usage
    """The run and every run below it."""
    runs: list[dict[str, Any]]
    """Each run of the subtree: ``run_id``, ``agent_id``, ``status``, ``depth``, ``usage``."""
    limits: list[LimitInfo]
    """Its own budget's limits, then its ancestors' that it spends against."""
    budget: dict[str, Any] | None
    """The budget given to the run itself (``submit(budget=)``), if any."""


@dataclass(frozen=True)
class StepInfo(_Record):
    """One journal entry of a run."""

    run_id: str
    seq: int
    name: str
    kind: str
    status: StepStatus
    output: Any
    error: dict[str, Any] | None
    attempts: int
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    tool: str | None = None
    cost: float | None = None
    """What the step used (all its attempts), as committed with it."""
    tokens: int | None = None


@dataclass(frozen=True)
class Event(_Record):
    """One append-only record of something that happened. ``seq`` orders all events."""

    seq: int
    type: str
    run_id: str | None
    agent_id: str | None
    data: dict[str, Any] = field(default_factory=dict)
    at: dt.datetime | None = None


@dataclass(frozen=True)
class Incident(_Record):
    """A failure no automatic strategy fixed, waiting for a person."""

    incident_id: str
    run_id: str
    agent_id: str
    seq: int | None
    kind: str
    error: dict[str, Any]
    status: IncidentStatus
    resolution: str | None
    resolved_by: str | None
    created_at: dt.datetime
    resolved_at: dt.datetime | None


@dataclass(frozen=True)
class Checkpoint(_Record):
    """A named snapshot of an agent's state."""

    checkpoint_id: str
    agent_id: str
    name: str
    state: dict[str, Any]
    version: int
    run_id: str | None
    seq: int | None
    created_at: dt.datetime


@dataclass(frozen=True)
class MessageInfo(_Record):
    """A stored message: who it is for, on which topic, and who consumed it."""

    message_id: str
    seq: int
    recipient: str
    topic: str | None
    payload: Any
    sender_agent: str | None
    sender_run: str | None
    created_at: dt.datetime
    consumed_by: str | None
    consumed_seq: int | None
    consumed_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> MessageInfo:
        """The record from a ``messages`` row."""
        return cls(
            message_id=row["message_id"],
            seq=row["seq"],
            recipient=row["recipient"],
            topic=row["topic"] or None,
            payload=row["payload"],
            sender_agent=row["sender_agent"],
            sender_run=row["sender_run"],
            created_at=row["created_at"],
            consumed_by=row["consumed_by"],
            consumed_seq=row["consumed_seq"],
            consumed_at=row["consumed_at"],
        )


@dataclass(frozen=True)
class ApprovalInfo(_Record):
    """An approval (``ctx.approve``) or question (``ctx.ask``): what it asks about, who may
    decide, and, once decided, the decision and where it came from."""

    approval_id: str
    run_id: str
    seq: int
    """The journal position of the run that asked."""
    agent_id: str
    kind: str
    """``approve`` or ``ask``."""
    title: str
    data: Any
    """What it asks about (for ``ask``: the question and its schema)."""
    digest: str
    """SHA-256 of the canonical JSON of ``data``: a decision names it."""
    schema: Any
    """The JSON Schema an edit (``approve``) or answer (``ask``) must satisfy, if any."""
    status: str
    """``pending``, ``approved``, ``rejected``, ``answered``, or ``withdrawn`` (its run ended
    before anyone decided)."""
    approved: bool | None
    decided_data: Any
    """The data the run receives: the original, the approver's edit, or the answer."""
    edited: bool
    comment: str | None
    decided_by: str | None
    """The caller's identity (OS user on the CLI); None when a timeout decided."""
    decided_at: dt.datetime | None
    source: str | None
    """``human``, ``timeout`` or ``policy``, once decided."""
    deadline: dt.datetime | None
    on_timeout: Any
    """What the deadline applies: ``{"approved": ..., "data": ...}``."""
    approvers: list[str] | None
    """Who may decide (None: anyone)."""
    created_at: dt.datetime
    consumed_at: dt.datetime | None
    """When the run took the decision (in the write that journaled it)."""
    subject: dict[str, Any] | None = None
    """What the runtime asked about, when it asked rather than the run's code: a budget's
    limit (``{"budget": run_id, "limit": "cost"}``), raised to the decided data on approval."""
