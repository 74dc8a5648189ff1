"""Run a worker for the crash-test app until idle (or a timeout): python worker.py [seconds]."""

from __future__ import annotations

import logging
import sys

from tests.procs.crash_app import app

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    until_idle = "--forever" not in sys.argv
    app.work(until_idle=until_idle, concurrency=4, timeout=timeout)
