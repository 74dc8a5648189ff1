"""tether, through its public API only: ``App``, ``@app.agent``, ``submit``, ``work``.

Every workload of the suite has a tether side here. W3 and W6 run their workers as separate
processes (``tether worker`` when the CLI has it, else ``python tether_w.py worker``, which is
the same ``App.work`` loop); ``app`` below is what ``--app tether_w:app`` loads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent
FIRST_NEW_STEP: list[float] = []
WORKER_KIND = ["none"]
STAMPS: list[float] = []

try:
    import tether
except ImportError:  # pragma: no cover - the orchestrator reports it
    tether = None  # type: ignore[assignment]


def noop(i: int) -> int:
    """A trivial step."""
    return i


def effect(side: str, i: int, sleep: float) -> int:
    """W2's step: sleep, then leave a visible side effect (step number and wall time)."""
    time.sleep(sleep)
    common.append_line(side, f"{i} {time.time():.6f} {os.getpid()}")
    return i


def wall_clock() -> float:
    """The current wall-clock time, journaled (W3's start of the sleep)."""
    return time.time()


def lateness(due: float) -> float:
    """Seconds between a timer's due time and the step after it running (W3)."""
    return time.time() - due


def pause(seconds: float) -> float:
    """W6's step: outside I/O, simulated."""
    time.sleep(seconds)
    return seconds


def crash_once(i: int, kill_at: int, flag: str) -> int:
    """W4's step: SIGKILL this process at step ``kill_at`` the first time only."""
    if not FIRST_NEW_STEP:
        FIRST_NEW_STEP.append(time.time())
    if i == kill_at and not os.path.exists(flag):
        Path(flag).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def make_app(url: str | None) -> Any:
    """An ``App`` with every agent type the workloads use."""
    app = tether.App(url)

    @app.agent("bencher", max_concurrent_runs=50)
    def bencher(ctx: Any, task: dict[str, Any]) -> int:
        for i in range(task["steps"]):
            ctx.step(noop, i)
        return int(task["steps"])

    @app.agent("metered", max_concurrent_runs=50)
    def metered(ctx: Any, task: dict[str, Any]) -> int:
        for i in range(task["steps"]):
            ctx.step(noop, i, tool="llm", cost=0.001, tokens=10)
        return int(task["steps"])

    @app.agent("crashy")
    def crashy(ctx: Any, task: dict[str, Any]) -> int:
        for i in range(task["steps"]):
            ctx.step(effect, task["side"], i, task["sleep"])
        return int(task["steps"])

    @app.agent("sleeper", max_concurrent_runs=100_000)
    def sleeper(ctx: Any, task: dict[str, Any]) -> float:
        started = ctx.step(wall_clock)
        ctx.sleep(task["delay"])
        return float(ctx.step(lateness, started + task["delay"]))

    @app.agent("long")
    def long(ctx: Any, task: dict[str, Any]) -> int:
        for i in range(task["steps"]):
            if task.get("flag"):
                ctx.step(crash_once, i, task["kill_at"], task["flag"])
            else:
                ctx.step(noop, i)
                STAMPS.append(time.perf_counter())
        return int(task["steps"])

    @app.agent("pauser", max_concurrent_runs=1000)
    def pauser(ctx: Any, task: dict[str, Any]) -> int:
        for _ in range(task["steps"]):
            ctx.step(pause, task["sleep"])
        return int(task["steps"])

    @app.agent("pinger")
    def pinger(ctx: Any, task: dict[str, Any]) -> list[float]:
        # W7's A: each ctx.now() is journaled, so a replay (every resume after a receive)
        # returns the time first seen instead of a new one; stamp i+1 - stamp i is one trip.
        peer = task["peer"]
        stamps = [ctx.now().timestamp()]
        for i in range(task["trips"]):
            ctx.send(peer, {"i": i})
            reply = ctx.receive()
            if reply is None or reply.payload != {"i": i} or reply.sender_agent != peer:
                raise RuntimeError(f"round trip {i}: expected {{'i': {i}}} from {peer}: {reply}")
            stamps.append(ctx.now().timestamp())
        return stamps

    @app.agent("ponger")
    def ponger(ctx: Any, task: dict[str, Any]) -> int:
        # W7's B: receive, reply to the sender with the same payload, task["trips"] times.
        for _ in range(task["trips"]):
            message = ctx.receive()
            ctx.send(message.sender_agent, message.payload)
        return int(task["trips"])

    @app.agent("coordinator")
    def coordinator(ctx: Any, task: dict[str, Any]) -> dict[str, Any]:
        # W8: fan out to task["children"] child runs over task["agents"] agents, then gather.
        started = ctx.now().timestamp()
        handles = [
            ctx.spawn(f"{task['prefix']}{i % task['agents']}", {"i": i})
            for i in range(task["children"])
        ]
        spawned = ctx.now().timestamp()
        results = ctx.wait(handles)
        return {
            "started": started,
            "spawned": spawned,
            "gathered": ctx.now().timestamp(),
            "in_order": results == list(range(task["children"])),
        }

    @app.agent("helper")
    def helper(ctx: Any, task: dict[str, Any]) -> int:
        # W8's child: one trivial journaled step; its result is the child's.
        return int(ctx.step(noop, task["i"]))

    @app.agent("gated")
    def gated(ctx: Any, task: dict[str, Any]) -> int:
        # W9: ask for task["decisions"] decisions in a row. The ctx.now() right after each is
        # journaled: the resumption that replays it returns the time first seen, not a new one.
        for i in range(task["decisions"]):
            if not ctx.approve(f"step {i}?", {"i": i}):
                raise RuntimeError(f"decision {i} came back rejected")
            ctx.now()
        return int(task["decisions"])

    return app


