"""A populated tether database, and the checks that an upgrade lost none of it.

The population is described once, as data (``population()``): agents in every lifecycle state
with their history and state versions, finished runs with journals and events, checkpoints,
and runs in flight: pending, a fork, parked on a due sleep and on tomorrow's, waiting for a
retry, ``running`` under a dead worker's expired lease, needing attention with an open
incident, and paused while parked on a sleep; and, on request, a bulk of finished and parked
runs. ``tests/upgradeseeds.py`` writes it in the tables of each schema revision.

Its records name their fields as the App at head names them, so ``verify`` reads the same
fields from what was seeded and from what the App returns, and fails naming anything lost or
changed; for what the App does not show, it reads the head schema. ``finish`` does what a
person and a worker do after an upgrade, until the runs in flight end.

Run as ``python -m tests.upgradekit TRACE tether-args...``, this module is the ``tether`` CLI
appending each SQL statement (and each commit) to the file TRACE before it is sent;
``TETHER_TEST_STOP_AT=N`` makes it stop for good on line N. The kill test aims its ``kill -9``
with these lines: the hook is in the test's process, none is in tether's code.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select, text

import tether
from tether.store import migrate, parse_url, schema
from tether.store.database import Database
from tether.testing import work_until

DAY = 86_400
BULK_AGENT = "bulk"
DEAD_WORKER = "w-dead"

# -- the population, as data ------------------------------------------------------------------


def iso(at: dt.datetime) -> str:
    """A time as the engine writes it into journal entries and events."""
    return at.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Step:
    """One journal entry."""

    seq: int
    name: str
    kind: str = "step"
    status: str = "completed"
    output: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 1
    state_version: int | None = None
    finished_at: dt.datetime | None = None


@dataclass(frozen=True)
class Timer:
    """What a waiting run waits for: the end of step ``seq``'s sleep, or its retry delay."""

    kind: str
    seq: int
    due: dt.datetime

    def doc(self) -> dict[str, Any]:
        """The run's record of its wait, as the engine writes it."""
        return {"kind": self.kind, "seq": self.seq, "until": iso(self.due)}


@dataclass(frozen=True)
class Run:
    """One run, as a worker or a person left it."""

    run_id: str
    agent_id: str
    input: dict[str, Any]
    status: str
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    journal: tuple[Step, ...] = ()
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    fence: int = 0
    owner: str | None = None
    lease_until: dt.datetime | None = None
    timer: Timer | None = None
    state_version: int | None = None
    forked_from: str | None = None
    forked_at_step: int | None = None
    priority: int = 0
    max_concurrent: int = 1
    finishes: bool = False
    """In flight: once upgraded, a worker (for some, after a person acts) completes it."""

    @property
    def steps(self) -> int:
        """The last journal position."""
        return max((s.seq for s in self.journal), default=0)

    @property
    def wake_at(self) -> dt.datetime | None:
        """When its timer is due."""
        return self.timer.due if self.timer else None

    @property
    def updated_at(self) -> dt.datetime:
        """The last time it changed."""
        return self.finished_at or self.started_at or self.created_at

    @property
    def replayed(self) -> dict[str, Any]:
        """Outputs of the steps that a replay returns without running them again."""
        return {s.name: s.output for s in self.journal if s.status == "completed"}


@dataclass(frozen=True)
class StateVersion:
    """One version of an agent's state."""

    version: int
    state: dict[str, Any]
    reason: str
    run_id: str | None
    at: dt.datetime


@dataclass(frozen=True)
class Transition:
    """One lifecycle transition."""

    from_state: str | None
    to_state: str
    action: str
    reason: str
    at: dt.datetime
    actor: str = "ops"


