"""``RESULTS.md``: the machine, the versions, one table per workload, and the targets.

Every figure is ``median (min-max)`` over the repetitions; a configuration that could not run
shows why instead of a number.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import PEERS_PY, ROOT, TETHER_PY, WORK, Result, Spread, spread

Rows = dict[str, list[Result]]


def ok(results: list[Result]) -> list[Result]:
    """The successful results."""
    return [r for r in results if r.get("ok")]


def figure(results: list[Result], key: str) -> Spread | None:
    """The spread of one numeric field over the successful results."""
    return spread([r[key] for r in ok(results) if r.get(key) is not None])


def cell(results: list[Result], key: str, fmt: str = "{:,.0f}") -> str:
    """A table cell: ``median (min-max)``, or why there is no figure."""
    value = figure(results, key)
    failed = [r for r in results if not r.get("ok")]
    if value is not None:
        return value.show(fmt) + (f" [{value.n} of {len(results)} ran]" if failed else "")
    return f"n/a: {failed[0].get('error')}" if failed else "n/a"


def median(rows: Rows, label: str, key: str) -> float | None:
    """The median of one field of one configuration, or None."""
    value = figure(rows.get(label, []), key)
    return value.median if value else None


def table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def number(value: float | None, fmt: str) -> str:
    """A formatted number, or ``not reached``."""
    return "not reached" if value is None else fmt.format(value)


def bytes_per_step(results: list[Result]) -> float | None:
    """Database bytes per step beyond the empty schema, from the first successful result."""
    good = ok(results)
    return (good[0]["bytes_end"] - good[0]["bytes_setup"]) / good[0]["steps"] if good else None


def per_step(result: Result | None, key: str, fmt: str = "{:.2f}") -> str:
    """A per-step count from an untimed counting run."""
    if not result or not result.get("ok") or result.get(key) is None:
        return "n/a"
    return fmt.format(result[key])


# -- header ---------------------------------------------------------------------------------


def machine() -> list[str]:
    """Cores, CPU, memory, the disk under ``bench/.work`` and the SQLite/Python versions."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return [
        f"- CPU: {os.cpu_count()} cores, {cpu}; memory {mem_kb / 1024**2:.0f} GiB",
        f"- Disk under `bench/.work`: {disk(WORK)}",
        f"- OS: {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- SQLite: {sqlite_version(TETHER_PY)} (tether's venv), "
        f"{sqlite_version(PEERS_PY)} (peers' venv)",
    ]


def disk(path: Path) -> str:
    """The device and file system a path lives on (from ``/proc/mounts``)."""
    best = ("?", "?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, fstype, options = line.split()[:4]
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[1]):
            best = (device, mount, f"{fstype} ({options.split(',')[0]})")
    rotational = Path(f"/sys/block/{Path(best[0]).name}/queue/rotational")
    kind = ""
    if rotational.exists():
        flag = rotational.read_text().strip() == "1"
        kind = f", {'rotational' if flag else 'non-rotational'} as the kernel reports it"
    return f"{best[0]} mounted at {best[1]}, {best[2]}{kind}"


def sqlite_version(python: str) -> str:
    """The SQLite library version an interpreter links."""
    return capture([python, "-c", "import sqlite3; print(sqlite3.sqlite_version)"])


