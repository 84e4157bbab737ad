"""Field-by-field validation of a checkpoint dict, before any model is built from it.

A file can be a valid, safe pickle and still be damaged: wrong types or missing keys in `args` or
in the `miselbo` entry, state_dict values that are not tensors, NaN or infinite weights, or
architecture numbers that would allocate tens of GB. `validate_checkpoint_fields` refuses each
with a CheckpointError naming the file, the field, what was expected and what was found.

Model size: parameters are bounded by MAX_MODEL_PARAMETERS (float32, so 4 bytes each; 2^30
parameters = 4 GiB; the environment variable MISELBO_MAX_MODEL_PARAMETERS overrides it). A
cheap upper bound from the architecture flags is computed first; only when it exceeds the limit
is the model built on PyTorch's "meta" device (no memory) to count its parameters exactly.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from miselbo.nvae.config import NVAE_TRAIN_FLAGS

DEFAULT_MAX_MODEL_PARAMETERS = 2 ** 30
KNOWN_ROLES = ("p_and_q", "q")
_FLAGS = {flag.name: flag for flag in NVAE_TRAIN_FLAGS}
# Flags the model builder reads; older NVAE files may lack the three back-filled ones.
_BACKFILLED = ("ada_groups", "min_groups_per_scale", "num_mixture_dec")
REQUIRED_ARGS = tuple(flag.name for flag in NVAE_TRAIN_FLAGS
                      if flag.category in ("A", "C") and flag.name not in _BACKFILLED)
# Inclusive ranges of integer flags: far beyond any published NVAE model, but small enough that
# even the meta-device build stays quick.
ARCH_RANGES = {
    "num_nf": (0, 16), "num_x_bits": (1, 16), "num_latent_scales": (1, 6),
    "num_groups_per_scale": (1, 128), "num_latent_per_group": (1, 1024),
    "min_groups_per_scale": (1, 128), "num_channels_enc": (1, 4096), "num_channels_dec": (1, 4096),
    "num_preprocess_blocks": (1, 6), "num_preprocess_cells": (1, 64),
    "num_cell_per_cond_enc": (1, 64), "num_postprocess_blocks": (1, 6),
    "num_postprocess_cells": (1, 64), "num_cell_per_cond_dec": (1, 64), "num_mixture_dec": (1, 100),
    "batch_size": (1, 10 ** 6),  # evaluation reuses it for its batches
}


class _FieldError(Exception):
    def __init__(self, field: str, expected: str, found: object):
        super().__init__(field)
        self.field, self.expected, self.found = field, expected, found


@dataclass(frozen=True)
class _Check:
    """Expected type(s) of one field, with an optional inclusive range."""
    types: tuple
    label: str
    low: float | None = None
    high: float | None = None


def max_model_parameters() -> int:
    """The parameter limit: MISELBO_MAX_MODEL_PARAMETERS if set (a whole number), else 2^30."""
    text = os.environ.get("MISELBO_MAX_MODEL_PARAMETERS", "")
    return int(text) if text.isdigit() and int(text) > 0 else DEFAULT_MAX_MODEL_PARAMETERS


def validate_checkpoint_fields(checkpoint: Mapping, file_path: Path, error_type=ValueError) -> None:
    """Raise `error_type` (one paragraph: file, field, expected, found) for the first bad field."""
    try:
        _check_top_level(checkpoint)
        _check_args(checkpoint["args"])
        _check_miselbo_entry(checkpoint.get("miselbo"))
        _check_state_dict(checkpoint["state_dict"])
        _check_model_size(checkpoint["args"])
    except _FieldError as err:
        raise error_type(f"checkpoint {file_path} is damaged: field {err.field} should be "
                         f"{err.expected}, but it is {_describe(err.found)}. The file is a valid "
                         f"pickle, so it was most likely edited or written by other software; use "
                         f"an intact copy.") from None


def architecture_problem(args: argparse.Namespace) -> str | None:
    """For a command line: why the architecture flags of `args` are out of range or describe a
    model above the parameter limit (one sentence naming the flag), else None."""
    try:
        for name in REQUIRED_ARGS + _BACKFILLED:
            if name in vars(args):
                _check_value(f"--{name}", vars(args)[name], _flag_check(name))
        _check_model_size(args)
    except _FieldError as err:
        field = "the model" if err.field.startswith("args") else err.field
        return f"{field} should be {err.expected}, but it is {_describe(err.found)}"
    return None


def _describe(value: object) -> str:
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return value[1:-1]  # already a description
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{shown} ({type(value).__name__})"


def _check_value(field: str, value: object, check: _Check) -> None:
    if isinstance(value, bool) and bool not in check.types:
        raise _FieldError(field, check.label, value)
    if not isinstance(value, check.types):
        raise _FieldError(field, check.label, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _FieldError(field, f"a finite {check.label}", value)
    if check.low is not None and value < check.low or check.high is not None and value > check.high:
        raise _FieldError(field, f"{check.label} in [{check.low}, {check.high}]", value)


_WHOLE = _Check((int,), "a whole number >= 0", 0, None)
_OPTIONAL_DICT = _Check((dict, type(None)), "a dict or None")


def _check_top_level(checkpoint: Mapping) -> None:
    for key in ("epoch", "global_step"):
        if key in checkpoint:
            _check_value(key, checkpoint[key], _WHOLE)
    for key in ("optimizer", "scheduler", "grad_scalar", "arch_instance"):
        if key in checkpoint:
            _check_value(key, checkpoint[key], _OPTIONAL_DICT)


def _flag_check(name: str) -> _Check:
    flag = _FLAGS[name]
    if flag.type is None:
        return _Check((bool,), "True or False")
    if flag.type is int:
        low, high = ARCH_RANGES.get(name, (None, None))
        return _Check((int,), "a whole number", low, high)
    if flag.type is float:
        return _Check((int, float), "a number")
    if flag.category in ("A", "C"):
        return _Check((str,), "a string")
    return _Check((str, type(None)), "a string or None")  # paths and addresses may be unset


def _check_args(args: argparse.Namespace) -> None:
    values = vars(args)
    for name in REQUIRED_ARGS:
        if name not in values:
            raise _FieldError(f"args.{name}", "present (the model is built from it)", "<missing>")
    for name in _FLAGS:  # every NVAE flag the file holds
        if name in values:
            _check_value(f"args.{name}", values[name], _flag_check(name))


_HEX64 = re.compile(r"[0-9a-f]{64}")
_RESUME_CHECKS = {"step_in_epoch": _WHOLE, "epoch_loss_count": _WHOLE,
                  "epoch_loss_sum": _Check((int, float), "a number")}


def _check_miselbo_entry(entry: object) -> None:
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise _FieldError("miselbo", "a dict", entry)
    if "role" in entry and entry["role"] not in KNOWN_ROLES:
        raise _FieldError("miselbo.role", f"one of {', '.join(KNOWN_ROLES)}", entry["role"])
    if "seed" in entry:
        _check_value("miselbo.seed", entry["seed"], _Check((int,), "a whole number"))
    for key in ("decoder_fingerprint", "parent_fingerprint"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, str) and _HEX64.fullmatch(value)):
            raise _FieldError(f"miselbo.{key}", "None or 64 lowercase hex digits", value)
    if entry.get("parent_path") is not None:
        _check_value("miselbo.parent_path", entry["parent_path"], _Check((str,), "a string or None"))
    resume = entry.get("resume")
    if resume is not None:
        if not isinstance(resume, dict):
            raise _FieldError("miselbo.resume", "a dict", resume)
        for key, check in _RESUME_CHECKS.items():
            if key in resume:
                _check_value(f"miselbo.resume.{key}", resume[key], check)


def _check_state_dict(state_dict: Mapping) -> None:
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise _FieldError(f"state_dict key {key!r}", "a string", key)
        if not isinstance(value, torch.Tensor):
            raise _FieldError(f"state_dict[{key!r}]", "a tensor", value)
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise _FieldError(f"state_dict[{key!r}]", "finite weights",
                              f"<a tensor of shape {tuple(value.shape)} with {bad} NaN/inf value(s)>")


# ----------------------------------------------------------------------------- model size

def parameter_upper_bound(args: argparse.Namespace) -> int:
    """A generous upper bound on the parameter count of the NVAE model `args` describes.

    Every cell is counted at the widest channel count the model reaches (the base width doubles at
    each down-sampling), at 64 C^2 + 64 C parameters per cell (NVAE's widest cell, an inverted
    bottleneck with expansion 6 and squeeze-and-excitation, has about 13 C^2), plus 64 L C per
    latent group for its samplers and 256 L^2 per flow cell (L = latent channels per group).
    """
    values = vars(args)
    width = max(values["num_channels_enc"], values["num_channels_dec"])
    widest = width * 2 ** (values["num_preprocess_blocks"] + values["num_latent_scales"] - 1)
    groups = values["num_latent_scales"] * values["num_groups_per_scale"]
    cells = (values["num_preprocess_blocks"] * values["num_preprocess_cells"]
             + values["num_postprocess_blocks"] * values["num_postprocess_cells"]
             + groups * (values["num_cell_per_cond_enc"] + values["num_cell_per_cond_dec"]
                         + 4 + 2 * values["num_nf"]) + 4)
    latent = values["num_latent_per_group"]
    flows = groups * values["num_nf"] * 256 * latent * latent  # measured: about 120 L^2 per flow
    return cells * (64 * widest * widest + 64 * widest) + groups * 64 * latent * widest + flows


def exact_parameter_count(args: argparse.Namespace) -> int:
    """Parameters of the model `args` describes, counted on the meta device (no memory used)."""
    from miselbo.nvae.config import get_arch_cells
    from miselbo.nvae.model import AutoEncoder
    filled = argparse.Namespace(**{"ada_groups": False, "min_groups_per_scale": 1,
                                   "num_mixture_dec": 10, **vars(args)})
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = AutoEncoder(filled, None, get_arch_cells(filled.arch_instance))
    return sum(parameter.numel() for parameter in model.parameters())


def _check_model_size(args: argparse.Namespace) -> None:
    limit = max_model_parameters()
    if parameter_upper_bound(args) <= limit:
        return
    if any(not isinstance(vars(args).get(name), int) for name in ARCH_RANGES if name in vars(args)):
        return  # a type error is reported by the field checks
    try:
        count = exact_parameter_count(args)
    except (ValueError, NotImplementedError, KeyError):
        return  # the normal build reports an unsupported data set or architecture name
    if count > limit:
        raise _FieldError("args (architecture)", f"a model of at most {limit:,} parameters "
                          f"({limit * 4 / 2 ** 30:.1f} GiB in float32; set "
                          f"MISELBO_MAX_MODEL_PARAMETERS to allow more)",
                          f"<a model of {count:,} parameters ({count * 4 / 2 ** 30:.1f} GiB)>")
