"""``tether init`` and ``tether db ...``: create and migrate the database."""

from __future__ import annotations

import click

from tether.cli.common import CliState, OrderedGroup, pass_state


def _upgrade(url: str | None) -> tuple[str, str | None, str]:
    """Migrate the database at ``url`` to the newest schema: (where, revision before, after)."""
    from tether.store import Database, migrate, parse_url

    target = parse_url(url)
    where = f"{target.sqlite_path.resolve()} (SQLite)" if target.sqlite_path else target.display
    database = Database(target)
    try:
        with database.read() as conn:
            before = migrate.current(conn)
        after = migrate.upgrade(database)
    finally:
        database.dispose()
    return where, before, after


@click.command()
@pass_state
def init(state: CliState) -> None:
    """Create the database (if needed) and bring its schema up to date."""
    where, before, after = _upgrade(state.database_url())
    if before is None:
        click.echo(f"created tether database {where} (schema revision {after})")
    elif before == after:
        click.echo(f"tether database {where} is ready (schema revision {after})")
    else:
        click.echo(f"upgraded tether database {where} from schema revision {before} to {after}")


@click.group(cls=OrderedGroup)
def db() -> None:
    """Manage the database schema."""


@db.command()
@pass_state
def upgrade(state: CliState) -> None:
    """Migrate the database in place to this tether's newest schema revision."""
    where, before, after = _upgrade(state.database_url())
    if before == after:
        click.echo(f"{where} is already at schema revision {after}; nothing to do")
    else:
        click.echo(f"{where}: schema revision {before or 'none'} -> {after}")
