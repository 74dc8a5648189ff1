"""Budgets and policies around every step of a run: the engine's side of the ledger.

``Guard`` is built for an execution whose run has a budget or a policy at any level (its
type, its agent's config, the run, the app; and for a child, its parent's). The step driver
(``tether.engine.steps``) asks it to ``admit`` a step before the step takes its journal
position, and the executor asks it for the step's ``settlement``, which is committed in the
step's own transaction.

Admission, in order: a tool the policy denies never starts (``PolicyDenied``, journaled at
the step's position, so a replay raises it again); a tool the policy sends to a person is
approved first (an approval journaled just before the step, with the call's arguments as its
data); then the step's declared usage is reserved against the run's budget and every
ancestor's. A run that alone spends against its budget (no ancestor's budget, no child runs,
no rate) reserves in memory: it holds the fence, so nobody else can spend what it checked.
Otherwise the reservation is a fenced write of its own, which locks the ledger rows.

A step that cannot be reserved does not start, and the breached budget's ``on_breach``
applies: ``fail`` (the run fails with ``BudgetExceeded``), ``pause`` (the run waits for a
person to raise the limit) or ``ask`` (an approval, journaled just before the step, whose
edited data is the new limit; the decision raises it in its own transaction).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tether import approvals
from tether.journal import JournalEntry, LedgerChange, OpenLedger, Reserve
from tether.limits import (
    Breach,
    Budget,
    Limit,
    Policy,
    Throttle,
    check,
    combine,
    describe_limit,
    field_name,
    tightest,
)
from tether.types import StepStatus
from tether.vocabulary import EventType, StepKind

if TYPE_CHECKING:
    from tether.engine.executor import Execution
    from tether.engine.steps import StepCall

BUDGET_ASK = "budget:"
"""How the journal names the approval a budget's ``ask`` puts before the step it gates
(``budget:HOLDER:KEY``)."""

E = EventType


def _level(doc: Any, make: Any, where: str) -> Any:
    return None if doc is None else make(doc, where)


def guard_for(
    ex: Execution, agent_cls: Any, budget: Budget | None, policy: Policy | None
) -> Guard | None:
    """The guard of an execution, or None when no level sets a budget or a policy and no
    ancestor's budget applies (the common case, which costs nothing per step)."""
    claim = ex.claim
    limits = claim.limits
    config = claim.config if isinstance(claim.config, dict) else {}
    own = tightest(
        [
            _level(limits.get("budget"), Budget.from_doc, f"run {ex.run_id}'s budget"),
            _level(config.get("budget"), Budget.from_doc, f"agent {ex.agent_id}'s config budget"),
            getattr(agent_cls, "budget", None),
            budget,
        ]
    )
    rules = combine(
        [
            _level(limits.get("policy"), Policy.from_doc, f"run {ex.run_id}'s policy"),
            _level(config.get("policy"), Policy.from_doc, f"agent {ex.agent_id}'s config policy"),
            getattr(agent_cls, "policy", None),
            policy,
        ]
    )
    ancestors = tuple(limits.get("holders", ()))
    if own is None and rules is None and not ancestors and not claim.ledger:
        return None
    return Guard(ex, own, rules, ancestors)


