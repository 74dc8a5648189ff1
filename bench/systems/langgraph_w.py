"""LangGraph with its SQLite checkpointer, as documented for durable execution.

A ``StateGraph`` whose one node is a step and loops back until the count is reached, compiled
with ``SqliteSaver`` (``langgraph-checkpoint-sqlite``, which sets WAL; ``synchronous`` stays at
SQLite's FULL) and invoked with ``durability="sync"``: each step's checkpoint is written before
the next step starts.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from typing import Any, TypedDict

import common
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

SIDE_FILE = os.environ.get("BENCH_SIDE_FILE", "")
STEP_SLEEP = float(os.environ.get("BENCH_STEP_SLEEP", "0.02"))


class Count(TypedDict):
    """The graph state: steps done so far, and how many to do."""

    i: int
    n: int


def noop(state: Count) -> dict[str, int]:
    """A trivial step: advance the counter."""
    return {"i": state["i"] + 1}


def effect(state: Count) -> dict[str, int]:
    """W2's step: sleep, then leave a visible side effect (step number and wall time)."""
    time.sleep(STEP_SLEEP)
    common.append_line(SIDE_FILE, f"{state['i']} {time.time():.6f} {os.getpid()}")
    return {"i": state["i"] + 1}


def again(state: Count) -> str:
    """Loop back to the step until ``n`` steps are done."""
    return "step" if state["i"] < state["n"] else END


def build(step: Any, saver: SqliteSaver) -> Any:
    """Compile the one-node looping graph with the SQLite checkpointer."""
    graph = StateGraph(Count)
    graph.add_node("step", step)
    graph.add_edge(START, "step")
    graph.add_conditional_edges("step", again)
    return graph.compile(checkpointer=saver)


def config(thread: str, steps: int) -> dict[str, Any]:
    """Per-run config: one checkpoint thread per run, recursion limit above the step count."""
    return {"configurable": {"thread_id": thread}, "recursion_limit": steps + 10}


def w1(args: argparse.Namespace) -> None:
    """R runs of S trivial steps, one or ``--inflight`` at a time."""
    spy = common.SqliteSpy(count=args.count).install()
    path = common.fresh(args.db)
    with SqliteSaver.from_conn_string(str(path)) as saver:
        saver.setup()
        graph = build(noop, saver)
        commits_before, bytes_before = spy.commits_for(path), common.logical_bytes(path)

        def one(run: int) -> None:
            graph.invoke(
                {"i": 0, "n": args.steps}, config(f"r{run}", args.steps), durability="sync"
            )

        with common.timed() as elapsed:
            if args.inflight <= 1:
                for run in range(args.runs):
                    one(run)
            else:
                with ThreadPoolExecutor(args.inflight) as pool:
                    list(pool.map(one, range(args.runs)))
        common.w1_result(
            "langgraph", version("langgraph"), args, elapsed[0], spy, commits_before, bytes_before
        )


def w2(args: argparse.Namespace) -> None:
    """Start the run (phase ``start``, to be killed) or resume it from its last checkpoint."""
    path = common.fresh(args.db) if args.phase == "start" else args.db
    with SqliteSaver.from_conn_string(str(path)) as saver:
        graph = build(effect, saver)
        cfg = config("w2", args.steps)
        if args.phase == "start":
            graph.invoke({"i": 0, "n": args.steps}, cfg, durability="sync")
            common.fail("the start phase finished before it was killed")
        ready = time.time()
        # Invoking with no input continues the thread from its latest checkpoint.
        result = graph.invoke(None, cfg, durability="sync")
        common.emit(system="langgraph", ready_at=ready, done_at=time.time(), result=result["i"])


def main() -> None:
    """Run one workload and print its JSON result line."""
    args = common.parser(__doc__ or "").parse_args()
    if args.workload == "version":
        common.emit(system="langgraph", version=version("langgraph"))
    elif args.workload == "W1":
        w1(args)
    elif args.workload == "W2":
        w2(args)
    else:
        common.fail(f"LangGraph is not measured in {args.workload}")


if __name__ == "__main__":
    main()
