"""New approval requests are announced, on both databases: the app's ``on_approval`` callback
and a signed webhook hear of each pending approval once it is asked for, a failing one is
tried again until it takes it, and only then is the approval marked announced. Runs never wait
for an announcement. A webhook needs an http(s) URL and a secret, and the secret never shows.

How "no repeat" is told without timing anything: once the announced approvals are marked (none
is left unannounced), the test asks for one more approval (a sentinel) and waits until it is
heard. The announcer finds the sentinel in a look made after the marks, and it announces
oldest first, so a repeat of an earlier approval would have been heard before the sentinel.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.announce import SECRET_ENV
from tether.testing import active_agent, background_worker

SECRET = "wh-s3cr3t-Et9q"
QUERY_TOKEN = "q-t0ken-Zx81"
WITHIN = 30.0
"""Seconds a test waits for what should happen before it fails."""


def eventually(what: str, condition: Callable[[], bool], within: float = WITHIN) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` if it has not within ``within``."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        time.sleep(0.01)


class Heard:
    """An ``on_approval`` callback recording what it is called with; it raises while
    ``failures`` is above zero (counting down) and blocks while ``gate`` is closed."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tether.ApprovalInfo] = []
        self.failures = failures
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, info: tether.ApprovalInfo) -> None:
        self.calls.append(info)
        self.gate.wait(WITHIN)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("inbox unavailable")

    def ids(self) -> list[str]:
        return [info.approval_id for info in self.calls]

    def wait_for(self, count: int) -> list[tether.ApprovalInfo]:
        eventually(f"call {count} of on_approval", lambda: len(self.calls) >= count)
        return list(self.calls)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def approval_id(self) -> str:
        return str(json.loads(self.body)["approval"]["approval_id"])


