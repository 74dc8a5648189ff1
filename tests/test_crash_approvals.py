"""Crash suite of approvals: real worker processes (``tests/procs/approval_app.py``) are
SIGKILLed before a decision, between a decision and its consumption, and after it; an outside
effect log says what really ran. Whatever is killed when, each approval is decided once and
consumed once (one row per run, one ``approval.consumed`` event, at the journal position that
asked), the run receives the person's decision, the gated step runs once if approved and never
if rejected, and no step whose result was journaled runs again.

1. Before the decision: runs parked on their approvals outlive a worker killed while idle and
   one killed while claiming others.
2. Between decision and consumption: decisions made while no worker runs; workers killed
   after they claimed a decided run and before its decision is consumed (held there, and at
   random tiny moments after the claim).
3. After the consumption: the worker is killed inside the step after the gated one; the
   replay takes the journaled decision and asks nothing again.
4. At random: a cluster of two or three workers killed at random moments while a decider
   thread approves or rejects approvals as they appear.

Each failure names its trial and seed. ``TETHER_STRESS=1`` runs 50 trials per database of the
random test instead of 10; ``TETHER_CRASH_SEED`` replays a sequence of trials and
``TETHER_CRASH_TRIALS`` sets their number.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tether
from tests.crashkit import ROOT, EffectLog, wait_for_each, worker_env
from tests.procs import approval_app
from tether.engine.executor import DEFAULT_STALL_LIMIT
from tether.testing import active_agent

STRESS = bool(os.environ.get("TETHER_STRESS"))
TRIALS = int(os.environ.get("TETHER_CRASH_TRIALS", "50" if STRESS else "10"))
RUNS_PER_TRIAL = 5
HANG_ROUNDS = DEFAULT_STALL_LIMIT - 2
"""At most this many workers killed at random tiny moments after claiming decided runs: a run
claimed ``DEFAULT_STALL_LIMIT`` times in a row without committing anything goes to a person
(a poison run), and the held worker's claim and the last worker's count too."""
LEASE = 2.0
WITHIN = 60.0
"""Seconds runs get to reach a state before the test calls them stuck."""
ACTOR = "ann"
FINAL = {"completed", "failed", "cancelled", "needs_attention"}
STEPS = (("prepare", "PREP", 2), ("ship", "SHIP", 2), ("after", "AFTER", 3))
"""Each step, its log lines' kind, and where those lines hold the execution's token."""


def _seed() -> int:
    return int(os.environ.get("TETHER_CRASH_SEED", str(random.randrange(2**32))))


def start_worker(
    env: dict[str, str],
    err: Path,
    *,
    until_idle: bool = False,
    hang: str | None = None,
    concurrency: int = 4,
) -> subprocess.Popen[bytes]:
    """A worker process of the approval app; with ``hang``, it stops at that point of every
    run (``approve``, ``decided`` or ``after``) until killed. Its stderr goes to ``err``."""
    if hang is not None:
        env = {**env, "TETHER_TEST_HANG": hang}
    command = [sys.executable, "-m", "tests.procs.approval_app", "120", str(concurrency)]
    with open(err, "wb") as stream:
        return subprocess.Popen(
            [*command, "--until-idle"] if until_idle else command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )


def sigkill(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return proc.pid


def finish(proc: subprocess.Popen[bytes], err: Path) -> None:
    """Wait for a worker started ``until_idle`` to end by itself, successfully."""
    assert proc.wait(WITHIN) == 0, f"worker failed:\n{err.read_text()}"


@contextmanager
def opened(db_url: str) -> Iterator[tether.App]:
    app = tether.App(db_url)
    approval_app.register(app)
    try:
        yield app
    finally:
        app.close()


def submit(app: tether.App, agent_id: str, count: int, first: int = 0) -> list[str]:
    return [app.submit(agent_id, {"n": first + i}).run_id for i in range(count)]


def wait_parked(app: tether.App, run_ids: list[str], where: str) -> dict[str, tether.ApprovalInfo]:
    """Wait until every run waits, parked on one pending approval: the approvals, by run."""
    deadline = time.monotonic() + WITHIN
    while True:
        found = {r: app.approvals(run_id=r, status="pending") for r in run_ids}
        statuses = {r: app.get_run(r).status.value for r in run_ids}
        if all(len(a) == 1 for a in found.values()) and set(statuses.values()) == {"waiting"}:
            return {r: a[0] for r, a in found.items()}
        assert time.monotonic() < deadline, f"{where}: runs not parked: {statuses}"
        time.sleep(0.01)


def wait_until_ended(app: tether.App, run_ids: list[str], where: str, errors: Path) -> None:
    """Wait until every run has ended; fail naming the runs that did not (stuck)."""
    deadline = time.monotonic() + WITHIN
    while True:
        open_ = {r: s for r in run_ids if (s := app.get_run(r).status.value) not in FINAL}
        if not open_:
            return
        assert time.monotonic() < deadline, (
            f"{where}: runs stuck after {WITHIN:g}s: {open_}\n{stderr(errors)}"
        )
        time.sleep(0.02)


def stderr(folder: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text()}"
        for path in sorted(folder.glob("*.err"))
        if path.stat().st_size
    )


def decide_all(
    app: tether.App, approvals: dict[str, tether.ApprovalInfo], verdicts: dict[str, bool]
) -> None:
    for run_id, approval in approvals.items():
        app.decide(
            approval.approval_id,
            verdicts[run_id],
            comment=f"verdict for {run_id}",
            digest=approval.digest,
            actor=ACTOR,
        )


def consumed(app: tether.App, run_id: str) -> int:
    return len(app.events(run_id=run_id, types=["approval.consumed"]))


def lines_of(lines: list[list[str]], kind: str, run_id: str) -> list[list[str]]:
    return [line for line in lines if line[0] == kind and line[1:2] == [run_id]]


def lines_of_kind(effects: EffectLog, kind: str) -> list[list[str]]:
    return [line for line in effects.read() if line[0] == kind]


def check_runs(
    app: tether.App,
    verdicts: dict[str, bool],
    lines: list[list[str]],
    killed: set[int],
    where: str,
    totals: Counter[str],
) -> None:
    """Every run completed with the person's decision, decided once and consumed once; its
    gated step ran if and only if approved; an execution of a step that the journal does not
    hold was cut short by a kill (its process was SIGKILLed), and the journal holds the last
    execution of each step: no finished step ran again."""
    for run_id, approved in verdicts.items():
        run = app.get_run(run_id)
        assert run.status.value == "completed", f"{where}: {run_id} {run.status} {run.error}"
        # One approval for the run, decided once by the person and consumed once, at the
        # journal position that asked.
        rows = app.approvals(run_id=run_id)
        assert len(rows) == 1, f"{where}: {run_id} asked {len(rows)} times: {rows}"
        [approval] = rows
        status = "approved" if approved else "rejected"
        assert (approval.status, approval.source, approval.decided_by) == (status, "human", ACTOR)
        assert approval.consumed_at is not None, f"{where}: {approval} never consumed"
        steps = app.run_steps(run_id)
        [asked] = [s for s in steps if s.kind == "approve"]
        assert asked.seq == approval.seq
        assert asked.output["approval"]["approval_id"] == approval.approval_id
        assert asked.output["approval"]["approved"] is approved
        assert run.result["decision"] == {
            "approved": approved,
            "decided_by": ACTOR,
            "source": "human",
            "comment": approval.comment,
            "approval_id": approval.approval_id,
        }, f"{where}: {run_id} received {run.result['decision']}"
        # Decided once: the same decision again is the stored one, another is refused.
        again = app.decide(approval.approval_id, approved, actor=ACTOR)
        assert again.decided_at == approval.decided_at
        with pytest.raises(tether.ConflictError):
            app.decide(approval.approval_id, not approved, actor=ACTOR)
        events = [e for e in app.events(run_id=run_id, types=["approval"])]
        assert Counter(e.type for e in events) == Counter(
            {"approval.requested": 1, "approval.decided": 1, "approval.consumed": 1}
        ), f"{where}: {run_id} approval events: {[(e.type, e.data) for e in events]}"
        [consumption] = [e for e in events if e.type == "approval.consumed"]
        assert consumption.data == {"approval_id": approval.approval_id, "seq": approval.seq}

        # The effect log against the journal, step by step.
        journaled = {s.name: s for s in steps if s.kind == "step"}
        names = ["prepare", "ship", "after"] if approved else ["prepare", "after"]
        assert [s.name for s in steps if s.kind == "step"] == names, f"{where}: {steps}"
        for name, kind, token_at in STEPS:
            executions = lines_of(lines, kind, run_id)
            if name not in journaled:
                assert not executions, f"{where}: rejected {run_id} ran {name}: {executions}"
                continue
            tokens = [line[token_at] for line in executions]
            output = journaled[name].output
            assert output in tokens, f"{where}: {run_id} {name}: journaled output never ran"
            totals["finished_rerun"] += tokens[-1] != output
            uncut = [line for line in executions[:-1] if int(line[-1]) not in killed]
            assert not uncut, (
                f"{where}: {run_id} {name} ran again though no kill cut it short: {executions}"
            )
            totals["in_flight_reruns"] += len(executions) - 1
            totals[f"{name}_reruns"] += len(executions) - 1
        assert run.result["shipped"] == (journaled["ship"].output if approved else None)
        totals["approvals"] += 1
        totals["approved" if approved else "rejected"] += 1


# -- 1. before the decision -----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_runs_parked_on_approvals_outlive_killed_workers_and_ship_once_when_decided(
    db_url: str, tmp_path: Path
) -> None:
    """Three runs park on their approvals; their worker is killed while idle. Three more are
    submitted and their worker killed as it claims or prepares them. A new worker finishes
    parking them; then the person decides: each run ships once, consuming its decision once."""
    seed = _seed()
    rng = random.Random(seed)
    print(f"before-decision crash seed={seed} db={db_url.split(':')[0]}")
    log = tmp_path / "effects.log"
    env = worker_env(db_url, log, LEASE)
    effects = EffectLog(log)
    killed: set[int] = set()
    totals: Counter[str] = Counter()
    with opened(db_url) as app:
        active_agent(app, "gatekeeper", "gate")
        idle = submit(app, "gate", 3)
        first = start_worker(env, tmp_path / "first.err")
        parked = wait_parked(app, idle, "first worker")
        killed.add(sigkill(first))  # idle: it holds no run
        assert wait_parked(app, idle, "after the idle kill") == parked

        busy = submit(app, "gate", 3, first=3)
        second = start_worker(env, tmp_path / "second.err")
        marker = rng.choice(["ENTER", "PREP"])
        wait_for_each(effects, marker, busy[:1], "second worker")
        time.sleep(rng.choice([0.0, rng.random() * 0.005]))
        killed.add(sigkill(second))

        third = start_worker(env, tmp_path / "third.err")
        try:
            approvals = wait_parked(app, idle + busy, "third worker")
            assert {r: a.approval_id for r, a in approvals.items() if r in idle} == {
                r: a.approval_id for r, a in parked.items()
            }
            verdicts = dict.fromkeys(idle + busy, True)
            decide_all(app, approvals, verdicts)
            wait_until_ended(app, idle + busy, "third worker", tmp_path)
        finally:
            sigkill(third)
        lines = effects.all()
        check_runs(app, verdicts, lines, killed, f"seed {seed}", totals)
        for run_id in idle + busy:
            assert len(lines_of(lines, "SHIP", run_id)) == 1, f"{run_id}: {lines}"
    print(f"before-decision crash totals: {dict(totals, kills=len(killed))}")
    assert totals["finished_rerun"] == 0


# -- 2. between decision and consumption -----------------------------------------------------


@pytest.mark.timeout(300)
def test_a_decision_made_while_workers_die_before_consuming_it_is_consumed_once(
    db_url: str, tmp_path: Path
) -> None:
    """Runs park; the person decides while no worker runs (three approve, one rejects). A
    worker that stops each decided run right before ``approve`` (its claim committed, the
    decision not consumed) is killed; then workers that would stop right after ``approve``
    are killed at random tiny moments after they start a run, until the decisions are
    consumed or the rounds run out. A last worker finishes: each decision consumed once, the
    approved runs shipped once, the result holds who decided."""
    seed = _seed()
    rng = random.Random(seed)
    print(f"between-decision-and-consumption crash seed={seed} db={db_url.split(':')[0]}")
    log = tmp_path / "effects.log"
    env = worker_env(db_url, log, LEASE)
    effects = EffectLog(log)
    killed: set[int] = set()
    totals: Counter[str] = Counter()
    with opened(db_url) as app:
        active_agent(app, "gatekeeper", "gate")
        run_ids = submit(app, "gate", 4)
        finish(start_worker(env, tmp_path / "park.err", until_idle=True), tmp_path / "park.err")
        approvals = wait_parked(app, run_ids, "parking worker")
        verdicts = {r: i != 2 for i, r in enumerate(run_ids)}
        decide_all(app, approvals, verdicts)
        for run_id in run_ids:
            assert app.get_approval(approvals[run_id].approval_id).consumed_at is None
            assert app.get_run(run_id).status.value == "pending"  # woken, claimable

        # Held between the claim and the consumption, then killed.
        held = start_worker(env, tmp_path / "held.err", hang="approve")
        hung = wait_for_each(effects, "HANG", run_ids, "held worker")
        assert {int(line[-1]) for line in hung.values()} == {held.pid}
        killed.add(sigkill(held))
        totals["kills"] += 1
        for run_id in run_ids:
            approval = app.get_approval(approvals[run_id].approval_id)
            assert approval.status != "pending" and approval.consumed_at is None
            assert consumed(app, run_id) == 0
            totals["runs_killed_between_decision_and_consumption"] += 1

        # Killed at random tiny moments after the handler starts (claimed, replaying).
        for round_ in range(HANG_ROUNDS):
            waiting = [r for r in run_ids if not consumed(app, r)]
            if not waiting:
                break
            # It stops after the consumption: a kill that late lands before the gated step.
            worker = start_worker(env, tmp_path / f"round-{round_}.err", hang="decided")
            entered = effects.wait_for({"ENTER"}, len(lines_of_kind(effects, "ENTER")) + 1)
            assert entered is not None, f"round {round_}: no run started\n{stderr(tmp_path)}"
            time.sleep(rng.choice([0.0, 0.0, rng.random() * 0.003]))
            killed.add(sigkill(worker))
            totals["kills"] += 1
            late = consumed(app, entered[1])
            totals["kills_after_consumption" if late else "kills_before_consumption"] += 1

        last = start_worker(env, tmp_path / "last.err", until_idle=True)
        finish(last, tmp_path / "last.err")
        lines = effects.all()
        check_runs(app, verdicts, lines, killed, f"seed {seed}", totals)
        for run_id, approved in verdicts.items():
            assert len(lines_of(lines, "SHIP", run_id)) == int(approved), f"{run_id}: {lines}"
    print(f"between-decision-and-consumption crash totals: {dict(totals)}")
    assert totals["finished_rerun"] == 0


# -- 3. after the consumption ----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_run_killed_after_consuming_its_decision_replays_it_without_asking_again(
    db_url: str, tmp_path: Path
) -> None:
    """Runs are approved, consume their decisions, ship, and hang in the step after; their
    worker is killed there. A new worker replays them: the journaled decision, no new
    approval nor consumption, the gated step not again; only the step in flight runs again."""
    log = tmp_path / "effects.log"
    env = worker_env(db_url, log, LEASE)
    effects = EffectLog(log)
    totals: Counter[str] = Counter()
    with opened(db_url) as app:
        active_agent(app, "gatekeeper", "gate")
        run_ids = submit(app, "gate", 3)
        first = start_worker(env, tmp_path / "first.err", hang="after")
        approvals = wait_parked(app, run_ids, "first worker")
        verdicts = dict.fromkeys(run_ids, True)
        decide_all(app, approvals, verdicts)
        wait_for_each(effects, "HANG", run_ids, "first worker")
        taken = {}
        for run_id in run_ids:
            approval = app.get_approval(approvals[run_id].approval_id)
            assert approval.consumed_at is not None and consumed(app, run_id) == 1
            assert len(lines_of(effects.read(), "SHIP", run_id)) == 1
            taken[run_id] = approval.consumed_at
        killed = {sigkill(first)}

        second = start_worker(env, tmp_path / "second.err", until_idle=True)
        finish(second, tmp_path / "second.err")
        lines = effects.all()
        check_runs(app, verdicts, lines, killed, "after consumption", totals)
        for run_id in run_ids:
            assert app.get_approval(approvals[run_id].approval_id).consumed_at == taken[run_id]
            assert len(lines_of(lines, "SHIP", run_id)) == 1, f"{run_id}: {lines}"
            afters = [int(line[-1]) for line in lines_of(lines, "AFTER", run_id)]
            assert afters == [first.pid, second.pid], f"{run_id}: 'after' ran in {afters}"
            assert len(lines_of(lines, "ENTER", run_id)) == 3  # ask, resume, replay
    print(f"after-consumption crash totals ({db_url.split(':')[0]}): {dict(totals, kills=1)}")
    assert totals["in_flight_reruns"] == len(run_ids)  # 'after', once per run
    assert totals["finished_rerun"] == 0


# -- 4. at random ----------------------------------------------------------------------------


class Cluster:
    """Worker processes of the approval app, working until killed; each one killed is
    replaced at once. Their stderr goes to files, shown when a trial fails."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env, self.folder = env, folder
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: set[int] = set()
        self.started = 0

    def start(self) -> None:
        self.started += 1
        proc = start_worker(self.env, self.folder / f"worker-{self.started}.err")
        self.live[proc.pid] = proc

    def resize(self, size: int) -> None:
        """Start workers, or kill idle ones, until ``size`` are live."""
        while len(self.live) < size:
            self.start()
        while len(self.live) > size:
            self.killed.add(sigkill(self.live.pop(max(self.live))))

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
        assert not ended, f"{where}: workers ended by themselves: {ended}\n{stderr(self.folder)}"

    def close(self) -> None:
        for proc in self.live.values():
            proc.kill()
        for proc in self.live.values():
            proc.wait(10)


