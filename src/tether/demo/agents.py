"""The agent types of ``tether demo``, importable by a worker in another process::

    tether worker --app tether.demo.agents:app --db sqlite:///tether.db

Their tools misbehave on purpose, and deterministically: how a tool behaves depends only on
the run and on ``tether.current_step().attempt``, never on a counter in this process, so a run
behaves the same whichever worker process executes it (``tether demo --crash`` kills one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import tether
from tether.agent import Agent, HookContext
from tether.context import RunContext

FLAKY_FAILURES = 2
"""``search_web`` drops the connection on this many attempts before it answers."""

SLOW_FIRST_ATTEMPT = 0.6
"""Seconds ``fetch_pages`` takes on its first attempt (its deadline is ``FETCH_TIMEOUT``)."""

FETCH_TIMEOUT = 0.25
"""The first deadline of ``fetch_pages``; the timeout strategy doubles it for the next attempt."""

CRAWL_DELAY = 0.5
"""Seconds the researcher waits (durably) between fetching and reading, to be polite."""

SECOND_OPINION_DELAY = 0.8
"""Seconds the reviewer waits (durably) before scoring."""

PROGRESS = "progress"
"""The topic on which a worker reports progress to the coordinator."""

BRIEF = "brief"
"""The topic on which the coordinator briefs the writer."""

APPROVAL_TIMEOUT = 60.0
"""Seconds the coordinator waits for a person to approve publishing before the default
(reject) applies; ``task["approval_timeout"]`` overrides it."""

FAST_RETRY = tether.Retry(max_attempts=5, initial_delay=0.1, backoff_factor=2.0, max_delay=1.0)
"""Short delays, so the demo takes seconds: 0.1s, then 0.2s, ... (with jitter)."""

WEB_SEARCH = "web_search"
"""The tool the researcher's searches call; each call is paid for."""

SEARCH_COST = 0.01
"""What one web search costs, declared on its step (``tool=WEB_SEARCH, cost=SEARCH_COST``)."""

FOLLOW_UPS = ("crash recovery", "exactly once", "human approval")
"""The narrower searches the researcher makes after the first one, one step each."""

RESEARCH_BUDGET = tether.Budget(max_cost=0.03, warn_at=0.5, on_breach="pause")
"""What the coordinator gives the researcher's run (``ctx.spawn(..., budget=)``): three
searches' worth, so the fourth search does not start; the run waits until a person raises
the limit."""

SHELL = "shell"
"""A tool the researcher's policy denies: a step calling it never starts."""


# -- tools: what the steps call ------------------------------------------------------------


def search_web(topic: str) -> list[str]:
    """A search API that drops the connection on the first attempts (a network error)."""
    attempt = tether.current_step().attempt
    if attempt <= FLAKY_FAILURES:
        raise ConnectionError(f"connection reset by search.example (attempt {attempt})")
    return [f"https://example.org/{topic.replace(' ', '-')}/{n}" for n in (1, 2, 3)]


def search_deeper(query: str) -> list[str]:
    """A narrower search (the connection holds by now): its top hit."""
    return [f"https://example.org/{query.replace(' ', '-')}"]


def fetch_pages(urls: list[str]) -> list[dict[str, Any]]:
    """A slow fetch: the first attempt overruns its deadline, the next one is quick. The
    last page is a scanned PDF."""
    time.sleep(SLOW_FIRST_ATTEMPT if tether.current_step().attempt == 1 else 0.05)
    last = len(urls) - 1
    return [{"url": url, "words": 400 + 50 * n, "scanned": n == last} for n, url in enumerate(urls)]


def ocr_pdf(url: str) -> str:
    """Read a scanned PDF with an OCR command line (the researcher's policy never lets it
    run)."""
    raise RuntimeError(f"ocr {url}: the policy was supposed to deny the shell")


def extract_facts(pages: list[dict[str, Any]]) -> list[str]:
    """A parser that meets a page it cannot read: no retry helps, a person must decide."""
    raise ValueError(f"page {pages[-1]['url']} has no readable text (a scanned PDF)")


def write_section(title: str, sources: int) -> str:
    """Draft one section (quick and reliable)."""
    time.sleep(0.05)
    return f"{title}: a draft built on {sources} sources"


def check_claims(sections: int) -> dict[str, Any]:
    """Check a draft's claims (quick and reliable)."""
    time.sleep(0.05)
    return {"sections": sections, "claims_checked": 3 * sections}