def engine_missing() -> str | None:
    """Why tether cannot run the workloads yet, or ``None`` when it can."""
    if tether is None:
        return "tether is not importable"
    missing = [name for name in ("agent", "submit", "work") if not hasattr(tether.App, name)]
    return f"tether: engine not available (App lacks {', '.join(missing)})" if missing else None


def sqlite_url(path: str | Path, sync: str) -> str:
    """A tether SQLite URL, with the ``synchronous=normal`` opt-in when asked."""
    url = f"sqlite:///{Path(path).resolve()}"
    return url + "?synchronous=normal" if sync == "normal" else url


def activated(app: Any, agent_type: str, agent_id: str) -> None:
    """Create an agent and bring it to ``active``."""
    app.create_agent(agent_type, agent_id)
    app.initialize(agent_id)
    app.activate(agent_id)


def finish(app: Any, handle: Any, limit: float) -> None:
    """Work in this process until ``handle``'s run has completed (or ``limit`` seconds pass)."""
    deadline = time.monotonic() + limit
    while handle.status().value != "completed":
        if time.monotonic() > deadline:
            common.fail(f"run not completed after {limit:.0f}s: {handle.status().value}")
        app.work(until_idle=True, concurrency=1, timeout=max(1.0, deadline - time.monotonic()))
        time.sleep(0.01)


def w1(args: argparse.Namespace) -> None:
    """R runs of S trivial steps; submitting them is part of the timed work."""
    spy = common.SqliteSpy(count=args.count).install()
    path = common.fresh(args.db)
    app = make_app(sqlite_url(path, args.sync))
    activated(app, "bencher", "b1")
    commits_before, bytes_before = spy.commits_for(path), common.logical_bytes(path)
    with common.timed() as elapsed:
        handles = [app.submit("b1", {"steps": args.steps}) for _ in range(args.runs)]
        app.work(until_idle=True, concurrency=args.inflight)
    if handles[-1].result(timeout=5) != args.steps:
        common.fail("the last run did not return its step count")
    common.w1_result(
        "tether", tether.__version__, args, elapsed[0], spy, commits_before, bytes_before
    )
    app.close()


