"""NVAE-format checkpoints: safe reading, strict loading, atomic saving, architecture checks.

The file format is NVAE's training checkpoint (docs/nvae.md 1.2): a dict with the eight keys
`epoch, state_dict, optimizer, global_step, args, arch_instance, scheduler, grad_scalar`
(`grad_scalar` is NVAE's spelling), plus, for our own runs, an optional `miselbo` entry (a plain
dict: decoder fingerprint, role, seed, parent path and parent fingerprint).

Reading never runs code from the pickle: `torch.load(weights_only=True)` with only
`argparse.Namespace` allowed on top of torch's own safe set. A file that needs any other Python
object is refused with the object's name; `trust=True` (`--trust_checkpoint`) loads it fully.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from miselbo.errors import CheckpointError
from miselbo.storage.checkpoint_fields import validate_checkpoint_fields
from miselbo.nvae.config import BERNOULLI_DATASETS, NVAE_TRAIN_FLAGS, get_arch_cells
from miselbo.errors import SafeIOError
from miselbo.storage.safe_io import atomic_torch_save, read_verified_bytes

logger = logging.getLogger(__name__)

CHECKPOINT_FILE_NAME = "checkpoint.pt"
NVAE_CHECKPOINT_KEYS = ("epoch", "state_dict", "optimizer", "global_step", "args",
                        "arch_instance", "scheduler", "grad_scalar")
# What an NVAE checkpoint legitimately holds beyond tensors and plain containers (checked on the
# golden checkpoints with torch 2.14.1: the pickled Namespace under `args` is all).
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)
# Defaults NVAE's evaluate.py fills for attributes older checkpoints lack (docs/nvae.md 1.3).
CHECKPOINT_BACKFILL = {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}
# Flags that must agree for two checkpoints to share a decoder (or a parent and a new run),
# mapped to NVAE's defaults for files that lack them: category A of docs/nvae.md 1.1 (dataset incl.) plus
# the category-C flags, which change the model's function (res_dist, num_x_bits).
ARCHITECTURE_FLAGS = {flag.name: flag.default for flag in NVAE_TRAIN_FLAGS if flag.category in ("A", "C")}
_WEIGHT_ALIAS_SUFFIX = ".weight_normalized"
_MAX_LISTED_KEYS = 10

ModelFactory = Callable[[argparse.Namespace], nn.Module]


def allow_nvae_checkpoints_in_torch_load() -> None:
    """Let plain torch.load (weights_only, the default since torch 2.6), as NVAE's evaluate.py calls it,
    read NVAE-format checkpoints: registers exactly SAFE_CHECKPOINT_GLOBALS as safe globals, so a file
    needing any other object is still refused by torch. `import train` calls it."""
    torch.serialization.add_safe_globals(list(SAFE_CHECKPOINT_GLOBALS))


# ----------------------------------------------------------------------------- reading

def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file for `path`: the file itself, or `<folder>/checkpoint.pt`."""
    candidate = Path(path)
    if candidate.is_dir():
        inner = candidate / CHECKPOINT_FILE_NAME
        if not inner.is_file():
            raise CheckpointError(f"folder {candidate} holds no {CHECKPOINT_FILE_NAME}; pass the "
                                  f"checkpoint file or the experiment folder that contains it.")
        return inner
    if not candidate.exists():
        if candidate.is_symlink():
            raise CheckpointError(f"checkpoint {candidate} is a symlink that leads nowhere (its "
                                  f"target {os.readlink(candidate)} is missing, or the links loop).")
        raise CheckpointError(f"checkpoint {candidate} does not exist.")
    return candidate


def read_checkpoint(path: str | os.PathLike, map_location="cpu", trust: bool = False) -> dict:
    """Read an NVAE checkpoint dict safely (see the module docstring); verifies a sidecar if any."""
    file_path = resolve_checkpoint_path(path)
    try:  # symlinks followed: the sidecar of the real file verifies the very bytes loaded
        data, _real_path, _verified = read_verified_bytes(file_path)
    except SafeIOError as err:
        raise CheckpointError(str(err)) from err
    except OSError as err:
        raise CheckpointError(f"checkpoint {file_path} cannot be read: {err.strerror or err}.") from err
    checkpoint = _torch_load(io.BytesIO(data), file_path, map_location, trust)
    _require_nvae_layout(checkpoint, file_path)
    validate_checkpoint_fields(checkpoint, file_path, error_type=CheckpointError)
    return checkpoint


