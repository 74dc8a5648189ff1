"""Crash and race suite of budgets: real worker processes (``tests/procs/budget_app.py``) run
metered steps against budgets while the test SIGKILLs them at random moments, or while three
of them spend one parent's budget at once; an outside effect log says what really ran.

1. Under random SIGKILL: trees of runs (a root with a budget, children spending against it,
   the first child of each parent with a budget of its own) and runs alone with a budget, of
   steps that declare their cost and tokens, some reporting what they really used. Once every
   run completes, for every budget in the ledger: what it used is exactly the usage committed
   with the steps of its holder's subtree (nothing charged twice by a replay, nothing lost),
   nothing is left reserved, each step committed one execution's usage, and no step whose
   result was committed ran again (one cut short by a kill, or by its worker losing the run's
   lease, may run again; ``runs_taken_from_live_workers`` counts the runs that lost one).
2. Racing on three workers: twenty children of one parent spend its ``max_cost=1`` at once,
   in three worker processes whose step bodies overlap in time. Steps that use what they
   declared never take the budget over its limit, and spend it to the last step; steps that
   report more than they declared take it over by at most what the steps in flight at once
   reported beyond their declarations (the documented bound). Either way the ledger holds
   exactly the committed steps' cost.

Each failure names its trial and seed. ``TETHER_STRESS=1`` runs 40 trials per database of the
random test instead of 4; ``TETHER_CRASH_SEED`` replays a sequence of trials and
``TETHER_CRASH_TRIALS`` sets their number.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tether
from tests.crashkit import ROOT, EffectLog, Effects, worker_env
from tests.procs import budget_app
from tests.procs.budget_app import CHILD_BUDGET, METERS, TREE_BUDGET
from tether.testing import active_agent
from tether.types import StepInfo

STRESS = bool(os.environ.get("TETHER_STRESS"))
TRIALS = int(os.environ.get("TETHER_CRASH_TRIALS", "40" if STRESS else "4"))
WORKERS = 3
CONCURRENCY = 4
IN_FLIGHT = WORKERS * CONCURRENCY
"""The most steps in flight at once: every slot of every worker running one."""
LEASE = 2.0
WITHIN = 60.0
"""Seconds a trial's runs get to end before the test calls them stuck."""
FINAL = {"completed", "failed", "cancelled", "needs_attention"}

TREES, DEPTH, FAN, STEPS = 2, 2, 2, 4
"""Each trial's trees: a root, ``FAN`` children spawned and one called under each run above
depth 0, every run ``STEPS`` metered steps."""
SOLOS, SOLO_STEPS = 3, 9
"""And runs alone with a budget (nobody else spends against it: reserved in memory)."""
LIMITS = {"max_cost": "cost", "max_steps": "steps", "max_tokens": "tokens"}
"""The limits of every budget of the crash test, and what of the committed usage each counts."""

KIDS, KID_STEPS, DECLARED, OVER = 20, 4, 0.05, 0.08
"""The race: children of one parent, each ``KID_STEPS`` steps declaring ``DECLARED`` (in the
second variant reporting ``OVER``)."""
PARENT_MAX = 1.0


def _seed() -> int:
    return int(os.environ.get("TETHER_CRASH_SEED", str(random.randrange(2**32))))


def tree_size(depth: int) -> int:
    return 1 if depth == 0 else 1 + (FAN + 1) * tree_size(depth - 1)


