"""The SQL of a run's fenced write: the fence for both databases, and PostgreSQL's write as one
statement.

The fence heads every write of a run: it checks that the worker still owns the run at its
epoch and, in the same statement, refreshes or releases the lease and sets a new status, with
the status rule taken from ``tether.run_status.HELD``: a cancelled run keeps its status (and
its result), and a paused run stays paused instead of waiting. On SQLite, where ``BEGIN
IMMEDIATE`` already excludes other writers, a write that changes nothing of the run only
reads it.

Lock order (PostgreSQL): a write that changes the agent's state locks the agent's row before
the run's, as claims and lifecycle changes do (agent, then its runs); see docs/architecture.md.

On PostgreSQL, written as separate statements a step costs six round trips to the server
(BEGIN, the time, the fence, the journal entry, the event, COMMIT), and each costs the worker
and the server more CPU than the work itself. ``one_statement`` puts the fence at the head of
a chain of data-modifying CTEs; every other write selects from its result, so a fence that
matches no row (a lost lease) writes nothing at all, and the statement returns no row. Sent in
autocommit mode, the statement is its own transaction. Times are the database's ``now()``. A
checkpoint, which must read the agent's state back, still takes ``Committer._apply_commit``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from tether.journal import Commit, JournalEntry, RunRef
from tether.run_status import HELD, sql_list
from tether.store.common import new_id
from tether.store.schema import json_text
from tether.types import FINAL_RUN_STATUSES, IncidentStatus, RunStatus, StepStatus

_NEW_STEP = (
    "SELECT %s, %s::int, %s, %s, %s, CAST(%s AS jsonb), CAST(%s AS jsonb), %s::int, %s, "
    "%s::float8, %s::bigint, {version}, {started}, {finished} FROM f"
)
_STEP_UPDATE = (
    "UPDATE steps SET name = %s, kind = %s, status = %s, output = CAST(%s AS jsonb), "
    "error = CAST(%s AS jsonb), attempts = %s::int, tool = %s, cost = %s::float8, "
    "tokens = %s::bigint, state_version = {version}, finished_at = {finished} "
    "WHERE run_id = %s AND seq = %s::int AND EXISTS (SELECT 1 FROM f)"
)


def fits_one_statement(change: Commit) -> bool:
    """Whether one statement can carry this write on PostgreSQL: a step's write, a wait, an
    end; not a checkpoint, nor what reads other rows first (messages, children, waits decided
    in the write)."""
    return (
        change.checkpoint is None
        and not change.outgoing
        and not change.children
        and not change.ended
        and not change.wakes
        and change.settle is None
        and change.ledger is None
        and change.reserve is None
    )


@dataclass
class Statement:
    """The statement of one write, its parameters, and what its row holds."""

    text: str
    params: list[Any]
    state: bool
    """The row's second column is the agent's new state version."""


def one_statement(ref: RunRef, change: Commit, agent_id: str, lease_ttl: float) -> Statement:
    """PostgreSQL: the one statement writing ``change`` for ``ref``'s run, if ``ref`` still
    owns it. Its row is ``(status after the write[, new state version])``; no row: the lease
    was lost.
    """
    params: list[Any] = []
    ctes = []
    state = change.state is not None
    if state:
        # The agent's row first: the fence waits on this lock before it locks the run's row.
        ctes.append(
            "l AS MATERIALIZED (SELECT 1 FROM agents WHERE agent_id = %s FOR NO KEY UPDATE)"
        )
        params.append(agent_id)
    ctes.append(f"f AS ({fence(ref, change, lease_ttl, params, pg=True, after_lock=state)})")
    if state:
        ctes.append(
            "a AS (UPDATE agents SET state = CAST(%s AS jsonb), version = version + 1, "
            "updated_at = now() WHERE agent_id = %s AND EXISTS (SELECT 1 FROM f) "
            "RETURNING version, state)"
        )
        ctes.append(
            "sv AS (INSERT INTO state_versions (agent_id, version, state, reason, run_id, at) "
            "SELECT %s, a.version, a.state, 'run', %s, now() FROM a)"
        )
        params += [json_text(change.state), agent_id, agent_id, ref.run_id]
    entries = list(change.entries)
    new_steps: list[str] = []
    for entry in entries:
        takes_version = state and entry is entries[-1]
        if entry.stored:
            ctes.append(f"u{entry.seq} AS ({_step_update(ref, entry, takes_version, params)})")
        else:
            new_steps.append(_new_step(ref, entry, takes_version, params))
    if new_steps:
        ctes.append(
            "s AS (INSERT INTO steps (run_id, seq, name, kind, status, output, error, attempts, "
            "tool, cost, tokens, state_version, started_at, finished_at) "
            f"{' UNION ALL '.join(new_steps)})"
        )
    if change.events:
        rows = ", ".join(["(%s, %s)"] * len(change.events))
        ctes.append(
            "e AS (INSERT INTO events (run_id, agent_id, type, data, at) "
            "SELECT %s, NULL, v.type, CAST(v.data AS jsonb), now() "
            f"FROM f CROSS JOIN (VALUES {rows}) AS v(type, data))"
        )
        params.append(ref.run_id)
        for kind, data in change.events:
            params += [kind, json_text(data)]
    if change.waits:
        rows = ", ".join(["(%s::int, %s, %s, CAST(%s AS timestamptz))"] * len(change.waits))
        ctes.append(
            "w AS (INSERT INTO waits (run_id, seq, kind, key, deadline, created_at) "
            "SELECT %s, v.seq, v.kind, v.key, v.deadline, now() "
            f"FROM f CROSS JOIN (VALUES {rows}) AS v(seq, kind, key, deadline) "
            f"WHERE f.status <> '{RunStatus.CANCELLED.value}')"
        )
        params.append(ref.run_id)
        for wait in change.waits:
            params += [wait.seq, wait.kind.value, wait.key, wait.deadline]
    if change.incident is not None:
        incident = change.incident
        ctes.append(
            "i AS (INSERT INTO incidents (incident_id, run_id, agent_id, seq, kind, error, "
            "status, created_at) SELECT %s, %s, %s, %s::int, %s, CAST(%s AS jsonb), %s, now() "
            "FROM f)"
        )
        params += incident_columns(ref, agent_id, incident)
    columns = ["f.status"]
    if state:
        columns.append("(SELECT version FROM a)")
    if change.status == RunStatus.PENDING:  # workers elsewhere may take it: wake them
        columns.append(
            f"CASE WHEN f.status = '{RunStatus.PENDING.value}' "
            "THEN pg_notify('tether_runs', '') END"
        )
    text = f"WITH {', '.join(ctes)} SELECT {', '.join(columns)} FROM f"
    return Statement(text, params, state)


def fence(
    ref: RunRef,
    change: Commit,
    lease_ttl: float,
    params: list[Any],
    *,
    pg: bool,
    now: float | None = None,
    after_lock: bool = False,
) -> str:
    """The statement that checks ownership and writes the run's own row; its parameters are
    appended to ``params``. It returns the run's status after the write, or no row.

    Args:
        pg: spell it for PostgreSQL (database clock, ``%s``) rather than SQLite (``?``).
        now: SQLite only: the transaction's time, as epoch seconds.
        after_lock: PostgreSQL only: wait for the CTE ``l`` (the agent's lock) first.
    """
    mark = "%s" if pg else "?"
    at = "now()" if pg else mark
    doc = "CAST(%s AS jsonb)" if pg else "?"
    sets: list[str] = []

    def at_now() -> str:
        if not pg:
            params.append(now)
        return at

    if change.release:
        sets.append(f"owner = NULL, lease_until = NULL, updated_at = {at_now()}")
    elif pg:
        sets.append("lease_until = now() + %s * interval '1 second'")
        params.append(lease_ttl)
    target = change.status
    if target is not None:
        final = target in FINAL_RUN_STATUSES
        sets.append(f"status = {status_rule(mark)}")
        params += [target.value] * (len(HELD) + 1)
        # Only a cancelled run keeps every column; a paused one takes the rest of the write
        # (neither paused nor the target it kept it from is final).
        keep = f"CASE WHEN status = '{RunStatus.CANCELLED.value}' THEN {{col}} ELSE {{value}} END"
        values = {
            "result": (doc, json_text(change.result) if final else None),
            "error": (
                doc,
                json_text(change.error) if final or target == RunStatus.NEEDS_ATTENTION else None,
            ),
        }
        for column, (placeholder, value) in values.items():
            sets.append(f"{column} = {keep.format(col=column, value=placeholder)}")
            params.append(value)
        finished = at_now() if final else "NULL"
        sets.append(f"finished_at = {keep.format(col='finished_at', value=finished)}")
        if target == RunStatus.WAITING:
            # Parking is progress: the claim after a wake-up that parks again (a wait on
            # many children, woken by each) is not a stall.
            sets.append("progress = NULL")
    params += [ref.run_id, ref.owner, ref.fence]
    where = f"WHERE run_id = {mark} AND owner = {mark} AND fence = {mark}"
    if after_lock:
        where += " AND EXISTS (SELECT 1 FROM l)"
    if not sets:  # SQLite, nothing of the run changes: BEGIN IMMEDIATE makes a read enough
        return f"SELECT status FROM runs {where}"
    return f"UPDATE runs SET {', '.join(sets)} {where} RETURNING status"


@functools.cache
def status_rule(mark: str) -> str:
    """The status a worker's write sets, ``run_status.HELD`` applied: the target (given once
    per held status and once more as ``mark`` parameters) unless a person's status holds."""
    cases = " ".join(
        f"WHEN status = '{held.value}' AND {mark} IN {sql_list(sorted(s.value for s in targets))} "
        f"THEN status"
        for held, targets in HELD.items()
    )
    return f"CASE {cases} ELSE {mark} END"


