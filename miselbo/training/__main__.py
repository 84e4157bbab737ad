"""`python -m miselbo.training ARGS`: train.py's command line (what the pipeline starts for stages
it runs side by side, miselbo.pipeline.parallel_stages).

When MISELBO_PARENT_PID names the starting process, this process asks Linux to send it SIGTERM
when that parent dies (prctl PR_SET_PDEATHSIG), and exits at once if the parent is already gone:
a training run never keeps going after the pipeline that started it was killed. SIGTERM makes
training stop after its current step with a checkpoint.
"""
import os
import signal
import sys

from miselbo.runtime.cli import run_cli
from miselbo.runtime.parent_death import follow_parent
from miselbo.training import main


def _follow_parent() -> None:
    parent = os.environ.get("MISELBO_PARENT_PID")
    if parent and parent.isdigit():
        follow_parent(int(parent), signal.SIGTERM)


if __name__ == "__main__":
    _follow_parent()
    sys.exit(run_cli(main, prog="train.py"))
