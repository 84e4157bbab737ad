"""NVAE's optimiser and learning-rate schedule (docs/nvae.md 8.1 steps 5-6, 8.2, 8.3).

Optimiser: Adamax with eps 1e-3 and betas (0.9, 0.999), either `torch.optim.Adamax` or our
`StackedAdamax` ("fast" variant), which does the same arithmetic with one multi-tensor (`torch._foreach_*`)
operation per term over all parameters of a group, dtype and device (NVAE stacks per shape).
Unlike NVAE's fast Adamax (defect D3, docs/nvae.md 10.5) it skips every parameter without a
gradient, so a frozen decoder stays bit-identical, and it uses each parameter's own step count.

StackedAdamax state format (identical to `torch.optim.Adamax`, so checkpoints can switch between
the two): per parameter `{'step': float32 scalar tensor on the CPU, 'exp_avg': m, 'exp_inf': u}`
with m, u shaped like the parameter; param groups carry `lr, betas, eps, weight_decay`.

Learning rate: linear warm-up per iteration for `warmup_epochs` epochs, then PyTorch's
`CosineAnnealingLR(T_max = epochs − warmup_epochs − 1)` stepped once per epoch after the warm-up.
`learning_rate()` is the same schedule as a pure function.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

ADAMAX_EPS = 1e-3
ADAMAX_BETAS = (0.9, 0.999)


class StackedAdamax(torch.optim.Optimizer):
    """Adamax in bulk: θ ← θ − lr/(1 − β₁^t) · m/u, m = β₁m + (1−β₁)g, u = max(β₂u, |g| + ε).

    g = ∇θ + wd·θ, t = the parameter's own step count. All updatable parameters of a group with
    the same dtype and device are updated together by a handful of multi-tensor operations, in
    place (no re-binding of `.data`, so tensors that alias a parameter keep seeing its values). A parameter with no gradient or with
    `requires_grad=False` is left untouched, state included.
    """

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = ADAMAX_BETAS,
                 eps: float = ADAMAX_EPS, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"StackedAdamax: lr ({lr}), eps ({eps}) and weight_decay "
                             f"({weight_decay}) must be >= 0.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"StackedAdamax: betas must lie in [0, 1), got {betas}.")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for bucket in self._buckets(group):
                self._update_bucket(bucket, group)
        return loss

    def _buckets(self, group: dict) -> Iterable[list[torch.Tensor]]:
        """The group's updatable parameters, bucketed by (dtype, device)."""
        buckets = defaultdict(list)
        for param in group["params"]:
            if param.grad is None or not param.requires_grad:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("StackedAdamax does not support sparse gradients.")
            buckets[(param.dtype, param.device)].append(param)
        return buckets.values()

    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update_bucket(self, params: list[torch.Tensor], group: dict) -> None:
        beta1, beta2 = group["betas"]
        states = [self._state_of(param) for param in params]
        step_counts = [state["step"] for state in states]
        torch._foreach_add_(step_counts, 1.0)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_infs = [state["exp_inf"] for state in states]
        grads = [param.grad for param in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1 - b1)(g - m) = b1 m + (1 - b1) g
        torch._foreach_mul_(exp_infs, beta2)
        bounds = torch._foreach_abs(grads)
        torch._foreach_add_(bounds, group["eps"])
        torch._foreach_maximum_(exp_infs, bounds)  # u = max(b2 u, |g| + eps)
        torch._foreach_addcdiv_(params, _scaled_steps(exp_avgs, step_counts, group["lr"], beta1), exp_infs)


def _scaled_steps(exp_avgs: list[torch.Tensor], step_counts: list[torch.Tensor], lr: float,
                  beta1: float) -> list[torch.Tensor]:
    """−lr / (1 − β₁^t) · m per parameter, the step size computed in float64 and rounded to m's dtype."""
    steps = torch.stack(step_counts).double()  # [n], on the CPU like torch's step counts
    step_sizes = -(lr / (1 - beta1 ** steps)).to(exp_avgs[0])  # [n]
    if bool((steps == steps[0]).all()):
        return torch._foreach_mul(exp_avgs, step_sizes[0])
    return torch._foreach_mul(exp_avgs, list(step_sizes.unbind()))


def build_optimizer(params, lr: float, weight_decay: float, fast: bool) -> torch.optim.Optimizer:
    """NVAE's Adamax (eps 1e-3, betas (0.9, 0.999)); `fast` selects StackedAdamax."""
    optimizer_class = StackedAdamax if fast else torch.optim.Adamax
    return optimizer_class(params, lr=lr, weight_decay=weight_decay, eps=ADAMAX_EPS,
                           betas=ADAMAX_BETAS)


# ----------------------------------------------------------------------------- learning rate

def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int,
                    min_lr: float) -> CosineAnnealingLR:
    """NVAE's scheduler: CosineAnnealingLR(T_max = float(epochs − warmup_epochs − 1), η_min)."""
    return CosineAnnealingLR(optimizer, T_max=float(epochs - warmup_epochs - 1),
                             eta_min=min_lr)


def step_scheduler_for_epoch(scheduler: CosineAnnealingLR, epoch: int, warmup_epochs: int) -> None:
    """Call at the start of every epoch: the cosine schedule steps only when epoch > E_w."""
    if epoch > warmup_epochs:
        scheduler.step()


def apply_warmup_learning_rate(optimizer: torch.optim.Optimizer, global_step: int,
                               warmup_iterations: int, peak_lr: float) -> None:
    """Call before every update: while global_step < W_it, lr = η · global_step / W_it."""
    if global_step < warmup_iterations:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * global_step / warmup_iterations


def learning_rate(epoch: int, global_step: int, *, peak_lr: float, min_lr: float,
                  warmup_epochs: int, epochs: int, iterations_per_epoch: int) -> float:
    """lr of an update: η·s/W_it while s < W_it, else η_min + (η_W − η_min)·(1 + cos(π k/T))/2.

    η = peak_lr (--learning_rate), η_min = min_lr (--learning_rate_min), E_w = warmup_epochs,
    W_it = iterations_per_epoch · E_w, η_W = η·(W_it − 1)/W_it (η if W_it = 0),
    k = max(0, epoch − E_w), T = epochs − E_w − 1; the cosine part is PyTorch's recursive
    CosineAnnealingLR update telescoped (docs/nvae.md 8.2).
    """
    if not 0 <= epoch < epochs:
        raise ValueError(f"learning_rate: epoch {epoch} is outside 0 … {epochs - 1}.")
    if iterations_per_epoch < 1 or warmup_epochs < 0 or global_step < 0:
        raise ValueError(f"learning_rate: need iterations_per_epoch >= 1, warmup_epochs >= 0 and "
                         f"global_step >= 0 (got {iterations_per_epoch}, {warmup_epochs}, "
                         f"{global_step}).")
    warmup_iterations = iterations_per_epoch * warmup_epochs
    if global_step < warmup_iterations:
        return peak_lr * global_step / warmup_iterations
    if warmup_iterations > 0:
        lr_after_warmup = peak_lr * (warmup_iterations - 1) / warmup_iterations
    else:
        lr_after_warmup = peak_lr
    cosine_steps = max(0, epoch - warmup_epochs)
    if cosine_steps == 0:
        return lr_after_warmup
    period = epochs - warmup_epochs - 1
    cosine = (1 + math.cos(math.pi * cosine_steps / period)) / 2
    return min_lr + (lr_after_warmup - min_lr) * cosine
