"""``RunContext``: the inside-a-run API, handed to ``handle(ctx, task)``.

The journal protocol is ``tether.engine.executor.Execution`` and a step's life is
``tether.engine.steps.drive``, each written once; ``RunContext`` and ``AsyncRunContext`` are
thin faces over them: the sync one calls step functions directly, the async one awaits them
and sends database writes to a thread. A handler written ``async def`` gets the async face.
"""

from __future__ import annotations

import datetime as dt
import functools
import numbers
import random as _random
import uuid as _uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tether import approvals, codec, coordination, messaging
from tether.approvals import Decision
from tether.coordination import ChildHandle, Ready, Receive
from tether.engine.scope import (
    RunScope,
    StepScope,
    current_run,
    current_step,
    enter_run,
    leave_run,
)
from tether.errors import ConfigurationError, ControlSignal, LeaseLost
from tether.limits import Budget
from tether.messaging import Message
from tether.policies import BudgetView
from tether.types import Retry
from tether.vocabulary import StepKind

if TYPE_CHECKING:
    from tether.engine.executor import Execution
    from tether.engine.steps import StepCall

# The engine (tether.engine.steps and .executor) is imported by the first step, not with
# ``import tether``: a program that only submits runs never needs it.

AMBIGUOUS_CHOICES = ("ask", "fail", "retry")
"""What an at-most-once step whose outcome is unknown may do (``on_ambiguous``)."""

NAME_LENGTH = 255
"""Longest step, tool or checkpoint name (what the database columns hold)."""
_NAMES_SEEN: set[str] = set()
"""Step names already checked: a handler calls the same few names over and over."""

__all__ = [
    "AsyncRunContext",
    "RunContext",
    "RunScope",
    "StepScope",
    "current_run",
    "current_step",
    "execute",
    "execute_async",
]


def _step_call(
    make: type[StepCall],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str | None,
    tool: str | None,
    cost: float | None,
    tokens: int | None,
    retry: Retry | None,
    timeout: float | None,
    at_most_once: bool,
    on_ambiguous: str,
) -> StepCall:
    """Check tether's step options (never passed to ``fn``) and bundle the call."""
    if not callable(fn):
        raise ConfigurationError(f"ctx.step needs a function to call, got {fn!r}")
    if on_ambiguous != "ask" and on_ambiguous not in AMBIGUOUS_CHOICES:
        raise ConfigurationError(
            f"on_ambiguous={on_ambiguous!r}; choose one of {', '.join(AMBIGUOUS_CHOICES)}"
        )
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"step timeout must be positive seconds, got {timeout}")
    if tool is not None:
        if not isinstance(tool, str) or not tool.strip():
            raise ConfigurationError(f"step tool must be a non-empty name, got {tool!r}")
        codec.check_text("step tool", tool, NAME_LENGTH)
    if cost is not None or tokens is not None:
        _check_usage(cost, tokens)
    label = str(name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "step"))
    if label not in _NAMES_SEEN:
        codec.check_text("step name", label, NAME_LENGTH)
        if len(_NAMES_SEEN) < 10_000:
            _NAMES_SEEN.add(label)
    return make(
        fn,
        args,
        kwargs,
        label,
        tool,
        None if cost is None else float(cost),
        None if tokens is None else int(tokens),
        retry,
        timeout,
        at_most_once,
        on_ambiguous,
    )


_PLAIN = (int, float, type(None))


def _check_usage(cost: float | None, tokens: int | None) -> None:
    plain = type(cost) in _PLAIN and type(tokens) in (int, type(None))
    if plain and (cost or 0) >= 0 <= (tokens or 0):
        return  # the common case, checked without the numbers ABCs
    for option, value in (("cost", cost), ("tokens", tokens)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0
        ):
            raise ConfigurationError(f"step {option} must be a number >= 0, got {value!r}")
    if tokens is not None and int(tokens) != tokens:
        raise ConfigurationError(f"step tokens must be a whole number, got {tokens!r}")


