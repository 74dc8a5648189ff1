"""Run tether's benchmark suite side by side with its peers and write ``bench/RESULTS.md``.

    .venv/bin/python bench/run.py                 # everything (what `make bench` runs)
    .venv/bin/python bench/run.py --quick         # smaller, 3 repetitions: for development
    .venv/bin/python bench/run.py --only W1,W5    # some workloads

A full run rewrites ``bench/RESULTS.md``; a partial one writes ``bench/.work/RESULTS.md``
unless ``--out`` says otherwise. Raw results go to ``bench/.work/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import report
import workloads
from harness import BENCH, WORK, ensure_peers, log

WORKLOADS: dict[str, Callable[[workloads.Plan], Any]] = {
    "W1": workloads.w1,
    "W2": workloads.w2,
    "W3": workloads.w3,
    "W4": workloads.w4,
    "W5": workloads.w5,
    "W6": workloads.w6,
    "W7": workloads.w7,
    "W8": workloads.w8,
    "W9": workloads.w9,
    "W10": workloads.w10,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller workloads, 3 repetitions")
    p.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W5")
    p.add_argument(
        "--reps", type=int, default=0, help="repetitions per figure (default 5; 3 quick)"
    )
    p.add_argument("--out", type=Path, default=None, help="where to write the Markdown report")
    args = p.parse_args(argv)
    chosen = [w.strip().upper() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    args.chosen = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen workloads, then write the report; returns the exit status."""
    args = parse_args(argv)
    started = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    peers_error = ensure_peers()
    if peers_error:
        log(peers_error)
    reps = args.reps or (3 if args.quick else 5)
    plan = workloads.Plan(quick=args.quick, reps=reps, peers_error=peers_error)
    results = {}
    for name in args.chosen:
        results[name] = WORKLOADS[name](plan)
        (WORK / "results.json").write_text(json.dumps(results, indent=1, default=str))
    full = not args.quick and len(args.chosen) == len(WORKLOADS) and not args.reps
    out = args.out or (BENCH / "RESULTS.md" if full else WORK / "RESULTS.md")
    seconds = time.perf_counter() - started
    text = report.render(results, peers_error=peers_error, full=full, seconds=seconds, reps=reps)
    out.write_text(text)
    sys.stdout.write(text)
    log(f"wrote {out} in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
