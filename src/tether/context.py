"""``RunContext``: the inside-a-run API, handed to ``handle(ctx, task)``.

There is one implementation of the journal protocol (``tether.engine.executor.Execution``);
``RunContext`` and ``AsyncRunContext`` are thin faces over it: the sync one calls step
functions directly, the async one awaits them. A handler written ``async def`` gets the async
face.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import inspect
import random as _random
import threading
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.engine.executor import AMBIGUOUS_CHOICES, Execution, Plan
from tether.engine.retry import StepTimeout
from tether.errors import ConfigurationError
from tether.types import Retry


@dataclass(frozen=True)
class StepScope:
    """What a step function can learn about the step it runs in (``tether.current_step()``)."""

    run_id: str
    seq: int
    name: str
    attempt: int
    idempotency_key: str
    """Stable across attempts and crashes: pass it to outside systems to deduplicate effects."""


_current: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar(
    "tether_step", default=None
)


def current_step() -> StepScope:
    """The step being executed; raises ``RuntimeError`` outside a step body."""
    scope = _current.get()
    if scope is None:
        raise RuntimeError("tether.current_step() is only available inside a step function")
    return scope


def _step_name(fn: Callable[..., Any], name: str | None) -> str:
    return str(name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "step"))


def _check_options(on_ambiguous: str, timeout: float | None) -> None:
    if on_ambiguous not in AMBIGUOUS_CHOICES:
        raise ConfigurationError(
            f"on_ambiguous={on_ambiguous!r}; choose one of {', '.join(AMBIGUOUS_CHOICES)}"
        )
    if timeout is not None and timeout <= 0:
        raise ConfigurationError(f"step timeout must be positive, got {timeout}")


def _deadline_error(name: str, timeout: float) -> StepTimeout:
    return StepTimeout(f"step {name} exceeded its {timeout:g}s deadline")


class _Face:
    """What both faces share: identity, state and the journaled values."""

    def __init__(self, execution: Execution, task: Any) -> None:
        self._ex = execution
        self.task = task

    @property
    def run_id(self) -> str:
        """This run's id."""
        return self._ex.run_id

    @property
    def agent_id(self) -> str:
        """The agent executing this run."""
        return self._ex.agent_id

    @property
    def config(self) -> dict[str, Any]:
        """The agent's configuration."""
        return self._ex.claim.config

    @property
    def state(self) -> dict[str, Any]:
        """The agent's state document: changes are committed with the next step (durably)."""
        return self._ex.state

    @property
    def attempt(self) -> int:
        """How many times this run has been claimed by a worker (1 on the first execution)."""
        return self._ex.claim.attempts

    @property
    def is_replaying(self) -> bool:
        """True while the handler is re-reading its journal (use it to silence logging)."""
        return self._ex.seq < self._ex.high

    def now(self) -> dt.datetime:
        """The current time, journaled: a replay sees the same value."""
        text = self._ex.record("now", lambda: self._ex.clock().isoformat())
        return dt.datetime.fromisoformat(text)

    def uuid(self) -> _uuid.UUID:
        """A random UUID, journaled."""
        return _uuid.UUID(self._ex.record("uuid", lambda: str(_uuid.uuid4())))

    def random(self) -> float:
        """A random float in [0, 1), journaled."""
        return float(self._ex.record("random", _random.random))

    def _scope(self, plan: Plan) -> StepScope:
        return StepScope(
            self.run_id, plan.seq, plan.name, plan.attempt, self._ex.idempotency_key(plan.seq)
        )


