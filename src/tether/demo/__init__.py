"""``tether demo``: a short scenario, offline, on a real database, with a live view.

The package::

    scenario  run_demo: agents through their lifecycle, runs worked live, an operator, a
              reviewer, the end
    view      the live view: events in words, the board of runs, the summary and a timeline
    approval  the human approval before publishing: a simulated reviewer, or the person at
              the terminal (``--interactive``); what the approval gated, from the database
    budget    the researcher's budget runs out: the operator raises the limit; what the
              run spent, from the database
    history   checkpoint and restore an agent's state; fork a finished run
    crash     run_crash_demo (``--crash``): kill a real worker process mid-run, resume, prove it
    agents    the agent types and their misbehaving tools; ``tether.demo.agents:app`` for a
              worker in another process

``import tether`` does not import this package; the CLI imports it when ``tether demo`` runs.
"""

from tether.demo.crash import run_crash_demo
from tether.demo.scenario import run_demo

__all__ = ["run_crash_demo", "run_demo"]
