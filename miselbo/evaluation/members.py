"""Finding and loading the checkpoints of an ensemble: one decoder, S encoders.

* `discover_demo_ensemble(models_dir)`: the ensemble under `models/` (a folder with a
  `manifest.json` listing its checkpoints in order, e.g. `models/mnist5k_demo/`).
* `expand_checkpoint_paths(paths)`: every argument is a checkpoint file, a run folder holding
  `checkpoint.pt`, or an ensemble folder holding `manifest.json` (expanded to its list).
* `load_members(paths, ...)`: loads every checkpoint safely and strictly, one at a time, checks
  that all have the architecture of the first (naming the flags that differ) and the same decoder
  fingerprint (naming the checkpoints that differ), then makes every member use the first member's
  decoder modules, so memory holds one decoder. A checkpoint file given twice, or two members with
  equal encoder weights, is refused naming both positions (unless duplicates are allowed).

Data-set names: our checkpoints store NVAE's name in `args.dataset` ('mnist') and the data set the
run read in `args.miselbo_dataset` ('mnist5k'); a file that stores 'mnist5k' in `args.dataset` is
built as 'mnist' too (`miselbo.data.datasets.nvae_dataset_name`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import (CHECKPOINT_FILE_NAME, build_nvae_model, checkpoint_decoder_fingerprint,
                                         load_nvae_checkpoint, require_same_architecture)
from miselbo.errors import UserError
from miselbo.data.datasets import NVAE_EQUIVALENT
from miselbo.ensemble.shared_decoder import share_decoder
from miselbo.nvae.model import AutoEncoder, is_decoder_key
from miselbo.runtime import flags

MANIFEST_FILE_NAME = "manifest.json"
DEMO_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
PREFERRED_DEMO = "mnist5k_demo"


# ----------------------------------------------------------------------------- finding checkpoints

def _manifest_content(folder: Path) -> dict:
    manifest = folder / MANIFEST_FILE_NAME
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the ensemble manifest {manifest}: {err}.") from err
    return content if isinstance(content, dict) else {}


def read_manifest(folder: Path) -> list[Path]:
    """The checkpoint paths a `manifest.json` lists ({"checkpoints": [...]}), relative to its folder."""
    manifest = folder / MANIFEST_FILE_NAME
    content = _manifest_content(folder)
    listed = content.get("checkpoints")
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise UserError(f"{manifest} must hold {{\"checkpoints\": [\"<path>\", ...]}} with the member "
                        f"checkpoints in order (paths relative to {folder}).")
    if not listed:
        raise UserError(f"{manifest} lists no checkpoints; an ensemble needs at least one.")
    return [folder / item for item in listed]


# The manifest's eval_defaults a plain miselbo_eval.py takes, each checked like its flag: L, and
# how the examples and samples were grouped when the ensemble's table was made (batch and chunk
# size decide which random draws each example gets, so they reproduce that table).
EVAL_DEFAULT_CHECKS = {"num_iw_samples": flags.count, "batch_size": flags.count, "chunk_size": flags.count}


def read_eval_defaults(folder: Path) -> dict:
    """The manifest's optional `eval_defaults` ({flag name: value}, e.g. num_iw_samples): what a
    plain `miselbo_eval.py` uses for this ensemble where the user typed nothing. Every value is
    checked as strictly as its flag (a whole number, not a bool, in range: 2.7 or true are refused,
    never rounded), and an unknown name is refused; the message names the file and the field."""
    manifest = folder / MANIFEST_FILE_NAME
    defaults = _manifest_content(folder).get("eval_defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{manifest}: eval_defaults must be an object of flag values, got "
                        f"{json.dumps(defaults)}.")
    unknown = sorted(name for name in defaults if name not in EVAL_DEFAULT_CHECKS)
    if unknown:
        raise UserError(f"{manifest}: eval_defaults holds {', '.join(map(repr, unknown))}, which "
                        f"miselbo_eval.py does not take from a manifest (known: "
                        f"{', '.join(EVAL_DEFAULT_CHECKS)}). Fix the manifest or pass the flags.")
    for name, check in EVAL_DEFAULT_CHECKS.items():
        if name in defaults:
            check(f"{manifest}: eval_defaults.{name}", defaults[name], as_json=True)
    return defaults


def discover_demo_folder(models_dir: Path = DEMO_MODELS_DIR) -> Path:
    """The ensemble folder in `models_dir`: the one folder with a manifest.json (`mnist5k_demo`
    when there are several)."""
    folders = sorted(path.parent for path in Path(models_dir).glob(f"*/{MANIFEST_FILE_NAME}"))
    if not folders:
        raise UserError(f"no checkpoints given and no ensemble in {models_dir} yet (a folder there with "
                        f"a {MANIFEST_FILE_NAME} listing its checkpoints). Pass --checkpoints C1 C2 ... "
                        f"(checkpoint files or run folders holding {CHECKPOINT_FILE_NAME}), or train an "
                        f"ensemble first (see README.md).")
    preferred = [folder for folder in folders if folder.name == PREFERRED_DEMO]
    if len(folders) > 1 and not preferred:
        raise UserError(f"no checkpoints given and several ensembles in {models_dir}: "
                        f"{', '.join(f.name for f in folders)}; pass --checkpoints <folder> to choose one.")
    return (preferred or folders)[0]


def discover_demo_ensemble(models_dir: Path = DEMO_MODELS_DIR) -> list[Path]:
    """The checkpoints of the ensemble `discover_demo_folder` finds."""
    return read_manifest(discover_demo_folder(models_dir))


def is_ensemble_folder(path: Path) -> bool:
    """An ensemble folder: a manifest.json and no checkpoint.pt of its own."""
    return path.is_dir() and (path / MANIFEST_FILE_NAME).is_file() and not (path / CHECKPOINT_FILE_NAME).is_file()


def defaults_folder(given: Sequence[str | Path]) -> Path | None:
    """The ensemble folder whose eval_defaults apply: the one folder given alone, else None."""
    if len(given) == 1 and is_ensemble_folder(Path(given[0])):
        return Path(given[0])
    return None


def expand_checkpoint_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Each path as given, except ensemble folders (manifest.json, no checkpoint.pt): their list."""
    expanded = []
    for path in map(Path, paths):
        expanded += read_manifest(path) if is_ensemble_folder(path) else [path]
    return expanded


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file a member argument names (a run folder stands for its checkpoint.pt)."""
    path = Path(path)
    return path / CHECKPOINT_FILE_NAME if path.is_dir() else path


def _file_identity(path: Path):
    try:
        stat = path.stat()
    except OSError:
        return None  # missing: load_members names it
    return stat.st_dev, stat.st_ino


def refuse_repeated_files(paths: Sequence[str | Path]) -> None:
    """UserError naming both positions when one checkpoint file is given twice (also through a run
    folder, a symbolic or a hard link): such an ensemble counts one encoder twice."""
    seen = {}
    for position, path in enumerate(paths, start=1):
        identity = _file_identity(checkpoint_file(path))
        if identity is None:
            continue
        if identity in seen:
            first, first_path = seen[identity]
            raise UserError(f"members {first} and {position} are the same checkpoint file ({first_path} and "
                            f"{path}): the ensemble would count one encoder twice (its JSD would be 0 "
                            f"and MISELBO that of fewer members). Remove one, or pass "
                            f"--allow_duplicate_members if this is meant.")
        seen[identity] = (position, path)


def first_decoder_difference(first: AutoEncoder, other: AutoEncoder) -> str:
    """' (first differing decoder tensor: NAME, ...)' for a message, or '' when the decoder tensors
    are equal (then only the recorded fingerprints differ)."""
    mine, theirs = first.state_dict(), other.state_dict()
    differing = [key for key in mine if is_decoder_key(key) and
                 (key not in theirs or mine[key].shape != theirs[key].shape or not torch.equal(mine[key], theirs[key]))]
    if not differing:
        return ""
    more = f", and {len(differing) - 1} more" if len(differing) > 1 else ""
    return f" (first differing decoder tensor: {differing[0]}{more})"


def encoder_fingerprint(model: AutoEncoder) -> str:
    """SHA-256 hex over name, dtype, shape and bytes of every encoder parameter and buffer."""
    digest = hashlib.sha256()
    state = model.state_dict(keep_vars=True)
    for key in sorted(state):
        value = state[key]
        if is_decoder_key(key):
            continue
        if key.endswith(".weight_normalized") and state.get(key[:-len("_normalized")]) is value:
            continue  # the alias of a conv without weight norm: the same tensor as its weight
        data = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def duplicate_encoders(paths: Sequence[Path], models: Sequence[AutoEncoder]) -> list[tuple[int, int]]:
    """(first, second) 1-based positions of members whose encoders hash equal (each later member
    paired with the first one it equals)."""
    first_with = {}
    pairs = []
    for position, model in enumerate(models, start=1):
        fingerprint = encoder_fingerprint(model)
        if fingerprint in first_with:
            pairs.append((first_with[fingerprint], position))
        else:
            first_with[fingerprint] = position
    return pairs


# ----------------------------------------------------------------------------- loading

def model_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of checkpoint args with `dataset` the NVAE name the model is built for."""
    return argparse.Namespace(**dict(vars(args), dataset=NVAE_EQUIVALENT.get(args.dataset, args.dataset)))


