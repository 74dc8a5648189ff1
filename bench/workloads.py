"""The workloads of the suite, W1 to W10, as the orchestrator drives them.

Each ``wN(plan)`` returns plain data (lists of result dicts per configuration) for
``report.py``. Repetitions alternate between configurations (A B C A B C ...), so a slow
minute on the machine is shared out instead of landing on one system.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from harness import (
    PEERS_PY,
    ROOT,
    TETHER_PY,
    WORK,
    Result,
    System,
    command,
    fsyncs_between_marks,
    have_strace,
    log,
    parse_result,
    run_system,
    system_env,
    timed_command,
)

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/tether_bench"


@dataclass(frozen=True)
class Plan:
    """What to run and how big: the full suite, or ``--quick`` for development."""

    quick: bool
    reps: int
    peers_error: str | None

    @property
    def peers(self) -> bool:
        """Whether the peers' virtualenv is usable."""
        return self.peers_error is None


RAW_FULL = System("raw SQLite, FULL", TETHER_PY, "raw_sqlite", ("--sync", "full"))
RAW_NORMAL = System("raw SQLite, NORMAL", TETHER_PY, "raw_sqlite", ("--sync", "normal"))
TETHER_FULL = System("tether, FULL", TETHER_PY, "tether_w", ("--sync", "full"))
TETHER_NORMAL = System("tether, NORMAL", TETHER_PY, "tether_w", ("--sync", "normal"))
DBOS = System("DBOS", PEERS_PY, "dbos_w", peer=True)
LANGGRAPH = System("LangGraph", PEERS_PY, "langgraph_w", peer=True)
BURR = System("Burr", PEERS_PY, "burr_w", peer=True)
# The same peers at tether's mechanism: the file in WAL, synchronous=FULL (one fsync a commit).
DBOS_WAL = System("DBOS-WAL", PEERS_PY, "dbos_w", ("--journal", "wal"), peer=True)
BURR_WAL = System("Burr-WAL", PEERS_PY, "burr_w", ("--journal", "wal"), peer=True)


class Measured(Protocol):
    """Anything measured in turns: a system configuration or a command."""

    @property
    def label(self) -> str: ...

    @property
    def peer(self) -> bool: ...


M = TypeVar("M", bound=Measured)


@dataclass(frozen=True)
class Command:
    """A whole command timed from spawn to exit (W5)."""

    label: str
    argv: tuple[str, ...]
    peer: bool = False


def usable(plan: Plan, systems: Sequence[M]) -> list[M]:
    """Drop the peers when their virtualenv could not be made."""
    return [s for s in systems if plan.peers or not s.peer]


def alternate(
    systems: Sequence[M], reps: int, measure: Callable[[M, int], Result]
) -> dict[str, list[Result]]:
    """``reps`` rounds of every system in turn; a system that is unavailable, or fails twice
    in a row, is not tried again (its failures stay in the results, for the report)."""
    results: dict[str, list[Result]] = {s.label: [] for s in systems}
    dropped: set[str] = set()
    for rep in range(reps):
        for system in systems:
            if system.label in dropped:
                continue
            result = measure(system, rep)
            results[system.label].append(result)
            if not result.get("ok"):
                log(f"  {system.label}: {result.get('error')}")
                last_two = results[system.label][-2:]
                if result.get("unavailable") or (
                    len(last_two) == 2 and not any(r.get("ok") for r in last_two)
                ):
                    dropped.add(system.label)
    return results


