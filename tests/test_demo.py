"""``tether demo``: the scenario runs offline and leaves its record in the database, with a
budget hit and raised, a tool a policy denies, a human approval decided by a simulated
reviewer or, with ``--interactive``, by the person at the terminal; ``tether demo --crash``
kills a real worker process and proves no finished step ran twice."""

from __future__ import annotations

import getpass
import os
import re
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import tether
from tether.cli import cli
from tether.demo.agents import (
    FAST_RETRY,
    FETCH_TIMEOUT,
    FLAKY_FAILURES,
    FOLLOW_UPS,
    RESEARCH_BUDGET,
    SEARCH_COST,
    SHELL,
    WEB_SEARCH,
)
from tether.demo.approval import COMMENT, EDITED_TITLE, GATED_STEP, REVIEWER
from tether.demo.crash import STEPS
from tether.demo.scenario import OPERATOR


@dataclass(frozen=True)
class Demo:
    """One ``tether demo`` in a fresh folder: its output and where its database is."""

    folder: Path
    result: Result


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """``tether demo`` run once, with no --db and no TETHER_DATABASE_URL, in a fresh folder."""
    folder = tmp_path_factory.mktemp("demo")
    runner = CliRunner(env={"TETHER_DATABASE_URL": None, "TETHER_APP": None, "COLUMNS": "160"})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = runner.invoke(cli, ["demo"], catch_exceptions=False)
    return Demo(folder, result)


def test_demo_runs_on_the_default_database_and_leaves_its_runs_and_decisions(demo: Demo) -> None:
    result, tmp_path = demo.result, demo.folder
    assert result.exit_code == 0, result.output
    assert "refused: cannot activate" in result.stdout
    assert "equal to the checkpoint" in result.stdout
    assert "reused from the journal (0x)" in result.stdout
    assert "untouched: same status, journal and result" in result.stdout
    assert (tmp_path / "tether.db").exists()
    with tether.App(f"sqlite:///{tmp_path / 'tether.db'}", require_types=False) as app:
        runs = app.list_runs()
        assert len(runs) == 5  # the coordinator's, its three children's, a fork of one of them
        assert {r.status for r in runs} == {tether.RunStatus.COMPLETED}
        [fork] = [r for r in runs if r.forked_from is not None]
        assert fork.forked_at_step == 1
        executed = {e.data["seq"] for e in app.timeline(fork.run_id) if e.type == "step.completed"}
        assert executed == {2, 3, 4}  # the writer's sections; its brief (step 1) was reused
        [ckpt] = app.list_checkpoints()
        [restored] = app.events(types=["checkpoint.restored"])
        assert restored.data["checkpoint_id"] == ckpt.checkpoint_id
        assert app.get_state(ckpt.agent_id, restored.data["new_version"]).state == ckpt.state
        [incident] = app.incidents()
        assert (incident.status.value, incident.resolution) == ("resolved", "skip")
        assert incident.error["type"] == "ValueError"
        researcher = app.get_run(incident.run_id)
        assert researcher.result["facts"]  # the operator's output went on as the step's
        events = app.timeline(incident.run_id)
        failures = [e.data["error_type"] for e in events if e.type == "step.failed"]
        # Two backoffs, a longer deadline, then an error only a person can fix.
        assert failures == ["ConnectionError", "ConnectionError", "StepTimeout", "ValueError"]
        retries = [e.data for e in events if e.type == "step.retry_scheduled"]
        strategies = [r["strategy"] for r in retries]
        assert strategies == ["retry_with_backoff"] * 2 + ["retry_with_increased_timeout"]
        # On the demo's own policies, not the defaults: a short backoff, then a doubled deadline.
        assert all(0 < r["delay"] <= FAST_RETRY.max_delay for r in retries[:2])
        assert retries[2]["timeout"] == 2 * FETCH_TIMEOUT
        waits = [e.data["kind"] for e in events if e.type == "run.waiting"]
        # Both backoffs, the spent budget and one sleep: durable waits.
        assert waits == ["retry", "retry", "budget", "timer"]
        assert {"incident.opened", "incident.resolved"} <= {e.type for e in events}
        assert {a.lifecycle.value for a in app.list_agents()} == {"terminated"}
    assert f"timeline of {incident.run_id}" in result.stdout


