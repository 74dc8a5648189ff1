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
    """A time-ordered random id such as ``run_01m8b5k2m9q7x3c1``: sortable, unguessable enough.

    16 base32 characters: 42 bits of milliseconds (good until 2109), then 38 random bits, so
    ids made later sort later and index inserts stay local. Ids are short on purpose: a run id
    is stored with every step and event.
    """
    millis = int(time.time() * 1000) & ((1 << 42) - 1)
    value = (millis << 38) | (int.from_bytes(os.urandom(5), "big") >> 2)
    chars = []
    for _ in range(16):
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
