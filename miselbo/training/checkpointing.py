"""Training checkpoints: NVAE's eight keys plus our `miselbo` entry, and resuming from them.

`miselbo` entry (plain values only, so the safe loader reads it):
  decoder_fingerprint  SHA-256 of the decoder's parameters and buffers (model.decoder_fingerprint)
  role                 "p_and_q" (decoder + first encoder) or "q" (encoder on a frozen decoder)
  seed                 the run's --seed
  parent_path          for "q": the parent checkpoint file; else None
  parent_fingerprint   for "q": the parent's decoder fingerprint (always equal to ours); else None
  resume               {"step_in_epoch", "epoch_loss_sum", "epoch_loss_count"}: where inside the
                       epoch `epoch` a checkpoint written on interruption stands (0 at epoch ends)

Semantics of `epoch` (NVAE's): the number of finished epochs, i.e. the epoch a resumed run starts.
A mid-epoch checkpoint (written on SIGINT/SIGTERM) additionally records step_in_epoch = k: resuming
replays that epoch's data order and skips its first k batches, so the resumed run makes exactly
the steps the uninterrupted run would have made. (NVAE's own train.py would rerun the whole epoch.)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import save_nvae_checkpoint
from miselbo.training.stop import EXIT_TRAINING_FAILED, TrainingStopped

ROLE_P_AND_Q = "p_and_q"
ROLE_Q = "q"


@dataclass(frozen=True)
class Lineage:
    """Which model a run trains: its role, seed, and (for a new encoder) its parent's decoder."""
    role: str
    seed: int
    parent_path: str | None = None
    parent_fingerprint: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, args: argparse.Namespace) -> "Lineage":
        """The lineage recorded in a checkpoint; NVAE's own files count as p_and_q runs."""
        entry = checkpoint.get("miselbo") or {}
        return cls(role=entry.get("role", ROLE_P_AND_Q), seed=int(entry.get("seed", args.seed)),
                   parent_path=entry.get("parent_path"),
                   parent_fingerprint=entry.get("parent_fingerprint"))


@dataclass
class Progress:
    """Where training stands: `epoch` to (re)start, steps done, and the running epoch meter."""
    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "Progress":
        resume = (checkpoint.get("miselbo") or {}).get("resume") or {}
        return cls(epoch=int(checkpoint["epoch"]), global_step=int(checkpoint["global_step"]),
                   step_in_epoch=int(resume.get("step_in_epoch", 0)),
                   epoch_loss_sum=float(resume.get("epoch_loss_sum", 0.0)),
                   epoch_loss_count=int(resume.get("epoch_loss_count", 0)))

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0

    def resume_entry(self) -> dict:
        return {"step_in_epoch": self.step_in_epoch, "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_count": self.epoch_loss_count}


def require_resumable(progress: Progress, iterations_per_epoch: int, source: Path) -> None:
    """Refuse a mid-epoch checkpoint whose step inside the epoch this run's epochs do not have
    (e.g. --batch_size or --num_train_examples changed since it was written)."""
    if progress.step_in_epoch >= iterations_per_epoch:
        raise CheckpointError(
            f"{source} was written at step {progress.step_in_epoch} of epoch {progress.epoch + 1}, "
            f"but this run's epochs have only {iterations_per_epoch} step(s), so it cannot resume "
            f"there. Resume with the --batch_size and --num_train_examples of the run that wrote it.")


def miselbo_entry(fingerprint: str, lineage: Lineage, progress: Progress,
                  extra: dict | None = None) -> dict:
    """The entry above; `extra` adds keys (a joint run's component, num_components, objective)."""
    return {"decoder_fingerprint": fingerprint, "role": lineage.role, "seed": lineage.seed,
            "parent_path": lineage.parent_path, "parent_fingerprint": lineage.parent_fingerprint,
            "resume": progress.resume_entry(), **(extra or {})}


def require_parent_decoder(fingerprint: str, lineage: Lineage, when: str) -> None:
    """For a new encoder: stop (exit 3) if the decoder no longer equals the parent's."""
    if lineage.parent_fingerprint is not None and fingerprint != lineage.parent_fingerprint:
        raise TrainingStopped(
            f"the frozen decoder changed {when}: its fingerprint is {fingerprint[:16]}… but the "
            f"parent {lineage.parent_path} has {lineage.parent_fingerprint[:16]}…. This is a bug; "
            f"nothing was written, the last checkpoint is untouched.", EXIT_TRAINING_FAILED)


def save_training_checkpoint(folder: Path, model, args: argparse.Namespace, optimizer, scheduler,
                             grad_scaler, progress: Progress, lineage: Lineage,
                             target: Path | None = None, extra: dict | None = None) -> Path:
    """Write `<folder>/checkpoint.pt` (or the file `target`) atomically; a new encoder's decoder
    is checked first. `extra`: more keys for the miselbo entry."""
    fingerprint = model.decoder_fingerprint()
    require_parent_decoder(fingerprint, lineage, "before writing a checkpoint")
    return save_nvae_checkpoint(target or folder / "checkpoint.pt", model, args, optimizer, scheduler,
                                grad_scaler, epoch=progress.epoch, global_step=progress.global_step,
                                arch_instance=model.arch_instance,
                                miselbo=miselbo_entry(fingerprint, lineage, progress, extra))


def restore_training_state(checkpoint: dict, optimizer, scheduler, grad_scaler, source: Path) -> None:
    """Load optimizer, scheduler and grad-scaler states (an empty scaler state is a CPU run's)."""
    for key, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        state = checkpoint.get(key)
        if state is None:
            raise CheckpointError(f"{source} holds no {key} state, so --cont_training cannot resume "
                                  f"it; start a new run (or train from it with --train_new_q).")
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{source}: its {key} state does not fit this run ({err}); was "
                                  f"it written by another kind of run?") from err
    scaler_state = checkpoint.get("grad_scalar") or {}
    if scaler_state and grad_scaler.is_enabled():
        grad_scaler.load_state_dict(scaler_state)
