"""The memory layout of models on the CPU: channels-last weights, for training and evaluation.

PyTorch's CPU (oneDNN) convolutions with few channels run faster when the weights are channels-last
(`python benchmarks/cpu_layout.py` times evaluation batches and training steps in both layouts on
one machine and prints the ratios). Every activation after the first convolution follows the
weights' layout. Values change only by float rounding: tests/test_ensemble_reduced.py compares the
two layouts at evaluation, tests/test_train_run.py a short training run. CUDA models are left in
the default layout, as NVAE runs them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def use_fast_cpu_layout(models: Sequence[nn.Module]) -> None:
    """Put the 4-d weights (and buffers) of every CPU model in channels-last layout, in place."""
    for model in models:
        if next(model.parameters()).device.type == "cpu":
            model.to(memory_format=torch.channels_last)