def capture(cmd: list[str]) -> str:
    """First line of a command's output, or ``?``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except OSError:
        return "?"
    return (out.stdout.strip().splitlines() or ["?"])[0]


def versions(peers: bool) -> list[str]:
    """Installed versions of tether and of each peer."""
    get = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    commit = capture(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = capture(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"])
    lines = [
        f"- tether {capture([TETHER_PY, '-c', get, 'tether'])} at commit {commit}"
        + (" (with uncommitted changes in src/)" if dirty not in ("", "?") else "")
        + f"; SQLAlchemy {capture([TETHER_PY, '-c', get, 'sqlalchemy'])}"
    ]
    if peers:
        names = ["dbos", "langgraph", "langgraph-checkpoint-sqlite", "burr", "sqlalchemy"]
        found = ", ".join(f"{n} {capture([PEERS_PY, '-c', get, n])}" for n in names)
        lines.append(f"- peers (bench/requirements-peers.txt): {found}")
    return lines


# -- sections -------------------------------------------------------------------------------


def w1_section(w1: dict[str, Any]) -> list[str]:
    """Steps/s per shape, with durability facts per system, and the in-flight table."""
    lines = ["## W1 durable steps", ""]
    lines += [
        "Trivial steps, every result durably committed before the next step, fresh SQLite file "
        "per repetition. Journal mode and `synchronous` are read back from each system's own "
        "connection. Commits per step are measured by tracing every statement on the "
        "system's sqlite3 connections (a COMMIT after rows changed, or a write outside a "
        "transaction), fsyncs per step by `strace` (fsync + fdatasync between markers around "
        "the workload), both in an untimed run of the same shape with fewer runs. Set-up "
        "(schema, migrations, agent creation) is outside the timed and counted part; "
        "submitting the runs is inside it.",
        "",
        "DBOS and Burr run twice: as they ship (rollback journal, `synchronous=FULL`, several "
        "fsyncs per commit), and as DBOS-WAL and Burr-WAL, the same code with their SQLite "
        "file switched to WAL and `synchronous=FULL`, tether's default: the same power-loss "
        "guarantee and one fsync per commit, so the comparison is of mechanism at equal "
        "durability. How each is switched is in `bench/systems/dbos_w.py` and `burr_w.py`; a "
        "WAL run fails unless its connections read back WAL/FULL.",
        "",
    ]
    full = median(w1["shapes"][0]["rows"], "raw SQLite, FULL", "steps_per_s")
    normal = median(w1["shapes"][0]["rows"], "raw SQLite, NORMAL", "steps_per_s")
    if full and normal:
        lines += [
            f"On this disk a durable commit costs about {(1 / full - 1 / normal) * 1e6:,.0f} µs "
            "more at FULL than at NORMAL (raw SQLite's time per step at each setting): the "
            "price of one fdatasync.",
            "",
        ]
    for shape in w1["shapes"]:
        rows, counts = shape["rows"], shape["counts"]
        lines += [f"### {shape['runs']} runs x {shape['steps']} steps, one run in flight", ""]
        body = []
        for label, results in rows.items():
            sample = next(iter(ok(results)), counts.get(label) or {})
            raw = (
                "raw SQLite, NORMAL"
                if sample.get("synchronous") == "NORMAL"
                else "raw SQLite, FULL"
            )
            mine, base = median(rows, label, "steps_per_s"), median(rows, raw, "steps_per_s")
            body.append(
                [
                    label,
                    str(sample.get("journal_mode", "?")),
                    str(sample.get("synchronous", "?")),
                    cell(results, "steps_per_s"),
                    f"{mine / base:.0%}" if mine and base else "n/a",
                    per_step(counts.get(label), "commits_per_step"),
                    per_step(counts.get(label), "fsyncs_per_step"),
                ]
            )
        header = ["system", "journal", "synchronous", "steps/s", "of raw (same sync)"]
        lines += [*table([*header, "commits/step", "fsyncs/step"], body), ""]
    fly = w1["inflight"]
    if fly:
        lines += [
            f"### {fly['runs']} runs x {fly['steps']} steps, {fly['inflight']} runs in flight",
            "",
        ]
        base = median(w1["shapes"][0]["rows"], "raw SQLite, FULL", "steps_per_s")
        body = []
        for label, results in fly["rows"].items():
            mine = median(fly["rows"], label, "steps_per_s")
            body.append(
                [
                    label,
                    cell(results, "steps_per_s"),
                    f"{mine / base:.0%}" if mine and base else "n/a",
                    per_step(fly["counts"].get(label), "commits_per_step"),
                    per_step(fly["counts"].get(label), "fsyncs_per_step"),
                ]
            )
        header = ["system", "steps/s", "of raw FULL, one in flight", "commits/step", "fsyncs/step"]
        lines += [*table(header, body), ""]
    return lines


def storage_section(w1: dict[str, Any]) -> list[str]:
    """Database bytes per step, from W1's first shape."""
    shape = w1["shapes"][0]
    lines = ["## Storage", ""]
    lines += [
        f"Database size after W1's {shape['runs']} x {shape['steps']} steps, as it is after a "
        "checkpoint (page_count x page_size, WAL included): per step beyond the empty "
        "schema, and the whole file divided by the steps.",
        "",
    ]
    body = []
    for label, results in shape["rows"].items():
        if label.startswith("raw") and "NORMAL" in label:
            continue
        good = ok(results)
        if not good:
            body.append([label, "n/a", "n/a"])
            continue
        r = good[0]
        body.append(
            [
                label,
                number(bytes_per_step(results), "{:,.0f}"),
                f"{r['bytes_end'] / r['steps']:,.0f}",
            ]
        )
    return lines + table(["system", "bytes/step beyond schema", "file bytes / steps"], body) + [""]