def test_demo_fans_out_to_child_runs_gathers_their_results_and_messages_go_once(
    demo: Demo,
) -> None:
    result, tmp_path = demo.result, demo.folder
    assert result.exit_code == 0, result.output
    with tether.App(f"sqlite:///{tmp_path / 'tether.db'}", require_types=False) as app:
        runs = app.list_runs()
        [root] = [r for r in runs if r.parent_run_id is None and r.forked_from is None]
        assert root.agent_id.startswith("coordinator-")
        children = app.store.list_runs(parent_run_id=root.run_id, limit=None)
        by_role = {c.agent_id.split("-")[0]: c for c in children}
        assert sorted(by_role) == ["researcher", "reviewer", "writer"]  # one child per spawn
        assert {c.status for c in children} == {tether.RunStatus.COMPLETED}
        assert all(r.parent_run_id in (None, root.run_id) for r in runs)  # no grandchildren
        # Fan-in: the coordinator's result holds each child's result as the child stored it.
        assert root.result["research"] == by_role["researcher"].result
        assert root.result["draft"] == by_role["writer"].result
        assert root.result["review"] == by_role["reviewer"].result
        assert root.result["research"]["facts"] and root.result["review"]["verdict"] == "approved"
        journal = app.run_steps(root.run_id)
        spawned = [s.output for s in journal if s.kind == "spawn"]
        assert sorted(spawned) == sorted(c.run_id for c in children)
        [gathered] = [
            s for s in journal if s.kind == "wait" and len(s.output.get("children", [])) == 3
        ]
        assert [c["run_id"] for c in gathered.output["children"]] == spawned

        # Three messages: researcher -> coordinator, coordinator -> writer, and a publish to
        # the reviewer (the topic's one subscriber); each consumed exactly once, by the run of
        # its recipient, at the journal entry that received it.
        mail = app.messages(limit=None)
        assert len(mail) == 3
        runs_of = {r.agent_id: r.run_id for r in [root, *children]}
        for m in mail:
            assert m.consumed_by == runs_of[m.recipient], m
            [entry] = [s for s in app.run_steps(m.consumed_by) if s.seq == m.consumed_seq]
            assert entry.kind in ("receive", "wait")
            assert entry.output["message"]["message_id"] == m.message_id
        senders = {(str(m.sender_agent).split("-")[0], m.recipient.split("-")[0]) for m in mail}
        assert senders == {
            ("researcher", "coordinator"),
            ("coordinator", "writer"),
            ("coordinator", "reviewer"),
        }
        # Three hits of the first search, then the top hit of each narrower one.
        assert root.result["progress"]["sources"] == 3 + len(FOLLOW_UPS)
        assert root.result["draft_readers"] == 1
        assert app.messages(pending=True) == []
        # The fork of the writer's run reused the brief it had received: nothing taken again.
        [fork] = [r for r in runs if r.forked_from is not None]
        assert fork.forked_from == by_role["writer"].run_id
        assert fork.run_id not in {m.consumed_by for m in mail}
        assert app.run_steps(fork.run_id)[0] == replace(
            app.run_steps(fork.forked_from)[0], run_id=fork.run_id
        )
    out = result.stdout
    for child in children:  # the tree, drawn in the live view and the summary
        assert re.search(rf"[├└]─ {child.agent_id}\W+{child.run_id}\W+completed", out)
    assert "each consumed exactly once" in out
    assert "fan-in: the coordinator's result holds its 3 children's results" in out


def test_demo_gates_publishing_on_an_approval_the_simulated_reviewer_decides_with_an_edit(
    demo: Demo,
) -> None:
    result, tmp_path = demo.result, demo.folder
    assert result.exit_code == 0, result.output
    with tether.App(f"sqlite:///{tmp_path / 'tether.db'}", require_types=False) as app:
        [approval] = app.approvals(limit=None)
        root = app.get_run(approval.run_id)
        assert root.agent_id.startswith("coordinator-") and root.parent_run_id is None
        assert (approval.title, approval.status, approval.source) == (
            "Publish the report?",
            "approved",
            "human",
        )
        assert approval.decided_by == REVIEWER and approval.comment == COMMENT
        assert approval.edited and approval.consumed_at is not None
        # Only the title changed: the reviewer's edit, as the run received it.
        assert approval.decided_data == {**approval.data, "title": EDITED_TITLE}
        assert approval.data["title"] != EDITED_TITLE
        assert root.result["report"] == approval.decided_data
        assert root.result["published"]["title"] == EDITED_TITLE
        # The decision names the digest of the data it was about.
        [decided] = app.events(types=["approval.decided"])
        assert decided.data["digest"] == approval.digest and decided.data["edited"] is True
        # The gated step: one journal entry, right after the approval's, executed once, after
        # the run took the decision.
        journal = app.run_steps(root.run_id)
        [asked] = [s for s in journal if s.kind == "approve"]
        [gated] = [s for s in journal if s.name == GATED_STEP]
        assert asked.seq == approval.seq and gated.seq == asked.seq + 1
        events = app.timeline(root.run_id)
        order = [
            e.type
            for e in events
            if e.type.startswith("approval.")
            or (e.type in ("step.completed", "step.failed") and e.data["seq"] == gated.seq)
        ]
        assert order == [
            "approval.requested",
            "approval.decided",
            "approval.consumed",
            "step.completed",
        ]
    out = " ".join(result.stdout.split())  # the same words, however rich wrapped the lines
    assert f"asks a person: 'Publish the report?' (approval {approval.approval_id}" in out
    assert (
        f"waits for a person: approval {approval.approval_id}, or until" in out
        and "parked in the database, holding no thread" in out
    )
    assert (
        f"{REVIEWER} approved {approval.approval_id} on digest {approval.digest[:12]}..., "
        f'with the data edited ("{COMMENT}")'
    ) in out
    assert f"takes the decision on {approval.approval_id} (journal entry {asked.seq}" in out
    assert f"the gated step {GATED_STEP} ran once, after it (journal entry {gated.seq})" in out
    assert "tether approvals list" in out


