"""Crash suite of messages and delegation: several real worker processes race for the same
messages and runs while the test SIGKILLs them at random moments; an outside effect log
(``tests/procs/coordination_app.py``) says what really ran.

- Messages: producers send, consumers of the same agents race to receive and process each
  message in a step. Every message is stored once and consumed once (the row, the consumers'
  journals), and no message is processed by two runs (the log); a processing step in flight at
  a kill may run again, for the same run and journal position only.
- Racing for one message: three runs, each claimed by its own worker process, call
  ``receive`` at the same moment for one message: one consumer. A gate holds the recipient
  until all of them are inside their call.
- Delegation: parents fan out to children, wait for them, then call one more: one child per
  spawn, whatever is killed when, and the parent's result is the children's, in order.
- A send whose run is killed before its next commit is stored once when the run replays.

Each failure names its trial and seed. ``TETHER_STRESS=1`` runs 100 trials per database of
each random test instead of 10; ``TETHER_CRASH_SEED`` replays a sequence of trials and
``TETHER_CRASH_TRIALS`` sets their number.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import tether
from tests.crashkit import ROOT, EffectLog, wait_for_each, worker_env
from tests.procs import coordination_app
from tests.racekit import assert_all_inside, gate
from tether.store.schema import messages as messages_table
from tether.store.schema import runs as runs_table

STRESS = bool(os.environ.get("TETHER_STRESS"))
TRIALS = int(os.environ.get("TETHER_CRASH_TRIALS", "100" if STRESS else "10"))
RACE_ROUNDS = 20 if STRESS else 3
WORKERS = 3
LEASE = 2.0
WITHIN = 60.0
"""Seconds a trial's runs get to end before the test calls them stuck."""

PRODUCERS, INBOXES, CONSUMERS_PER_INBOX = 4, 2, 3
MESSAGES_PER_PRODUCER = 6
PARENTS, FAN = 3, 5
FINAL = {"completed", "failed", "cancelled", "needs_attention"}


def _seed() -> int:
    return int(os.environ.get("TETHER_CRASH_SEED", str(random.randrange(2**32))))


class Cluster:
    """``WORKERS`` worker processes of the coordination app, working until killed; each one
    killed is replaced at once. Their stderr goes to files, shown when a trial fails."""

    def __init__(self, env: dict[str, str], folder: Path, concurrency: int) -> None:
        self.env, self.folder, self.concurrency = env, folder, concurrency
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.started = 0
        self.kills = 0

    def start(self) -> None:
        self.started += 1
        with open(self.folder / f"worker-{self.started}.err", "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.procs.coordination_app",
                    "900",
                    str(self.concurrency),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.live[proc.pid] = proc

    def kill(self, pids: list[int]) -> None:
        """SIGKILL these workers at once, then start as many new ones."""
        procs = [self.live.pop(pid) for pid in pids]
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait(10)
            self.kills += 1
            self.start()

    def check(self, where: str) -> None:
        """Fail if a worker ended that the test did not kill."""
        ended = {pid: p.returncode for pid, p in self.live.items() if p.poll() is not None}
        assert not ended, f"{where}: worker processes ended by themselves: {ended}\n{self.stderr()}"

    def stderr(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()}"
            for path in sorted(self.folder.glob("worker-*.err"))
            if path.stat().st_size
        )

    def close(self) -> None:
        for proc in self.live.values():
            proc.kill()
        for proc in self.live.values():
            proc.wait(10)


@contextmanager
def cluster(db_url: str, log: Path, folder: Path, concurrency: int) -> Iterator[Cluster]:
    workers = Cluster(worker_env(db_url, log, LEASE), folder, concurrency)
    try:
        for _ in range(WORKERS):
            workers.start()
        yield workers
    finally:
        workers.close()


def active(app: tether.App, type_: str, agent_id: str) -> str:
    app.create_agent(type_, agent_id)
    app.initialize(agent_id)
    app.activate(agent_id)
    return agent_id