def w2_section(rows: Rows) -> list[str]:
    """Restart timings and duplicated steps."""
    lines = ["## W2 crash resume", ""]
    lines += [
        "One run of 50 steps, each sleeping 20 ms and then appending its number to a "
        "side-effect file; SIGKILLed inside a random step (after 5 to 45 steps); restarted at "
        "once. Times are from spawning the restarted process (interpreter start and imports "
        "included) to the first new line in the side-effect file (written at the end of a "
        "20 ms step), and to the run's result; ready is when the restarted process had "
        "imported its system and was about to recover. Duplicates count steps whose effect "
        "appears twice, over all repetitions.",
        "",
    ]
    body = [
        [
            label,
            cell(results, "ready_s", "{:.3f}"),
            cell(results, "first_new_s", "{:.3f}"),
            cell(results, "done_s", "{:.2f}"),
            str(sum(r["duplicates"] for r in ok(results))) if ok(results) else "n/a",
            f"{sum(bool(r['complete']) for r in ok(results))}/{len(results)}",
        ]
        for label, results in rows.items()
    ]
    header = ["system", "restart → ready (s)", "→ first new step (s)", "→ done (s)"]
    return lines + table([*header, "duplicated steps", "complete"], body) + [""]


def w3_section(rows: Rows) -> list[str]:
    """Waiting runs: memory and timer lateness."""
    results = next(iter(rows.values()), [])
    good = ok(results)
    lines = ["## W3 waiting runs", ""]
    if not good:
        return [*lines, f"tether: {cell(results, 'rss_peak_mb')}", ""]
    r = good[0]
    lines += [
        f"{r['runs']:,} tether runs, each journaling a step, sleeping on a durable timer, then "
        f"journaling the lateness of its wake-up; one worker process ({r['worker']}). One "
        "pass: the figures are spread over the runs, not over repetitions.",
        "",
    ]
    body = [
        ["worker RSS once every run was asleep (MB)", number(r["rss_asleep_mb"], "{:.0f}")],
        ["worker peak RSS, waking included (MB)", f"{r['rss_peak_mb']:.0f}"],
        ["seconds to submit", f"{r['submit_s']:.1f}"],
        ["seconds from submitting to all asleep", number(r["all_asleep_s"], "{:.1f}")],
        [
            "due → resumed, median / p99 / max (s)",
            f"{r['late_p50_s']:.3f} / {r['late_p99_s']:.3f} / {r['late_max_s']:.3f}",
        ],
        ["runs completed", f"{r['completed']:,}"],
    ]
    return lines + table(["measure", "value"], body) + [""]


def w4_section(rows: Rows) -> list[str]:
    """Long history: per-step cost late against early, and resume after a crash."""
    cost, crash = rows.get("cost", []), rows.get("crash", [])
    steps = next((r["steps"] for r in ok(cost)), "?")
    lines = ["## W4 long history", ""]
    lines += [
        f"One tether run of {steps} trivial steps. Per-step cost is the median wall time "
        "between consecutive steps around step 100 and over the last 100 steps. The crash "
        "variant SIGKILLs itself inside step 90 %; times are from spawning the restarted "
        "process.",
        "",
    ]
    body = [
        ["per-step cost near step 100 (ms)", cell(cost, "early_ms", "{:.3f}")],
        ["per-step cost at the end (ms)", cell(cost, "late_ms", "{:.3f}")],
        ["end / start", cell(cost, "ratio", "{:.2f}")],
        ["restart → first new step (s)", cell(crash, "first_new_s", "{:.3f}")],
        ["restart → done (s)", cell(crash, "done_s", "{:.2f}")],
    ]
    return lines + table(["measure", "value"], body) + [""]


