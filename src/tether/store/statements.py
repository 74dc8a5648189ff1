"""The statements of the hot path (run writes, claims, submits), spelled once per dialect.

Built once per store as plain DBAPI SQL: ``?`` and epoch seconds on SQLite, ``%s``, ``jsonb``
and the database clock on PostgreSQL. ``Committer`` executes them; ``fenced`` builds the
statements whose shape depends on the write.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from tether import run_status
from tether.lifecycle import LifecycleState
from tether.types import RunStatus as R

_RUNNABLE = ("pending", "due", "expired")
"""The kinds of runnable run a claim looks at (the CTEs of ``Statements._runnable``)."""


class Statements:
    """The statements of the hot path, spelled for one dialect."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        p = "%s" if self.pg else "?"
        j = "CAST(%s AS jsonb)" if self.pg else "?"
        self.state = (
            f"UPDATE agents SET state={j}, version=version+1, updated_at={p} "
            f"WHERE agent_id={p} RETURNING version"
        )
        self.state_version = (
            "INSERT INTO state_versions (agent_id, version, state, reason, run_id, at) "
            f"VALUES ({p}, {p}, {j}, {p}, {p}, {p})"
        )
        self.insert_step = (
            "INSERT INTO steps (run_id, seq, name, kind, status, output, error, attempts, "
            "tool, cost, tokens, state_version, started_at, finished_at) VALUES "
            f"({p}, {p}, {p}, {p}, {p}, {j}, {j}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"
        )
        self.update_step = (
            f"UPDATE steps SET name={p}, kind={p}, status={p}, output={j}, error={j}, "
            f"attempts={p}, tool={p}, cost={p}, tokens={p}, state_version={p}, finished_at={p} "
            f"WHERE run_id={p} AND seq={p}"
        )
        self.insert_event = (
            f"INSERT INTO events (run_id, agent_id, type, data, at) VALUES ({p}, {p}, {p}, {j}, "
            f"{p})"
        )
        self.agent_state = f"SELECT state, version FROM agents WHERE agent_id={p}"
        self.fence_read = (
            f"SELECT status FROM runs WHERE run_id = {p} AND owner = {p} AND fence = {p}"
        )
        """``fenced.fence`` of a write that changes nothing of the run, spelled once."""
        self.lock_agent = f"SELECT 1 FROM agents WHERE agent_id={p} FOR NO KEY UPDATE"
        self.insert_checkpoint = (
            "INSERT INTO checkpoints (checkpoint_id, agent_id, name, state, version, run_id, seq, "
            f"created_at) VALUES ({p}, {p}, {p}, {j}, {p}, {p}, {p}, {p})"
        )
        self.step_output = f"UPDATE steps SET output={j} WHERE run_id={p} AND seq={p}"
        self.insert_incident = (
            "INSERT INTO incidents (incident_id, run_id, agent_id, seq, kind, error, status, "
            f"created_at) VALUES ({p}, {p}, {p}, {p}, {p}, {j}, {p}, {p})"
        )
        self.placeholder = p
        # Claims compare and set times with the database's clock on PostgreSQL (leases must
        # not depend on a worker's clock) and with the one clock of the machine on SQLite.
        # statement_timestamp(), not now(): a claim's transaction may have waited for an
        # agent's lock, and now() (its start) would date the claim before the write that
        # freed the agent, and shorten the lease by the wait.
        self.now = "statement_timestamp()" if self.pg else "?"
        now = self.now
        lease = f"{now} + %s * interval '1 second'" if self.pg else "?"
        running = run_status.target("claim")
        # The journal's fingerprint: a claim that finds it as the last claim left it counts a
        # stall (the last execution died before committing anything).
        progress = (
            "(SELECT count(*) + coalesce(sum(s.attempts), 0) FROM steps s "
            "WHERE s.run_id = runs.run_id)"
        )
        claim = (
            f"UPDATE runs SET status='{running}', owner={p}, fence=fence+1, lease_until={lease}, "
            f"attempts=attempts+1, started_at=COALESCE(started_at, {now}), updated_at={now}, "
            f"claimed_at={now}, "
            f"stalls=CASE WHEN COALESCE(progress, -1) = {progress} THEN stalls + 1 ELSE 0 END, "
            f"progress={progress}, state_version=COALESCE(state_version, "
            "(SELECT version FROM agents WHERE agents.agent_id = runs.agent_id)) "
            f"WHERE run_id={p} AND fence={p} "
            "RETURNING fence, agent_id, input, attempts, parent_run_id, state_version, "
            "forked_at_step, stalls, message_seq, limits, run_id"
        )
        self.delete_waits = f"DELETE FROM waits WHERE run_id = {p}"
        self.insert_wait = (
            "INSERT INTO waits (run_id, seq, kind, key, deadline, created_at) "
            f"VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
        )
        if self.pg:
            # The claim, its event and what replay needs of the run and its agent: one trip.
            # Parameters: owner, lease seconds, run id, fence, event type, owner.
            # A claimed run waits for nothing any more: its waits are withdrawn with the claim.
            self.claim = (
                f"WITH u AS ({claim}), e AS (INSERT INTO events (run_id, agent_id, type, data, "
                "at) SELECT u.run_id, u.agent_id, %s, jsonb_build_object('worker', %s::text, "
                "'fence', u.fence), statement_timestamp() FROM u), "
                "w AS (DELETE FROM waits WHERE run_id IN (SELECT run_id FROM u)) "
                "SELECT u.fence, u.agent_id, u.input, u.attempts, u.parent_run_id, "
                "u.state_version, u.forked_at_step, u.stalls, u.message_seq, u.limits, a.type, "
                "a.config, "
                "a.state, "
                "a.version FROM u JOIN agents a ON a.agent_id = u.agent_id"
            )
        else:
            # Parameters: owner, lease, now, now, now, run id, fence.
            self.claim = claim
        self.claimed_agent = f"SELECT type, config, state, version FROM agents WHERE agent_id={p}"
        self.agent_lifecycle = f"SELECT lifecycle FROM agents WHERE agent_id = {p}"
        self.run_by_task = f"SELECT run_id FROM runs WHERE agent_id = {p} AND task_id = {p}"
        self.insert_run = (
            "INSERT INTO runs (run_id, agent_id, task_id, input, status, attempts, priority, "
            "max_concurrent, parent_run_id, forked_from, forked_at_step, fence, state_version, "
            f"limits, created_at, updated_at) VALUES ({p}, {p}, {p}, {j}, '{R.PENDING.value}', "
            f"0, {p}, {p}, {p}, {p}, {p}, 0, {p}, {j}, {p}, {p})"
        )
        self.copy_journal = (
            "INSERT INTO steps (run_id, seq, name, kind, status, output, error, attempts, "
            "tool, cost, tokens, state_version, started_at, finished_at) SELECT "
            f"{p}, seq, name, kind, status, output, error, attempts, tool, cost, tokens, "
            f"state_version, started_at, finished_at FROM steps WHERE run_id = {p} AND seq <= {p}"
        )
        self.load_journal = (
            "SELECT seq, name, kind, status, output, error, attempts, state_version, tool, "
            f"cost, tokens FROM steps WHERE run_id = {p} ORDER BY seq"
        )

    def _marks(self, count: int) -> str:
        return ", ".join([self.placeholder] * count)

    def _runnable(self, types: int, lock: str = "", spent: bool = False) -> str:
        """Runnable runs of ``types`` agent types, the first of each kind, as three CTEs.

        Each kind is read off an index in its own order, so that a claim does not sort the
        whole queue: pending runs by priority then age, due waits by deadline, and expired
        leases (their worker died). Parameters, for each kind in turn: the types, then the
        time (the app's clock for due waits; the database's for leases, a parameter on SQLite
        only), and a limit.

        With ``spent`` (PostgreSQL), a first CTE ``capped`` lists the capped types among
        ``types`` (parameters: the types, before the others), and types whose caps are spent
        are left out: a capped type's backlog does not crowd the others out of the claim.
        """
        p = self.placeholder
        columns = (
            "r.run_id, r.agent_id, r.max_concurrent, r.status, r.fence, r.priority, "
            "r.created_at, a.type"
        )
        agents = f"JOIN agents a ON a.agent_id = r.agent_id WHERE a.type IN ({self._marks(types)})"
        if spent:
            agents += " AND a.type NOT IN (SELECT type FROM capped WHERE spent)"
        active = f"a.lifecycle = '{LifecycleState.ACTIVE.value}'"
        pending, waiting, running = (R.PENDING.value, R.WAITING.value, R.RUNNING.value)
        kinds = {
            "pending": (
                f"FROM runs r {agents} AND {active} AND r.status = '{pending}'",
                "r.priority DESC, r.created_at",
            ),
            "due": (
                f"FROM waits w JOIN runs r ON r.run_id = w.run_id {agents} AND {active} "
                f"AND r.status = '{waiting}' AND w.deadline <= {p}",
                "w.deadline",
            ),
            "expired": (
                f"FROM runs r {agents} AND {active} AND r.status = '{running}' "
                f"AND r.lease_until < {self.now}",
                "r.lease_until",
            ),
        }
        parts = [
            f"{name} AS (SELECT {columns} {source} ORDER BY {order} LIMIT {p}{lock})"
            for name, (source, order) in kinds.items()
        ]
        if spent:
            usage = self.type_usage(types)
            parts.insert(
                0,
                "capped AS (SELECT u.type, COALESCE(u.running >= u.type_concurrency, false) "
                f"OR COALESCE(u.claims >= u.rate_limit, false) AS spent FROM ({usage}) AS u)",
            )
        return f"WITH {', '.join(parts)} "

    @functools.cache  # noqa: B019 - one instance per store, a handful of distinct counts
    def candidates(self, types: int) -> str:
        """The runnable runs (see ``_runnable``), locked and skipping locked ones on PG, each
        with its agent's type and how many runs its agent executes now (live leases); the
        caller merges the kinds by priority, then age. Parameters as for ``_runnable``, then
        ``now`` on SQLite."""
        lock = " FOR UPDATE OF r SKIP LOCKED" if self.pg else ""
        union = " UNION ALL ".join(f"SELECT * FROM {kind}" for kind in _RUNNABLE)
        busy = (
            "SELECT count(*) FROM runs b WHERE b.agent_id = c.agent_id "
            f"AND b.status = '{R.RUNNING.value}' AND b.lease_until >= {self.now}"
        )
        return f"{self._runnable(types, lock)}SELECT c.*, ({busy}) FROM ({union}) AS c"

    @functools.cache  # noqa: B019
    def lock_agents(self, types: int) -> str:
        """PostgreSQL: lock the agents that have runnable runs, in id order, waiting for them;
        returns each one's id, type, and whether its type is capped (``type_usage``).

        Two workers claiming for one agent then take turns, so neither can exceed the agent's
        cap, and neither comes away empty because the other held the row for a moment. The
        order, and locking no run before its agent, keep claims free of deadlocks. Runs of
        types whose caps were spent when the statement began are left out (they would take
        the places of others' runs); the caps themselves are checked after ``lock_types``.
        Parameters: the types, then as for ``candidates``.
        """
        kinds = " UNION ".join(f"SELECT agent_id FROM {kind}" for kind in _RUNNABLE)
        return (
            self._runnable(types, spent=True)
            + "SELECT agent_id, type, type IN (SELECT type FROM capped) FROM agents "
            f"WHERE agent_id IN ({kinds}) ORDER BY agent_id FOR UPDATE"
        )

    @functools.cache  # noqa: B019
    def lock_types(self, types: int) -> str:
        """PostgreSQL: lock these capped types' rows of ``agent_types``, in name order, after
        the agents (``lock_agents``): claims of one type take turns, so counting its runs and
        claims (``type_usage``, in the next statement, which sees the last turn's commit) is
        exact across workers. Parameters: the types."""
        return (
            f"SELECT type FROM agent_types WHERE type IN ({self._marks(types)}) ORDER BY type "
            "FOR NO KEY UPDATE"
        )

    @functools.cache  # noqa: B019
    def type_usage(self, types: int) -> str:
        """The capped types among ``types`` with their caps and what counts against them now:
        columns ``type, type_concurrency, running, rate_limit, rate_window, claims``.

        ``running``: its runs under a live lease. ``claims``: its runs claimed within the rate
        window (``runs.claimed_at``, set by every claim; a run claimed twice in one window
        counts once). A count is made only for a cap that is set. Parameters: now, now
        (SQLite only), then the types.
        """
        now = self.now
        since = (
            f"{now} - t.rate_window * interval '1 second'" if self.pg else f"{now} - t.rate_window"
        )
        running = (
            "SELECT count(*) FROM runs b JOIN agents ba ON ba.agent_id = b.agent_id "
            f"WHERE b.status = '{R.RUNNING.value}' AND b.lease_until >= {now} "
            "AND ba.type = t.type"
        )
        claims = (
            "SELECT count(*) FROM agents ba JOIN runs b ON b.agent_id = ba.agent_id "
            f"WHERE ba.type = t.type AND b.claimed_at > {since}"
        )
        return (
            "SELECT t.type, t.type_concurrency, CASE WHEN t.type_concurrency IS NULL THEN 0 "
            f"ELSE ({running}) END AS running, t.rate_limit, t.rate_window, "
            f"CASE WHEN t.rate_limit IS NULL THEN 0 ELSE ({claims}) END AS claims "
            f"FROM agent_types t WHERE t.type IN ({self._marks(types)}) "
            "AND (t.type_concurrency IS NOT NULL OR t.rate_limit IS NOT NULL)"
        )

    @functools.cache  # noqa: B019
    def load_states(self, versions: int) -> str:
        """State documents of one agent at these versions."""
        p = self.placeholder
        return (
            f"SELECT version, state FROM state_versions WHERE agent_id = {p} "
            f"AND version IN ({self._marks(versions)})"
        )

    def time(self, value: dt.datetime | None) -> Any:
        """A time parameter: epoch seconds on SQLite, an aware datetime on PostgreSQL."""
        if value is None:
            return None
        return value if self.pg else value.timestamp()
