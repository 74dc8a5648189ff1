"""Bounded history on a real database (SQLite and PostgreSQL).

Retention (``App.gc``) removes finished runs, old events and old state versions, and never
anything an unfinished run, a checkpoint or an agent's current state still needs. Every test
here counts rows before and after, and the expectation is worked out independently, in Python,
from the rows themselves and the policy's words.

A long history must not slow down the two reads people make all the time (the latest runs, one
run's timeline). Tests do not time things; they check the query plans use an index instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event, insert, select, update

import tether
from tether.context import RunContext
from tether.store.schema import (
    agents,
    checkpoints,
    events,
    incidents,
    runs,
    state_versions,
    steps,
)
from tether.testing import active_agent, work_until
from tether.types import FINAL_RUN_STATUSES, RunStatus

TIMEOUT = 20.0


def work(app: tether.App) -> None:
    """Run a worker until nothing can progress without a person (bounded, so a bug fails)."""
    app.work(until_idle=True, timeout=TIMEOUT)


FINAL = {s.value for s in FINAL_RUN_STATUSES}
KEEP = 2
"""``keep_state_versions`` of the policies below: small, so the live runs' versions are old."""

EVERYTHING = tether.Retention(
    keep_state_versions=KEEP, finished_runs_older_than=0, events_older_than=0
)
NOTHING = tether.Retention(
    keep_state_versions=None, finished_runs_older_than=None, events_older_than=None
)
TABLES = ("runs", "steps", "events", "state_versions", "incidents")
"""The tables gc removes from (``GcReport`` fields); every other table must not change."""


# -- building a history ------------------------------------------------------------------------


@dataclass
class History:
    """The runs of the history ``build_history`` makes, by what they are there to show."""

    completed: str
    aborted: str
    cancelled: str
    parent: str
    child: str
    waiting: str
    attention: str
    broken: dict[str, bool]

    @property
    def unfinished(self) -> list[str]:
        return [self.child, self.waiting, self.attention]


def build_history(app: tether.App) -> History:
    """Two agents with every kind of run, checkpoints and many state versions.

    Agent ``done``: a completed run (with a checkpoint taken inside it), a failed run (an
    incident aborted by a person), a cancelled run, and a completed parent whose child is still
    pending. Agent ``live``: a run waiting on a one-hour timer and a run that needs attention;
    both wrote state versions, and enough versions were written after them that a policy
    keeping the newest ``KEEP`` would remove theirs if it did not protect them.
    """
    broken = {"armed": True}

    def tick(i: int) -> int:
        return i

    def flaky() -> str:
        if broken["armed"]:
            raise ValueError("a bug no strategy fixes")
        return "fixed"

    executions = Counter[str]()

    @app.agent("history")
    def handle(ctx: RunContext, task: dict[str, Any]) -> dict[str, int]:
        executions[ctx.run_id] += 1
        for i in range(task.get("steps", 2)):
            ctx.state["count"] = ctx.state.get("count", 0) + 1
            # Not journaled: on replay, only the state version stored with the step brings
            # back the value the first execution wrote.
            ctx.state["execution"] = executions[ctx.run_id]
            ctx.step(tick, i, name=f"tick{i}")
        if "checkpoint" in task:
            ctx.checkpoint(task["checkpoint"])
        if task.get("fail"):
            ctx.state["flaky"] = "tried"
            ctx.step(flaky, name="flaky", retry=tether.Retry(max_attempts=1))
        if task.get("sleep"):
            ctx.sleep(task["sleep"])
        return {"count": ctx.state["count"], "execution": ctx.state["execution"]}

    for agent in ("done", "live"):
        active_agent(app, "history", agent)
    app.checkpoint("done", "before-runs")

    completed = app.submit("done", {"steps": 3, "checkpoint": "inside-run"})
    aborted = app.submit("done", {"fail": True})
    parent = app.submit("done", {"steps": 1})
    attention = app.submit("live", {"steps": 2, "fail": True})
    work(app)
    assert completed.status() == parent.status() == RunStatus.COMPLETED
    assert aborted.status() == attention.status() == RunStatus.NEEDS_ATTENTION
    app.resolve_incident(app.incidents(run_id=aborted.run_id)[0].incident_id, "abort")

    cancelled = app.submit("done", {"steps": 1, "sleep": 3600})
    waiting = app.submit("live", {"steps": 2, "sleep": 3600})
    work_until(app, lambda: cancelled.status() == waiting.status() == RunStatus.WAITING, timeout=20)
    app.cancel(cancelled.run_id)

    # A child run is started by its parent inside a run; the store's verb is used directly
    # because delegation is not what this suite is about. No worker runs after this point.
    child, _ = app.store.submit_run(
        "done", {"child": True}, task_id=None, priority=0, max_concurrent=1,
        parent_run_id=parent.run_id,
    )  # fmt: skip
    app.checkpoint("live", "after-runs")
    for i in range(4):
        app.patch_state("done", {"manual": i})
        app.patch_state("live", {"manual": i})

    history = History(
        completed=completed.run_id,
        aborted=aborted.run_id,
        cancelled=cancelled.run_id,
        parent=parent.run_id,
        child=child.run_id,
        waiting=waiting.run_id,
        attention=attention.run_id,
        broken=broken,
    )
    statuses = {r.run_id: r.status for r in app.list_runs(limit=None)}
    assert statuses == {
        history.completed: RunStatus.COMPLETED,
        history.aborted: RunStatus.FAILED,
        history.cancelled: RunStatus.CANCELLED,
        history.parent: RunStatus.COMPLETED,
        history.child: RunStatus.PENDING,
        history.waiting: RunStatus.WAITING,
        history.attention: RunStatus.NEEDS_ATTENTION,
    }
    return history


