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
from typing import TYPE_CHECKING, Any, ClassVar

from tether.errors import ConfigurationError
from tether.types import Retry

if TYPE_CHECKING:
    from tether.limits import Budget, Policy

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

    type_concurrency: ClassVar[int | None] = None
    """Runs of this type executing at once, across all workers and machines (``None``: no
    cap). A run over the cap stays pending, holding nothing, until one of the type ends or
    waits."""

    rate_limit: ClassVar[str | None] = None
    """At most N claims of this type's runs per window, across all workers and machines:
    ``"30/min"``, ``"5/s"``, ``"100/h"``, ``"1000/day"``, or ``"10/5min"`` for a window of
    several units (``None``: no cap). A run counts once per window in which a worker claims
    it, to start or to resume after a wait; a run over the cap stays pending, holding
    nothing, until the window has moved on."""

    retry: ClassVar[Retry | None] = None
    """Retry policy for this type's steps, unless a step sets its own."""

    budget: ClassVar[Budget | None] = None
    """Limits on what each run of this type, with everything it delegates, may spend
    (``tether.Budget``); an agent's config, a run and the app may set tighter ones."""

    policy: ClassVar[Policy | None] = None
    """Which tools runs of this type may call and whom they may message (``tether.Policy``);
    intersected with the agent's, the run's, the app's and, for a child, its parent's."""

    subscriptions: ClassVar[tuple[str, ...]] = ()
    """Topics every agent of this type is subscribed to when it is created."""

    def __init__(self, agent_id: str, config: dict[str, Any]) -> None:
        self.agent_id = agent_id
        self.config = config

    def handle(self, ctx: Any, task: Any) -> Any:
        """Execute one task. Override it; journal outside work with ``ctx.step``."""
        raise NotImplementedError(f"agent type {self.type!r} does not define handle(ctx, task)")

    def on_message(self, ctx: Any, message: Any) -> Any:
        """Optional: the agent's mailbox. Define it, and a message to the agent that no
        waiting ``receive`` takes starts a run that calls ``on_message(ctx, message)`` with it
        (a ``tether.Message``, consumed by that run), one run per message, under the same
        concurrency rules as other runs (actor style)."""
        raise NotImplementedError(f"agent type {self.type!r} has no mailbox (on_message)")


def has_mailbox(cls: type[Agent]) -> bool:
    """Whether the type defines ``on_message``."""
    return cls.on_message is not Agent.on_message


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
    cap = cls.type_concurrency
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigurationError(
            f"agent type {name!r}: type_concurrency must be a whole number of runs, at least 1 "
            f"(or None for no cap), got {cap!r}"
        )
    if cls.rate_limit is not None:
        try:
            parse_rate(cls.rate_limit)
        except ConfigurationError as exc:
            raise ConfigurationError(f"agent type {name!r}: {exc}") from None
    from tether.limits import Budget, Policy

    for attr, kind in (("budget", Budget), ("policy", Policy)):
        value = getattr(cls, attr, None)
        if value is not None and not isinstance(value, kind):
            raise ConfigurationError(
                f"agent type {name!r}: {attr} must be a tether.{kind.__name__}, got {value!r}"
            )
    return cls


_RATE = re.compile(
    r"^\s*([1-9]\d*)\s*/\s*([1-9]\d*)?\s*(s|secs?|seconds?|mins?|minutes?|h|hours?|d|days?)\s*$"
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}  # by the unit's first letter
_UNIT_NAMES = (("day", 86400), ("h", 3600), ("min", 60), ("s", 1))


def parse_rate(spec: str) -> tuple[int, float]:
    """A rate cap as written on an agent type -> (claims, window in seconds): ``"30/min"``
    -> ``(30, 60.0)``.

    Units: ``s``, ``min``, ``h``, ``day`` (or ``sec``, ``second``, ``minute``, ``hour``,
    ``d``, and plurals); a number before the unit widens the window: ``"10/5min"``.
    """
    found = _RATE.match(spec) if isinstance(spec, str) else None
    if found is None:
        raise ConfigurationError(
            f"rate_limit {spec!r} is not a rate: write claims/window, e.g. '30/min', '5/s', "
            "'100/h' or '10/5min' (units: s, min, h, day; whole numbers from 1)"
        )
    return int(found[1]), float(int(found[2] or 1) * _UNITS[found[3][0]])


def format_rate(claims: int, window: float) -> str:
    """A rate cap as people write it: (30, 60.0) -> ``"30/min"``, (10, 300.0) -> ``"10/5min"``."""
    for name, seconds in _UNIT_NAMES:
        if window >= seconds and window % seconds == 0:
            count = int(window // seconds)
            return f"{claims}/{'' if count == 1 else count}{name}"
    return f"{claims}/{window:g}s"


def from_function(
    name: str,
    fn: Callable[..., Any],
    *,
    max_concurrent_runs: int = 1,
    retry: Retry | None = None,
    type_concurrency: int | None = None,
    rate_limit: str | None = None,
    budget: Budget | None = None,
    policy: Policy | None = None,
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
            "type_concurrency": type_concurrency,
            "rate_limit": rate_limit,
            "budget": budget,
            "policy": policy,
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