class Guard:
    """The budgets and the policy of one execution (see the module docstring)."""

    def __init__(
        self,
        ex: Execution,
        budget: Budget | None,
        policy: Policy | None,
        ancestors: tuple[str, ...],
    ) -> None:
        self.ex = ex
        self.budget = budget
        self.policy = policy
        self.ancestors = ancestors
        run_id = ex.run_id
        view = list(ex.claim.ledger)
        opened = any(lim.holder == run_id for lim in view)
        own = budget.limits() if budget is not None else {}
        self.opening: OpenLedger | None = None
        if own and not opened and budget is not None:
            started = ex.clock().timestamp()
            self.opening = OpenLedger(own, budget.on_breach, budget.warn_at, started)
            mine = [
                Limit(
                    run_id,
                    key,
                    top,
                    0.0,
                    window=window,
                    recent=(started,) if key == "duration" else (),
                    action=budget.on_breach,
                    warn_at=budget.warn_at,
                )
                for key, (top, window) in sorted(own.items())
            ]
            view = mine + view
        self.view: list[Limit] = view
        self.holders: tuple[str, ...] = ((run_id,) if own or opened else ()) + ancestors
        self.spawned = any(e.kind == StepKind.SPAWN for e in ex.journal.values())
        self.timed = any(lim.key == "duration" or lim.key.startswith("rate:") for lim in view)
        """Some limit is measured in time: checks need the clock."""
        # The run's own steps after its rows' ``synced`` position are not in them yet (a
        # run alone with its budget adds them when it parks or ends; a crash may have come
        # first): they are read from its journal.
        mine_keys = {lim.key for lim in view if lim.holder == run_id}
        self.synced = max((lim.synced for lim in view if lim.holder == run_id), default=0)
        since = max(self.synced, ex.claim.forked_at_step or 0)
        self.pending: dict[str, float] = {
            key: amount
            for key, amount in journal_usage(ex.journal.values(), since).items()
            if key in mine_keys
        }
        for lim in view:
            if lim.holder == run_id and lim.key in self.pending:
                lim.used += self.pending[lim.key]
        self.held: dict[str, float] | None = None
        """What the step about to run reserved (None: nothing), and whether in the ledger."""
        self.held_in_ledger = False

    # -- what a step needs ----------------------------------------------------------------

    @staticmethod
    def amounts(call: StepCall) -> dict[str, float]:
        """A step's declared usage, by ledger key."""
        found = {"steps": 1.0}
        if call.cost is not None:
            found["cost"] = call.cost
        if call.tokens is not None:
            found["tokens"] = float(call.tokens)
        if call.tool is not None:
            found[f"calls:{call.tool}"] = 1.0
            found[f"rate:{call.tool}"] = 1.0
        return found

    @property
    def shared(self) -> bool:
        """Whether other runs spend against a budget of this run (its ancestors', or its own
        with its children): its reservations are then in the ledger."""
        return bool(self.ancestors or self.spawned) and bool(self.view)

    def _alone(self, call: StepCall) -> bool:
        """Whether this run alone spends against every budget of this step."""
        if self.ancestors or self.spawned:
            return False
        return call.tool is None or not any(lim.key == f"rate:{call.tool}" for lim in self.view)

    def _take_opening(self) -> OpenLedger | None:
        opening, self.opening = self.opening, None
        return opening

    # -- admission --------------------------------------------------------------------------

    def quick(self, call: StepCall) -> bool:
        """Admit the step without any I/O if that is all it takes (a replay, a later attempt,
        a tool the policy allows, a reservation in memory); False: call ``admit``."""
        ex = self.ex
        entry = ex.journal.get(ex.seq + 1)
        if entry is not None:  # a replay, or a later attempt (admitted before its first)
            return entry.kind == StepKind.STEP and not (entry.error or {}).get("denied")
        self.held = None
        rule = None
        if self.policy is not None and call.tool is not None:
            verdict, rule = self.policy.tool_rule(call.tool, priced=call.cost is not None)
            if verdict != "allow":
                return False
        if self.view:
            if not self._alone(call):
                return False
            amounts = self.amounts(call)
            now = ex.clock().timestamp() if self.timed else 0.0
            if check(self.view, amounts, now) is not None:
                return False
        if rule is not None:
            ex.later(E.POLICY_ALLOWED, {"seq": ex.seq + 1, "tool": call.tool, "rule": rule})
        if self.view:
            self.held, self.held_in_ledger = amounts, False  # recorded with the settlement
        return True

    def _reserved_event(
        self, seq: int, call: StepCall, amounts: dict[str, float]
    ) -> tuple[str, dict[str, Any]]:
        return (
            E.BUDGET_RESERVED.value,
            {
                "seq": seq,
                "name": call.name,
                "tool": call.tool,
                "amounts": {k: v for k, v in amounts.items() if not k.startswith("rate:")},
                "holders": list(self.holders),
            },
        )

    def admit(self, call: StepCall) -> None:
        """Before the step takes its journal position: its policy, then its budget. Returns
        when the step may run (or is replayed); raises ``PolicyDenied``; halts the run on a
        breach or a wait."""
        ex = self.ex
        entry = ex.journal.get(ex.seq + 1)
        if entry is not None and entry.kind == StepKind.STEP:
            if (entry.error or {}).get("denied"):
                ex.deny(call, (entry.error or {}).get("rule", ""), "")  # replayed: raises
            return  # replayed, or a later attempt: admitted before its first
        if self.policy is not None and call.tool is not None:
            self._policy(call)
        if not self.view:
            return
        while True:
            entry = ex.journal.get(ex.seq + 1)
            if (
                entry is not None
                and entry.kind == StepKind.APPROVE
                and entry.name.startswith(BUDGET_ASK)
            ):
                decision = approvals.budget_answer(ex, entry.name)
                if not decision.approved:
                    _, holder, key = entry.name.split(":", 2)
                    who = decision.decided_by or decision.source
                    note = f": {decision.comment}" if decision.comment else ""
                    message = (
                        f"run {ex.run_id}: step {call.name} was not started: raising "
                        f"{field_name(key)} of run {holder}'s budget was rejected by {who}{note}"
                    )
                    data = {"holder": holder, "limit": field_name(key), "step": call.name,
                            "seq": ex.seq + 1, "message": message,
                            "approval_id": decision.approval_id}  # fmt: skip
                    ex.budget_failed(data, call)
                continue
            if entry is not None:
                return
            break
        self._reserve(call)

    def _policy(self, call: StepCall) -> None:
        ex = self.ex
        assert self.policy is not None and call.tool is not None
        verdict, rule = self.policy.tool_rule(call.tool, priced=call.cost is not None)
        if verdict == "deny":
            ex.deny(call, rule, f"the policy does not allow tool {call.tool} ({rule})")
        if verdict == "ask":
            if ex.journal.get(ex.seq + 1) is None:  # asked now, with the approval's write
                ex.later(E.POLICY_ASKED, {"seq": ex.seq + 1, "tool": call.tool, "rule": rule})
            data = {
                "tool": call.tool,
                "step": call.name,
                "args": list(call.args),
                "kwargs": dict(call.kwargs),
            }
            decision = approvals.approve(
                ex,
                f"Allow {call.tool} ({call.name})?",
                data,
                schema=None,
                timeout=None,
                default="reject",
                approvers=None,
            )
            if not decision:
                who = decision.decided_by or decision.source
                ex.deny(call, rule, f"{call.tool} was not approved ({rule}; rejected by {who})")
            return
        ex.later(E.POLICY_ALLOWED, {"seq": ex.seq + 1, "tool": call.tool, "rule": rule})

    def _reserve(self, call: StepCall) -> None:
        ex = self.ex
        amounts = self.amounts(call)
        now = ex.clock().timestamp()
        seq = ex.seq + 1
        event = self._reserved_event(seq, call, amounts)
        if self._alone(call) and check(self.view, amounts, now) is None:
            self.held, self.held_in_ledger = amounts, False  # recorded with the settlement
            return
        # In the ledger: shared budgets always; a breach in memory is checked there again (a
        # person may have raised the limit meanwhile), and a pause parks in that same write.
        sync = self.sync(seq - 1)  # the check must see the run's own usage so far
        request = Reserve(
            seq,
            self.holders,
            amounts,
            now,
            self._take_opening(),
            (event,),
            call.name,
            True,
            sync,
        )
        verdict, limits, parked = ex.reserve(request)
        self.view = list(limits)
        if verdict is None:
            self.held, self.held_in_ledger = amounts, True
            return
        if parked:
            ex.parked("budget")
        if isinstance(verdict, Throttle):
            ex.throttled(seq, verdict)
        assert isinstance(verdict, Breach)
        data = verdict.event(call.name, seq)
        ex.later(E.BUDGET_EXCEEDED, data)
        if verdict.limit.action == "ask":
            approvals.budget_ask(ex, verdict, call.name)
        ex.budget_failed(data, call)

    # -- settlement -------------------------------------------------------------------------

    def settlement(
        self, seq: int, call: StepCall, usage: dict[str, float], final: bool
    ) -> tuple[LedgerChange | None, dict[str, Any] | None]:
        """What the step's write charges: ``usage`` (by ledger key) to every budget that
        limits it, and (``final``: the step completed or gave up) its reservation dropped;
        with the ``budget.settled`` event's data."""
        held, in_ledger = self.held, self.held_in_ledger
        # Shared budgets: what it reserved is in the ledger (reserved by this execution, or by
        # one that died before it settled), and goes with the step's end.
        release = "step" if final and (in_ledger or self.shared) else None
        if final:
            self.held, self.held_in_ledger = None, False
        if not self.holders:
            return None, None
        charged = {}
        warned = []
        for lim in self.view:
            amount = usage.get(lim.key)
            if amount:
                before = lim.used
                lim.used += amount
                charged[lim.key] = amount
                if lim.warn_at is not None and before < lim.warn_at * lim.max <= lim.used:
                    warned.append(lim)
        data: dict[str, Any] = {"seq": seq, "name": call.name, "usage": usage}
        if held is not None and not in_ledger:
            # Reserved in memory (this run alone spends against its budget): the
            # reservation is recorded here, in the write that settles it (``reserved``
            # names it when it differs from the usage, as when a step reports more).
            reserved = {k: v for k, v in held.items() if not k.startswith("rate:")}
            data["reserved"] = True if reserved == usage else reserved
        if not self.ancestors and not self.spawned:
            # Alone with its budget: the step's usage is committed with it (its row), and
            # added to the ledger rows when the run parks, ends or starts sharing them.
            for key, amount in charged.items():
                self.pending[key] = self.pending.get(key, 0.0) + amount
            for lim in warned:
                self.ex.later(E.BUDGET_WARNED, warning(lim))
            if release is None and self.opening is None:
                return None, data
            # Its rows exist from its first step on (``tether runs budget`` can raise them).
            return LedgerChange(seq=seq, release=release, open=self._take_opening()), data
        if not charged and release is None and self.opening is None:
            return None, data
        return LedgerChange(self.holders, seq, charged, release, self._take_opening()), data

    def sync(self, through: int, change: LedgerChange | None = None) -> LedgerChange | None:
        """A write that parks or ends the run, or starts it sharing its budget: the change
        that adds its own usage since the last sync to its rows (and creates them), merged
        with ``change``; ``change`` itself when there is nothing to add."""
        if self.ancestors or (not self.pending and self.opening is None):
            return change
        usage, self.pending = self.pending, {}
        self.synced = through
        release = change.release if change is not None else None
        seq = change.seq if change is not None else None
        return LedgerChange((self.ex.run_id,), seq, usage, release, self._take_opening(), through)

    def for_child(self, budget: Budget | None) -> dict[str, Any]:
        """What a child run inherits (``runs.limits``): the budgets it spends against (this
        run's and its ancestors') and this run's policy; ``budget``: its own, if given."""
        doc: dict[str, Any] = {}
        if self.holders:
            doc["holders"] = list(self.holders)
        if self.policy is not None:
            doc["policy"] = self.policy.to_doc()
        if budget is not None:
            doc["budget"] = budget.to_doc()
        return doc

    def before_child(self, seq: int) -> LedgerChange | None:
        """The write that starts a child creates this run's ledger rows and brings them up to
        date first: from then on, the child's steps and this run's are charged to them in
        their own transactions."""
        change = self.sync(seq - 1)
        self.spawned = True
        return change

    def recipient(self, to: str) -> tuple[str, str]:
        """What the policy says about a message to ``to``."""
        if self.policy is None:
            return "allow", "default"
        return self.policy.recipient_rule(to)

    # -- what the run sees ------------------------------------------------------------------

    def remaining(self) -> dict[str, float]:
        """What is left of each limit (the least over this run's budget and every
        ancestor's), by the ``Budget`` field it comes from: ``max_cost``, ``max_calls[web]``."""
        now = self.ex.clock().timestamp()
        left: dict[str, float] = {}
        for lim in self.view:
            name = field_name(lim.key)
            value = lim.left(now)
            left[name] = min(value, left.get(name, value))
        return left