def kill_at_random_moments(
    rng: random.Random, workers: Cluster, log: EffectLog, kinds: set[str], lines: int
) -> None:
    """One to three times, wait for the k-th line of ``kinds`` (of at least ``lines`` the
    trial writes), pause a random moment or none, and SIGKILL the worker that wrote it
    (sometimes another one with it): inside a step body, between a step's effect and its
    commit, in a send, a receive, a spawn or a claim."""
    for target in sorted(rng.sample(range(1, lines), rng.randint(1, 3))):
        line = log.wait_for(kinds, target)
        if line is None:
            return  # a run is stuck: the trial's checks say which
        time.sleep(rng.choice([0.0, 0.0, rng.random() * 0.01]))
        writer = int(line[-1])
        victims = [writer] if writer in workers.live else [rng.choice(sorted(workers.live))]
        if rng.random() < 0.25:
            victims.append(rng.choice(sorted(set(workers.live) - set(victims))))
        workers.kill(victims)


def wait_until_ended(app: tether.App, run_ids: list[str], where: str, workers: Cluster) -> None:
    """Wait until every run has ended; fail naming the runs that did not (stuck)."""
    deadline = time.monotonic() + WITHIN
    while True:
        with app.store.db.read() as conn:
            statuses = dict(
                conn.execute(
                    select(runs_table.c.run_id, runs_table.c.status).where(
                        runs_table.c.run_id.in_(run_ids)
                    )
                ).all()
            )
        open_ = {r: s for r, s in statuses.items() if s not in FINAL}
        if not open_:
            return
        assert time.monotonic() < deadline, (
            f"{where}: runs stuck after {WITHIN:g}s: {open_}\n{workers.stderr()}"
        )
        time.sleep(0.02)


def journal(app: tether.App, run_id: str, kind: str) -> list[tether.StepInfo]:
    return [s for s in app.run_steps(run_id) if s.kind == kind]


@dataclass
class Trials:
    """A random crash test's parts: its app, seeded random source, workers, log, totals."""

    app: tether.App
    rng: random.Random
    workers: Cluster
    effects: EffectLog
    totals: Counter[str]
    seed: int

    def begin(self, trial: int) -> tuple[str, int]:
        """Start a trial: its name (for failures) and the kill count so far."""
        self.effects.begin()
        return f"trial {trial} (seed {self.seed}, {self.app.store.dialect})", self.workers.kills

    def end(self, kills: int) -> None:
        self.totals["trials"] += 1
        self.totals["kills"] += self.workers.kills - kills


@contextmanager
def random_trials(db_url: str, tmp_path: Path, what: str) -> Iterator[Trials]:
    """A cluster of workers and the test's app; prints the seed and the totals, and checks at
    the end that no finished step ran again."""
    seed = _seed()
    app = tether.App(db_url)
    coordination_app.register(app)
    totals: Counter[str] = Counter()
    print(f"{what} crash seed={seed} trials={TRIALS} db={app.store.dialect}")
    log = tmp_path / "effects.log"
    try:
        with cluster(db_url, log, tmp_path, concurrency=4) as workers:
            yield Trials(app, random.Random(seed), workers, EffectLog(log), totals, seed)
    finally:
        print(f"{what} crash totals: {dict(totals)}")
        app.close()
    assert totals["finished_rerun"] == 0, f"finished steps executed again: {totals} seed={seed}"


