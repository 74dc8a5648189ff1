"""Executing one claimed run by replay.

The handler runs from the top every time a run is claimed. Each journaled call (a step, a
sleep, ``now``/``uuid``/``random``) takes the next sequence number; when the journal already
holds that position its stored result is returned without running anything, and when it holds a
*different* call the run becomes an incident with ``NonDeterminismError``. Past the end of the
journal, calls execute and each result is committed — with the run's progress, the agent's
state and the events — in one transaction fenced by the worker's lease epoch.

A run that has to wait (a timer, a retry delay) commits its waits and unwinds with
``Suspended``; it then holds no thread and no Python object until a worker claims it again.

Every decision to stop executing a run (it waits, was paused or cancelled, went to a person,
or the lease was lost) is a ``ControlSignal``, and it is sticky: every later journaled call of
the execution raises it again, so no further step body starts whatever the handler catches.

``Execution`` holds the protocol; ``tether.engine.steps`` drives one step through it, and
``tether.context`` wraps both in thin sync and async faces.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NoReturn

from tether import codec
from tether.agent import Agent, error_info, printable
from tether.engine.retry import decide
from tether.engine.scope import Meter, RunScope, ScopeFields, body_running, in_step_body
from tether.engine.steps import Outcome, StepCall
from tether.errors import (
    ConfigurationError,
    ControlSignal,
    DatabaseUnavailable,
    LeaseLost,
    NonDeterminismError,
    PolicyDenied,
    SerializationError,
    Stopped,
    Suspended,
)
from tether.interceptors import Interceptor, StepAttempt
from tether.journal import (
    Claim,
    ClaimSpec,
    Commit,
    JournalEntry,
    Lease,
    LedgerChange,
    Reserve,
    Settle,
    Wait,
)
from tether.limits import Budget, Policy, Throttle
from tether.policies import Guard, guard_for
from tether.types import FINAL_RUN_STATUSES, Retry, RunStatus, StepStatus
from tether.vocabulary import EventType, IncidentKind, StepKind, WaitKind

if TYPE_CHECKING:
    from tether.store import Store

log = logging.getLogger("tether.engine")

DEFAULT_STALL_LIMIT = 5
"""Claims in a row without a commit after which a run becomes a ``poison_run`` incident."""


E = EventType


def utc_now() -> dt.datetime:
    """The default clock: the machine's time, UTC."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Settings:
    """What an execution takes from its app."""

    retry: Retry = field(default_factory=Retry)
    lease_ttl: float = 30.0
    clock: Callable[[], dt.datetime] = utc_now
    interceptors: Sequence[Interceptor] = ()
    stall_limit: int | None = None
    """Claims in a row without a commit after which a run becomes a ``poison_run`` incident
    (``DEFAULT_STALL_LIMIT`` when ``None``)."""
    budget: Budget | None = None
    """The app's default budget (agent types, agents and runs may set tighter ones)."""
    policy: Policy | None = None
    """The app's policy (every other level's is intersected with it)."""


