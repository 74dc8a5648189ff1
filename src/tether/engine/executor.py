"""Executing one claimed run by replay.

The handler runs from the top every time a run is claimed. Each journaled call (a step, a
sleep, ``now``/``uuid``/``random``) takes the next sequence number; when the journal already
holds that position its stored result is returned without running anything, and when it holds a
*different* call the run becomes an incident with ``NonDeterminismError``. Past the end of the
journal, calls execute and each result is committed — with the run's progress, the agent's
state and the events — in one transaction fenced by the worker's lease epoch.

A run that has to wait (a timer, a retry delay) commits its wait and unwinds with
``Suspended``; it then holds no thread and no Python object until a worker claims it again.

``Execution`` holds the protocol; ``tether.context`` wraps it in thin sync and async faces.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

from tether import codec
from tether.agent import Agent, error_info
from tether.engine.retry import decide
from tether.errors import NonDeterminismError, SerializationError
from tether.journal import Claim, ClaimSpec, Commit, JournalEntry
from tether.types import Retry, RunStatus, StepStatus

if TYPE_CHECKING:
    from tether.store import Store

log = logging.getLogger("tether.engine")

AMBIGUOUS_CHOICES = ("ask", "fail", "retry")


class Suspended(BaseException):
    """The run parked itself in the database (a timer, a retry delay); stop executing it."""


class Stopped(BaseException):
    """Stop executing this run: paused, cancelled, handed to a person, or the worker stops."""


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
        app_retry: Retry,
        lease_ttl: float,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        next_claim: Callable[[], ClaimSpec | None] = lambda: None,
    ) -> None:
        self.store = store
        self.claim = claim
        self.ref = claim.ref
        self.run_id = claim.ref.run_id
        self.agent_id = claim.agent_id
        self.agent_cls = agent_cls
        self.lease_ttl = lease_ttl
        self.should_stop = should_stop
        self.next_claim = next_claim
        self.follow_ups: list[Claim] = []
        """Runs claimed, in the write that gave this one up, to take its place in the worker."""
        self.clock = clock
        self.default_retry = agent_cls.retry or app_retry
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

    # -- the journal cursor ---------------------------------------------------------------

    def _next(self, name: str, kind: str) -> tuple[int, JournalEntry | None]:
        if self.diverged is not None:
            raise self.diverged
        self.seq += 1
        entry = self.journal.get(self.seq)
        if entry is not None:
            if entry.name != name or entry.kind != kind:
                self.diverged = NonDeterminismError(
                    self.run_id, self.seq, f"{entry.kind} {entry.name}", f"{kind} {name}"
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

    def _commit(self, *entries: JournalEntry, **fields: Any) -> RunStatus:
        pending = [*self.buffer, *entries]
        for entry in pending:
            self.high = max(self.high, entry.seq)
        if fields.get("release") and not self.follow_ups:
            # This execution ends with this write: its worker's slot is free from here on.
            fields["then_claim"] = self.next_claim()
        change = Commit(entries=pending, state=self._state_change(), **fields)
        committed = self.store.commit(self.ref, change, self.agent_id, self.lease_ttl)
        self.buffer.clear()
        for entry in pending:
            self.journal[entry.seq] = entry
        self.follow_ups.extend(committed.claimed)
        return committed.status

    def _boundary(self, status: RunStatus) -> None:
        """After a commit: stop here if a person paused or cancelled the run, or we shut down."""
        if status == RunStatus.CANCELLED:
            self._commit(release=True)
            raise Stopped("cancelled")
        if status == RunStatus.PAUSED:
            self._commit(release=True, events=[("run.paused_at_boundary", {"seq": self.seq})])
            raise Stopped("paused")
        if self.should_stop():
            self._commit(
                release=True,
                status=RunStatus.PENDING,
                events=[("run.released", {"seq": self.seq, "reason": "worker shutting down"})],
            )
            raise Stopped("worker stopping")

    def _incident(
        self, kind: str, error: dict[str, Any], seq: int | None, *entries: JournalEntry
    ) -> None:
        self._commit(
            *entries,
            status=RunStatus.NEEDS_ATTENTION,
            error=error,
            release=True,
            incident={"seq": seq, "kind": kind, "error": error},
            events=[
                ("incident.opened", {"kind": kind, "seq": seq, "error": error.get("message")}),
                ("run.needs_attention", {"kind": kind}),
            ],
        )

    # -- steps ----------------------------------------------------------------------------

    def policy(self, retry: Retry | None) -> Retry:
        """The retry policy of a step: its own, else the agent type's, else the app's."""
        return retry or self.default_retry

    def begin_step(self, name: str, timeout: float | None, on_ambiguous: str) -> Plan:
        """Position the cursor on the next step and say whether to run it or replay it."""
        seq, entry = self._next(name, "step")
        if entry is None:
            return Plan(seq, name, replayed=False, attempt=1, timeout=timeout)
        if entry.status == StepStatus.COMPLETED:
            return Plan(seq, name, replayed=True, value=entry.output, entry=entry)
        if entry.status == StepStatus.FAILED:  # a retry that is due
            grown = (entry.error or {}).get("next_timeout", timeout)
            return Plan(seq, name, False, attempt=entry.attempts + 1, timeout=grown, entry=entry)
        # STARTED: an at-most-once step's intent without a result. Never run it blindly again.
        error = {
            "type": "AmbiguousStep",
            "message": f"step {seq} ({name}) was started but its result was never recorded "
            "(a crash in the middle of it); it may or may not have taken effect",
            "step": name,
        }
        if on_ambiguous == "retry":
            return Plan(seq, name, False, attempt=entry.attempts + 1, timeout=timeout, entry=entry)
        if on_ambiguous == "fail":
            self._commit(
                status=RunStatus.FAILED,
                error=error,
                release=True,
                events=[("step.ambiguous", {"seq": seq, "name": name, "choice": "fail"})],
            )
            raise Stopped("failed: ambiguous step")
        self._incident("ambiguous_step", error, seq)
        raise Stopped("ambiguous step needs a person")

    def before_call(self, plan: Plan) -> None:
        """Commit an at-most-once step's intent before its body runs."""
        intent = JournalEntry(
            plan.seq,
            plan.name,
            "step",
            StepStatus.STARTED,
            attempts=plan.attempt,
            stored=plan.entry is not None,
            state_version=plan.entry.state_version if plan.entry else None,
        )
        status = self._commit(
            intent, events=[("step.started", {"seq": plan.seq, "name": plan.name})]
        )
        plan.entry = intent
        self._boundary(status)

    def step_succeeded(self, plan: Plan, value: Any) -> Any:
        """Journal a step's output with the run's progress; returns the output as stored."""
        try:
            output = codec.check(value, f"step {plan.name} output")
        except SerializationError as exc:
            self._give_up(plan, exc, "step output is not JSON")
        entry = JournalEntry(
            plan.seq,
            plan.name,
            "step",
            StepStatus.COMPLETED,
            output=output,
            attempts=plan.attempt,
            stored=plan.entry is not None,
            state_version=plan.entry.state_version if plan.entry else None,
        )
        data: dict[str, Any] = {"seq": plan.seq, "name": plan.name}
        if plan.attempt > 1:
            data["attempt"] = plan.attempt
        self._boundary(self._commit(entry, events=[("step.completed", data)]))
        return output

    def step_failed(self, plan: Plan, exc: BaseException, policy: Retry) -> None:
        """Record a failed attempt and act on the chosen strategy.

        Returns only when the next attempt should start at once (the cursor is moved back);
        otherwise raises ``Suspended`` (a durable retry timer) or ``Stopped`` (an incident).
        """
        decision = decide(exc, policy, plan.attempt, plan.timeout)
        error = {
            **error_info(exc),
            "step": plan.name,
            "attempt": plan.attempt,
            "strategy": decision.strategy.value,
        }
        failed = {
            "seq": plan.seq,
            "name": plan.name,
            "attempt": plan.attempt,
            "error_type": type(exc).__name__,
            "error": str(exc)[:500],
            "strategy": decision.strategy.value,
        }
        if not decision.retry:
            entry = self._failed_entry(plan, error)
            self._incident("step_failed", {**error, "reason": decision.reason}, plan.seq, entry)
            raise Stopped("step failed")
        error.update(next_timeout=decision.timeout, delay=decision.delay)
        scheduled = {
            "seq": plan.seq,
            "name": plan.name,
            "strategy": decision.strategy.value,
            "delay": round(decision.delay, 6),
            "timeout": decision.timeout,
            "next_attempt": plan.attempt + 1,
        }
        entry = self._failed_entry(plan, error)
        events = [("step.failed", failed), ("step.retry_scheduled", scheduled)]
        if decision.delay > 0:
            wake = self.clock() + dt.timedelta(seconds=decision.delay)
            self._commit(
                entry,
                events=events,
                status=RunStatus.WAITING,
                wake_at=wake,
                wait={"kind": "retry", "seq": plan.seq, "until": _iso(wake)},
                release=True,
            )
            raise Suspended("retry timer")
        self._boundary(self._commit(entry, events=events))
        self.seq -= 1

    def _failed_entry(self, plan: Plan, error: dict[str, Any]) -> JournalEntry:
        return JournalEntry(
            plan.seq,
            plan.name,
            "step",
            StepStatus.FAILED,
            error=error,
            attempts=plan.attempt,
            stored=plan.entry is not None,
            state_version=plan.entry.state_version if plan.entry else None,
        )

    def _give_up(self, plan: Plan, exc: BaseException, reason: str) -> NoReturn:
        error = {**error_info(exc), "step": plan.name, "attempt": plan.attempt, "reason": reason}
        self._incident("step_failed", error, plan.seq, self._failed_entry(plan, error))
        raise Stopped(reason)

    # -- waiting and deterministic values -------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """A durable timer: commit the wake-up time, park the run, resume by replay when due."""
        seq, entry = self._next("sleep", "sleep")
        now = self.clock()
        if entry is None:
            until = now + dt.timedelta(seconds=max(0.0, seconds))
            entry = JournalEntry(
                seq, "sleep", "sleep", StepStatus.WAITING, output={"until": _iso(until)}
            )
            if seconds <= 0:
                self._complete_buffered(entry)
                return
            self._wait(entry, until, {"kind": "sleep", "seq": seq, "until": _iso(until)})
        if entry.status == StepStatus.COMPLETED:
            return
        until = _parse(entry.output["until"])
        if now >= until:
            self._complete_buffered(entry)
            return
        self._wait(entry, until, {"kind": "sleep", "seq": seq, "until": _iso(until)})

    def _complete_buffered(self, entry: JournalEntry) -> None:
        done = replace(entry, status=StepStatus.COMPLETED)
        self.buffer.append(done)
        self.journal[done.seq] = done

    def _wait(self, entry: JournalEntry, until: dt.datetime, wait: dict[str, Any]) -> None:
        self._commit(
            entry,
            status=RunStatus.WAITING,
            wake_at=until,
            wait=wait,
            release=True,
            events=[("run.waiting", wait)],
        )
        raise Suspended(wait["kind"])

    def record(self, kind: str, make: Callable[[], Any]) -> Any:
        """Journal a non-deterministic value (time, uuid, random) so replay sees the same one.

        It is written with the next commit: nothing durable can depend on it before that.
        """
        seq, entry = self._next(kind, kind)
        if entry is not None:
            return entry.output
        value = make()
        done = JournalEntry(seq, kind, kind, StepStatus.COMPLETED, output=value)
        self.buffer.append(done)
        self.journal[seq] = done
        return value

    def checkpoint(self, name: str) -> str:
        """Snapshot the agent's state (with this run's changes so far) under ``name``.

        Journaled: a replay returns the same checkpoint id and takes no new snapshot.
        """
        seq, entry = self._next(name, "checkpoint")
        if entry is not None:
            return str(entry.output)
        done = JournalEntry(seq, name, "checkpoint", StepStatus.COMPLETED)
        self._boundary(self._commit(done, checkpoint=name))
        return str(self.journal[seq].output)

    # -- the end of a run -----------------------------------------------------------------

    def finish(self, result: Any) -> None:
        """Commit the run's result."""
        if self.diverged is not None:
            # The handler caught the NonDeterminismError and returned: still an incident.
            self.handler_failed(self.diverged)
            return
        self._reach_frontier()
        try:
            output = codec.check(result, "result")
        except SerializationError as exc:
            self.handler_failed(exc)
            return
        self._commit(
            status=RunStatus.COMPLETED,
            result=output,
            release=True,
            events=[("run.completed", {"steps": self.high})],
        )

    def handler_failed(self, exc: BaseException) -> None:
        """The handler raised outside any step: a person has to look (an incident)."""
        exc = self.diverged or exc
        if isinstance(exc, NonDeterminismError):
            error = {**error_info(exc), "expected": exc.expected, "got": exc.got}
            self.buffer.clear()
            self._incident("non_determinism", error, exc.seq)
            return
        self._incident("handler_error", error_info(exc), None)

    def lost(self, exc: BaseException) -> None:
        """Another worker owns the run now; drop everything uncommitted and say so."""
        self.buffer.clear()
        log.warning("%s", exc)
