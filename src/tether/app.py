"""``App``: the outside-a-run API and the composition root.

An ``App`` knows its database URL and the agent types registered with it. The database is
opened on first use, so ``import tether`` and building an ``App`` stay cheap.
"""

from __future__ import annotations

import copy
import datetime as dt
import getpass
import inspect
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tether import codec, lifecycle
from tether.agent import (
    HOOKS,
    Agent,
    HookContext,
    call_maybe_async,
    error_info,
    format_rate,
    from_function,
    has_mailbox,
    parse_rate,
)
from tether.agent import validate_type as _validate_type
from tether.announce import Announcements
from tether.errors import ConfigurationError, Refused, RunFailed
from tether.lifecycle import LifecycleState
from tether.limits import Budget, Policy
from tether.types import (
    AgentInfo,
    ApprovalInfo,
    Checkpoint,
    Event,
    HistoryEntry,
    Incident,
    MessageInfo,
    Retention,
    Retry,
    RunInfo,
    RunStatus,
    RunUsage,
    StateVersion,
    StepInfo,
)

if TYPE_CHECKING:
    from tether.engine.worker import Worker, WorkerLink
    from tether.interceptors import Interceptor
    from tether.journal import Claim
    from tether.store import GcReport, Store
    from tether.store.types import TypeDeclaration

A = TypeVar("A", bound=type[Agent])


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


MAX_ID_LENGTH = 255
APPROVAL_STATUSES = ("pending", "approved", "rejected", "answered", "withdrawn")


def default_actor() -> str:
    """Who is acting when the caller does not say: ``$TETHER_ACTOR``, else the OS user."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return os.environ.get("TETHER_ACTOR") or user


def _actor(actor: str | None) -> str:
    """The acting person or process: ``actor`` if given, else ``default_actor()``, checked."""
    return codec.check_text("actor", actor or default_actor(), MAX_ID_LENGTH)


def check_id(kind: str, value: str) -> str:
    """Refuse empty, oversized or control-character identifiers."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{kind} id must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise ConfigurationError(f"{kind} id is {len(value)} characters; the limit is 255")
    codec.check_text(f"{kind} id", value, MAX_ID_LENGTH)
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ConfigurationError(
            f"{kind} id {value!r} must not contain spaces or control characters"
        )
    return value


