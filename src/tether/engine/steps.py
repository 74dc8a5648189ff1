"""A step's life, written once: plan, interceptors, intent, body, commit, retry decision.

``drive`` is a generator that does no I/O of its own: it yields what must happen (``Body``:
call the step function; ``Write``: a database write) and is sent back the result. Two thin
faces run it: ``run_sync`` calls everything directly, ``run_async`` awaits async bodies on the
event loop and sends writes to a thread, so a handler's event loop never blocks on the
database. Replayed steps return without a yield, and so without a thread hop.

Interceptors see every executed attempt (never a replayed one): ``before_step`` before the
body starts (raising there fails the attempt without running the body), then ``after_step``
or ``step_failed``, in reverse order. Budgets, policies, approvals before tools and telemetry
plug in here, never into the loop.
"""

from __future__ import annotations

import contextvars
import inspect
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

from tether.engine.retry import StepTimeout
from tether.engine.scope import ScopeFields, enter_step, leave_step
from tether.interceptors import Interceptor
from tether.types import Retry

if TYPE_CHECKING:
    from tether.engine.executor import Execution


@dataclass(slots=True)
class StepCall:
    """One ``ctx.step(...)`` call: the function, its own arguments, and tether's options."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str
    tool: str | None = None
    cost: float | None = None
    tokens: int | None = None
    retry: Retry | None = None
    timeout: float | None = None
    at_most_once: bool = False
    on_ambiguous: str = "ask"


@dataclass(slots=True)
class Body:
    """Yielded by ``drive``: run the step function under ``scope``; send back an ``Outcome``."""

    call: StepCall
    scope: ScopeFields
    """The fields of the attempt's ``StepScope`` (made into one only if the body asks)."""
    timeout: float | None


@dataclass(slots=True)
class Write:
    """Yielded by ``drive``: call ``fn(*args)`` (a database write) and send back its result."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class Outcome:
    """How an attempt's body ended."""

    value: Any = None
    error: Exception | None = None
    abandoned: threading.Event | None = None
    """Set once the attempt's body really ended, when it timed out but could not be stopped
    (a sync function in a thread): it may still be running, and its effects may still happen.
    ``None`` when nothing of the attempt runs on."""

    @property
    def still_running(self) -> bool:
        """True while an abandoned attempt's body is still running."""
        return self.abandoned is not None and not self.abandoned.is_set()


Op = Body | Write


def drive(ex: Execution, call: StepCall) -> Generator[Op, Any, Any]:
    """The life of one step, from the journal's point of view; see the module docstring."""
    policy = ex.policy(call.retry)
    interceptors: Sequence[Interceptor] = ex.interceptors
    guard = ex.guard
    while True:
        if guard is not None and not guard.quick(call):
            yield Write(guard.admit, (call,))  # budgets and policies (tether.policies)
        plan = ex.plan_step(call)
        if plan.replayed:
            return plan.value
        if plan.prelude is not None:  # an ambiguous intent, or a retry claimed too early
            yield Write(plan.prelude, (plan, call))  # may stop the run
        attempt = ex.attempt_of(plan, call) if interceptors else None
        outcome: Outcome | None = None
        if attempt is not None:
            try:
                for interceptor in interceptors:
                    interceptor.before_step(attempt)
            except Exception as exc:
                outcome = Outcome(error=exc)
        if outcome is None:
            if call.at_most_once:
                yield Write(ex.before_call, (plan,))
            if monotonic() > ex.lease.check_after:  # the heartbeat is late: ask the database
                yield Write(ex.renew_lease)
            outcome = yield Body(call, ex.scope_of(plan, call), plan.timeout)
        if outcome.error is None:
            if attempt is not None:
                for interceptor in reversed(interceptors):
                    interceptor.after_step(attempt, outcome.value)
            return (yield Write(ex.step_succeeded, (plan, call, outcome.value)))
        if attempt is not None:
            for interceptor in reversed(interceptors):
                interceptor.step_failed(attempt, outcome.error)
        yield Write(ex.step_failed, (plan, call, outcome, policy))  # returns only to retry now