@dataclass(frozen=True)
class Agent:
    """One agent; its state is its newest state version."""

    agent_id: str
    type: str
    history: tuple[Transition, ...]
    states: tuple[StateVersion, ...]
    config: dict[str, Any]
    error: dict[str, Any] | None = None

    @property
    def lifecycle(self) -> str:
        """Where its history left it."""
        return self.history[-1].to_state

    @property
    def state(self) -> dict[str, Any]:
        """Its state document now."""
        return self.states[-1].state

    @property
    def version(self) -> int:
        """Its state's version now."""
        return self.states[-1].version

    @property
    def created_at(self) -> dt.datetime:
        """When it was created."""
        return self.history[0].at

    @property
    def updated_at(self) -> dt.datetime:
        """The last time it changed."""
        return max(self.history[-1].at, self.states[-1].at)


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot of an agent's state."""

    checkpoint_id: str
    agent_id: str
    name: str
    state: dict[str, Any]
    version: int
    created_at: dt.datetime
    run_id: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Incident:
    """An open incident about one step of a run."""

    incident_id: str
    run_id: str
    agent_id: str
    seq: int | None
    kind: str
    error: dict[str, Any]
    created_at: dt.datetime
    status: str = "open"


@dataclass(frozen=True)
class Worker:
    """A worker row; a dead worker's never says that it stopped."""

    worker_id: str
    hostname: str
    pid: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    stopped_at: dt.datetime | None = None


@dataclass(frozen=True)
class Event:
    """One event, in the order of the log."""

    type: str
    run_id: str | None
    agent_id: str | None
    data: dict[str, Any]
    at: dt.datetime


@dataclass
class Population:
    """Everything a seed writes and ``verify`` expects to find, with concrete times."""

    now: dt.datetime
    agents: list[Agent] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def run(self, run_id: str) -> Run:
        """The run with this id."""
        return next(r for r in self.runs if r.run_id == run_id)

    @property
    def in_flight(self) -> list[Run]:
        """The runs that must complete once the database is upgraded."""
        return [r for r in self.runs if r.finishes]


def seeded(name: str, x: int) -> dict[str, Any]:
    """A seeded step's output: marked, so that a replayed output is told from a new one."""
    return {"step": name, "x": x, "seeded": True}


def live(name: str, x: int) -> dict[str, Any]:
    """The output of the step function when it really runs after the upgrade."""
    return {"step": name, "x": x}


_TARGETS = {
    "initialize": "initialized",
    "activate": "active",
    "pause": "paused",
    "terminate": "terminated",
    "fail": "error",
}