# -- 1. messages -----------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_each_message_is_consumed_once_under_random_sigkill_of_racing_workers(
    db_url: str, tmp_path: Path
) -> None:
    with random_trials(db_url, tmp_path, "messages") as t:
        app, rng, workers, effects = t.app, t.rng, t.workers, t.effects
        for trial in range(TRIALS):
            where, kills = t.begin(trial)
            inboxes = [active(app, "consumer", f"in-{trial}-{k}") for k in range(INBOXES)]
            producers = [active(app, "producer", f"p-{trial}-{k}") for k in range(PRODUCERS)]
            per_consumer = PRODUCERS * MESSAGES_PER_PRODUCER // INBOXES // CONSUMERS_PER_INBOX
            submissions = [(p, {"count": MESSAGES_PER_PRODUCER, "to": inboxes}) for p in producers]
            submissions += [
                (inbox, {"count": per_consumer})
                for inbox in inboxes
                for _ in range(CONSUMERS_PER_INBOX)
            ]
            # Consumers first (they park, and sends wake them) or producers first (the
            # messages are there when they look), or mixed.
            rng.shuffle(submissions)
            run_ids = {
                app.submit(agent_id, task).run_id: agent_id for agent_id, task in submissions
            }
            sent = PRODUCERS * MESSAGES_PER_PRODUCER
            kill_at_random_moments(rng, workers, effects, {"MADE", "PROC"}, 2 * sent)
            wait_until_ended(app, list(run_ids), where, workers)
            workers.check(where)
            check_messages(app, run_ids, producers, inboxes, effects.all(), where, t.totals)
            t.end(kills)
            t.totals["messages"] += sent


def check_messages(
    app: tether.App,
    run_ids: dict[str, str],
    producers: list[str],
    inboxes: list[str],
    lines: list[list[str]],
    where: str,
    totals: Counter[str],
) -> None:
    runs = {run_id: app.get_run(run_id) for run_id in run_ids}
    failed = {
        r: (i.status.value, i.error) for r, i in runs.items() if i.status.value != "completed"
    }
    assert not failed, f"{where}: runs did not complete: {failed}"
    with app.store.db.read() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(
                select(messages_table).where(messages_table.c.recipient.in_(inboxes))
            )
        ]
        repeated_keys = conn.execute(
            select(messages_table.c.recipient, messages_table.c.key, func.count())
            .group_by(messages_table.c.recipient, messages_table.c.key)
            .having(func.count() > 1)
        ).all()
    assert not repeated_keys, f"{where}: one key stored twice for a recipient: {repeated_keys}"

    # Stored once: one row per message the producers meant to send, none else.
    by_logical = Counter(row["payload"]["id"] for row in rows)
    twice = {k: n for k, n in by_logical.items() if n > 1}
    assert not twice, f"{where}: messages stored more than once: {twice}"
    producer_runs = [r for r, agent in run_ids.items() if agent in producers]
    meant = {f"{r}/{i}" for r in producer_runs for i in range(MESSAGES_PER_PRODUCER)}
    assert set(by_logical) == meant, (
        f"{where}: lost {sorted(meant - set(by_logical))}, extra {sorted(set(by_logical) - meant)}"
    )
    rows_by_id = {row["message_id"]: row for row in rows}
    by_logical_row = {row["payload"]["id"]: row for row in rows}
    for run_id in producer_runs:
        made = {s.seq: s.output for s in journal(app, run_id, "step")}
        sends = journal(app, run_id, "send")
        assert [s.output for s in sends] == runs[run_id].result, f"{where}: {run_id} sends"
        for i, send in enumerate(sends):
            row = by_logical_row[f"{run_id}/{i}"]
            assert send.output == row["message_id"], f"{where}: {run_id} send {i}: {row}"
            assert row["sender_run"] == run_id
            # The payload carries the output the journal holds of the step before the send.
            assert row["payload"]["value"] == made[send.seq - 1], f"{where}: {row}"

    # The outside log: who processed each message, and every execution of each step.
    processed: dict[str, list[list[str]]] = defaultdict(list)
    for line in lines:
        if line[0] == "PROC" and len(line) == 8:
            processed[line[1]].append(line)

    # Consumed once: every row consumed by one consumer run of its recipient, at the journal
    # position of that run's receive which holds it; no receive holds a message twice.
    received: Counter[str] = Counter()
    for run_id, agent in run_ids.items():
        if agent not in inboxes:
            continue
        steps = {s.seq: s for s in app.run_steps(run_id)}
        got = []
        for entry in (s for s in steps.values() if s.kind == "receive"):
            message_id = entry.output["message"]["message_id"]
            received[message_id] += 1
            row = rows_by_id[message_id]
            assert (row["consumed_by"], row["consumed_seq"]) == (run_id, entry.seq), (
                f"{where}: {message_id} is in the journal of {run_id} at {entry.seq} but was "
                f"consumed by {row['consumed_by']} at {row['consumed_seq']}"
            )
            assert row["recipient"] == agent
            # Processed right after (the log), by this run at the next position only: a rerun
            # there (a kill while the step was in flight) is allowed, a second consumer not.
            executions = processed[message_id]
            places = {(line[4], int(line[5]), line[3]) for line in executions}
            assert len(places) == 1, f"{where}: {message_id} processed by: {sorted(places)}"
            assert places.pop()[:2] == (run_id, entry.seq + 1), (
                f"{where}: {message_id}, consumed by {run_id} at {entry.seq}, was processed "
                f"at {executions}"
            )
            # The journal holds the last execution: a finished step never ran again.
            step = steps[entry.seq + 1]
            tokens = [line[6] for line in executions]
            assert step.output in tokens, f"{where}: {run_id} step {step.seq} never executed"
            totals["finished_rerun"] += tokens[-1] != step.output
            totals["processing_reruns"] += len(tokens) - 1
            got.append([message_id, row["payload"]["value"], step.output])
        assert runs[run_id].result == got, f"{where}: {run_id} result is not its journal"
    unconsumed = [r["message_id"] for r in rows if r["consumed_by"] is None]
    assert not unconsumed, f"{where}: messages never consumed: {unconsumed}"
    assert set(received) == set(rows_by_id), f"{where}: consumed but in no journal"
    assert max(received.values()) == 1, f"{where}: received twice: {received.most_common(3)}"
    # How many recipients had their messages processed in more than one worker process at
    # once... in one trial: the consumers raced across processes.
    for inbox in inboxes:
        pids = {
            line[7]
            for row in rows
            if row["recipient"] == inbox
            for line in processed[row["message_id"]]
        }
        totals["inboxes_served_by_several_processes"] += len(pids) > 1