class _Face:
    """What both faces share: identity, state and the journaled values."""

    def __init__(self, execution: Execution, task: Any) -> None:
        from tether.engine import steps  # loaded with the first run, not with tether

        self._ex = execution
        self._steps = steps
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
    def budget(self) -> BudgetView:
        """What this run may still spend (``ctx.budget.remaining``), its budget and policy."""
        return BudgetView(self._ex.guard)

    @property
    def is_replaying(self) -> bool:
        """True while the handler is re-reading its journal (use it to silence logging)."""
        return self._ex.seq < self._ex.high

    def now(self) -> dt.datetime:
        """The current time (the app's clock), journaled: a replay sees the same value."""
        text = self._ex.record(StepKind.NOW, lambda: self._ex.clock().isoformat())
        return dt.datetime.fromisoformat(text)

    def uuid(self) -> _uuid.UUID:
        """A random UUID, journaled."""
        return _uuid.UUID(self._ex.record(StepKind.UUID, lambda: str(_uuid.uuid4())))

    def random(self) -> float:
        """A random float in [0, 1), journaled."""
        return float(self._ex.record(StepKind.RANDOM, _random.random))


class RunContext(_Face):
    """The run context of a synchronous handler."""

    def step(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        tool: str | None = None,
        cost: float | None = None,
        tokens: int | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        at_most_once: bool = False,
        on_ambiguous: str = "ask",
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as a journaled step and return its (JSON) output.

        On replay the stored output comes back without calling ``fn``. Failures are retried by
        error class (see ``tether.Retry``); what no strategy fixes becomes an incident.
        ``at_most_once`` commits the step's intent first: after a crash in the middle of it (or
        a timeout while its body still runs) the step is not run again but resolved by
        ``on_ambiguous`` (``ask``, ``fail``, ``retry``). ``tool``, ``cost`` and ``tokens``
        describe the step for policies, budgets and the event log. Only ``args`` and
        ``kwargs`` reach ``fn``: every named option here is tether's.
        """
        steps = self._steps
        call = _step_call(
            steps.StepCall,
            fn,
            args,
            kwargs,
            name,
            tool,
            cost,
            tokens,
            retry,
            timeout,
            at_most_once,
            on_ambiguous,
        )
        return steps.run_sync(steps.drive(self._ex, call))

    def sleep(self, seconds: float) -> None:
        """Wait durably: the run is parked in the database and resumed by replay when due."""
        self._ex.sleep(seconds)

    def send(
        self, to: str, payload: Any = None, *, topic: str | None = None, key: str | None = None
    ) -> str:
        """Send a message to agent ``to`` (on ``topic``), exactly once: written with this
        journal entry; ``key`` (default: this run and position) makes a repeat a no-op.
        Returns the message id. Refused at once if ``to`` does not exist or is terminated."""
        return messaging.send(self._ex, to, payload, topic, key)

    def publish(self, topic: str, payload: Any = None, *, key: str | None = None) -> int:
        """Send one copy to every agent subscribed to ``topic`` now; returns how many."""
        return messaging.publish(self._ex, topic, payload, key)

    def receive(self, topic: str | None = None, *, timeout: float | None = None) -> Message | None:
        """The oldest message for this agent (on ``topic``), consumed exactly once; waits for
        one durably (holding nothing) for up to ``timeout`` seconds, then returns None."""
        return messaging.receive(self._ex, topic, timeout)

    def approve(
        self,
        title: str,
        data: Any = None,
        *,
        schema: Any = None,
        timeout: float | None = None,
        default: str = "reject",
        approvers: Sequence[str] | None = None,
    ) -> Decision:
        """Ask a person to approve ``data`` and wait durably (holding nothing) for the
        decision: a ``Decision``, truthy when approved. With ``schema`` (a pydantic model or
        JSON Schema) the approver may edit the data (validated; ``decision.edited``). After
        ``timeout`` seconds ``default`` ("reject" or "approve") applies, with
        ``source="timeout"``. ``approvers`` restricts who may decide."""
        return approvals.approve(
            self._ex,
            title,
            data,
            schema=schema,
            timeout=timeout,
            default=default,
            approvers=approvers,
        )

    def ask(
        self,
        question: str,
        schema: Any,
        *,
        timeout: float | None = None,
        default: Any = None,
        approvers: Sequence[str] | None = None,
    ) -> Any:
        """Ask a person for input and wait durably for the answer, validated against
        ``schema`` when given (a pydantic model: the answer is an instance of it; a JSON
        Schema: plain JSON). ``default`` after ``timeout`` seconds, or if the person
        declines."""
        return approvals.ask(
            self._ex, question, schema, timeout=timeout, default=default, approvers=approvers
        )

    def spawn(
        self,
        agent_id: str,
        task: Any = None,
        *,
        task_id: str | None = None,
        priority: int = 0,
        detached: bool = False,
        budget: Budget | None = None,
    ) -> ChildHandle:
        """Start a child run of ``task`` on ``agent_id`` (exactly one, whatever crashes); it is
        cancelled when this run ends unless ``detached``. Returns its handle. The child spends
        against this run's budget (and its ancestors'), is held to this run's policy, and to
        its own ``budget`` if given."""
        return coordination.spawn(
            self._ex,
            agent_id,
            task,
            task_id=task_id,
            priority=priority,
            detached=detached,
            budget=budget,
        )

    def wait(
        self, handles: ChildHandle | Sequence[ChildHandle], *, timeout: float | None = None
    ) -> list[Any]:
        """Wait durably until these children end; their results, in order. A failed child
        raises ``ChildRunFailed``, a cancelled one ``ChildCancelled``; ``timeout`` raises
        ``WaitTimeout``."""
        return coordination.wait(self._ex, coordination._handles(handles), timeout)

    def wait_any(self, *alternatives: ChildHandle | Receive, timeout: float | None = None) -> Ready:
        """Wait durably for the first of children and messages (``tether.Receive(topic)``),
        or the timeout; the others are withdrawn. Returns ``Ready(source, value)``."""
        return coordination.wait_any(self._ex, alternatives, timeout)

    def call(self, agent_id: str, task: Any = None, *, timeout: float | None = None) -> Any:
        """``spawn`` then ``wait``: the child's result."""
        return self.wait([self.spawn(agent_id, task)], timeout=timeout)[0]

    def checkpoint(self, name: str) -> str:
        """Snapshot the agent's state now (with this run's changes); returns the checkpoint id."""
        return self._ex.checkpoint(codec.check_text("checkpoint name", name, NAME_LENGTH))