class Decider(threading.Thread):
    """A person deciding each pending approval of one agent as it appears, after a pause
    of a random moment or none: the verdict drawn for its run. Each decision is followed by
    a ``DECIDE run approval verdict pid`` line in the effect log (a moment to kill at);
    sometimes the same decision is sent twice, which must return the stored one."""

    def __init__(
        self, db_url: str, agent_id: str, verdicts: dict[str, bool], log: Path, seed: int
    ) -> None:
        super().__init__(name="decider", daemon=True)
        self.db_url, self.agent_id, self.verdicts, self.log = db_url, agent_id, verdicts, log
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        app = tether.App(self.db_url)
        try:
            while not self.stopping.is_set():
                for pending in app.approvals(status="pending", agent_id=self.agent_id):
                    self.decide(app, pending)
                time.sleep(0.005)
        except BaseException as exc:  # reported by the test's thread
            self.error = exc
        finally:
            app.close()

    def decide(self, app: tether.App, pending: tether.ApprovalInfo) -> None:
        time.sleep(self.rng.choice([0.0, self.rng.random() * 0.02]))
        verdict = self.verdicts[pending.run_id]
        decided = app.decide(
            pending.approval_id, verdict, comment="at random", digest=pending.digest, actor=ACTOR
        )
        with open(self.log, "a") as log:
            log.write(f"\nDECIDE {pending.run_id} {pending.approval_id} {verdict} {os.getpid()}")
        if self.rng.random() < 0.2:
            again = app.decide(pending.approval_id, verdict, comment="at random", actor=ACTOR)
            assert again.decided_at == decided.decided_at

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        if self.error is not None:
            raise self.error


