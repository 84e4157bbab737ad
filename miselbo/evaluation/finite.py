"""Non-finite values at evaluation: exit 3 naming the member whose outputs are not finite.

`require_finite_rows` costs one `isfinite` over the per-example estimator rows. Only when it fails
does it re-score the first bad example with each member alone (its own log-weights
log p(x, z) - log q(z | x), one draw) to name the checkpoint responsible.

An evaluation runs inside `miselbo.runtime.distribution_checks.no_distribution_validation`, so a
NaN reaches these checks instead of raising a ValueError from inside the forward pass. Checkpoints with non-finite weights never get this far: reading them is
refused (exit 2, miselbo.storage.checkpoint_fields).
"""
from __future__ import annotations

from typing import Sequence

import torch

EXIT_NONFINITE = 3


class NonFiniteEvaluation(Exception):
    """An evaluation produced NaN or infinite values; the message names the member and example."""
    exit_code = EXIT_NONFINITE


def require_finite_rows(rows: torch.Tensor, example_indices: torch.Tensor, batch_of, models: Sequence,
                        paths: Sequence, device: torch.device) -> None:
    """Raise NonFiniteEvaluation unless every value of rows [n, K] is finite.

    batch_of(i) returns example i as a [1, C, H, W] batch; models / paths are the members.
    """
    finite = torch.isfinite(rows).all(dim=1)  # [n]
    if bool(finite.all()):
        return
    position = int((~finite).nonzero()[0])
    example = int(example_indices[position])
    member = _first_nonfinite_member(batch_of(example).to(device), models)
    if member is None:
        raise NonFiniteEvaluation(
            f"the estimators are not finite on example {example}, although each member's own "
            f"log-weights are: combining members (one member's density of another's draws) "
            f"overflowed. No results were written.")
    raise NonFiniteEvaluation(
        f"member {member + 1} ({paths[member]}) gives non-finite log-weights "
        f"log p(x, z) - log q(z | x) on example {example}: the outputs of that checkpoint are not "
        f"finite (its weights are finite, so the model itself overflows on this input). No results "
        f"were written.")


@torch.no_grad()
def _first_nonfinite_member(x: torch.Tensor, models: Sequence) -> int | None:
    from miselbo.ensemble.log_weights import Ensemble  # the ensemble module is only needed on failure
    generator = torch.Generator(device=x.device).manual_seed(0)
    for index, model in enumerate(models):
        weights = Ensemble([model], check_decoders=False).log_weights(x, 1, generator)
        own = weights.log_p[:, 0] - weights.log_q[:, 0, :, 0]  # [1, 1]
        if not bool(torch.isfinite(own).all()):
            return index
    return None
