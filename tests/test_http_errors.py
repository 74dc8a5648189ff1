"""HTTP failures are classified by their status, and a retry waits for the server's Retry-After.

The errors below are small fakes with the shapes of the real clients' errors, so no client
library is needed: httpx ``HTTPStatusError`` and requests ``HTTPError`` (``response.status_code``,
``response.headers``), the OpenAI and Anthropic clients' ``APIStatusError`` (``status_code``
and ``response.headers``), aiohttp ``ClientResponseError`` (``status`` and ``headers``). The
first part checks ``classify`` and ``decide``; the last runs real steps on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import format_datetime
from typing import Any

import pytest

import tether
from tests.flavors import agent
from tether import Retry, Strategy
from tether.engine.retry import RETRY_AFTER_CAP, classify, decide
from tether.testing import active_agent
from tether.types import RunStatus

WORK = {"until_idle": True, "timeout": 20.0}
NOW = dt.datetime(2026, 5, 9, 12, 0, 0, tzinfo=dt.UTC)
POLICY = Retry(max_attempts=5, initial_delay=0.5, backoff_factor=2.0, max_delay=60.0, jitter=0)


class Headers(Mapping[str, str]):
    """Case-insensitive headers, as httpx.Headers and requests' CaseInsensitiveDict are."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self._values = {k.lower(): v for k, v in (values or {}).items()}

    def __getitem__(self, key: str) -> str:
        return self._values[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class Response:
    """The part of an httpx.Response or requests.Response that classification reads."""

    status_code: int
    headers: Headers = field(default_factory=Headers)


class HTTPStatusError(Exception):
    """Shaped like httpx.HTTPStatusError (and requests.HTTPError): the status is on the response."""

    def __init__(self, message: str, *, response: Response | None) -> None:
        super().__init__(message)
        self.response = response


class APIStatusError(Exception):
    """Shaped like openai.APIStatusError and anthropic.APIStatusError."""

    def __init__(self, message: str, *, response: Response) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code


class ClientResponseError(Exception):
    """Shaped like aiohttp.ClientResponseError: ``status`` and ``headers`` on the error."""

    def __init__(
        self, status: int, headers: Mapping[str, str] | None = None, message: str = "..."
    ) -> None:
        super().__init__(f"{status}, message={message!r}")
        self.status = status
        self.headers = headers


class ToolError(Exception):
    """A user's own error, wrapping the HTTP error it came from."""


def httpx_error(status: int, headers: dict[str, str] | None = None) -> HTTPStatusError:
    return HTTPStatusError(f"Error {status}", response=Response(status, Headers(headers)))


def openai_error(status: int, headers: dict[str, str] | None = None) -> APIStatusError:
    return APIStatusError(f"Error code: {status}", response=Response(status, Headers(headers)))


SHAPES = {
    "httpx": httpx_error,
    "openai": openai_error,
    "aiohttp": lambda status, headers=None: ClientResponseError(status, headers),
}


# -- classify: the status chooses the strategy ---------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("status", "strategy"),
    [
        (429, Strategy.RETRY_WITH_BACKOFF),
        (503, Strategy.RETRY_WITH_BACKOFF),
        (500, Strategy.RETRY_WITH_BACKOFF),
        (502, Strategy.RETRY_WITH_BACKOFF),
        (504, Strategy.RETRY_WITH_BACKOFF),
        (529, Strategy.RETRY_WITH_BACKOFF),
        (408, Strategy.RETRY_WITH_BACKOFF),
        (400, Strategy.MANUAL_INTERVENTION),
        (401, Strategy.MANUAL_INTERVENTION),
        (403, Strategy.MANUAL_INTERVENTION),
        (404, Strategy.MANUAL_INTERVENTION),
        (422, Strategy.MANUAL_INTERVENTION),
    ],
)
def test_classify_chooses_by_http_status(shape: str, status: int, strategy: Strategy) -> None:
    assert classify(SHAPES[shape](status)) == strategy


def test_a_requests_error_is_read_through_its_response() -> None:
    assert classify(HTTPStatusError("503 Server Error", response=Response(503))) == (
        Strategy.RETRY_WITH_BACKOFF
    )


def test_the_status_wins_over_a_message_that_says_timeout() -> None:
    error = openai_error(400)
    error.args = ("request timeout must be positive",)
    assert classify(error) == Strategy.MANUAL_INTERVENTION


