"""Schema and connection rules: migrations match the declared tables, versions are checked,
SQLite runs with the pragmas and locking the reliability rules ask for, bad URLs and dead
databases give one clear error."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, event, insert, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

import tether
from tether.store import Store, migrate, parse_url, schema
from tether.store.common import utcnow
from tether.store.database import Database

TABLES = tuple(schema.metadata.tables)


def schema_diff(conn: Connection, metadata: MetaData = schema.metadata) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match ``metadata``."""
    context = MigrationContext.configure(
        conn,
        opts={
            "version_table": migrate.VERSION_TABLE,
            "compare_type": True,
            "target_metadata": metadata,
        },
    )
    return list(compare_metadata(context, metadata))


def copy_of_metadata() -> MetaData:
    copy = MetaData(naming_convention=schema.metadata.naming_convention)
    for table in schema.metadata.tables.values():
        table.to_metadata(copy)
    return copy


def row_counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def stored_revision(db_url: str) -> str | None:
    db = Database(parse_url(db_url))
    try:
        with db.read() as conn:
            return migrate.current(conn)
    finally:
        db.dispose()


@pytest.fixture
def migrated(db_url: str) -> Iterator[Store]:
    """A store whose schema was created by the shipped migrations."""
    store = Store(db_url)
    yield store
    store.close()


# -- the schema -----------------------------------------------------------------------------


def test_migrated_database_matches_the_declared_metadata(migrated: Store) -> None:
    with migrated.db.read() as conn:
        assert migrate.current(conn) == migrate.head()
        assert schema_diff(conn) == []


def test_schema_comparison_reports_a_column_the_database_lacks(migrated: Store) -> None:
    drifted = copy_of_metadata()
    drifted.tables["agents"].append_column(Column("nickname", Integer, nullable=True))
    with migrated.db.read() as conn:
        diff = schema_diff(conn, drifted)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "agents", "nickname")]


def test_schema_comparison_reports_an_index_missing_from_the_database(migrated: Store) -> None:
    with migrated.db.write() as conn:
        conn.execute(text("DROP INDEX ix_agents_type"))
    with migrated.db.read() as conn:
        diff = schema_diff(conn)
    assert [(d[0], d[1].name) for d in diff] == [("add_index", "ix_agents_type")]


def test_upgrade_twice_is_harmless_and_keeps_data(db_url: str) -> None:
    with tether.App(db_url, require_types=False) as app:
        app.create_agent("t", "a1", state={"k": 1})
        assert migrate.upgrade(app.store.db) == migrate.head()
        assert migrate.upgrade(app.store.db) == migrate.head()
        with app.store.db.read() as conn:
            assert migrate.current(conn) == migrate.head()
            assert schema_diff(conn) == []
        assert app.get_agent("a1").state == {"k": 1}


def test_opening_an_existing_database_again_does_not_migrate_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(db_url).close()
    calls: list[Database] = []
    original = migrate.upgrade
    monkeypatch.setattr(migrate, "upgrade", lambda db: calls.append(db) or original(db))
    Store(db_url).close()
    assert calls == []