def _times(entry: JournalEntry) -> tuple[str, str]:
    """``started_at`` and ``finished_at`` of a journal entry written now."""
    # A start time is known only for a step whose intent was journaled.
    started = "now()" if entry.status == StepStatus.STARTED else "NULL::timestamptz"
    finished = "now()" if entry.status == StepStatus.COMPLETED else "NULL::timestamptz"
    return started, finished


def incident_columns(ref: RunRef, agent_id: str, incident: dict[str, Any]) -> tuple[Any, ...]:
    """A new incident's columns as parameters, but its time: id, run, agent, step, kind,
    error and status (both databases write them in this order)."""
    return (
        new_id("inc"),
        ref.run_id,
        agent_id,
        incident.get("seq"),
        incident["kind"],
        json_text(incident["error"]),
        IncidentStatus.OPEN.value,
    )


def entry_columns(entry: JournalEntry) -> tuple[Any, ...]:
    """A journal entry's own columns as parameters: name, kind, status, output, error,
    attempts, tool, cost and tokens (both databases write them in this order)."""
    return (
        entry.name,
        entry.kind,
        entry.status.value,
        json_text(entry.output),
        json_text(entry.error),
        entry.attempts,
        entry.tool,
        entry.cost,
        entry.tokens,
    )


def _new_step(ref: RunRef, entry: JournalEntry, takes_version: bool, params: list[Any]) -> str:
    started, finished = _times(entry)
    version = "(SELECT version FROM a)" if takes_version else "%s::int"
    params += [ref.run_id, entry.seq, *entry_columns(entry)]
    if not takes_version:
        params.append(entry.state_version)
    return _NEW_STEP.format(version=version, started=started, finished=finished)


def _step_update(ref: RunRef, entry: JournalEntry, takes_version: bool, params: list[Any]) -> str:
    _, finished = _times(entry)
    version = "(SELECT version FROM a)" if takes_version else "%s::int"
    params += entry_columns(entry)
    if not takes_version:
        params.append(entry.state_version)
    params += [ref.run_id, entry.seq]
    return _STEP_UPDATE.format(version=version, finished=finished)