def w5_section(rows: Rows) -> list[str]:
    """Start-up of whole processes."""
    lines = ["## W5 start-up", ""]
    lines += ["Wall time of the whole process, spawn to exit, after one warm-up.", ""]
    body = [[label, cell(results, "seconds", "{:.3f}")] for label, results in rows.items()]
    return lines + table(["command", "seconds"], body) + [""]


def w6_section(rows: Rows) -> list[str]:
    """PostgreSQL scale-out."""
    lines = ["## W6 PostgreSQL scale-out", ""]
    lines += [
        "tether runs of 5 steps sleeping 10 ms each, on PostgreSQL 15 (local), worker "
        "processes with 8 runs each in flight; time from starting the workers to the last "
        "run completing (worker start-up included). Machine CPU busy is the share of both "
        "cores in use meanwhile (workers, PostgreSQL and the poller): near 100 % the machine, "
        "not the worker count, is the limit.",
        "",
    ]
    one = median(rows, "1 worker", "steps_per_s")
    body = []
    for label, results in rows.items():
        mine = median(rows, label, "steps_per_s")
        speedup = f"{mine / one:.2f}x" if mine and one else "n/a"
        busy = cell(results, "cpu_busy", "{:.0%}")
        body.append([label, cell(results, "steps_per_s"), speedup, busy])
    kinds = {r["worker"] for results in rows.values() for r in ok(results)}
    header = ["workers", "steps/s", "vs 1 worker", "machine CPU busy"]
    notes = [f"Workers: {', '.join(sorted(kinds))}.", ""] if kinds else []
    return [*lines, *table(header, body), "", *notes]


def row(label: str, results: list[Result], cells: list[str]) -> list[str]:
    """A table row; when no repetition ran, the first cell says why and the others n/a."""
    if ok(results) or not results:
        return [label, *cells]
    return [label, cell(results, "?"), *(["n/a"] * (len(cells) - 1))]


def pragmas(results: list[Result]) -> str:
    """``WAL/FULL``: journal mode and ``synchronous`` as read back from a SQLite connection."""
    sample = next(iter(ok(results)), {})
    return f"{sample.get('journal_mode', '?')}/{sample.get('synchronous', '?')}"


def durability(results: list[Result]) -> str:
    """``SQLite WAL/FULL`` as read back from a SQLite run's connection, or the database's name."""
    sample = next(iter(ok(results)), {})
    if sample.get("database") == "sqlite":
        return f"SQLite {pragmas(results)}"
    return str(sample.get("database", "?"))


def w7_section(w7: dict[str, Any]) -> list[str]:
    """Message round trips: latency percentiles and commits per round trip."""
    lines = ["## W7 message round trip", ""]
    lines += [
        f"Two tether agents: A's run sends a message to B and receives B's reply, "
        f"{w7['trips']} times in a row; B's run receives and replies as many times. One "
        f"worker process (the measuring one, `App.work`) runs both, {w7['concurrency']} runs "
        "at once. A round trip is the gap between consecutive `ctx.now()` values journaled "
        "by A right after each reply arrives (and once before the first send): a replay "
        "returns the journaled time, so the resumptions after each `receive` do not distort "
        "it. Percentiles are over the round trips of one repetition (p99 by nearest rank); "
        "first / last 10 % are the medians of the first and last tenth of the trips (the "
        "journals grow as the trips go). Commits, fsyncs and executions (claims) per round "
        "trip come from an untimed run on SQLite; no figure on PostgreSQL. Issue 9 sets no "
        "target for these figures.",
        "",
    ]
    body = []
    for label, results in w7["rows"].items():
        counts = w7["counts"].get(label)
        body.append(
            row(
                label,
                results,
                [
                    durability(results),
                    cell(results, "p50_ms", "{:.1f}"),
                    cell(results, "p99_ms", "{:.1f}"),
                    f"{cell(results, 'first_tenth_ms', '{:.1f}')} / "
                    f"{cell(results, 'last_tenth_ms', '{:.1f}')}",
                    per_step(counts, "commits_per"),
                    per_step(counts, "fsyncs_per"),
                    per_step(counts, "executions_per"),
                ],
            )
        )
    header = ["system", "database", "p50 (ms)", "p99 (ms)", "first / last 10 %, p50 (ms)"]
    header += ["commits/trip", "fsyncs/trip", "claims/trip"]
    return [*lines, *table(header, body), ""]


