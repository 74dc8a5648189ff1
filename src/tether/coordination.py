"""Delegation from inside a run: start child runs, wait for them, or for the first of several
things (children, messages, a timeout).

A child run is created in the same transaction as the journal entry that starts it: exactly
one child per ``spawn``, whatever crashes. Waiting parks the parent on the general wait,
holding no thread; a child's end wakes it, and replay journals how the children ended. A
failed child raises ``ChildRunFailed`` in its parent, a cancelled one ``ChildCancelled``. When
a run ends, the children it started are cancelled with it unless spawned ``detached``.

A wait frees the parent's agent (a waiting run does not count against its agent's
concurrency), so a child that calls back into an agent up its chain cannot deadlock on it; a
chain deeper than ``MAX_DEPTH`` levels is refused, naming it. A run can wait only for its own
children, so waits cannot form a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tether import codec
from tether.errors import ChildCancelled, ChildRunFailed, ConfigurationError, WaitTimeout
from tether.limits import Budget
from tether.messaging import Message, topic_of
from tether.vocabulary import StepKind

if TYPE_CHECKING:
    from tether.engine.executor import Execution


@dataclass(frozen=True)
class ChildHandle:
    """A child run started by ``ctx.spawn``: wait for it with ``ctx.wait`` or ``ctx.wait_any``."""

    run_id: str
    agent_id: str


@dataclass(frozen=True)
class Receive:
    """An alternative of ``ctx.wait_any``: a message for this agent on ``topic``."""

    topic: str | None = None


@dataclass(frozen=True)
class Ready:
    """What ``ctx.wait_any`` returns: which alternative was first, and its value (a child's
    result, or the ``Message``). ``source`` is None when the timeout came first."""

    source: ChildHandle | Receive | None
    value: Any = None


def spawn(
    ex: Execution,
    agent_id: str,
    task: Any,
    *,
    task_id: str | None = None,
    priority: int = 0,
    detached: bool = False,
    budget: Budget | None = None,
) -> ChildHandle:
    """``ctx.spawn``: start a child run of ``task`` on ``agent_id``; returns its handle."""
    from tether.journal import Child
    from tether.store.common import new_id

    codec.check_text("agent id", agent_id, 255)
    if task_id is not None:
        codec.check_text("task id", task_id, 255)
    doc = codec.check(task, "task")
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigurationError(f"spawn budget must be a tether.Budget, got {budget!r}")

    def build(seq: int) -> dict[str, Any]:
        run_id = new_id("run")
        guard = ex.guard
        limits = None
        fields: dict[str, Any] = {}
        if guard is not None:
            limits = guard.for_child(budget)
            fields["ledger"] = guard.before_child(seq)
        elif budget is not None:
            limits = {"budget": budget.to_doc()}
        child = Child(seq, run_id, agent_id, doc, task_id, priority, detached, limits or None)
        return {"output": run_id, "children": [child], **fields}

    return ChildHandle(str(ex.journal_write(agent_id, StepKind.SPAWN, build)), agent_id)


def wait(ex: Execution, handles: Sequence[ChildHandle], timeout: float | None) -> list[Any]:
    """``ctx.wait``: the children's results, in order; raises for a failed or cancelled one."""
    handles = _handles(handles)
    if not handles:
        return []
    alternatives = tuple(("child", h.run_id) for h in handles)
    outcome = ex.settle("wait", StepKind.WAIT, alternatives, timeout, every=True)
    if outcome.get("timeout"):
        raise WaitTimeout(
            f"run {ex.run_id}: its children {', '.join(h.run_id for h in handles)} did not all "
            f"end within {timeout:g}s; they go on (wait again, or cancel them)"
        )
    return [_result(child) for child in outcome["children"]]


def wait_any(
    ex: Execution, alternatives: Sequence[ChildHandle | Receive], timeout: float | None
) -> Ready:
    """``ctx.wait_any``: the first of the alternatives, the others withdrawn."""
    if not alternatives and timeout is None:
        raise ConfigurationError("wait_any needs something to wait for, or a timeout")
    keys: list[tuple[str, str]] = []
    for alternative in alternatives:
        if isinstance(alternative, ChildHandle):
            keys.append(("child", alternative.run_id))
        elif isinstance(alternative, Receive):
            keys.append(("message", topic_of(alternative.topic)))
        else:
            raise ConfigurationError(
                f"wait_any takes child handles (ctx.spawn) and tether.Receive(topic), not "
                f"{type(alternative).__name__}"
            )
    outcome = ex.settle("wait_any", StepKind.WAIT, tuple(keys), timeout)
    if outcome.get("timeout"):
        return Ready(None)
    source = alternatives[outcome["index"]]
    if "message" in outcome:
        return Ready(source, Message.from_dict(outcome["message"]))
    return Ready(source, _result(outcome["child"]))


def _handles(handles: Any) -> list[ChildHandle]:
    found = [handles] if isinstance(handles, ChildHandle) else list(handles)
    for handle in found:
        if not isinstance(handle, ChildHandle):
            raise ConfigurationError(
                f"wait takes the handles ctx.spawn returned, not {type(handle).__name__}"
            )
    return found


def _result(child: dict[str, Any]) -> Any:
    status = child["status"]
    if status == "completed":
        return child["result"]
    error = child.get("error") or {}
    if status == "cancelled":
        raise ChildCancelled(child["run_id"], child["agent_id"], str(error.get("message", "")))
    raise ChildRunFailed(child["run_id"], child["agent_id"], error)