class _Builder:
    """Builds a population in the order things happened, logging their events as it goes.
    Times are given in seconds from now (negative: ago)."""

    def __init__(self, now: dt.datetime) -> None:
        self.pop = Population(now)
        self.logging = True
        """Whether events are logged (the bulk logs none: it is there for its rows)."""

    def at(self, seconds: float) -> dt.datetime:
        return self.pop.now + dt.timedelta(seconds=seconds)

    def event(self, type_: str, run: str | None, agent: str | None, at: float, **data: Any) -> None:
        if self.logging:
            self.pop.events.append(Event(type_, run, agent, data, self.at(at)))

    def agent(
        self,
        agent_id: str,
        actions: list[str],
        at: float,
        states: Iterable[tuple[dict[str, Any], str, str | None]] = (),
        error: dict[str, Any] | None = None,
    ) -> None:
        """An agent created ``at``, taken through ``actions``, with more state versions
        (document, reason, the run that wrote it)."""
        history = [Transition(None, "created", "create", "created", self.at(at))]
        self.event("agent.created", None, agent_id, at, type="stepper", actor="ops")
        for i, action in enumerate(actions, 1):
            before, after = history[-1].to_state, _TARGETS[action]
            history.append(Transition(before, after, action, action, self.at(at + i)))
            data = {"action": action, "from": before, "to": after, "actor": "ops"}
            self.event("agent.lifecycle", None, agent_id, at + i, **data)
        versions = [StateVersion(1, {}, "created", None, self.at(at))]
        for version, (doc, reason, run_id) in enumerate(states, 2):
            versions.append(StateVersion(version, doc, reason, run_id, self.at(at + 100 * version)))
            if run_id is None:
                self.event("agent.state", None, agent_id, at + 100 * version, version=version)
        config = {"model": "small", "temperature": 0.2}
        self.pop.agents.append(
            Agent(agent_id, "stepper", tuple(history), tuple(versions), config, error)
        )

    def checkpoint(self, name: str, agent_id: str, version: int, at: float, **run: Any) -> None:
        """A checkpoint of an agent's state ``version``; with ``run_id`` and ``seq`` if a run
        took it."""
        agent = next(a for a in self.pop.agents if a.agent_id == agent_id)
        state = next(s.state for s in agent.states if s.version == version)
        checkpoint_id = f"ckpt-{name}"
        self.pop.checkpoints.append(
            Checkpoint(checkpoint_id, agent_id, name, state, version, self.at(at), **run)
        )
        data = {"checkpoint_id": checkpoint_id, "name": name, "version": version}
        data.update(seq=run.get("seq"), actor="run" if run else "ops")
        self.event("checkpoint.created", run.get("run_id"), agent_id, at, **data)

    def run(self, run: Run) -> None:
        """A run and the events of its life so far."""
        at = (run.created_at - self.pop.now).total_seconds()
        self.event("run.submitted", run.run_id, run.agent_id, at, task_id=None, priority=0)
        if run.attempts:
            worker = run.owner or "w-old"
            self.event("run.claimed", run.run_id, run.agent_id, at + 1, worker=worker, fence=1)
        for s in run.journal:
            if s.status == "completed" and s.kind == "step" and run.forked_from is None:
                self.event("step.completed", run.run_id, None, at + 1, seq=s.seq, name=s.name)
        self.pop.runs.append(run)

    def finished_run(
        self, run_id: str, agent: str, x: int, at: float, version: int, checkpoint: bool = False
    ) -> None:
        """A run that completed: step a, (a checkpoint,) a zero sleep, then step b, committed
        with the state the run wrote as ``version + 1`` (none when ``version`` is 0)."""
        done, end = self.at(at + 1), self.at(at + 2)
        journal = [Step(1, "a", output=seeded("a", x), finished_at=done)]
        task: dict[str, Any] = {"x": x, "sleep": 0}
        if checkpoint:
            task["checkpoint"] = "after-a"
            journal.append(
                Step(2, "after-a", "checkpoint", output="ckpt-after-a", finished_at=done)
            )
            self.checkpoint("after-a", agent, version, at + 1, run_id=run_id, seq=2)
        sleep = {"until": iso(end)}
        journal.append(Step(len(journal) + 1, "sleep", "sleep", output=sleep, finished_at=end))
        wrote = version + 1 if version else None
        b = Step(len(journal) + 1, "b", output=seeded("b", x), state_version=wrote, finished_at=end)
        journal.append(b)
        self.run(
            Run(
                run_id,
                agent,
                task,
                "completed",
                self.at(at),
                done,
                end,
                tuple(journal),
                result={"a": seeded("a", x), "b": seeded("b", x)},
                attempts=1,
                fence=1,
                state_version=version or 1,
            )
        )
        self.event("run.completed", run_id, None, at + 2, steps=len(journal))

    def sleeping_run(
        self, run_id: str, agent: str, x: int, at: float, due: float, version: int, **run: Any
    ) -> None:
        """A run parked on ``ctx.sleep`` after step a, until ``due``, having written its state
        as ``version + 1`` (none when ``version`` is 0)."""
        timer = Timer("sleep", 2, self.at(due))
        wrote = version + 1 if version else None
        journal = (
            Step(1, "a", output=seeded("a", x), finished_at=self.at(at + 1)),
            Step(2, "sleep", "sleep", "waiting", {"until": iso(timer.due)}, state_version=wrote),
        )
        task = {"x": x, "sleep": 3600}
        self.run(
            Run(
                run_id,
                agent,
                task,
                run.pop("status", "waiting"),
                self.at(at),
                self.at(at + 1),
                journal=journal,
                attempts=1,
                fence=1,
                timer=timer,
                state_version=version or 1,
                finishes=due < 0,
            )
        )
        self.event("run.waiting", run_id, None, at + 1, **timer.doc())

    def failed_step_run(
        self, run_id: str, agent: str, x: int, at: float, failure: dict[str, Any], **run: Any
    ) -> None:
        """A run whose step b failed with ``failure``, after step a and a zero sleep, with
        the state it wrote as version 2."""
        sleep = {"until": iso(self.at(at + 2))}
        journal = (
            Step(1, "a", output=seeded("a", x), finished_at=self.at(at + 1)),
            Step(2, "sleep", "sleep", output=sleep, finished_at=self.at(at + 2)),
            Step(3, "b", status="failed", error=failure, state_version=2),
        )
        task = {"x": x, "sleep": 0}
        started = self.at(at + 1)
        self.run(
            Run(
                run_id,
                agent,
                task,
                created_at=self.at(at),
                started_at=started,
                journal=journal,
                attempts=1,
                fence=1,
                state_version=1,
                finishes=True,
                **run,
            )
        )


