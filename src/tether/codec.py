"""JSON in and out. tether stores state, inputs, outputs and events as JSON, and nothing else.

``to_jsonable`` turns the values users hand us into plain JSON types: pydantic models,
dataclasses, datetimes, dates, times, UUIDs, enums, decimals, sets and tuples are encoded;
anything else is refused with a ``SerializationError`` naming the path of the bad value, for
example ``state.tools[2]: object of type socket is not JSON-serializable``. Values that
one of the two databases could not store are refused the same way on both: text with a NUL
character or a lone surrogate, and integers too long to be written as text.
``check_text`` applies the same rules to free-text fields (names, reasons, comments, actors).
Decoding never revives objects: what comes back is dicts, lists, strings, numbers, booleans
and None. Nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sys
import uuid
from decimal import Decimal
from enum import Enum
from typing import Any

from tether.errors import ConfigurationError, SerializationError

MAX_DEPTH = 64
"""Deeper documents are refused: they are almost always a mistake, and recursion is finite."""

DEFAULT_MAX_BYTES = 2 * 1024 * 1024
"""Largest encoded document accepted by default (inputs, outputs, state, payloads)."""

MAX_TEXT_LENGTH = 10_000
"""Longest free-text field accepted by default (a reason, a comment)."""

# PostgreSQL cannot hold U+0000 in text or jsonb, and a lone surrogate (half of a UTF-16 pair,
# usually from bytes decoded with errors="surrogateescape") is not UTF-8 at all: refusing
# both everywhere keeps the two databases alike.
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
_SMALL_INT_BITS = 2000
"""Integers this short always convert to text: 2**2000 has 603 digits, and Python's limit
(``sys.get_int_max_str_digits``) is at least 640 digits when set at all."""


def _storable(text: str) -> bool:
    """True when ``text`` has no NUL and no lone surrogate (``isascii`` is O(1): quick)."""
    return "\x00" not in text if text.isascii() else _BAD_CHARACTER.search(text) is None


def _bad_character(text: str) -> str:
    """Say what makes ``text`` unstorable (call it only when ``_storable`` said so)."""
    found = _BAD_CHARACTER.search(text)
    assert found is not None
    index = found.start()
    char = text[index]
    if char == "\x00":
        return (
            f"contains a NUL character (U+0000) at index {index}, which PostgreSQL cannot store "
            "(tether refuses it on every database); remove it"
        )
    return (
        f"contains a lone surrogate (U+{ord(char):04X}) at index {index}, which is not valid "
        "Unicode (it usually comes from bytes decoded with errors='surrogateescape'); decode "
        "the bytes with errors='replace' or remove it"
    )


def _check_int(value: int, path: str) -> None:
    if value.bit_length() <= _SMALL_INT_BITS:
        return
    try:
        str(value)
    except ValueError:
        digits = int(value.bit_length() * math.log10(2)) + 1
        raise SerializationError(
            f"{path}: an integer of about {digits} digits is over Python's limit of "
            f"{sys.get_int_max_str_digits()} digits for writing it as text; store it as a string"
        ) from None


def check_text(field: str, value: str, max_length: int = MAX_TEXT_LENGTH) -> str:
    """Return ``value`` if both databases can store it as the free-text field ``field``.

    Names, reasons, comments and actors are plain text: not a string, a NUL character, a lone
    surrogate or more than ``max_length`` characters is refused with a ``ConfigurationError``
    naming the field, for example ``reason: contains a NUL character (U+0000) at index 3``.
    """
    if not isinstance(value, str):
        raise ConfigurationError(f"{field}: must be a string, not {type(value).__name__}")
    if len(value) > max_length:
        raise ConfigurationError(
            f"{field}: {len(value)} characters is over the limit of {max_length}; shorten it"
        )
    if not _storable(value):
        raise ConfigurationError(f"{field}: {_bad_character(value)}")
    return value


def to_jsonable(value: Any, path: str = "value", _depth: int = 0) -> Any:
    """Return ``value`` as plain JSON types, or raise ``SerializationError`` naming the path."""
    if _depth > MAX_DEPTH:
        raise SerializationError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        _check_int(value, path)
        return value
    if isinstance(value, str):
        if (value.isascii() and "\x00" not in value) or _storable(value):
            return value  # the ASCII test inline: this runs for every string of every output
        raise SerializationError(f"{path}: {_bad_character(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SerializationError(f"{path}: {value} is not valid JSON; use null or a string")
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, Enum):
                key = key.value
            if not isinstance(key, str):
                raise SerializationError(
                    f"{path}: key {key!r} of type {type(key).__name__} is not a string; "
                    "JSON object keys must be strings"
                )
            if not ((key.isascii() and "\x00" not in key) or _storable(key)):
                raise SerializationError(f"{path}: key {key!r} {_bad_character(key)}")
            out[key] = to_jsonable(item, f"{path}.{key}", _depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(item, f"{path}[{i}]", _depth + 1) for i, item in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(item, f"{path}[{i}]", _depth + 1) for i, item in enumerate(value)]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, Enum):
        return to_jsonable(value.value, path, _depth + 1)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return str(value)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and hasattr(type(value), "model_fields"):
        try:
            dumped = model_dump(mode="json")
        except (ValueError, TypeError) as exc:  # pydantic's own serialization error
            raise SerializationError(
                f"{path}: {type(value).__name__} is not JSON-serializable ({exc}); store plain "
                "data in its fields"
            ) from None
        return to_jsonable(dumped, path, _depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return to_jsonable(fields, path, _depth + 1)
    raise SerializationError(
        f"{path}: object of type {type(value).__name__} is not JSON-serializable; store plain "
        "data (dict, list, str, number, bool, None, or a pydantic model / dataclass of them)"
    )


def dumps(value: Any, path: str = "value", max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Encode ``value`` as compact JSON text, refusing values that are not JSON or too large."""
    text = json.dumps(to_jsonable(value, path), separators=(",", ":"), ensure_ascii=False)
    if max_bytes is not None and len(text) > max_bytes // 4 and len(text.encode()) > max_bytes:
        raise SerializationError(
            f"{path}: {len(text.encode())} bytes is over the {max_bytes}-byte limit; store large "
            "data elsewhere and keep a reference to it"
        )
    return text