def w10(args: argparse.Namespace) -> None:
    """W1 with a budget on every run and every step metered (``tool``, ``cost``, ``tokens``):
    the ledger's cost per step, against W1."""
    spy = common.SqliteSpy(count=args.count).install()
    path = common.fresh(args.db)
    app = make_app(sqlite_url(path, args.sync))
    activated(app, "metered", "m1")
    budget = tether.Budget(max_steps=10**9, max_cost=10.0**9, max_tokens=10**12)
    commits_before, bytes_before = spy.commits_for(path), common.logical_bytes(path)
    with common.timed() as elapsed:
        handles = [app.submit("m1", {"steps": args.steps}, budget=budget) for _ in range(args.runs)]
        app.work(until_idle=True, concurrency=args.inflight)
    if handles[-1].result(timeout=5) != args.steps:
        common.fail("the last run did not return its step count")
    used = app.usage(handles[-1].run_id).limits
    if [round(lim.used, 6) for lim in used if lim.limit == "max_steps"] != [args.steps]:
        common.fail(f"the ledger did not count the last run's steps: {used}")
    common.w1_result(
        "tether", tether.__version__, args, elapsed[0], spy, commits_before, bytes_before
    )
    app.close()


def w2(args: argparse.Namespace) -> None:
    """One run of S sleeping steps with side effects: ``start`` (to be killed) or ``resume``."""
    path = common.fresh(args.db) if args.phase == "start" else Path(args.db)
    app = make_app(sqlite_url(path, args.sync))
    task = {"steps": args.steps, "side": args.side, "sleep": args.sleep}
    if args.phase == "start":
        activated(app, "crashy", "c1")
        app.submit("c1", task, task_id="w2")
        app.work(concurrency=1)
        common.fail("the start phase finished before it was killed")
    ready = time.time()
    handle = app.submit("c1", task, task_id="w2")  # idempotent: the run already there
    finish(app, handle, 120)
    common.emit(system="tether", ready_at=ready, done_at=time.time(), result=handle.result())


def worker_command(url: str, concurrency: int) -> list[str]:
    """A worker process for ``url``: the CLI's ``tether worker`` if it exists, else our loop."""
    cli = Path(sys.executable).with_name("tether")
    probe = subprocess.run([str(cli), "worker", "--help"], capture_output=True, check=False)
    if probe.returncode == 0:
        WORKER_KIND[0] = "tether worker (CLI)"
        return [
            str(cli),
            "--db",
            url,
            "--app",
            "tether_w:app",
            "worker",
            "--concurrency",
            str(concurrency),
        ]
    WORKER_KIND[0] = "tether_w.py worker (App.work; the CLI has no worker command)"
    return [
        sys.executable,
        str(HERE / "tether_w.py"),
        "worker",
        "--db",
        url,
        "--concurrency",
        str(concurrency),
    ]


