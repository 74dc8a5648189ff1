"""Messages between agents, on both databases, for sync and async handlers: sent exactly once
(even when the sending run replays), received in order and exactly once, topics with one copy
per subscriber, timeouts, and clear refusals."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import pytest

import tether
from tests.flavors import register, register_mailbox
from tether.testing import FakeClock, active_agent, work_until
from tether.types import RunStatus

WORK = {"until_idle": True, "timeout": 30.0}


def listener(app: tether.App, flavor: str, name: str = "listener", **options: Any) -> None:
    """An agent type whose runs receive ``task["count"]`` messages (of ``task["topic"]``)."""

    def handler(ctx: Any, task: Any) -> Any:
        got = []
        for _ in range(task.get("count", 1)):
            message = yield ctx.receive(task.get("topic"), timeout=task.get("timeout"))
            got.append(None if message is None else [message.payload, message.sender_agent])
        return got

    register(app, flavor, name, handler, **options)


def test_a_message_sent_from_a_run_is_received_once_in_order(app: tether.App, flavor: str) -> None:
    def sender(ctx: Any, task: Any) -> Any:
        ids = []
        for n in range(3):
            ids.append((yield ctx.send("inbox", {"n": n})))
        return ids

    register(app, flavor, "sender", sender)
    listener(app, flavor)
    active_agent(app, "sender", "s1")
    active_agent(app, "listener", "inbox")
    receiving = app.submit("inbox", {"count": 3})
    sending = app.submit("s1")
    app.work(**WORK)

    assert receiving.result(timeout=1) == [[{"n": 0}, "s1"], [{"n": 1}, "s1"], [{"n": 2}, "s1"]]
    ids = sending.result(timeout=1)
    stored = app.messages(agent_id="inbox")
    assert sorted(m.message_id for m in stored) == sorted(ids)
    assert {m.consumed_by for m in stored} == {receiving.run_id}
    assert sorted(m.consumed_seq for m in stored) == [1, 2, 3]


def test_a_receive_that_finds_nothing_waits_holding_nothing_until_a_message_comes(
    app: tether.App, flavor: str
) -> None:
    listener(app, flavor)
    active_agent(app, "listener", "inbox")
    run = app.submit("inbox", {"topic": "jobs"})
    work_until(app, lambda: run.status() == RunStatus.WAITING)
    assert app.get_run(run.run_id).owner is None

    app.send("inbox", "not this topic")
    app.send("inbox", {"job": 7}, topic="jobs")
    app.work(**WORK)

    assert run.result(timeout=1) == [[{"job": 7}, None]]
    [direct] = app.messages(agent_id="inbox", pending=True)
    assert direct.payload == "not this topic" and direct.topic is None


def test_a_receive_times_out_with_none_on_the_apps_clock(db_url: str, flavor: str) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)
    try:
        listener(app, flavor)
        active_agent(app, "listener", "inbox")
        run = app.submit("inbox", {"timeout": 60})
        work_until(app, lambda: run.status() == RunStatus.WAITING)
        assert app.get_run(run.run_id).wake_at == clock() + dt.timedelta(seconds=60)
        clock.advance(60)
        app.work(**WORK)
        assert run.result(timeout=1) == [None]
        app.send("inbox", "late")  # after the timeout: left for the next receive
        assert [m.payload for m in app.messages(agent_id="inbox", pending=True)] == ["late"]
    finally:
        app.close()


def test_a_send_replayed_after_a_crash_stores_the_message_once(db_url: str, flavor: str) -> None:
    app = tether.App(db_url, lease_ttl=0.5)
    calls = Counter[str]()

    class Crash(BaseException):
        pass

    def boom() -> None:
        calls["boom"] += 1
        if calls["boom"] == 1:
            raise Crash  # the worker's thread dies right after the send was committed

    def sender(ctx: Any, task: Any) -> Any:
        message_id = yield ctx.send("inbox", "hello")
        yield ctx.step(boom, name="boom")
        return message_id

    try:
        register(app, flavor, "sender", sender)
        listener(app, flavor)
        active_agent(app, "sender", "s1")
        active_agent(app, "listener", "inbox")
        run = app.submit("s1")
        app.work(**WORK)
        assert calls["boom"] == 2  # the run was executed again after the crash
        [message] = app.messages(agent_id="inbox")
        assert run.result(timeout=1) == message.message_id
    finally:
        app.close()


def test_a_key_used_again_for_the_same_recipient_stores_nothing_new(app: tether.App) -> None:
    listener(app, "sync")
    active_agent(app, "listener", "inbox")
    active_agent(app, "listener", "other")

    first = app.send("inbox", 1, key="order-42")
    again = app.send("inbox", 2, key="order-42")
    elsewhere = app.send("other", 3, key="order-42")

    assert again == first and elsewhere != first
    assert [m.payload for m in app.messages(agent_id="inbox")] == [1]


def test_publish_delivers_one_copy_to_each_subscriber_at_the_time(
    app: tether.App, flavor: str
) -> None:
    def announcer(ctx: Any, task: Any) -> Any:
        return (yield ctx.publish("news", {"headline": task}))

    register(app, flavor, "announcer", announcer)
    listener(app, flavor)
    for agent_id in ("r1", "r2", "r3"):
        active_agent(app, "listener", agent_id)
    for agent_id in ("r1", "r2"):
        assert app.subscribe(agent_id, "news")
    assert not app.subscribe("r1", "news")  # already
    active_agent(app, "announcer", "a1")

    published = app.submit("a1", "first")
    app.work(**WORK)
    assert published.result(timeout=1) == 2
    app.subscribe("r3", "news")  # a late subscriber gets nothing published before

    runs = {a: app.submit(a, {"topic": "news", "timeout": 0}) for a in ("r1", "r2", "r3")}
    app.work(**WORK)

    assert runs["r1"].result(timeout=1) == [[{"headline": "first"}, "a1"]]
    assert runs["r2"].result(timeout=1) == [[{"headline": "first"}, "a1"]]
    assert runs["r3"].result(timeout=1) == [None]


def test_an_agent_type_declares_its_subscriptions(app: tether.App) -> None:
    class Reader(tether.Agent):
        type = "reader"
        subscriptions = ("news",)

        def handle(self, ctx: tether.RunContext, task: Any) -> Any:
            message = ctx.receive("news", timeout=0)
            return message.payload if message else None

    app.register(Reader)
    active_agent(app, "reader", "reader1")
    assert app.publish("news", "hi") != []
    run = app.submit("reader1")
    app.work(**WORK)
    assert run.result(timeout=1) == "hi"


@pytest.mark.parametrize("lifecycle", ["missing", "terminated"])
def test_a_message_to_an_agent_that_cannot_receive_is_refused_and_nothing_is_written(
    app: tether.App, flavor: str, lifecycle: str
) -> None:
    listener(app, flavor)
    if lifecycle == "terminated":
        active_agent(app, "listener", "gone")
        app.terminate("gone")
    outcome: dict[str, Any] = {}

    def sender(ctx: Any, task: Any) -> Any:
        try:
            yield ctx.send("gone", "hello?")
        except (tether.NotFound, tether.Refused) as exc:
            outcome["error"] = type(exc).__name__
            outcome["message"] = str(exc)
        return "went on"

    register(app, flavor, "sender", sender)
    active_agent(app, "sender", "s1")
    run = app.submit("s1")
    app.work(**WORK)

    assert run.result(timeout=1) == "went on"
    assert "gone" in outcome["message"]
    assert app.messages() == []
    with pytest.raises((tether.NotFound, tether.Refused)):
        app.send("gone", "from outside")


def test_two_runs_waiting_for_one_message_one_takes_it_and_the_other_waits_on(
    db_url: str, flavor: str
) -> None:
    clock = FakeClock()
    app = tether.App(db_url, clock=clock)
    try:
        listener(app, flavor, max_concurrent_runs=2)
        active_agent(app, "listener", "inbox")
        runs = [app.submit("inbox", {"timeout": 60}) for _ in range(2)]
        work_until(app, lambda: all(r.status() == RunStatus.WAITING for r in runs))

        app.send("inbox", "only one")
        work_until(app, lambda: any(r.status() == RunStatus.COMPLETED for r in runs))
        clock.advance(60)
        app.work(**WORK)

        results = sorted((r.result(timeout=1) for r in runs), key=str)
        assert results == [[None], [["only one", None]]]
        [message] = app.messages(agent_id="inbox")
        assert message.consumed_by in {r.run_id for r in runs}
    finally:
        app.close()


# -- an agent's mailbox -------------------------------------------------------------------


def mailbox(app: tether.App, flavor: str, **attributes: Any) -> None:
    """``inbox``: an agent whose mailbox records each message's payload in its state, and
    whose ordinary runs receive one message."""

    def on_message(ctx: Any, message: tether.Message) -> Any:
        seen = yield ctx.step(lambda: message.payload, name="handle")
        ctx.state.setdefault("seen", []).append(seen)
        return {"payload": seen, "topic": message.topic, "from": message.sender_agent}

    def handle(ctx: Any, task: Any) -> Any:
        message = yield ctx.receive(task.get("topic"))
        return {"received": message.payload}

    register_mailbox(app, flavor, "mailbox", on_message, handle, **attributes)
    active_agent(app, "mailbox", "inbox")


def test_a_message_no_receive_takes_starts_a_mailbox_run_that_consumes_it(
    app: tether.App, flavor: str
) -> None:
    mailbox(app, flavor)

    def sender(ctx: Any, task: Any) -> Any:
        return (yield ctx.send("inbox", {"n": 1}))

    register(app, flavor, "sender", sender)
    active_agent(app, "sender", "s1")
    outside = app.send("inbox", {"n": 0})
    inside = app.submit("s1")
    app.work(**WORK)

    sent = inside.result(timeout=1)
    stored = {m.message_id: m for m in app.messages(agent_id="inbox")}
    assert set(stored) == {outside, sent}
    runs = {r.run_id: r for r in app.store.list_runs(agent_id="inbox")}
    assert sorted(m.consumed_by for m in stored.values()) == sorted(runs)  # one run each
    assert {m.consumed_seq for m in stored.values()} == {0}
    results = sorted(r.result["payload"]["n"] for r in runs.values())
    assert results == [0, 1]
    assert runs[stored[sent].consumed_by].result["from"] == "s1"
    assert runs[stored[outside].consumed_by].result["from"] is None
    assert app.get_agent("inbox").state["seen"] == [{"n": 0}, {"n": 1}]
    submitted = [e for e in app.events(types=["run.submitted"]) if e.run_id in runs]
    assert sorted(e.data["message_id"] for e in submitted) == sorted(stored)


def test_a_waiting_receive_takes_the_message_before_the_mailbox(
    app: tether.App, flavor: str
) -> None:
    mailbox(app, flavor)
    waiting = app.submit("inbox", {"topic": "jobs"})
    work_until(app, lambda: waiting.status() == RunStatus.WAITING)

    app.send("inbox", {"job": 1}, topic="jobs")  # the waiting run takes it
    app.send("inbox", {"job": 2}, topic="jobs")  # nobody waits: the mailbox starts a run
    app.work(**WORK)

    assert waiting.result(timeout=1) == {"received": {"job": 1}}
    others = [r for r in app.store.list_runs(agent_id="inbox") if r.run_id != waiting.run_id]
    assert [r.result for r in others] == [{"payload": {"job": 2}, "topic": "jobs", "from": None}]


def test_a_mailbox_runs_one_message_at_a_time_in_order_and_each_once(
    app: tether.App, flavor: str
) -> None:
    mailbox(app, flavor)
    app.subscribe("inbox", "news")
    for n in range(5):
        app.send("inbox", {"n": n})
    app.publish("news", {"n": 5})
    app.send("inbox", {"n": 0}, key="first")
    app.send("inbox", {"n": 99}, key="first")  # the same key: nothing new, no run
    app.work(**WORK)

    runs = app.store.list_runs(agent_id="inbox")
    assert len(runs) == 7
    assert {r.status for r in runs} == {RunStatus.COMPLETED}
    # One run at a time (max_concurrent_runs=1), oldest message first.
    seen = app.get_agent("inbox").state["seen"]
    assert seen == [{"n": n} for n in range(6)] + [{"n": 0}]
    assert app.messages(agent_id="inbox", pending=True) == []


def test_a_mailbox_run_replayed_after_a_crash_handles_its_message_once(db_url: str) -> None:
    """A worker loses its lease in the middle of a mailbox run: the run is claimed again and
    gets the same message from its input, and the step that finished is not run again."""
    calls: Counter[str] = Counter()

    class Crashy(tether.Agent):
        type = "crashy"

        def handle(self, ctx: Any, task: Any) -> Any:
            return None

        def on_message(self, ctx: Any, message: tether.Message) -> Any:
            first = ctx.step(lambda: calls.update(["first"]) or message.payload, name="first")
            if calls["second"] == 0:
                calls.update(["second"])
                raise tether.LeaseLost("the test drops the lease")  # as if the worker died
            return {"first": first, "id": message.message_id}

    app = tether.App(db_url, lease_ttl=0.5)
    try:
        app.register(Crashy)
        active_agent(app, "crashy", "c1")
        message_id = app.send("c1", {"n": 7})
        app.work(until_idle=True, timeout=30)
        [run] = app.store.list_runs(agent_id="c1")
        work_until(app, lambda: app.get_run(run.run_id).status == RunStatus.COMPLETED)
        assert app.get_run(run.run_id).result == {"first": {"n": 7}, "id": message_id}
        assert calls == Counter(first=1, second=1)
        assert app.get_run(run.run_id).attempts == 2
    finally:
        app.close()