def population(now: dt.datetime, bulk: int = 0) -> Population:
    """The agents, runs and checkpoints of a database about to be upgraded.

    ``bulk`` adds that many runs of one more agent (one in ten parked on a sleep, the rest
    finished), so that an upgrade has rows to move.
    """
    b = _Builder(now.replace(microsecond=0))
    week = -7 * DAY
    # alpha: two finished runs (the first took a checkpoint), its state set by hand and
    # checkpointed, then two runs parked on a sleep (one due, one due tomorrow), a pending
    # run, and a fork of the first run.
    states = [
        ({"seen": [1]}, "run", "run-done-1"),
        ({"seen": [1, 2]}, "run", "run-done-2"),
        ({"seen": [1, 2], "note": "set by hand"}, "set", None),
        ({"seen": [1, 2, 4]}, "run", "run-later"),
        ({"seen": [1, 2, 4, 3]}, "run", "run-due"),
    ]
    b.agent("alpha", ["initialize", "activate"], week, states)
    b.finished_run("run-done-1", "alpha", 1, week + 1000, 1, checkpoint=True)
    b.finished_run("run-done-2", "alpha", 2, week + 2000, 2)
    b.checkpoint("by-hand", "alpha", 4, -DAY)
    b.sleeping_run("run-later", "alpha", 4, -900, DAY, 4)
    b.sleeping_run("run-due", "alpha", 3, -600, -30, 5)
    b.run(Run("run-pending", "alpha", {"x": 5, "sleep": 0}, "pending", b.at(-60), finishes=True))
    copied = Step(1, "a", output=seeded("a", 1), finished_at=b.at(week + 1001))
    fork = Run("run-fork", "alpha", {"x": 1, "sleep": 0}, "pending", b.at(-50), journal=(copied,))
    b.run(replace(fork, forked_from="run-done-1", forked_at_step=1, state_version=1, finishes=True))
    # beta: a run whose worker died in the middle of it, and one waiting to retry a step.
    b.agent("beta", ["initialize", "activate"], week, [({"seen": [8]}, "run", "run-retry")])
    b.pop.workers.append(Worker(DEAD_WORKER, "host-1", 4242, b.at(-3600), b.at(-90)))
    orphan = Run("run-orphan", "beta", {"x": 7, "sleep": 0}, "running", b.at(-300), b.at(-299))
    journal = (Step(1, "a", output=seeded("a", 7), finished_at=b.at(-298)),)
    held = {"owner": DEAD_WORKER, "lease_until": b.at(-60), "attempts": 1, "fence": 1}
    b.run(replace(orphan, **held, journal=journal, state_version=2, finishes=True))
    flaky = {
        "type": "ConnectionError",
        "message": "connection reset by peer",
        "step": "b",
        "attempt": 1,
        "strategy": "retry_with_backoff",
        "next_timeout": None,
        "delay": 5.0,
    }
    retry = Timer("retry", 3, b.at(-20))
    b.failed_step_run("run-retry", "beta", 8, -400, flaky, status="waiting", timer=retry)
    failed = {"seq": 3, "name": "b", "attempt": 1, "error_type": "ConnectionError"}
    b.event("step.failed", "run-retry", None, -398, **failed, strategy="retry_with_backoff")
    b.event("step.retry_scheduled", "run-retry", None, -398, seq=3, name="b", delay=5.0)
    # gamma: a step that no strategy fixes, now an incident for a person.
    b.agent("gamma", ["initialize", "activate"], week, [({"seen": [9]}, "run", "run-attention")])
    refusal = {
        "type": "ValueError",
        "message": "the model refused",
        "step": "b",
        "attempt": 1,
        "strategy": "manual_intervention",
    }
    attention = {**refusal, "reason": "needs a person"}
    b.failed_step_run("run-attention", "gamma", 9, -500, refusal, status="needs_attention")
    b.pop.runs[-1] = replace(b.pop.runs[-1], error=attention)
    b.pop.incidents.append(
        Incident("inc-attention", "run-attention", "gamma", 3, "step_failed", attention, b.at(-498))
    )
    b.event("incident.opened", "run-attention", None, -498, kind="step_failed", seq=3)
    b.event("run.needs_attention", "run-attention", None, -498, kind="step_failed")
    # delta: paused while its run was parked on a sleep, which has come due since.
    paused = [({"seen": [10]}, "run", "run-paused")]
    b.agent("delta", ["initialize", "activate", "pause"], week, paused)
    b.sleeping_run("run-paused", "delta", 10, -200, -10, 1, status="paused")
    b.event("run.paused", "run-paused", "delta", -150, reason="agent delta pause")
    # The other lifecycle states; terminating an agent cancelled its pending run.
    b.agent("fresh", [], week + 10)
    b.agent("ready", ["initialize"], week + 20, [({"prepared": True}, "initialize", None)])
    b.agent("retired", ["initialize", "activate", "terminate"], week + 30)
    cancelled = {"type": "Cancelled", "message": "agent retired terminate"}
    task = {"x": 11, "sleep": 0}
    gone = Run("run-cancelled", "retired", task, "cancelled", b.at(week + 31), error=cancelled)
    b.run(replace(gone, finished_at=b.at(week + 33)))
    b.event("run.cancelled", "run-cancelled", "retired", week + 33, reason=cancelled["message"])
    hook = {"type": "RuntimeError", "message": "on_activate failed: no API key"}
    b.agent("broken", ["initialize", "fail"], week + 40, error=hook)
    if bulk:
        b.agent(BULK_AGENT, ["initialize", "activate"], week + 50)
        b.logging = False
        for i in range(bulk):
            run_id, at = f"bulk-{i:06d}", week + 3000 + i
            if i % 10:
                b.finished_run(run_id, BULK_AGENT, i, at, 0)
            else:
                b.sleeping_run(run_id, BULK_AGENT, i, at, 2 * DAY + i, 0)
    return b.pop


