"""Checkpoints of a joint run: one NVAE-format checkpoint per component, written as one set.

Layout of the experiment folder `<root>/eval-<save>` of `--num_new_encoders K`:

    component-1/checkpoint.pt (+ .sha256)  ...  component-K/checkpoint.pt
    joint_result.json                      (when the run has finished)

Each component checkpoint is a complete `--train_new_q` checkpoint (its own encoder, the shared
frozen decoder, its own optimizer and scheduler state), so `miselbo_eval.py --checkpoints` and
`--cont_training` read it like any other. Its `miselbo` entry adds `component` (1-based),
`num_components`, `objective` to the usual decoder fingerprint, role, seed and parent.

The K files must always belong to the same step. A save writes all K into `.pending/` (each
atomically), then the marker `.pending/complete`, then moves them into place; `recover_pending`
(at the start of every joint run) finishes the moves if the marker exists and otherwise discards
the incomplete set, so after SIGKILL or power loss the folder holds one consistent step.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from miselbo.storage.checkpoints import CHECKPOINT_FILE_NAME
from miselbo.storage.safe_io import atomic_write_text, sidecar_path

PENDING_FOLDER = ".pending"
COMPLETE_MARKER = "complete"
JOINT_RESULT_FILE_NAME = "joint_result.json"


def component_folder(save_dir: Path, index: int) -> Path:
    """The folder of component `index` (1-based)."""
    return Path(save_dir) / f"component-{index}"


def first_component_checkpoint(save_dir: Path) -> Path:
    """Where a joint run keeps the checkpoint whose args describe the run (component 1's)."""
    return component_folder(save_dir, 1) / CHECKPOINT_FILE_NAME


def _pending_file(pending: Path, index: int) -> Path:
    return pending / f"component-{index}.pt"


def save_component_set(save_dir: Path, writers: Sequence[Callable[[Path], Path]]) -> list:
    """Call writers[i](file) for component i + 1 into .pending/, then commit; returns the paths."""
    pending = Path(save_dir) / PENDING_FOLDER
    if pending.exists():
        shutil.rmtree(pending)
    pending.mkdir()
    for index, write in enumerate(writers, start=1):
        write(_pending_file(pending, index))
    atomic_write_text(pending / COMPLETE_MARKER, f"{len(writers)}\n", record_sha256=False)
    recover_pending(save_dir)
    return [component_folder(save_dir, index) / CHECKPOINT_FILE_NAME
            for index in range(1, len(writers) + 1)]


def recover_pending(save_dir: Path) -> None:
    """Finish a committed set (marker present) or drop an incomplete one; no-op without .pending."""
    pending = Path(save_dir) / PENDING_FOLDER
    if not pending.is_dir():
        return
    if (pending / COMPLETE_MARKER).is_file():
        count = int((pending / COMPLETE_MARKER).read_text().strip())
        for index in range(1, count + 1):
            _move_into_place(_pending_file(pending, index),
                             component_folder(save_dir, index) / CHECKPOINT_FILE_NAME)
    shutil.rmtree(pending)


def _move_into_place(source: Path, target: Path) -> None:
    """Sidecar first, then the file (either may already have moved before an interruption)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if sidecar_path(source).exists():
        os.replace(sidecar_path(source), sidecar_path(target))
    if source.exists():
        os.replace(source, target)
