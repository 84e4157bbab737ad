"""How a training step computes: train.py --precision {auto,fp32,fp16,bf16} (docs/nvae.md 8.4, 8.5).

  fp32  no autocast, no gradient scaling (the GradScaler exists but is disabled; its state is {}).
  fp16  NVAE's training step: forward and loss under autocast in float16, the loss scaled before
        backward, GradScaler.step (which skips a step whose gradients hold inf/NaN) and update,
        with NVAE's settings (init_scale 2^10, growth 2, back-off 0.5, interval 2000); its state
        is the checkpoint's `grad_scalar`. On CPU through torch's CPU autocast and CPU GradScaler.
  bf16  forward and loss under autocast in bfloat16, no scaling: bfloat16 has float32's exponent
        range, so gradients do not overflow where float32's would not.
  auto  what NVAE does on the device: fp16 on CUDA; fp32 on CPU.

In every mode the parameters, their gradients and the optimizer state stay float32 ("master
weights"): autocast computes the ops it lowers on reduced-precision copies, so a frozen decoder
is never written. The tests after each epoch and at the end, like evaluation, run in float32
without autocast, as NVAE's test routine does. A precision the device cannot run is refused with
a UserError naming --precision, before any process starts.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from dataclasses import dataclass

import torch

from miselbo.errors import UserError
from miselbo.training.settings import GRAD_SCALER_INIT_SCALE

PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
DESCRIPTIONS = {
    "fp32": "float32, no autocast",
    "fp16": "autocast float16 over forward and loss, scaled backward (GradScaler), float32 weights",
    "bf16": "autocast bfloat16 over forward and loss, no scaling, float32 weights",
}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (`name` is fp32, fp16 or bf16) on a device type (cpu, cuda)."""
    name: str
    device_type: str

    def __post_init__(self):
        if self.name not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.name!r}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return AUTOCAST_DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        """Whether backward runs on a scaled loss through an enabled GradScaler (fp16 only)."""
        return self.name == "fp16"

    def autocast(self):
        """The context a training step's forward and loss run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def new_grad_scaler(self) -> torch.amp.GradScaler:
        """NVAE's GradScaler, enabled for fp16 only."""
        return torch.amp.GradScaler(self.device_type, init_scale=GRAD_SCALER_INIT_SCALE,
                                    enabled=self.scaled)

    def describe(self) -> str:
        return f"{self.name} ({DESCRIPTIONS[self.name]})"


def default_precision(device: torch.device) -> Precision:
    """`auto`: NVAE's float16 training on CUDA, float32 elsewhere."""
    return Precision("fp16" if device.type == "cuda" else "fp32", device.type)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The Precision --precision `requested` gives on `device`; UserError if the device cannot run it."""
    if requested == "auto":
        return default_precision(device)
    if requested not in AUTOCAST_DTYPES:
        raise UserError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}.")
    precision = Precision(requested, device.type)
    problem = unsupported_reason(precision)
    if problem is not None:
        raise UserError(f"--precision {requested} cannot run on {device}: {problem}. Use --precision "
                        f"fp32 (or auto) on this device.")
    return precision


def unsupported_reason(precision: Precision) -> str | None:
    """Why `precision` cannot train on its device type, or None when it can."""
    if precision.dtype is None:
        return None
    if precision.device_type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if precision.name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "this GPU has no native bfloat16"
        return None
    if not torch.amp.is_autocast_available(precision.device_type):
        return f"this PyTorch has no autocast for {precision.device_type}"
    return probe_failure(precision.name, precision.device_type)


@functools.lru_cache(maxsize=None)
def probe_failure(name: str, device_type: str) -> str | None:
    """Run a small convolution, its backward and a GradScaler step under the precision; the error
    message if any of it fails (the ops this PyTorch build lacks for that dtype on the device)."""
    precision = Precision(name, device_type)
    try:
        weight = torch.nn.Parameter(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0),
                                                device=device_type))
        x = torch.ones(2, 2, 6, 6, device=device_type)
        with precision.autocast():
            loss = torch.nn.functional.conv2d(x, weight, padding=1).float().square().mean()
        scaler = precision.new_grad_scaler()
        optimizer = torch.optim.SGD([weight], lr=0.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


def precision_of(args: argparse.Namespace, device: torch.device) -> Precision:
    """The run's precision: its namespace's --precision (NVAE's own namespaces lack it: auto)."""
    return resolve_precision(getattr(args, "precision", None) or "auto", device)
