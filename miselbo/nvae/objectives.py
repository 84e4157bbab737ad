"""NVAE's training-objective weights: KL warm-up, KL balancing, and the regulariser coefficient.

Described in docs/nvae.md 2.6 and 2.9. Latent groups are in decoder order (g = 0 is the
coarsest, first-sampled group); `groups_per_scale` is in NVAE's order (index 0 = finest scale).
All KL values are in nats per example.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# Added to the mean absolute KL of each group before balancing (docs/nvae.md 2.6).
KL_BALANCE_OFFSET = 0.01
# Per-scale weight w_i for the decoder-order scale index i, and whether it is divided by the
# number of groups n_i of that scale; every rule's weights are then divided by their minimum.
_ALPHA_RULES = {
    "square": (lambda i: 4.0 ** i, True),
    "equal": (lambda i: 1.0, False),
    "linear": (lambda i: 2.0 ** i, False),
    "sqrt": (lambda i: math.sqrt(2.0 ** i), False),
}


def kl_coeff(step: int, total_iterations: int, anneal_portion: float, const_portion: float,
             min_kl_coeff: float) -> float:
    """KL warm-up weight: β = max(min((step − c·N) / (a·N), 1), β_min) with N = total_iterations.

    `step` is the 0-based global step before its increment, a = anneal_portion, c = const_portion.
    With a·N = 0 (no warm-up; NVAE would divide by zero) β jumps from β_min to 1 at step c·N.
    """
    if total_iterations < 0 or anneal_portion < 0 or const_portion < 0:
        raise ValueError(f"kl_coeff: total_iterations ({total_iterations}), kl_anneal_portion "
                         f"({anneal_portion}) and kl_const_portion ({const_portion}) must be >= 0.")
    anneal_steps = anneal_portion * total_iterations
    const_steps = const_portion * total_iterations
    if anneal_steps == 0:
        rise = 1.0 if step >= const_steps else -math.inf
    else:
        rise = (step - const_steps) / anneal_steps
    return max(min(rise, 1.0), min_kl_coeff)


def kl_balance_alpha(groups_per_scale: Sequence[int], rule: str = "square",
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed balancing weights α [G] in decoder group order; 'square': n_i copies of 4^i / n_i.

    i = 0 … S−1 is the decoder-order scale (coarsest first), n_i = groups_per_scale[S−1−i];
    the concatenated weights are divided by their minimum. 'equal' gives ones, 'linear' n_i copies
    of 2^i, 'sqrt' n_i copies of sqrt(2^i) (each divided by the minimum too).
    """
    if rule not in _ALPHA_RULES:
        raise ValueError(f"kl_balance_alpha: unknown rule {rule!r}; choose one of "
                         f"{sorted(_ALPHA_RULES)}.")
    counts = [int(n) for n in groups_per_scale]
    if not counts or min(counts) < 1:
        raise ValueError(f"kl_balance_alpha: groups_per_scale must be a non-empty list of "
                         f"positive counts, got {list(groups_per_scale)}.")
    scale_weight, divide_by_count = _ALPHA_RULES[rule]
    weights = []
    for scale, count in enumerate(reversed(counts)):  # decoder order: coarsest scale first
        weight = scale_weight(scale) / (count if divide_by_count else 1)
        weights.extend([weight] * count)
    alpha = torch.tensor(weights, dtype=torch.float64)  # [G]
    return (alpha / alpha.min()).to(device=device, dtype=dtype)


def _stack_groups(kl_all: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack G per-example KL vectors [B] into K [B, G], with a clear error for bad input."""
    if len(kl_all) == 0:
        raise ValueError("KL balancing: kl_all is empty; expected one [B] tensor per latent group.")
    shapes = {tuple(kl.shape) for kl in kl_all}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"KL balancing: every entry of kl_all must be a [B] tensor of the same "
                         f"length, got shapes {[tuple(kl.shape) for kl in kl_all]}.")
    return torch.stack(list(kl_all), dim=1)  # [B, G]


def kl_per_group(kl_all: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group statistics of K [B, G]: kl_vals = mean_b K [G], c = mean_b |K| + 0.01 [1, G]."""
    return _group_statistics(_stack_groups(kl_all))


def _group_statistics(kl_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_b K [G], mean_b |K| + 0.01 [1, G]) of K [B, G]."""
    kl_vals = kl_matrix.mean(dim=0)  # [G]
    abs_mean = kl_matrix.abs().mean(dim=0, keepdim=True) + KL_BALANCE_OFFSET  # [1, G]
    return kl_vals, abs_mean


def kl_balancer(kl_all: Sequence[torch.Tensor], kl_coeff: float = 1.0, kl_balance: bool = False,
                alpha: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted KL per example: β · Σ_g γ_g K[:, g], γ = (c / α) / mean_g(c / α), γ detached.

    Balancing (γ as above) is active only when `kl_balance` and β = kl_coeff < 1; otherwise γ = 1.
    Returns (balanced KL [B], γ [G], kl_vals = mean_b K [G]).
    """
    kl_matrix = _stack_groups(kl_all)  # [B, G]
    num_groups = kl_matrix.shape[1]
    kl_vals, abs_mean = _group_statistics(kl_matrix)  # [G], [1, G]
    if kl_balance and kl_coeff < 1.0:
        if alpha is None or alpha.numel() != num_groups:
            got = "None" if alpha is None else f"{alpha.numel()} weights"
            raise ValueError(f"kl_balancer: KL balancing needs alpha with one weight per latent "
                             f"group ({num_groups}), got {got}; build it with kl_balance_alpha().")
        alpha = alpha.to(kl_matrix).reshape(1, num_groups)  # [1, G]
        gamma = abs_mean / alpha * abs_mean.sum()  # [1, G]; the sum cancels below (NVAE's form)
        gamma = (gamma / gamma.mean()).detach()  # [1, G]
        balanced_kl = (kl_matrix * gamma).sum(dim=1)  # [B]
        coeffs = gamma.squeeze(0)  # [G]
    else:
        balanced_kl = kl_matrix.sum(dim=1)  # [B]
        coeffs = torch.ones_like(kl_vals)  # [G]
    return kl_coeff * balanced_kl, coeffs, kl_vals


def regulariser_coefficient(kl_coeff: float, weight_decay_norm: float,
                            weight_decay_norm_init: float, anneal: bool) -> float:
    """λ = exp((1 − β) ln λ_init + β ln λ_final) when annealing, else λ_final (β = kl_coeff)."""
    if not anneal:
        return weight_decay_norm
    if weight_decay_norm <= 0 or weight_decay_norm_init <= 0:
        raise ValueError(f"--weight_decay_norm_anneal interpolates geometrically, so "
                         f"--weight_decay_norm ({weight_decay_norm}) and --weight_decay_norm_init "
                         f"({weight_decay_norm_init}) must both be > 0.")
    log_lambda = ((1.0 - kl_coeff) * math.log(weight_decay_norm_init)
                  + kl_coeff * math.log(weight_decay_norm))
    return math.exp(log_lambda)