def build_member_model(args: argparse.Namespace) -> AutoEncoder:
    """load_nvae_checkpoint's model factory: NVAE's AutoEncoder for our data-set names too."""
    return build_nvae_model(model_args(args))


def evaluation_dataset_of(args: argparse.Namespace) -> str:
    """The data set a checkpoint's run read: `miselbo_dataset` if recorded, else `dataset`."""
    return getattr(args, "miselbo_dataset", None) or args.dataset


@dataclass
class LoadedMembers:
    """The loaded ensemble: models (sharing models[0]'s decoder), the first checkpoint's args and
    every checkpoint's decoder fingerprint. `decoder_problems` names each checkpoint whose decoder
    differs from the first one's or from its own record (non-empty only when that was allowed)."""
    paths: list[Path]
    models: list[AutoEncoder]
    args: argparse.Namespace
    fingerprints: list[str]
    decoder_problems: list[str] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # equal encoders (allowed only)


def load_members(paths: Sequence[str | Path], device: torch.device | str = "cpu", trust: bool = False,
                 allow_decoder_mismatch: bool = False, allow_duplicates: bool = False) -> LoadedMembers:
    """Load the ensemble's checkpoints (see the module docstring); errors are CheckpointError/UserError.

    The decoder fingerprint of a checkpoint is the one its `miselbo` entry records, else the hash of
    its decoder weights; a recorded fingerprint that the weights do not reproduce counts as a
    mismatch too. With allow_decoder_mismatch, mismatches are listed in `decoder_problems` instead.
    A checkpoint file given twice, or two members whose encoder weights hash equal, is refused
    naming both positions; with allow_duplicates they are listed in `duplicates` instead.
    """
    if len(paths) == 0:
        raise UserError("the checkpoint list is empty; pass at least one checkpoint (S >= 1).")
    if not allow_duplicates:
        refuse_repeated_files(paths)
    loaded = None
    for path in map(Path, paths):
        model, args, checkpoint = load_nvae_checkpoint(path, map_location=device, trust=trust,
                                                       model_factory=build_member_model)
        fingerprint = checkpoint_decoder_fingerprint(checkpoint, model)
        problems = []
        actual = model.decoder_fingerprint()
        if fingerprint != actual:
            against_first = "" if loaded is None else first_decoder_difference(loaded.models[0], model)
            problems.append(f"{path} records decoder fingerprint {fingerprint[:16]}... but its decoder "
                            f"weights hash to {actual[:16]}... (edited or mislabelled file){against_first}")
        if loaded is None:
            loaded = LoadedMembers([], [], args, [])
        else:
            require_same_architecture(model_args(loaded.args), model_args(args), str(loaded.paths[0]),
                                      str(path))
            if fingerprint != loaded.fingerprints[0]:
                problems.append(f"{path} has decoder {fingerprint[:16]}... but {loaded.paths[0]} has "
                                f"{loaded.fingerprints[0][:16]}...{first_decoder_difference(loaded.models[0], model)}")
            share_decoder(loaded.models[0], model)
        loaded.paths.append(path)
        loaded.models.append(model)
        loaded.fingerprints.append(fingerprint)
        loaded.decoder_problems += problems
    if loaded.decoder_problems and not allow_decoder_mismatch:
        raise CheckpointError(
            f"the checkpoints do not share one decoder: {'; '.join(loaded.decoder_problems)}. MISELBO "
            f"scores every encoder's samples under one common p(x, z), so mixing decoders would compare "
            f"different models. Train new encoders against the first checkpoint (train.py --train_new_q "
            f"--p_and_q1_path ...), or pass --allow_decoder_mismatch to use the first checkpoint's decoder "
            f"for every member anyway.")
    loaded.duplicates = duplicate_encoders(loaded.paths, loaded.models)
    if loaded.duplicates and not allow_duplicates:
        first, second = loaded.duplicates[0]
        raise UserError(f"members {first} and {second} have identical encoder weights ({loaded.paths[first - 1]} "
                        f"and {loaded.paths[second - 1]}): the ensemble would count one encoder twice "
                        f"(its JSD would be 0). Train another encoder (train.py --train_new_q with "
                        f"another --seed), remove one, or pass --allow_duplicate_members if this is meant.")
    return loaded