@dataclass
class Plan:
    """What to do at one journal position."""

    seq: int
    name: str
    replayed: bool
    value: Any = None
    attempt: int = 1
    timeout: float | None = None
    entry: JournalEntry | None = None
    prelude: Callable[[Plan, StepCall], None] | None = None
    """A write to make before the attempt starts (it may stop the run instead)."""
    meter: Meter | None = None
    """What the attempt's body reported of its usage (``current_step().report``)."""


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _parse(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class Execution:
    """One claimed run in this process: the replay cursor and every write it makes."""

    def __init__(
        self,
        store: Store,
        claim: Claim,
        agent_cls: type[Agent],
        settings: Settings | None = None,
        *,
        lease: Lease | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        next_claim: Callable[[], ClaimSpec | None] = lambda: None,
    ) -> None:
        settings = settings or Settings()
        self.store = store
        self.claim = claim
        self.ref = claim.ref
        self.run_id = claim.ref.run_id
        self.agent_id = claim.agent_id
        self.agent_cls = agent_cls
        self.lease_ttl = settings.lease_ttl
        self.lease = lease or Lease(settings.lease_ttl, claim.lease_from)
        self.clock = settings.clock
        self.interceptors = tuple(settings.interceptors)
        self.stall_limit = settings.stall_limit or DEFAULT_STALL_LIMIT
        self.should_stop = should_stop
        self.next_claim = next_claim
        self.follow_ups: list[Claim] = []
        """Runs claimed, in the write that gave this one up, to take its place in the worker."""
        self.default_retry = agent_cls.retry or settings.retry
        self.journal = claim.journal
        self.seq = 0
        self.high = max(self.journal, default=0)
        self.buffer: list[JournalEntry] = []
        self.state: dict[str, Any] = copy.deepcopy(claim.start_state)
        # What the database holds: a commit writes the state whenever ctx.state differs.
        self._state_text = codec.dumps(claim.agent_state, "state")
        self._at_frontier = False
        self.claim_high = self.high
        if self.claim_high == 0:
            self._reach_frontier()
        self.diverged: NonDeterminismError | None = None
        self.settled: Any = None
        """What settled the last wait decided in a write (``Committed.settled``)."""
        self.halted: ControlSignal | None = None
        """The engine's decision to stop executing this run, once made (see ``_halt``)."""
        self._pg = store.dialect == "postgresql"
        self._settings = settings
        self.guard: Guard | None = None
        """The run's budgets and policy, if any (made by ``start``)."""
        self.verdict: Any = None
        """What the last reservation found (``Committed.verdict``)."""
        self._later: list[tuple[str, dict[str, Any]]] = []
        """Events to write with the next commit (policy decisions made in memory)."""

    # -- stopping -------------------------------------------------------------------------

    def _halt(self, signal: ControlSignal) -> NoReturn:
        """Stop executing the run: raise ``signal`` now and at every later journaled call."""
        self.halted = signal
        raise signal

    def _live(self) -> None:
        if self.halted is not None:
            raise self.halted

    def run_scope(self) -> RunScope:
        """What ``tether.current_run()`` returns while this run executes."""
        c = self.claim
        return RunScope(self.run_id, self.agent_id, c.agent_type, c.attempts, c.parent_run_id)

    def start(self) -> bool:
        """Whether the handler may run: a run whose executions keep dying before they commit
        anything (``stall_limit`` claims in a row) goes to a person instead, and so does one
        whose budget or policy cannot be read."""
        try:
            settings = self._settings
            self.guard = guard_for(self, self.agent_cls, settings.budget, settings.policy)
        except ConfigurationError as exc:
            try:
                self._incident(IncidentKind.HANDLER_ERROR, error_info(exc), None)
            except ControlSignal:
                pass
            return False
        stalls = self.claim.stalls
        if stalls < self.stall_limit:
            return True
        error = {
            "type": "PoisonRun",
            "message": f"run {self.run_id} was claimed {stalls + 1} times in a row without "
            "committing anything: each execution died before its next write (a crash, a kill, "
            "an internal error). Read the workers' logs, fix the cause, then retry the incident",
            "claims": stalls + 1,
        }
        try:
            self._incident(IncidentKind.POISON_RUN, error, None)
        except ControlSignal:
            pass
        return False

    # -- the journal cursor ---------------------------------------------------------------

    def _next(self, name: str, kind: StepKind) -> tuple[int, JournalEntry | None]:
        self._live()
        if body_running() is not None:
            inside = in_step_body()
            assert inside is not None
            raise ConfigurationError(
                f"run {self.run_id}: ctx.{kind.value}({name!r}) was called inside the body of "
                f"step {inside.seq} ({inside.name}); a step body is plain code and cannot "
                "journal anything. Call it from the handler, or delegate the work to a child run"
            )
        if self.diverged is not None:
            raise self.diverged
        self.seq += 1
        entry = self.journal.get(self.seq)
        if entry is not None:
            if entry.name != name or entry.kind != kind:
                self.diverged = NonDeterminismError(
                    self.run_id, self.seq, f"{entry.kind} {entry.name}", f"{kind.value} {name}"
                )
                raise self.diverged
            if entry.state_version is not None:
                self._restore_state(entry.state_version)
            if self.seq >= self.claim_high:
                self._reach_frontier()
        else:
            self._reach_frontier()
        return self.seq, entry

    def _reach_frontier(self) -> None:
        """The cursor just consumed the last journaled position (replay is over).

        If someone else changed the agent's state since this run last wrote it (another run
        of the agent while this one waited, a restore, ``set_state``), continue from the stored
        state, so their changes are not overwritten. A fork that has written nothing of its
        own yet keeps the state as of its fork point."""
        if self._at_frontier:
            return
        self._at_frontier = True
        expected = self.claim.last_written_version
        if expected is not None and self.claim.agent_version != expected:
            self.state.clear()
            self.state.update(copy.deepcopy(self.claim.agent_state))

    def _restore_state(self, version: int) -> None:
        doc = self.claim.state_docs.get(version)
        if doc is None:
            return
        self.state.clear()
        self.state.update(copy.deepcopy(doc))

    def idempotency_key(self, seq: int) -> str:
        """The key a step passes to outside systems: stable across attempts and crashes."""
        return f"{self.run_id}:{seq}"

    # -- writes ---------------------------------------------------------------------------

    def _state_change(self) -> dict[str, Any] | None:
        text = codec.dumps(self.state, "state")
        if text == self._state_text:
            return None
        self._state_text = text
        return json.loads(text)  # type: ignore[no-any-return]

    def _commit(
        self,
        *entries: JournalEntry,
        status: RunStatus | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        **fields: Any,
    ) -> RunStatus:
        """One fenced write of the buffer, ``entries``, the state if it changed, and
        ``fields``; returns the run's status after it. A lost lease halts the execution."""
        pending = [*self.buffer, *entries]
        if self._later:
            events = [*self._later, *events]
            self._later = []
        try:
            state = self._state_change()
        except SerializationError as exc:
            if fields.get("incident") is None and status not in FINAL_RUN_STATUSES:
                self._unstorable(exc, pending[-1].seq if pending else None, *entries)
            state = None  # an incident or an end is written without the state it cannot store
        for entry in pending:
            self.high = max(self.high, entry.seq)
        if fields.get("release") and self.guard is not None:
            # The run parks or ends: its own usage since the last sync goes to its ledger.
            fields["ledger"] = self.guard.sync(self.high, fields.get("ledger"))
        ledger = fields.get("ledger")
        shared = ledger is not None and any(h != self.run_id for h in ledger.holders)
        if fields.get("release") and not self.follow_ups and not shared:
            # This execution ends with this write: its worker's slot is free from here on.
            # (Not after the rows of a budget others spend against: a claim locks agents'
            # rows, which come before them. Nobody but a person raising it locks this run's
            # own rows, and that lock comes before any run's.)
            fields["then_claim"] = self.next_claim()
        change = Commit(entries=pending, state=state, status=status, events=events, **fields)
        sent = time.monotonic()
        try:
            committed = self.store.commit(self.ref, change, self.agent_id, self.lease_ttl)
        except LeaseLost as exc:
            self.buffer.clear()
            self._halt(exc)
        except DatabaseUnavailable as exc:
            # The write may or may not have landed: stop here; the worker hands the run back
            # once the database answers, and replay finds out.
            log.warning("run %s: stopped, its write did not complete: %s", self.run_id, exc)
            self.buffer.clear()
            self._halt(Stopped(f"database unavailable: {exc}"))
        if self._pg and not change.release:
            self.lease.renewed(sent)  # a PostgreSQL write extends the lease
        self.buffer.clear()
        for entry in pending:
            self.journal[entry.seq] = entry
        self.follow_ups.extend(committed.claimed)
        self.settled = committed.settled
        self.verdict = committed.verdict
        return committed.status

    def _boundary(self, status: RunStatus) -> None:
        """After a commit: stop here if a person paused or cancelled the run, or we shut down."""
        if status == RunStatus.CANCELLED:
            self._commit(release=True)
            self._halt(Stopped("cancelled"))
        if status == RunStatus.PAUSED:
            self._commit(release=True, events=[(E.RUN_PAUSED_AT_BOUNDARY, {"seq": self.seq})])
            self._halt(Stopped("paused"))
        if self.should_stop():
            self._commit(
                release=True,
                status=RunStatus.PENDING,
                events=[(E.RUN_RELEASED, {"seq": self.seq, "reason": "worker shutting down"})],
            )
            self._halt(Stopped("worker stopping"))

    def _incident(
        self,
        kind: IncidentKind,
        error: dict[str, Any],
        seq: int | None,
        *entries: JournalEntry,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        ledger: LedgerChange | None = None,
    ) -> NoReturn:
        """Hand the run to a person: an open incident, with ``entries`` and ``events``."""
        self._commit(
            *entries,
            ledger=ledger,
            status=RunStatus.NEEDS_ATTENTION,
            error=error,
            release=True,
            incident={"seq": seq, "kind": kind.value, "error": error},
            events=[
                *events,
                (E.INCIDENT_OPENED, {"kind": kind, "seq": seq, "error": error.get("message")}),
                (E.RUN_NEEDS_ATTENTION, {"kind": kind}),
            ],
        )
        self._halt(Stopped(f"incident: {kind}"))

    def _unstorable(
        self, exc: SerializationError, seq: int | None, *entries: JournalEntry
    ) -> NoReturn:
        """A value the run produced cannot be stored: a person has to look, at once (retrying
        would produce it again). What can be stored of the write (its journal entries) is."""
        self._incident(IncidentKind.SERIALIZATION, error_info(exc), seq, *entries)

    def renew_lease(self) -> None:
        """The heartbeat is late: make sure this worker still owns the run before a step body
        starts, extending the lease; halt with ``LeaseLost`` if it does not."""
        self._live()
        sent = time.monotonic()
        try:
            owned = self.store.renew_lease(self.ref, self.lease_ttl)
        except DatabaseUnavailable as exc:
            # Unknown whether the run is still ours: start nothing; the worker hands the run
            # back once the database answers, and replay carries on.
            log.warning("run %s: stopped, its lease could not be checked: %s", self.run_id, exc)
            self._halt(Stopped(f"database unavailable: {exc}"))
        self.lease.lost = not owned
        if owned:
            self.lease.renewed(sent)
        if self.lease.lost:
            self.buffer.clear()
            self._halt(
                LeaseLost(
                    f"run {self.run_id}: this worker ({self.ref.owner}, epoch {self.ref.fence}) "
                    "no longer owns it; no further step of it starts here"
                )
            )

    # -- steps ----------------------------------------------------------------------------

    def policy(self, retry: Retry | None) -> Retry:
        """The retry policy of a step: its own, else the agent type's, else the app's."""
        return retry or self.default_retry

    def plan_step(self, call: StepCall) -> Plan:
        """Position the cursor on the next step and say whether to run it or replay it."""
        seq, entry = self._next(call.name, StepKind.STEP)
        if self.lease.lost:
            self.renew_lease()  # halts: the heartbeat found the run taken over
        name, timeout = call.name, call.timeout
        if entry is None:
            return Plan(seq, name, replayed=False, attempt=1, timeout=timeout)
        if entry.status == StepStatus.COMPLETED:
            return Plan(seq, name, replayed=True, value=entry.output, entry=entry)
        if entry.status == StepStatus.FAILED:  # a retry
            error = entry.error or {}
            plan = Plan(seq, name, False, attempt=entry.attempts + 1, entry=entry)
            plan.timeout = error.get("next_timeout", timeout)
            retry_at = error.get("retry_at")
            if retry_at is not None and self.clock() < _parse(retry_at):
                plan.prelude = self._wait_for_retry  # claimed early (a resume): wait again
            return plan
        # STARTED: an at-most-once step's intent without a result. Never run it blindly again.
        plan = Plan(seq, name, False, attempt=entry.attempts + 1, timeout=timeout, entry=entry)
        plan.prelude = self.resolve_ambiguous
        return plan

    def attempt_of(self, plan: Plan, call: StepCall) -> StepAttempt:
        """The attempt as interceptors see it."""
        return StepAttempt(
            run_id=self.run_id,
            agent_id=self.agent_id,
            seq=plan.seq,
            name=plan.name,
            attempt=plan.attempt,
            idempotency_key=self.idempotency_key(plan.seq),
            tool=call.tool,
            cost=call.cost,
            tokens=call.tokens,
            at_most_once=call.at_most_once,
        )

    def scope_of(self, plan: Plan, call: StepCall) -> ScopeFields:
        """What ``tether.current_step()`` returns inside the attempt's body (its fields)."""
        key = f"{self.run_id}:{plan.seq}"
        plan.meter = meter = Meter()
        return (self.run_id, plan.seq, plan.name, plan.attempt, key, call.tool, meter)

    # -- budgets and policies (``tether.policies``) ----------------------------------------

    def later(self, kind: str, data: dict[str, Any]) -> None:
        """Write this event with the next commit (a decision made in memory)."""
        self._later.append((kind, data))

    def refuse(
        self, name: str, kind: StepKind, rule: str, message: str, subject: str | None
    ) -> NoReturn:
        """A policy refuses the call about to take the next journal position: journal the
        refusal there (a replay raises it again) and raise ``PolicyDenied``."""
        seq, entry = self._next(name, kind)
        if entry is not None:
            error = entry.error or {}
            raise PolicyDenied(error.get("message", message), rule=rule, subject=subject or "")
        message = f"run {self.run_id}: {name} was not started: {message}"
        error = {"type": "PolicyDenied", "message": message, "denied": True, "rule": rule}
        tool = subject if kind == StepKind.STEP else None
        denied = JournalEntry(
            seq, name, kind, StepStatus.FAILED, error=error, tool=tool, attempts=0
        )
        data = {"seq": seq, "name": name, "rule": rule, "kind": kind.value, "subject": subject}
        self._boundary(self._commit(denied, events=[(E.POLICY_DENIED, data)]))
        raise PolicyDenied(message, rule=rule, subject=subject or "")

    def deny(self, call: StepCall, rule: str, message: str) -> NoReturn:
        """A policy refuses the step ``call`` (see ``refuse``)."""
        self.refuse(call.name, StepKind.STEP, rule, message, call.tool)

    def reserve(self, request: Reserve) -> tuple[Any, Any, bool]:
        """Reserve a step's usage in the ledger (a fenced write): ``(breach, throttle or None,
        the limits as read, whether the run was parked)``."""
        self._live()
        status = self._commit(reserve=request)
        verdict = self.verdict
        if not verdict[2]:
            self._boundary(status)
        return verdict  # type: ignore[no-any-return]

    def throttled(self, seq: int, throttle: Throttle) -> NoReturn:
        """The step's tool is over its rate: wait, durably, until the window moves on."""
        until = dt.datetime.fromtimestamp(throttle.until, dt.UTC)
        why = {"seq": seq, "reason": f"rate {throttle.limit.describe()}"}
        self._wait([Wait(seq, WaitKind.TIMER, "", until)], why)

    def parked(self, why: str) -> NoReturn:
        """A write parked the run itself (a budget's pause): stop executing it."""
        self.buffer.clear()
        self._halt(Suspended(why))

    def budget_failed(self, data: dict[str, Any], call: StepCall) -> NoReturn:
        """The run fails with ``BudgetExceeded``: a step would go over a limit."""
        message = data.get("message") or (
            f"run {self.run_id}: step {call.name} was not started: it would go over "
            f"{data.get('limit')} of run {data.get('holder')}'s budget (used {data.get('used')})"
        )
        error = {"type": "BudgetExceeded", "message": message, **data}
        error.pop("action", None)
        self._commit(
            status=RunStatus.FAILED,
            error=error,
            release=True,
            events=[(E.RUN_FAILED, {"error": message})],
            **self._ending(),
        )
        self._halt(Stopped("failed: budget exceeded"))

    def _usage(
        self, plan: Plan, call: StepCall, completed: bool
    ) -> tuple[float | None, int | None]:
        """What the attempt used: what its body reported, else (if it completed) what the
        step declared."""
        meter = plan.meter
        cost = meter.cost if meter is not None else None
        tokens = meter.tokens if meter is not None else None
        if completed:
            cost = call.cost if cost is None else cost
            tokens = call.tokens if tokens is None else tokens
        return cost, tokens

    def _metered(
        self, plan: Plan, call: StepCall, entry: JournalEntry, completed: bool, final: bool
    ) -> tuple[dict[str, Any], LedgerChange | None]:
        """Record the attempt's usage on its entry (with earlier attempts'); returns it by
        ledger key with the guard's settlement of it."""
        cost, tokens = self._usage(plan, call, completed)
        entry.tool = call.tool
        before = plan.entry
        if cost is not None or (before is not None and before.cost is not None):
            entry.cost = (before.cost if before else 0.0) or 0.0
            entry.cost += cost or 0.0
        if tokens is not None or (before is not None and before.tokens is not None):
            entry.tokens = ((before.tokens if before else 0) or 0) + (tokens or 0)
        usage: dict[str, Any] = {}
        if completed:
            usage["steps"] = 1.0
        if cost:
            usage["cost"] = cost
        if tokens:
            usage["tokens"] = float(tokens)
        if call.tool is not None:
            usage[f"calls:{call.tool}"] = 1.0
        guard = self.guard
        if guard is None:
            return {"cost": cost, "tokens": tokens}, None
        change, settled = guard.settlement(plan.seq, call, usage, final)
        if settled is not None:
            self.later(E.BUDGET_SETTLED, settled)
        return {"cost": cost, "tokens": tokens}, change

    def resolve_ambiguous(
        self, plan: Plan, call: StepCall, why: str = "a crash in the middle of it"
    ) -> None:
        """An at-most-once step may or may not have taken effect: apply its ``on_ambiguous``
        choice. Returns only for ``retry`` (the attempt then starts)."""
        error = {
            "type": "AmbiguousStep",
            "message": f"step {plan.seq} ({plan.name}) was started but its result was never "
            f"recorded ({why}); it may or may not have taken effect",
            "step": plan.name,
        }
        choice = call.on_ambiguous
        if choice == "retry":
            return
        if choice == "fail":
            self._commit(
                status=RunStatus.FAILED,
                error=error,
                release=True,
                events=[(E.STEP_AMBIGUOUS, {"seq": plan.seq, "name": plan.name, "choice": choice})],
                **self._ending(),
            )
            self._halt(Stopped("failed: ambiguous step"))
        self._incident(IncidentKind.AMBIGUOUS_STEP, error, plan.seq)

    def _wait_for_retry(self, plan: Plan, call: StepCall) -> None:
        assert plan.entry is not None and plan.entry.error is not None
        until = _parse(plan.entry.error["retry_at"])
        self._wait([Wait(plan.seq, WaitKind.RETRY, "", until)], {"seq": plan.seq})

    def before_call(self, plan: Plan) -> None:
        """Commit an at-most-once step's intent before its body runs."""
        intent = JournalEntry(
            plan.seq,
            plan.name,
            StepKind.STEP,
            StepStatus.STARTED,
            attempts=plan.attempt,
            stored=plan.entry is not None,
            state_version=plan.entry.state_version if plan.entry else None,
        )
        status = self._commit(
            intent, events=[(E.STEP_STARTED, {"seq": plan.seq, "name": plan.name})]
        )
        plan.entry = intent
        self._boundary(status)

    def step_succeeded(self, plan: Plan, call: StepCall, value: Any) -> Any:
        """Journal a step's output with the run's progress; returns the output as stored."""
        self._live()
        entry = self._entry(plan, StepStatus.COMPLETED)
        try:
            entry.output = codec.check(value, f"step {plan.name} output")
        except SerializationError as exc:
            entry.status = StepStatus.FAILED
            entry.error = {**error_info(exc), "step": plan.name, "attempt": plan.attempt}
            self._unstorable(exc, plan.seq, entry)
        data: dict[str, Any] = {"seq": plan.seq, "name": plan.name}
        if plan.attempt > 1:
            data["attempt"] = plan.attempt
        ledger = None
        if (
            call.tool is not None
            or call.cost is not None
            or call.tokens is not None
            or (
                plan.meter is not None
                and (plan.meter.cost is not None or plan.meter.tokens is not None)
            )
            or self.guard is not None
        ):
            used, ledger = self._metered(plan, call, entry, completed=True, final=True)
            if call.tool is not None:
                data["tool"] = call.tool
            data.update((k, v) for k, v in used.items() if v is not None)
        self._boundary(self._commit(entry, events=[(E.STEP_COMPLETED, data)], ledger=ledger))
        return entry.output

    def step_failed(self, plan: Plan, call: StepCall, outcome: Outcome, policy: Retry) -> None:
        """Record a failed attempt and act on the chosen strategy.

        Returns only when the next attempt should start at once (the cursor is moved back);
        otherwise halts with ``Suspended`` (a durable retry timer) or ``Stopped`` (a person).
        """
        self._live()
        exc = outcome.error
        assert exc is not None
        running_on = outcome.still_running
        if call.at_most_once and running_on:
            self._abandoned_at_most_once(plan, call, outcome, policy)
            running_on = False  # it ended meanwhile: an ordinary failure from here
        decision = decide(exc, policy, plan.attempt, plan.timeout, now=self.clock())
        error = {
            **error_info(exc),
            "step": plan.name,
            "attempt": plan.attempt,
            "strategy": decision.strategy.value,
        }
        failed: dict[str, Any] = {
            "seq": plan.seq,
            "name": plan.name,
            "attempt": plan.attempt,
            "error_type": type(exc).__name__,
            "error": printable(str(exc))[:500],
            "strategy": decision.strategy.value,
        }
        if decision.http_status is not None:
            failed["http_status"] = decision.http_status
        if running_on:
            # A sync body past its deadline cannot be stopped; the next attempt may overlap it.
            failed["abandoned_attempt_running"] = True
        metered = self._metering(plan, call)
        if not decision.retry:
            entry = self._entry(plan, StepStatus.FAILED, error)
            events = [(E.STEP_FAILED, failed)]
            error = {**error, "reason": decision.reason}
            ledger = self._metered(plan, call, entry, False, True)[1] if metered else None
            self._incident(
                IncidentKind.STEP_FAILED, error, plan.seq, entry, events=events, ledger=ledger
            )
        error.update(next_timeout=decision.timeout, delay=decision.delay)
        scheduled = {
            "seq": plan.seq,
            "name": plan.name,
            "strategy": decision.strategy.value,
            "delay": round(decision.delay, 6),
            "timeout": decision.timeout,
            "next_attempt": plan.attempt + 1,
        }
        if decision.retry_after is not None:
            scheduled["retry_after"] = decision.retry_after
        events = [(E.STEP_FAILED, failed), (E.STEP_RETRY_SCHEDULED, scheduled)]
        if decision.delay > 0:
            wake = self.clock() + dt.timedelta(seconds=decision.delay)
            error["retry_at"] = _iso(wake)
            entry = self._entry(plan, StepStatus.FAILED, error)
            ledger = self._metered(plan, call, entry, False, False)[1] if metered else None
            self.buffer.append(entry)
            self._wait(
                [Wait(plan.seq, WaitKind.RETRY, "", wake)], {"seq": plan.seq}, events, ledger
            )
        entry = self._entry(plan, StepStatus.FAILED, error)
        ledger = self._metered(plan, call, entry, False, False)[1] if metered else None
        self._boundary(self._commit(entry, events=events, ledger=ledger))
        self.seq -= 1

    def _metering(self, plan: Plan, call: StepCall) -> bool:
        """Whether a failed attempt has usage to record."""
        meter = plan.meter
        return (
            call.tool is not None
            or self.guard is not None
            or (meter is not None and (meter.cost is not None or meter.tokens is not None))
            or (plan.entry is not None and plan.entry.tool is not None)
        )

    def _abandoned_at_most_once(
        self, plan: Plan, call: StepCall, outcome: Outcome, policy: Retry
    ) -> None:
        """An at-most-once step timed out while its body still runs: it may yet take effect,
        so it is ambiguous, never simply started again. ``retry`` waits for the abandoned body
        to end (up to the deadline the next attempt would get) before the next attempt."""
        assert outcome.abandoned is not None and plan.timeout is not None
        why = "it timed out while its body was still running"
        grace = min(policy.max_timeout, plan.timeout * policy.timeout_factor)
        if call.on_ambiguous == "retry" and outcome.abandoned.wait(grace):
            return
        if call.on_ambiguous == "retry":
            why += ", and it did not end within another deadline"
            call = replace(call, on_ambiguous="ask")
        self.resolve_ambiguous(plan, call, why)

    def _entry(
        self, plan: Plan, status: StepStatus, error: dict[str, Any] | None = None
    ) -> JournalEntry:
        return JournalEntry(
            plan.seq,
            plan.name,
            StepKind.STEP,
            status,
            error=error,
            attempts=plan.attempt,
            stored=plan.entry is not None,
            state_version=plan.entry.state_version if plan.entry else None,
        )

    # -- waiting and deterministic values -------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """A durable timer: commit the wake-up time, park the run, resume by replay when due."""
        seq, entry = self._next("sleep", StepKind.SLEEP)
        now = self.clock()
        if entry is None:
            until = now + dt.timedelta(seconds=max(0.0, seconds))
            entry = JournalEntry(
                seq, "sleep", StepKind.SLEEP, StepStatus.WAITING, output={"until": _iso(until)}
            )
            if seconds <= 0:
                self._complete_buffered(entry)
                return
            self.buffer.append(entry)
        elif entry.status == StepStatus.COMPLETED:
            return
        until = _parse(entry.output["until"])
        if now >= until:
            self._complete_buffered(entry)
            return
        self._wait([Wait(seq, WaitKind.TIMER, "", until)], {"seq": seq})

    def _complete_buffered(self, entry: JournalEntry) -> None:
        done = replace(entry, status=StepStatus.COMPLETED)
        self.buffer = [e for e in self.buffer if e.seq != done.seq]
        self.buffer.append(done)
        self.journal[done.seq] = done

    def _wait(
        self,
        waits: list[Wait],
        data: dict[str, Any],
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        ledger: LedgerChange | None = None,
    ) -> NoReturn:
        """Park the run until the first of ``waits`` is satisfied (with the buffered entries)."""
        deadlines = [w.deadline for w in waits if w.deadline is not None]
        detail = {"kind": waits[0].kind, **data}
        if deadlines:
            detail["until"] = _iso(min(deadlines))
        self._commit(
            status=RunStatus.WAITING,
            waits=waits,
            release=True,
            events=[*events, (E.RUN_WAITING, detail)],
            ledger=ledger,
        )
        self._halt(Suspended(waits[0].kind.value))

    def journal_write(
        self, name: str, kind: StepKind, build: Callable[[int], dict[str, Any]]
    ) -> Any:
        """A journaled call whose effect is part of its write (a message sent, a child
        started): exactly once, whatever crashes. ``build(seq)`` gives the ``Commit`` fields
        (``outgoing``, ``children``) and the entry's ``output`` (the store may replace it,
        e.g. with the id of a message already sent under the same key). Replay returns the
        stored output. A refusal (no such recipient, ...) raises before anything is written."""
        seq, entry = self._next(name, kind)
        if entry is not None:
            return entry.output
        fields = build(seq)
        done = JournalEntry(seq, name, kind, StepStatus.COMPLETED, output=fields.pop("output"))
        self._boundary(self._commit(done, **fields))
        return done.output

    def settle(
        self,
        name: str,
        kind: StepKind,
        alternatives: tuple[tuple[str, str], ...],
        timeout: float | None,
        every: bool = False,
        request: Callable[[int], tuple[tuple[tuple[str, str], ...], dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        """Wait for the first of ``alternatives`` (or, with ``every``, for all children),
        decided in one write: journaled when ready, else the run parks on all of them (and a
        deadline ``timeout`` seconds after the first try) and resumes by replay. Returns the
        journaled outcome: ``{"index": i, ...}``, ``{"children": [...]}`` or
        ``{"timeout": True}``. ``request(seq)``, for an approval: the alternatives and the
        approval to create with the first try, named after the journal position."""
        seq, entry = self._next(name, kind)
        if entry is not None and entry.status == StepStatus.COMPLETED:
            return entry.output  # type: ignore[no-any-return]
        asked = None
        if request is not None:
            alternatives, asked = request(seq)
        if entry is not None and entry.output and entry.output.get("until"):
            deadline: dt.datetime | None = _parse(entry.output["until"])
        elif timeout is not None:
            deadline = self.clock() + dt.timedelta(seconds=max(0.0, timeout))
        else:
            deadline = None
        wait = Settle(
            seq, name, kind.value, entry is not None, alternatives, deadline, every, asked
        )
        status = self._commit(settle=wait)
        if self.settled is None:
            self._halt(Suspended(kind.value))
        settled: dict[str, Any] = self.settled
        self.high = max(self.high, seq)
        self.journal[seq] = JournalEntry(
            seq, name, kind, StepStatus.COMPLETED, output=settled, stored=True
        )
        self._boundary(status)
        return settled

    def diverge(self, seq: int, expected: str, got: str) -> NoReturn:
        """Replay found the journal at ``seq`` about something else than the handler asks
        now: a non-determinism incident (as ``_next`` raises for another step)."""
        self.diverged = NonDeterminismError(self.run_id, seq, expected, got)
        raise self.diverged

    def record(self, kind: StepKind, make: Callable[[], Any]) -> Any:
        """Journal a non-deterministic value (time, uuid, random) so replay sees the same one.

        It is written with the next commit: nothing durable can depend on it before that.
        """
        seq, entry = self._next(kind.value, kind)
        if entry is not None:
            return entry.output
        value = make()
        done = JournalEntry(seq, kind.value, kind, StepStatus.COMPLETED, output=value)
        self.buffer.append(done)
        self.journal[seq] = done
        return value

    def checkpoint(self, name: str) -> str:
        """Snapshot the agent's state (with this run's changes so far) under ``name``.

        Journaled: a replay returns the same checkpoint id and takes no new snapshot.
        """
        seq, entry = self._next(name, StepKind.CHECKPOINT)
        if entry is not None:
            return str(entry.output)
        done = JournalEntry(seq, name, StepKind.CHECKPOINT, StepStatus.COMPLETED)
        self._boundary(self._commit(done, checkpoint=name))
        return str(self.journal[seq].output)

    # -- the end of a run -----------------------------------------------------------------

    def finish(self, result: Any) -> None:
        """Commit the run's result."""
        self._live()
        if self.diverged is not None:
            # The handler caught the NonDeterminismError and returned: still an incident.
            self.handler_failed(self.diverged)
            return
        self._reach_frontier()
        try:
            output = codec.check(result, "result")
        except SerializationError as exc:
            self._unstorable(exc, None)
        self._commit(
            status=RunStatus.COMPLETED,
            result=output,
            release=True,
            events=[(E.RUN_COMPLETED, {"steps": self.high})],
            **self._ending(),
        )

    def _ending(self) -> dict[str, Any]:
        """What a write that ends the run does besides: cancel the attached children it
        started, and wake a parent waiting for it."""
        fields: dict[str, Any] = {}
        if any(e.kind == StepKind.SPAWN for e in self.journal.values()):
            fields["ended"] = True
        if self.claim.parent_run_id is not None:
            fields["wakes"] = [(WaitKind.CHILD, self.run_id)]
        if self.guard is not None and self.guard.shared:
            fields["ledger"] = LedgerChange(release="run")  # nothing it holds is spent now
        return fields

    def handler_failed(self, exc: BaseException) -> None:
        """The handler raised outside any step: a person has to look (an incident)."""
        self._live()
        exc = self.diverged or exc
        if isinstance(exc, NonDeterminismError):
            error = {**error_info(exc), "expected": exc.expected, "got": exc.got}
            self.buffer.clear()
            self._incident(IncidentKind.NON_DETERMINISM, error, exc.seq)
        if isinstance(exc, SerializationError):
            self._unstorable(exc, None)
        self._incident(IncidentKind.HANDLER_ERROR, error_info(exc), None)

    def lost(self, exc: BaseException) -> None:
        """Another worker owns the run now; drop everything uncommitted and say so."""
        self.buffer.clear()
        log.warning("%s", exc)
