"""Shared pieces of the training tests (no tests here): a tiny architecture and quick runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Decoder modules, written out independently of miselbo.nvae.model (docs/nvae.md 6.10).
DECODER_PREFIXES = ("prior_ftr0", "dec_tower.", "dec_sampler.", "post_process.", "image_conditional.",
                    "stem_decoder.")
TINY_ARCH = ["--dataset", "mnist5k", "--num_channels_enc", "4", "--num_channels_dec", "4",
             "--num_latent_scales", "2", "--num_groups_per_scale", "2", "--num_latent_per_group", "2",
             "--num_preprocess_blocks", "1", "--num_preprocess_cells", "2",
             "--num_postprocess_blocks", "1", "--num_postprocess_cells", "2", "--use_se", "--res_dist"]
# 64 training images in batches of 16: 4 steps per epoch. Regularisers on (λ = 0.01).
QUICK = ["--num_train_examples", "64", "--num_test_examples", "16", "--batch_size", "16",
         "--epochs", "2", "--warmup_epochs", "1", "--final_iw_samples", "4",
         "--weight_decay_norm", "1e-2"]
STEPS_PER_EPOCH = 4


def run_args(root, save, *extra):
    """A tiny, quick p_and_q command line writing to <root>/eval-<save>."""
    return ["--root", str(root), "--save", save, *TINY_ARCH, *QUICK, *extra]


def is_decoder(key: str) -> bool:
    return key == "prior_ftr0" or key.startswith(DECODER_PREFIXES)


def load_raw(path) -> dict:
    """torch.load of a checkpoint written by train.py (trusted: our own test output)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def run_train_script(argv, **kwargs) -> subprocess.Popen:
    """`python train.py argv` from the repository root, CI-quiet, pipes for both streams."""
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *argv], cwd=REPO_ROOT,
                            env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the suite shares 2 cores with other jobs, and several spinning OpenMP
    threads per job make CPU timings collapse under that contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def quiet_env() -> dict:
    """Environment for training subprocesses: quiet bars, unbuffered, one thread."""
    return dict(os.environ, CI="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