EXECUTED = ("step.completed", "step.failed")
"""Events written each time a step's body ran."""


def test_demo_pauses_the_researcher_at_its_budget_until_the_operator_raises_it(
    demo: Demo,
) -> None:
    result, tmp_path = demo.result, demo.folder
    assert result.exit_code == 0, result.output
    searches = 1 + len(FOLLOW_UPS)
    assert RESEARCH_BUDGET.max_cost is not None
    assert RESEARCH_BUDGET.max_cost < searches * SEARCH_COST  # the demo must hit it
    with tether.App(f"sqlite:///{tmp_path / 'tether.db'}", require_types=False) as app:
        [exceeded] = app.events(types=["budget.exceeded"])
        hit = exceeded.data
        research = app.get_run(hit["holder"])
        assert exceeded.run_id == research.run_id  # the run that hit the budget holds it
        assert research.agent_id.startswith("researcher-") and research.parent_run_id
        assert (hit["limit"], hit["action"]) == (f"max_cost={RESEARCH_BUDGET.max_cost:g}", "pause")
        assert hit["used"] == pytest.approx(RESEARCH_BUDGET.max_cost)
        assert hit["needed"] == SEARCH_COST  # the last narrower search did not start
        assert hit["step"] == "search-" + FOLLOW_UPS[-1].replace(" ", "-")
        # The operator raised the limit once, after the breach; the run had waited for it.
        [raised] = app.events(types=["budget.raised"])
        assert raised.run_id == research.run_id and raised.seq > exceeded.seq
        assert raised.data["actor"] == OPERATOR
        assert (raised.data["from"], raised.data["to"]) == (
            RESEARCH_BUDGET.max_cost,
            2 * RESEARCH_BUDGET.max_cost,
        )
        events = app.timeline(research.run_id)
        [paused] = [e for e in events if e.type == "run.waiting" and e.data["kind"] == "budget"]
        [woken] = [e for e in events if e.type == "run.woken" and e.data["kind"] == "budget"]
        assert exceeded.seq <= paused.seq < raised.seq <= woken.seq
        # The search that would have gone over ran once, only after the raise; the run went on
        # and completed.
        ran = [e.seq for e in events if e.type in EXECUTED and e.data["seq"] == hit["seq"]]
        assert len(ran) == 1 and ran[0] > raised.seq
        assert research.status == tether.RunStatus.COMPLETED
        # What it spent: the ledger's usage is the sum of the costs committed with its steps.
        costs = [s.cost for s in app.run_steps(research.run_id) if s.cost is not None]
        assert costs == [SEARCH_COST] * searches
        usage = app.usage(research.run_id)
        [limit] = usage.limits
        assert (limit.holder, limit.limit, limit.action) == (research.run_id, "max_cost", "pause")
        assert limit.max == raised.data["to"] and limit.reserved == 0
        assert limit.used == pytest.approx(sum(costs))
        assert usage.usage.cost == pytest.approx(sum(costs))
        # Each attempt called the search (the first one's failed ones too); the shell never ran.
        assert usage.usage.calls == {WEB_SEARCH: searches + FLAKY_FAILURES, SHELL: 0}
        assert usage.budget == RESEARCH_BUDGET.to_doc()  # given by the coordinator at spawn
        [warned] = app.events(types=["budget.warned"])
        assert warned.run_id == research.run_id and warned.seq < exceeded.seq
        assert app.usage(research.parent_run_id).total.cost == pytest.approx(sum(costs))
    out = " ".join(result.stdout.split())  # the same words, however rich wrapped the lines
    assert (
        f"budget hit: max_cost={RESEARCH_BUDGET.max_cost:g} of run {research.run_id} (used "
        f"{RESEARCH_BUDGET.max_cost:g}); step {hit['seq']} {hit['step']} needs "
        f"{SEARCH_COST:g} more: the step does not start; the run waits until a person raises "
        "the limit"
    ) in out
    assert "waits for a person to raise its budget: parked in the database" in out
    assert (
        f"{OPERATOR} raised max_cost of run {research.run_id}'s budget: "
        f"{RESEARCH_BUDGET.max_cost:g} -> {2 * RESEARCH_BUDGET.max_cost:g}"
    ) in out
    assert "woken: its budget was raised" in out
    assert f"the ledger's usage is the sum of its {searches} steps' costs" in out
    assert f"tether runs usage {research.run_id}" in out