# -- reading the tables ------------------------------------------------------------------------

Rows = dict[str, list[dict[str, Any]]]


def snapshot(app: tether.App) -> Rows:
    """Every row of the tables gc touches (and of agents and checkpoints), as plain dicts."""
    with app.store.db.read() as conn:
        return {
            table.name: [dict(r._mapping) for r in conn.execute(select(table))]
            for table in (agents, runs, steps, events, state_versions, incidents, checkpoints)
        }


def expected_removal(
    rows: Rows, keep_versions: int | None, runs_too: bool, events_too: bool
) -> dict[str, int]:
    """What a pass with cut-offs in the future (everything is old enough) must remove.

    Straight from the policy's words: finished runs go with their journal, incidents and
    events, except a parent whose child still exists; events of finished runs and of agents
    go; per agent the ``keep_versions`` newest state versions stay, and so does every version
    a remaining run started from or that its journal refers to.
    """
    parents = {r["parent_run_id"] for r in rows["runs"] if r["parent_run_id"]}
    doomed = {
        r["run_id"]
        for r in rows["runs"]
        if runs_too and r["status"] in FINAL and r["run_id"] not in parents
    }
    live = {r["run_id"] for r in rows["runs"] if r["status"] not in FINAL}
    removed_events = [
        e
        for e in rows["events"]
        if e["run_id"] in doomed or (events_too and e["run_id"] not in live)
    ]
    removed_versions = 0
    if keep_versions is not None:
        kept_runs = [r for r in rows["runs"] if r["run_id"] not in doomed]
        for agent in rows["agents"]:
            mine = {r["run_id"] for r in kept_runs if r["agent_id"] == agent["agent_id"]}
            needed = {r["state_version"] for r in kept_runs if r["run_id"] in mine}
            needed |= {s["state_version"] for s in rows["steps"] if s["run_id"] in mine}
            removed_versions += sum(
                1
                for v in rows["state_versions"]
                if v["agent_id"] == agent["agent_id"]
                and v["version"] <= agent["version"] - keep_versions
                and v["version"] not in needed
            )
    return {
        "runs": len(doomed),
        "steps": sum(1 for s in rows["steps"] if s["run_id"] in doomed),
        "events": len(removed_events),
        "state_versions": removed_versions,
        "incidents": sum(1 for i in rows["incidents"] if i["run_id"] in doomed),
    }


def removed(report: Any) -> dict[str, int]:
    return {name: getattr(report, name) for name in TABLES}


def difference(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: before[name] - after[name] for name in before}


def of_runs(rows: list[dict[str, Any]], run_ids: list[str]) -> list[dict[str, Any]]:
    return [r for r in rows if r["run_id"] in run_ids]


# -- what a pass removes -----------------------------------------------------------------------


