"""A database password never appears in any output, message or log, whatever the URL looks like.

Passwords are often generated with ``@ / : ? #`` and pasted into a URL unencoded. tether reads
the user info up to the URL's last ``@``, so such a password still works, and it is hidden
everywhere the URL is shown.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tether
from tests.clikit import cli_invoker, error_line, ok
from tether.store.database import create, parse_url

LEFT, RIGHT = "s3cr", "Et9q"
"""The two halves of every test password; neither may ever be shown."""
SPECIALS = ["@", "/", ":", "%40", "#", "?", "@@", "/x@", "?y@", " "]
"""What sits between the halves: unencoded specials, an encoded '@', and mixtures."""


def password(special: str) -> str:
    """The password a URL with ``LEFT + special + RIGHT`` in its user info stands for."""
    return f"{LEFT}{special.replace('%40', '@')}{RIGHT}"


def assert_hidden(text: str) -> None:
    """Neither half of the password, plain or percent-encoded, is in ``text``."""
    for fragment in (LEFT, RIGHT, quote(LEFT), quote(RIGHT)):
        assert fragment not in text, text


@pytest.mark.parametrize("special", SPECIALS)
def test_a_password_with_special_characters_is_read_whole(special: str) -> None:
    target = parse_url(f"postgresql://tether:{LEFT}{special}{RIGHT}@db.example:6543/agents")

    assert target.url.password == password(special)
    assert (target.url.username, target.url.host, target.url.port) == ("tether", "db.example", 6543)
    assert target.url.database == "agents"
    assert_hidden(target.display)
    assert target.display == "postgresql+psycopg://tether:***@db.example:6543/agents"


@pytest.mark.parametrize("special", SPECIALS)
def test_the_driver_gets_the_whole_password(special: str) -> None:
    engine = create(parse_url(f"postgresql://tether:{LEFT}{special}{RIGHT}@db.example/agents"))
    try:
        _args, kwargs = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.dispose()

    assert kwargs["password"] == password(special)
    assert kwargs["host"] == "db.example"


def test_a_password_in_the_query_is_hidden_too() -> None:
    target = parse_url(f"postgresql://tether@db.example/agents?password={LEFT}{RIGHT}")

    assert target.display == "postgresql+psycopg://tether@db.example/agents?password=***"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{LEFT}@{RIGHT}@host:bad/x",  # a port that is not a number
        f"postgresql://u:{LEFT}/{RIGHT}@host:99999999999/x",
        f"mysql://u:{LEFT}@{RIGHT}@host/x",
        f"postgresql+pg8000://u:{LEFT}:{RIGHT}@host/x",
        f"postgres:{LEFT}@{RIGHT}@host/x",  # not a URL at all
        f"postgresql://u@host:bad/x?sslmode=require&password={LEFT}{RIGHT}",
    ],
)
def test_a_refused_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(tether.ConfigurationError) as refused:
        parse_url(url)
    assert_hidden(str(refused.value))

    result = cli_invoker("--db", url)("agents", "list")

    assert result.exit_code == 2
    assert_hidden(error_line(result))


def test_the_url_of_the_report_is_refused_without_its_password() -> None:
    result = cli_invoker("--db", "postgresql://u:ab@Secret@host:bad/x")("agents", "list")

    assert result.exit_code == 2
    assert error_line(result) == (
        "error: database URL 'postgresql://u:***@host:bad/x' is malformed (its port is not a "
        "number); expected sqlite:///path/to/file.db or postgresql://user:password@host:5432/dbname"
    )


@pytest.mark.postgres
@pytest.mark.parametrize("special", ["@", "/", "?", "#", ":", "%40", "?y@"])
def test_a_database_that_cannot_be_reached_never_shows_the_password(
    special: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Port 1 refuses at once; the server's own error names the host, port and user only.
    url = f"postgresql://tether:{LEFT}{special}{RIGHT}@127.0.0.1:1/agents"
    caplog.set_level(logging.DEBUG)

    with pytest.raises(tether.DatabaseUnavailable) as unavailable:
        tether.App(url, require_types=False).list_agents()
    result = cli_invoker("--db", url)("agents", "list")

    assert "127.0.0.1" in str(unavailable.value)
    assert_hidden(str(unavailable.value))
    assert result.exit_code == 69
    assert_hidden(error_line(result))
    assert_hidden(caplog.text)


@pytest.mark.postgres
def test_a_password_with_an_unencoded_at_sign_connects(pg_url: str) -> None:
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{LEFT}@{RIGHT}@", 1)
    assert url != pg_url

    invoke = cli_invoker("--db", url)
    ok(invoke("agents", "create", "worker", "a1"))
    result = invoke("agents", "list", "-o", "ids")

    assert ok(result) == "a1\n"
    assert_hidden(result.output)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcXYZ019@/:?#&=+!$;,[] ", min_size=1, max_size=24))
def test_any_password_without_percent_signs_is_read_whole_and_hidden(secret: str) -> None:
    target = parse_url(f"postgresql://tether:{secret}@db.example:5432/agents")

    assert target.url.password == secret
    assert target.url.host == "db.example"
    assert target.display == "postgresql+psycopg://tether:***@db.example:5432/agents"