# -- after the upgrade: everything is there -----------------------------------------------------


def _fields(record: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """These fields of a record: the same names on seeded records, on the App's records (whose
    enums compare equal to the seeded strings) and on rows of the head schema."""
    return tuple(getattr(record, name) for name in names)


def _by(records: Iterable[Any], key: str, names: tuple[str, ...]) -> dict[Any, tuple[Any, ...]]:
    return {getattr(r, key): _fields(r, names) for r in records}


def _in_order(records: Iterable[Any], names: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [_fields(r, names) for r in records]


def _same(what: str, found: Any, expected: Any) -> None:
    """Assert equality with a message naming what differs (pytest rewrites no assert in a
    helper module)."""
    if found == expected:
        return
    if isinstance(found, dict) and isinstance(expected, dict):
        lines = [f"{what}: lost {k!r}: {expected[k]!r}" for k in expected if k not in found]
        lines += [f"{what}: unexpected {k!r}: {found[k]!r}" for k in found if k not in expected]
        lines += [
            f"{what}: {k!r} is {found[k]!r}, was {expected[k]!r}"
            for k in expected
            if k in found and found[k] != expected[k]
        ]
    else:
        pairs = enumerate(zip(found, expected, strict=False))
        lines = [f"{what}: {len(found)} found, {len(expected)} seeded"]
        lines += [f"{what}[{i}] is {f!r}, was {e!r}" for i, (f, e) in pairs if f != e]
    raise AssertionError("\n".join(lines[:8]))


AGENT = ("type", "config", "lifecycle", "state", "version", "error", "created_at")
TRANSITION = ("from_state", "to_state", "action", "reason", "actor", "at")
STATE = ("version", "state", "reason", "run_id", "at")
RUN = (
    *("agent_id", "status", "input", "result", "error", "attempts", "forked_from"),
    *("forked_at_step", "steps", "owner", "wake_at", "created_at", "started_at", "finished_at"),
)
STEP = ("seq", "name", "kind", "status", "output", "error", "attempts", "finished_at")
CHECKPOINT = ("agent_id", "name", "state", "version", "run_id", "seq", "created_at")
INCIDENT = ("run_id", "agent_id", "seq", "kind", "error", "status", "created_at")
EVENT = ("type", "run_id", "agent_id", "data", "at")
# What the App does not show, read from the head schema.
RUN_ROW = ("fence", "lease_until", "state_version", "max_concurrent", "priority")
STEP_ROW = ("name", "kind", "status", "output", "error", "attempts", "state_version")
WORKER_ROW = ("hostname", "pid", "started_at", "heartbeat_at", "stopped_at")


def verify(app: tether.App, pop: Population) -> None:
    """Everything in ``pop`` is in the database; raises ``AssertionError`` naming what was
    lost or changed."""
    _same("agents", _by(app.list_agents(), "agent_id", AGENT), _by(pop.agents, "agent_id", AGENT))
    for agent in pop.agents:
        history = _in_order(app.agent_history(agent.agent_id), TRANSITION)
        _same(f"history of {agent.agent_id}", history, _in_order(agent.history, TRANSITION))
        states = _in_order(app.state_versions(agent.agent_id), STATE)
        _same(f"state versions of {agent.agent_id}", states, _in_order(agent.states, STATE))
    _same("runs", _by(app.list_runs(limit=None), "run_id", RUN), _by(pop.runs, "run_id", RUN))
    for run in pop.runs:
        if run.agent_id != BULK_AGENT:  # the bulk's journals are compared below, in one query
            steps = _in_order(app.run_steps(run.run_id), STEP)
            _same(f"journal of {run.run_id}", steps, _in_order(run.journal, STEP))
    _same(
        "checkpoints",
        _by(app.list_checkpoints(), "checkpoint_id", CHECKPOINT),
        _by(pop.checkpoints, "checkpoint_id", CHECKPOINT),
    )
    _same(
        "incidents",
        _by(app.incidents(), "incident_id", INCIDENT),
        _by(pop.incidents, "incident_id", INCIDENT),
    )
    _same("events", _in_order(app.events(), EVENT), _in_order(pop.events, EVENT))
    runs, steps, workers = schema.runs, schema.steps, schema.workers
    with app.store.db.read() as conn:
        found_runs = _by(conn.execute(select(runs)), "run_id", RUN_ROW)
        found_steps = {(s.run_id, s.seq): _fields(s, STEP_ROW) for s in conn.execute(select(steps))}
        found_workers = _by(conn.execute(select(workers)), "worker_id", WORKER_ROW)
    _same("runs' fences, leases, start states", found_runs, _by(pop.runs, "run_id", RUN_ROW))
    seeded_steps = {(r.run_id, s.seq): _fields(s, STEP_ROW) for r in pop.runs for s in r.journal}
    _same("journal entries", found_steps, seeded_steps)
    _same("workers", found_workers, _by(pop.workers, "worker_id", WORKER_ROW))


# -- after the upgrade: the runs in flight finish ---------------------------------------------

EXECUTED: list[tuple[str, str]] = []
"""(run, step) each time the step function really ran: the outside world's record."""


def effect(name: str, x: int) -> dict[str, Any]:
    """The step function of the seeded runs' agent type: records that it ran."""
    EXECUTED.append((tether.current_step().run_id, name))
    return live(name, x)


class Stepper(tether.Agent):
    """The code behind every seeded run: its steps are the journals' steps, in their order."""

    type = "stepper"

    def handle(self, ctx: tether.RunContext, task: dict[str, Any]) -> dict[str, Any]:
        a = ctx.step(effect, "a", task["x"], name="a")
        if "checkpoint" in task:
            ctx.checkpoint(task["checkpoint"])
        ctx.state["seen"] = [*ctx.state.get("seen", []), task["x"]]
        ctx.sleep(task["sleep"])
        b = ctx.step(effect, "b", task["x"], name="b")
        return {"a": a, "b": b}


def head_app(url: str) -> tether.App:
    """An App at head that knows the seeded runs' agent type."""
    app = tether.App(url)
    app.register(Stepper)
    return app


def expected_result(run: Run) -> dict[str, Any]:
    """What a run in flight returns: replayed outputs where its journal had them."""
    x = run.input["x"]
    return {name: run.replayed.get(name, live(name, x)) for name in ("a", "b")}


def expected_executions(pop: Population) -> list[tuple[str, str]]:
    """The step bodies that run to finish the runs in flight: those not journaled."""
    return sorted(
        (run.run_id, name)
        for run in pop.in_flight
        for name in ("a", "b")
        if name not in run.replayed
    )


def finish(app: tether.App, pop: Population, timeout: float = 30.0) -> None:
    """Do what a person and a worker do after the upgrade until the runs in flight end:
    retry their incidents, resume their paused agents, run a worker."""
    in_flight = {r.run_id for r in pop.in_flight}
    for incident in pop.incidents:
        if incident.run_id in in_flight:
            app.resolve_incident(incident.incident_id, "retry", comment="after the upgrade")
    for agent in pop.agents:
        if agent.lifecycle == "paused" and any(r.agent_id == agent.agent_id for r in pop.in_flight):
            app.resume(agent.agent_id, reason="after the upgrade")
    ended = ("completed", "failed", "needs_attention")
    work_until(app, lambda: all(app.get_run(r).status in ended for r in in_flight), timeout=timeout)


# -- the database itself -----------------------------------------------------------------------


def row_counts(url: str) -> dict[str, int]:
    """Rows in every table of the database, whatever its revision."""
    db = Database(parse_url(url))
    try:
        with db.read() as conn:
            tables = inspect(conn).get_table_names()
            return {
                t: conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one() for t in tables
            }
    finally:
        db.dispose()


def shape(url: str) -> dict[str, Any]:
    """The tables of the database with their columns, indexes and foreign keys."""
    db = Database(parse_url(url))
    try:
        with db.read() as conn:
            found = inspect(conn)
            return {
                table: (
                    [(c["name"], c["nullable"]) for c in found.get_columns(table)],
                    sorted(
                        (i["name"] or "", str(i["column_names"])) for i in found.get_indexes(table)
                    ),
                    sorted(
                        (str(f["constrained_columns"]), f["referred_table"], str(f["options"]))
                        for f in found.get_foreign_keys(table)
                    ),
                )
                for table in sorted(found.get_table_names())
            }
    finally:
        db.dispose()


def revision_of(url: str) -> str | None:
    """The schema revision the database is at."""
    db = Database(parse_url(url))
    try:
        with db.read() as conn:
            return migrate.current(conn)
    finally:
        db.dispose()


# -- the traced CLI ----------------------------------------------------------------------------


@contextmanager
def traced(path: Path, stop_at: int | None = None) -> Iterator[None]:
    """Append every SQL statement and commit of any engine to ``path`` before it is sent;
    with ``stop_at``, stop for good (until killed) after writing that line."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    written = 0

    def write(line: str) -> None:
        nonlocal written
        trace.write(line + "\n")
        written += 1
        if written == stop_at:
            time.sleep(3600)

    def statement(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        write(f"SQL {' '.join(sql.split())[:100]}")

    def commit(conn: Any) -> None:
        write("COMMIT")

    with path.open("a", buffering=1) as trace:
        event.listen(Engine, "before_cursor_execute", statement)
        event.listen(Engine, "commit", commit)
        try:
            yield
        finally:
            event.remove(Engine, "before_cursor_execute", statement)
            event.remove(Engine, "commit", commit)


if __name__ == "__main__":
    from tether.cli import main

    stop = os.environ.get("TETHER_TEST_STOP_AT")
    with traced(Path(sys.argv[1]), int(stop) if stop else None):
        sys.argv = ["tether", *sys.argv[2:]]
        main()
