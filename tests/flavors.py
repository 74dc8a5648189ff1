"""Engine tests run for a sync handler and for an async one, from one handler written once.

A test writes its handler as a generator that yields each ``ctx`` call::

    def handler(ctx, task):
        out = yield ctx.step(fetch, task["url"], name="fetch")
        yield ctx.sleep(5)
        return {"got": out}

    register(app, flavor, "fetcher", handler)

As a sync handler (``RunContext``) each call has run by the time it is yielded and its value is
sent straight back; as an async handler (``AsyncRunContext``) each yielded awaitable is awaited
and its value (or its exception, control signals included) is sent back into the generator,
exactly where ``await`` would have put it. So both faces of tether run the same test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from typing import Any

import pytest

import tether

FLAVORS = ("sync", "async")

Handler = Callable[[Any, Any], Generator[Any, Any, Any] | Any]


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    """``sync`` or ``async``: which face of the run context the handler gets."""
    return str(request.param)


def register(app: tether.App, flavor: str, name: str, handler: Handler, **options: Any) -> None:
    """Register ``handler`` (a generator function, see above) as agent type ``name``."""
    if flavor == "sync":

        def handle_sync(ctx: tether.RunContext, task: Any) -> Any:
            return run_sync(handler(ctx, task))

        app.agent(name, **options)(handle_sync)
    else:

        async def handle_async(ctx: tether.AsyncRunContext, task: Any) -> Any:
            return await run_async(handler(ctx, task))

        app.agent(name, **options)(handle_async)


def agent(app: tether.App, flavor: str, name: str, **options: Any) -> Callable[[Handler], Handler]:
    """Decorator form of ``register``."""

    def decorate(handler: Handler) -> Handler:
        register(app, flavor, name, handler, **options)
        return handler

    return decorate


def run_sync(steps: Any) -> Any:
    """Drive a generator handler whose ``ctx`` calls already ran."""
    if not inspect.isgenerator(steps):
        return steps
    value: Any = None
    while True:
        try:
            value = steps.send(value)
        except StopIteration as done:
            return done.value


async def run_async(steps: Any) -> Any:
    """Drive a generator handler, awaiting what it yields."""
    if not inspect.isgenerator(steps):
        return steps
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        error = None
        try:
            value = await yielded if inspect.isawaitable(yielded) else yielded
        except BaseException as exc:  # the handler sees it where its await would have raised
            error = exc


def register_mailbox(
    app: tether.App,
    flavor: str,
    name: str,
    on_message: Handler,
    handle: Handler | None = None,
    **attributes: Any,
) -> None:
    """Register an agent class ``name`` with a mailbox: ``on_message(ctx, message)`` (and
    ``handle(ctx, task)``), both generator functions as above, in the given flavor."""

    def method(handler: Handler) -> Any:
        if flavor == "sync":

            def sync(self: tether.Agent, ctx: Any, arg: Any) -> Any:
                return run_sync(handler(ctx, arg))

            return sync

        async def in_async(self: tether.Agent, ctx: Any, arg: Any) -> Any:
            return await run_async(handler(ctx, arg))

        return in_async

    body = {"type": name, "on_message": method(on_message), **attributes}
    body["handle"] = method(handle or (lambda ctx, task: task))
    app.register(type(f"Mailbox_{name}", (tether.Agent,), body))