def _torch_load(source: io.BytesIO, file_path: Path, map_location, trust: bool):
    """torch.load of `source` (the bytes of `file_path`) with the allow-list (or fully when
    trusted), every failure as CheckpointError."""
    try:
        if trust:
            logger.warning("loading %s fully (--trust_checkpoint): its pickle may run code", file_path)
            return torch.load(source, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust and "weights only load failed" in str(err).lower():
            source.seek(0)
            raise _safe_load_refusal(source, file_path, err) from err
        raise _corruption_error(file_path, err) from err
    except Exception as err:  # a damaged pickle or zip can raise almost anything
        raise _corruption_error(file_path, err) from err


def _safe_load_refusal(source: io.BytesIO, file_path: Path, err: Exception) -> CheckpointError:
    """The error for a file torch's safe unpickler stopped on: unsafe globals, or damage."""
    unsafe_names = _unsafe_globals(source, str(err))
    if not unsafe_names:
        return CheckpointError(
            f"checkpoint {file_path} cannot be read safely: torch's safe unpickler stopped with "
            f"'{_weights_only_reason(str(err))}'. The file is most likely truncated or corrupted; if "
            f"it is an intact file from a source you trust, --trust_checkpoint (trust=True) loads it "
            f"without the safety checks.")
    return CheckpointError(
        f"refused to load checkpoint {file_path}: it needs the Python object(s) "
        f"{', '.join(unsafe_names)}, which an NVAE checkpoint never holds, and unpickling them could "
        f"run arbitrary code. Nothing from the file was executed. If you trust the source of this "
        f"file, --trust_checkpoint (trust=True) loads it fully.")


def _unsafe_globals(source: io.BytesIO, message: str) -> list[str]:
    """Names of the globals the file needs beyond the allow-list (static scan, else torch's message)."""
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # not a zip checkpoint or a damaged one: fall back to torch's message
        names = []
    named_in_message = re.findall(r"GLOBAL ([\w.]+)", message)
    return list(dict.fromkeys(names + named_in_message))


def _weights_only_reason(message: str) -> str:
    """The specific line of torch's weights-only failure message (e.g. 'Unsupported operand 80')."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", message, re.DOTALL)
    return " ".join(match.group(1).split()) if match else message.splitlines()[0]


def _corruption_error(file_path: Path, err: Exception) -> CheckpointError:
    """The error for a file torch.load could not parse; keeps the first sentence of torch's reason."""
    size = file_path.stat().st_size
    first_sentence = re.split(r"(?<=\.)\s", " ".join(str(err).split()), maxsplit=1)[0][:200].rstrip(".")
    return CheckpointError(
        f"checkpoint {file_path} ({size} bytes) is truncated or corrupted (or was not written by "
        f"torch.save) and cannot be loaded (torch.load: {type(err).__name__}: {first_sentence}). "
        f"Use an intact copy, or the previous checkpoint.")


def _require_nvae_layout(checkpoint, file_path: Path) -> None:
    """Raise unless `checkpoint` is a dict with a `state_dict` mapping and a Namespace `args`."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{file_path} is not an NVAE checkpoint: it holds a "
                              f"{type(checkpoint).__name__}, not a dict with 'state_dict' and 'args'.")
    lacking = [key for key in ("state_dict", "args") if key not in checkpoint]
    if lacking:
        raise CheckpointError(f"{file_path} is not an NVAE checkpoint: it lacks {', '.join(lacking)} "
                              f"(its keys: {', '.join(map(str, checkpoint)) or 'none'}).")
    if not isinstance(checkpoint["state_dict"], Mapping):
        raise CheckpointError(f"{file_path} is not an NVAE checkpoint: 'state_dict' is a "
                              f"{type(checkpoint['state_dict']).__name__}, not a mapping of tensors.")
    if not isinstance(checkpoint["args"], argparse.Namespace):
        raise CheckpointError(f"{file_path} is not an NVAE checkpoint: 'args' is a "
                              f"{type(checkpoint['args']).__name__}, not an argparse.Namespace.")


# ----------------------------------------------------------------------------- loading a model

def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with CHECKPOINT_BACKFILL applied to the attributes it lacks."""
    return argparse.Namespace(**{**CHECKPOINT_BACKFILL, **vars(args)})


def load_nvae_checkpoint(path: str | os.PathLike, map_location="cpu", trust: bool = False,
                         model_factory: ModelFactory | None = None):
    """Read, back-fill, build the model and load its state_dict strictly.

    Returns `(model, args, checkpoint)`: the model in eval mode on `map_location`'s device, the
    back-filled args, and the checkpoint dict as read. `model_factory(args)` builds the model
    (default: NVAE's AutoEncoder with the arch table rebuilt from `args.arch_instance`; the stored
    `arch_instance` entry is not used, as in NVAE). Building does not consume the global RNG.
    """
    if not isinstance(map_location, (str, torch.device)):
        raise ValueError(f"load_nvae_checkpoint: map_location must be a device or a device name such "
                         f"as 'cpu' or 'cuda:0', not {map_location!r}.")
    device = torch.device(map_location)
    checkpoint = read_checkpoint(path, map_location=device, trust=trust)
    args = fill_defaults(checkpoint["args"])
    factory = model_factory or build_nvae_model
    try:
        with torch.random.fork_rng(devices=[]):
            model = factory(args)
    except (ValueError, NotImplementedError) as err:
        raise CheckpointError(f"cannot build the model that checkpoint {path} describes: {err}") from err
    load_state_dict_strict(model, checkpoint["state_dict"], source=str(path))
    return model.to(device).eval(), args, checkpoint


def build_nvae_model(args: argparse.Namespace) -> nn.Module:
    """NVAE's AutoEncoder for `args` (writer None, arch table from `args.arch_instance`)."""
    from miselbo.nvae.model import AutoEncoder  # only needed here; keeps this module light
    return AutoEncoder(args, None, get_arch_cells(args.arch_instance))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str = "checkpoint") -> None:
    """Strict load; the only tolerated gap is a missing `.weight_normalized` alias (docs/nvae.md 7.1).

    A missing alias is filled from its sibling `.weight` (same tensor) and logged at debug level.
    Any other missing or unexpected key, or any shape mismatch, raises CheckpointError.
    """
    expected = model.state_dict()
    completed = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):  # module versions, read by some modules' loaders
        completed._metadata = state_dict._metadata
    filled = [key for key in expected
              if key not in completed and key.endswith(_WEIGHT_ALIAS_SUFFIX)
              and _alias_sibling(key) in completed]
    for key in filled:
        completed[key] = completed[_alias_sibling(key)]
    if filled:
        logger.debug("%s: filled %d weight_normalized aliases from their .weight siblings: %s",
                     source, len(filled), ", ".join(filled))
    missing = [key for key in expected if key not in completed]
    unexpected = [key for key in completed if key not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model built from its args: "
                              f"{_key_report(missing, unexpected)}. Was it written by another "
                              f"architecture or another version of the model?")
    _require_same_shapes(expected, completed, source)
    model.load_state_dict(completed, strict=True)


