"""How the orchestrator runs things: interpreters, the peers' virtualenv, one system process.

Each measurement is one process of ``bench/systems/<module>.py`` in the interpreter that has its
system installed; it prints one JSON line, which :func:`run_system` returns as a dict. A failure
(non-zero exit, no JSON, timeout) comes back as ``{"ok": False, "error": ...}``, never raised,
so one broken system costs its own rows and not the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
SYSTEMS = BENCH / "systems"
PEERS = BENCH / ".peers"
REQUIREMENTS = BENCH / "requirements-peers.txt"
TETHER_PY = sys.executable
PEERS_PY = str(PEERS / "bin" / "python")
MARK = re.compile(r"tether-bench-mark-(begin|end)")
FSYNC = re.compile(r"\b(fsync|fdatasync)\(")

Result = dict[str, Any]


@dataclass(frozen=True)
class System:
    """One measured configuration: a label, an interpreter, a module and its extra flags."""

    label: str
    python: str
    module: str
    flags: tuple[str, ...] = ()
    peer: bool = False


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays for the tables."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def ensure_peers() -> str | None:
    """Create or update ``bench/.peers`` from the pinned requirements; returns an error or None."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = PEERS / ".requirements.sha256"
    if Path(PEERS_PY).exists() and stamp.exists() and stamp.read_text() == digest:
        return None
    log("installing the peer systems into bench/.peers (pinned in requirements-peers.txt)")
    try:
        if not Path(PEERS_PY).exists():
            subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        subprocess.run(
            [PEERS_PY, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        return f"could not install the peers: {(exc.stderr or '').strip()[-500:] or exc}"
    except OSError as exc:
        return f"could not install the peers: {exc}"
    stamp.write_text(digest)
    return None


def parse_result(stdout: str) -> Result | None:
    """The last JSON object line a system printed (libraries may print before it)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def system_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a system process: quiet, unbuffered, no user site or telemetry."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONNOUSERSITE": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
    }
    env.pop("TETHER_DATABASE_URL", None)
    return {**env, **(extra or {})}


def run_system(
    system: System,
    workload: str,
    args: list[str],
    *,
    timeout: float = 300,
    strace_log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run one system process to completion and return its result line."""
    cmd = command(system, workload, args)
    if strace_log is not None:
        trace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=fsync,fdatasync,openat"]
        cmd = [*trace, "-o", str(strace_log), *cmd]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=system_env(env), cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    result = parse_result(proc.stdout)
    if result is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return result


def command(system: System, workload: str, args: list[str]) -> list[str]:
    """The command line of one system process."""
    return [system.python, str(SYSTEMS / f"{system.module}.py"), workload, *system.flags, *args]


def fsyncs_between_marks(strace_log: Path) -> int | None:
    """fsync/fdatasync calls between the ``begin`` and ``end`` markers of an strace log."""
    if not strace_log.exists():
        return None
    count, inside, seen = 0, False, False
    for line in strace_log.read_text(errors="replace").splitlines():
        mark = MARK.search(line)
        if mark:
            inside, seen = mark.group(1) == "begin", True
        elif inside and FSYNC.search(line) and "resumed>" not in line:
            count += 1
    return count if seen else None


def have_strace() -> bool:
    """Whether fsync calls can be counted (``strace`` on PATH)."""
    return shutil.which("strace") is not None


@dataclass(frozen=True)
class Spread:
    """Median, min and max of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    def show(self, fmt: str = "{:,.0f}") -> str:
        """``median (min-max)``."""
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}\u2013{fmt.format(self.high)})"


def spread(values: list[float]) -> Spread | None:
    """The :class:`Spread` of some values, or None when there are none."""
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values), len(values))


def timed_command(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of one whole process, from spawn to exit."""
    start = time.perf_counter()
    subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False, cwd=ROOT
    )
    return time.perf_counter() - start