def test_demo_policy_denies_the_researcher_the_shell_and_the_step_never_starts(
    demo: Demo,
) -> None:
    result, tmp_path = demo.result, demo.folder
    assert result.exit_code == 0, result.output
    with tether.App(f"sqlite:///{tmp_path / 'tether.db'}", require_types=False) as app:
        [denied] = app.events(types=["policy.denied"])  # once: the replays raised it again
        assert denied.run_id is not None
        assert (denied.data["subject"], denied.data["rule"]) == (SHELL, "denied_tools")
        [entry] = [s for s in app.run_steps(denied.run_id) if s.seq == denied.data["seq"]]
        assert (entry.status.value, entry.attempts, entry.tool) == ("failed", 0, SHELL)
        assert entry.error is not None and entry.error["type"] == "PolicyDenied"
        events = app.timeline(denied.run_id)
        assert not [e for e in events if e.type in EXECUTED and e.data["seq"] == entry.seq]
        research = app.get_run(denied.run_id)
        assert research.status == tether.RunStatus.COMPLETED  # it caught the denial, went on
    out = " ".join(result.stdout.split())
    assert (
        f"the policy denies step {entry.seq} {entry.name}: tool {SHELL} (denied_tools); it "
        "never starts"
    ) in out


def test_demo_interactive_without_a_terminal_refuses_and_exits_2(tmp_path: Path) -> None:
    runner = CliRunner(env={"TETHER_DATABASE_URL": None, "TETHER_APP": None})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = runner.invoke(cli, ["demo", "--interactive"], input="a\n")

    assert result.exit_code == 2, result.output
    assert "error: --interactive asks you to decide at the terminal, but stdin is not a" in (
        result.stderr
    )
    assert not (tmp_path / "tether.db").exists()  # refused before anything ran


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
"""Cursor moves and colours: what a terminal draws with, not what it shows."""