@contextmanager
def deciding(
    db_url: str, agent_id: str, verdicts: dict[str, bool], log: Path, seed: int
) -> Iterator[Decider]:
    decider = Decider(db_url, agent_id, verdicts, log, seed)
    decider.start()
    try:
        yield decider
    finally:
        decider.stop()


def kill_at_random_moments(
    rng: random.Random,
    workers: Cluster,
    log: EffectLog,
    verdicts: dict[str, bool],
    app: tether.App,
    agent: str,
) -> Counter[str]:
    """One to three times, pick a kind of line and one of those the trial is sure to write
    and has not written yet, wait for it, pause a random moment or none, and SIGKILL the
    worker that wrote it (any one after a decision; sometimes another one with it): a claim
    just made (ENTER), inside the step before the approval (PREP), right after a decision
    (DECIDE: before or while a worker claims the run, before its consumption), inside the
    gated step (SHIP) or the one after it (AFTER). Counts the kills and how many decisions
    were waiting to be consumed right after each."""
    runs = len(verdicts)
    # Lines each trial surely writes: ENTER twice a run (its first execution, its
    # resumption), SHIP once an approved run, the others once a run.
    sure = {"ENTER": 2 * runs, "PREP": runs, "DECIDE": runs, "AFTER": runs}
    sure["SHIP"] = sum(verdicts.values())
    figures: Counter[str] = Counter()
    for _ in range(rng.randint(1, 3)):
        seen = Counter(line[0] for line in log.read())
        ahead = sorted(kind for kind, count in sure.items() if seen[kind] < count)
        if not ahead:
            break
        kind = rng.choice(ahead)
        line = log.wait_for({kind}, rng.randint(seen[kind] + 1, sure[kind]))
        if line is None:
            return figures  # a run is stuck: the trial's checks say which
        time.sleep(rng.choice([0.0, 0.0, rng.random() * 0.01]))
        writer = int(line[-1])
        victims = [writer] if writer in workers.live else [rng.choice(sorted(workers.live))]
        if rng.random() < 0.25 and len(workers.live) > 1:
            victims.append(rng.choice(sorted(set(workers.live) - set(victims))))
        workers.kill(victims)
        figures["kills"] += len(victims)
        figures[f"kills_at_{line[0]}"] += 1
        figures["decisions_unconsumed_at_kills"] += sum(
            1
            for a in app.approvals(agent_id=agent)
            if a.status != "pending" and a.consumed_at is None
        )
    return figures