class Cluster:
    """``WORKERS`` worker processes of the budget app, working until killed; each one killed
    is replaced at once. Their stderr goes to files, shown when a trial fails."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env, self.folder = env, folder
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: set[int] = set()
        self.started = 0

    def start(self) -> None:
        self.started += 1
        command = [sys.executable, "-m", "tests.procs.budget_app", "900", str(CONCURRENCY)]
        with open(self.folder / f"worker-{self.started}.err", "wb") as err:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=err
            )
        self.live[proc.pid] = proc

    def kill(self, pids: list[int]) -> None:
        """SIGKILL these workers at once, then start as many new ones."""
        procs = [self.live.pop(pid) for pid in pids]
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait(10)
            self.killed.add(proc.pid)
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
def cluster(db_url: str, log: Path, folder: Path) -> Iterator[Cluster]:
    workers = Cluster(worker_env(db_url, log, LEASE), folder)
    try:
        for _ in range(WORKERS):
            workers.start()
        yield workers
    finally:
        workers.close()


@contextmanager
def opened(db_url: str) -> Iterator[tether.App]:
    app = tether.App(db_url)
    budget_app.register(app)
    try:
        yield app
    finally:
        app.close()


def wait_until_ended(app: tether.App, run_ids: list[str], where: str, workers: Cluster) -> None:
    """Wait until every run has ended; fail naming the runs that did not (stuck)."""
    deadline = time.monotonic() + WITHIN
    while True:
        open_ = {r: s for r in run_ids if (s := app.get_run(r).status.value) not in FINAL}
        if not open_:
            return
        assert time.monotonic() < deadline, (
            f"{where}: runs stuck after {WITHIN:g}s: {open_}\n{workers.stderr()}"
        )
        time.sleep(0.02)


@dataclass
class Spent:
    """Usage summed from the steps the journals hold as completed."""

    steps: int = 0
    cost: float = 0.0
    tokens: int = 0

    def add(self, steps: list[StepInfo]) -> None:
        for step in steps:
            self.steps += 1
            self.cost += step.cost or 0.0
            self.tokens += step.tokens or 0


@dataclass
class Tree:
    """A run tree as its journals tell it: each run's metered steps and the children its
    spawns started, in order."""

    root: str
    steps: dict[str, list[StepInfo]] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, app: tether.App, root: str) -> Tree:
        tree = cls(root)
        todo = [root]
        while todo:
            run_id = todo.pop()
            journal = app.run_steps(run_id)
            tree.steps[run_id] = [s for s in journal if s.kind == "step"]
            tree.children[run_id] = [s.output for s in journal if s.kind == "spawn"]
            todo += tree.children[run_id]
        return tree

    def below(self, run_id: str) -> list[str]:
        """The run and every run under it."""
        found, todo = [], [run_id]
        while todo:
            found.append(todo.pop())
            todo += self.children[found[-1]]
        return found

    def spent(self, run_id: str) -> Spent:
        total = Spent()
        for rid in self.below(run_id):
            total.add([s for s in self.steps[rid] if s.status.value == "completed"])
        return total


def kill_at_random_moments(
    rng: random.Random, workers: Cluster, log: EffectLog, lines: int, figures: Counter[str]
) -> None:
    """One to three times, wait for the k-th BEGIN or DONE line (of at least ``lines`` the
    trial writes), pause a random moment or none, and SIGKILL the worker that wrote it
    (sometimes another one with it): inside a step body after its reservation, between a
    step's effect and its commit (which settles its usage), in a spawn, a claim or a
    reservation of the next step."""
    for target in sorted(rng.sample(range(1, lines), rng.randint(1, 3))):
        line = log.wait_for({"BEGIN", "DONE"}, target)
        if line is None:
            return  # a run is stuck: the trial's checks say which
        time.sleep(rng.choice([0.0, 0.0, rng.random() * 0.01]))
        writer = int(line[-1])
        victims = [writer] if writer in workers.live else [rng.choice(sorted(workers.live))]
        if rng.random() < 0.25:
            victims.append(rng.choice(sorted(set(workers.live) - set(victims))))
        workers.kill(victims)
        figures["kills"] += len(victims)
        figures[f"kills_at_{line[0]}"] += 1


TAKEN = ["run.claimed", "run.recovered", "run.lease_expired", "run.released"]


def taken_from(app: tether.App, run_id: str) -> set[int]:
    """The worker processes (pids) the run was taken from: it was handed back or recovered
    while one of them held it."""
    owner, lost = None, set()
    for event in app.events(run_id=run_id, types=TAKEN, limit=10_000):
        if event.type != "run.claimed" and owner is not None:
            lost.add(owner)
        if event.type in ("run.claimed", "run.recovered"):
            owner = int(event.data["worker"].split(":")[1])
    return lost


def check_steps(
    app: tether.App,
    tree: Tree,
    count: int,
    effects: Effects,
    killed: set[int],
    where: str,
    totals: Counter[str],
) -> None:
    """Every run of the tree completed with its ``count`` steps, each of which committed the
    usage of one execution (the reported, else the declared); the journal holds the last
    execution of each step in the effect log, and any other execution was cut short, by a
    kill or by the run being taken from its worker (its lease ran out): no step whose result
    was committed ran again."""
    for run_id, steps in tree.steps.items():
        lost = taken_from(app, run_id) - killed
        totals["runs_taken_from_live_workers"] += bool(lost)
        run = app.get_run(run_id)
        assert run.status.value == "completed", f"{where}: {run_id} {run.status} {run.error}"
        assert [(s.name, s.status.value) for s in steps] == [
            (f"s{i}", "completed") for i in range(count)
        ], f"{where}: {run_id} journal: {[(s.name, s.status.value) for s in steps]}"
        for i, step in enumerate(steps):
            meter = METERS[i % len(METERS)]
            assert (step.tool, step.cost, step.tokens) == (meter.tool, *meter.used), (
                f"{where}: {run_id} step {step.seq} ({step.name}) committed "
                f"{(step.tool, step.cost, step.tokens)}, one execution uses "
                f"{(meter.tool, *meter.used)}"
            )
            executions = effects.done[(run_id, step.seq)]
            tokens = [token for token, _pid in executions]
            assert step.output in tokens, f"{where}: {run_id} step {step.seq} never executed"
            totals["finished_rerun"] += tokens[-1] != step.output
            uncut = [(t, pid) for t, pid in executions[:-1] if pid not in killed | lost]
            assert not uncut, (
                f"{where}: {run_id} step {step.seq} ran again though neither a kill nor a lost "
                f"lease cut it short: {executions}"
            )
            totals["reruns_after_a_lost_lease"] += sum(pid in lost for _, pid in executions[:-1])
            totals["in_flight_reruns"] += len(executions) - 1
            totals["steps"] += 1
        assert run.result["tokens"] == [s.output for s in steps], f"{where}: {run_id} result"
        kids = [app.get_run(child).result for child in tree.children[run_id]]
        assert run.result["kids"] == kids, f"{where}: {run_id} got other results than its kids'"
        totals["runs"] += 1


def check_ledger(app: tether.App, tree: Tree, where: str, totals: Counter[str]) -> None:
    """For every budget of the tree (its root's, and the first child's of each run that
    spawned): each limit used exactly what the steps of its holder's subtree committed, and
    nothing is reserved any more."""
    holders = [tree.root] + [kids[0] for kids in tree.children.values() if kids]
    for holder in holders:
        spent = tree.spent(holder)
        usage = app.usage(holder)
        given = TREE_BUDGET if holder == tree.root else CHILD_BUDGET
        assert usage.budget == given.to_doc(), f"{where}: {holder} budget {usage.budget}"
        assert sorted(r["run_id"] for r in usage.runs) == sorted(tree.below(holder)), (
            f"{where}: {holder}'s subtree as App.usage sees it is not its journals'"
        )
        total = usage.total
        assert (total.steps, total.cost, total.tokens) == (spent.steps, spent.cost, spent.tokens), (
            f"{where}: App.usage({holder}).total is {total}, its steps committed {spent}"
        )
        own = {lim.limit: lim for lim in usage.limits if lim.holder == holder}
        assert sorted(own) == sorted(LIMITS), f"{where}: {holder} limits {usage.limits}"
        for name, counted in LIMITS.items():
            used, committed = own[name].used, float(getattr(spent, counted))
            # Exact: every amount is a sum of powers of two, so any order of adding is exact.
            assert used == committed, (
                f"{where}: {name} of run {holder}'s budget used {used}, the steps of its "
                f"subtree committed {committed} ({'charged twice' if used > committed else 'lost'})"
            )
        held = [(lim.holder, lim.limit, lim.reserved) for lim in usage.limits if lim.reserved]
        assert not held, f"{where}: reservations left after every run ended: {held}"
        totals["budgets"] += 1


@pytest.mark.timeout(600)
def test_each_budget_holds_exactly_its_subtrees_committed_usage_under_random_sigkill(
    db_url: str, tmp_path: Path
) -> None:
    """Each trial: two trees of runs with budgets and three runs alone with one, on three
    workers killed at random moments. Every run completes; every budget's ledger holds
    exactly what the steps of its holder's subtree committed, with nothing reserved."""
    seed = _seed()
    rng = random.Random(seed)
    log = tmp_path / "effects.log"
    effects = EffectLog(log)
    totals: Counter[str] = Counter()
    lines = 2 * (TREES * tree_size(DEPTH) * STEPS + SOLOS * SOLO_STEPS)
    with opened(db_url) as app, cluster(db_url, log, tmp_path) as workers:
        dialect = app.store.dialect
        print(f"budgets crash seed={seed} trials={TRIALS} db={dialect}")
        try:
            for trial in range(TRIALS):
                where = f"trial {trial} (seed {seed}, {dialect})"
                effects.begin()
                agent = active_agent(app, "tree", f"tree-{trial}").agent_id
                task = {"steps": STEPS, "depth": DEPTH, "fan": FAN}
                trees = [app.submit(agent, task, budget=TREE_BUDGET).run_id for _ in range(TREES)]
                alone = {"steps": SOLO_STEPS, "depth": 0, "fan": 0}
                solos = [app.submit(agent, alone, budget=TREE_BUDGET).run_id for _ in range(SOLOS)]
                kill_at_random_moments(rng, workers, effects, lines, totals)
                wait_until_ended(app, trees + solos, where, workers)
                workers.check(where)
                done = Effects.read(log)
                for root, count in [(r, STEPS) for r in trees] + [(r, SOLO_STEPS) for r in solos]:
                    tree = Tree.read(app, root)
                    expected = tree_size(DEPTH) if root in trees else 1
                    assert len(tree.steps) == expected, f"{where}: {root} tree {tree.children}"
                    check_steps(app, tree, count, done, workers.killed, where, totals)
                    check_ledger(app, tree, where, totals)
                totals["trials"] += 1
        finally:
            print(f"budgets crash totals ({dialect}): {dict(totals)}")
    assert totals["finished_rerun"] == 0, f"finished steps executed again: {totals} seed={seed}"