def journal_usage(entries: Iterable[JournalEntry], after: int) -> dict[str, float]:
    """What the steps journaled after position ``after`` used, by ledger key (each attempt
    called its tool; a step counts once, when it completed)."""
    usage: dict[str, float] = {}
    for entry in entries:
        if entry.seq <= after or entry.kind != StepKind.STEP:
            continue
        found = {
            "steps": 1.0 if entry.status == StepStatus.COMPLETED else 0.0,
            "cost": entry.cost or 0.0,
            "tokens": float(entry.tokens or 0),
        }
        if entry.tool is not None:
            found[f"calls:{entry.tool}"] = float(entry.attempts)
        for key, amount in found.items():
            if amount:
                usage[key] = usage.get(key, 0.0) + amount
    return usage


def warning(lim: Limit) -> dict[str, Any]:
    """The ``budget.warned`` event's data."""
    return {
        "holder": lim.holder,
        "limit": describe_limit(lim.key, lim.max),
        "used": round(lim.used, 9),
        "max": lim.max,
    }


class BudgetView:
    """``ctx.budget``: what the run may still spend, as its execution knows it (the ledger as
    of the claim, plus this execution's own steps). Not journaled: read it at the frontier to
    decide to wrap up, not to choose between journaled calls on replay."""

    def __init__(self, guard: Guard | None) -> None:
        self._guard = guard

    @property
    def remaining(self) -> dict[str, float]:
        """Left of each limit, by field: ``{"max_cost": 0.4, "max_steps": 12, ...}``; empty
        when no budget applies."""
        return {} if self._guard is None else self._guard.remaining()

    @property
    def limits(self) -> Budget | None:
        """The run's own budget (the tightest of its levels), if any."""
        return None if self._guard is None else self._guard.budget

    @property
    def policy(self) -> Policy | None:
        """The policy the run is held to (every level's and its parent's intersection)."""
        return None if self._guard is None else self._guard.policy

    def __repr__(self) -> str:
        return f"BudgetView(remaining={self.remaining!r})"


def check_recipient(ex: Execution, to: str) -> None:
    """Before ``ctx.send``: a recipient the policy does not allow is refused (journaled at
    the send's position, ``PolicyDenied``); an allowed one is an event with the send."""
    guard = ex.guard
    if guard is None or guard.policy is None or guard.policy.allowed_recipients is None:
        return
    verdict, rule = guard.recipient(to)
    entry = ex.journal.get(ex.seq + 1)
    if verdict == "deny" or (entry is not None and (entry.error or {}).get("denied")):
        allowed = ", ".join(sorted(guard.policy.allowed_recipients)) or "nobody"
        ex.refuse(to, StepKind.SEND, rule, f"the policy allows messages only to {allowed}", to)
    if entry is None:
        ex.later(E.POLICY_ALLOWED, {"seq": ex.seq + 1, "recipient": to, "rule": rule})
