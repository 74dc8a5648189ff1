"""Approvals and questions from inside a run: ``ctx.approve`` and ``ctx.ask``.

An approval is created in the same write that parks the run on it, with an id derived from the
run and journal position (each occurrence has its own, in a loop too) and bound to the digest
(SHA-256 of the canonical JSON) of the data it asks about. A person's decision names that
digest and is recorded once; it wakes the run, whose next write consumes it at the position
that asked and journals it, so a replay gets the same decision without asking again. A replay
that asks about other data is a non-determinism incident, never a reuse of a decision made
about something else. A deadline applies the default, recorded with ``source="timeout"``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from tether import codec
from tether.errors import ConfigurationError
from tether.vocabulary import StepKind

if TYPE_CHECKING:
    from tether.engine.executor import Execution
    from tether.limits import Breach

TITLE_LENGTH = 1000
DEFAULTS = ("approve", "reject")


@dataclass(frozen=True)
class Decision:
    """A person's decision (or a timeout's default), as the run receives it: truthy when
    approved."""

    approved: bool
    data: Any
    """The data asked about, or the approver's edited version (``edited``), or the answer."""
    comment: str | None
    decided_by: str | None
    """Who decided (from the caller's identity); None when the timeout applied the default."""
    decided_at: dt.datetime | None
    source: str
    """``human``, ``timeout`` or ``policy``."""
    edited: bool = False
    approval_id: str = ""
    digest: str = ""
    """The digest of the data the approval asked about."""

    def __bool__(self) -> bool:
        return self.approved

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Decision:
        """The record from its journaled form."""
        at = doc.get("decided_at")
        return cls(
            approved=bool(doc["approved"]),
            data=doc.get("data"),
            comment=doc.get("comment"),
            decided_by=doc.get("decided_by"),
            decided_at=dt.datetime.fromisoformat(at.replace("Z", "+00:00")) if at else None,
            source=doc.get("source") or "human",
            edited=bool(doc.get("edited")),
            approval_id=doc.get("approval_id", ""),
            digest=doc.get("digest", ""),
        )


def json_schema(schema: Any) -> tuple[dict[str, Any] | None, Any]:
    """A schema given to ``approve``/``ask`` -> (its JSON Schema, the pydantic model or None)."""
    if schema is None:
        return None, None
    if isinstance(schema, dict):
        return codec.check(schema, "schema"), None
    to_schema = getattr(schema, "model_json_schema", None)
    if isinstance(schema, type) and callable(to_schema):
        return codec.check(to_schema(), "schema"), schema
    raise ConfigurationError(
        f"schema must be a pydantic model class or a JSON Schema (a dict), got {schema!r}"
    )


def validation_errors(schema: dict[str, Any], value: Any) -> list[str]:
    """What is wrong with ``value`` against the JSON Schema ``schema`` (empty: valid)."""
    import jsonschema  # only deciding and validating need it

    validator = jsonschema.validators.validator_for(schema)(schema)
    found = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in found]


def _approvers(approvers: Sequence[str] | None) -> list[str] | None:
    if approvers is None:
        return None
    if isinstance(approvers, str) or not all(isinstance(a, str) and a for a in approvers):
        raise ConfigurationError(
            f"approvers must be a list of names (e.g. ['alice', 'bob']), got {approvers!r}"
        )
    return list(approvers)


def _request(ex: Execution, request: dict[str, Any]) -> Any:
    """The callback ``Execution.settle`` names the approval with."""

    def named(seq: int) -> tuple[tuple[tuple[str, str], ...], dict[str, Any]]:
        return (("approval", codec.approval_id(ex.run_id, seq)),), request

    return named


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or timeout < 0):
        raise ConfigurationError(f"timeout must be a number of seconds >= 0, got {timeout!r}")


def _outcome(ex: Execution, kind: StepKind, title: str, digest: str, outcome: Any) -> Any:
    """The decision the wait journaled, checked against what the handler asks about now."""
    decision = outcome["approval"]
    if decision.get("digest") != digest:
        ex.diverge(
            ex.seq,
            f"{kind.value} {title!r} about data {decision.get('digest', '')[:12]}",
            f"{kind.value} {title!r} about data {digest[:12]}",
        )
    return decision


def approve(
    ex: Execution,
    title: str,
    data: Any,
    *,
    schema: Any,
    timeout: float | None,
    default: str,
    approvers: Sequence[str] | None,
) -> Decision:
    """``ctx.approve``: ask a person, park until a decision or the timeout's default."""
    codec.check_text("title", title, TITLE_LENGTH)
    if default not in DEFAULTS:
        raise ConfigurationError(f"default must be 'approve' or 'reject', got {default!r}")
    _check_timeout(timeout)
    doc = codec.check(data, "data")
    schema_doc, _ = json_schema(schema)
    digest = codec.digest(doc)
    request = {
        "kind": StepKind.APPROVE.value,
        "title": title,
        "data": doc,
        "digest": digest,
        "schema": schema_doc,
        "on_timeout": {"approved": default == "approve", "data": doc, "kind": "approve"},
        "approvers": _approvers(approvers),
    }
    outcome = ex.settle(title, StepKind.APPROVE, (), timeout, request=_request(ex, request))
    return Decision.from_dict(_outcome(ex, StepKind.APPROVE, title, digest, outcome))