def w8_section(w8: dict[str, Any]) -> list[str]:
    """Fan-out to children and gather: time and commits per child."""
    lines = ["## W8 fan-out and gather", ""]
    lines += [
        f"One tether coordinator run spawns {w8['children']} child runs over {w8['agents']} "
        f"agents ({w8['children'] // w8['agents']} each, one run at a time per agent) with "
        "`ctx.spawn`, then `ctx.wait`s for all of them and checks their results; each child "
        "journals one trivial step and returns. One worker process (the measuring one, "
        f"`App.work`), {w8['concurrency']} runs at once. Times are from just before "
        "`App.submit` of the coordinator to its `finished_at` as stored, and to the "
        "`ctx.now()` it journals after its last spawn. Commits, fsyncs and claims per child "
        "count every run (the coordinator's share included) in an untimed run on SQLite; no "
        "figure on PostgreSQL. Issue 9 sets no target for these figures.",
        "",
    ]
    body = []
    for label, results in w8["rows"].items():
        counts = w8["counts"].get(label)
        body.append(
            row(
                label,
                results,
                [
                    durability(results),
                    cell(results, "seconds", "{:.3f}"),
                    cell(results, "spawned_s", "{:.3f}"),
                    cell(results, "children_per_s", "{:,.0f}"),
                    per_step(counts, "commits_per"),
                    per_step(counts, "fsyncs_per"),
                    per_step(counts, "executions_per"),
                ],
            )
        )
    header = ["system", "database", "submit → gathered (s)", "submit → all spawned (s)"]
    header += ["children/s", "commits/child", "fsyncs/child", "claims/child"]
    return [*lines, *table(header, body), ""]


def w9_section(w9: dict[str, Any]) -> list[str]:
    """From a person's decision to the run's next step: latency percentiles and commits."""
    lines = ["## W9 from a decision to the next step", ""]
    lines += [
        f"One tether run asks for {w9['decisions']} decisions in a row (`ctx.approve`), "
        "journaling `ctx.now()` right after each one arrives. The measuring process decides "
        'in its main thread: it polls `App.approvals(status="pending")` every 5 ms, takes '
        "the time just before `App.decide`, and decides; a worker of the same App, on a thread "
        f"({w9['concurrency']} run at once), is woken by the decision in process and resumes "
        "the run. The latency is from that time to the journaled `ctx.now()` (read back with "
        "`App.run_steps`): it includes the decision's own commit, the claim, the replay and "
        "the write that consumes the decision; a replay returns the journaled time, so the "
        "resumptions do not distort it. Percentiles are over the decisions of one repetition "
        "(p99 by nearest rank); first / last 10 % are the medians of the first and last tenth "
        "(the journal grows as the decisions go); `decide()` is how long the call itself took. "
        "Commits, fsyncs and executions (claims) per decision come from an untimed run on "
        "SQLite; no figure on PostgreSQL. The issue sets no target for these figures.",
        "",
    ]
    body = []
    for label, results in w9["rows"].items():
        counts = w9["counts"].get(label)
        body.append(
            row(
                label,
                results,
                [
                    durability(results),
                    cell(results, "p50_ms", "{:.1f}"),
                    cell(results, "p99_ms", "{:.1f}"),
                    f"{cell(results, 'first_tenth_ms', '{:.1f}')} / "
                    f"{cell(results, 'last_tenth_ms', '{:.1f}')}",
                    cell(results, "decide_ms", "{:.1f}"),
                    per_step(counts, "commits_per"),
                    per_step(counts, "fsyncs_per"),
                    per_step(counts, "executions_per"),
                ],
            )
        )
    header = ["system", "database", "p50 (ms)", "p99 (ms)", "first / last 10 %, p50 (ms)"]
    header += ["`decide()`, p50 (ms)", "commits/decision", "fsyncs/decision"]
    header += ["claims/decision"]
    return [*lines, *table(header, body), ""]


def ledger_cost(w1: list[Result], w10: list[Result]) -> Spread | None:
    """The extra time per step W10 takes over W1 (W1's steps/s over W10's, minus one), for
    each repetition in which both ran (they ran one after the other)."""
    pairs = zip(w1, w10, strict=False)
    return spread(
        [a["steps_per_s"] / b["steps_per_s"] - 1 for a, b in pairs if a.get("ok") and b.get("ok")]
    )