# -- 2. racing for one message ---------------------------------------------------------------


@pytest.mark.timeout(300)
def test_workers_racing_for_one_message_leave_it_one_consumer(db_url: str, tmp_path: Path) -> None:
    """Three runs of one agent, each claimed by a worker process of its own (one slot each),
    call ``receive`` for the agent's one message while a gate holds the agent; the gate opens
    once all three are inside the call. One takes the message, the others park until two more
    messages come, one each."""
    log = tmp_path / "effects.log"
    app = tether.App(db_url)
    coordination_app.register(app)
    figures: Counter[str] = Counter()
    try:
        with cluster(db_url, log, tmp_path, concurrency=1) as workers:
            effects = EffectLog(log)
            for round_ in range(RACE_ROUNDS):
                where = f"round {round_} ({app.store.dialect})"
                effects.begin()
                inbox = active(app, "racer", f"race-{round_}")
                raced = app.send(inbox, {"round": round_})
                go = tmp_path / f"go-{round_}"
                racers = [app.submit(inbox, {"go": str(go)}).run_id for _ in range(WORKERS)]
                ready = wait_for_each(effects, "READY", racers, where)
                assert len({line[-1] for line in ready.values()}) == WORKERS, (
                    f"{where}: the racers were not claimed by {WORKERS} processes: {ready}"
                )
                with gate(app, [inbox]) as held:
                    go.touch()
                    wait_for_each(effects, "ENTER", racers, where)
                    held.hold_until_queued(WORKERS)
                # One consumer; the others parked, waiting for a message.
                deadline = time.monotonic() + WITHIN
                while sorted(app.get_run(r).status.value for r in racers) != [
                    "completed",
                    *["waiting"] * (WORKERS - 1),
                ]:
                    statuses = {r: app.get_run(r).status.value for r in racers}
                    assert time.monotonic() < deadline, f"{where}: racers stuck: {statuses}"
                    time.sleep(0.01)
                [row] = [m for m in app.messages(agent_id=inbox) if m.message_id == raced]
                winner = app.get_run(row.consumed_by or "")
                assert winner.status.value == "completed" and winner.result == raced
                later = [app.send(inbox, {"round": round_, "later": n}) for n in range(WORKERS - 1)]
                wait_until_ended(app, racers, where, workers)
                workers.check(where)

                consumers = {m.message_id: m.consumed_by for m in app.messages(agent_id=inbox)}
                assert sorted(consumers) == sorted([raced, *later])
                assert sorted(consumers.values()) == sorted(racers), f"{where}: {consumers}"
                assert {app.get_run(r).result for r in racers} == {raced, *later}
                for run_id in racers:
                    [entry] = journal(app, run_id, "receive")
                    assert entry.output["message"]["message_id"] == app.get_run(run_id).result
                # The racers were inside receive when the gate opened: each one's first call
                # (a loser's replay calls again) spans the moment.
                calls = []
                for run_id in racers:
                    enter = next(line for line in effects.all() if line[:2] == ["ENTER", run_id])
                    left = next(line for line in effects.all() if line[:2] == ["LEFT", run_id])
                    calls.append(
                        {"run": run_id, "started": float(enter[2]), "finished": float(left[2])}
                    )
                assert_all_inside(held.opened, calls)
                figures["rounds"] += 1
                figures["racers"] += WORKERS
    finally:
        print(f"message race figures ({app.store.dialect}): {dict(figures)}")
        app.close()