def _alias_sibling(alias_key: str) -> str:
    return alias_key[: -len(_WEIGHT_ALIAS_SUFFIX)] + ".weight"


def _key_report(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:_MAX_LISTED_KEYS])
            more = f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
            parts.append(f"{len(keys)} {label} key(s): {shown}{more}")
    return "; ".join(parts)


def _require_same_shapes(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                         source: str) -> None:
    wrong = [f"{key}: checkpoint {tuple(given[key].shape)} vs model {tuple(value.shape)}"
             for key, value in expected.items() if tuple(given[key].shape) != tuple(value.shape)]
    if wrong:
        shown = "; ".join(wrong[:_MAX_LISTED_KEYS])
        more = f"; ... ({len(wrong) - _MAX_LISTED_KEYS} more)" if len(wrong) > _MAX_LISTED_KEYS else ""
        raise CheckpointError(f"{source} does not match the model built from its args: "
                              f"{len(wrong)} tensor(s) have another shape: {shown}{more}.")


# ----------------------------------------------------------------------------- saving

def save_nvae_checkpoint(path: str | os.PathLike, model: nn.Module, args: argparse.Namespace,
                         optimizer=None, scheduler=None, grad_scaler=None, epoch: int = 0,
                         global_step: int = 0, arch_instance: dict | None = None,
                         miselbo: dict | None = None) -> Path:
    """Write NVAE's 8-key checkpoint (+ optional `miselbo` dict) atomically with a SHA-256 sidecar.

    `path` is a file, or an existing folder that receives `checkpoint.pt`. Tensors are moved to
    the CPU (shared storages stay shared). States of absent optimizer/scheduler/scaler are None.
    `arch_instance` defaults to the arch table of `args.arch_instance`. Returns the file written.
    """
    target = Path(path) / CHECKPOINT_FILE_NAME if Path(path).is_dir() else Path(path)
    _require_plain(vars(args), "args")
    if miselbo is not None:
        _require_plain(miselbo, "the miselbo entry")
    if arch_instance is None:
        arch_instance = get_arch_cells(args.arch_instance)
    checkpoint = {
        "epoch": int(epoch),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "global_step": int(global_step),
        "args": argparse.Namespace(**vars(args)),
        "arch_instance": arch_instance,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "grad_scalar": grad_scaler.state_dict() if grad_scaler is not None else None,
    }
    if miselbo is not None:
        checkpoint["miselbo"] = dict(miselbo)
    atomic_torch_save(_tensors_to_cpu(checkpoint, memo={}), target)
    return target