def ask(
    ex: Execution,
    question: str,
    schema: Any,
    *,
    timeout: float | None,
    default: Any,
    approvers: Sequence[str] | None,
) -> Any:
    """``ctx.ask``: a person's answer, validated against ``schema`` when it is given (a model
    instance for a pydantic model); ``default`` when the timeout passes first."""
    codec.check_text("question", question, TITLE_LENGTH)
    _check_timeout(timeout)
    schema_doc, model = json_schema(schema)
    if schema_doc is None:
        raise ConfigurationError("ask needs a schema: a pydantic model class or a JSON Schema")
    fallback = codec.check(default, "default")
    about = {"question": question, "schema": schema_doc}
    digest = codec.digest(about)
    request = {
        "kind": StepKind.ASK.value,
        "title": question,
        "data": about,
        "digest": digest,
        "schema": schema_doc,
        "on_timeout": {"approved": True, "data": fallback, "kind": "ask"},
        "approvers": _approvers(approvers),
    }
    outcome = ex.settle(question, StepKind.ASK, (), timeout, request=_request(ex, request))
    decision = _outcome(ex, StepKind.ASK, question, digest, outcome)
    answer = decision["data"] if decision["approved"] else fallback  # declined: the default
    if model is not None and answer is not None:
        return model.model_validate(answer)
    return answer


def budget_ask(ex: Execution, breach: Breach, step: str) -> NoReturn:
    """``on_breach="ask"``: ask a person whether to raise the breached limit, in an approval
    journaled just before the step (its name says which budget and limit). Its data is the
    proposed new maximum, which the approver may edit; deciding it raises the limit in the
    decision's own transaction. Parks the run."""
    lim = breach.limit
    proposed = max(lim.max * 2, lim.used + lim.reserved + breach.needed)
    if lim.key != "cost":
        proposed = float(math.ceil(proposed))
    whose = "its own budget" if lim.holder == ex.run_id else f"the budget of run {lim.holder}"
    title = (
        f"Raise {lim.describe()} of {whose}? Step {step} of run {ex.run_id} needs "
        f"{breach.needed:g} more; {lim.used:g} is used"
        + (f" and {lim.reserved:g} reserved" if lim.reserved else "")
    )
    request = {
        "kind": StepKind.APPROVE.value,
        "title": title[:TITLE_LENGTH],
        "data": proposed,
        "digest": codec.digest(proposed),
        "schema": {"type": "number", "minimum": 0},
        "on_timeout": {"approved": False, "data": proposed, "kind": "approve"},
        "approvers": None,
        "subject": {"budget": lim.holder, "limit": lim.key},
    }
    ex.settle(f"budget:{lim.holder}:{lim.key}", StepKind.APPROVE, (), None,
              request=_request(ex, request))  # fmt: skip
    raise AssertionError("a new approval cannot be decided before it is created")


def budget_answer(ex: Execution, name: str) -> Decision:
    """The decision on a budget's ask journaled (or waited for) at the next position."""
    outcome = ex.settle(name, StepKind.APPROVE, (), None, request=_request(ex, {}))
    return Decision.from_dict(outcome["approval"])


_UNSET: Any = object()


def decision_check(approval_id: str, approve: bool, data: Any = _UNSET) -> Any:
    """How a decision is checked against the approval it decides (``ApprovalInfo``), inside
    the deciding transaction: returns the data the run will receive and whether it is an
    edit, or raises (``InvalidInput`` with the schema's errors, ``ConfigurationError``)."""
    from tether.errors import InvalidInput

    given = data is not _UNSET and data is not None
    doc = codec.check(data, "data") if given else None

    def check(approval: Any) -> tuple[Any, bool]:
        if approval.kind == StepKind.ASK.value:
            if not approve:
                return None, False  # declined: the run gets the question's default
            if not given:
                raise ConfigurationError(
                    f"approval {approval_id} asks a question: answer it with data "
                    "(tether approvals approve ID --data JSON)"
                )
        elif not given:
            return approval.data, False
        elif approval.schema is None:
            raise ConfigurationError(
                f"approval {approval_id} takes no edits: the run gave no schema for its data; "
                "approve or reject it as it is"
            )
        if approval.schema is not None:
            errors = validation_errors(approval.schema, doc)
            if errors:
                what = "answer" if approval.kind == StepKind.ASK.value else "edited data"
                raise InvalidInput(
                    f"the {what} for approval {approval_id} does not match its schema "
                    "(nothing was decided)",
                    errors,
                )
        edited = approval.kind != StepKind.ASK.value and codec.digest(doc) != approval.digest
        return doc, edited

    return check
