"""Drop-in for the public MISELBO `miselbo_eval.py`: evaluate an NVAE ensemble (one decoder, S encoders).

    python miselbo_eval.py --checkpoints <q1> <q2> ... --num_iw_samples 1000 --save results/run1

Flags and behaviour: `miselbo/evaluation/evaluate.py` (module docstring) or `python miselbo_eval.py --help`.
"""
import sys

from miselbo.runtime.cli import run_cli
from miselbo.evaluation.evaluate import PROG, main

if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
