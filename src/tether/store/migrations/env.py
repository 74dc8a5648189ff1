"""Alembic environment: tether always hands Alembic an open connection inside a transaction."""

from __future__ import annotations

from alembic import context

from tether.store.migrate import VERSION_TABLE
from tether.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