def publish_report(report: dict[str, Any]) -> dict[str, Any]:
    """Publish the report: the action a person must approve first (quick and reliable)."""
    time.sleep(0.05)
    slug = "-".join(report["title"].lower().replace(":", " ").replace(",", " ").split())
    return {"title": report["title"], "url": f"https://reports.example.org/{slug}"}


def report_schema(report: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema an approver's edit of ``report`` must satisfy: only its title may
    change (3 to 80 characters); everything else must stay as it is."""
    fixed = {key: {"const": value} for key, value in report.items() if key != "title"}
    return {
        "type": "object",
        "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 80}, **fixed},
        "required": sorted(report),
        "additionalProperties": False,
    }


def append_effect(path: str, seq: int, seconds: float) -> dict[str, Any]:
    """A side effect outside the database: one line per execution, then some work."""
    step = tether.current_step()
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{step.run_id} {seq} {os.getpid()} {step.attempt}\n")
    time.sleep(seconds)
    return {"seq": seq, "pid": os.getpid(), "key": step.idempotency_key}


# -- agent types ---------------------------------------------------------------------------


class DemoAgent(Agent):
    """The demo's base type: hooks that record what happened to the agent in its state."""

    type = "demo"
    retry = FAST_RETRY

    def on_initialize(self, ctx: HookContext) -> None:
        """Give the agent its first state: its role and an empty notebook."""
        ctx.state["role"] = self.config.get("role", "assistant")
        ctx.state["notes"] = []

    def on_activate(self, ctx: HookContext) -> None:
        """Count activations, to show state versions growing with the lifecycle."""
        ctx.state["activations"] = int(ctx.state.get("activations", 0)) + 1

    def handle(self, ctx: RunContext, task: Any) -> Any:
        """Echo the task."""
        return {"echo": task}


class Researcher(DemoAgent):
    """Searches (flaky, then paid searches until its budget runs out), fetches (slow), waits
    (durably), tries to OCR a scanned page (its policy denies the shell), then extracts facts
    (fails)."""

    type = "demo-researcher"
    policy = tether.Policy(denied_tools=frozenset({SHELL}))

    def handle(self, ctx: RunContext, task: Any) -> Any:
        """Research ``task["topic"]``."""
        topic = task["topic"]
        urls = ctx.step(search_web, topic, tool=WEB_SEARCH, cost=SEARCH_COST)
        for angle in FOLLOW_UPS:  # each one spends from the budget the coordinator gave
            query = f"{topic} {angle}"
            name = f"search-{angle.replace(' ', '-')}"
            urls += ctx.step(search_deeper, query, name=name, tool=WEB_SEARCH, cost=SEARCH_COST)
        pages = ctx.step(fetch_pages, urls, timeout=FETCH_TIMEOUT)
        ctx.state["notes"].append(f"fetched {len(pages)} pages on {task['topic']}")
        if task.get("report_to"):  # tell the coordinator how many sources there are
            progress = {"sources": len(pages), "note": f"fetched {len(pages)} pages"}
            ctx.send(task["report_to"], progress, topic=PROGRESS)
        ctx.sleep(CRAWL_DELAY)
        for page in pages:
            if page["scanned"]:
                try:
                    ctx.step(ocr_pdf, page["url"], tool=SHELL)
                except tether.PolicyDenied as exc:  # never started; a person must read it
                    ctx.state["notes"].append(f"not allowed to OCR {page['url']} ({exc.rule})")
        facts = ctx.step(extract_facts, pages)
        ctx.state["notes"].append(f"extracted {len(facts)} facts")
        return {"topic": task["topic"], "sources": len(pages), "facts": facts}


class Writer(DemoAgent):
    """Waits for a brief (a message: how many sources), then writes a few sections, one step
    each."""

    type = "demo-writer"

    def handle(self, ctx: RunContext, task: Any) -> Any:
        """Write the sections named in ``task["sections"]`` once the brief has come."""
        brief = ctx.receive(BRIEF)  # parks the run, holding nothing, until the brief comes
        sources = int(brief.payload["sources"]) if brief is not None else 0
        sections = [
            ctx.step(write_section, title, sources, name=f"write-{title}")
            for title in task["sections"]
        ]
        ctx.state["notes"].append(f"wrote {len(sections)} sections")
        return {"sections": sections}


class Reviewer(DemoAgent):
    """Waits for a draft published on ``task["drafts"]``, checks its claims, waits for a
    second opinion (a durable timer), then scores."""

    type = "demo-reviewer"

    def handle(self, ctx: RunContext, task: Any) -> Any:
        """Review the draft that comes on the topic ``task["drafts"]``."""
        draft = ctx.receive(task["drafts"])
        sections = len(draft.payload["sections"]) if draft is not None else 0
        checked = ctx.step(check_claims, sections)
        ctx.sleep(SECOND_OPINION_DELAY)
        verdict = ctx.step(lambda: "approved", name="score")
        return {**checked, "verdict": verdict}


class Coordinator(DemoAgent):
    """Fans the work out to a researcher, a writer and a reviewer (child runs), passes
    messages between them, gathers their results (fan-in), then asks a person before it
    publishes the report."""

    type = "demo-coordinator"

    def handle(self, ctx: RunContext, task: Any) -> Any:
        """Produce a reviewed report on ``task["topic"]`` with the agents of ``task["team"]``."""
        team = task["team"]
        research = ctx.spawn(
            team["researcher"],
            {"topic": task["topic"], "report_to": self.agent_id},
            budget=RESEARCH_BUDGET,
        )
        write = ctx.spawn(team["writer"], {"sections": task["sections"]})
        review = ctx.spawn(team["reviewer"], {"drafts": task["drafts"]})
        # The researcher reports its sources as soon as it has them (or ends without a word).
        ready = ctx.wait_any(tether.Receive(PROGRESS), research)
        if isinstance(ready.value, tether.Message):
            progress = ready.value.payload
        else:
            progress = {"sources": ready.value["sources"], "note": "ended without reporting"}
        ctx.send(
            team["writer"], {"topic": task["topic"], "sources": progress["sources"]}, topic=BRIEF
        )
        [draft] = ctx.wait([write])
        readers = ctx.publish(task["drafts"], draft)  # to every subscriber: the reviewer
        research_result, draft, review_result = ctx.wait([research, write, review])
        ctx.state["notes"].append(f"gathered {len(team)} results")
        report = {
            "title": f"{task['topic'].capitalize()}: a reviewed report",
            "sections": task["sections"],
            "sources": research_result["sources"],
            "verdict": review_result["verdict"],
        }
        # Publishing is for a person to approve; they may edit the title (the schema says how).
        decision = ctx.approve(
            "Publish the report?",
            data=report,
            schema=report_schema(report),
            timeout=task.get("approval_timeout", APPROVAL_TIMEOUT),
        )
        published = ctx.step(publish_report, decision.data, name="publish") if decision else None
        return {
            "topic": task["topic"],
            "progress": progress,
            "draft_readers": readers,
            "research": research_result,
            "draft": draft,
            "review": review_result,
            "report": decision.data,
            "approval": {
                "approval_id": decision.approval_id,
                "approved": decision.approved,
                "edited": decision.edited,
                "decided_by": decision.decided_by,
                "comment": decision.comment,
                "source": decision.source,
            },
            "published": published,
        }


class Pipeline(Agent):
    """``tether demo --crash``: many short steps, each leaving a line in a side-effect file."""

    type = "demo-pipeline"

    def handle(self, ctx: RunContext, task: Any) -> Any:
        """Run ``task["steps"]`` steps appending to ``task["effects"]``."""
        done = [
            ctx.step(append_effect, task["effects"], seq, step_seconds(seq), name=f"step-{seq:02d}")
            for seq in range(1, int(task["steps"]) + 1)
        ]
        return {"steps": len(done), "pids": sorted({d["pid"] for d in done})}


def step_seconds(seq: int) -> float:
    """How long step ``seq`` of the pipeline works: 50 to 95 ms, the same in every process."""
    return 0.05 + 0.005 * (seq * 7 % 10)


AGENT_TYPES: tuple[type[Agent], ...] = (Coordinator, Researcher, Writer, Reviewer, Pipeline)


def build_app(url: str | None = None) -> tether.App:
    """An App with the demo's agent types on ``url`` (default ``TETHER_DATABASE_URL``)."""
    demo_app = tether.App(url)
    for cls in AGENT_TYPES:
        demo_app.register(cls)
    return demo_app


def effects_path(database: Path | None) -> Path:
    """Where ``--crash`` writes its side effects: next to a SQLite file, else here."""
    folder = database.resolve().parent if database is not None else Path.cwd()
    return folder / "tether-demo-effects.log"


app = build_app()
"""The demo's App on ``TETHER_DATABASE_URL`` (or ./tether.db); ``--db`` overrides it."""