def test_gc_removes_exactly_what_the_policy_says(app: tether.App) -> None:
    history = build_history(app)
    expected = expected_removal(snapshot(app), KEEP, runs_too=True, events_too=True)
    before = app.store.count_rows()

    report = app.gc(EVERYTHING)

    after = app.store.count_rows()
    # The pass records itself: one gc.collected event is written after the removal.
    expected_difference = {**dict.fromkeys(before, 0), **expected, "events": expected["events"] - 1}
    assert difference(before, after) == expected_difference
    assert removed(report) == expected
    assert report.dry_run is False
    # The history really has something of each kind to remove, and the runs are the right ones.
    assert all(expected[name] > 0 for name in TABLES)
    remaining = {r.run_id for r in app.list_runs(limit=None)}
    assert remaining == {history.parent, *history.unfinished}
    [collected] = app.events(types=["gc.collected"])
    assert collected.data == expected


def test_gc_keeps_unfinished_and_needs_attention_runs_whole(app: tether.App) -> None:
    history = build_history(app)
    live = history.unfinished
    before = snapshot(app)

    app.gc(EVERYTHING)

    after = snapshot(app)
    for table in ("runs", "steps", "events", "incidents"):
        assert of_runs(after[table], live) == of_runs(before[table], live), table
    agent_of = {r["run_id"]: r["agent_id"] for r in before["runs"]}
    needed = {
        (agent_of[row["run_id"]], row["state_version"])
        for row in [*of_runs(before["runs"], live), *of_runs(before["steps"], live)]
        if row["state_version"] is not None
    }
    current = {a["agent_id"]: a["version"] for a in before["agents"]}
    # Without protection these would be gone: they are older than the KEEP newest versions.
    assert any(version <= current[agent] - KEEP for agent, version in needed)
    for agent, version in needed:
        assert app.get_state(agent, version).version == version


def test_a_run_needing_attention_still_replays_correctly_after_gc(app: tether.App) -> None:
    history = build_history(app)
    app.gc(EVERYTHING)

    history.broken["armed"] = False
    app.retry_run(history.attention)
    run = app.run(history.attention)
    work_until(app, lambda: run.status().is_final)  # the one-hour timer keeps until_idle busy

    # The second execution replays both ticks from the state versions its journal refers to
    # (which gc had to keep); at the end of its journal it finds that the agent's state moved on
    # (the waiting run counted to 4, a person patched it), and carries on from the stored state.
    result = run.result(timeout=1)
    assert result == {"count": 4, "execution": 1}
    assert app.get_agent("live").state["flaky"] == "tried"
    assert app.get_run(history.attention).attempts == 2


def test_gc_keeps_every_checkpoint_and_they_still_restore(app: tether.App) -> None:
    build_history(app)
    before = app.list_checkpoints()
    assert sorted(c.name for c in before) == ["after-runs", "before-runs", "inside-run"]

    app.gc(EVERYTHING)

    assert app.list_checkpoints() == before
    for ckpt in before:
        # pause=True: the agents still have unfinished runs, which restore would refuse.
        info = app.restore(ckpt.checkpoint_id, pause=True, wait=5)
        assert info.state == ckpt.state
        assert app.get_state(ckpt.agent_id).state == ckpt.state


def test_gc_keeps_each_agents_newest_state_versions(app: tether.App) -> None:
    build_history(app)
    current = {a.agent_id: a for a in app.list_agents()}

    app.gc(EVERYTHING)

    for agent_id, info in current.items():
        assert app.get_state(agent_id).state == info.state
        newest = [v.version for v in app.state_versions(agent_id)][-KEEP:]
        assert newest == list(range(info.version - KEEP + 1, info.version + 1))


# -- dry runs and partial policies -------------------------------------------------------------


def test_gc_dry_run_reports_what_a_real_pass_removes_and_removes_nothing(
    app: tether.App,
) -> None:
    build_history(app)
    before = snapshot(app)

    dry = app.gc(EVERYTHING, dry_run=True)

    assert snapshot(app) == before
    assert dry.dry_run is True
    real = app.gc(EVERYTHING)
    assert removed(dry) == removed(real)
    assert removed(dry) == expected_removal(before, KEEP, runs_too=True, events_too=True)


def test_gc_with_every_field_none_removes_nothing(app: tether.App) -> None:
    build_history(app)
    before = snapshot(app)

    report = app.gc(NOTHING)

    assert removed(report) == dict.fromkeys(TABLES, 0)
    assert snapshot(app) == before


