"""Schema versions: create on first use, upgrade on request, refuse a schema we do not know.

Migration files are named ``NNNN_description.py`` with ``revision = "NNNN"``; the numbers are
the order. Checking the version needs only one query; Alembic is imported only to migrate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from tether.errors import DatabaseUnavailable, Refused
from tether.store.database import Database, translate

VERSION_TABLE = "tether_schema_version"
MIGRATIONS = Path(__file__).parent / "migrations"
_ADVISORY_LOCK = (0x7E7E, 1)  # two-int4 form: (tether namespace, migrations)


def known_revisions() -> list[str]:
    """Revision ids this tether ships, oldest first."""
    names = (p.name for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    return sorted(re.match(r"(\d{4})_", name).group(1) for name in names)  # type: ignore[union-attr]


def head() -> str:
    """The newest revision this tether ships."""
    return known_revisions()[-1]


def current(conn: Connection) -> str | None:
    """The revision the database is at, or None when it has no tether schema yet."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    row = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()  # noqa: S608
    return str(row[0]) if row else None


def check(db: Database, create: bool = True) -> str:
    """Make sure the database is at this tether's revision, creating the schema on first use.

    A database from a newer tether is refused (we would write what it cannot read); an older
    one asks for ``tether db upgrade``, so a deploy never changes a schema behind a user's back.
    """
    with db.read() as conn:
        revision = current(conn)
    if revision == head():
        return revision
    if revision is None and create:
        return upgrade(db)
    where = db.target.display
    if revision is None:
        raise DatabaseUnavailable(f"{where} has no tether schema; run: tether db upgrade")
    if revision not in known_revisions():
        raise DatabaseUnavailable(
            f"{where} has tether schema revision {revision}, newer than this tether knows "
            f"(up to {head()}); upgrade tether before using this database"
        )
    raise DatabaseUnavailable(
        f"{where} has tether schema revision {revision}, older than {head()}; "
        "run: tether db upgrade"
    )


def upgrade(db: Database, to: str | None = None) -> str:
    """Migrate the database to this tether's newest revision, in one transaction.

    Args:
        db: the database to migrate.
        to: stop at this revision instead of the newest (tests build old databases with it).

    Returns:
        The revision the database is at now.
    """
    from alembic import command
    from alembic.config import Config

    target = to or head()
    if target not in known_revisions():
        raise ValueError(f"unknown schema revision {target!r}; known: {known_revisions()}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migrating(db) as conn:
        if db.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:a, :b)"),
                dict(zip("ab", _ADVISORY_LOCK, strict=True)),
            )
        revision = current(conn)
        if revision is not None and revision not in known_revisions():
            raise DatabaseUnavailable(
                f"{db.target.display} has tether schema revision {revision}, newer than this "
                f"tether knows (up to {head()}); upgrade tether before using this database"
            )
        config.attributes["connection"] = conn
        command.upgrade(config, target)
    return target


@contextmanager
def _migrating(db: Database) -> Iterator[Connection]:
    """The one write transaction of an upgrade; on SQLite, with foreign keys checked at the end
    instead of enforced on every statement.

    Alembic changes a SQLite table by rebuilding it (a copy, the rows moved over, ``DROP`` of
    the old one, a rename), and with foreign keys on, that ``DROP`` first deletes every row,
    which deletes through ``ON DELETE CASCADE`` every row referring to them: rebuilding ``runs``
    would empty the journal. SQLite ignores the pragma inside a transaction, so it is switched
    off before ``BEGIN`` and on again before the connection goes back to the pool; before the
    commit, ``foreign_key_check`` refuses an upgrade that left a reference dangling.
    """
    if db.dialect != "sqlite":
        with db.write() as conn:
            yield conn
        return
    try:
        with db.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.execution_options(tether_write=True).begin():
                    yield conn
                    dangling = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if dangling:
                        table, _, parent, _ = dangling[0]
                        raise Refused(
                            f"the upgrade of {db.target.display} was rolled back: it left "
                            f"{len(dangling)} row(s) referring to rows that no longer exist "
                            f"(first: a row of {table} referring to {parent}); nothing was "
                            "changed. This is a defect of tether's migrations: please report it"
                        )
            finally:
                driver.execute("PRAGMA foreign_keys=ON")
    except DBAPIError as exc:
        raise translate(exc, db.target) from None
