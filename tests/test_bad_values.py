"""Both databases accept and refuse exactly the same values, and a refusal names the field.

PostgreSQL cannot hold a NUL character in text or JSON; nobody can encode a lone surrogate as
UTF-8; Python will not write an integer of more than ``sys.get_int_max_str_digits()`` digits as
text. Each is refused before anything is written, with a ``SerializationError`` (a JSON value)
or a ``ConfigurationError`` (an id, a name, a reason, an actor, a comment), on SQLite exactly
as on PostgreSQL.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest

import tether
from tether import codec

HUGE = 10**5000
"""An integer of 5,001 digits: over Python's default limit of 4,300."""
SURROGATE = "\ud800"
NUL = "\x00"

Call = Callable[[tether.App], object]


@pytest.fixture
def agent(app: tether.App) -> str:
    """An active agent ``a1`` of a registered type, with a checkpoint and a pending run."""

    @app.agent("worker")
    def worker(ctx: tether.RunContext, task: dict[str, Any]) -> None:
        raise ValueError("a person must look at this")

    app.create_agent("worker", "a1", state={"notes": ["first"]})
    app.initialize("a1")
    app.activate("a1")
    app.checkpoint("a1", "start")
    app.submit("a1", {"q": 1})
    return "a1"


def open_incident(app: tether.App) -> str:
    """Run the pending run into an incident (its handler raises); returns the incident's id."""
    app.work(until_idle=True, timeout=60)
    (found,) = app.incidents(status="open")
    return found.incident_id


def snapshot(app: tether.App) -> tuple[object, ...]:
    """Everything a refused call could have written."""
    return (
        app.list_agents(),
        app.state_versions("a1"),
        app.agent_history("a1"),
        app.list_runs(limit=None),
        app.list_checkpoints(),
        app.incidents(),
        app.events(),
    )


def incident(app: tether.App) -> str:
    """The open incident (cases that use it are in ``WITH_INCIDENT``)."""
    return app.incidents(status="open")[0].incident_id


REFUSED: dict[str, tuple[Call, type[tether.TetherError], str]] = {
    # JSON values: a SerializationError naming the path of the bad value.
    "surrogate in a task": (
        lambda app: app.submit("a1", {"query": ["ok", f"bad{SURROGATE}"]}),
        tether.SerializationError, r"^task\.query\[1\]: contains a lone surrogate \(U\+D800\)",
    ),
    "surrogate in an output": (
        lambda app: app.resolve_incident(incident(app), "skip", output={"text": SURROGATE}),
        tether.SerializationError, r"^output\.text: contains a lone surrogate",
    ),
    "surrogate in state": (
        lambda app: app.set_state("a1", {"notes": ["ok", "ok", f"x{SURROGATE}"]}),
        tether.SerializationError, r"^state\.notes\[2\]: contains a lone surrogate",
    ),
    "surrogate in a state key": (
        lambda app: app.patch_state("a1", {f"k{SURROGATE}": 1}),
        tether.SerializationError, r"^patch: key 'k\\ud800' contains a lone surrogate",
    ),
    "5,000-digit int in a task": (
        lambda app: app.submit("a1", {"n": HUGE}),
        tether.SerializationError, r"^task\.n: an integer of about 5001 digits is over",
    ),
    "5,000-digit int in state": (
        lambda app: app.set_state("a1", {"big": [1, -HUGE]}),
        tether.SerializationError, r"^state\.big\[1\]: an integer of about 5001 digits",
    ),
    "5,000-digit int as a whole output": (
        lambda app: app.resolve_incident(incident(app), "skip", output=HUGE),
        tether.SerializationError, r"^output: an integer",
    ),
    "NUL in a key": (
        lambda app: app.set_state("a1", {f"a{NUL}b": 1}),
        tether.SerializationError, r"^state: key 'a\\x00b' contains a NUL character",
    ),
    "NUL in a value": (
        lambda app: app.submit("a1", {"q": f"a{NUL}"}),
        tether.SerializationError, r"^task\.q: contains a NUL character \(U\+0000\) at index 1",
    ),
    "NUL in an agent's config": (
        lambda app: app.create_agent("worker", "a2", {"model": f"gpt{NUL}"}),
        tether.SerializationError, r"^config\.model: contains a NUL",
    ),
    # Text fields: a ConfigurationError naming the field.
    "surrogate in an agent id": (
        lambda app: app.create_agent("worker", f"a{SURROGATE}"),
        tether.ConfigurationError, r"^agent id: contains a lone surrogate",
    ),
    "NUL in an agent id": (
        lambda app: app.create_agent("worker", f"a{NUL}"),
        tether.ConfigurationError, r"^agent id: contains a NUL character",
    ),
    "surrogate in a task id": (
        lambda app: app.submit("a1", {}, task_id=f"t{SURROGATE}"),
        tether.ConfigurationError, r"^task id: contains a lone surrogate",
    ),
    "surrogate in a reason": (
        lambda app: app.pause("a1", reason=f"because{SURROGATE}"),
        tether.ConfigurationError, r"^reason: contains a lone surrogate",
    ),
    "NUL in a reason": (
        lambda app: app.pause("a1", reason=f"because{NUL}"),
        tether.ConfigurationError, r"^reason: contains a NUL character",
    ),
    "NUL in a state change's reason": (
        lambda app: app.set_state("a1", {}, reason=f"r{NUL}"),
        tether.ConfigurationError, r"^reason: contains a NUL character",
    ),
    "NUL in a cancel reason": (
        lambda app: app.cancel(app.list_runs()[0].run_id, reason=f"r{NUL}"),
        tether.ConfigurationError, r"^reason: contains a NUL character",
    ),
    "NUL in an actor": (
        lambda app: app.pause("a1", actor=f"ops{NUL}"),
        tether.ConfigurationError, r"^actor: contains a NUL character",
    ),
    "an actor over 255 characters": (
        lambda app: app.pause("a1", actor="o" * 256),
        tether.ConfigurationError, r"^actor: 256 characters is over the limit of 255",
    ),
    "NUL in a comment": (
        lambda app: app.resolve_incident(incident(app), "abort", comment=f"no{NUL}"),
        tether.ConfigurationError, r"^comment: contains a NUL character",
    ),
    "a reason over the limit": (
        lambda app: app.pause("a1", reason="r" * (codec.MAX_TEXT_LENGTH + 1)),
        tether.ConfigurationError, r"^reason: 10001 characters is over the limit of 10000",
    ),
    "NUL in a checkpoint name": (
        lambda app: app.checkpoint("a1", f"before{NUL}"),
        tether.ConfigurationError, r"^checkpoint name: contains a NUL character",
    ),
    "surrogate in a checkpoint name": (
        lambda app: app.checkpoint("a1", f"before{SURROGATE}"),
        tether.ConfigurationError, r"^checkpoint name: contains a lone surrogate",
    ),
    "NUL in an agent type's name": (
        lambda app: tether.App(app.url, require_types=False).create_agent(f"w{NUL}", "a3"),
        tether.ConfigurationError, r"^agent type: contains a NUL character",
    ),
    # Lookups: no such value can exist, and both databases say so alike.
    "NUL in an agent id looked up": (
        lambda app: app.get_agent(f"a1{NUL}"),
        tether.ConfigurationError, r"contains a NUL character",
    ),
    "surrogate in an agent id looked up": (
        lambda app: app.get_agent(f"a1{SURROGATE}"),
        tether.ConfigurationError, r"contains a lone surrogate",
    ),
    "NUL in a filter": (
        lambda app: app.list_agents(type=f"worker{NUL}"),
        tether.ConfigurationError, r"contains a NUL character",
    ),
}  # fmt: skip


