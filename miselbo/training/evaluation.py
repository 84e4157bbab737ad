"""NVAE's test routine (docs/nvae.md 8.6): NELBO and the importance-weighted −log p(x).

For each test image x and K posterior draws z_k ~ q(z | x):
  NELBO  = (1/K) Σ_k [ rec_k + Σ_g KL_g,k ]                       (analytic KL without flows)
  −log p = −( logsumexp_k w_k − ln K ),  w_k = −rec_k − log q(z_k | x) + log p(z_k)
Both are averaged over the images (weighted by count across processes) and returned in nats.
Instead of NVAE's K separate passes, the K draws are stacked along the batch axis (up to
`max_rows` rows per pass); in eval mode rows are independent, so the estimator is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from miselbo.runtime import distributed
from miselbo.data.datasets import ImageDataset, pre_process
from miselbo.nvae.distributions import reconstruction_loss

DEFAULT_MAX_ROWS = 512


class EvaluationInterrupted(Exception):
    """A stop was requested while testing; nothing was computed past the current batch."""


@dataclass(frozen=True)
class TestResult:
    """Test-set averages in nats per image."""
    neg_log_p: float
    nelbo: float
    num_images: int
    num_samples: int


def test_bytes_per_sample(batch_size: int, max_rows: int = DEFAULT_MAX_ROWS) -> float:
    """Bytes the test routine holds per importance sample of one batch, whatever the model: the
    float32 log-weights [K, B], kept per pass and then concatenated (twice), plus the pass plan's
    entry (a Python int in a list) shared by the samples of one pass."""
    per_pass = max(1, max_rows // max(batch_size, 1))
    return 2 * 4 * batch_size + 64 / per_pass


def samples_per_pass(batch_size: int, num_samples: int, max_rows: int) -> list[int]:
    """How many of the K draws each forward pass takes: K split into chunks of <= max_rows / B."""
    per_pass = max(1, min(num_samples, max_rows // max(batch_size, 1)))
    full, rest = divmod(num_samples, per_pass)
    return [per_pass] * full + ([rest] if rest else [])


def subset_loader(loader: DataLoader, num_examples: int, seed: int) -> DataLoader:
    """A loader over `num_examples` evenly spaced items of `loader`'s data set (all of them when it
    has fewer), same batch size and workers, not shuffled; its random binarisation restarts from
    `seed`, so every call with the same seed yields the same images. Split across processes like
    the full test set when a process group is running."""
    full = loader.dataset
    count = min(num_examples, len(full))
    chosen = torch.arange(count) * len(full) // count  # [count], distinct, as ImageDataset.take
    subset = ImageDataset(full.images[chosen], full.labels[chosen], full.padding, full.binarize,
                          full.random_flip)  # own random generator: the full test's is untouched
    subset.reseed(seed)
    world_size, rank = distributed.world_size(), distributed.rank()
    sampler = (DistributedSampler(subset, num_replicas=world_size, rank=rank, shuffle=True)
               if world_size > 1 else None)
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, sampler=sampler,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


@torch.no_grad()
def batch_bounds(model, x: torch.Tensor, num_samples: int, max_rows: int = DEFAULT_MAX_ROWS,
                 should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (NELBO [B], −log p [B]) in float64 for a pre-processed batch x [B, C, H, W].

    `should_stop()` is asked before every forward pass (so a stop request is answered within one
    pass even with 1,000 importance samples); when True, EvaluationInterrupted is raised.
    """
    batch = x.shape[0]
    nelbo_sum = x.new_zeros(batch, dtype=torch.float64)
    log_weights = []
    for count in samples_per_pass(batch, num_samples, max_rows):
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted()
        tiled = x.repeat(count, 1, 1, 1)  # [count * B, C, H, W], draw-major
        logits, log_q, log_p, kl_all, _ = model(tiled)
        rec = reconstruction_loss(model.decoder_output(logits), tiled, model.crop_output)  # [count*B]
        kl = torch.stack(kl_all, dim=1).sum(dim=1)  # [count * B]
        nelbo_sum += (rec + kl).double().view(count, batch).sum(dim=0)
        log_weights.append((-rec - log_q + log_p).double().view(count, batch))  # [count, B]
    log_w = torch.cat(log_weights, dim=0)  # [K, B]
    log_p_x = torch.logsumexp(log_w, dim=0) - math.log(num_samples)  # [B]
    return nelbo_sum / num_samples, -log_p_x


def evaluate_bounds(loader, model, num_samples: int, num_x_bits: int,
                    should_stop: Callable[[], bool] | None = None,
                    max_rows: int = DEFAULT_MAX_ROWS) -> TestResult:
    """The test routine over `loader` (model put in eval mode); averaged over all processes.

    `should_stop()` is asked before every forward pass (on every process, so it must agree across
    them; processes see batches of equal size, hence equal numbers of passes); when it returns
    True, EvaluationInterrupted is raised.
    """
    distributed.barrier()
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # Σ NELBO, Σ −log p, count
    for images, *_ in loader:
        x = pre_process(images.to(device, non_blocking=True), num_x_bits)
        nelbo, neg_log_p = batch_bounds(model, x, num_samples, max_rows, should_stop)
        totals += torch.stack([nelbo.sum(), neg_log_p.sum(), nelbo.new_tensor(x.shape[0])])
    distributed.sum_tensor_(totals)
    distributed.barrier()
    count = max(float(totals[2]), 1.0)
    return TestResult(neg_log_p=float(totals[1]) / count, nelbo=float(totals[0]) / count,
                      num_images=int(totals[2]), num_samples=num_samples)
