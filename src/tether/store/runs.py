"""Queries for runs, the step journal, events and incidents."""

from __future__ import annotations

from tether.store.database import Database


class RunQueries:
    """Every SQL statement about runs."""

    db: Database
