"""Shared fixtures: every store and engine test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``TETHER_TEST_POSTGRES_URL`` (default: the local server). Each test gets
its own schema there, dropped afterwards. When ``CI`` is set, a missing server fails the
tests instead of skipping them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

import tether
from tests.flavors import flavor  # noqa: F401  (the sync/async fixture, for every test)

POSTGRES_URL = os.environ.get(
    "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = bool(os.environ.get("CI"))


def _postgres_admin():  # type: ignore[no-untyped-def]
    import psycopg

    conninfo = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}"
        if IN_CI:
            pytest.fail(f"{message} (CI requires it)")
        pytest.skip(message)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    admin = _postgres_admin()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        import psycopg

        try:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        except psycopg.OperationalError:  # the test restarted the server: connect again
            admin = _postgres_admin()
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file in a temporary folder."""
    return f"sqlite:///{tmp_path / 'tether.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on both databases."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def app(db_url: str) -> Iterator[tether.App]:
    """An App on a fresh database, closed after the test."""
    application = tether.App(db_url)
    try:
        yield application
    finally:
        application.close()