@pytest.mark.parametrize(
    ("error", "strategy"),
    [
        (Exception("connection reset by peer"), Strategy.RETRY_WITH_BACKOFF),
        (Exception("operation timed out"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (Exception("something odd happened"), Strategy.MANUAL_INTERVENTION),
        (HTTPStatusError("connection reset", response=None), Strategy.RETRY_WITH_BACKOFF),
        (ClientResponseError(200, message="timed out"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (ClientResponseError(302, message="timed out"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
        (TimeoutError("slow"), Strategy.RETRY_WITH_INCREASED_TIMEOUT),
    ],
    ids=[
        "message-network",
        "message-timeout",
        "message-other",
        "no-response",
        "200",
        "302",
        "type",
    ],
)
def test_errors_without_a_failure_status_are_classified_as_before(
    error: BaseException, strategy: Strategy
) -> None:
    assert classify(error) == strategy


@pytest.mark.parametrize("odd", ["429", True, None, 429.0, 99, 600])
def test_a_status_that_is_not_an_http_failure_code_is_ignored(odd: object) -> None:
    error = ValueError("operation timed out")
    error.status_code = odd  # type: ignore[attr-defined]
    assert classify(error) == Strategy.RETRY_WITH_INCREASED_TIMEOUT


def test_an_explicit_cause_carries_its_status_but_an_implicit_context_does_not() -> None:
    try:
        try:
            raise httpx_error(503)
        except HTTPStatusError as exc:
            raise ToolError("search failed") from exc
    except ToolError as wrapped:
        assert classify(wrapped) == Strategy.RETRY_WITH_BACKOFF
    try:
        try:
            raise httpx_error(503)
        except HTTPStatusError:
            raise ToolError("the fallback parser broke")  # noqa: B904 - the point
    except ToolError as unrelated:
        assert classify(unrelated) == Strategy.MANUAL_INTERVENTION


def test_an_attribute_that_raises_does_not_break_classification() -> None:
    class Exploding(Exception):
        @property
        def response(self) -> Any:
            raise RuntimeError("no response was read")

    assert classify(Exploding("unexpected field")) == Strategy.MANUAL_INTERVENTION


# -- decide: Retry-After --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_a_429_waits_at_least_its_retry_after_seconds(shape: str) -> None:
    decision = decide(SHAPES[shape](429, {"Retry-After": "7"}), POLICY, 1, None, now=NOW)
    assert (decision.strategy, decision.retry, decision.delay) == (
        Strategy.RETRY_WITH_BACKOFF,
        True,
        7.0,
    )
    assert (decision.http_status, decision.retry_after) == (429, 7.0)
    assert "Retry-After" in decision.reason


def test_a_503_waits_until_its_retry_after_date() -> None:
    when = format_datetime(NOW + dt.timedelta(seconds=90), usegmt=True)
    decision = decide(httpx_error(503, {"retry-after": when}), POLICY, 1, None, now=NOW)
    assert (decision.delay, decision.retry_after) == (90.0, 90.0)


def test_a_retry_after_date_in_the_past_leaves_the_backoff_delay() -> None:
    when = format_datetime(NOW - dt.timedelta(seconds=30), usegmt=True)
    decision = decide(httpx_error(503, {"Retry-After": when}), POLICY, 2, None, now=NOW)
    assert (decision.delay, decision.retry_after) == (1.0, 0.0)


def test_a_backoff_longer_than_retry_after_is_kept() -> None:
    decision = decide(openai_error(429, {"retry-after": "1"}), POLICY, 4, None, now=NOW)
    assert decision.delay == 4.0


def test_retry_after_is_honoured_past_max_delay_up_to_one_day() -> None:
    long = decide(openai_error(429, {"retry-after": "120"}), POLICY, 1, None, now=NOW)
    assert long.delay == 120.0  # POLICY.max_delay is 60
    absurd = decide(openai_error(429, {"retry-after": "99999999"}), POLICY, 1, None, now=NOW)
    assert absurd.delay == RETRY_AFTER_CAP == 86400.0


def test_retry_after_ms_from_the_model_apis_is_preferred() -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "9"}
    decision = decide(openai_error(429, headers), POLICY, 1, None, now=NOW)
    assert decision.delay == 1.5


def test_other_5xx_back_off_and_honour_a_retry_after_they_send() -> None:
    plain = decide(httpx_error(502), POLICY, 1, None, now=NOW)
    told = decide(httpx_error(500, {"Retry-After": "3"}), POLICY, 1, None, now=NOW)
    assert (plain.strategy, plain.delay, plain.retry_after) == (
        Strategy.RETRY_WITH_BACKOFF,
        0.5,
        None,
    )
    assert told.delay == 3.0


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf", "", "Mon, 99 Foo 2026 25:61:00"])
def test_a_malformed_retry_after_is_ignored(value: str) -> None:
    decision = decide(httpx_error(429, {"Retry-After": value}), POLICY, 1, None, now=NOW)
    assert (decision.retry, decision.delay, decision.retry_after) == (True, 0.5, None)


def test_headers_that_cannot_be_read_are_ignored() -> None:
    class Broken(dict[str, str]):
        def items(self) -> Any:
            raise RuntimeError("decoding failed")

    error = ClientResponseError(429, Broken())
    decision = decide(error, POLICY, 1, None, now=NOW)
    assert (decision.retry, decision.delay, decision.retry_after) == (True, 0.5, None)


# -- decide: the policy still rules ---------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404])
def test_a_client_error_goes_to_a_person_and_says_why(status: int) -> None:
    decision = decide(openai_error(status), POLICY, 1, None, now=NOW)
    assert (decision.strategy, decision.retry, decision.http_status) == (
        Strategy.MANUAL_INTERVENTION,
        False,
        status,
    )
    assert f"HTTP {status}" in decision.reason


def test_a_forced_strategy_wins_over_the_status() -> None:
    manual = Retry(strategy=Strategy.MANUAL_INTERVENTION)
    assert not decide(httpx_error(503), manual, 1, None, now=NOW).retry
    backoff = Retry(strategy=Strategy.RETRY_WITH_BACKOFF, initial_delay=0.25, jitter=0)
    retried = decide(httpx_error(400), backoff, 1, None, now=NOW)
    assert (retried.retry, retried.delay) == (True, 0.25)


def test_a_forced_strategy_still_waits_for_retry_after() -> None:
    waiting = Retry(strategy=Strategy.WAIT_AND_RETRY, wait_delay=1.0)
    decision = decide(httpx_error(429, {"Retry-After": "10"}), waiting, 1, None, now=NOW)
    assert (decision.strategy, decision.delay) == (Strategy.WAIT_AND_RETRY, 10.0)


def test_max_attempts_still_ends_the_retries() -> None:
    error = httpx_error(429, {"Retry-After": "1"})
    policy = Retry(max_attempts=3, jitter=0)
    assert decide(error, policy, 2, None, now=NOW).retry
    last = decide(error, policy, 3, None, now=NOW)
    assert (last.retry, last.strategy, last.reason) == (
        False,
        Strategy.RETRY_WITH_BACKOFF,
        "3 attempts exhausted",
    )


# -- on real runs ---------------------------------------------------------------------------


def test_a_rate_limited_step_waits_for_retry_after_then_succeeds(
    app: tether.App, flavor: str
) -> None:
    calls = Counter[str]()

    def complete() -> str:
        calls["complete"] += 1
        if calls["complete"] == 1:
            raise openai_error(429, {"retry-after": "0.2"})
        return "answer"

    @agent(app, flavor, "chatty")
    def handle(ctx: Any, task: Any) -> Any:
        return (yield ctx.step(complete, retry=Retry(initial_delay=0.01, jitter=0)))

    active_agent(app, "chatty", "c1")
    run = app.submit("c1")
    app.work(**WORK)

    assert run.result(timeout=1) == "answer"
    assert calls["complete"] == 2
    [plan] = [e.data for e in app.events(run_id=run.run_id, types=["step.retry_scheduled"])]
    assert plan["strategy"] == "retry_with_backoff"
    assert plan["delay"] >= 0.2 and plan["retry_after"] == 0.2
    [failed] = [e.data for e in app.events(run_id=run.run_id, types=["step.failed"])]
    assert failed["http_status"] == 429


def test_a_not_found_step_becomes_an_incident_at_once(app: tether.App, flavor: str) -> None:
    calls = Counter[str]()

    def lookup() -> None:
        calls["lookup"] += 1
        raise httpx_error(404)

    @agent(app, flavor, "seeker")
    def handle(ctx: Any, task: Any) -> Any:
        yield ctx.step(lookup, retry=Retry(max_attempts=5, initial_delay=0.01))

    active_agent(app, "seeker", "s1")
    run = app.submit("s1")
    app.work(**WORK)

    assert app.get_run(run.run_id).status == RunStatus.NEEDS_ATTENTION
    assert calls["lookup"] == 1
    [incident] = app.incidents(status="open", run_id=run.run_id)
    assert incident.error["strategy"] == "manual_intervention"
    assert "HTTP 404" in incident.error["reason"]