@pytest.mark.timeout(600)
def test_each_approval_is_decided_once_and_consumed_once_under_random_sigkill(
    db_url: str, tmp_path: Path
) -> None:
    """Each trial: five runs of a new agent, two or three workers, a decider approving about
    three in five; workers are killed at random moments. Every run completes with its
    decision, consumed once; rejected runs never ship, approved ones ship in one execution
    the journal holds, any other having been cut short by a kill."""
    seed = _seed()
    rng = random.Random(seed)
    dialect = db_url.split(":")[0]
    print(f"approvals crash seed={seed} trials={TRIALS} db={dialect}")
    log = tmp_path / "effects.log"
    effects = EffectLog(log)
    totals: Counter[str] = Counter()
    workers = Cluster(worker_env(db_url, log, LEASE), tmp_path)
    try:
        with opened(db_url) as app:
            for trial in range(TRIALS):
                where = f"trial {trial} (seed {seed}, {dialect})"
                effects.begin()
                workers.resize(rng.randint(2, 3))
                agent = f"gate-{trial}"
                active_agent(app, "gatekeeper", agent)
                run_ids = submit(app, agent, RUNS_PER_TRIAL)
                verdicts = {r: rng.random() < 0.6 for r in run_ids}
                with deciding(db_url, agent, verdicts, log, rng.randrange(2**32)):
                    totals += kill_at_random_moments(rng, workers, effects, verdicts, app, agent)
                    wait_until_ended(app, run_ids, where, tmp_path)
                workers.check(where)
                check_runs(app, verdicts, effects.all(), workers.killed, where, totals)
                totals["trials"] += 1
    finally:
        workers.close()
        print(f"approvals crash totals ({dialect}): {dict(totals)}")
    assert totals["finished_rerun"] == 0, f"finished steps executed again: {totals} seed={seed}"