# -- 2. children racing for one budget -------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One step body of a child, as its BODY line tells it."""

    run_id: str
    seq: int
    started: float
    finished: float
    pid: int


def bodies(lines: list[list[str]]) -> list[Body]:
    return [
        Body(line[1], int(line[2]), float(line[3]), float(line[4]), int(line[5]))
        for line in lines
        if line[0] == "BODY" and len(line) == 6
    ]


def wait_for_runs(
    log: EffectLog, kind: str, count: int, where: str, workers: Cluster
) -> list[list[str]]:
    """The first line of ``kind`` of each of ``count`` runs, once they are written."""
    deadline = time.monotonic() + WITHIN
    while True:
        found: dict[str, list[str]] = {}
        for line in log.read():
            if line[0] == kind:
                found.setdefault(line[1], line)
        if len(found) >= count:
            return list(found.values())
        assert time.monotonic() < deadline, (
            f"{where}: only {len(found)} runs wrote {kind}: {found}\n{workers.stderr()}"
        )
        time.sleep(0.002)


def most_at_once(found: list[Body]) -> int:
    """The most bodies running at one moment."""
    edges = sorted([(b.started, 1) for b in found] + [(b.finished, -1) for b in found])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.timeout(300)
@pytest.mark.parametrize("report", [None, OVER], ids=["as-declared", "reported-over"])
def test_children_on_three_workers_spend_their_parents_budget_at_once_within_the_bound(
    db_url: str, tmp_path: Path, report: float | None
) -> None:
    """A parent with ``max_cost=1`` spawns twenty children of four steps declaring 0.05 each;
    three worker processes run them at once. Children that would go over fail with
    ``BudgetExceeded``; the parent goes on without them. The ledger holds exactly the
    committed steps' cost, which is at most the limit when steps use what they declared, and
    at most the limit plus 0.03 for each step in flight at once when they report 0.08."""
    log = tmp_path / "effects.log"
    effects = EffectLog(log)
    with opened(db_url) as app, cluster(db_url, log, tmp_path) as workers:
        where = f"{app.store.dialect}, report={report}"
        active_agent(app, "kid", "kids")
        active_agent(app, "fanout", "parent")
        go = tmp_path / "go"
        child = {"steps": KID_STEPS, "cost": DECLARED, "sleep": [0.02, 0.08], "report": report}
        child["go"] = str(go)
        task = {"kids": KIDS, "kid": "kids", "child": child}
        parent = app.submit("parent", task, budget=tether.Budget(max_cost=PARENT_MAX)).run_id
        # Left to the scheduler, the children may take turns: they start once every slot of
        # every worker holds one of them.
        ready = wait_for_runs(effects, "READY", IN_FLIGHT, where, workers)
        assert len({line[-1] for line in ready}) == WORKERS, f"{where}: claimed by {ready}"
        go.touch()
        wait_until_ended(app, [parent], where, workers)
        workers.check(where)
        run = app.get_run(parent)
        assert run.status.value == "completed", f"{where}: parent {run.status} {run.error}"
        spawned = [s.output for s in app.run_steps(parent) if s.kind == "spawn"]
        assert len(spawned) == KIDS
        assert sorted([*run.result["done"], *run.result["failed"]]) == sorted(spawned)

        committed: list[StepInfo] = []
        for child_id in spawned:
            kid = app.get_run(child_id)
            steps = [s for s in app.run_steps(child_id) if s.kind == "step"]
            if child_id in run.result["failed"]:
                error = kid.error or {}
                assert (error.get("type"), error.get("holder"), error.get("limit")) == (
                    "BudgetExceeded",
                    parent,
                    "max_cost=1",
                ), f"{where}: {child_id} failed with {error}"
                assert run.result["failed"][child_id]["type"] == "BudgetExceeded"
            else:
                assert kid.status.value == "completed", f"{where}: {child_id} {kid.status}"
                assert len(steps) == KID_STEPS
            assert all(s.status.value == "completed" for s in steps), f"{where}: {steps}"
            committed += steps
        used_each = DECLARED if report is None else report
        assert {s.cost for s in committed} == {used_each}, f"{where}: committed costs"

        usage = app.usage(parent)
        [limit] = usage.limits
        assert (limit.holder, limit.limit, limit.max) == (parent, "max_cost", PARENT_MAX)
        cost = sum(s.cost or 0.0 for s in committed)
        assert limit.used == pytest.approx(cost, abs=1e-9), (
            f"{where}: the ledger used {limit.used}, the committed steps cost {cost}"
        )
        assert usage.total.cost == pytest.approx(cost, abs=1e-9)
        assert usage.total.steps == len(committed)
        assert limit.reserved == 0, f"{where}: {limit.reserved} left reserved"
        if report is None:
            # Steps that use what they declared never take a budget over its limit, and
            # (nothing left reserved by a step that never ran) spend it to its last step.
            assert limit.used <= PARENT_MAX + 1e-9, f"{where}: overspent: {limit.used}"
            assert len(committed) == round(PARENT_MAX / DECLARED), (
                f"{where}: {len(committed)} steps committed of {PARENT_MAX / DECLARED:g} "
                "that the budget pays for"
            )
        else:
            bound = PARENT_MAX + IN_FLIGHT * (OVER - DECLARED)
            assert limit.used <= bound + 1e-9, (
                f"{where}: used {limit.used}, over the bound {bound} for {IN_FLIGHT} steps "
                "in flight at once"
            )

        # The race happened: step bodies of different worker processes overlapped in time.
        found = bodies(effects.all())
        ran = Counter((b.run_id, b.seq) for b in found)
        journaled = Counter((s.run_id, s.seq) for s in committed)
        assert not journaled - ran, f"{where}: committed, never ran: {journaled - ran}"
        # A body that ran more often than its step committed was cut short: its run was taken
        # from its worker (no worker is killed here).
        again = ran - journaled
        unexplained = {key: n for key, n in again.items() if not taken_from(app, key[0])}
        assert not unexplained, f"{where}: bodies that ran again, no lease lost: {unexplained}"
        overlapping = [
            (a, b)
            for i, a in enumerate(found)
            for b in found[i + 1 :]
            if a.pid != b.pid and a.started < b.finished and b.started < a.finished
        ]
        assert overlapping, f"{where}: no two step bodies of different processes overlapped"
        figures = {
            "children": KIDS,
            "failed": len(run.result["failed"]),
            "steps": len(committed),
            "used": limit.used,
            "overspent": round(max(0.0, limit.used - PARENT_MAX), 9),
            "processes": len({b.pid for b in found}),
            "overlapping_pairs": len(overlapping),
            "most_at_once": most_at_once(found),
            "bodies_cut_short_by_a_lost_lease": sum(again.values()),
        }
        print(f"budget race figures ({where}): {figures}")