class App:
    """A tether application: a database plus the agent types that run against it.

    Args:
        url: database URL; default ``TETHER_DATABASE_URL``, else ``sqlite:///tether.db``.
        retry: the app-wide retry policy (agent types and steps may override it).
        require_types: refuse agents whose type is not registered. The CLI turns this off
            when no ``--app`` is given, so it can operate on a database alone.
        lease_ttl: seconds a worker's claim on a run lasts without a heartbeat; a crashed
            worker's runs are resumed elsewhere after at most this long.
        retention: what ``gc()`` removes; with ``interval`` set, workers apply it on a schedule.
        clock: returns the current time (timezone-aware); what ``ctx.now()``, sleeps, retry
            delays and every other deadline are measured with. Leases keep the database's
            clock (PostgreSQL) or the machine's (SQLite). ``tether.testing.FakeClock`` lets
            tests move time instead of sleeping.
        interceptors: code around every executed step attempt (``tether.Interceptor``).
        stall_limit: claims in a row in which a run commits nothing (its executions keep
            dying) after which it becomes a ``poison_run`` incident instead of being retried
            (default 5).
        outage_limit: seconds a worker (and a write) waits for an unreachable database, or a
            full disk, retrying with backoff, before it gives up (default 300).
        on_approval: called with each new pending approval (``ApprovalInfo``) by a thread of
            every worker, at least once (see ``tether.announce``).
        approval_webhook: an http(s) URL every worker POSTs each new pending approval to,
            signed with ``webhook_secret`` (at least once; see ``tether.announce``).
        webhook_secret: the HMAC key of the webhook's signatures; default
            ``TETHER_WEBHOOK_SECRET``. Required with a webhook; never shown.
        budget: the default ``tether.Budget`` of every run (agent types, agents and runs may
            set tighter limits: the tightest of each applies).
        policy: a ``tether.Policy`` every run is held to (intersected with every other
            level's).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        retry: Retry | None = None,
        require_types: bool = True,
        lease_ttl: float = 30.0,
        retention: Retention | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        interceptors: Sequence[Interceptor] = (),
        stall_limit: int | None = None,
        outage_limit: float | None = None,
        on_approval: Callable[[ApprovalInfo], None] | None = None,
        approval_webhook: str | None = None,
        webhook_secret: str | None = None,
        budget: Budget | None = None,
        policy: Policy | None = None,
    ) -> None:
        if stall_limit is not None and stall_limit < 1:
            raise ConfigurationError(f"stall_limit must be at least 1, got {stall_limit}")
        if outage_limit is not None and outage_limit < 0:
            raise ConfigurationError(f"outage_limit must not be negative, got {outage_limit}")
        self.url = url
        self.retention = retention or Retention()
        self.retry = retry or Retry()
        self.require_types = require_types
        self.lease_ttl = lease_ttl
        self.clock: Callable[[], dt.datetime] = clock or _utc_now
        self.interceptors = tuple(interceptors)
        self.stall_limit = stall_limit
        self.outage_limit = outage_limit
        self.announcements = Announcements.configure(on_approval, approval_webhook, webhook_secret)
        if budget is not None and not isinstance(budget, Budget):
            raise ConfigurationError(f"budget must be a tether.Budget, got {budget!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise ConfigurationError(f"policy must be a tether.Policy, got {policy!r}")
        self.budget = budget
        self.policy = policy
        self._types: dict[str, type[Agent]] = {}
        self._agent_types_seen: dict[str, str] = {}  # an agent's type never changes
        self._store: Store | None = None
        self._settings: Any = None
        self._lock = threading.Lock()

    # -- wiring ---------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The opened database (created and migrated on first use)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    from tether.engine.executor import Settings
                    from tether.store import Store

                    store = Store(self.url, clock=self.clock, outage_limit=self.outage_limit)
                    try:  # every process must see this app's caps: the registry has them
                        store.declare_types([_declaration(cls) for cls in self._types.values()])
                    except BaseException:
                        store.close()
                        raise
                    self._store = store
                    # What every execution of this app is given, made once; the engine is
                    # loaded with the database, not with ``import tether``.
                    self._settings = Settings(
                        retry=self.retry,
                        lease_ttl=self.lease_ttl,
                        clock=self.clock,
                        interceptors=self.interceptors,
                        stall_limit=self.stall_limit,
                        budget=self.budget,
                        policy=self.policy,
                    )
        return self._store

    def close(self) -> None:
        """Release the database connections. The app reopens them if used again."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, cls: A) -> A:
        """Register an agent class (a subclass of ``tether.Agent`` with a ``type``)."""
        _validate_type(cls)
        existing = self._types.get(cls.type)
        if existing is not None and existing is not cls:
            raise ConfigurationError(
                f"agent type {cls.type!r} is already registered by {existing.__qualname__}"
            )
        self._types[cls.type] = cls
        if self._store is not None:  # registered after the database was opened
            self._store.declare_types([_declaration(cls)])
        return cls

    def agent(
        self,
        name: str,
        *,
        max_concurrent_runs: int = 1,
        retry: Retry | None = None,
        type_concurrency: int | None = None,
        rate_limit: str | None = None,
        budget: Budget | None = None,
        policy: Policy | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``fn(ctx, task)`` as the agent type ``name``, with the options
        of ``tether.Agent`` (``type_concurrency=5``, ``rate_limit="30/min"``, ``budget=``,
        ...)."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            cls = from_function(
                name,
                fn,
                max_concurrent_runs=max_concurrent_runs,
                retry=retry,
                type_concurrency=type_concurrency,
                rate_limit=rate_limit,
                budget=budget,
                policy=policy,
            )
            self.register(cls)
            return fn

        return decorate

    @property
    def agent_types(self) -> dict[str, type[Agent]]:
        """Registered agent types by name."""
        return dict(self._types)

    def agent_type(self, name: str) -> type[Agent] | None:
        """The class registered for ``name``; ``None`` only when types are not required."""
        cls = self._types.get(name)
        if cls is None and self.require_types:
            known = ", ".join(sorted(self._types)) or "none"
            raise ConfigurationError(
                f"agent type {name!r} is not registered with this app (registered: {known}); "
                "register it with app.register(...) or pass the right --app"
            )
        return cls

    # -- agents ---------------------------------------------------------------------------

    def create_agent(
        self,
        type: str,
        agent_id: str,
        config: dict[str, Any] | None = None,
        *,
        state: dict[str, Any] | None = None,
        reason: str = "created",
        actor: str | None = None,
    ) -> AgentInfo:
        """Create an agent of a registered type, in the ``created`` state."""
        check_id("agent", agent_id)
        codec.check_text("agent type", type, MAX_ID_LENGTH)
        self.agent_type(type)
        config_doc = codec.check(config or {}, "config")
        state_doc = codec.check(state or {}, "state")
        if not isinstance(config_doc, dict) or not isinstance(state_doc, dict):
            raise ConfigurationError("an agent's config and state must be JSON objects")
        if config_doc.get("budget") is not None:
            Budget.from_doc(config_doc["budget"], f"agent {agent_id}'s config budget")
        if config_doc.get("policy") is not None:
            Policy.from_doc(config_doc["policy"], f"agent {agent_id}'s config policy")
        created = self.store.create_agent(
            agent_id, type, config_doc, state_doc, _actor(actor), codec.check_text("reason", reason)
        )
        cls = self._types.get(type)
        for topic in cls.subscriptions if cls is not None else ():
            self.store.subscribe(agent_id, topic)
        return created

    def get_agent(self, agent_id: str) -> AgentInfo:
        """One agent: lifecycle state, config, state document, version, timestamps."""
        return self.store.get_agent(agent_id)

    def list_agents(
        self,
        *,
        type: str | None = None,
        lifecycle: str | None = None,
        limit: int | None = None,
    ) -> list[AgentInfo]:
        """Agents, oldest first, optionally filtered."""
        if lifecycle is not None:
            _lifecycle_state(lifecycle)
        return self.store.list_agents(type, lifecycle, limit)

    def agent_history(self, agent_id: str) -> list[HistoryEntry]:
        """Every lifecycle transition of an agent: from, to, action, reason, actor, time."""
        return self.store.agent_history(agent_id)

    def initialize(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """created -> initialized (runs ``on_initialize``)."""
        return self._transition(agent_id, "initialize", reason, actor)

    def activate(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """initialized -> active (runs ``on_activate``); paused runs of the agent continue."""
        return self._transition(agent_id, "activate", reason, actor)

    def pause(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """active -> paused (runs ``on_pause``); its runs pause at their next step boundary."""
        return self._transition(agent_id, "pause", reason, actor)

    def resume(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """paused -> active; its paused runs continue."""
        return self._transition(agent_id, "resume", reason, actor)

    def terminate(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """any live state -> terminated for good (runs ``on_terminate``); cancels its runs."""
        return self._transition(agent_id, "terminate", reason, actor)

    def fail(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """any live state -> error; its runs pause until the agent is recovered and activated."""
        return self._transition(agent_id, "fail", reason, actor)

    def recover(self, agent_id: str, reason: str = "", actor: str | None = None) -> AgentInfo:
        """error -> initialized."""
        return self._transition(agent_id, "recover", reason, actor)

    def _transition(self, agent_id: str, action: str, reason: str, actor: str | None) -> AgentInfo:
        who = _actor(actor)
        codec.check_text("reason", reason)
        info = self.store.get_agent(agent_id)
        lifecycle.check(f"agent {agent_id}", info.lifecycle, action)
        hook_name = HOOKS.get(action)
        cls = self.agent_type(info.type)
        new_state: dict[str, Any] | None = None
        if hook_name and cls is not None and hasattr(cls, hook_name):
            ctx = HookContext(
                agent_id, info.type, dict(info.config), action, copy.deepcopy(info.state)
            )
            try:
                call_maybe_async(getattr(cls(agent_id, info.config), hook_name), ctx)
                checked = codec.check(ctx.state, "state")
            except Exception as exc:
                self.store.transition_agent(
                    agent_id,
                    "fail",
                    reason=f"{hook_name} raised {type(exc).__name__}: {exc}",
                    actor=who,
                    error=error_info(exc),
                    expected=info.lifecycle,
                )
                raise Refused(
                    f"agent {agent_id}: {hook_name} raised {type(exc).__name__}: {exc}; the agent "
                    f"is now in error. Fix the cause, then: tether agents recover {agent_id}"
                ) from exc
            if checked != info.state:
                new_state = checked
        return self.store.transition_agent(
            agent_id,
            action,
            reason=reason or action,
            actor=who,
            state=new_state,
            expected=info.lifecycle,
        )

    # -- agent state ----------------------------------------------------------------------

    def get_state(self, agent_id: str, version: int | None = None) -> StateVersion:
        """The agent's state document now, or at an earlier ``version``."""
        if version is None:
            info = self.store.get_agent(agent_id)
            version = info.version
        return self.store.state_versions(agent_id, version)[0]

    def state_versions(self, agent_id: str) -> list[StateVersion]:
        """Every stored version of the agent's state, oldest first."""
        return self.store.state_versions(agent_id)

    def set_state(
        self,
        agent_id: str,
        state: dict[str, Any],
        *,
        expected_version: int | None = None,
        reason: str = "set",
    ) -> AgentInfo:
        """Replace the state document; with ``expected_version``, a stale write conflicts."""
        codec.check_text("reason", reason)
        doc = codec.check(state, "state")
        if not isinstance(doc, dict):
            raise ConfigurationError("an agent's state must be a JSON object")
        return self.store.write_state(
            agent_id, doc, expected_version=expected_version, reason=reason
        )

    def patch_state(
        self,
        agent_id: str,
        patch: dict[str, Any],
        *,
        expected_version: int | None = None,
        reason: str = "patch",
    ) -> AgentInfo:
        """Apply a JSON merge patch (RFC 7396: ``null`` deletes a key) as a new version."""
        codec.check_text("reason", reason)
        doc = codec.check(patch, "patch")
        if not isinstance(doc, dict):
            raise ConfigurationError("a state patch must be a JSON object")
        info = self.store.get_agent(agent_id)
        if expected_version is not None and expected_version != info.version:
            return self.store.write_state(  # fails with the precise ConflictError
                agent_id, info.state, expected_version=expected_version, reason=reason
            )
        merged = merge_patch(info.state, doc)
        return self.store.write_state(
            agent_id, merged, expected_version=info.version, reason=reason
        )

    # -- runs -----------------------------------------------------------------------------

    def submit(
        self,
        agent_id: str,
        task: Any = None,
        *,
        task_id: str | None = None,
        priority: int = 0,
        budget: Budget | dict[str, Any] | None = None,
        policy: Policy | dict[str, Any] | None = None,
    ) -> RunHandle:
        """Start a run of ``task`` on an active agent; returns at once with a handle.

        A ``task_id`` makes the submission idempotent: submitting it again returns the run
        already created for it. ``budget`` and ``policy`` (objects or their JSON) bound this
        run and everything it delegates, with its agent's, its type's and the app's.
        """
        if task_id is not None:
            check_id("task", task_id)
        doc = codec.check(task, "task")
        run_id, _created = self.store.committer.submit(
            agent_id,
            doc,
            task_id=task_id,
            priority=priority,
            max_concurrent=self._max_concurrent(agent_id),
            limits=_limits(budget, policy),
        )
        return RunHandle(self, run_id)

    def usage(self, run_id: str) -> RunUsage:
        """What the run and its subtree used (from their committed steps) and the limits of
        the budgets it spends against (``tether runs usage``)."""
        return self.store.run_usage(run_id)

    def raise_budget(
        self,
        run_id: str,
        *,
        max_steps: int | None = None,
        max_cost: float | None = None,
        max_tokens: int | None = None,
        max_duration: float | None = None,
        max_calls: dict[str, int] | None = None,
        actor: str | None = None,
    ) -> list[str]:
        """Set limits of ``run_id``'s budget (usually to raise them) and wake every run that
        waits for that budget (``on_breach="pause"``); returns the woken runs. Each change
        is a ``budget.raised`` event naming ``actor``. A limit the budget does not have is
        ``NotFound``, naming the ones it has."""
        given = Budget(
            max_steps=max_steps,
            max_cost=max_cost,
            max_tokens=max_tokens,
            max_duration=max_duration,
            max_calls=max_calls or {},
        )
        values = {key: top for key, (top, _) in given.limits().items()}
        if not values:
            raise ConfigurationError(
                "name a limit to set, e.g. raise_budget(run_id, max_cost=5) "
                "(tether runs budget RUN --max-cost 5)"
            )
        return self.store.raise_budget(run_id, values, _actor(actor))

    def _max_concurrent(self, agent_id: str) -> int:
        """The agent's type's ``max_concurrent_runs``; the type is looked up once per agent."""
        agent_type = self._agent_types_seen.get(agent_id)
        if agent_type is None:
            agent_type = self.store.get_agent(agent_id).type
            self._agent_types_seen[agent_id] = agent_type
        cls = self.agent_type(agent_type)
        if cls is not None:
            return cls.max_concurrent_runs
        # Not registered here (a CLI without the code): the type's code declared it.
        declared = {d.type: d for d in self.store.declared_types()}.get(agent_type)
        return declared.max_concurrent_runs if declared else 1

    def run(self, run_id: str) -> RunHandle:
        """A handle on an existing run."""
        self.store.get_run(run_id)
        return RunHandle(self, run_id)

    def get_run(self, run_id: str) -> RunInfo:
        """One run as stored."""
        return self.store.get_run(run_id)

    def list_runs(
        self,
        *,
        agent_id: str | None = None,
        status: str | list[str] | None = None,
        limit: int | None = 50,
    ) -> list[RunInfo]:
        """Runs, newest first, filtered by agent and status."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        for value in statuses:
            _run_status(value)
        return self.store.list_runs(agent_id=agent_id, status=statuses, limit=limit)

    def children(self, run_id: str) -> list[RunInfo]:
        """The runs ``run_id`` started (``ctx.spawn``), oldest first."""
        self.store.get_run(run_id)
        found = self.store.list_runs(parent_run_id=run_id, limit=None)
        return sorted(found, key=lambda r: (r.created_at, r.run_id))

    def run_tree(self, run_id: str) -> dict[str, Any]:
        """A run and everything below it: ``{"run": RunInfo, "children": [tree, ...]}``."""
        return {
            "run": self.get_run(run_id),
            "children": [self.run_tree(child.run_id) for child in self.children(run_id)],
        }

    def pending_reasons(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Why each of these runs that is pending is not executing yet, counted now the way a
        claim counts: ``"agent busy (1/1 running)"``, ``"type cap (5/5 running)"``,
        ``"rate 30/min reached"`` (several joined by ``"; "``). Runs that are not pending,
        and pending runs that nothing holds back (the next free worker takes them), are left
        out."""
        reasons = {}
        for run_id, queue in self.store.queue_states(list(run_ids)).items():
            why = []
            if queue.lifecycle != LifecycleState.ACTIVE.value:
                why.append(f"agent {queue.lifecycle}")
            if queue.agent_running >= queue.agent_cap:
                why.append(f"agent busy ({queue.agent_running}/{queue.agent_cap} running)")
            if queue.type_cap is not None and (queue.type_running or 0) >= queue.type_cap:
                why.append(f"type cap ({queue.type_running}/{queue.type_cap} running)")
            if queue.rate_limit and queue.rate_window and (queue.claims or 0) >= queue.rate_limit:
                why.append(f"rate {format_rate(queue.rate_limit, queue.rate_window)} reached")
            if why:
                reasons[run_id] = "; ".join(why)
        return reasons

    def run_steps(self, run_id: str) -> list[StepInfo]:
        """A run's journal: every step with its output or error and attempts."""
        return self.store.run_steps(run_id)

    def events(
        self,
        *,
        run_id: str | None = None,
        agent_id: str | None = None,
        types: list[str] | None = None,
        after_seq: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events in append order, filtered by run, agent, type and time.

        ``types`` entries match exactly (``step.completed``) or by family (``step``);
        ``since``/``until`` bound the event time (inclusive / exclusive); ``after_seq``
        resumes a stream after the last event seen.
        """
        return self.store.list_events(
            run_id=run_id,
            agent_id=agent_id,
            types=types or [],
            after_seq=after_seq,
            since=since,
            until=until,
            limit=limit,
        )

    def timeline(self, run_id: str) -> list[Event]:
        """Everything that happened to one run, in order."""
        self.store.get_run(run_id)
        return self.store.list_events(run_id=run_id)

    def cancel(self, run_id: str, reason: str = "", actor: str | None = None) -> RunInfo:
        """Cancel an unfinished run and its children; a worker stops it at its next step."""
        reason = codec.check_text("reason", reason or "cancelled")
        return self.store.cancel_run(run_id, reason, _actor(actor))

    def retry_run(self, run_id: str, actor: str | None = None, comment: str = "") -> Incident:
        """Retry a run that needs attention (resolves its open incident with ``retry``)."""
        open_ = self.store.list_incidents(status="open", run_id=run_id)
        if not open_:
            info = self.store.get_run(run_id)
            raise Refused(
                f"run {run_id} is {info.status.value} with no open incident; only a run that "
                "needs attention can be retried (fork a finished run instead)"
            )
        return self.resolve_incident(open_[0].incident_id, "retry", actor=actor, comment=comment)

    # -- messages -------------------------------------------------------------------------

    def send(
        self,
        to: str,
        payload: Any = None,
        *,
        topic: str | None = None,
        key: str | None = None,
        sender: str | None = None,
    ) -> str:
        """Send a message to agent ``to`` from outside a run; returns its id. With ``key``, a
        repeat (the same key, the same recipient) stores nothing new and returns the first
        message's id. Refused if ``to`` does not exist or is terminated."""
        from tether.messaging import topic_of

        codec.check_text("recipient", to, MAX_ID_LENGTH)
        ids, _ = self.store.send_message(
            to, topic_of(topic), self._message_key(key), codec.check(payload, "payload"), sender
        )
        return ids[0]

    def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        key: str | None = None,
        sender: str | None = None,
    ) -> list[str]:
        """Send one copy of a message to every agent subscribed to ``topic`` now; returns the
        message ids (one per subscriber)."""
        from tether.messaging import topic_of

        ids, _ = self.store.send_message(
            None, topic_of(topic), self._message_key(key), codec.check(payload, "payload"), sender
        )
        return ids

    def _message_key(self, key: str | None) -> str:
        if key is None:
            import uuid

            return f"app:{uuid.uuid4().hex}"
        return codec.check_text("key", key, MAX_ID_LENGTH)

    def subscribe(self, agent_id: str, topic: str) -> bool:
        """Subscribe an agent to a topic (it receives what is published from now on); False
        if it already was. Agent types can declare ``subscriptions`` instead."""
        from tether.messaging import topic_of

        return self.store.subscribe(agent_id, topic_of(topic))

    def unsubscribe(self, agent_id: str, topic: str) -> bool:
        """End an agent's subscription to a topic; False if it had none."""
        return self.store.unsubscribe(agent_id, topic)

    def messages(
        self,
        *,
        agent_id: str | None = None,
        topic: str | None = None,
        pending: bool = False,
        limit: int | None = 100,
    ) -> list[MessageInfo]:
        """Messages, newest first: to an agent, on a topic, or only those not consumed yet."""
        return [
            MessageInfo.from_row(row)
            for row in self.store.list_messages(agent_id, topic, pending, limit)
        ]

    # -- approvals ------------------------------------------------------------------------

    def approvals(
        self,
        *,
        status: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = 100,
    ) -> list[ApprovalInfo]:
        """Approvals and questions, newest first: ``status`` is pending, approved, rejected,
        answered, or withdrawn (its run ended before anyone decided)."""
        if status is not None and status not in APPROVAL_STATUSES:
            raise ConfigurationError(
                f"unknown approval status {status!r}; use one of {', '.join(APPROVAL_STATUSES)}"
            )
        return self.store.list_approvals(
            status=status, agent_id=agent_id, run_id=run_id, limit=limit
        )

    def get_approval(self, approval_id: str) -> ApprovalInfo:
        """One approval, with its data, digest, schema, deadline, default and decision."""
        return self.store.get_approval(approval_id)

    def decide(
        self,
        approval_id: str,
        approve: bool = True,
        *,
        comment: str | None = None,
        data: Any = None,
        digest: str | None = None,
        actor: str | None = None,
    ) -> ApprovalInfo:
        """Decide an approval (or answer a question: ``data`` is the answer) once, and wake
        the run waiting for it. ``digest`` is the digest of the data the decider saw: a
        different one is refused (``Refused``). ``data`` edits the data (validated against
        the approval's schema; ``InvalidInput`` otherwise). The same decision again returns
        the stored one; a different one raises ``ConflictError``. ``actor`` is who decides
        (the caller's identity: the CLI passes the OS user, the server the token's name)."""
        from tether.approvals import decision_check

        if comment is not None:
            codec.check_text("comment", comment, 10_000)
        check = decision_check(approval_id, approve, data)
        found, _ = self.store.decide_approval(
            approval_id,
            approved=bool(approve),
            comment=comment,
            actor=_actor(actor),
            digest=digest,
            check=check,
        )
        return found

    def wait_for_approval(self, approval_id: str, timeout: float | None = None) -> ApprovalInfo:
        """Block until the approval is decided; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self.store.get_approval(approval_id)
            if found.status != "pending":
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"approval {approval_id} is still pending after {timeout}s")
            time.sleep(0.1)

    # -- incidents ------------------------------------------------------------------------

    def incidents(
        self, *, status: str | None = None, run_id: str | None = None, limit: int | None = None
    ) -> list[Incident]:
        """Incidents, newest first."""
        if status is not None and status not in ("open", "resolved"):
            raise ConfigurationError(f"unknown incident status {status!r}; use open or resolved")
        return self.store.list_incidents(status=status, run_id=run_id, limit=limit)

    def get_incident(self, incident_id: str) -> Incident:
        """One incident."""
        return self.store.get_incident(incident_id)

    def resolve_incident(
        self,
        incident_id: str,
        action: str,
        *,
        output: Any = None,
        actor: str | None = None,
        comment: str = "",
    ) -> Incident:
        """A person's decision: ``retry`` the step, ``skip`` it with ``output``, or ``abort``."""
        if action not in ("retry", "skip", "abort"):
            raise ConfigurationError(f"unknown action {action!r}; use retry, skip or abort")
        doc = codec.check(output, "output")
        return self.store.resolve_incident(
            incident_id,
            action,
            output=doc,
            actor=_actor(actor),
            comment=codec.check_text("comment", comment),
        )

    # -- workers --------------------------------------------------------------------------

    def worker(self, *, concurrency: int = 4, poll_interval: float | None = None) -> Worker:
        """A worker for this app's agent types (call ``.run()`` on it)."""
        from tether.engine.worker import Worker

        if not self._types:
            raise ConfigurationError(
                "this app has no agent types registered; a worker needs code to run "
                "(register agent types, or pass --app module:attr)"
            )
        store = self.store
        # A worker starting declares its types again: the code it runs is what counts.
        store.declare_types([_declaration(cls) for cls in self._types.values()])
        periodic: list[tuple[float, Callable[[], object]]] = [(30.0, store.db.wal_checkpoint)]
        if self.retention.interval:
            periodic.append((self.retention.interval, self.gc))
        return Worker(
            store,
            sorted(self._types),
            run_sync=self._execute,
            run_async=self._execute_async,
            is_async=self._is_async,
            concurrency=concurrency,
            lease_ttl=self.lease_ttl,
            periodic=periodic,
            poll_interval=poll_interval
            if poll_interval is not None
            else (0.5 if store.dialect == "postgresql" else 0.1),
            outage_limit=self.outage_limit,
            clock=self.clock,
            announcements=self.announcements,
        )

    def work(
        self,
        *,
        until_idle: bool = False,
        concurrency: int = 4,
        timeout: float | None = None,
    ) -> int:
        """Run a worker in this process. ``until_idle`` returns once nothing can progress
        without a person (timers are waited for). Returns the number of executions."""
        return self.worker(concurrency=concurrency).run(until_idle=until_idle, timeout=timeout)

    def recover_runs(self) -> list[str]:
        """Make claimable now every run whose worker died: its lease expired, or its process
        on this host no longer exists. Returns their ids; a worker then resumes them."""
        from tether.engine.worker import recover

        return recover(self.store)

    def _execution(self, claim: Claim, link: WorkerLink) -> Any:
        from tether.engine.executor import Execution

        return Execution(
            self.store,
            claim,
            self._types[claim.agent_type],
            self._settings,
            lease=link.lease(claim),
            should_stop=link.should_stop,
            next_claim=link.next_claim,
        )

    def _execute(self, claim: Claim, link: WorkerLink) -> list[Claim]:
        from tether.context import execute

        execution = self._execution(claim, link)
        execute(execution, self._types[claim.agent_type], claim.input)
        return list(execution.follow_ups)

    async def _execute_async(self, claim: Claim, link: WorkerLink) -> list[Claim]:
        from tether.context import execute_async

        execution = self._execution(claim, link)
        await execute_async(execution, self._types[claim.agent_type], claim.input)
        return list(execution.follow_ups)

    def _is_async(self, claim: Claim) -> bool:
        cls = self._types[claim.agent_type]
        return inspect.iscoroutinefunction(
            cls.handle if claim.message_seq is None else cls.on_message
        )

    # -- checkpoints, restore, fork, history ----------------------------------------------

    def checkpoint(self, agent_id: str, name: str, actor: str | None = None) -> Checkpoint:
        """Snapshot the agent's current state under ``name``."""
        _check_name(name)
        return self.store.create_checkpoint(agent_id, name, _actor(actor))

    def list_checkpoints(
        self, agent_id: str | None = None, limit: int | None = None
    ) -> list[Checkpoint]:
        """Checkpoints, newest first."""
        return self.store.list_checkpoints(agent_id, limit)

    def get_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """One checkpoint with its state."""
        return self.store.get_checkpoint(checkpoint_id)

    def restore(
        self,
        checkpoint_id: str,
        *,
        pause: bool = False,
        wait: float = 30.0,
        actor: str | None = None,
    ) -> AgentInfo:
        """Make a checkpoint's state current, as a new state version.

        Refused while the agent has a run in progress, unless ``pause``: then the agent is
        paused first (its runs stop at their next step boundary, waited for up to ``wait``
        seconds) and stays paused; resume it when ready.
        """
        who = _actor(actor)
        ckpt = self.store.get_checkpoint(checkpoint_id)
        if pause:
            info = self.store.get_agent(ckpt.agent_id)
            if info.lifecycle == LifecycleState.ACTIVE:
                self.pause(ckpt.agent_id, reason=f"restore {checkpoint_id}", actor=who)
            deadline = time.monotonic() + wait
            while self.store.runs_held(ckpt.agent_id) and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.store.restore_checkpoint(checkpoint_id, who)

    def fork(
        self, run_id: str, from_step: int, task: Any = None, *, budget: str = "fresh"
    ) -> RunHandle:
        """A new run that reuses ``run_id``'s journal up to ``from_step`` and executes the
        rest afresh (with the same task, or ``task``). The original run is not touched.

        ``budget``: ``fresh`` (the fork's usage starts at zero against its own budget) or
        ``inherit`` (it is also charged to the original's budget, which holds what the
        original used)."""
        if budget not in FORK_BUDGETS:
            raise ConfigurationError(
                f"fork budget={budget!r}; choose one of {', '.join(FORK_BUDGETS)}"
            )
        agent_id, original_task, state_version = self.store.fork_point(run_id, from_step)
        doc = original_task if task is None else codec.check(task, "task")
        original = self.store.run_limits(run_id)
        limits = {k: v for k, v in original.items() if k in ("budget", "policy")}
        if budget == "inherit":
            limits["holders"] = [run_id, *original.get("holders", ())]
        run, _ = self.store.submit_run(
            agent_id,
            doc,
            task_id=None,
            priority=0,
            max_concurrent=self._max_concurrent(agent_id),
            forked_from=run_id,
            forked_at_step=from_step,
            copy_journal_to=from_step,
            state_version=state_version,
            limits=limits or None,
        )
        return RunHandle(self, run.run_id)

    def state_diff(self, agent_id: str, version: int, other: int) -> list[dict[str, Any]]:
        """What changed in the agent's state from ``version`` to ``other``, as operations
        ``{"op": "add" | "remove" | "replace", "path": JSON pointer, "from": ..., "to": ...}``."""
        before = self.get_state(agent_id, version).state
        after = self.get_state(agent_id, other).state
        return json_diff(before, after)

    def gc(self, retention: Retention | None = None, *, dry_run: bool = False) -> GcReport:
        """Apply the retention policy now; returns what was (or would be) removed."""
        policy = retention or self.retention
        now = self.clock()

        def cutoff(seconds: float | None) -> dt.datetime | None:
            return None if seconds is None else now - dt.timedelta(seconds=seconds)

        return self.store.collect_garbage(
            runs_before=cutoff(policy.finished_runs_older_than),
            events_before=cutoff(policy.events_older_than),
            keep_state_versions=policy.keep_state_versions,
            dry_run=dry_run,
        )


FORK_BUDGETS = ("fresh", "inherit")
"""Whose budget a fork's steps are charged to (``App.fork(..., budget=)``)."""


def _limits(budget: Any, policy: Any) -> dict[str, Any] | None:
    """A run's own budget and policy as stored with it, checked."""
    doc: dict[str, Any] = {}
    if budget is not None:
        doc["budget"] = Budget.from_doc(budget, "the run's budget").to_doc()
    if policy is not None:
        doc["policy"] = Policy.from_doc(policy, "the run's policy").to_doc()
    return doc or None


def _declaration(cls: type[Agent]) -> TypeDeclaration:
    """What the registry (``agent_types``) keeps of an agent type for other processes."""
    from tether.store.types import TypeDeclaration

    claims, window = parse_rate(cls.rate_limit) if cls.rate_limit else (None, None)
    return TypeDeclaration(
        cls.type,
        cls.max_concurrent_runs,
        cls.type_concurrency,
        claims,
        window,
        mailbox=has_mailbox(cls),
    )


def json_diff(before: Any, after: Any, path: str = "") -> list[dict[str, Any]]:
    """The operations turning ``before`` into ``after`` (objects recursively, else replace)."""
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict[str, Any]] = []
        for key in sorted(before.keys() | after.keys()):
            where = f"{path}/{key.replace('~', '~0').replace('/', '~1')}"
            if key not in after:
                ops.append({"op": "remove", "path": where, "from": before[key]})
            elif key not in before:
                ops.append({"op": "add", "path": where, "to": after[key]})
            else:
                ops.extend(json_diff(before[key], after[key], where))
        return ops
    if before == after and type(before) is type(after):
        return []
    return [{"op": "replace", "path": path or "/", "from": before, "to": after}]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_ID_LENGTH:
        raise ConfigurationError("a checkpoint name must be a non-empty string of at most 255")
    codec.check_text("checkpoint name", name, MAX_ID_LENGTH)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _run_status(value: str) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        known = ", ".join(s.value for s in RunStatus)
        raise ConfigurationError(f"unknown run status {value!r}; known: {known}") from None


def _lifecycle_state(value: str) -> LifecycleState:
    try:
        return LifecycleState(value)
    except ValueError:
        known = ", ".join(s.value for s in LifecycleState)
        raise ConfigurationError(f"unknown lifecycle state {value!r}; known: {known}") from None


class RunHandle:
    """A submitted run: its id, and a way to wait for its outcome."""

    def __init__(self, app: App, run_id: str) -> None:
        self.app = app
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    def info(self) -> RunInfo:
        """The run as stored now."""
        return self.app.get_run(self.run_id)

    def status(self) -> RunStatus:
        """The run's status now."""
        return self.info().status

    def result(self, timeout: float | None = None, poll: float = 0.05) -> Any:
        """Wait until the run finishes and return its result.

        Raises ``RunFailed`` if it failed or was cancelled, and ``TimeoutError`` if it has not
        finished within ``timeout`` seconds (a run that needs a person keeps waiting).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            info = self.info()
            if info.status == RunStatus.COMPLETED:
                return info.result
            if info.status.is_final:
                raise RunFailed(self.run_id, info.status.value, (info.error or {}).get("message"))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {self.run_id} is still {info.status.value} after {timeout:g}s"
                )
            time.sleep(
                delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            )
            delay = min(1.0, delay * 1.5)
