"""Drop-in for NVAE's train.py: every NVAE flag, plus --train_new_q and friends (see --help).

NVAE's evaluate.py imports `test`, `init_processes` and `test_vae_fid` from here. Importing this
file has no side effects; the work is in miselbo.training.
"""
import sys

from miselbo.cli import run_cli
from miselbo.training import main
from miselbo.training.nvae_compat import init_processes, test, test_vae_fid

__all__ = ["init_processes", "main", "test", "test_vae_fid"]

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="train.py"))