# -- W1: durable steps --------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A W1 configuration: ``runs`` x ``steps``, ``inflight`` runs at once."""

    runs: int
    steps: int
    inflight: int = 1

    @property
    def counted_runs(self) -> int:
        """Runs in the untimed counting run: fewer than timed, at least 2 (strace is slow)."""
        return 100 if self.inflight > 1 else max(2, 200 // self.steps)


def w1_shapes(plan: Plan) -> tuple[list[Shape], Shape]:
    """W1's configurations: one run in flight at two shapes, then many runs in flight."""
    if plan.quick:
        return [Shape(50, 10), Shape(5, 100)], Shape(100, 10, 50)
    return [Shape(200, 10), Shape(20, 100)], Shape(200, 10, 50)


def w1(plan: Plan) -> dict[str, Any]:
    """Steps per second at equal durability, plus commits, fsyncs and bytes per step."""
    shapes, fly = w1_shapes(plan)
    systems = usable(
        plan,
        [
            RAW_FULL,
            RAW_NORMAL,
            TETHER_FULL,
            TETHER_NORMAL,
            DBOS,
            DBOS_WAL,
            LANGGRAPH,
            BURR,
            BURR_WAL,
        ],
    )
    out: dict[str, Any] = {"shapes": [], "inflight": None}
    for shape in shapes:
        log(f"W1 {shape.runs} runs x {shape.steps} steps, one run in flight")
        rows = alternate(systems, plan.reps, w1_measure(shape))
        counts = {s.label: w1_count(s, shape) for s in systems}
        out["shapes"].append(
            {"runs": shape.runs, "steps": shape.steps, "rows": rows, "counts": counts}
        )
    log(f"W1 {fly.runs} runs x {fly.steps} steps, {fly.inflight} runs in flight")
    flying = usable(plan, [TETHER_FULL, TETHER_NORMAL, DBOS, DBOS_WAL, LANGGRAPH])
    rows = alternate(flying, plan.reps, w1_measure(fly))
    counts = {s.label: w1_count(s, fly) for s in flying}
    out["inflight"] = {"runs": fly.runs, "steps": fly.steps, "inflight": fly.inflight}
    out["inflight"].update(rows=rows, counts=counts)
    return out


def w1_args(system: System, runs: int, steps: int, inflight: int) -> list[str]:
    """W1's command-line arguments, with a database file of the system's own."""
    db = WORK / f"w1-{system.module}-{'-'.join(system.flags[1:]) or 'default'}.db"
    return [
        "--runs",
        str(runs),
        "--steps",
        str(steps),
        "--inflight",
        str(inflight),
        "--db",
        str(db),
    ]


def w1_measure(shape: Shape, workload: str = "W1") -> Callable[[System, int], Result]:
    """One timed repetition of a system at a W1 shape (W10 runs the same shapes)."""

    def measure(system: System, _rep: int) -> Result:
        args = w1_args(system, shape.runs, shape.steps, shape.inflight)
        return run_system(system, workload, args)

    return measure


def w1_count(system: System, shape: Shape, workload: str = "W1") -> Result:
    """An untimed run that counts commits (sqlite3 trace) and fsyncs (strace) per step."""
    log_path = WORK / f"strace-{system.module}.log" if have_strace() else None
    args = [*w1_args(system, shape.counted_runs, shape.steps, shape.inflight), "--count"]
    result = run_system(system, workload, args, strace_log=log_path)
    if result.get("ok"):
        total = shape.counted_runs * shape.steps
        fsyncs = fsyncs_between_marks(log_path) if log_path else None
        result["commits_per_step"] = result["commits"] / total
        result["fsyncs_per_step"] = fsyncs / total if fsyncs is not None else None
    if log_path:
        log_path.unlink(missing_ok=True)
    return result


# -- W2: crash and resume -----------------------------------------------------------------


def w2(plan: Plan) -> dict[str, list[Result]]:
    """SIGKILL a 50-step run at a random moment; restart it; time it and count repeats."""
    log("W2 crash resume")
    systems = usable(plan, [TETHER_FULL, DBOS, LANGGRAPH])
    return alternate(systems, plan.reps, lambda s, _rep: w2_once(s, 50, 0.02))


def side_lines(path: Path) -> list[str]:
    """The lines of a side-effect file so far."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def w2_once(system: System, steps: int, sleep: float) -> Result:
    """One crash: start, kill inside a random step, restart, and read the side-effect file."""
    side = WORK / f"w2-{system.module}.side"
    side.unlink(missing_ok=True)
    args = ["--db", str(WORK / f"w2-{system.module}.db"), "--side", str(side)]
    args += ["--steps", str(steps), "--sleep", str(sleep)]
    env = system_env({"BENCH_SIDE_FILE": str(side), "BENCH_STEP_SLEEP": str(sleep)})
    start = subprocess.Popen(
        command(system, "W2", [*args, "--phase", "start"]),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    kill_after = random.randint(5, steps - 5)
    deadline = time.monotonic() + 60
    while len(side_lines(side)) < kill_after:
        if start.poll() is not None or time.monotonic() > deadline:
            start.kill()
            out = start.communicate()[0].decode(errors="replace")
            found = parse_result(out) or {}
            return {
                "ok": False,
                "unavailable": found.get("unavailable"),
                "error": found.get("error") or "the start phase ended or stalled",
            }
        time.sleep(0.001)
    time.sleep(random.uniform(0, sleep))  # land anywhere inside the next step
    start.send_signal(signal.SIGKILL)
    start.communicate()
    before = side_lines(side)
    restart = time.time()
    proc = subprocess.run(
        command(system, "W2", [*args, "--phase", "resume"]),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    result = parse_result(proc.stdout)
    if not result or not result.get("ok"):
        return result or {"ok": False, "error": f"resume exited {proc.returncode}"}
    after = side_lines(side)[len(before) :]
    done = [int(line.split()[0]) for line in before + after]
    return {
        "ok": True,
        "killed_after": len(before),
        "ready_s": result["ready_at"] - restart,
        "first_new_s": float(after[0].split()[1]) - restart if after else None,
        "done_s": result["done_at"] - restart,
        "duplicates": len(done) - len(set(done)),
        "complete": set(done) == set(range(steps)),
    }


# -- W3, W4: tether only --------------------------------------------------------------------


def w3(plan: Plan) -> dict[str, list[Result]]:
    """Many runs asleep on durable timers: worker memory and wake-up lateness (one pass)."""
    runs, delay = (1000, 10.0) if plan.quick else (10_000, 60.0)
    log(f"W3 {runs} sleeping runs, timers of {delay:.0f} s")
    args = ["--runs", str(runs), "--sleep", str(delay), "--concurrency", "20"]
    args += ["--db", str(WORK / "w3-tether.db")]
    return {TETHER_FULL.label: [run_system(TETHER_FULL, "W3", args, timeout=delay + 900)]}


def w4(plan: Plan) -> dict[str, list[Result]]:
    """One long run: per-step cost at the end against the start; resume after a crash."""
    steps = 2000 if plan.quick else 10_000
    log(f"W4 one run of {steps} steps")
    db = WORK / "w4-tether.db"
    measure = System("cost", TETHER_PY, "tether_w", ("--sync", "full"))
    crash = System("crash", TETHER_PY, "tether_w", ("--sync", "full"))

    def once(system: System, _rep: int) -> Result:
        args = ["--steps", str(steps), "--db", str(db)]
        if system is measure:
            return run_system(system, "W4", [*args, "--phase", "measure"], timeout=900)
        return w4_crash(system, [*args, "--side", str(WORK / "w4-killed.flag")])

    return alternate([measure, crash], plan.reps, once)


def w4_crash(system: System, args: list[str]) -> Result:
    """Let the run SIGKILL itself at 90 % of its steps, then time the restart."""
    (WORK / "w4-killed.flag").unlink(missing_ok=True)
    first = run_system(system, "W4", [*args, "--phase", "start"], timeout=900)
    if first.get("unavailable"):
        return first
    restart = time.time()
    result = run_system(system, "W4", [*args, "--phase", "resume"], timeout=900)
    if not result.get("ok"):
        return result
    first_new = result.get("first_new_at")
    return {
        "ok": True,
        "ready_s": result["ready_at"] - restart,
        "first_new_s": first_new - restart if first_new else None,
        "done_s": result["done_at"] - restart,
    }


# -- W5: start-up ---------------------------------------------------------------------------


def w5(plan: Plan) -> dict[str, list[Result]]:
    """Whole-process wall time of importing each system, and of ``tether --help``."""
    log("W5 start-up")
    tether_cli = str(Path(TETHER_PY).with_name("tether"))
    commands = usable(
        plan,
        [
            Command("python -c pass (.venv)", (TETHER_PY, "-c", "pass")),
            Command("import tether", (TETHER_PY, "-c", "import tether")),
            Command("tether --help", (tether_cli, "--help")),
            Command("python -c pass (peers venv)", (PEERS_PY, "-c", "pass"), peer=True),
            Command("import dbos", (PEERS_PY, "-c", "import dbos"), peer=True),
            Command(LANGGRAPH_LABEL, (PEERS_PY, "-c", LANGGRAPH_IMPORT), peer=True),
            Command(BURR_LABEL, (PEERS_PY, "-c", BURR_IMPORT), peer=True),
        ],
    )
    env = system_env()
    for cmd in commands:  # warm the page cache and the bytecode caches once
        timed_command(list(cmd.argv), env)
    return alternate(
        commands,
        max(plan.reps * 2, 10),
        lambda c, _rep: {"ok": True, "seconds": timed_command(list(c.argv), env)},
    )


LANGGRAPH_LABEL = "import langgraph (StateGraph, SqliteSaver)"
LANGGRAPH_IMPORT = (
    "from langgraph.graph import StateGraph; from langgraph.checkpoint.sqlite import SqliteSaver"
)
BURR_LABEL = "import burr (ApplicationBuilder)"
BURR_IMPORT = "from burr.core import ApplicationBuilder"


# -- W6: PostgreSQL scale-out ---------------------------------------------------------------


def w6(plan: Plan) -> dict[str, list[Result]]:
    """R runs of 5 sleeping steps on PostgreSQL with 1, 2 and 4 worker processes."""
    runs = 400 if plan.quick else 2000
    log(f"W6 {runs} runs x 5 steps of 10 ms on PostgreSQL, 1/2/4 workers")
    systems = [
        System(f"{n} worker{'s' if n > 1 else ''}", TETHER_PY, "tether_w", ("--workers", str(n)))
        for n in (1, 2, 4)
    ]
    args = ["--runs", str(runs), "--steps", "5", "--sleep", "0.01", "--concurrency", "8"]
    args += ["--db", PG_URL]
    return alternate(systems, plan.reps, lambda s, _rep: run_system(s, "W6", args, timeout=900))


# -- W7, W8: messages and delegation (issue 9) ----------------------------------------------

# tether only (W7 to W9), on each database; every repetition gets a fresh SQLite file or
# PostgreSQL database. One worker, in the measuring process itself: App.work in W7 and W8, a
# thread beside the deciding main thread in W9; W7_, W8_ or W9_CONCURRENCY runs at once.
ON_SQLITE = System(
    "tether, SQLite FULL",
    TETHER_PY,
    "tether_w",
    ("--sync", "full", "--db", str(WORK / "w78-tether.db")),
)
ON_POSTGRES = System("tether, PostgreSQL", TETHER_PY, "tether_w", ("--db", PG_URL))
W7_CONCURRENCY = 2
W8_CONCURRENCY = 4
W9_CONCURRENCY = 1


def w7(plan: Plan) -> dict[str, Any]:
    """Message round trips A -> B -> A: latency from journaled times, p50 and p99."""
    trips = 50 if plan.quick else 200
    log(f"W7 {trips} message round trips, SQLite FULL and PostgreSQL")
    args = ["--trips", str(trips), "--concurrency", str(W7_CONCURRENCY)]
    rows = alternate([ON_SQLITE, ON_POSTGRES], plan.reps, lambda s, _rep: run_system(s, "W7", args))
    counts = {ON_SQLITE.label: counted(ON_SQLITE, "W7", args, trips)}
    return {"trips": trips, "concurrency": W7_CONCURRENCY, "rows": rows, "counts": counts}


def w8(plan: Plan) -> dict[str, Any]:
    """One coordinator run spawns 100 children over 10 agents and waits for all of them."""
    children, agents = 100, 10
    log(f"W8 fan-out to {children} children on {agents} agents and gather, SQLite and PostgreSQL")
    args = ["--children", str(children), "--agents", str(agents)]
    args += ["--concurrency", str(W8_CONCURRENCY)]
    rows = alternate([ON_SQLITE, ON_POSTGRES], plan.reps, lambda s, _rep: run_system(s, "W8", args))
    counts = {ON_SQLITE.label: counted(ON_SQLITE, "W8", args, children)}
    return {
        "children": children,
        "agents": agents,
        "concurrency": W8_CONCURRENCY,
        "rows": rows,
        "counts": counts,
    }


# -- W9: from a person's decision to the run's next step ------------------------------------


def w9(plan: Plan) -> dict[str, Any]:
    """One run asks for R decisions in a row; the latency from each decision to the run's
    next step, p50 and p99."""
    decisions = 40 if plan.quick else 100
    log(f"W9 {decisions} decisions in a row, SQLite FULL and PostgreSQL")
    args = ["--decisions", str(decisions), "--concurrency", str(W9_CONCURRENCY)]
    rows = alternate([ON_SQLITE, ON_POSTGRES], plan.reps, lambda s, _rep: run_system(s, "W9", args))
    counts = {ON_SQLITE.label: counted(ON_SQLITE, "W9", args, decisions)}
    return {"decisions": decisions, "concurrency": W9_CONCURRENCY, "rows": rows, "counts": counts}


def counted(system: System, workload: str, args: list[str], per: int) -> Result:
    """An untimed run that counts commits (sqlite3 trace) and fsyncs (strace), per ``per``
    (round trips, children, decisions)."""
    log_path = WORK / f"strace-{workload}.log" if have_strace() else None
    result = run_system(system, workload, [*args, "--count"], strace_log=log_path)
    if result.get("ok"):
        fsyncs = fsyncs_between_marks(log_path) if log_path else None
        result["commits_per"] = result["commits"] / per
        result["fsyncs_per"] = fsyncs / per if fsyncs is not None else None
        result["executions_per"] = result["executions"] / per
    else:
        log(f"  {system.label}, counting run: {result.get('error')}")
    if log_path:
        log_path.unlink(missing_ok=True)
    return result


# -- W10: what the budget ledger costs ------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One workload of one system configuration, taking its turn with others (W10)."""

    label: str
    system: System
    workload: str
    peer: bool = False


def w10(plan: Plan) -> dict[str, Any]:
    """W1 and W10 (W1 with a budget on every run and every step metered) in turns, at W1's
    shapes on tether FULL and NORMAL: steps/s of each, commits and fsyncs per step."""
    shapes, fly = w1_shapes(plan)
    reps = plan.reps * 2  # the ledger's cost is the ratio of two noisy figures
    turns = [
        Turn(f"{workload}, {system.label}", system, workload)
        for system in (TETHER_FULL, TETHER_NORMAL)
        for workload in ("W1", "W10")
    ]
    configs = []
    for shape in [*shapes, fly]:
        log(f"W10 and W1, {shape.runs} runs x {shape.steps} steps, {shape.inflight} in flight")

        def measure(turn: Turn, rep: int, shape: Shape = shape) -> Result:
            return w1_measure(shape, turn.workload)(turn.system, rep)

        rows = alternate(turns, reps, measure)
        for system in (TETHER_FULL, TETHER_NORMAL):
            mine = [t for t in turns if t.system is system]
            configs.append(
                {
                    "runs": shape.runs,
                    "steps": shape.steps,
                    "inflight": shape.inflight,
                    "system": system.label,
                    "rows": {t.workload: rows[t.label] for t in mine},
                    "counts": {t.workload: w1_count(system, shape, t.workload) for t in mine},
                }
            )
    return {"reps": reps, "configs": configs}