def shape_name(config: dict[str, Any]) -> str:
    """``200 x 10, 1 in flight``: a W1 shape."""
    return f"{config['runs']} x {config['steps']}, {config['inflight']} in flight"


def w10_section(w10: dict[str, Any]) -> list[str]:
    """The budget ledger's cost: W1 against W10, steps/s, commits, fsyncs and bytes per step."""
    lines = ["## W10 what the budget ledger costs", ""]
    lines += [
        "W1's tether runs again with a budget on every run (`max_steps`, `max_cost` and "
        "`max_tokens`, all out of reach) and every step metered "
        '(`ctx.step(noop, i, tool="llm", cost=0.001, tokens=10)`): each step is checked '
        "against its run's limits before it runs, and its usage (the step row's tool, cost "
        "and tokens, a `budget.settled` event) is committed in the step's own transaction; "
        "the run's ledger rows are brought up to date when it ends. Each run is alone on its "
        "budget, so nothing is reserved in the ledger. W1 and W10 take turns at every W1 "
        "shape (W1 FULL, W10 FULL, W1 NORMAL, "
        f"W10 NORMAL, and again), {w10['reps']} repetitions each, fresh file every time; W10 "
        "checks that the ledger counted the last run's steps. The cost is W10's extra time "
        "per step, W1's steps/s over W10's minus one, for the two runs of each repetition, "
        "then median (min-max). Commits and fsyncs per step come from untimed runs as in W1, "
        "bytes per step beyond the schema from the first repetition. Target: W10 at most 15 % "
        "slower than W1 (a cost of at most +15 %).",
        "",
    ]
    body = []
    for config in w10["configs"]:
        w1, w10_rows = config["rows"]["W1"], config["rows"]["W10"]
        counts = config["counts"]
        cost = ledger_cost(w1, w10_rows)
        body.append(
            [
                shape_name(config),
                pragmas(w1 + w10_rows),
                cell(w1, "steps_per_s"),
                cell(w10_rows, "steps_per_s"),
                cost.show("{:+.0%}") if cost else "n/a",
                " / ".join(per_step(counts.get(w), "commits_per_step") for w in ("W1", "W10")),
                " / ".join(per_step(counts.get(w), "fsyncs_per_step") for w in ("W1", "W10")),
                " / ".join(number(bytes_per_step(r), "{:,.0f}") for r in (w1, w10_rows)),
            ]
        )
    header = ["W1 shape", "journal/synchronous", "W1 steps/s", "W10 steps/s"]
    header += ["ledger cost, time/step", "commits/step, W1 / W10", "fsyncs/step, W1 / W10"]
    header += ["bytes/step, W1 / W10"]
    return [*lines, *table(header, body), ""]


# -- targets --------------------------------------------------------------------------------

PEER_TARGETS = (("DBOS", 5.0), ("LangGraph", 3.0), ("Burr-WAL", 1.25), ("DBOS-WAL", 5.0))
"""W1 at each shape: tether FULL's steps/s over each peer's must reach the factor."""