# -- 3. delegation ---------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_each_spawn_starts_one_child_and_parents_get_their_results_under_random_sigkill(
    db_url: str, tmp_path: Path
) -> None:
    with random_trials(db_url, tmp_path, "delegation") as t:
        app, rng, workers, effects = t.app, t.rng, t.workers, t.effects
        for trial in range(TRIALS):
            where, kills = t.begin(trial)
            kid = active(app, "child", f"kid-{trial}")
            parents = [
                app.submit(
                    active(app, "parent", f"parent-{trial}-{k}"), {"fan": FAN, "kid": kid}
                ).run_id
                for k in range(PARENTS)
            ]
            # PLAN lines come right before a spawn (kills land before, in or after it);
            # CHILD lines in the children.
            kill_at_random_moments(
                rng, workers, effects, {"PLAN", "CHILD"}, 2 * PARENTS * (FAN + 1)
            )
            wait_until_ended(app, parents, where, workers)
            workers.check(where)
            check_delegation(app, parents, kid, effects.all(), where, t.totals)
            t.end(kills)


def check_delegation(
    app: tether.App,
    parents: list[str],
    kid: str,
    lines: list[list[str]],
    where: str,
    totals: Counter[str],
) -> None:
    work: dict[str, list[str]] = defaultdict(list)  # child run -> tokens, in execution order
    plans: Counter[tuple[str, str]] = Counter()
    for line in lines:
        if line[0] == "CHILD" and len(line) == 6:
            work[line[1]].append(line[4])
        elif line[0] == "PLAN" and len(line) == 4:
            plans[(line[1], line[2])] += 1
    with app.store.db.read() as conn:
        children = [
            dict(r._mapping)
            for r in conn.execute(
                select(runs_table.c.run_id, runs_table.c.parent_run_id, runs_table.c.input).where(
                    runs_table.c.agent_id == kid
                )
            )
        ]
    by_parent: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for row in children:
        by_parent[row["parent_run_id"]].append(row)
    assert set(by_parent) <= set(parents), f"{where}: children of other runs: {set(by_parent)}"
    for parent_id in parents:
        parent = app.get_run(parent_id)
        assert parent.status.value == "completed", (
            f"{where}: {parent_id} {parent.status} {parent.error}"
        )
        spawns = journal(app, parent_id, "spawn")
        spawned = [s.output for s in spawns]
        # One child per spawn: the runs naming this parent are exactly those its spawns name.
        mine = by_parent[parent_id]
        assert len(spawned) == FAN + 1, f"{where}: {parent_id} journaled {len(spawned)} spawns"
        assert sorted(r["run_id"] for r in mine) == sorted(spawned), (
            f"{where}: {parent_id} spawned {spawned} but {len(mine)} runs name it their parent: "
            f"{sorted(r['run_id'] for r in mine)}"
        )
        inputs = {r["run_id"]: r["input"] for r in mine}
        assert [inputs[c]["i"] for c in spawned] == list(range(FAN + 1)), f"{where}: {inputs}"
        # The parent's result is its children's, in spawn order, each the child's journal.
        expected = []
        for i, child_id in enumerate(spawned):
            child = app.get_run(child_id)
            assert child.status.value == "completed", f"{where}: {child_id} {child.status}"
            assert child.parent_run_id == parent_id
            [step] = journal(app, child_id, "step")
            assert child.result == {"i": i, "token": step.output}
            tokens = work[child_id]
            assert step.output in tokens, f"{where}: {child_id}: output never executed"
            totals["finished_rerun"] += tokens[-1] != step.output
            totals["child_reruns"] += len(tokens) - 1
            expected.append(child.result)
        assert parent.result == expected, f"{where}: {parent_id} result {parent.result}"
        totals["parents"] += 1
        totals["children"] += len(spawned)
        totals["plan_reruns"] += sum(n - 1 for (run, _), n in plans.items() if run == parent_id)


