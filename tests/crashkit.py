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
