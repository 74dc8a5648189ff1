"""Announcing new approval requests: the app's ``on_approval`` callback and a signed webhook.

A worker of an app configured with either (``App(on_approval=..., approval_webhook=...)``)
runs one ``Announcer`` on a thread of its own. Every second it reads the pending approvals
not yet announced, oldest first, hands each to the callback and POSTs it to the webhook, and
marks it announced once every configured channel took it. A channel that fails (the callback
raises, the webhook does not answer 2xx) is logged and tried again for that approval after
1 s, 2 s, 4 s ... up to 60 s; a channel that already took it is not called again meanwhile.
Runs never wait for any of this: the request is durable in the run's own write, and the
announcer only reads it afterwards.

Delivery is at least once, never exactly once: a crash between a delivery and its mark, or
two workers announcing the same approval at the same moment, delivers it again. Receivers
dedupe by ``approval_id``.

The webhook request::

    POST <approval_webhook>
    Content-Type: application/json
    X-Tether-Timestamp: <unix seconds>
    X-Tether-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with the secret>

    {"type": "approval.requested", "approval": {...ApprovalInfo.to_dict()...}}

A receiver recomputes the signature over the raw body, compares it in constant time
(``hmac.compare_digest``) and refuses timestamps far from its own clock (replays).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tether.errors import ConfigurationError
from tether.types import ApprovalInfo

if TYPE_CHECKING:
    import urllib.request

    from tether.store import Store

log = logging.getLogger("tether.announce")

SECRET_ENV = "TETHER_WEBHOOK_SECRET"  # noqa: S105 (the variable's name, not its value)
EVENT_TYPE = "approval.requested"
WEBHOOK_TIMEOUT = 5.0
"""Seconds a webhook request may take before it counts as failed."""
FIRST_RETRY = 1.0
LAST_RETRY = 60.0
"""The longest wait between two attempts to announce one approval on a failing channel."""
BATCH = 50


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``<timestamp>.<body>`` keyed with ``secret``."""
    message = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Webhook:
    """Where approval requests are POSTed, and the secret that signs them."""

    url: str
    """An http:// or https:// URL."""
    secret: str = field(repr=False)
    """Never shown: not in repr, logs or errors."""

    @property
    def display(self) -> str:
        """The URL as logs and errors show it: no query or fragment (they may hold tokens)."""
        return _display(self.url)

    def post(self, info: ApprovalInfo) -> None:
        """Send one approval request; raises ``WebhookFailed`` unless it is answered 2xx."""
        import urllib.error
        import urllib.request

        body = json.dumps({"type": EVENT_TYPE, "approval": info.to_dict()}).encode()
        timestamp = str(int(time.time()))
        request = urllib.request.Request(  # noqa: S310 (webhook() allows only http and https)
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-Tether-Timestamp": timestamp,
                "X-Tether-Signature": signature(self.secret, timestamp, body),
            },
        )
        try:
            with _opener().open(request, timeout=WEBHOOK_TIMEOUT) as response:
                status = response.status
                response.read()
        except urllib.error.HTTPError as exc:
            raise WebhookFailed(f"answered HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            raise WebhookFailed(self._redact(str(exc.reason))) from None
        except Exception as exc:  # timeouts, resets, bad answers
            raise WebhookFailed(self._redact(f"{type(exc).__name__}: {exc}")) from None
        if not 200 <= status < 300:
            raise WebhookFailed(f"answered HTTP {status}")

    def _redact(self, text: str) -> str:
        return text.replace(self.url, self.display).replace(self.secret, "***")


class WebhookFailed(Exception):
    """The webhook did not take a request; the message is safe to log."""


@functools.cache
def _opener() -> urllib.request.OpenerDirector:
    """An opener that follows no redirect: urllib would turn a redirected POST into a GET
    without the body and take its 200 for a delivery."""
    import urllib.request

    class RefuseRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None  # urllib then raises HTTPError with the 3xx code

    return urllib.request.build_opener(RefuseRedirects)


def _display(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or not parts.netloc:
        return url.partition("?")[0].partition("#")[0]
    return f"{parts.scheme}://{host}{port}{parts.path}"


def webhook(url: Any, secret: Any) -> Webhook:
    """The webhook ``App(approval_webhook=url, webhook_secret=secret)`` configures, checked;
    ``secret`` defaults to ``$TETHER_WEBHOOK_SECRET``. Raises ``ConfigurationError``."""
    shown = _display(url) if isinstance(url, str) else type(url).__name__
    if not isinstance(url, str) or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ConfigurationError(
            f"approval_webhook must be an http:// or https:// URL, got {shown!r}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
    except ValueError:
        raise ConfigurationError(
            f"approval_webhook {shown!r} is not a valid URL (check the host and port)"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"approval_webhook must be an http:// or https:// URL with a host, got {shown!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            f"approval_webhook {shown!r} must not carry user:password@; requests are "
            "authenticated by their signature (webhook_secret)"
        )
    if secret is None:
        secret = os.environ.get(SECRET_ENV)
    if not secret or not isinstance(secret, str):
        raise ConfigurationError(
            f"approval_webhook {shown!r} needs a secret to sign its requests: pass "
            f"webhook_secret=... or set {SECRET_ENV} (for example to the output of: "
            "python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return Webhook(url, secret)


@dataclass(frozen=True)
class Announcements:
    """Where an app announces new approval requests: its callback, its webhook, or both."""

    on_approval: Callable[[ApprovalInfo], object] | None = None
    """Called with each new pending approval, on the announcer's thread."""
    webhook: Webhook | None = None
    """POSTed each new pending approval, signed."""

    @classmethod
    def configure(
        cls, on_approval: Any, approval_webhook: Any, webhook_secret: Any
    ) -> Announcements | None:
        """The announcements of ``App(...)``'s arguments, checked; None when none are set.
        Raises ``ConfigurationError``."""
        if on_approval is not None and (
            not callable(on_approval) or inspect.iscoroutinefunction(on_approval)
        ):
            raise ConfigurationError(
                f"on_approval must be a plain function taking an ApprovalInfo (it is called "
                f"on the announcer's thread; an async function would never run), got "
                f"{on_approval!r}"
            )
        if approval_webhook is None and webhook_secret is not None:
            raise ConfigurationError(
                "webhook_secret is set but approval_webhook is not: pass the URL to POST "
                "approval requests to as approval_webhook=..."
            )
        hook = None if approval_webhook is None else webhook(approval_webhook, webhook_secret)
        if on_approval is None and hook is None:
            return None
        return cls(on_approval, hook)


class Announcer:
    """Announces new pending approvals on a daemon thread, until stopped.

    Args:
        store: the database.
        announcements: the callback and/or webhook to announce to.
        interval: seconds between looks for new approvals (``wake`` looks at once).
    """

    def __init__(self, store: Store, announcements: Announcements, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._channels: dict[str, Callable[[ApprovalInfo], object]] = {}
        if announcements.on_approval is not None:
            self._channels["on_approval"] = announcements.on_approval
        if announcements.webhook is not None:
            self._channels[f"webhook {announcements.webhook.display}"] = announcements.webhook.post
        self._delivered: dict[str, set[str]] = {}  # approval id -> channels that took it
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}  # approval id -> monotonic time
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tether-announce", daemon=True)

    def start(self) -> None:
        """Start announcing (a first look right away)."""
        self._thread.start()

    def wake(self) -> None:
        """Look for new approvals now."""
        self._wakeup.set()

    def stop(self, wait: float = WEBHOOK_TIMEOUT) -> None:
        """Stop, waiting up to ``wait`` seconds for a delivery under way to end (a callback
        that hangs is left to its daemon thread)."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            try:
                self.announce_due()
            except Exception as exc:  # the database is away: look again next time
                log.warning("could not look for approvals to announce: %s", exc)
            self._wakeup.wait(self.interval)

    def announce_due(self) -> int:
        """Announce each unannounced pending approval not waiting for a retry; returns how
        many were marked announced."""
        # Those waiting for a retry must not hide newer approvals from this look.
        found = self.store.unannounced_approvals(limit=BATCH + len(self._retry_at))
        listed = {info.approval_id for info in found}
        for approval_id in set(self._delivered) | set(self._retry_at):
            if approval_id not in listed:  # decided, or announced by another worker
                self._forget(approval_id)
        marked = 0
        for info in found:
            if self._stopping.is_set():
                break
            if self._retry_at.get(info.approval_id, 0.0) > time.monotonic():
                continue
            if self._deliver(info):
                # Marked one by one: a crash re-sends as few approvals as it can.
                self.store.mark_announced([info.approval_id])
                self._forget(info.approval_id)
                marked += 1
        return marked

    def _deliver(self, info: ApprovalInfo) -> bool:
        """Hand ``info`` to each channel that has not taken it; True once all have."""
        delivered = self._delivered.setdefault(info.approval_id, set())
        failed: list[str] = []
        for name, channel in self._channels.items():
            if name in delivered:
                continue
            try:
                channel(info)
            except WebhookFailed as exc:
                failed.append(f"{name} {exc}")
            except Exception as exc:
                failed.append(f"{name} raised {type(exc).__name__}: {exc}")
            else:
                delivered.add(name)
        if not failed:
            return True
        failures = self._failures.get(info.approval_id, 0) + 1
        delay = min(LAST_RETRY, FIRST_RETRY * 2 ** (failures - 1))
        self._failures[info.approval_id] = failures
        self._retry_at[info.approval_id] = time.monotonic() + delay
        log.warning(
            "could not announce approval %s (attempt %d): %s; trying again in %gs",
            info.approval_id,
            failures,
            "; ".join(failed),
            delay,
        )
        return False

    def _forget(self, approval_id: str) -> None:
        self._delivered.pop(approval_id, None)
        self._failures.pop(approval_id, None)
        self._retry_at.pop(approval_id, None)