# -- 4. a send, then a crash before the next commit -------------------------------------------


@pytest.mark.timeout(120)
def test_a_message_sent_before_a_crash_is_stored_once_when_its_run_replays(
    db_url: str, tmp_path: Path
) -> None:
    """Runs send (two with the default key, one with a key of their own), then hang in the
    next step until their worker is SIGKILLed, before that step commits. Replayed by a new
    worker, each run's send is its journal's: one row each, and a send from outside with the
    same key stores nothing new."""
    log = tmp_path / "effects.log"
    env = worker_env(db_url, log, LEASE)
    app = tether.App(db_url)
    coordination_app.register(app)
    try:
        inbox = active(app, "consumer", "inbox")
        sender = active(app, "sender", "sender")
        tasks = [{"to": inbox}, {"to": inbox}, {"to": inbox, "key": "my-key"}]
        run_ids = [app.submit(sender, task).run_id for task in tasks]
        effects = EffectLog(log)
        first = start_until_idle(env, tmp_path / "first.err")
        wait_for_each(effects, "AFTER", run_ids, "first worker")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert len(app.messages(agent_id=inbox)) == len(run_ids)  # sent before the kill

        second = start_until_idle(env, tmp_path / "second.err")
        second.wait(WITHIN)
        assert second.returncode == 0, (tmp_path / "second.err").read_text()

        rows = {m.sender_run: m for m in app.messages(agent_id=inbox)}
        assert sorted(rows) == sorted(run_ids), f"one message per run: {list(rows)}"
        lines = effects.all()
        for run_id in run_ids:
            run = app.get_run(run_id)
            assert run.status.value == "completed"
            assert run.result == rows[run_id].message_id
            [send] = journal(app, run_id, "send")
            assert send.output == rows[run_id].message_id
            [made, _after] = journal(app, run_id, "step")
            assert rows[run_id].payload == {"value": made.output}
            # The replay passed the send again: the step after it ran on both attempts.
            attempts = [line[2] for line in lines if line[:2] == ["AFTER", run_id]]
            assert attempts == ["1", "2"], f"{run_id}: {attempts}"
            assert sum(1 for line in lines if line[:2] == ["MADE", run_id]) == 1
        keyed = rows[run_ids[2]].message_id
        assert app.send(inbox, {"again": True}, key="my-key") == keyed
        assert len(app.messages(agent_id=inbox)) == len(run_ids)
    finally:
        app.close()


def start_until_idle(env: dict[str, str], err: Path) -> subprocess.Popen[bytes]:
    with open(err, "wb") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.procs.coordination_app", "60", "4", "--until-idle"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