def loads(text: str | bytes, path: str = "value") -> Any:
    """Decode JSON text into plain values; a malformed document is a ``SerializationError``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise SerializationError(f"{path}: not valid JSON ({exc})") from None


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which dumps refuses.
    raise ValueError(f"{name} is not valid JSON")


def check(value: Any, path: str = "value", max_bytes: int | None = DEFAULT_MAX_BYTES) -> Any:
    """Return the plain-JSON form of ``value`` after checking it encodes within ``max_bytes``."""
    if value is None or type(value) is bool:
        return value  # the common step output, and nothing to check
    if type(value) is int and value.bit_length() <= _SMALL_INT_BITS:
        return value
    plain = to_jsonable(value, path)
    if max_bytes is not None:
        size = len(json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode())
        if size > max_bytes:
            raise SerializationError(
                f"{path}: {size} bytes is over the {max_bytes}-byte limit; store large data "
                "elsewhere and keep a reference to it"
            )
    return plain


def canonical(value: Any) -> str:
    """The canonical JSON text of a plain-JSON value: keys sorted, no spaces, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``value``: what an approval is bound to."""
    import hashlib

    return hashlib.sha256(canonical(value).encode()).hexdigest()


def approval_id(run_id: str, seq: int) -> str:
    """The id of the approval a run asks for at journal position ``seq``: derived from both,
    so each occurrence (in a loop too) has its own, and a replay names the same one."""
    import hashlib

    return "apr_" + hashlib.sha256(f"{run_id}:{seq}".encode()).hexdigest()[:20]
