"""Helpers for tests that kill real worker processes: start them, read the effect log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker_env(db_url: str, log: Path, lease: float) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TETHER_TEST_DB=db_url,
        TETHER_TEST_LOG=str(log),
        TETHER_TEST_LEASE=str(lease),
        PYTHONPATH=str(ROOT),
    )
    return env


def start_worker(env: dict[str, str], timeout: float = 60.0) -> subprocess.Popen[str]:
    """A real worker process running the crash-test app until idle."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.procs.worker", str(timeout)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lines(
    log: Path, prefix: str, count: int, proc: subprocess.Popen[str], timeout: float = 30.0
) -> bool:
    """Wait until the log holds ``count`` lines starting with ``prefix`` (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            lines = log.read_text().splitlines()
            if sum(1 for line in lines if line.startswith(prefix)) >= count:
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


@dataclass
class Effects:
    """What the effect log says really executed: DONE tokens per (run, seq), in order."""

    done: dict[tuple[str, int], list[tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    @classmethod
    def read(cls, log: Path) -> Effects:
        effects = cls()
        if log.exists():
            for line in log.read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == "DONE" and len(parts) == 5:
                    effects.done[(parts[1], int(parts[2]))].append((parts[3], int(parts[4])))
        return effects


LOG_WITHIN = 60.0
"""Seconds ``EffectLog.wait_for`` and ``wait_for_each`` wait for lines before they give up."""


class EffectLog:
    """The outside log, read as it grows: lines split into fields, from a starting offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines: list[list[str]] = []

    def begin(self) -> None:
        """Forget what was read: the next lines are a new trial's."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.lines = []

    def read(self) -> list[list[str]]:
        """Every line since ``begin``. A line is written as "\n" + fields in one write
        call, so the text after the last newline is the newest line, whole; it is read again
        next time, as a later write may follow it."""
        last = ""
        if self.path.exists():
            with open(self.path) as log:
                log.seek(self.offset)
                text = log.read()
            cut = text.rfind("\n")
            if cut > 0:
                self.offset += len(text[:cut].encode())
                self.lines += [line.split() for line in text[:cut].split("\n") if line]
            last = text[cut + 1 :] if cut >= 0 else text
        return [*self.lines, last.split()] if last.strip() else list(self.lines)

    def all(self) -> list[list[str]]:
        """Everything since ``begin`` (call once the log is quiet)."""
        return self.read()

    def wait_for(
        self, kinds: set[str], count: int, timeout: float = LOG_WITHIN
    ) -> list[str] | None:
        """The ``count``-th line of these kinds since ``begin``, once written (None after
        ``timeout``: the test then finds which run is stuck)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.read() if line[0] in kinds]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.002)
        return None


def wait_for_each(
    log: EffectLog, kind: str, run_ids: list[str], where: str
) -> dict[str, list[str]]:
    """Each run's first line of ``kind``, once all of them wrote one."""
    deadline = time.monotonic() + LOG_WITHIN
    while True:
        found: dict[str, list[str]] = {}
        for line in log.read():
            if line[0] == kind and line[1] in run_ids:
                found.setdefault(line[1], line)
        if len(found) == len(run_ids):
            return found
        assert time.monotonic() < deadline, f"{where}: only {sorted(found)} wrote {kind}"
        time.sleep(0.002)