@pytest.mark.parametrize(
    "field, untouched",
    [
        ("keep_state_versions", ["state_versions"]),
        ("finished_runs_older_than", ["runs", "steps", "incidents"]),
    ],
)
def test_gc_field_none_removes_nothing_of_that_kind(
    app: tether.App, field: str, untouched: list[str]
) -> None:
    build_history(app)
    rows = snapshot(app)
    policy = dataclasses.replace(EVERYTHING, **{field: None})
    before = app.store.count_rows()

    report = app.gc(policy)

    changed = difference(before, app.store.count_rows())
    assert {table: changed[table] for table in untouched} == dict.fromkeys(untouched, 0)
    assert removed(report) == expected_removal(
        rows,
        policy.keep_state_versions,
        runs_too=policy.finished_runs_older_than is not None,
        events_too=True,
    )


def test_gc_without_an_event_cutoff_removes_only_the_events_of_removed_runs(
    app: tether.App,
) -> None:
    build_history(app)
    rows = snapshot(app)
    policy = dataclasses.replace(EVERYTHING, events_older_than=None)

    report = app.gc(policy)

    gone = {r["run_id"] for r in rows["runs"]} - {r.run_id for r in app.list_runs(limit=None)}
    assert report.events == len(of_runs(rows["events"], sorted(gone))) > 0
    agent_events = [e for e in rows["events"] if e["run_id"] is None]
    assert agent_events  # created, initialized, state writes, checkpoints...
    assert [
        e for e in snapshot(app)["events"] if e["run_id"] is None and e["type"] != "gc.collected"
    ] == agent_events
    assert removed(report) == expected_removal(rows, KEEP, runs_too=True, events_too=False)


def test_gc_keeps_finished_runs_younger_than_the_cutoff(app: tether.App) -> None:
    history = build_history(app)
    # Move one finished run (and its events) two hours into the past; the rest are seconds old.
    two_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    with app.store.db.write() as conn:
        conn.execute(
            update(runs).where(runs.c.run_id == history.completed).values(finished_at=two_hours_ago)
        )
        conn.execute(
            update(events).where(events.c.run_id == history.completed).values(at=two_hours_ago)
        )
    finished = {r.run_id for r in app.list_runs(status=sorted(FINAL), limit=None)}
    its_events = len(app.timeline(history.completed))
    hour = tether.Retention(
        keep_state_versions=None, finished_runs_older_than=3600, events_older_than=3600
    )

    report = app.gc(hour)

    remaining = {r.run_id for r in app.list_runs(limit=None)}
    assert history.completed not in remaining
    assert finished - {history.completed} <= remaining
    # Nothing else was old enough: only the backdated run went, with its own events.
    assert removed(report) == {
        "runs": 1,
        "steps": 3 + 1,  # three ticks and the checkpoint taken inside the run
        "events": its_events,
        "state_versions": 0,
        "incidents": 0,
    }


def test_gc_keeps_a_parent_run_while_its_child_is_live(app: tether.App) -> None:
    history = build_history(app)
    parent_steps = app.run_steps(history.parent)

    app.gc(EVERYTHING)

    assert app.get_run(history.parent).status == RunStatus.COMPLETED
    assert app.run_steps(history.parent) == parent_steps
    assert app.get_run(history.child).parent_run_id == history.parent

    # Once the child is finished and gone, the parent goes too.
    app.cancel(history.child)
    app.gc(EVERYTHING)
    app.gc(EVERYTHING)
    remaining = {r.run_id for r in app.list_runs(limit=None)}
    assert remaining == {history.waiting, history.attention}


# -- a long history stays fast to read ---------------------------------------------------------

HISTORY_RUNS = 10_000


