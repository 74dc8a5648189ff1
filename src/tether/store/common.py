"""Small helpers every query module shares: ids, clock, row conversion, event appends."""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection

from tether.store.schema import events

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase


def new_id(prefix: str) -> str:
    """A time-ordered random id such as ``run_0h8v4k2m9q7x3c1d``: sortable, unguessable enough.

    48 bits of milliseconds then 50 random bits, so ids created later sort later and
    index inserts stay local.
    """
    value = (int(time.time() * 1000) << 50) | int.from_bytes(os.urandom(7), "big") >> 6
    chars = []
    for _ in range(20):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return f"{prefix}_{''.join(reversed(chars))}"


def utcnow() -> dt.datetime:
    """The current time, UTC, timezone-aware."""
    return dt.datetime.now(dt.UTC)


def append_event(
    conn: Connection,
    type_: str,
    *,
    run_id: str | None = None,
    agent_id: str | None = None,
    data: dict[str, Any] | None = None,
    at: dt.datetime | None = None,
) -> None:
    """Append one event in the caller's transaction."""
    conn.execute(
        insert(events),
        {"run_id": run_id, "agent_id": agent_id, "type": type_, "data": data, "at": at or utcnow()},
    )
