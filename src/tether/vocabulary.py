"""tether's vocabulary: the names of events, incident kinds and actions, journal entry kinds and
wait kinds, each an enum with one catalog that says what it means.

The event catalog is a public contract: events are exported and streamed, and consumers match
on their types. A type is added, never renamed or removed. ``docs/reference.md`` renders these
catalogs (``docs/gen_reference.py``); every member must have its entry, checked at import.
"""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    """What an event records. The part before the dot is its family (``run``, ``step``...)."""

    AGENT_CREATED = "agent.created"
    AGENT_LIFECYCLE = "agent.lifecycle"
    AGENT_STATE = "agent.state"
    RUN_SUBMITTED = "run.submitted"
    RUN_CLAIMED = "run.claimed"
    RUN_RECOVERED = "run.recovered"
    RUN_WAITING = "run.waiting"
    RUN_WOKEN = "run.woken"
    RUN_PAUSED = "run.paused"
    RUN_PAUSED_AT_BOUNDARY = "run.paused_at_boundary"
    RUN_PENDING = "run.pending"
    RUN_RELEASED = "run.released"
    RUN_LEASE_EXPIRED = "run.lease_expired"
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    RUN_NEEDS_ATTENTION = "run.needs_attention"
    STEP_STARTED = "step.started"
    STEP_COMPLETED = "step.completed"
    STEP_FAILED = "step.failed"
    STEP_RETRY_SCHEDULED = "step.retry_scheduled"
    STEP_AMBIGUOUS = "step.ambiguous"
    INCIDENT_OPENED = "incident.opened"
    INCIDENT_RESOLVED = "incident.resolved"
    APPROVAL_REQUESTED = "approval.requested"
    APPROVAL_DECIDED = "approval.decided"
    APPROVAL_EXPIRED = "approval.expired"
    APPROVAL_CONSUMED = "approval.consumed"
    APPROVAL_WITHDRAWN = "approval.withdrawn"
    CHECKPOINT_CREATED = "checkpoint.created"
    CHECKPOINT_RESTORED = "checkpoint.restored"
    GC_COLLECTED = "gc.collected"
    POLICY_ALLOWED = "policy.allowed"
    POLICY_DENIED = "policy.denied"
    POLICY_ASKED = "policy.asked"
    BUDGET_RESERVED = "budget.reserved"
    BUDGET_SETTLED = "budget.settled"
    BUDGET_WARNED = "budget.warned"
    BUDGET_EXCEEDED = "budget.exceeded"
    BUDGET_RAISED = "budget.raised"

    @property
    def family(self) -> str:
        """The part before the dot: ``run``, ``step``, ``agent``..."""
        return self.value.partition(".")[0]