class RunContext(_Face):
    """The run context of a synchronous handler."""

    def step(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        at_most_once: bool = False,
        on_ambiguous: str = "ask",
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as a journaled step and return its (JSON) output.

        On replay the stored output comes back without calling ``fn``. Failures are retried by
        error class (see ``tether.Retry``); what no strategy fixes becomes an incident.
        ``at_most_once`` commits the step's intent first: after a crash in the middle of it the
        step is not run again but resolved by ``on_ambiguous`` (``ask``, ``fail``, ``retry``).
        """
        _check_options(on_ambiguous, timeout)
        label = _step_name(fn, name)
        policy = self._ex.policy(retry)
        while True:
            plan = self._ex.begin_step(label, timeout, on_ambiguous)
            if plan.replayed:
                return plan.value
            if at_most_once:
                self._ex.before_call(plan)
            token = _current.set(self._scope(plan))
            try:
                value = _call_sync(fn, args, kwargs, plan.timeout, label)
            except Exception as exc:
                self._ex.step_failed(plan, exc, policy)
                continue
            finally:
                _current.reset(token)
            return self._ex.step_succeeded(plan, value)

    def sleep(self, seconds: float) -> None:
        """Wait durably: the run is parked in the database and resumed by replay when due."""
        self._ex.sleep(seconds)

    def checkpoint(self, name: str) -> str:
        """Snapshot the agent's state now (with this run's changes); returns the checkpoint id."""
        return self._ex.checkpoint(name)


class AsyncRunContext(_Face):
    """The run context of an ``async def`` handler: ``await ctx.step(...)``."""

    async def step(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        at_most_once: bool = False,
        on_ambiguous: str = "ask",
        **kwargs: Any,
    ) -> Any:
        """The async face of ``RunContext.step``; ``fn`` may be sync (run in a thread) or async."""
        _check_options(on_ambiguous, timeout)
        label = _step_name(fn, name)
        policy = self._ex.policy(retry)
        while True:
            plan = self._ex.begin_step(label, timeout, on_ambiguous)
            if plan.replayed:
                return plan.value
            if at_most_once:
                await _in_thread(self._ex.before_call, plan)
            token = _current.set(self._scope(plan))
            try:
                value = await _call_async(fn, args, kwargs, plan.timeout, label)
            except Exception as exc:
                await _in_thread(self._ex.step_failed, plan, exc, policy)
                continue
            finally:
                _current.reset(token)
            return await _in_thread(self._ex.step_succeeded, plan, value)

    async def sleep(self, seconds: float) -> None:
        """Wait durably (see ``RunContext.sleep``)."""
        await _in_thread(self._ex.sleep, seconds)

    async def checkpoint(self, name: str) -> str:
        """Snapshot the agent's state now (see ``RunContext.checkpoint``)."""
        return str(await _in_thread(self._ex.checkpoint, name))


def _call_sync(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    name: str,
) -> Any:
    if inspect.iscoroutinefunction(fn):
        import asyncio

        return asyncio.run(_call_async(fn, args, kwargs, timeout, name))
    if timeout is None:
        return fn(*args, **kwargs)
    # A thread cannot be interrupted: past the deadline the attempt is abandoned (and may
    # finish in the background); the step is retried under a longer deadline.
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()

    def target() -> None:
        try:
            outcome["value"] = context.run(fn, *args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"tether-step-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _deadline_error(name, timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


async def _call_async(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    name: str,
) -> Any:
    import asyncio

    if inspect.iscoroutinefunction(fn):
        work = fn(*args, **kwargs)
    else:
        work = asyncio.to_thread(fn, *args, **kwargs)
    if timeout is None:
        return await work
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        raise _deadline_error(name, timeout) from None


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``fn`` (a journal write) off the event loop.

    asyncio is imported here, not with ``tether``: it is a third of ``import tether``, and only
    async handlers need it (by the time this runs, their event loop has loaded it).
    """
    import asyncio

    return await asyncio.to_thread(fn, *args)


def execute(execution: Execution, agent_cls: Any, task: Any) -> None:
    """Run a synchronous handler to its end, its next wait, or a stop; commit the outcome."""
    from tether.engine.executor import Stopped, Suspended
    from tether.errors import LeaseLost

    try:
        instance = agent_cls(execution.agent_id, execution.claim.config)
        try:
            result = instance.handle(RunContext(execution, task), task)
        except (Suspended, Stopped):
            return
        except Exception as exc:
            execution.handler_failed(exc)
            return
        execution.finish(result)
    except (Suspended, Stopped):
        return
    except LeaseLost as exc:
        execution.lost(exc)


async def execute_async(execution: Execution, agent_cls: Any, task: Any) -> None:
    """The async twin of ``execute``, for ``async def handle``."""
    from tether.engine.executor import Stopped, Suspended
    from tether.errors import LeaseLost

    try:
        instance = agent_cls(execution.agent_id, execution.claim.config)
        try:
            result = await instance.handle(AsyncRunContext(execution, task), task)
        except (Suspended, Stopped):
            return
        except Exception as exc:
            await _in_thread(execution.handler_failed, exc)
            return
        await _in_thread(execution.finish, result)
    except (Suspended, Stopped):
        return
    except LeaseLost as exc:
        execution.lost(exc)
