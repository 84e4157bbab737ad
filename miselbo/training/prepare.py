"""From the command line to a checked run: parse, inherit flags, validate, check the save folder.

Everything a user can get wrong is refused here, before any process starts, with one paragraph
that says what and how to fix it (exit status 2 through miselbo.runtime.cli.run_cli).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import CHECKPOINT_FILE_NAME, read_checkpoint
from miselbo.errors import UserError
from miselbo.storage.safe_io import UnwritableFolderError
from miselbo.training.joint_checkpoints import first_component_checkpoint
from miselbo.training.new_encoder import (parent_checkpoint_path, read_parent_args,
                                          refuse_parent_folder)
from miselbo.training.options import (build_parser, experiment_folder, explicit_flags,
                                      inherit_flags, to_nvae_namespace, validate_architecture,
                                      validate_modes, validate_numbers)


def resolve_run_args(argv: Sequence[str]) -> argparse.Namespace:
    """The run's NVAE-format namespace (options.py) for `argv`, inheritance applied and checked."""
    args = build_parser().parse_args(list(argv))
    validate_numbers(args)
    if args.cont_training:
        path = _own_checkpoint(args)
        stored = read_checkpoint(path, trust=args.trust_checkpoint)["args"]
        args = inherit_flags(args, explicit_flags(argv), stored, new_encoder=False,
                             label=f"checkpoint {path}")
    elif args.train_new_q:
        validate_modes(args)
        stored = read_parent_args(args.p_and_q1_path, args.trust_checkpoint)
        label = f"parent {parent_checkpoint_path(args.p_and_q1_path)}"
        args = inherit_flags(args, explicit_flags(argv), stored, new_encoder=True, label=label)
    validate_numbers(args)
    validate_modes(args)
    run_args = to_nvae_namespace(args)
    validate_architecture(run_args)
    return run_args


def _own_checkpoint(args: argparse.Namespace) -> Path:
    folder = experiment_folder(args.root, args.save)
    path = folder / CHECKPOINT_FILE_NAME
    if not path.is_file() and first_component_checkpoint(folder).is_file():
        path = first_component_checkpoint(folder)  # a joint run (--num_new_encoders): its args
    if not path.is_file():
        raise CheckpointError(f"--cont_training: there is no {CHECKPOINT_FILE_NAME} to resume in "
                              f"{folder} (from --root {args.root} --save {args.save}). Check --root "
                              f"and --save, or drop --cont_training to start a new run.")
    return path


def prepare_save_folder(run_args: argparse.Namespace, is_writer: bool) -> Path:
    """Check (and on the writing process create) `<root>/eval-<save>`; returns it."""
    save_dir = Path(run_args.save)
    if run_args.train_new_q:
        refuse_parent_folder(save_dir, parent_checkpoint_path(run_args.p_and_q1_path))
    existing = [save_dir / CHECKPOINT_FILE_NAME, first_component_checkpoint(save_dir)]
    if not run_args.cont_training and any(path.exists() for path in existing):
        raise UserError(f"{save_dir} already holds a {CHECKPOINT_FILE_NAME} from an earlier run; "
                        f"add --cont_training to resume it, or choose another --save (or delete "
                        f"the folder) to start afresh.")
    if is_writer:
        _make_writable_folder(save_dir, run_args)
    return save_dir


def _make_writable_folder(save_dir: Path, run_args: argparse.Namespace) -> None:
    where = f"the experiment folder {save_dir} (--root {run_args.root}, --save)"
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnwritableFolderError(f"cannot create {where}: {err.strerror or err}. Choose a "
                                    f"--root you can write to.") from None
    try:
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as err:
        raise UnwritableFolderError(f"cannot write into {where}: {err.strerror or err}. Choose a "
                                    f"--root you can write to.") from None
