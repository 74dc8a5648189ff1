"""Which runs a worker claims, and in what order: priority first, then age; due timers and
expired leases as well as pending runs; never more at once than an agent's cap, even when
several workers claim at the same moment."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from sqlalchemy import insert, text, update

import tether
from tests import racekit
from tether.context import RunContext
from tether.store.schema import runs, waits
from tether.testing import active_agent

WORKER = "test-worker"
CLAIMERS = 3


@pytest.fixture
def queue(app: tether.App) -> tether.App:
    """An app with agent ``q1`` (type ``queued``, up to 100 runs at once) that does nothing."""

    @app.agent("queued", max_concurrent_runs=100)
    def handle(ctx: RunContext, task: Any) -> None:
        return None

    active_agent(app, "queued", "q1")
    return app


def claim(app: tether.App, limit: int, agent_types: tuple[str, ...] = ("queued",)) -> list[Any]:
    """The tasks of the runs one claim takes, in the order it took them."""
    claims = app.store.claim_runs(WORKER, agent_types, limit, lease_ttl=30)
    return [c.input for c in claims]


def test_higher_priority_runs_are_claimed_first_and_equal_ones_oldest_first(
    queue: tether.App,
) -> None:
    for name, priority in [("low-1", 0), ("high-1", 5), ("low-2", 0), ("mid", 2), ("high-2", 5)]:
        queue.submit("q1", name, priority=priority)

    assert claim(queue, 3) == ["high-1", "high-2", "mid"]
    assert claim(queue, 3) == ["low-1", "low-2"]
    assert claim(queue, 3) == []


def test_an_urgent_run_goes_first_however_long_the_queue_before_it(queue: tether.App) -> None:
    for i in range(20):
        queue.submit("q1", f"routine-{i}")
    queue.submit("q1", "urgent", priority=1)

    assert claim(queue, 1) == ["urgent"]
    assert claim(queue, 2) == ["routine-0", "routine-1"]


def test_a_due_timer_and_an_expired_lease_are_claimed_with_the_pending_runs(
    queue: tether.App,
) -> None:
    sleeping = queue.submit("q1", "sleeping").run_id
    orphaned = queue.submit("q1", "orphaned").run_id
    not_due = queue.submit("q1", "not-due").run_id
    queue.submit("q1", "pending")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    with queue.store.db.write() as conn:
        for run_id, deadline in ((sleeping, past), (not_due, future)):
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(status="waiting"))
            conn.execute(
                insert(waits),
                {"run_id": run_id, "seq": 1, "kind": "timer", "key": "", "deadline": deadline}
                | {"created_at": past},
            )
        conn.execute(
            update(runs)
            .where(runs.c.run_id == orphaned)
            .values(status="running", owner="dead-worker", lease_until=past)
        )

    assert claim(queue, 10) == ["sleeping", "orphaned", "pending"]  # by age: all priority 0
    assert queue.get_run(sleeping).wake_at is None  # claimed: its wait is withdrawn
    assert queue.get_run(not_due).status.value == "waiting"
    assert {queue.get_run(r).owner for r in (sleeping, orphaned)} == {WORKER}


def test_a_claim_takes_no_more_runs_of_an_agent_than_its_cap(app: tether.App) -> None:
    @app.agent("capped", max_concurrent_runs=2)
    def handle(ctx: RunContext, task: Any) -> None:
        return None

    active_agent(app, "capped", "c1")
    for i in range(5):
        app.submit("c1", i)

    assert claim(app, 5, ("capped",)) == [0, 1]
    assert claim(app, 5, ("capped",)) == []  # both still held under a live lease


def test_runs_of_an_agent_that_is_not_active_are_passed_over(queue: tether.App) -> None:
    for i in range(3):
        queue.submit("q1", f"paused-{i}", priority=9)

    queue.pause("q1")
    active_agent(queue, "queued", "q2")
    queue.submit("q2", "ready")

    assert claim(queue, 2) == ["ready"]


def test_racing_claims_take_each_run_once_and_no_more_of_an_agent_than_its_cap(
    queue: tether.App, db_url: str
) -> None:
    @queue.agent("capped", max_concurrent_runs=2)
    def handle(ctx: RunContext, task: Any) -> None:
        return None

    active_agent(queue, "capped", "c1")
    for i in range(4):
        queue.submit("c1", f"capped-{i}")  # the oldest runs: first in line for every claim
    for i in range(12):
        queue.submit("q1", f"queued-{i}")
    # One App per claimer, as worker processes have: their own connections and transactions.
    claimers = [tether.App(db_url, require_types=False) for _ in range(CLAIMERS)]
    entered = [threading.Event() for _ in claimers]
    results: list[dict[str, Any]] = [{} for _ in claimers]

    def claim_once(i: int) -> None:
        results[i]["started"] = time.time()
        entered[i].set()
        try:
            claims = claimers[i].store.claim_runs(f"w{i}", ("queued", "capped"), 4, lease_ttl=30)
            results[i]["taken"] = [c.input for c in claims]
        except Exception as exc:  # reported by the assertions below
            results[i]["error"] = exc
        results[i]["finished"] = time.time()

    for claimer in claimers:  # connect before the race, not during it
        claimer.get_agent("q1")
    threads = [threading.Thread(target=claim_once, args=(i,)) for i in range(CLAIMERS)]
    try:
        with racekit.gate(queue, ["q1", "c1"]) as gate:
            for thread in threads:
                thread.start()
            assert all(e.wait(10) for e in entered)
            gate.hold_until_queued(CLAIMERS)
    finally:
        for thread in threads:
            thread.join(30)
        for claimer in claimers:
            claimer.close()

    racekit.assert_all_inside(gate.opened, results)
    assert [r.get("error") for r in results] == [None] * CLAIMERS
    # Each claimer waited its turn and came away full: none was turned away empty-handed.
    assert [len(r["taken"]) for r in results] == [4] * CLAIMERS
    taken = [task for r in results for task in r["taken"]]
    assert len(set(taken)) == len(taken)  # no run claimed twice
    assert sorted(t for t in taken if t.startswith("capped")) == ["capped-0", "capped-1"]


# -- the next run is claimed in the write that ends the last --------------------------------


def transaction_of(app: tether.App, run_id: str, event_type: str) -> Any:
    """What identifies the transaction that wrote a run's event: on PostgreSQL the row's
    ``xmin`` (its transaction id); on SQLite its time, which every write of a transaction
    shares (and no two transactions do: they take turns, each reading the clock anew)."""
    [event] = [e for e in app.timeline(run_id) if e.type == event_type]
    if app.store.dialect != "postgresql":
        return event.at
    with app.store.db.read() as conn:
        query = text("SELECT xmin::text FROM events WHERE seq = :seq")
        return conn.execute(query, {"seq": event.seq}).scalar_one()


def test_a_worker_claims_its_next_run_in_the_write_that_ends_the_last(
    queue: tether.App,
) -> None:
    first, second, third = (queue.submit("q1", i).run_id for i in range(3))

    queue.work(until_idle=True, concurrency=1, timeout=20)

    def same_write(done: str, next_: str) -> bool:
        return transaction_of(queue, done, "run.completed") == transaction_of(
            queue, next_, "run.claimed"
        )

    assert same_write(first, second)
    assert same_write(second, third)
    assert [queue.get_run(r).status.value for r in (first, second, third)] == ["completed"] * 3


def test_a_stopping_worker_claims_nothing_when_it_hands_its_run_back(app: tether.App) -> None:
    workers: list[Any] = []

    def ask_the_worker_to_stop() -> None:
        workers[0].stop()

    @app.agent("stopper")
    def handle(ctx: RunContext, task: Any) -> None:
        ctx.step(ask_the_worker_to_stop)
        ctx.step(ask_the_worker_to_stop)

    active_agent(app, "stopper", "s1")
    first, second = (app.submit("s1", i).run_id for i in range(2))
    workers.append(app.worker(concurrency=1))

    workers[0].run(timeout=20)

    assert app.get_run(first).status.value == "pending"  # handed back after its first step
    assert [e.type for e in app.timeline(first)].count("run.claimed") == 1
    assert app.get_run(second).status.value == "pending"
    assert [e.type for e in app.timeline(second)] == ["run.submitted"]


def test_the_claim_order_index_keeps_priority_descending_after_every_migration(
    app: tether.App,
) -> None:
    # A migration that rebuilds the runs table (SQLite) must not lose the DESC: without it,
    # every claim sorts the whole queue again.
    with app.store.db.read() as conn:
        if app.store.dialect == "sqlite":
            definition = conn.execute(
                text("SELECT sql FROM sqlite_master WHERE name = 'ix_runs_claim_order'")
            ).scalar_one()
            plan = conn.execute(
                text(
                    "EXPLAIN QUERY PLAN SELECT run_id FROM runs WHERE status = 'pending' "
                    "ORDER BY priority DESC, created_at LIMIT 4"
                )
            ).all()
            assert not any("TEMP B-TREE" in str(step) for step in plan), plan
        else:
            definition = conn.execute(
                text(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_runs_claim_order' "
                    "AND schemaname = current_schema()"
                )
            ).scalar_one()
    assert "priority DESC" in definition
