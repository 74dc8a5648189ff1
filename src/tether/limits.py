"""Budgets and policies as values: what a run may spend and call (no I/O here).

A ``Budget`` bounds what a run and its whole delegation tree spend; a ``Policy`` says which
tools a run may call and to whom it may send. Both can be set on an agent type (class
attributes ``budget``/``policy``), on an agent (its config's ``"budget"``/``"policy"``), on a
run (``submit(..., budget=, policy=)``) and as the app's default. For a budget the tightest
limit of each kind applies; a policy is the intersection of every level's and of the parent
run's, so a child is never allowed more than its parent.

The ledger (``tether.policies`` and ``tether.store.ledger``) enforces them: this module only
describes, checks and combines them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tether.agent import format_rate, parse_rate
from tether.errors import ConfigurationError

BREACH_ACTIONS = ("fail", "pause", "ask")
"""What happens when a step would go over a budget's limit."""

UNPRICED_ACTIONS = ("allow", "deny", "ask")
"""What happens to a step that names a tool but declares no cost (``Policy.on_unpriced``)."""

COUNTERS = ("steps", "cost", "tokens")
"""The limits a step's usage counts against, besides per-tool calls."""


def _number(owner: str, name: str, value: Any, *, whole: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0:
        raise ConfigurationError(f"{owner}: {name} must be a number >= 0, got {value!r}")
    if whole and int(float(value)) != float(value):
        raise ConfigurationError(f"{owner}: {name} must be a whole number, got {value!r}")
    if math.isinf(float(value)):
        raise ConfigurationError(f"{owner}: {name} must be finite (leave it out for no limit)")
    return int(float(value)) if whole else float(value)


def _names(owner: str, name: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"{owner}: {name} must be a list of names (e.g. ['web_search']), got {value!r}"
        )
    items = list(value)
    if not all(isinstance(v, str) and v for v in items):
        raise ConfigurationError(f"{owner}: {name} must hold non-empty names, got {items!r}")
    return frozenset(items)


@dataclass(frozen=True)
class Budget:
    """Limits on what a run and everything it delegates may spend.

    ``max_calls`` caps calls per tool (``{"web_search": 20}``); ``rate`` spaces them
    (``{"llm": "60/min"}``: a step over the rate waits, durably, for the window to move on).
    At ``warn_at`` (a fraction of any limit) a ``budget.warned`` event is written and
    ``ctx.budget`` shows what is left. ``on_breach`` says what happens when a step would go
    over a limit: ``fail`` (the run fails with ``BudgetExceeded``), ``pause`` (until a person
    raises the limit) or ``ask`` (an approval decides whether to raise it).
    """

    max_steps: int | None = None
    max_duration: float | None = None
    """Seconds from the start of the run's first execution (on the app's clock)."""
    max_cost: float | None = None
    max_tokens: int | None = None
    max_calls: Mapping[str, int] = field(default_factory=dict)
    rate: Mapping[str, str] = field(default_factory=dict)
    warn_at: float | None = 0.8
    on_breach: str = "fail"

    def __post_init__(self) -> None:
        owner = "Budget"
        set_ = object.__setattr__
        set_(self, "max_steps", _number(owner, "max_steps", self.max_steps, whole=True))
        set_(self, "max_duration", _number(owner, "max_duration", self.max_duration))
        set_(self, "max_cost", _number(owner, "max_cost", self.max_cost))
        set_(self, "max_tokens", _number(owner, "max_tokens", self.max_tokens, whole=True))
        if not isinstance(self.max_calls, Mapping):
            raise ConfigurationError(
                f"{owner}: max_calls must map tool names to counts, e.g. {{'web_search': 20}}"
            )
        calls = {}
        for tool, count in self.max_calls.items():
            if not isinstance(tool, str) or not tool:
                raise ConfigurationError(f"{owner}: max_calls keys must be tool names")
            calls[tool] = _number(owner, f"max_calls[{tool!r}]", count, whole=True)
        set_(self, "max_calls", calls)
        if not isinstance(self.rate, Mapping):
            raise ConfigurationError(
                f"{owner}: rate must map tool names to rates, e.g. {{'llm': '60/min'}}"
            )
        for tool, spec in self.rate.items():
            if not isinstance(tool, str) or not tool:
                raise ConfigurationError(f"{owner}: rate keys must be tool names")
            try:
                parse_rate(spec)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{owner}: rate[{tool!r}]: {exc}") from None
        set_(self, "rate", dict(self.rate))
        warn = _number(owner, "warn_at", self.warn_at)
        if warn is not None and not 0 < warn <= 1:
            raise ConfigurationError(f"{owner}: warn_at must be a fraction in (0, 1], got {warn}")
        set_(self, "warn_at", warn)
        if self.on_breach not in BREACH_ACTIONS:
            raise ConfigurationError(
                f"{owner}: on_breach={self.on_breach!r}; choose one of {', '.join(BREACH_ACTIONS)}"
            )

    def limits(self) -> dict[str, tuple[float, float | None]]:
        """The ledger's keys: ``steps``, ``cost``, ``tokens``, ``duration``, ``calls:TOOL``
        and ``rate:TOOL``, each to (its maximum, its window in seconds for a rate)."""
        found: dict[str, tuple[float, float | None]] = {}
        for key, value in (
            ("steps", self.max_steps),
            ("cost", self.max_cost),
            ("tokens", self.max_tokens),
            ("duration", self.max_duration),
        ):
            if value is not None:
                found[key] = (float(value), None)
        for tool, count in self.max_calls.items():
            found[f"calls:{tool}"] = (float(count), None)
        for tool, spec in self.rate.items():
            count, window = parse_rate(spec)
            found[f"rate:{tool}"] = (float(count), window)
        return found

    def to_doc(self) -> dict[str, Any]:
        """As JSON (what the database and ``runs show`` hold); limits not set are left out."""
        doc: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == {}:
                continue
            doc[f.name] = dict(value) if isinstance(value, Mapping) else value
        return doc

    @classmethod
    def from_doc(cls, doc: Any, where: str = "budget") -> Budget:
        """From JSON (a config's or a run's ``budget``); a clear error naming ``where``."""
        found: Budget = _from_doc(cls, doc, where, "limit")
        return found


def _rate_per_second(spec: str) -> float:
    count, window = parse_rate(spec)
    return count / window


def tightest(budgets: Iterable[Budget | None]) -> Budget | None:
    """One budget from several levels, most specific first (run, agent, type, app): the
    lowest limit of each kind, the earliest warning, and the most specific level's breach
    action. None when no level sets one."""
    given = [b for b in budgets if b is not None]
    if not given:
        return None

    def low(values: Iterable[Any]) -> Any:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    calls: dict[str, int] = {}
    rate: dict[str, str] = {}
    for budget in reversed(given):
        for tool, count in budget.max_calls.items():
            calls[tool] = min(count, calls.get(tool, count))
        for tool, spec in budget.rate.items():
            if tool not in rate or _rate_per_second(spec) < _rate_per_second(rate[tool]):
                rate[tool] = spec
    return Budget(
        max_steps=low(b.max_steps for b in given),
        max_duration=low(b.max_duration for b in given),
        max_cost=low(b.max_cost for b in given),
        max_tokens=low(b.max_tokens for b in given),
        max_calls=calls,
        rate=rate,
        warn_at=low(b.warn_at for b in given),
        on_breach=given[0].on_breach,
    )


@dataclass(frozen=True)
class Policy:
    """Which tools a run may call and to whom it may send.

    ``allowed_tools`` (None: any) and ``denied_tools`` decide whether a step naming a tool
    may start; ``allowed_recipients`` (None: any) whom ``ctx.send`` may address;
    ``require_approval`` lists tools a person approves before each call, with the call's
    arguments as the approval's data; ``on_unpriced`` says what happens to a step that names
    a tool but declares no cost: ``allow``, ``deny`` or ``ask``.
    """

    allowed_tools: frozenset[str] | None = None
    denied_tools: frozenset[str] = frozenset()
    allowed_recipients: frozenset[str] | None = None
    require_approval: frozenset[str] = frozenset()
    on_unpriced: str = "allow"

    def __post_init__(self) -> None:
        owner = "Policy"
        set_ = object.__setattr__
        set_(self, "allowed_tools", _names(owner, "allowed_tools", self.allowed_tools))
        set_(self, "denied_tools", _names(owner, "denied_tools", self.denied_tools) or frozenset())
        set_(
            self,
            "allowed_recipients",
            _names(owner, "allowed_recipients", self.allowed_recipients),
        )
        set_(
            self,
            "require_approval",
            _names(owner, "require_approval", self.require_approval) or frozenset(),
        )
        if self.on_unpriced not in UNPRICED_ACTIONS:
            raise ConfigurationError(
                f"{owner}: on_unpriced={self.on_unpriced!r}; choose one of "
                f"{', '.join(UNPRICED_ACTIONS)}"
            )

    def __and__(self, other: Policy) -> Policy:
        """The intersection: allowed by both, denied by either, asked by either."""

        def both(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
            if a is None:
                return b
            return a if b is None else a & b

        strict = max(
            self.on_unpriced, other.on_unpriced, key=lambda a: ("allow", "ask", "deny").index(a)
        )
        return Policy(
            allowed_tools=both(self.allowed_tools, other.allowed_tools),
            denied_tools=self.denied_tools | other.denied_tools,
            allowed_recipients=both(self.allowed_recipients, other.allowed_recipients),
            require_approval=self.require_approval | other.require_approval,
            on_unpriced=strict,
        )

    def tool_rule(self, tool: str, priced: bool) -> tuple[str, str]:
        """What this policy says about a call of ``tool``: ``(allow | deny | ask, the rule)``."""
        if tool in self.denied_tools:
            return "deny", "denied_tools"
        if self.allowed_tools is not None and tool not in self.allowed_tools:
            return "deny", "allowed_tools"
        if tool in self.require_approval:
            return "ask", "require_approval"
        if not priced and self.on_unpriced != "allow":
            return self.on_unpriced, "on_unpriced"
        return "allow", "allowed_tools" if self.allowed_tools is not None else "default"

    def recipient_rule(self, recipient: str) -> tuple[str, str]:
        """What this policy says about a message to ``recipient``."""
        if self.allowed_recipients is not None and recipient not in self.allowed_recipients:
            return "deny", "allowed_recipients"
        return "allow", "allowed_recipients" if self.allowed_recipients is not None else "default"

    def to_doc(self) -> dict[str, Any]:
        """As JSON; what is left at its default is left out."""
        doc: dict[str, Any] = {}
        for name in ("allowed_tools", "denied_tools", "allowed_recipients", "require_approval"):
            value = getattr(self, name)
            if value is not None and (value or name.startswith("allowed")):
                doc[name] = sorted(value)
        if self.on_unpriced != "allow":
            doc["on_unpriced"] = self.on_unpriced
        return doc

    @classmethod
    def from_doc(cls, doc: Any, where: str = "policy") -> Policy:
        """From JSON (a config's or a run's ``policy``); a clear error naming ``where``."""
        found: Policy = _from_doc(cls, doc, where, "rule")
        return found


def _from_doc(cls: Any, doc: Any, where: str, noun: str) -> Any:
    """A ``Budget`` or ``Policy`` from its JSON; errors name ``where`` and what is wrong."""
    if isinstance(doc, cls):
        return doc
    if not isinstance(doc, Mapping):
        raise ConfigurationError(f"{where} must be an object of {noun}s, got {doc!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown {noun} {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(sorted(known))}"
        )
    try:
        return cls(**doc)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


def combine(policies: Iterable[Policy | None]) -> Policy | None:
    """The intersection of every level's policy; None when no level sets one."""
    found: Policy | None = None
    for policy in policies:
        if policy is not None:
            found = policy if found is None else found & policy
    return found


def describe_limit(key: str, value: float, window: float | None = None) -> str:
    """A ledger key and maximum as people write them: ``max_cost=2``, ``rate[llm]=60/min``."""
    if key.startswith("calls:"):
        return f"max_calls[{key[6:]}]={value:g}"
    if key.startswith("rate:"):
        return f"rate[{key[5:]}]={format_rate(int(value), window or 1.0)}"
    return f"max_{key}={value:g}"


@dataclass(slots=True)
class Limit:
    """One limit of one budget as the ledger holds it (an execution adds its own steps'
    usage to its copy as they commit)."""

    holder: str
    """The run whose budget it is (the run itself or an ancestor)."""
    key: str
    """``steps``, ``cost``, ``tokens``, ``duration``, ``calls:TOOL`` or ``rate:TOOL``."""
    max: float
    used: float
    reserved: float = 0.0
    """Held by other runs' steps that have not settled yet."""
    window: float | None = None
    recent: tuple[float, ...] = ()
    """``rate:``: when the recent calls were made; ``duration``: when the run started."""
    action: str = "fail"
    warn_at: float | None = None
    synced: int = 0
    """The holder's own steps up to this journal position are in ``used`` (see the
    ``ledger`` table); an execution adds the later ones to its copy."""

    def describe(self) -> str:
        """As people write it: ``max_cost=2``."""
        return describe_limit(self.key, self.max, self.window)

    def left(self, now: float) -> float:
        """What is left of it for new steps (never negative)."""
        if self.key == "duration":
            start = self.recent[0] if self.recent else now
            return max(0.0, self.max - (now - start))
        if self.key.startswith("rate:"):
            window = self.window or 0.0
            return max(0.0, self.max - sum(1 for t in self.recent if t > now - window))
        return max(0.0, self.max - self.used - self.reserved)


@dataclass(frozen=True)
class Breach:
    """A step would go over a limit: it does not start."""

    limit: Limit
    needed: float
    used: float
    """What the limit's usage is (for ``max_duration``, the seconds since the start)."""

    def message(self, run_id: str, step: str) -> str:
        """Why, for ``BudgetExceeded`` and the event."""
        lim = self.limit
        whose = "its own budget" if lim.holder == run_id else f"the budget of run {lim.holder}"
        if lim.key == "duration":
            return (
                f"run {run_id}: step {step} was not started: {lim.describe()} of {whose} is "
                f"spent ({self.used:.1f}s elapsed)"
            )
        held = f" and {lim.reserved:g} reserved by other steps" if lim.reserved else ""
        return (
            f"run {run_id}: step {step} was not started: it needs {self.needed:g} of "
            f"{lim.describe()} ({whose}), which has {self.used:g} used{held}. Raise it with "
            f"tether runs budget {lim.holder} --{_option(lim.key)}"
        )

    def event(self, step: str, seq: int) -> dict[str, Any]:
        """The ``budget.exceeded`` event's data."""
        lim = self.limit
        return {
            "holder": lim.holder,
            "limit": lim.describe(),
            "used": round(self.used, 9),
            "reserved": round(lim.reserved, 9),
            "needed": self.needed,
            "max": lim.max,
            "step": step,
            "seq": seq,
            "action": lim.action,
        }

    @property
    def parks(self) -> bool:
        """Whether the run waits for a person to raise the limit (``pause``; and ``ask`` on a
        duration, which no edit of a number could give back)."""
        lim = self.limit
        return lim.action == "pause" or (lim.action == "ask" and lim.key == "duration")


def _option(key: str) -> str:
    """The ``tether runs budget`` option that sets a limit, with a placeholder value."""
    if key.startswith("calls:"):
        return f"max-calls {key[6:]}=N"
    return f"max-{key} N"


def field_name(key: str) -> str:
    """A ledger key as the ``Budget`` field people know it by: ``max_cost``,
    ``max_calls[web]``, ``rate[llm]``."""
    if key.startswith("calls:"):
        return f"max_calls[{key[6:]}]"
    if key.startswith("rate:"):
        return f"rate[{key[5:]}]"
    return f"max_{key}"


@dataclass(frozen=True)
class Throttle:
    """A step would go over a tool's rate: it waits until ``until`` (epoch seconds)."""

    limit: Limit
    until: float


_SLACK = 1e-9


def check(
    limits: Iterable[Limit], amounts: Mapping[str, float], now: float
) -> Breach | Throttle | None:
    """Whether a step needing ``amounts`` (by ledger key) fits every limit, at ``now``
    (epoch seconds): the first breach or throttle, else None.

    A step that declares nothing of a counted limit (no cost given) still needs some of it
    left: it is refused once the limit is spent."""
    for lim in limits:
        key = lim.key
        if key == "duration":
            start = lim.recent[0] if lim.recent else now
            if now - start >= lim.max:
                return Breach(lim, 0.0, now - start)
            continue
        if key.startswith("rate:"):
            if key in amounts:
                window = lim.window or 0.0
                recent = sorted(t for t in lim.recent if t > now - window)
                if len(recent) >= lim.max:
                    return Throttle(lim, recent[len(recent) - int(lim.max)] + window)
            continue
        need = amounts.get(key)
        if need is None:
            if key.startswith("calls:"):
                continue  # another tool's
            need = 0.0
        total = lim.used + lim.reserved
        over = total + need > lim.max * (1 + _SLACK) + _SLACK if need else total >= lim.max
        if over:
            return Breach(lim, need, lim.used)
    return None
