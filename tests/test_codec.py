"""JSON in and out: what is encoded, what is refused (with the path), and that nothing unpickles."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import enum
import math
import socket
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

import tether
from tether import codec
from tether.errors import SerializationError


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1


class Address(BaseModel):
    city: str
    since: dt.datetime


class Person(BaseModel):
    id: uuid.UUID
    name: str
    address: Address
    tags: set[str]


class Holder(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: object


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: Color


@dataclasses.dataclass
class Shape:
    points: list[Point]
    owner: Address


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    s = socket.socket()
    try:
        yield s
    finally:
        s.close()


# -- encoded ----------------------------------------------------------------------------------


def test_plain_json_values_pass_through_unchanged() -> None:
    value = {"s": "é", "i": 1, "f": 1.5, "b": True, "n": None, "l": [1, "two"], "d": {"k": []}}
    assert codec.to_jsonable(value) == value
    assert codec.loads(codec.dumps(value)) == value


def test_pydantic_model_is_encoded_as_its_json_form() -> None:
    pid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    since = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    person = Person(id=pid, name="Ada", address=Address(city="London", since=since), tags={"x"})
    assert codec.to_jsonable(person) == {
        "id": str(pid),
        "name": "Ada",
        "address": {"city": "London", "since": "2024-05-01T12:00:00Z"},
        "tags": ["x"],
    }


def test_dataclass_is_encoded_field_by_field_including_nested_models_and_enums() -> None:
    since = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    shape = Shape(points=[Point(1, 2, Color.RED)], owner=Address(city="Paris", since=since))
    assert codec.to_jsonable(shape) == {
        "points": [{"x": 1, "y": 2, "label": "red"}],
        "owner": {"city": "Paris", "since": "2024-05-01T00:00:00Z"},
    }


def test_aware_datetime_is_encoded_as_iso_8601_with_its_offset() -> None:
    value = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    encoded = codec.to_jsonable(value)
    assert encoded == "2024-01-02T03:04:05+02:00"
    assert dt.datetime.fromisoformat(encoded) == value


def test_naive_datetime_is_treated_as_utc() -> None:
    assert codec.to_jsonable(dt.datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05+00:00"


def test_dates_times_and_timedeltas_are_encoded() -> None:
    assert codec.to_jsonable(dt.date(2024, 2, 29)) == "2024-02-29"
    assert codec.to_jsonable(dt.time(23, 59, 1)) == "23:59:01"
    assert codec.to_jsonable(dt.timedelta(minutes=1, milliseconds=500)) == 60.5


def test_uuid_is_encoded_as_its_canonical_string() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert codec.to_jsonable(value) == "12345678-1234-5678-1234-567812345678"


def test_enums_are_encoded_by_value_also_as_keys() -> None:
    assert codec.to_jsonable([Color.BLUE, Level.LOW]) == ["blue", 1]
    assert codec.to_jsonable({Color.RED: 1}) == {"red": 1}


def test_decimal_is_encoded_as_an_exact_string() -> None:
    assert codec.to_jsonable(Decimal("0.1000000000000000000001")) == "0.1000000000000000000001"


def test_sets_are_encoded_as_sorted_lists() -> None:
    assert codec.to_jsonable({3, 1, 2}) == [1, 2, 3]
    assert codec.to_jsonable(frozenset({"b", "a"})) == ["a", "b"]


def test_sets_of_mixed_or_composite_items_get_one_deterministic_order() -> None:
    assert codec.dumps({"b", 1, "a"}) == '["a","b",1]'
    assert codec.dumps({(2, "b"), (1, "a")}) == '[[1,"a"],[2,"b"]]'


def test_tuples_are_encoded_as_lists() -> None:
    assert codec.to_jsonable((1, (2, 3))) == [1, [2, 3]]


def test_dumps_is_compact_and_keeps_non_ascii_text() -> None:
    assert codec.dumps({"a": [1, 2], "b": "héllo"}) == '{"a":[1,2],"b":"héllo"}'


def test_check_returns_the_plain_form() -> None:
    assert codec.check({"when": dt.date(2024, 1, 1)}) == {"when": "2024-01-01"}


# -- refused ----------------------------------------------------------------------------------


def test_socket_nested_in_a_list_is_refused_with_its_path(sock: socket.socket) -> None:
    with pytest.raises(
        SerializationError, match=r"^state\.tools\[2\]: object of type socket is not JSON"
    ):
        codec.to_jsonable({"tools": ["a", "b", sock]}, "state")


@pytest.mark.parametrize(
    "thing", [object(), b"bytes", print, lambda: 1, complex(1, 2), Path("/tmp"), Exception("x")]
)
def test_arbitrary_objects_are_refused_with_their_type(thing: object) -> None:
    with pytest.raises(SerializationError) as caught:
        codec.dumps({"a": {"b": [thing]}}, "value")
    assert str(caught.value).startswith(f"value.a.b[0]: object of type {type(thing).__name__} ")


def test_arbitrary_object_inside_a_dataclass_is_refused_with_the_field_path(
    sock: socket.socket,
) -> None:
    @dataclasses.dataclass
    class Box:
        content: object

    with pytest.raises(SerializationError, match=r"^state\.box\.content: object of type socket"):
        codec.to_jsonable({"box": Box(sock)}, "state")


def test_arbitrary_object_inside_a_pydantic_model_is_refused_as_a_serialization_error(
    sock: socket.socket,
) -> None:
    with pytest.raises(SerializationError, match=r"^state\.h: Holder is not JSON-serializable"):
        codec.to_jsonable({"h": Holder(thing=sock)}, "state")


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(number: float) -> None:
    with pytest.raises(SerializationError, match=r"^value\.score: .* is not valid JSON"):
        codec.dumps({"score": number})


@pytest.mark.parametrize("key", [1, 1.5, None, True, (1, 2), uuid.UUID(int=0)])
def test_non_string_keys_are_refused(key: object) -> None:
    with pytest.raises(SerializationError, match="JSON object keys must be strings") as caught:
        codec.to_jsonable({"outer": {key: 1}}, "state")
    assert str(caught.value).startswith("state.outer: key ")


def test_nul_characters_are_refused_in_values_and_keys() -> None:
    with pytest.raises(SerializationError, match=r"^state\.a\[1\]: contains a NUL character"):
        codec.to_jsonable({"a": ["ok", "x\x00y"]}, "state")
    with pytest.raises(SerializationError, match=r"^state: key 'k\\x00' contains a NUL"):
        codec.to_jsonable({"k\x00": 1}, "state")


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    value: object = "leaf"
    for _ in range(codec.MAX_DEPTH + 1):
        value = [value]
    with pytest.raises(SerializationError, match=f"nested deeper than {codec.MAX_DEPTH} levels"):
        codec.dumps(value)


def test_nesting_at_the_limit_is_accepted() -> None:
    value: object = "leaf"
    for _ in range(codec.MAX_DEPTH):
        value = [value]
    assert codec.loads(codec.dumps(value)) == value


def test_a_self_referencing_list_is_refused_by_the_depth_limit() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="nested deeper"):
        codec.dumps(loop)


def test_dumps_refuses_a_document_over_the_size_limit_naming_its_size() -> None:
    with pytest.raises(SerializationError, match=r"^payload: 1008 bytes is over the 1000-byte"):
        codec.dumps({"x": "a" * 1000}, "payload", max_bytes=1000)


def test_size_limit_counts_utf8_bytes_not_characters() -> None:
    text = "é" * 300  # 300 characters, 600 bytes
    with pytest.raises(SerializationError, match="over the 500-byte limit"):
        codec.dumps(text, max_bytes=500)
    assert codec.dumps(text, max_bytes=700) == f'"{text}"'


def test_check_refuses_a_document_over_the_size_limit() -> None:
    with pytest.raises(SerializationError, match="over the 100-byte limit"):
        codec.check(["x" * 200], "state", max_bytes=100)


def test_default_size_limit_applies_without_an_argument() -> None:
    with pytest.raises(SerializationError, match=f"over the {codec.DEFAULT_MAX_BYTES}-byte"):
        codec.dumps("x" * codec.DEFAULT_MAX_BYTES)


def test_serialization_error_is_a_tether_error() -> None:
    assert issubclass(SerializationError, tether.TetherError)


# -- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "{",
        "{'single': 'quotes'}",
        "[1, 2,]",
        "undefined",
        "NaN",
        "[Infinity]",
        b"\xff\xfe\x00garbage",
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.",  # a pickle
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_loads_of_garbage_raises_serialization_error(garbage: str | bytes) -> None:
    with pytest.raises(SerializationError, match=r"^state: not valid JSON"):
        codec.loads(garbage, "state")


def test_loads_returns_only_plain_values() -> None:
    text = codec.dumps({"when": dt.datetime(2024, 1, 1), "id": uuid.UUID(int=1), "c": Color.RED})
    decoded = codec.loads(text)
    assert decoded == {
        "when": "2024-01-01T00:00:00+00:00",
        "id": "00000000-0000-0000-0000-000000000001",
        "c": "red",
    }


# -- never pickle -------------------------------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}


def forbidden_imports(source: str) -> set[str]:
    """Modules among FORBIDDEN_MODULES that ``source`` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [str(node.args[0].value)]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in FORBIDDEN_MODULES}
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import os, cloudpickle as cp",
        "from dill import loads",
        "def f():\n    import marshal",
        "importlib.import_module('shelve')",
    ],
)
def test_the_pickle_check_catches_an_import(source: str) -> None:
    assert forbidden_imports(source)


def test_no_module_in_tether_imports_pickle_or_its_relatives() -> None:
    package = Path(tether.__file__).parent
    modules = sorted(package.rglob("*.py"))
    assert len(modules) > 10
    offenders = {
        str(path.relative_to(package)): found
        for path in modules
        if (found := forbidden_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}
