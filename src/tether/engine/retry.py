"""Choosing how to retry a failed step from the class of its error.

| error class                                  | strategy                       |
| -------------------------------------------- | ------------------------------ |
| timeouts (``TimeoutError``, step deadline)   | ``retry_with_increased_timeout`` |
| resources (``MemoryError``, disk full, ...)  | ``wait_and_retry``             |
| network (``ConnectionError``, DNS, HTTP I/O) | ``retry_with_backoff``         |
| anything else                                | ``manual_intervention``        |

Exception types are looked at first (the whole MRO, by class and by well-known names of
HTTP-client transport errors, so no client library needs importing); the message is only a
fallback for errors that carry no useful type.
"""

from __future__ import annotations

import errno
import random
import socket
from dataclasses import dataclass

from tether.types import Retry, Strategy

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EDQUOT}
_NETWORK_TYPE_NAMES = {
    # httpx / httpcore / requests / urllib3 / aiohttp transport errors, matched by name.
    "TransportError",
    "NetworkError",
    "ConnectError",
    "ConnectTimeout",
    "ReadError",
    "WriteError",
    "RemoteProtocolError",
    "ProtocolError",
    "NewConnectionError",
    "MaxRetryError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
}
_TIMEOUT_TYPE_NAMES = {"Timeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"}


class StepTimeout(TimeoutError):
    """A step ran past its deadline."""


def classify(exc: BaseException) -> Strategy:
    """The default strategy for an error, by type first and by message as a fallback."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, TimeoutError) or names & _TIMEOUT_TYPE_NAMES:
        return Strategy.RETRY_WITH_INCREASED_TIMEOUT
    if isinstance(exc, ConnectionError | socket.gaierror | socket.herror) or (
        names & _NETWORK_TYPE_NAMES
    ):
        return Strategy.RETRY_WITH_BACKOFF
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS):
        return Strategy.WAIT_AND_RETRY
    message = str(exc).lower()
    if "timed out" in message or "timeout" in message or "deadline" in message:
        return Strategy.RETRY_WITH_INCREASED_TIMEOUT
    if any(w in message for w in ("connection", "network", "dns", "unreachable", "refused")):
        return Strategy.RETRY_WITH_BACKOFF
    if any(w in message for w in ("resource", "memory", "disk full", "no space", "quota")):
        return Strategy.WAIT_AND_RETRY
    return Strategy.MANUAL_INTERVENTION


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt."""

    strategy: Strategy
    retry: bool
    delay: float
    """Seconds until the next attempt (a durable timer when above zero)."""
    timeout: float | None
    """The next attempt's deadline in seconds, or None for no deadline."""
    reason: str


def decide(
    exc: BaseException,
    policy: Retry,
    attempt: int,
    timeout: float | None,
    rng: random.Random | None = None,
) -> Decision:
    """Choose the strategy for ``exc`` after ``attempt`` attempts, with delay and next timeout."""
    strategy = policy.strategy or classify(exc)
    if strategy == Strategy.MANUAL_INTERVENTION:
        return Decision(strategy, False, 0.0, timeout, "needs a person")
    if attempt >= policy.max_attempts:
        return Decision(strategy, False, 0.0, timeout, f"{attempt} attempts exhausted")
    if strategy == Strategy.RETRY_WITH_INCREASED_TIMEOUT:
        grown = (
            None if timeout is None else min(policy.max_timeout, timeout * policy.timeout_factor)
        )
        return Decision(strategy, True, 0.0, grown, "retry at once with a longer deadline")
    if strategy == Strategy.WAIT_AND_RETRY:
        return Decision(strategy, True, min(policy.wait_delay, policy.max_delay), timeout, "wait")
    base = min(policy.max_delay, policy.initial_delay * policy.backoff_factor ** (attempt - 1))
    jitter = (rng or random).uniform(0, policy.jitter) if policy.jitter else 0.0
    return Decision(strategy, True, min(policy.max_delay, base * (1 + jitter)), timeout, "backoff")
