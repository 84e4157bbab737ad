"""Finding where a training step went non-finite, cheaply.

Every step pays for two checks only: one `isfinite` on the loss (StepGuard.check_loss) and, on
runs without a GradScaler (CPU), one on the total gradient norm after back-propagation (with a
GradScaler, CUDA float16, non-finite gradients are the scaler's business: it skips that step).
Only when one of them fails does `locate_forward` / `locate_gradient` walk the step's values in
the order they were computed and name the first non-finite one, for the exit-3 message.

Distribution validation is switched off while training and evaluating (`miselbo.runtime.distribution_checks`):
with it, torch.distributions raises a ValueError (printing the whole NaN tensor) from inside the
forward pass before the loss can be checked.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch



def _is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return value == value and value not in (float("inf"), float("-inf"))


def first_nonfinite_parameter(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first parameter whose values are not all finite, else None."""
    for name, parameter in named_parameters:
        if not _is_finite(parameter.detach()):
            return name
    return None


def first_nonfinite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """The first tensor a checkpoint would hold that is not all finite, described for a message:
    parameters and buffers (batch-norm statistics) in state_dict order, then the optimizer's state
    per parameter; None when everything is finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not _is_finite(tensor):
            kind = "parameter" if name in dict(model.named_parameters()) else "buffer"
            return f"{kind} {name}"
    if optimizer is None:
        return None
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not _is_finite(value):
                    return f"optimizer state {key!r} of parameter {names.get(id(parameter), '(unnamed)')}"
    return None


def locate_forward(model, terms) -> str:
    """The first non-finite value of a step's forward pass, in computation order (LossTerms)."""
    parameter = first_nonfinite_parameter(model.named_parameters())
    if parameter is not None:
        return f"the weights themselves (parameter {parameter}, changed by an earlier update)"
    if not _is_finite(terms.logits):
        return "the decoder's output logits"
    for group, kl in enumerate(terms.kl_per_group):
        if not _is_finite(kl):
            return f"the KL term of latent group {group}"
    for label, value in (("the reconstruction term", terms.reconstruction),
                         ("the spectral regulariser", terms.spectral),
                         ("the batch-norm regulariser", terms.batchnorm)):
        if not _is_finite(value):
            return label
    return "the loss (its terms are finite; the sum or the weights overflowed)"


def gradients_finite(parameters: Sequence[torch.Tensor]) -> bool:
    """One isfinite on the total gradient norm (parameters without a gradient are skipped)."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # one norm per tensor, fused
    return bool(torch.isfinite(torch.stack(norms)).all())


def locate_gradient(model) -> str:
    """Name the first parameter whose gradient is not finite."""
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not _is_finite(parameter.grad):
            return f"the gradient of parameter {name}"
    return "the gradients (their total norm overflowed)"