EVENTS: dict[EventType, str] = {
    EventType.AGENT_CREATED: "an agent was created (data: type, actor)",
    EventType.AGENT_LIFECYCLE: "an agent changed lifecycle state (data: action, from, to, actor)",
    EventType.AGENT_STATE: "an agent's state was set from outside a run (data: version, reason)",
    EventType.RUN_SUBMITTED: "a run was queued (data: task_id, priority, parent_run_id, "
    "forked_from, from_step)",
    EventType.RUN_CLAIMED: "a worker took a runnable run (data: worker, fence)",
    EventType.RUN_RECOVERED: "a worker took a run whose previous worker died (data: worker, fence)",
    EventType.RUN_WAITING: "the run parked itself until a wait is satisfied (data: kind, seq, "
    "until, approval_id, and the wait's keys)",
    EventType.RUN_WOKEN: "a wait of the run was satisfied from outside it (data: kind, key, seq)",
    EventType.RUN_PAUSED: "the run was paused with its agent (data: reason)",
    EventType.RUN_PAUSED_AT_BOUNDARY: "a running run stopped at a step boundary because it "
    "was paused (data: seq)",
    EventType.RUN_PENDING: "a paused run was made runnable again (data: reason)",
    EventType.RUN_RELEASED: "a worker handed a run back unfinished (data: seq, reason)",
    EventType.RUN_LEASE_EXPIRED: "a run's worker stopped heartbeating; the run is claimable again",
    EventType.RUN_COMPLETED: "the run returned its result (data: steps)",
    EventType.RUN_FAILED: "the run ended without a result (data: error)",
    EventType.RUN_CANCELLED: "the run was cancelled, alone or with its parent or agent "
    "(data: reason, actor)",
    EventType.RUN_NEEDS_ATTENTION: "the run waits for a person: an incident is open (data: kind)",
    EventType.STEP_STARTED: "an at-most-once step's intent was committed before its body ran "
    "(data: seq, name)",
    EventType.STEP_COMPLETED: "a step's output was journaled (data: seq, name, attempt, tool, "
    "cost, tokens)",
    EventType.STEP_FAILED: "an attempt of a step failed (data: seq, name, attempt, error_type, "
    "error, strategy, abandoned_attempt_running)",
    EventType.STEP_RETRY_SCHEDULED: "the failed step will be attempted again (data: seq, name, "
    "strategy, delay, timeout, next_attempt)",
    EventType.STEP_AMBIGUOUS: "an at-most-once step may or may not have taken effect; resolved "
    "by its on_ambiguous choice (data: seq, name, choice)",
    EventType.INCIDENT_OPENED: "a failure no strategy fixes was handed to a person (data: kind, "
    "seq, error)",
    EventType.INCIDENT_RESOLVED: "a person resolved an incident (data: incident_id, action, "
    "actor, comment)",
    EventType.APPROVAL_REQUESTED: "a run asked a person (ctx.approve, ctx.ask) (data: "
    "approval_id, kind, title, digest, deadline, on_timeout, approvers)",
    EventType.APPROVAL_DECIDED: "a person decided an approval or answered a question (data: "
    "approval_id, approved, edited, decided_by, digest, comment)",
    EventType.APPROVAL_EXPIRED: "nobody decided in time: the default was applied, recorded "
    "with source timeout (data: approval_id, approved)",
    EventType.APPROVAL_CONSUMED: "the run took the decision, in the write that journaled it "
    "(data: approval_id, seq)",
    EventType.APPROVAL_WITHDRAWN: "the run that asked ended (cancelled, failed) before anyone "
    "decided: the approval can no longer be decided (data: approval_id)",
    EventType.CHECKPOINT_CREATED: "an agent's state was snapshotted (data: checkpoint_id, name, "
    "version, seq, actor)",
    EventType.CHECKPOINT_RESTORED: "a checkpoint's state became the agent's current state "
    "(data: checkpoint_id, version, actor)",
    EventType.GC_COLLECTED: "the retention policy removed old data (data: counts)",
    EventType.POLICY_ALLOWED: "a policy let a step's tool call or a message through (data: "
    "seq, tool or recipient, rule)",
    EventType.POLICY_DENIED: "a policy refused a step's tool call or a message; it never "
    "started (data: seq, name, tool or recipient, rule)",
    EventType.POLICY_ASKED: "a policy sent a tool call to a person first, with the approval's "
    "request (data: seq, tool, rule)",
    EventType.BUDGET_RESERVED: "a step's declared usage was reserved in the ledger against "
    "its run's budget and every ancestor's, before it ran, where other runs spend against "
    "them too (data: seq, name, tool, amounts, holders)",
    EventType.BUDGET_SETTLED: "a step's actual usage was charged to its budgets, in the "
    "step's own transaction (data: seq, name, usage; reserved, when its run alone spends "
    "against them and reserved in memory before it ran: true if it reserved its usage, else "
    "what it reserved)",
    EventType.BUDGET_WARNED: "usage crossed a budget's warn_at fraction of a limit (data: "
    "holder, limit, used, max)",
    EventType.BUDGET_EXCEEDED: "a step would go over a budget; it did not start and on_breach "
    "applies (data: holder, limit, used, reserved, needed, max, step, action)",
    EventType.BUDGET_RAISED: "a person raised a budget's limit (data: holder, limit, from, to, "
    "actor, approval_id)",
}


class IncidentKind(StrEnum):
    """Why a run needs a person."""

    STEP_FAILED = "step_failed"
    AMBIGUOUS_STEP = "ambiguous_step"
    NON_DETERMINISM = "non_determinism"
    HANDLER_ERROR = "handler_error"
    SERIALIZATION = "serialization"
    POISON_RUN = "poison_run"


