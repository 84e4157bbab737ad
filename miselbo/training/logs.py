"""What a run reports: text lines (stdout and <save>/log.txt) and TensorBoard scalars and images.

Only the main process writes; on the others both objects do nothing. Lines go through tqdm.write
so they do not break a progress bar.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from miselbo.nvae.distributions import output_image
from miselbo.training.objective import LossTerms

ACTIVE_UNIT_KL = 0.1  # a latent channel with KL > 0.1 nats counts as active (docs/nvae.md 8.4, step 8)
SAMPLE_TEMPERATURES = (0.7, 0.8, 0.9, 1.0)
NUM_SAMPLE_IMAGES = 16
MAX_GRID_IMAGES = 64


class RunLog:
    """NVAE-style logger: `info(format, *args)` prints a time-stamped line and appends it to log.txt."""

    def __init__(self, folder: Path | None, enabled: bool = True):
        self.enabled = enabled
        self._file = open(folder / "log.txt", "a", encoding="utf-8") if enabled and folder else None

    def info(self, message: str, *args) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%m/%d %H:%M:%S')} {message % args if args else message}"
        tqdm.write(line, file=sys.stdout)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Board:
    """A tensorboardX SummaryWriter(log_dir=folder, flush_secs=20) on the main process."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported only where events are written
            self.writer = SummaryWriter(log_dir=str(folder), flush_secs=20)

    def scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A grid of images [N, C, H, W] in [0, 1]."""
        if self.writer is not None:
            from torchvision.utils import make_grid
            count = min(len(images), MAX_GRID_IMAGES)
            grid = make_grid(images[:count].float().cpu(), nrow=int(count ** 0.5))
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def log_step_scalars(board: Board, terms: LossTerms, epoch_loss: float, lr: float, step: int) -> None:
    """Regularisers, λ, epoch average, lr, KL, reconstruction, β, per-group values (docs/nvae.md 8.4)."""
    for tag, value in (("train/norm_loss", terms.spectral), ("train/bn_loss", terms.batchnorm),
                       ("train/norm_coeff", terms.reg_coeff), ("train/nelbo_avg", epoch_loss),
                       ("train/lr", lr), ("train/nelbo_iter", terms.loss.detach()),
                       ("train/kl_iter", terms.kl), ("train/recon_iter", terms.reconstruction),
                       ("kl_coeff/coeff", terms.kl_weight)):
        board.scalar(tag, value, step)
    total_active = 0
    for group, (gamma, kl_value, kl_diag) in enumerate(zip(terms.balance_coeffs, terms.kl_per_group,
                                                           terms.kl_diag)):
        active = int((kl_diag > ACTIVE_UNIT_KL).sum())
        total_active += active
        board.scalar(f"kl/active_{group}", active, step)
        board.scalar(f"kl_coeff/layer_{group}", gamma, step)
        board.scalar(f"kl_vals/layer_{group}", kl_value, step)
    board.scalar("kl/total_active", total_active, step)


def log_reconstructions(board: Board, model, x: torch.Tensor, terms: LossTerms, step: int) -> None:
    """Input and reconstruction grids (the output distribution's mean image)."""
    board.images("train/input", x, step)
    board.images("train/reconstruction", output_image(model.decoder_output(terms.logits.float()),
                                                      mean=True), step)


@torch.no_grad()
def log_prior_samples(board: Board, model, step: int) -> None:
    """16 prior samples per temperature (Bernoulli mean, else one draw), without touching the RNG
    stream that training uses."""
    if board.writer is None:
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for temperature in SAMPLE_TEMPERATURES:
            logits = model.sample(NUM_SAMPLE_IMAGES, temperature)
            images = output_image(model.decoder_output(logits), t=temperature)
            board.images(f"generated_{temperature}", images, step)