def test_migration_files_are_numbered_by_their_revision_and_form_one_chain() -> None:
    files = sorted((migrate.MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    assert files, "no migration files found"
    previous = None
    for path in files:
        spec = importlib.util.spec_from_file_location(f"migration_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.revision == path.name[:4], path.name
        assert module.down_revision == previous, path.name
        previous = module.revision
    assert migrate.known_revisions() == [p.name[:4] for p in files]
    assert migrate.head() == previous


def test_no_stray_python_file_in_versions_escapes_the_naming_rule() -> None:
    names = {p.name for p in (migrate.MIGRATIONS / "versions").glob("*.py")}
    numbered = {p.name for p in (migrate.MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")}
    assert names - numbered <= {"__init__.py"}


# -- schema versions ------------------------------------------------------------------------


def stamp(db_url: str, revision: str) -> None:
    db = Database(parse_url(db_url))
    try:
        with db.write() as conn:
            conn.execute(
                text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = :v"), {"v": revision}
            )
    finally:
        db.dispose()


def test_a_newer_schema_is_refused_with_a_message_to_upgrade_tether(db_url: str) -> None:
    with tether.App(db_url, require_types=False) as app:
        app.create_agent("t", "a1")
    stamp(db_url, "9999")
    with (
        tether.App(db_url, require_types=False) as app,
        pytest.raises(tether.DatabaseUnavailable) as caught,
    ):
        app.list_agents()
    message = str(caught.value)
    assert "revision 9999, newer than this tether knows" in message
    assert f"up to {migrate.head()}" in message
    assert "upgrade tether" in message


def test_a_newer_schema_is_not_written_to(db_url: str) -> None:
    with tether.App(db_url, require_types=False) as app:
        app.create_agent("t", "a1")
        before = row_counts(app.store.db)
    stamp(db_url, "9999")
    with tether.App(db_url, require_types=False) as app:
        with pytest.raises(tether.DatabaseUnavailable):
            app.create_agent("t", "a2")
        with pytest.raises(tether.DatabaseUnavailable):
            app.initialize("a1")
    db = Database(parse_url(db_url))
    try:
        assert row_counts(db) == before
        with pytest.raises(tether.DatabaseUnavailable, match="newer than this tether knows"):
            migrate.upgrade(db)
    finally:
        db.dispose()
    assert stored_revision(db_url) == "9999"


def test_a_database_without_schema_is_refused_when_not_asked_to_create_it(db_url: str) -> None:
    with pytest.raises(
        tether.DatabaseUnavailable, match="no tether schema; run: tether db upgrade"
    ):
        Store(db_url, create=False)
    assert stored_revision(db_url) is None


def test_first_use_creates_the_schema_at_head(db_url: str) -> None:
    assert stored_revision(db_url) is None
    with tether.App(db_url) as app:
        assert app.list_agents() == []
    assert stored_revision(db_url) == migrate.head()


# -- SQLite connection settings ---------------------------------------------------------------


def pragmas(db: Database) -> dict[str, Any]:
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    with db.read() as conn:
        return {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in names}


def test_sqlite_pragmas_default_to_wal_full_sync_foreign_keys_and_a_busy_timeout(
    sqlite_url: str,
) -> None:
    with tether.App(sqlite_url) as app:
        found = pragmas(app.store.db)
    assert found["journal_mode"] == "wal"
    assert found["synchronous"] == 2  # FULL
    assert found["foreign_keys"] == 1
    assert found["busy_timeout"] >= 5000


def test_a_new_sqlite_database_gets_2_kib_pages_and_an_existing_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    import sqlite3

    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:  # made by something else, with SQLite's default
        conn.execute("CREATE TABLE keep (x)")
    for path, size in ((tmp_path / "new.db", 2048), (old, 4096)):
        with tether.App(f"sqlite:///{path}") as app, app.store.db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA page_size").scalar() == size


def test_sqlite_pragmas_hold_on_write_connections_and_every_new_connection(
    sqlite_url: str,
) -> None:
    with tether.App(sqlite_url) as app:
        db = app.store.db
        db.engine.dispose()  # the next connections are new ones
        with db.write() as first, db.read() as second:
            for conn in (first, second):
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_synchronous_normal_is_an_opt_in_in_the_url(sqlite_url: str) -> None:
    with tether.App(f"{sqlite_url}?synchronous=normal") as app:
        assert pragmas(app.store.db)["synchronous"] == 1


def test_sqlite_busy_timeout_in_the_url_is_in_seconds(sqlite_url: str) -> None:
    with tether.App(f"{sqlite_url}?busy_timeout=7") as app:
        assert pragmas(app.store.db)["busy_timeout"] == 7000


def test_sqlite_foreign_keys_are_enforced(sqlite_url: str) -> None:
    with (
        tether.App(sqlite_url) as app,
        pytest.raises(IntegrityError, match="FOREIGN KEY"),
        app.store.db.write() as conn,
    ):
        conn.execute(
            insert(schema.state_versions),
            {"agent_id": "nobody", "version": 1, "state": {}, "reason": "x", "at": utcnow()},
        )


def test_sqlite_writes_begin_immediate_and_reads_begin_deferred(sqlite_url: str) -> None:
    with tether.App(sqlite_url) as app:
        db = app.store.db
        statements: list[str] = []

        @event.listens_for(db.engine, "before_cursor_execute")
        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        with db.write() as conn:
            conn.execute(text("SELECT 1"))
        with db.read() as conn:
            conn.execute(text("SELECT 1"))
        db.transact(lambda conn: conn.execute(text("SELECT 1")))
    begins = [s for s in statements if s.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN DEFERRED", "BEGIN IMMEDIATE"]


def test_sqlite_second_writer_waits_for_the_first_then_sees_its_commit(sqlite_url: str) -> None:
    """Under BEGIN IMMEDIATE the second writer queues on the lock; a deferred transaction that
    read before the first writer committed would fail with SQLITE_BUSY_SNAPSHOT instead."""
    event_row = {"type": "test", "at": utcnow(), "data": None, "run_id": None, "agent_id": None}
    with tether.App(sqlite_url) as app:
        db = app.store.db
        holding, entering, release = threading.Event(), threading.Event(), threading.Event()
        outcome: dict[str, Any] = {}

        def first() -> None:
            with db.write() as conn:
                conn.execute(insert(schema.events), event_row)
                holding.set()
                release.wait(5)

        def second() -> None:
            holding.wait(5)
            outcome["started"] = time.time()
            entering.set()
            try:
                with db.write() as conn:
                    seen = conn.execute(text("SELECT count(*) FROM events")).scalar_one()
                    conn.execute(insert(schema.events), event_row)
                outcome["seen"] = seen
            except Exception as exc:
                outcome["error"] = exc
            outcome["finished"] = time.time()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        assert holding.wait(5) and entering.wait(5)
        time.sleep(0.3)
        second_was_waiting = threads[1].is_alive()
        released = time.time()  # the first commits after this: the writers overlapped
        release.set()
        for thread in threads:
            thread.join(10)
        assert second_was_waiting
        assert outcome["started"] < released < outcome["finished"]
        assert (outcome.get("seen"), outcome.get("error")) == (1, None)
        assert row_counts(db)["events"] == 2


# -- URLs and unusable databases --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://user:secret@host/db", "scheme 'mysql' is not supported"),
        ("mongodb://user:secret@host/db", "scheme 'mongodb' is not supported"),
        ("sqlite+aiosqlite:///{tmp}/x.db", "SQLite driver 'aiosqlite' is not supported"),
        ("postgresql+asyncpg://user:secret@host/db", "driver 'asyncpg' is not supported"),
        ("postgresql+psycopg2://user:secret@host/db", "driver 'psycopg2' is not supported"),
        ("sqlite://", "in-memory SQLite database"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("sqlite:///{tmp}/x.db?synchronous=off", "synchronous='off' is not supported"),
        ("sqlite:///{tmp}/x.db?synchronous=fast", "synchronous='fast' is not supported"),
        ("sqlite:///{tmp}/x.db?busy_timeout=soon", "busy_timeout='soon' must be a number"),
        ("sqlite:///{tmp}/x.db?busy_timeout=-1", "must not be negative"),
        ("sqlite:///{tmp}/missing/dir/x.db", "does not exist"),
        ("sqlite:///{tmp}", "is a directory"),
        ("postgresql://user:secret@host:notaport/db", "is malformed"),
        ("not a url at all", "is malformed"),
    ],
)
def test_unusable_url_is_a_configuration_error_hiding_any_password(
    tmp_path: Path, url: str, message: str
) -> None:
    url = url.replace("{tmp}", str(tmp_path))
    with pytest.raises(tether.ConfigurationError, match=message) as caught:
        tether.App(url).list_agents()
    assert "secret" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg", "postgres"])
def test_postgresql_url_spellings_are_accepted(scheme: str) -> None:
    target = parse_url(f"{scheme}://user:secret@db.example:5432/tether")
    assert target.dialect == "postgresql"
    assert target.display == "postgresql+psycopg://user:***@db.example:5432/tether"


@pytest.mark.timeout(60)  # at once: an outage would be ridden out for minutes
def test_unreachable_postgresql_is_database_unavailable_in_one_line_without_the_password() -> None:
    with pytest.raises(tether.DatabaseUnavailable) as caught:
        tether.App("postgresql://tether:hunter2@127.0.0.1:1/tether").list_agents()
    message = str(caught.value)
    assert "\n" not in message
    assert "hunter2" not in message
    assert (
        "cannot reach PostgreSQL at postgresql+psycopg://tether:***@127.0.0.1:1/tether" in message
    )
    assert caught.value.exit_code == 69


@pytest.mark.parametrize(
    "content",
    [os.urandom(8192), b"this is a text file, not a database\n" * 200],
    ids=["random-bytes", "text"],
)
def test_corrupted_sqlite_file_is_database_unavailable_and_left_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "tether.db"
    path.write_bytes(content)
    with pytest.raises(tether.DatabaseUnavailable, match="not a tether database or is corrupted"):
        tether.App(f"sqlite:///{path}").list_agents()
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tether.db"]


def test_sqlite_file_with_damaged_pages_is_database_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "tether.db"
    with tether.App(f"sqlite:///{path}", require_types=False) as app:
        for i in range(100):
            app.create_agent("t", f"agent-{i}", state={"filler": "x" * 500})
        app.store.db.wal_checkpoint()
    for leftover in tmp_path.glob("tether.db-*"):
        leftover.unlink()
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")  # the page size, from the file's header
    assert len(data) > 8 * page
    data[2 * page : 6 * page] = os.urandom(4 * page)  # keep the header, wreck the pages
    path.write_bytes(bytes(data))
    with pytest.raises(tether.DatabaseUnavailable, match="corrupted"):
        tether.App(f"sqlite:///{path}", require_types=False).list_agents()