class AsyncRunContext(_Face):
    """The run context of an ``async def`` handler: ``await ctx.step(...)``."""

    async def step(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        tool: str | None = None,
        cost: float | None = None,
        tokens: int | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        at_most_once: bool = False,
        on_ambiguous: str = "ask",
        **kwargs: Any,
    ) -> Any:
        """The async face of ``RunContext.step``; ``fn`` may be sync (run in a thread) or async."""
        steps = self._steps
        call = _step_call(
            steps.StepCall,
            fn,
            args,
            kwargs,
            name,
            tool,
            cost,
            tokens,
            retry,
            timeout,
            at_most_once,
            on_ambiguous,
        )
        return await steps.run_async(steps.drive(self._ex, call))

    async def sleep(self, seconds: float) -> None:
        """Wait durably (see ``RunContext.sleep``)."""
        await _in_thread(self._ex.sleep, seconds)

    async def send(
        self, to: str, payload: Any = None, *, topic: str | None = None, key: str | None = None
    ) -> str:
        """See ``RunContext.send``."""
        return str(await _in_thread(messaging.send, self._ex, to, payload, topic, key))

    async def publish(self, topic: str, payload: Any = None, *, key: str | None = None) -> int:
        """See ``RunContext.publish``."""
        return int(await _in_thread(messaging.publish, self._ex, topic, payload, key))

    async def receive(
        self, topic: str | None = None, *, timeout: float | None = None
    ) -> Message | None:
        """See ``RunContext.receive``."""
        found: Message | None = await _in_thread(messaging.receive, self._ex, topic, timeout)
        return found

    async def approve(
        self,
        title: str,
        data: Any = None,
        *,
        schema: Any = None,
        timeout: float | None = None,
        default: str = "reject",
        approvers: Sequence[str] | None = None,
    ) -> Decision:
        """See ``RunContext.approve``."""
        decision: Decision = await _in_thread(
            functools.partial(
                approvals.approve,
                self._ex,
                title,
                data,
                schema=schema,
                timeout=timeout,
                default=default,
                approvers=approvers,
            )
        )
        return decision

    async def ask(
        self,
        question: str,
        schema: Any,
        *,
        timeout: float | None = None,
        default: Any = None,
        approvers: Sequence[str] | None = None,
    ) -> Any:
        """See ``RunContext.ask``."""
        return await _in_thread(
            functools.partial(
                approvals.ask,
                self._ex,
                question,
                schema,
                timeout=timeout,
                default=default,
                approvers=approvers,
            )
        )

    async def spawn(
        self,
        agent_id: str,
        task: Any = None,
        *,
        task_id: str | None = None,
        priority: int = 0,
        detached: bool = False,
        budget: Budget | None = None,
    ) -> ChildHandle:
        """See ``RunContext.spawn``."""
        handle: ChildHandle = await _in_thread(
            lambda: coordination.spawn(
                self._ex,
                agent_id,
                task,
                task_id=task_id,
                priority=priority,
                detached=detached,
                budget=budget,
            )
        )
        return handle

    async def wait(
        self, handles: ChildHandle | Sequence[ChildHandle], *, timeout: float | None = None
    ) -> list[Any]:
        """See ``RunContext.wait``."""
        found = coordination._handles(handles)
        results: list[Any] = await _in_thread(coordination.wait, self._ex, found, timeout)
        return results

    async def wait_any(
        self, *alternatives: ChildHandle | Receive, timeout: float | None = None
    ) -> Ready:
        """See ``RunContext.wait_any``."""
        ready: Ready = await _in_thread(coordination.wait_any, self._ex, alternatives, timeout)
        return ready

    async def call(self, agent_id: str, task: Any = None, *, timeout: float | None = None) -> Any:
        """See ``RunContext.call``."""
        return (await self.wait([await self.spawn(agent_id, task)], timeout=timeout))[0]

    async def checkpoint(self, name: str) -> str:
        """Snapshot the agent's state now (see ``RunContext.checkpoint``)."""
        name = codec.check_text("checkpoint name", name, NAME_LENGTH)
        return str(await _in_thread(self._ex.checkpoint, name))


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``fn`` (a journal write) off the event loop.

    asyncio is imported here, not with ``tether``: it is a third of ``import tether``, and only
    async handlers need it (by the time this runs, their event loop has loaded it).
    """
    import asyncio

    return await asyncio.to_thread(fn, *args)


def execute(execution: Execution, agent_cls: Any, task: Any) -> None:
    """Run a synchronous handler to its end, its next wait, or a stop; commit the outcome."""
    token = enter_run(execution.run_scope())
    try:
        if not execution.start():
            return
        instance = agent_cls(execution.agent_id, execution.claim.config)
        ctx = RunContext(execution, task)
        try:
            if execution.claim.message_seq is None:
                result = instance.handle(ctx, task)
            else:
                result = instance.on_message(ctx, Message.from_dict(task))
        except Exception as exc:
            execution.handler_failed(exc)
            return
        execution.finish(result)
    except LeaseLost as exc:
        execution.lost(exc)
    except ControlSignal:
        return
    finally:
        leave_run(token)


async def execute_async(execution: Execution, agent_cls: Any, task: Any) -> None:
    """The async twin of ``execute``, for ``async def handle``."""
    token = enter_run(execution.run_scope())
    try:
        if not await _in_thread(execution.start):
            return
        instance = agent_cls(execution.agent_id, execution.claim.config)
        actx = AsyncRunContext(execution, task)
        try:
            if execution.claim.message_seq is None:
                result = await instance.handle(actx, task)
            else:
                result = await instance.on_message(actx, Message.from_dict(task))
        except Exception as exc:
            await _in_thread(execution.handler_failed, exc)
            return
        await _in_thread(execution.finish, result)
    except LeaseLost as exc:
        execution.lost(exc)
    except ControlSignal:
        return
    finally:
        leave_run(token)
