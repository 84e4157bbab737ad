"""--train_new_q: a fresh encoder against the exact, frozen decoder of a trained run.

The new model is built from its own seed, then EVERY decoder tensor of the parent (parameters and
buffers of prior_ftr0, dec_tower, dec_sampler, post_process, image_conditional, stem_decoder,
batch-norm running statistics and counters) is copied into it, and the decoder is frozen: no
gradients, no data-dependent init, batch norm kept in eval mode (model.freeze_decoder). This
fixes defects D1 and D2 of the public MISELBO code (docs/nvae.md 10.5).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import load_nvae_checkpoint, read_checkpoint, resolve_checkpoint_path
from miselbo.storage.safe_io import NotARegularFileError, regular_file
from miselbo.errors import UserError
from miselbo.nvae.model import is_decoder_key


@dataclass(frozen=True)
class Parent:
    """The run a new encoder is trained against."""
    path: Path  # its checkpoint file
    fingerprint: str  # its decoder's fingerprint
    decoder_state: dict  # key -> tensor of every decoder parameter and buffer (CPU)


def parent_checkpoint_path(p_and_q1_path: str) -> Path:
    """The parent's checkpoint file (its real path), with an error that names --p_and_q1_path.

    The storage layer judges the path as typed: a /dev/fd/N pipe from <(cat parent.pt) resolves to
    no real file, so resolving it first would turn the clear pipe refusal into "does not exist"."""
    try:
        return regular_file(resolve_checkpoint_path(p_and_q1_path))
    except CheckpointError as err:
        raise CheckpointError(f"--p_and_q1_path {p_and_q1_path}: {err}") from None
    except NotARegularFileError as err:
        raise NotARegularFileError(f"--p_and_q1_path {p_and_q1_path}: {err}") from None


def read_parent_args(p_and_q1_path: str, trust: bool) -> argparse.Namespace:
    """The parent's stored args (for flag inheritance and the architecture check)."""
    return read_checkpoint(parent_checkpoint_path(p_and_q1_path), trust=trust)["args"]


def load_parent(p_and_q1_path: str, trust: bool) -> Parent:
    """Load the parent strictly and take its decoder; a recorded fingerprint must match it."""
    path = parent_checkpoint_path(p_and_q1_path)
    model, _args, checkpoint = load_nvae_checkpoint(path, map_location="cpu", trust=trust)
    fingerprint = model.decoder_fingerprint()
    recorded = (checkpoint.get("miselbo") or {}).get("decoder_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise CheckpointError(f"parent {path}: its decoder hashes to {fingerprint[:16]}… but the file "
                              f"records {recorded[:16]}…; the file was changed after it was written.")
    state = {key: value for key, value in model.state_dict().items() if is_decoder_key(key)}
    return Parent(path=path, fingerprint=fingerprint, decoder_state=state)


def adopt_decoder(model, parent: Parent) -> None:
    """Copy every decoder tensor of `parent` into `model`, freeze the decoder, verify the copy."""
    decoder_keys = [key for key in model.state_dict() if is_decoder_key(key)]
    missing = [key for key in decoder_keys if key not in parent.decoder_state]
    if missing:
        raise CheckpointError(f"parent {parent.path} lacks decoder tensors {missing[:5]} of this "
                              f"architecture.")
    result = model.load_state_dict({key: parent.decoder_state[key] for key in decoder_keys},
                                   strict=False)
    if result.unexpected_keys or any(is_decoder_key(key) for key in result.missing_keys):
        raise RuntimeError(f"decoder copy incomplete: {result}")  # a bug, not a user error
    model.freeze_decoder()
    copied = model.decoder_fingerprint()
    if copied != parent.fingerprint:
        raise RuntimeError(f"decoder copy differs from the parent: {copied} != {parent.fingerprint}")


def require_recorded_decoder(model, lineage, path: Path) -> None:
    """A resumed new encoder (`model`, loaded from `path`): freeze its decoder and refuse it when
    the decoder differs from the parent decoder its checkpoint records (checkpointing.Lineage)."""
    model.freeze_decoder()
    if model.decoder_fingerprint() != lineage.parent_fingerprint:
        raise CheckpointError(f"{path}: its decoder differs from the parent decoder it records "
                              f"({lineage.parent_path}); the file was changed after writing.")


def refuse_parent_folder(save_dir: Path, parent_file: Path) -> None:
    """A new encoder must never write into its parent's folder (it would replace the parent)."""
    if save_dir.resolve() == parent_file.parent.resolve():
        raise UserError(f"--root/--save point at {save_dir}, the folder of the parent run "
                        f"--p_and_q1_path; the new encoder's checkpoint would overwrite the parent's. "
                        f"Choose another --save.")