def bulk_history(app: tether.App) -> str:
    """10,000 finished runs with 2 steps and 3 events each, written in bulk; returns one id.

    The planner only prefers an index when a table is big enough for that to matter, and it
    needs statistics to know: hence the row counts and the ANALYZE.
    """

    @app.agent("bulk")
    def handle(ctx: RunContext, task: Any) -> None:
        return None

    app.create_agent("bulk", "b1")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=HISTORY_RUNS)
    run_rows, step_rows, event_rows = [], [], []
    for i in range(HISTORY_RUNS):
        run_id = f"run_bulk{i:06d}"
        at = start + dt.timedelta(seconds=i)
        run_rows.append(
            {
                "run_id": run_id,
                "agent_id": "b1",
                "status": RunStatus.COMPLETED.value,
                "created_at": at,
                "updated_at": at,
                "finished_at": at,
            }
        )
        for seq in (1, 2):
            step_rows.append(
                {"run_id": run_id, "seq": seq, "name": "s", "kind": "step", "status": "completed"}
            )
        for type_ in ("run.submitted", "step.completed", "run.completed"):
            event_rows.append({"run_id": run_id, "type": type_, "data": {"i": i}, "at": at})
    with app.store.db.write() as conn:
        conn.execute(insert(runs), run_rows)
        conn.execute(insert(steps), step_rows)
        conn.execute(insert(events), event_rows)
        if app.store.dialect == "postgresql":
            for table in ("runs", "steps", "events"):
                conn.exec_driver_sql(f"ANALYZE {table}")
        else:
            conn.exec_driver_sql("ANALYZE")
    return str(run_rows[HISTORY_RUNS // 2]["run_id"])


@contextmanager
def statements(app: tether.App) -> Iterator[list[tuple[str, Any]]]:
    """The SQL (with parameters) the store sends to the database while in the block."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    engine = app.store.db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def sqlite_plan(app: tether.App, statement: str, parameters: Any) -> list[str]:
    with app.store.db.read() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    return [str(r[-1]) for r in rows]


def postgres_plan(app: tether.App, statement: str, parameters: Any) -> list[dict[str, Any]]:
    """Every node of the plan, flattened (sub-plans included)."""
    with app.store.db.read() as conn:
        raw = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar_one()
    doc = json.loads(raw) if isinstance(raw, str) else raw
    nodes, todo = [], [doc[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


def assert_indexed(
    app: tether.App, statement: str, parameters: Any, table: str, index: str
) -> None:
    """``table`` is read through ``index``; nothing is read by a full scan or sorted whole."""
    if app.store.dialect == "sqlite":
        plan = sqlite_plan(app, statement, parameters)
        # "SCAN t" without "USING ... INDEX" reads the whole table. "USE TEMP B-TREE FOR RIGHT
        # PART OF ORDER BY" is allowed: it only orders rows sharing one created_at, in the
        # order the index already delivers, and stops at the LIMIT.
        assert not [p for p in plan if p.startswith("SCAN") and "INDEX" not in p], plan
        assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan
        assert any(f"{table} USING" in p and index in p for p in plan), plan
    else:
        nodes = postgres_plan(app, statement, parameters)
        types = [n["Node Type"] for n in nodes]
        # A full sort of the rows; an Incremental Sort over an index's order is allowed (it
        # only breaks ties within one created_at, and stops at the LIMIT).
        assert "Seq Scan" not in types and "Sort" not in types, types
        assert any(
            n.get("Relation Name") == table
            and n["Node Type"] in ("Index Scan", "Index Only Scan")
            and n.get("Index Name") == index
            for n in nodes
        ), nodes


def test_listing_the_latest_runs_uses_the_creation_time_index(app: tether.App) -> None:
    bulk_history(app)

    with statements(app) as seen:
        latest = app.list_runs(limit=50)

    assert len(latest) == 50 and latest[0].run_id == f"run_bulk{HISTORY_RUNS - 1:06d}"
    [(statement, parameters)] = [s for s in seen if "FROM runs" in s[0]]
    assert "ORDER BY" in statement and "LIMIT" in statement
    assert_indexed(app, statement, parameters, "runs", "ix_runs_created_at")


def test_reading_one_runs_timeline_uses_the_run_events_index(app: tether.App) -> None:
    run_id = bulk_history(app)

    with statements(app) as seen:
        timeline = app.timeline(run_id)

    assert [e.type for e in timeline] == ["run.submitted", "step.completed", "run.completed"]
    [(statement, parameters)] = [s for s in seen if "FROM events" in s[0]]
    assert_indexed(app, statement, parameters, "events", "ix_events_run_id_seq")
    # The run itself is looked up by its key, not found by a scan.
    for other, params in [s for s in seen if "FROM events" not in s[0]]:
        if app.store.dialect == "sqlite":
            plan = sqlite_plan(app, other, params)
            assert not [p for p in plan if p.startswith("SCAN") and "INDEX" not in p], plan
        else:
            assert "Seq Scan" not in [n["Node Type"] for n in postgres_plan(app, other, params)]