def spawn_workers(url: str, count: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes on ``url``."""
    env = {**os.environ, "TETHER_DATABASE_URL": url, "PYTHONPATH": str(HERE)}
    cmd = worker_command(url, concurrency)
    return [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the workers, then SIGKILL any still there after 5 s."""
    for proc in workers:
        proc.terminate()
    for proc in workers:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def unfinished(app: Any, agent_id: str, statuses: list[str]) -> bool:
    """Whether any run of the agent is in one of ``statuses``."""
    return bool(app.list_runs(agent_id=agent_id, status=statuses, limit=1))


def w3(args: argparse.Namespace) -> None:
    """R runs asleep on a durable timer of ``--sleep`` seconds, served by one worker process."""
    url = sqlite_url(common.fresh(args.db), args.sync)
    app = make_app(url)
    activated(app, "sleeper", "s1")
    start = time.perf_counter()
    for _ in range(args.runs):
        app.submit("s1", {"delay": args.sleep})
    submitted = time.perf_counter() - start
    [worker] = spawn_workers(url, 1, args.concurrency)
    peak = 0.0
    all_asleep_at = asleep_rss = None
    deadline = time.monotonic() + args.sleep + 600
    try:
        while unfinished(app, "s1", ["pending", "running", "waiting"]):
            rss = rss_mb(worker.pid)
            peak = max(peak, rss)
            if all_asleep_at is None and not unfinished(app, "s1", ["pending", "running"]):
                all_asleep_at, asleep_rss = time.perf_counter() - start, rss
            if time.monotonic() > deadline or worker.poll() is not None:
                common.fail("W3 did not finish", worker_exit=worker.poll())
            time.sleep(0.25)
    finally:
        stop_workers([worker])
    late = sorted(r.result for r in app.list_runs(agent_id="s1", status="completed", limit=None))
    common.emit(
        system="tether",
        runs=args.runs,
        completed=len(late),
        submit_s=submitted,
        all_asleep_s=all_asleep_at,
        rss_asleep_mb=asleep_rss,
        rss_peak_mb=peak,
        late_p50_s=statistics.median(late) if late else None,
        late_p99_s=late[int(len(late) * 0.99) - 1] if late else None,
        late_max_s=late[-1] if late else None,
        worker=WORKER_KIND[0],
    )


def w4(args: argparse.Namespace) -> None:
    """One run of S steps: per-step cost early and late (``measure``), or crash and resume."""
    path = common.fresh(args.db) if args.phase != "resume" else Path(args.db)
    app = make_app(sqlite_url(path, args.sync))
    if args.phase == "measure":
        activated(app, "long", "l1")
        start = time.perf_counter()
        handle = app.submit("l1", {"steps": args.steps})
        app.work(until_idle=True, concurrency=1)
        total = time.perf_counter() - start
        handle.result(timeout=5)
        gaps = [b - a for a, b in itertools.pairwise(STAMPS)]
        early = statistics.median(gaps[50:150])
        late = statistics.median(gaps[-100:])
        common.emit(
            system="tether",
            steps=args.steps,
            seconds=total,
            early_ms=early * 1e3,
            late_ms=late * 1e3,
            ratio=late / early,
        )
        return
    task = {"steps": args.steps, "kill_at": int(args.steps * 0.9), "flag": args.side}
    if args.phase == "start":
        activated(app, "long", "l1")
        app.submit("l1", task, task_id="w4")
        app.work(concurrency=1)
        common.fail("the start phase was not killed by its own step")
    ready = time.time()
    handle = app.submit("l1", task, task_id="w4")
    finish(app, handle, 300)
    common.emit(
        system="tether",
        ready_at=ready,
        first_new_at=FIRST_NEW_STEP[0] if FIRST_NEW_STEP else None,
        done_at=time.time(),
    )


def fresh_postgres(url: str) -> str:
    """Drop and create the PostgreSQL database of ``url`` (a run starts from nothing)."""
    import psycopg

    admin = url.rsplit("/", 1)[0].replace("+psycopg", "") + "/postgres"
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url


def is_postgres(db: str) -> bool:
    """Whether ``--db`` is a PostgreSQL URL (else a SQLite file)."""
    return db.startswith("postgresql")


def fresh_url(args: argparse.Namespace) -> str:
    """A fresh database for ``--db``: a new SQLite file, or PostgreSQL's made again."""
    if is_postgres(args.db):
        return fresh_postgres(args.db)
    return sqlite_url(common.fresh(args.db), args.sync)


def database_facts(args: argparse.Namespace, spy: common.SqliteSpy) -> dict[str, Any]:
    """What the result line says about the database: the pragmas read back, for SQLite."""
    if is_postgres(args.db):
        return {"database": "postgresql"}
    return {"database": "sqlite", **spy.pragmas(args.db)}


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of some values (``share`` in 0-1)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(len(ordered) * share + 0.5) - 1))]


def ended(app: Any, handles: list[Any], work: str) -> None:
    """Fail the result unless every run of ``handles`` completed once ``work`` returned."""
    for handle in handles:
        info = app.get_run(handle.run_id)
        if info.status.value != "completed":
            error = info.error or {}
            why = f"{error.get('type', '')}: {str(error.get('message', '')).split(':')[0]}"
            common.fail(
                f"{info.agent_id}'s run is {info.status.value} once {work} returned"
                + (f" ({why})" if error else ""),
                run_id=handle.run_id,
                run_error=info.error,
            )