WITH_INCIDENT = {"surrogate in an output", "5,000-digit int as a whole output", "NUL in a comment"}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_value_no_database_can_hold_is_refused_naming_its_field_and_nothing_is_written(
    app: tether.App, agent: str, case: str
) -> None:
    call, error, message = REFUSED[case]
    if case in WITH_INCIDENT:
        open_incident(app)
    before = snapshot(app)

    with pytest.raises(error, match=message) as refused:
        call(app)

    assert type(refused.value) is error
    assert snapshot(app) == before


def last_transition(app: tether.App) -> tuple[str, str]:
    entry = app.agent_history("a1")[-1]
    return entry.reason, entry.actor


LONGEST_INT = 10 ** (sys.get_int_max_str_digits() - 1)
EDGES = "🧭 \U0010ffff \u2028 a\tb\n\x01\x7f"
"""Characters outside the BMP, a line separator and control characters other than NUL."""
ACCEPTED: dict[str, tuple[Call, Call, object]] = {
    # case: (write, read back, what is read back)
    "the longest integer Python writes": (
        lambda app: app.set_state("a1", {"n": [LONGEST_INT, -LONGEST_INT]}),
        lambda app: app.get_state("a1").state, {"n": [LONGEST_INT, -LONGEST_INT]},
    ),
    "any other character in a value and a key": (
        lambda app: app.set_state("a1", {EDGES: EDGES}),
        lambda app: app.get_state("a1").state, {EDGES: EDGES},
    ),
    "a reason at the limit, and any character in it": (
        lambda app: app.pause("a1", reason=EDGES * 500 + "r" * (10_000 - 500 * len(EDGES))),
        lambda app: len(last_transition(app)[0]), 10_000,
    ),
    "an actor of 255 characters": (
        lambda app: app.pause("a1", actor="o" * 254 + "🧭"),
        last_transition, ("pause", "o" * 254 + "🧭"),
    ),
    "a checkpoint name of 255 characters": (
        lambda app: app.checkpoint("a1", "c" * 255),
        lambda app: app.list_checkpoints("a1")[0].name, "c" * 255,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_the_values_at_the_edges_are_stored_and_read_back_alike(
    app: tether.App, agent: str, case: str
) -> None:
    write, read, expected = ACCEPTED[case]

    write(app)

    assert read(app) == expected


def test_a_comment_may_hold_any_character_but_nul(app: tether.App, agent: str) -> None:
    app.resolve_incident(open_incident(app), "abort", comment=EDGES)

    (resolved,) = app.events(types=["incident.resolved"])
    assert resolved.data["comment"] == EDGES


def test_check_text_names_the_field_and_returns_good_text() -> None:
    assert codec.check_text("reason", "fine, thanks") == "fine, thanks"
    with pytest.raises(tether.ConfigurationError, match=r"^reason: must be a string, not int$"):
        codec.check_text("reason", 3)  # type: ignore[arg-type]
    with pytest.raises(tether.ConfigurationError, match=r"^name: 4 characters is over"):
        codec.check_text("name", "abcd", max_length=3)
