"""torch.distributions' argument checks, switched off where our own finiteness checks take over.

Inside `no_distribution_validation()` a NaN in a distribution's parameters reaches the caller's
checks (which name the member, group or parameter responsible) instead of raising a ValueError,
with the whole tensor printed, from inside the forward pass.
"""
import contextlib

import torch


@contextlib.contextmanager
def no_distribution_validation():
    """torch.distributions argument validation off for the block (restored afterwards)."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)
