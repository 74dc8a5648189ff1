"""``tether messages`` and ``tether runs tree`` on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

import tether
from tests.clikit import cli_invoker, error_line, ok
from tether.testing import active_agent


def seeded(db_url: str) -> tether.App:
    """An app with a listener agent and a boss whose run delegates to two children."""
    app = tether.App(db_url)

    @app.agent("listener")
    def listener(ctx: tether.RunContext, task: Any) -> Any:
        return None

    @app.agent("boss")
    def boss(ctx: tether.RunContext, task: Any) -> Any:
        return ctx.wait([ctx.spawn("l1", 1), ctx.spawn("l2", 2)])

    active_agent(app, "listener", "l1")
    active_agent(app, "listener", "l2")
    active_agent(app, "boss", "b1")
    return app


def test_messages_are_sent_published_and_listed(db_url: str) -> None:
    app = seeded(db_url)
    tether_ = cli_invoker("--db", db_url)
    try:
        message_id = ok(tether_("messages", "send", "l1", '{"hello": "world"}')).strip()
        ok(tether_("messages", "subscribe", "l1", "news"))
        ok(tether_("messages", "subscribe", "l2", "news"))
        published = ok(tether_("messages", "publish", "news", '"extra"')).split()

        listed = json.loads(ok(tether_("messages", "list", "--agent", "l1", "-o", "json")))
        assert [m["message_id"] for m in listed][-1] == message_id
        assert {m["payload"] for m in listed if m["topic"] == "news"} == {"extra"}
        assert len(published) == 2
        pending = ok(tether_("messages", "list", "--pending", "-o", "ids")).split()
        assert set(pending) == {message_id, *published}
    finally:
        app.close()


def test_a_message_to_a_missing_agent_is_refused_in_one_line(db_url: str) -> None:
    app = seeded(db_url)
    try:
        result = cli_invoker("--db", db_url)("messages", "send", "nobody", "1")
        assert result.exit_code == 4
        assert "agent 'nobody' not found" in error_line(result)
        assert app.messages() == []
    finally:
        app.close()


def test_runs_tree_shows_a_run_and_the_runs_it_started(db_url: str) -> None:
    app = seeded(db_url)
    tether_ = cli_invoker("--db", db_url)
    try:
        run = app.submit("b1")
        app.work(until_idle=True, timeout=30)
        assert run.result(timeout=1) == [None, None]

        lines = ok(tether_("runs", "tree", run.run_id)).splitlines()
        assert lines[0].startswith(f"{run.run_id}  b1  completed")
        assert sorted(line.split()[-2:] for line in lines[1:]) == [
            ["l1", "completed"],
            ["l2", "completed"],
        ]
        tree = json.loads(ok(tether_("runs", "tree", run.run_id, "--json")))
        assert [c["parent_run_id"] for c in tree["children"]] == [run.run_id, run.run_id]
    finally:
        app.close()