def w6(args: argparse.Namespace) -> None:
    """R runs of S sleeping steps on PostgreSQL, served by ``--workers`` worker processes."""
    url = fresh_postgres(args.db)
    app = make_app(url)
    activated(app, "pauser", "p1")
    for _ in range(args.runs):
        app.submit("p1", {"steps": args.steps, "sleep": args.sleep})
    start, cpu = time.perf_counter(), common.cpu_jiffies()
    workers = spawn_workers(url, args.workers, args.concurrency)
    try:
        while unfinished(app, "p1", ["pending", "running", "waiting"]):
            if time.perf_counter() - start > 600:
                common.fail("W6 did not finish in 600 s")
            time.sleep(0.05)
        elapsed, busy = time.perf_counter() - start, common.busy_share(cpu, common.cpu_jiffies())
    finally:
        stop_workers(workers)
    done = len(app.list_runs(agent_id="p1", status="completed", limit=None))
    app.close()
    common.emit(
        system="tether",
        workers=args.workers,
        completed=done,
        seconds=elapsed,
        steps_per_s=done * args.steps / elapsed,
        cpu_busy=busy,
        worker=WORKER_KIND[0],
    )


def w7(args: argparse.Namespace) -> None:
    """Message round trips: A's run sends to B and receives B's reply, ``--trips`` times,
    with one worker (this process) running both runs, ``--concurrency`` at once."""
    spy = common.SqliteSpy(count=args.count).install()
    app = make_app(fresh_url(args))
    activated(app, "ponger", "w7-b")
    activated(app, "pinger", "w7-a")
    commits_before = spy.commits_for(args.db)
    with common.timed() as elapsed:
        pong = app.submit("w7-b", {"trips": args.trips})
        ping = app.submit("w7-a", {"trips": args.trips, "peer": "w7-b"})
        executions = app.work(until_idle=True, concurrency=args.concurrency, timeout=600)
    ended(app, [ping, pong], "App.work(until_idle=True, timeout=600)")
    stamps = ping.result(timeout=5)
    trips = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]
    tenth = max(1, len(trips) // 10)
    commits = spy.commits_for(args.db) - commits_before if args.count else None
    common.emit(
        system="tether",
        trips=len(trips),
        seconds=elapsed[0],
        p50_ms=statistics.median(trips),
        p99_ms=percentile(trips, 0.99),
        max_ms=max(trips),
        first_tenth_ms=statistics.median(trips[:tenth]),
        last_tenth_ms=statistics.median(trips[-tenth:]),
        executions=executions,
        commits=commits,
        concurrency=args.concurrency,
        **database_facts(args, spy),
    )
    app.close()


def w8(args: argparse.Namespace) -> None:
    """Fan-out and gather: one coordinator run spawns ``--children`` child runs over
    ``--agents`` agents and waits for all; one worker (this process), ``--concurrency``."""
    spy = common.SqliteSpy(count=args.count).install()
    app = make_app(fresh_url(args))
    for i in range(args.agents):
        activated(app, "helper", f"w8-h{i}")
    activated(app, "coordinator", "w8-c")
    commits_before = spy.commits_for(args.db)
    task = {"children": args.children, "agents": args.agents, "prefix": "w8-h"}
    with common.timed() as elapsed:
        submitted = time.time()
        handle = app.submit("w8-c", task)
        executions = app.work(until_idle=True, concurrency=args.concurrency, timeout=600)
    ended(app, [handle], "App.work(until_idle=True, timeout=600)")
    info = app.get_run(handle.run_id)
    done = app.list_runs(status="completed", limit=None)
    children = [r for r in done if r.parent_run_id == handle.run_id]
    out = handle.result(timeout=5)
    if not out["in_order"] or len(children) != args.children:
        common.fail(f"{len(children)} children completed, results in order: {out['in_order']}")
    commits = spy.commits_for(args.db) - commits_before if args.count else None
    common.emit(
        system="tether",
        children=args.children,
        agents=args.agents,
        seconds=info.finished_at.timestamp() - submitted,
        spawned_s=out["spawned"] - submitted,
        gathered_s=out["gathered"] - submitted,
        work_s=elapsed[0],
        children_per_s=args.children / (info.finished_at.timestamp() - submitted),
        executions=executions,
        commits=commits,
        concurrency=args.concurrency,
        **database_facts(args, spy),
    )
    app.close()


DECIDER_POLL = 0.005
"""Seconds between two looks of W9's decider for the next pending approval."""


def awaiting(app: Any, run_id: str, title: str, limit: float) -> Any:
    """The approval ``title`` of the run, once it is pending (the run parked on it)."""
    deadline = time.monotonic() + limit
    while True:
        found = app.approvals(status="pending", run_id=run_id, limit=1)
        if found:
            if found[0].title != title:
                common.fail(f"expected the approval {title!r}, found {found[0].title!r}")
            return found[0]
        if time.monotonic() > deadline:
            info = app.get_run(run_id)
            common.fail(f"no pending {title!r} after {limit:.0f}s; the run is {info.status.value}")
        time.sleep(DECIDER_POLL)


def settled(app: Any, run_id: str, limit: float) -> None:
    """Wait until the run has ended (completed, failed, cancelled) or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    while not app.get_run(run_id).status.is_final and time.monotonic() < deadline:
        time.sleep(DECIDER_POLL)


def w9(args: argparse.Namespace) -> None:
    """From a person's decision to the run's next step: the run asks for ``--decisions``
    decisions in a row; this process decides each (main thread) and works the run (a worker
    on a thread, ``--concurrency`` runs at once)."""
    from tether.testing import background_worker

    spy = common.SqliteSpy(count=args.count).install()
    app = make_app(fresh_url(args))
    activated(app, "gated", "w9-g")
    commits_before = spy.commits_for(args.db)
    decided: list[float] = []
    calls: list[float] = []
    with background_worker(app, concurrency=args.concurrency) as worker, common.timed() as elapsed:
        handle = app.submit("w9-g", {"decisions": args.decisions})
        for i in range(args.decisions):
            pending = awaiting(app, handle.run_id, f"step {i}?", 60)
            decided.append(time.time())
            app.decide(pending.approval_id, True, actor="bench")
            calls.append((time.time() - decided[-1]) * 1e3)
        settled(app, handle.run_id, 60)
    ended(app, [handle], "the last decision was made")
    executions = worker.executed
    # The time the run first got past each decision, as journaled (kind "now").
    stamps = [
        dt.datetime.fromisoformat(s.output).timestamp()
        for s in app.run_steps(handle.run_id)
        if s.kind == "now"
    ]
    if len(stamps) != len(decided):
        common.fail(f"{len(stamps)} journaled times for {len(decided)} decisions")
    waits = [(t - d) * 1e3 for t, d in zip(stamps, decided, strict=True)]
    if min(waits) < 0:
        common.fail(f"a run went on {-min(waits):.3f} ms before its decision was made")
    tenth = max(1, len(waits) // 10)
    commits = spy.commits_for(args.db) - commits_before if args.count else None
    common.emit(
        system="tether",
        decisions=len(waits),
        seconds=elapsed[0],
        p50_ms=statistics.median(waits),
        p99_ms=percentile(waits, 0.99),
        max_ms=max(waits),
        first_tenth_ms=statistics.median(waits[:tenth]),
        last_tenth_ms=statistics.median(waits[-tenth:]),
        decide_ms=statistics.median(calls),
        executions=executions,
        commits=commits,
        concurrency=args.concurrency,
        **database_facts(args, spy),
    )
    app.close()


def main() -> None:
    """Run one workload (or a worker) and print its JSON result line."""
    p = common.parser(__doc__ or "")
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    why = engine_missing()
    if args.workload == "version":
        common.emit(system="tether", version=getattr(tether, "__version__", "?"), missing=why)
        return
    if why:
        common.fail(why, unavailable=True)
    workloads = {
        "W1": w1,
        "W2": w2,
        "W3": w3,
        "W4": w4,
        "W6": w6,
        "W7": w7,
        "W8": w8,
        "W9": w9,
        "W10": w10,
    }
    {**workloads, "worker": run_worker}[args.workload](args)


def run_worker(args: argparse.Namespace) -> None:
    """A worker process (what ``tether worker --app tether_w:app`` does)."""
    make_app(args.db).work(concurrency=args.concurrency)


app = make_app(os.environ.get("TETHER_DATABASE_URL")) if tether is not None else None

if __name__ == "__main__":
    main()