class Receiver:
    """A webhook receiver on 127.0.0.1: answers its ``answers`` in turn (then 200) and
    records every request."""

    def __init__(self, answers: tuple[int, ...] = ()) -> None:
        self.answers = list(answers)
        self.requests: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append(Received(self.path, dict(self.headers), body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def ids(self) -> list[str]:
        return [request.approval_id() for request in self.requests]

    def wait_for(self, count: int) -> list[Received]:
        eventually(f"webhook request {count}", lambda: len(self.requests) >= count)
        return list(self.requests)


@contextmanager
def receiving(answers: tuple[int, ...] = ()) -> Iterator[Receiver]:
    receiver = Receiver(answers)
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(WITHIN)


@contextmanager
def announcing(db_url: str, **announce: Any) -> Iterator[tether.App]:
    """An app announcing approvals as ``announce`` says, with two active agents of type
    ``asker`` (``desk``, and ``other`` for sentinels), closed afterwards."""
    app = tether.App(db_url, **announce)

    @app.agent("asker")
    def asker(ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
        decision = ctx.approve("Publish?", {"title": task["title"]})
        if not task.get("then_ask"):
            return {"approved": decision.approved}
        channel = ctx.ask("Which channel?", {"type": "string"})
        return {"approved": decision.approved, "channel": channel}

    active_agent(app, "asker", "desk")
    active_agent(app, "asker", "other")
    try:
        yield app
    finally:
        app.close()


def all_announced(app: tether.App) -> Callable[[], bool]:
    return lambda: not app.store.unannounced_approvals()


def pending_id(app: tether.App, run: tether.RunHandle) -> str:
    eventually("the run asking", lambda: bool(app.approvals(run_id=run.run_id, status="pending")))
    [pending] = app.approvals(run_id=run.run_id, status="pending")
    return pending.approval_id


def sentinel(app: tether.App) -> str:
    """Once everything asked so far is marked announced, ask once more; the sentinel's id."""
    eventually("every approval marked announced", all_announced(app))
    return pending_id(app, app.submit("other", {"title": "sentinel"}))


def test_a_callback_hears_of_each_new_request_once(db_url: str) -> None:
    heard = Heard()
    with announcing(db_url, on_approval=heard) as app, background_worker(app):
        run = app.submit("desk", {"title": "Q3 report", "then_ask": True})
        [first] = heard.wait_for(1)
        eventually("the approval marked announced", all_announced(app))
        app.decide(first.approval_id, True)
        second = heard.wait_for(2)[1]
        last = sentinel(app)
        heard.wait_for(3)

    assert (first.run_id, first.kind, first.title, first.status) == (
        run.run_id,
        "approve",
        "Publish?",
        "pending",
    )
    assert first.data == {"title": "Q3 report"}
    assert (second.run_id, second.kind, second.title) == (run.run_id, "ask", "Which channel?")
    assert heard.ids() == [first.approval_id, second.approval_id, last]


def test_a_callback_that_raises_is_tried_again_until_it_takes_the_request(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    heard = Heard(failures=1)
    with announcing(db_url, on_approval=heard) as app, background_worker(app):
        asked = pending_id(app, app.submit("desk", {"title": "Q3 report"}))
        heard.wait_for(2)
        last = sentinel(app)
        heard.wait_for(3)

    assert heard.ids() == [asked, asked, last]
    [warning] = [r for r in caplog.records if r.name == "tether.announce"]
    assert warning.levelno == logging.WARNING
    assert asked in warning.getMessage()
    assert "RuntimeError: inbox unavailable" in warning.getMessage()


def test_a_callback_that_hangs_holds_up_no_run(db_url: str) -> None:
    heard = Heard()
    heard.gate.clear()
    with announcing(db_url, on_approval=heard) as app, background_worker(app):
        run = app.submit("desk", {"title": "Q3 report"})
        [info] = heard.wait_for(1)
        try:
            app.decide(info.approval_id, True)
            assert run.result(timeout=WITHIN) == {"approved": True}
            assert not heard.gate.is_set()  # the callback was still busy meanwhile
        finally:
            heard.gate.set()


def test_a_webhook_receives_each_request_signed_with_the_secret(db_url: str) -> None:
    with (
        receiving() as receiver,
        announcing(
            db_url, approval_webhook=f"{receiver.url}/hooks/tether", webhook_secret=SECRET
        ) as app,
        background_worker(app),
    ):
        run = app.submit("desk", {"title": "Q3 report"})
        [request] = receiver.wait_for(1)
        eventually("the approval marked announced", all_announced(app))
        [pending] = app.approvals(run_id=run.run_id)

    assert request.path == "/hooks/tether"
    assert request.headers["Content-Type"] == "application/json"
    timestamp = request.headers["X-Tether-Timestamp"]
    assert timestamp.isdigit()
    signed = f"{timestamp}.".encode() + request.body
    expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-Tether-Signature"], expected)
    doc = json.loads(request.body)
    assert doc["type"] == "approval.requested"
    assert doc["approval"] == pending.to_dict()
    assert doc["approval"]["data"] == {"title": "Q3 report"}


def test_a_webhook_answering_500_is_tried_again_until_it_answers_200(db_url: str) -> None:
    with (
        receiving(answers=(500,)) as receiver,
        announcing(db_url, approval_webhook=receiver.url, webhook_secret=SECRET) as app,
        background_worker(app),
    ):
        asked = pending_id(app, app.submit("desk", {"title": "Q3 report"}))
        receiver.wait_for(2)
        last = sentinel(app)
        receiver.wait_for(3)

    assert receiver.ids() == [asked, asked, last]


def test_the_secret_and_the_webhook_query_never_show(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with (
        receiving(answers=(500,)) as receiver,
        announcing(
            db_url,
            approval_webhook=f"{receiver.url}/hook?token={QUERY_TOKEN}",
            webhook_secret=SECRET,
        ) as app,
        background_worker(app),
    ):
        app.submit("desk", {"title": "Q3 report"})
        receiver.wait_for(2)
        eventually("the approval marked announced", all_announced(app))
        shown = [repr(app), repr(app.announcements), str(vars(app))]

    assert receiver.requests[0].path == f"/hook?token={QUERY_TOKEN}"
    warnings = [r.getMessage() for r in caplog.records if r.name == "tether.announce"]
    assert warnings and f"webhook {receiver.url}/hook answered HTTP 500" in warnings[0]
    assert SECRET not in caplog.text and QUERY_TOKEN not in caplog.text
    assert all(SECRET not in text for text in shown)


def test_stopping_the_worker_stops_its_announcer(db_url: str) -> None:
    def announcers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "tether-announce"]

    before = announcers()
    with announcing(db_url, on_approval=Heard()) as app, background_worker(app):
        eventually("the announcer starting", lambda: len(announcers()) > len(before))

    assert announcers() == before


def test_a_webhook_without_a_secret_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)

    with pytest.raises(tether.ConfigurationError, match=f"webhook_secret=... or set {SECRET_ENV}"):
        tether.App(f"sqlite:///{tmp_path / 't.db'}", approval_webhook="https://example.com/hook")


def test_the_secret_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)

    app = tether.App(f"sqlite:///{tmp_path / 't.db'}", approval_webhook="https://example.com/h")

    assert app.announcements is not None and app.announcements.webhook is not None
    assert app.announcements.webhook.secret == SECRET


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/hook",
        "example.com/hook",
        "https://",
        "https:///hook",
        "https://example.com:port/hook",
        "https://exa mple.com/hook",
        "https://user:password@example.com/hook",
    ],
)
def test_a_webhook_url_that_is_not_http_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(tether.ConfigurationError, match="approval_webhook") as refused:
        tether.App(
            f"sqlite:///{tmp_path / 't.db'}",
            approval_webhook=f"{url}?token={QUERY_TOKEN}",
            webhook_secret=SECRET,
        )

    assert QUERY_TOKEN not in str(refused.value) and SECRET not in str(refused.value)


def test_an_async_callback_is_refused(tmp_path: Path) -> None:
    async def on_approval(info: tether.ApprovalInfo) -> None:
        pass

    with pytest.raises(tether.ConfigurationError, match="on_approval must be a plain function"):
        tether.App(f"sqlite:///{tmp_path / 't.db'}", on_approval=on_approval)
