"""Agent types: the Python code behind agents of one type.

Write a class::

    class Researcher(tether.Agent):
        type = "researcher"

        def on_initialize(self, ctx):
            ctx.state["notes"] = []

        def handle(self, ctx, task):
            ...

or decorate a function with ``@app.agent("writer")``. Hooks (``on_initialize``,
``on_activate``, ``on_pause``, ``on_terminate``) are optional; a hook that raises moves the agent
to ``error`` with the exception recorded. Hooks and ``handle`` may be ``async def``.
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tether.errors import ConfigurationError
from tether.types import Retry

HOOKS: dict[str, str] = {
    "initialize": "on_initialize",
    "activate": "on_activate",
    "pause": "on_pause",
    "terminate": "on_terminate",
}
"""Lifecycle action -> the hook method run before it is committed."""

_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}$")


@dataclass
class HookContext:
    """What a lifecycle hook sees: the agent and a mutable copy of its state document."""

    agent_id: str
    type: str
    config: dict[str, Any]
    action: str
    state: dict[str, Any] = field(default_factory=dict)


class Agent:
    """Base class of agent types. Subclass it, set ``type`` and write ``handle(ctx, task)``."""

    type: ClassVar[str] = ""
    """The agent type's name, used by ``create_agent`` and the CLI."""

    max_concurrent_runs: ClassVar[int] = 1
    """Runs of one agent executing at once (actor semantics by default)."""

    retry: ClassVar[Retry | None] = None
    """Retry policy for this type's steps, unless a step sets its own."""

    def __init__(self, agent_id: str, config: dict[str, Any]) -> None:
        self.agent_id = agent_id
        self.config = config

    def handle(self, ctx: Any, task: Any) -> Any:
        """Execute one task. Override it; journal outside work with ``ctx.step``."""
        raise NotImplementedError(f"agent type {self.type!r} does not define handle(ctx, task)")


def validate_type(cls: type[Agent]) -> type[Agent]:
    """Check an agent class before registration; a clear ``ConfigurationError`` otherwise."""
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise ConfigurationError(f"{cls!r} is not a subclass of tether.Agent")
    name = cls.type
    if not name or not _TYPE_NAME.match(name):
        raise ConfigurationError(
            f"agent class {cls.__name__} needs a type name: set type = 'researcher' (letters, "
            "digits and _.:- only)"
        )
    if cls.handle is Agent.handle:
        raise ConfigurationError(f"agent type {name!r} ({cls.__name__}) must define handle")
    if cls.max_concurrent_runs < 1:
        raise ConfigurationError(f"agent type {name!r}: max_concurrent_runs must be at least 1")
    return cls


def from_function(
    name: str,
    fn: Callable[..., Any],
    *,
    max_concurrent_runs: int = 1,
    retry: Retry | None = None,
) -> type[Agent]:
    """Wrap ``fn(ctx, task)`` as an agent type called ``name``."""
    is_async = inspect.iscoroutinefunction(fn)

    if is_async:

        async def handle_async(self: Agent, ctx: Any, task: Any) -> Any:
            return await fn(ctx, task)

        handle: Callable[..., Any] = handle_async
    else:

        def handle_sync(self: Agent, ctx: Any, task: Any) -> Any:
            return fn(ctx, task)

        handle = handle_sync

    cls = type(
        f"FunctionAgent_{name}",
        (Agent,),
        {
            "type": name,
            "max_concurrent_runs": max_concurrent_runs,
            "retry": retry,
            "handle": handle,
            "__doc__": fn.__doc__,
            "__module__": getattr(fn, "__module__", __name__),
        },
    )
    return validate_type(cls)


def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; if it is a coroutine function, run it to completion on a fresh event loop."""
    result = fn(*args)
    if inspect.isawaitable(result):
        import asyncio  # only async hooks need it; not loaded with tether

        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def error_info(exc: BaseException, limit: int = 20) -> dict[str, Any]:
    """An exception as JSON: type, message and a short traceback, always storable (an error
    message may carry what the database cannot: a NUL, a lone surrogate)."""
    return {
        "type": type(exc).__name__,
        "message": printable(str(exc)),
        "traceback": printable("".join(traceback.format_exception(exc, limit=limit))[-8000:]),
    }


def printable(text: str) -> str:
    """``text`` with what no database stores escaped: NUL and lone surrogates."""
    if text.isascii() and "\x00" not in text:
        return text
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
