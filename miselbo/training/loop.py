"""One training step and one training epoch (docs/nvae.md 8.2, 8.4).

Step: warm-up learning rate; zero gradients; the objective of objective.nelbo_loss under the run's
precision (miselbo.training.precision: autocast in float16 or bfloat16, or none; `auto` is float16
on CUDA, float32 on CPU); all processes agree on stop requests and on a finite loss (a float32
value); scaled backward; gradients averaged across processes; without an enabled GradScaler
(fp32, bf16) a non-finite gradient norm stops the run before the update; GradScaler step (with
fp16 it skips a step whose gradients hold inf/NaN and halves the scale; the guard stops the run
only when such skips exceed its limits, miselbo.training.stop) and update.
With a frozen decoder only encoder parameters are in the optimizer and the regularisers cover
encoder layers only; gradients still flow through the decoder's activations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from miselbo.runtime import distributed
from miselbo.data.datasets import pre_process
from miselbo.nvae.objectives import kl_coeff, regulariser_coefficient
from miselbo.nvae.optim import apply_warmup_learning_rate
from miselbo.training.checkpointing import Progress
from miselbo.training.objective import LossTerms, RegularisedLayers, nelbo_loss
from miselbo.training.precision import Precision, default_precision
from miselbo.training.settings import PARAMETER_AVERAGING_PERIOD, TrainSettings
from miselbo.training.nonfinite import gradients_finite, locate_forward, locate_gradient
from miselbo.training.stop import NonFiniteLoss, StepGuard, StopAfterStep


@dataclass
class StepParts:
    """Everything a training step uses."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler
    trainable: list  # the optimised parameters (all, or the encoder's)
    alpha: torch.Tensor  # [G] KL balancing weights
    layers: RegularisedLayers | None  # regularised layers; None when λ = 0 throughout
    settings: TrainSettings
    iterations_per_epoch: int
    device: torch.device
    precision: Precision | None = None  # None: `auto` on `device` (float16 on CUDA, else float32)

    @property
    def step_precision(self) -> Precision:
        return self.precision or default_precision(self.device)

    @property
    def num_total_iter(self) -> int:
        return self.iterations_per_epoch * self.settings.epochs

    @property
    def warmup_iterations(self) -> int:
        return self.iterations_per_epoch * self.settings.warmup_epochs


def step_weights(settings: TrainSettings, global_step: int, num_total_iter: int) -> tuple[float, float]:
    """(β, λ) at a global step: KL warm-up weight and regulariser coefficient (docs/nvae.md 2.6, 2.9)."""
    beta = kl_coeff(global_step, num_total_iter, settings.kl_anneal_portion,
                    settings.kl_const_portion, settings.kl_const_coeff)
    lam = regulariser_coefficient(beta, settings.weight_decay_norm, settings.weight_decay_norm_init,
                                  settings.weight_decay_norm_anneal)
    return beta, lam


def train_step(parts: StepParts, x: torch.Tensor, global_step: int, guard: StepGuard) -> LossTerms:
    """One update on a pre-processed batch x [B, C, H, W]; raises NonFiniteLoss before updating
    (its subclass GradientsKeepFailing after a skipped float16 step that reached a limit)."""
    apply_warmup_learning_rate(parts.optimizer, global_step, parts.warmup_iterations,
                               parts.settings.learning_rate)
    parts.optimizer.zero_grad(set_to_none=True)
    beta, lam = step_weights(parts.settings, global_step, parts.num_total_iter)
    with parts.step_precision.autocast():
        terms = nelbo_loss(parts.model, x, beta, parts.alpha, lam, parts.layers)
    guard.check_loss(float(terms.loss.detach()), global_step,
                     locate=lambda: locate_forward(parts.model, terms))
    scaler = parts.grad_scaler
    scale_before = scaler.get_scale()  # 1.0 when disabled; read while synchronised by the loss check
    scaler.scale(terms.loss).backward()
    distributed.average_gradients_(parts.trainable)  # equal on every process afterwards
    if not scaler.is_enabled() and not gradients_finite(parts.trainable):
        raise NonFiniteLoss(global_step, float("nan"), locate_gradient(parts.model),
                            what="the gradient norm")
    scaler.step(parts.optimizer)  # an enabled scaler skips the update if a gradient is inf/NaN ...
    scaler.update()  # ... and then halves its scale
    if scaler.is_enabled():
        guard.check_scaler_step(scale_before, scaler.get_scale(), global_step,
                                locate=lambda: locate_gradient(parts.model))
    return terms


def skip_batches(loader: Iterable, count: int) -> Iterator:
    """The loader's batches after the first `count` (which are still drawn, so the data order and
    the random binarisation of the rest equal those of an uninterrupted epoch)."""
    batches = iter(loader)
    for _ in range(count):
        next(batches)
    return batches


StepCallback = Callable[[LossTerms, torch.Tensor, float], None]


def train_epoch(parts: StepParts, loader, progress: Progress, guard: StepGuard,
                on_step: StepCallback | None = None) -> None:
    """Train over the rest of the current epoch (from progress.step_in_epoch), updating `progress`.

    on_step(terms, x, seconds) runs after each step (logging, progress bar). Raises StopAfterStep
    once all processes agree to stop, after the step that saw the request has completed.
    """
    parts.model.train()
    start = progress.step_in_epoch
    for position, (images, *_) in enumerate(skip_batches(loader, start), start=start):
        began = time.perf_counter()
        x = pre_process(images.to(parts.device, non_blocking=True), parts.settings.num_x_bits)
        if position % PARAMETER_AVERAGING_PERIOD == 0:
            distributed.average_parameters_(parts.trainable)
        terms = train_step(parts, x, progress.global_step, guard)
        progress.epoch_loss_sum += float(terms.loss.detach())
        progress.epoch_loss_count += 1
        if on_step is not None:
            on_step(terms, x, time.perf_counter() - began)
        progress.global_step += 1
        progress.step_in_epoch = position + 1
        if guard.stop_signal:
            raise StopAfterStep(guard.stop_signal)