def run_sync(steps: Generator[Op, Any, Any]) -> Any:
    """Drive a step on the calling thread."""
    reply: Any = None
    while True:
        try:
            op = steps.send(reply)
        except StopIteration as done:
            return done.value
        if isinstance(op, Body):
            reply = call_body(op)
            continue
        try:
            reply = op.fn(*op.args)
        except BaseException:
            steps.close()
            raise


async def run_async(steps: Generator[Op, Any, Any]) -> Any:
    """Drive a step from a coroutine: bodies awaited on the loop, writes in a thread."""
    import asyncio

    reply: Any = None
    while True:
        try:
            op = steps.send(reply)
        except StopIteration as done:
            return done.value
        if isinstance(op, Body):
            reply = await call_body_async(op)
            continue
        try:
            reply = await asyncio.to_thread(op.fn, *op.args)
        except BaseException:
            steps.close()
            raise


def _deadline_error(name: str, timeout: float) -> StepTimeout:
    return StepTimeout(f"step {name} exceeded its {timeout:g}s deadline")


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a coroutine function, remembered per code object for plain functions
    and methods (a handler calls the same few step functions over and over)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None or hasattr(fn, "_is_coroutine_marker"):
        return inspect.iscoroutinefunction(fn)
    found = _ASYNC.get(code)
    if found is None:
        found = inspect.iscoroutinefunction(fn)
        if len(_ASYNC) < 10_000:
            _ASYNC[code] = found
    return found


_ASYNC: dict[Any, bool] = {}


def call_body(op: Body) -> Outcome:
    """Run a step function from sync code; an async one on a fresh event loop."""
    call = op.call
    if is_async(call.fn):
        import asyncio

        return asyncio.run(call_body_async(op))
    token = enter_step(op.scope)
    try:
        if op.timeout is None:
            return Outcome(call.fn(*call.args, **call.kwargs))
        return _call_in_thread(op, op.timeout)
    except Exception as exc:
        return Outcome(error=exc)
    finally:
        leave_step(token)


def _call_in_thread(op: Body, timeout: float) -> Outcome:
    """A thread cannot be interrupted: past the deadline the attempt is abandoned and may go
    on in the background; ``Outcome.abandoned`` tells when it really ended."""
    call = op.call
    result: dict[str, Any] = {}
    ended = threading.Event()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            result["value"] = context.run(call.fn, *call.args, **call.kwargs)
        except BaseException as exc:
            result["error"] = exc
        finally:
            ended.set()

    threading.Thread(target=target, name=f"tether-step-{call.name}", daemon=True).start()
    if not ended.wait(timeout):
        return Outcome(error=_deadline_error(call.name, timeout), abandoned=ended)
    error = result.get("error")
    if error is not None:
        if not isinstance(error, Exception):
            raise error
        return Outcome(error=error)
    return Outcome(value=result.get("value"))


async def call_body_async(op: Body) -> Outcome:
    """Run a step function from a coroutine: async ones awaited (cancelled at the deadline),
    sync ones in a thread (abandoned at the deadline)."""
    import asyncio

    call = op.call
    token = enter_step(op.scope)
    ended: threading.Event | None = None
    try:
        if is_async(call.fn):
            work = call.fn(*call.args, **call.kwargs)
        else:
            ended = threading.Event()
            work = asyncio.to_thread(_flagged, ended, call.fn, call.args, call.kwargs)
        if op.timeout is None:
            return Outcome(value=await work)
        try:
            return Outcome(value=await asyncio.wait_for(work, op.timeout))
        except TimeoutError:
            error = _deadline_error(call.name, op.timeout)
            return Outcome(error=error, abandoned=ended)
    except Exception as exc:
        return Outcome(error=exc)
    finally:
        leave_step(token)


def _flagged(ended: threading.Event, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    finally:
        ended.set()
