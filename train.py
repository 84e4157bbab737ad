"""Drop-in for NVAE's train.py: every NVAE flag, plus --train_new_q and friends (see --help).

NVAE's evaluate.py imports `test`, `init_processes` and `test_vae_fid` from here. Importing this
file has one side effect: plain `torch.load(path)` (weights_only, torch >= 2.6) accepts the one
non-tensor type NVAE checkpoints hold, argparse.Namespace, so NVAE's evaluate.py reads them; every
other type stays refused (miselbo.storage.checkpoints). The work is in miselbo.training.
"""
import sys

from miselbo.runtime.cli import run_cli
from miselbo.storage.checkpoints import allow_nvae_checkpoints_in_torch_load
from miselbo.training import main
from miselbo.training.nvae_compat import init_processes, test, test_vae_fid

__all__ = ["init_processes", "main", "test", "test_vae_fid"]

allow_nvae_checkpoints_in_torch_load()

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="train.py"))