def _tensors_to_cpu(value, memo: dict):
    """Copy of a nested dict/list/tuple with every tensor on the CPU; views of one storage stay shared."""
    if isinstance(value, torch.Tensor):
        identity = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                    tuple(value.shape), tuple(value.stride()), value.dtype)
        if identity not in memo:
            memo[identity] = value.detach().cpu()
        return memo[identity]
    if isinstance(value, dict):
        copied = type(value)((key, _tensors_to_cpu(item, memo)) for key, item in value.items())
        if hasattr(value, "_metadata"):  # a state_dict's module versions, used when loading
            copied._metadata = value._metadata
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_to_cpu(item, memo) for item in value)
    return value


_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _require_plain(value, where: str) -> None:
    """Raise ValueError unless `value` is built from None/bool/int/float/str, lists, tuples, dicts.

    Anything else would make the checkpoint unreadable by the safe loader.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            _require_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _require_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN_SCALARS):
        raise ValueError(f"cannot save {where} = {value!r} ({type(value).__name__}) in a checkpoint: "
                         f"only None, bool, int, float, str, lists, tuples and dicts load safely.")


# ----------------------------------------------------------------------------- architecture

def architecture_differences(args_a: argparse.Namespace, args_b: argparse.Namespace
                             ) -> list[tuple[str, object, object]]:
    """`(flag, value_a, value_b)` for every ARCHITECTURE_FLAGS entry on which the two disagree.

    Missing attributes take NVAE's default; num_mixture_dec is ignored when both use Bernoulli output.
    """
    differences = []
    for flag, default in ARCHITECTURE_FLAGS.items():
        value_a, value_b = getattr(args_a, flag, default), getattr(args_b, flag, default)
        if value_a != value_b and _flag_matters(flag, args_a, args_b):
            differences.append((flag, value_a, value_b))
    return differences


def _flag_matters(flag: str, args_a: argparse.Namespace, args_b: argparse.Namespace) -> bool:
    if flag != "num_mixture_dec":
        return True
    datasets = {getattr(args, "dataset", ARCHITECTURE_FLAGS["dataset"]) for args in (args_a, args_b)}
    return not datasets <= set(BERNOULLI_DATASETS)  # a Bernoulli head ignores num_mixture_dec


def require_same_architecture(args_a: argparse.Namespace, args_b: argparse.Namespace,
                              label_a: str = "first", label_b: str = "second") -> None:
    """Raise CheckpointError listing every differing architecture flag (e.g. parent vs new run)."""
    differences = architecture_differences(args_a, args_b)
    if differences:
        listed = "; ".join(f"--{flag}: {value_a!r} ({label_a}) vs {value_b!r} ({label_b})"
                           for flag, value_a, value_b in differences)
        raise CheckpointError(f"the {label_a} and {label_b} models have different architectures, so "
                              f"they cannot share a decoder: {listed}.")


def checkpoint_decoder_fingerprint(checkpoint: Mapping, model: nn.Module) -> str:
    """The decoder fingerprint recorded in the `miselbo` entry, else `model.decoder_fingerprint()`.

    `model` must hold the checkpoint's weights (NVAE's own files carry no fingerprint).
    """
    recorded = (checkpoint.get("miselbo") or {}).get("decoder_fingerprint")
    return recorded if recorded is not None else model.decoder_fingerprint()
