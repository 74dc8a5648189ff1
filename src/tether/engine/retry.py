"""Choosing how to retry a failed step from the class of its error.

| error class                                       | strategy                         |
| ------------------------------------------------- | -------------------------------- |
| HTTP 408, 429, 5xx (a status on the error)        | ``retry_with_backoff``           |
| HTTP 400-499 other than 408 and 429               | ``manual_intervention``          |
| timeouts (``TimeoutError``, step deadline)        | ``retry_with_increased_timeout`` |
| resources (``MemoryError``, disk full, ...)       | ``wait_and_retry``               |
| network (``ConnectionError``, DNS, HTTP I/O)      | ``retry_with_backoff``           |
| anything else                                     | ``manual_intervention``          |

An HTTP status is looked at first: ``status_code`` or ``response.status_code`` (httpx,
requests, the OpenAI and Anthropic clients) or ``status`` (aiohttp, urllib), on the error or
along its explicit causes (``raise ... from http_error``), never along the implicit context,
which may be an unrelated error met while handling another. Only 400-599 count. A retried
attempt never starts before the response's ``Retry-After`` (seconds or an HTTP date; the
clients' ``retry-after-ms`` too), even past ``Retry.max_delay``, up to one day.

Exception types come next (the whole MRO, by class and by well-known names of HTTP-client
transport errors, so no client library needs importing); the message is only a fallback for
errors that carry no useful type.
"""

from __future__ import annotations

import datetime as dt
import errno
import math
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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

# 408: the server gave up waiting for our request; a fresh one may arrive in time, and our own
# step deadline has nothing to do with it, so it backs off rather than growing the timeout.
_RETRIED_CLIENT_STATUSES = {408, 429}
RETRY_AFTER_CAP = 86400.0
"""The longest ``Retry-After`` honoured, in seconds (one day); a longer one is cut to this."""
_CAUSE_DEPTH = 8


class StepTimeout(TimeoutError):
    """A step ran past its deadline."""


def classify(exc: BaseException) -> Strategy:
    """The default strategy for an error: HTTP status, then type, then message."""
    found = _responding(exc)
    if found is not None:
        status = found[1]
        if status >= 500 or status in _RETRIED_CLIENT_STATUSES:
            return Strategy.RETRY_WITH_BACKOFF
        return Strategy.MANUAL_INTERVENTION
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
    http_status: int | None = None
    """The HTTP status the error carried, if any."""
    retry_after: float | None = None
    """Seconds the server asked to wait (``Retry-After``), if it said; the delay is no shorter."""


def decide(
    exc: BaseException,
    policy: Retry,
    attempt: int,
    timeout: float | None,
    rng: random.Random | None = None,
    *,
    now: dt.datetime | None = None,
) -> Decision:
    """Choose the strategy for ``exc`` after ``attempt`` attempts, with delay and next timeout.

    ``now`` (the time a ``Retry-After`` date is measured from) defaults to the wall clock.
    """
    strategy = policy.strategy or classify(exc)
    found = _responding(exc)
    status = None if found is None else found[1]
    if strategy == Strategy.MANUAL_INTERVENTION:
        reason = "needs a person"
        if status is not None and policy.strategy is None:
            reason = f"HTTP {status} needs a person: a retry would send the same request"
        return Decision(strategy, False, 0.0, timeout, reason, status)
    if attempt >= policy.max_attempts:
        return Decision(strategy, False, 0.0, timeout, f"{attempt} attempts exhausted", status)
    delay, next_timeout, reason = _planned(strategy, policy, attempt, timeout, rng)
    wait = None if found is None else _retry_after(found[0], now or dt.datetime.now(dt.UTC))
    if wait is not None and wait > delay:
        delay, reason = wait, f"{reason}, after the server's Retry-After of {wait:g}s"
    return Decision(strategy, True, delay, next_timeout, reason, status, wait)


def _planned(
    strategy: Strategy,
    policy: Retry,
    attempt: int,
    timeout: float | None,
    rng: random.Random | None,
) -> tuple[float, float | None, str]:
    """The policy's own delay, next timeout and reason for a retrying strategy."""
    if strategy == Strategy.RETRY_WITH_INCREASED_TIMEOUT:
        grown = (
            None if timeout is None else min(policy.max_timeout, timeout * policy.timeout_factor)
        )
        return 0.0, grown, "retry at once with a longer deadline"
    if strategy == Strategy.WAIT_AND_RETRY:
        return min(policy.wait_delay, policy.max_delay), timeout, "wait"
    base = min(policy.max_delay, policy.initial_delay * policy.backoff_factor ** (attempt - 1))
    jitter = (rng or random).uniform(0, policy.jitter) if policy.jitter else 0.0
    return min(policy.max_delay, base * (1 + jitter)), timeout, "backoff"


def _responding(exc: BaseException) -> tuple[BaseException, int] | None:
    """The first error along ``exc``'s explicit causes that carries an HTTP failure status."""
    for error in _causes(exc):
        response = _field(error, "response")
        for status in (
            _field(error, "status_code"),
            _field(response, "status_code"),
            _field(error, "status"),
        ):
            if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
                return error, status
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its ``__cause__`` chain, bounded and safe against cycles."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _CAUSE_DEPTH:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _field(obj: object, name: str) -> Any:
    """``obj.name``, or None when absent or when reading it fails (a property may raise)."""
    if obj is None:
        return None
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _retry_after(error: BaseException, now: dt.datetime) -> float | None:
    """Seconds the server asked to wait before the next request, or None if it did not say.

    Read from ``error.response.headers``, else ``error.headers``: ``retry-after-ms`` (sent by
    the OpenAI and Anthropic APIs), else ``Retry-After`` as seconds or an HTTP date (RFC 9110).
    A malformed or negative value is ignored, a past date is zero, and the result is capped at
    ``RETRY_AFTER_CAP``. Never raises.
    """
    try:
        headers = _field(_field(error, "response"), "headers") or _field(error, "headers")
        milliseconds = _number(_header(headers, "retry-after-ms"))
        if milliseconds is not None:
            return min(RETRY_AFTER_CAP, milliseconds / 1000)
        value = _header(headers, "retry-after")
        seconds = _number(value)
        if seconds is None:
            seconds = _until(value, now)
        return None if seconds is None else min(RETRY_AFTER_CAP, seconds)
    except Exception:
        # Headers come from any library in any shape; a header we cannot read is no header.
        return None


def _header(headers: Any, name: str) -> str | None:
    """A header's value by case-insensitive name, from any mapping-like object with ``items``."""
    if headers is None:
        return None
    for key, value in headers.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if str(key).lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def _number(text: str | None) -> float | None:
    """A non-negative, finite number of seconds, or None."""
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _until(text: str | None, now: dt.datetime) -> float | None:
    """Seconds from ``now`` until an HTTP date (zero once past), or None if it is no date."""
    if text is None:
        return None
    from email.utils import parsedate_to_datetime  # rarely needed; 10 ms of import

    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # HTTP dates are always GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())
