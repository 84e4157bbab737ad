"""The per-epoch test on a fixed subset of the test set, leaving training exactly as after NVAE's
full per-epoch test (--epoch_test_examples).

NVAE's per-epoch test draws its posterior samples from the global random generator and its
binarisation from the test set's generator, so the draws training makes afterwards depend on it.
Here the subset is tested on a forked, fixed random state; then both generators are advanced
exactly as the full test would have advanced them, without running the model:
  - the test loader is iterated once (the same binarisation draws, no forward pass);
  - the model's global draws are replayed with the same sizes, in the same order: a generator's
    state after a call depends only on the call and its size, not on what is done with the numbers.
The sizes come from recording one forward pass of 1 and of 2 rows; every recorded draw must be a
`torch.randn` whose leading dimension is the number of rows (otherwise `UnreplayableDraws`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from miselbo.training.evaluation import DEFAULT_MAX_ROWS, samples_per_pass

# Functions that draw from a random generator; only torch.randn without a generator is replayed.
_RANDOM_FUNCTIONS = {torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like,
                     torch.randint_like, torch.normal, torch.bernoulli, torch.multinomial,
                     torch.randperm, torch.poisson, torch.Tensor.normal_, torch.Tensor.uniform_,
                     torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.random_,
                     torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_}


class UnreplayableDraws(RuntimeError):
    """The model's test pass draws random numbers this module cannot replay by size."""


@dataclass(frozen=True)
class Draw:
    """One torch.randn call of a forward pass: size (rows, *per_row), dtype, device."""
    per_row: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class _DrawRecorder(TorchFunctionMode):
    """Records (size, dtype, device) of global torch.randn calls; notes any other random call."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[tuple[int, ...], torch.dtype, torch.device]] = []
        self.others: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.randn and kwargs.get("generator") is None:
            self.sizes.append((tuple(result.shape), result.dtype, result.device))
        elif func in _RANDOM_FUNCTIONS and kwargs.get("generator") is None:
            self.others.append(getattr(func, "__name__", str(func)))
        return result


def _record(model, x: torch.Tensor) -> _DrawRecorder:
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), _DrawRecorder() as recorder:
        model(x)
    return recorder


def record_draws(model, x_row: torch.Tensor) -> list[Draw]:
    """The global draws of one eval-mode forward pass, per row; x_row [1, C, H, W] pre-processed.

    Recorded on a forked random state (nothing is consumed). Raises UnreplayableDraws unless the
    passes of 1 and 2 rows make the same randn calls with leading dimension 1 and 2.
    """
    one, two = _record(model, x_row), _record(model, x_row.repeat(2, 1, 1, 1))
    if one.others or two.others:
        raise UnreplayableDraws(f"the test pass calls {sorted(set(one.others + two.others))}")
    plain = [(size[1:], dtype, device) for size, dtype, device in one.sizes if size[:1] == (1,)]
    doubled = [(size[1:], dtype, device) for size, dtype, device in two.sizes if size[:1] == (2,)]
    if len(plain) != len(one.sizes) or plain != doubled:
        raise UnreplayableDraws("the test pass draws random numbers whose size does not scale "
                                "with the number of rows")
    return [Draw(per_row, dtype, device) for per_row, dtype, device in plain]


def advance_like_full_test(loader, draws: list[Draw], num_samples: int,
                           max_rows: int = DEFAULT_MAX_ROWS) -> None:
    """Advance the test set's and the global generators as evaluation.evaluate_bounds(loader,
    ., num_samples) would: the same batches are drawn, the same randn sizes drawn and dropped."""
    for images, *_ in loader:
        batch = images.shape[0]
        for count in samples_per_pass(batch, num_samples, max_rows):
            for draw in draws:
                torch.randn((count * batch, *draw.per_row), dtype=draw.dtype, device=draw.device)
