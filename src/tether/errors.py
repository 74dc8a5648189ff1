"""The errors tether raises, as two trees.

::

    TetherError
    ├── ConfigurationError        bad URL, unknown agent type, bad option, schema too new
    ├── DatabaseUnavailable       the database cannot be reached or opened
    │   └── StorageFull           its disk is full: free space, then retry
    ├── NotFound                  no such agent / run / checkpoint / incident / approval
    ├── AlreadyExists             an id that is taken
    ├── ConflictError             a stale version or a lost race (compare-and-set failed)
    │   └── InvalidTransition     an illegal lifecycle (or run status) transition
    ├── Refused                   the request is valid but not allowed now
    ├── SerializationError        a value that is not JSON, or a payload over the size limit
    ├── NonDeterminismError       a replay asked for a different step than the journal holds
    ├── RunFailed                 ``RunHandle.result()`` on a run that ended without a result
    ├── ChildRunFailed            a child run a parent waits for failed (its error attached)
    ├── ChildCancelled            a child run a parent waits for was cancelled
    └── WaitTimeout               ``ctx.wait`` ran out of time before its children ended

    ControlSignal (a BaseException: the engine's decisions about a run, never errors)
    ├── Suspended                 the run parked itself in the database (a wait)
    ├── Stopped                   paused, cancelled, handed to a person, failed, worker stopping
    └── LeaseLost                 this worker no longer owns the run; it must stop at once

Every error carries its context as attributes and says, in its message, what to do; the CLI
exits with the class's ``exit_code``.

Control signals unwind a handler from inside ``ctx`` calls. They derive from
``BaseException`` so that ``except Exception:`` in handler code cannot swallow them, and they
are sticky: once the engine decided to stop a run, every later ``ctx`` call of that execution
raises the same signal again, so no further step body starts whatever the handler catches.
"""

from __future__ import annotations

from collections.abc import Iterable


class TetherError(Exception):
    """Base class of every error tether raises on purpose."""

    exit_code = 1


class ConfigurationError(TetherError):
    """The runtime was configured in a way that cannot work (URL, agent type, option)."""

    exit_code = 2


class DatabaseUnavailable(TetherError):
    """The database cannot be reached, opened, or is not a tether database."""

    exit_code = 69


class StorageFull(DatabaseUnavailable):
    """The database's disk is full. The write that met it was rolled back and nothing
    committed before it is lost; once space is freed, the same app writes again."""


class NotFound(TetherError):
    """The named object does not exist."""

    exit_code = 4

    def __init__(self, kind: str, key: str, hint: str = "") -> None:
        self.kind = kind
        self.key = key
        message = f"{kind} {key!r} not found"
        super().__init__(f"{message}; {hint}" if hint else message)


class AlreadyExists(TetherError):
    """An object with this id already exists."""

    exit_code = 5

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key!r} already exists; choose another id")


class ConflictError(TetherError):
    """A write lost a race or was based on stale data; re-read and try again."""

    exit_code = 5


class InvalidTransition(ConflictError):
    """An illegal lifecycle transition. Names the current state and what is allowed from it."""

    def __init__(
        self,
        subject: str,
        current: str,
        action: str,
        allowed: Iterable[str],
    ) -> None:
        self.subject = subject
        self.current = current
        self.action = action
        self.allowed = tuple(allowed)
        options = ", ".join(self.allowed) if self.allowed else "none (final state)"
        super().__init__(
            f"cannot {action} {subject}: it is {current}; allowed from {current}: {options}"
        )


class Refused(TetherError):
    """The request is well formed but not allowed in the current situation."""

    exit_code = 1


class InvalidInput(TetherError):
    """Input that does not satisfy its schema (an approval's edit, an answer); ``errors``
    says what is wrong, one line each. Nothing was written."""

    exit_code = 2

    def __init__(self, message: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(message + ": " + "; ".join(errors))


class SerializationError(TetherError):
    """A value cannot be stored as JSON, or is larger than the configured limit."""

    exit_code = 2


class NonDeterminismError(TetherError):
    """A replay asked for a different step than the journal holds at that position."""

    def __init__(self, run_id: str, seq: int, expected: str, got: str) -> None:
        self.run_id = run_id
        self.seq = seq
        self.expected = expected
        self.got = got
        super().__init__(
            f"run {run_id} step {seq}: the journal holds {expected!r} but the handler asked for "
            f"{got!r}; the handler's control flow changed between executions. Restore the "
            f"previous code and retry the incident, or abort it, or fork the run from step "
            f"{seq - 1}"
        )


class RunFailed(TetherError):
    """The run ended without a result (failed, cancelled)."""

    def __init__(self, run_id: str, status: str, error: object) -> None:
        self.run_id = run_id
        self.status = status
        self.error = error
        super().__init__(f"run {run_id} ended {status}: {error}")


class ChildRunFailed(TetherError):
    """A child run the parent waits for failed. ``error`` is the child's error."""

    def __init__(self, run_id: str, agent_id: str, error: dict[str, object] | None) -> None:
        self.run_id = run_id
        self.agent_id = agent_id
        self.error = error or {}
        detail = self.error.get("message") or self.error.get("type") or "no error recorded"
        super().__init__(
            f"child run {run_id} on agent {agent_id} failed: {detail}; catch ChildRunFailed to "
            "go on without it, or see: tether runs show " + run_id
        )


class ChildCancelled(TetherError):
    """A child run the parent waits for was cancelled."""

    def __init__(self, run_id: str, agent_id: str, reason: str) -> None:
        self.run_id = run_id
        self.agent_id = agent_id
        self.reason = reason
        super().__init__(f"child run {run_id} on agent {agent_id} was cancelled: {reason}")


class PolicyDenied(TetherError):
    """A policy refused a step's tool or a message's recipient: the step never started, the
    message was never sent. Journaled: a replay raises it again at the same place. Catch it
    to go on without the call (tell the model, pick another tool)."""

    def __init__(self, message: str, *, rule: str = "", subject: str = "") -> None:
        self.rule = rule
        self.subject = subject
        super().__init__(message)


class BudgetExceeded(TetherError):
    """A run failed because a step would have gone over a budget (``on_breach="fail"``, or an
    ``ask`` that was rejected). The run's error names the limit, the usage and the step."""


class WaitTimeout(TetherError, TimeoutError):
    """``ctx.wait`` ran out of time before every child ended (the children go on)."""


class ControlSignal(BaseException):
    """The engine stops executing a run here. Never catch it in handler code."""


class Suspended(ControlSignal):
    """The run parked itself in the database (a timer, a retry delay, a wait)."""


class Stopped(ControlSignal):
    """Stop executing this run: paused, cancelled, handed to a person, failed, or the worker
    is stopping."""


class LeaseLost(ControlSignal):
    """This worker no longer owns the run (its lease expired and another worker may hold it):
    nothing more of the run is committed or started in this process."""