INCIDENT_KINDS: dict[IncidentKind, str] = {
    IncidentKind.STEP_FAILED: "a step failed and its retry strategy gave up (or is "
    "manual_intervention)",
    IncidentKind.AMBIGUOUS_STEP: "an at-most-once step was started but its outcome is unknown "
    "(a crash, or a timeout while its body still ran)",
    IncidentKind.NON_DETERMINISM: "a replay asked for a different step than the journal holds",
    IncidentKind.HANDLER_ERROR: "the handler raised outside any step",
    IncidentKind.SERIALIZATION: "a value the run produced cannot be stored as JSON (output, "
    "state, result); the message names its path",
    IncidentKind.POISON_RUN: "the run was claimed again and again without committing anything "
    "(its executions keep dying)",
}


class IncidentAction(StrEnum):
    """What a person may do with an open incident."""

    RETRY = "retry"
    SKIP = "skip"
    ABORT = "abort"


INCIDENT_ACTIONS: dict[IncidentAction, str] = {
    IncidentAction.RETRY: "run the failed step (or the handler) again",
    IncidentAction.SKIP: "give the failed step a supplied output and continue",
    IncidentAction.ABORT: "fail the run",
}


class StepKind(StrEnum):
    """What a journal entry records."""

    STEP = "step"
    SLEEP = "sleep"
    NOW = "now"
    UUID = "uuid"
    RANDOM = "random"
    CHECKPOINT = "checkpoint"
    SEND = "send"
    PUBLISH = "publish"
    RECEIVE = "receive"
    SPAWN = "spawn"
    WAIT = "wait"
    APPROVE = "approve"
    ASK = "ask"


STEP_KINDS: dict[StepKind, str] = {
    StepKind.STEP: "a step function's output or error (ctx.step)",
    StepKind.SLEEP: "a durable timer (ctx.sleep)",
    StepKind.NOW: "the time, journaled (ctx.now)",
    StepKind.UUID: "a random UUID, journaled (ctx.uuid)",
    StepKind.RANDOM: "a random float, journaled (ctx.random)",
    StepKind.CHECKPOINT: "a snapshot of the agent's state taken by the run (ctx.checkpoint)",
    StepKind.SEND: "a message sent (ctx.send); its output is the message id",
    StepKind.PUBLISH: "a message published to a topic (ctx.publish); its output is the number "
    "of copies",
    StepKind.RECEIVE: "a message received, or a timeout (ctx.receive)",
    StepKind.SPAWN: "a child run started (ctx.spawn, ctx.call); its output is the child's run id",
    StepKind.APPROVE: "a person's decision on an approval (ctx.approve); its output is the "
    "decision",
    StepKind.ASK: "a person's validated answer to a question (ctx.ask)",
    StepKind.WAIT: "the end of child runs, or the first of several waits (ctx.wait, "
    "ctx.wait_any, ctx.call)",
}


class WaitKind(StrEnum):
    """What a waiting run waits for. A wait has a kind, a key and an optional deadline."""

    TIMER = "timer"
    RETRY = "retry"
    MESSAGE = "message"
    CHILD = "child"
    APPROVAL = "approval"
    BUDGET = "budget"


WAIT_KINDS: dict[WaitKind, str] = {
    WaitKind.TIMER: "a deadline only (ctx.sleep, or the deadline of another wait)",
    WaitKind.RETRY: "the delay before a failed step's next attempt",
    WaitKind.MESSAGE: "a message for the run's agent (key: the topic)",
    WaitKind.CHILD: "a child run's end (key: the child's run id)",
    WaitKind.APPROVAL: "a person's decision (key: the approval id)",
    WaitKind.BUDGET: "a person raising a budget's limit (on_breach='pause'; key: the run "
    "whose budget it is)",
}


def _validate() -> None:
    for enum, catalog in (
        (EventType, EVENTS),
        (IncidentKind, INCIDENT_KINDS),
        (IncidentAction, INCIDENT_ACTIONS),
        (StepKind, STEP_KINDS),
        (WaitKind, WAIT_KINDS),
    ):
        missing = set(enum) - set(catalog)  # type: ignore[call-overload]
        if missing:
            raise AssertionError(f"{enum.__name__} members without a catalog entry: {missing}")


_validate()
