"""Schema versions: create on first use, upgrade on request, refuse a schema we do not know.

Migration files are named ``NNNN_description.py`` with ``revision = "NNNN"``; the numbers are
the order. Checking the version needs only one query; Alembic is imported only to migrate.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from tether.errors import DatabaseUnavailable
from tether.store.database import Database

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


def upgrade(db: Database) -> str:
    """Migrate the database to this tether's newest revision, in one transaction."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with db.write() as conn:
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
        command.upgrade(config, "head")
    return head()