class Terminal:
    """A process on a pseudo-terminal, driven as a person would: wait for a prompt, answer."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env
        )
        os.close(slave)
        self.unread = b""
        self.seen = b""

    def _read(self, wait: float) -> bool:
        """Read what the process wrote; False once it closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the process ended and the terminal closed
            return False
        self.unread += chunk
        self.seen += chunk
        return bool(chunk)

    def expect(self, text: str, guard: float = 120.0) -> None:
        """Read until ``text`` shows (``guard`` only keeps a broken demo from hanging)."""
        deadline = time.monotonic() + guard
        while text.encode() not in ANSI.sub(b"", self.unread):
            if not self._read(0.2) or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never showed:\n{self.text()[-3000:]}")
        plain = ANSI.sub(b"", self.unread)
        self.unread = plain[plain.index(text.encode()) + len(text) :]

    def answer(self, line: str) -> None:
        """Type ``line`` and Enter."""
        os.write(self.master, line.encode() + b"\n")

    def finish(self, guard: float = 120.0) -> int:
        """Read to the end; the exit code."""
        deadline = time.monotonic() + guard
        while self._read(0.2) and time.monotonic() < deadline:
            pass
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def text(self) -> str:
        """Everything shown so far, without the terminal's control sequences."""
        return ANSI.sub(b"", self.seen).decode("utf-8", "replace")

    def close(self) -> None:
        """Kill the process if it is still there; release the terminal."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_demo_interactive_asks_the_person_at_the_terminal_and_the_run_gets_their_edit(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(COLUMNS="160", TERM="xterm-256color")
    title = "Durable agents, approved at a terminal"
    terminal = Terminal([sys.executable, "-m", "tether", "demo", "--interactive"], tmp_path, env)
    try:
        terminal.expect("Publish the report?")
        terminal.expect("approve, reject or edit the title? [a/r/e]:")
        terminal.answer("e")
        terminal.expect("new title")
        terminal.answer("ok")  # too short for the approval's schema: refused, asked again
        terminal.expect("not accepted: title: 'ok' is too short")
        terminal.expect("new title")
        terminal.answer(title)
        terminal.expect("approve, reject or edit the title? [a/r/e]:")
        terminal.answer("a")
        terminal.expect("comment")
        terminal.answer("a better title")
        code = terminal.finish()
    finally:
        terminal.close()

    shown = terminal.text()
    assert code == 0, shown[-3000:]
    with tether.App(f"sqlite:///{tmp_path / 'tether.db'}", require_types=False) as app:
        [approval] = app.approvals(limit=None)
        assert (approval.status, approval.source, approval.edited) == ("approved", "human", True)
        assert approval.decided_by == getpass.getuser()  # the person at the terminal
        assert approval.comment == "a better title"
        assert approval.digest in shown  # shown to the person before they decided
        root = app.get_run(approval.run_id)
        assert root.result["report"] == {**approval.data, "title": title}
        assert root.result["published"]["title"] == title
        assert [s.name for s in app.run_steps(root.run_id)].count(GATED_STEP) == 1
    assert "the gated step publish ran once, after it" in " ".join(shown.split())


IMPORTS_OF_TETHER_AND_HELP = """
import sys, tether
print(*sorted(sys.modules))
sys.argv = ["tether", "--help"]
from tether.cli import main
try:
    main()
finally:
    print(*sorted(sys.modules), file=sys.stderr)
"""


def test_import_tether_and_the_cli_help_leave_the_demo_unimported() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF_TETHER_AND_HELP],
        capture_output=True,
        text=True,
        timeout=60,
    )
    after_import, after_help = result.stdout.split("\n")[0].split(), result.stderr.split()
    assert "tether" in after_import and "tether.cli.demo" in after_help, result.stderr
    assert not [m for m in after_import + after_help if m.startswith("tether.demo")]


def executions(path: Path, run_id: str) -> list[tuple[int, int]]:
    """(step, pid) of every real execution of a step of ``run_id``, in order."""
    found = []
    for line in path.read_text().splitlines():
        run, seq, pid, _attempt = line.split()
        if run == run_id:
            found.append((int(seq), int(pid)))
    return found


def test_demo_crash_kills_a_real_worker_and_no_finished_step_runs_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["COLUMNS"] = "160"

    result = subprocess.run(
        [sys.executable, "-m", "tether", "demo", "--crash", "--db", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "kill -9 worker 1" in out
    assert f"every one of the {STEPS} steps completed in the journal" in out
    assert "no finished step ran twice" in out
    assert "worker 2 stopped gracefully on SIGTERM (exit 0)" in out
    for seq in range(1, STEPS + 1):  # the report has a row for every step
        assert re.search(rf"^\W*{seq:02d}\W+[12]x\W", out, re.MULTILINE), seq

    with tether.App(url, require_types=False) as app:
        [run] = app.list_runs()
        assert run.status == tether.RunStatus.COMPLETED
        journal = app.run_steps(run.run_id)
        assert [s.seq for s in journal] == list(range(1, STEPS + 1))
        assert all(s.status.value == "completed" for s in journal)
        types = [e.type for e in app.timeline(run.run_id)]
        assert types.count("run.claimed") == 2
        assert "run.lease_expired" in types
    ran = executions(tmp_path / "tether-demo-effects.log", run.run_id)
    first_pid, second_pid = dict.fromkeys(pid for _, pid in ran)  # two processes did the work
    by_first = [seq for seq, pid in ran if pid == first_pid]
    by_second = [seq for seq, pid in ran if pid == second_pid]
    assert by_first == list(range(1, len(by_first) + 1))
    # The second worker starts where the first one was killed: at the step in flight (run
    # again: at-least-once) or after it, never at a step the first one had finished.
    assert by_second[0] in (by_first[-1], by_first[-1] + 1)
    assert by_second == list(range(by_second[0], STEPS + 1))
    counts = Counter(seq for seq, _ in ran)
    twice = [seq for seq, n in counts.items() if n > 1]
    assert twice in ([], [by_first[-1]])
    for seq in twice:
        assert f"at-least-once: step {seq} was in flight at the kill" in out
