"""Data-parallel training with gloo: NVAE's launch flags and torchrun; parameters stay identical."""
import subprocess
import sys

import pytest

from miselbo import training
from miselbo.storage.checkpoints import read_checkpoint
from test_train_common import REPO_ROOT, quiet_env, run_args

pytestmark = pytest.mark.slow


def test_two_spawned_gloo_processes_train_and_keep_identical_parameters(tmp_path):
    result = training.train(run_args(tmp_path, "pair", "--batch_size", "8",
                                     "--num_process_per_node", "2"))
    assert len(result.rank_parameter_sha256) == 2
    assert result.rank_parameter_sha256[0] == result.rank_parameter_sha256[1]
    checkpoint = read_checkpoint(result.checkpoint_path)
    # 64 images over 2 processes in batches of 8: 4 steps per epoch per process.
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (2, 8)
    assert checkpoint["args"].distributed and checkpoint["args"].num_total_iter == 8


def test_torchrun_launch(tmp_path):
    argv = run_args(tmp_path, "torchrun", "--batch_size", "8", "--epochs", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "train.py"), *argv]
    done = subprocess.run(command, cwd=REPO_ROOT, env=quiet_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint written") == 1  # rank 0 only
    checkpoint = read_checkpoint(tmp_path / "eval-torchrun")
    assert (checkpoint["global_step"], checkpoint["args"].distributed) == (4, True)