def targets(res: dict[str, Any]) -> list[str]:
    """One line per target (issues 5 and 8, and W10's): met, not met, or not measured."""
    lines = ["## Targets", ""]

    def line(name: str, value: float | None, test: Callable[[float], bool], shown: str) -> None:
        if value is None:
            lines.append(f"- not measured: {name}")
        else:
            lines.append(f"- {'met' if test(value) else 'NOT met'}: {name}: {shown.format(value)}")

    w1 = res.get("W1")
    if w1:
        for shape in w1["shapes"]:
            rows, tag = shape["rows"], f"({shape['runs']}x{shape['steps']})"
            t = median(rows, "tether, FULL", "steps_per_s")
            # Issue 8 adds the peers at equal mechanism (WAL, synchronous=FULL): the honest bar.
            for peer, factor in PEER_TARGETS:
                p = median(rows, peer, "steps_per_s")
                ratio = t / p if t and p else None
                line(
                    f"W1 tether FULL >= {factor:g}x {peer} {tag}",
                    ratio,
                    lambda v, f=factor: v >= f,
                    "{:.2f}x",
                )
            for sync, share in (("FULL", 0.5), ("NORMAL", 0.3)):
                mine = median(rows, f"tether, {sync}", "steps_per_s")
                raw = median(rows, f"raw SQLite, {sync}", "steps_per_s")
                ratio = mine / raw if mine and raw else None
                line(
                    f"W1 tether {sync} >= {share:.0%} of raw {sync} {tag}",
                    ratio,
                    lambda v, s=share: v >= s,
                    "{:.0%}",
                )
        fly = w1["inflight"]
        t = median(fly["rows"], "tether, FULL", "steps_per_s") if fly else None
        raw = median(w1["shapes"][0]["rows"], "raw SQLite, FULL", "steps_per_s")
        line(
            "W1 tether FULL, 50 runs in flight >= 100% of raw FULL",
            t / raw if t and raw else None,
            lambda v: v >= 1,
            "{:.0%}",
        )
        line(
            "storage <= 250 bytes per trivial step (beyond the schema)",
            bytes_per_step(w1["shapes"][0]["rows"].get("tether, FULL", [])),
            lambda v: v <= 250,
            "{:,.0f} B",
        )
    w2 = res.get("W2", {}).get("tether, FULL", [])
    first = figure(w2, "first_new_s")
    dups = sum(r["duplicates"] for r in ok(w2)) if ok(w2) else None
    line(
        "W2 restart to first new step < 0.3 s",
        first.median if first else None,
        lambda v: v < 0.3,
        "{:.3f} s",
    )
    line("W2 0 duplicated steps", dups, lambda v: v == 0, "{:.0f}")
    w3 = ok(next(iter(res.get("W3", {}).values()), []))
    line(
        "W3 worker RSS < 100 MB while runs wait (peak)",
        w3[0]["rss_peak_mb"] if w3 else None,
        lambda v: v < 100,
        "{:.0f} MB",
    )
    w4 = res.get("W4", {}).get("cost", [])
    ratio = figure(w4, "ratio")
    line(
        "W4 per-step cost at the end within 1.2x of step 100",
        ratio.median if ratio else None,
        lambda v: v <= 1.2,
        "{:.2f}x",
    )
    w5 = res.get("W5", {})
    for label, limit in (("import tether", 0.15), ("tether --help", 0.3)):
        value = median(w5, label, "seconds")
        line(f"W5 {label} < {limit} s", value, lambda v, lim=limit: v < lim, "{:.3f} s")
    w6 = res.get("W6", {})
    one, four = median(w6, "1 worker", "steps_per_s"), median(w6, "4 workers", "steps_per_s")
    line(
        "W6 4 workers >= 3x one", four / one if one and four else None, lambda v: v >= 3, "{:.2f}x"
    )
    for config in res.get("W10", {}).get("configs", []):
        cost = ledger_cost(config["rows"]["W1"], config["rows"]["W10"])
        sync = config["system"].removeprefix("tether, ")
        line(
            f"W10 at most 15% slower than W1 ({shape_name(config)}, {sync})",
            cost.median if cost else None,
            lambda v: v <= 0.15,
            "{:+.0%}",
        )
    return [*lines, ""]


def render(
    res: dict[str, Any], *, peers_error: str | None, full: bool, seconds: float, reps: int
) -> str:
    """The whole ``RESULTS.md``."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "full run (`make bench`)" if full else "partial run (`--quick` or `--only`)"
    lines = [
        "# tether benchmark results",
        "",
        f"{now}; {kind}; {reps} repetitions per figure unless said otherwise, alternating "
        f"between systems; the suite took {seconds / 60:.1f} min. Rewritten by `bench/run.py`; "
        "see `bench/README.md` for the method.",
        "",
        "## Machine and versions",
        "",
        *machine(),
        *versions(peers_error is None),
        "",
    ]
    if peers_error:
        lines += [f"Peers not measured: {peers_error}", ""]
    lines += targets(res)
    sections: list[tuple[str, Callable[[Any], list[str]]]] = [
        ("W1", w1_section),
        ("W1", storage_section),
        ("W2", w2_section),
        ("W3", w3_section),
        ("W4", w4_section),
        ("W5", w5_section),
        ("W6", w6_section),
        ("W7", w7_section),
        ("W8", w8_section),
        ("W9", w9_section),
        ("W10", w10_section),
    ]
    for key, section in sections:
        if key in res:
            lines += section(res[key])
    return "\n".join(lines).rstrip() + "\n"
