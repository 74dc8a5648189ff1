"""State graphs given as data (the agent lifecycle, the run statuses): what is reachable, and
a Mermaid diagram for the docs."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

Edge = tuple[StrEnum, StrEnum, str]
"""``(from, to, label)``."""


def reachable(initial: StrEnum, edges: Iterable[Edge]) -> set[StrEnum]:
    """The states reachable from ``initial`` along ``edges``."""
    edges = list(edges)
    found = {initial}
    frontier = [initial]
    while frontier:
        state = frontier.pop()
        for source, target, _ in edges:
            if source == state and target not in found:
                found.add(target)
                frontier.append(target)
    return found


def mermaid(initial: StrEnum, edges: Iterable[Edge], final: Iterable[StrEnum]) -> str:
    """A Mermaid state diagram of ``edges``, entered at ``initial``, left at ``final``."""
    lines = ["stateDiagram-v2", f"    [*] --> {initial.value}"]
    lines += [f"    {s.value} --> {t.value}: {label}" for s, t, label in edges]
    lines += [f"    {state.value} --> [*]" for state in sorted(final)]
    return "\n".join(lines)
