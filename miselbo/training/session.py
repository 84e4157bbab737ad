"""What single-encoder runs (miselbo.training.run) and joint runs (miselbo.training.joint) share:
the epoch loop of one process's session, its stop and non-finite-loss messages, and the helpers
both kinds use to set up, resume and report a run (docs/nvae.md 8.1).

`Session.run()`: log the start; for each remaining epoch, train it (timed as "steps") and finish
it (epoch loss, --param_check, the per-epoch test where a kind has one, checkpoints); then the
final test. A subclass supplies the steps, the checkpoints and the final test of its kind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from miselbo.data.datasets import Loaders, build_loaders, num_output_dims, start_epoch
from miselbo.nvae.optim import step_scheduler_for_epoch
from miselbo.runtime import distributed
from miselbo.runtime.cli import progress as progress_bar
from miselbo.runtime.distributed import DistributedSetup
from miselbo.runtime.stage_clock import StageClock
from miselbo.seeding import step_seed
from miselbo.storage.safe_io import atomic_write_text
from miselbo.training.checkpointing import Progress, require_parent_decoder, restore_training_state
from miselbo.training.evaluation import EvaluationInterrupted, TestResult, evaluate_bounds
from miselbo.training.logs import Board, RunLog
from miselbo.training.nonfinite import first_nonfinite_state
from miselbo.training.options import data_set_of
from miselbo.training.precision import Precision, default_precision
from miselbo.training.settings import TrainSettings
from miselbo.training.stop import (EXIT_TRAINING_FAILED, NonFiniteLoss, StepGuard, StopAfterStep,
                                   StopRequests, TrainingStopped, signal_name)

RESULT_FILE_NAME = "train_result.json"
FINAL_TEST_WHERE = "during the final test (training itself is complete)"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced; test values are per image, in nats (and bits/dim)."""
    checkpoint_path: Path
    save_dir: Path
    role: str
    seed: int
    epochs: int
    global_step: int
    test_nelbo: float
    test_neg_log_p: float
    test_nelbo_bpd: float
    test_neg_log_p_bpd: float
    final_iw_samples: int
    decoder_fingerprint: str
    parameter_sha256: str  # over every parameter of this process (equal on all ranks)
    wall_seconds: float
    rank_parameter_sha256: tuple = field(default_factory=tuple)  # one per rank, when spawned
    seconds: dict = field(default_factory=dict)  # wall seconds per part: steps, epoch_tests, ...
    precision: str = "fp32"  # how the training steps computed (train.py --precision, resolved)
    skipped_steps: int = 0  # steps the float16 GradScaler skipped (inf/NaN gradients), this process

    def to_json(self) -> str:
        values = {key: str(value) if isinstance(value, Path) else value
                  for key, value in asdict(self).items()}
        values["rank_parameter_sha256"] = list(self.rank_parameter_sha256)
        return json.dumps(values, indent=2) + "\n"


def write_train_result(result: TrainResult) -> None:
    """`<result.save_dir>/train_result.json`."""
    atomic_write_text(result.save_dir / RESULT_FILE_NAME, result.to_json(), record_sha256=False)


@dataclass(frozen=True)
class SavedPoint:
    """The last checkpoint written or resumed from: the file (a joint run: the folder of its
    component checkpoints) and the progress it holds."""
    path: Path
    epoch: int
    global_step: int


def parameter_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes (sorted by name)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """docs/nvae.md 8.1, step 1: torch (CPU and every CUDA device) and NumPy."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- setting up, resuming

def annotate_args(args: argparse.Namespace, setup: DistributedSetup, iterations: int,
                  precision: Precision | None = None) -> argparse.Namespace:
    """The attributes NVAE's train.py adds to its namespace (they end up in the checkpoint), and
    the resolved --precision (fp32, fp16 or bf16) in place of the typed one."""
    extra = {} if precision is None else {"precision": precision.name}
    return argparse.Namespace(**dict(vars(args), num_total_iter=iterations * args.epochs,
                                     distributed=setup.world_size > 1, local_rank=setup.local_rank,
                                     global_rank=setup.rank, **extra))


def build_run_loaders(args: argparse.Namespace, setup: DistributedSetup, device: torch.device) -> Loaders:
    """This process's training and test loaders for the run's data set and flags."""
    return build_loaders(data_set_of(args), args.data, args.batch_size, args.seed,
                         num_workers=args.num_workers, device=device,
                         max_train_examples=args.num_train_examples,
                         max_test_examples=args.num_test_examples,
                         world_size=setup.world_size, rank=setup.rank)


def new_grad_scaler(device: torch.device, precision: Precision | None = None) -> torch.amp.GradScaler:
    """NVAE's GradScaler, enabled when the steps compute in float16 (`precision`; None: `auto`,
    float16 on CUDA and float32 on CPU)."""
    return (precision or default_precision(device)).new_grad_scaler()


def follow_schedule_flags(scheduler, settings: TrainSettings) -> None:
    """After resuming, the cosine schedule follows this command's --epochs / --learning_rate_min
    (a loaded state would keep the old period; with more epochs NVAE then divides by zero) and its
    --learning_rate: a run resumed after a divergence with a lower --learning_rate continues at
    the same point of the cosine between the new peak and minimum (a loaded state would keep the
    rate that diverged). With the recorded --learning_rate nothing but the period and minimum moves."""
    old_min, new_min = scheduler.eta_min, settings.learning_rate_min
    for index, (group, old_peak) in enumerate(zip(scheduler.optimizer.param_groups, scheduler.base_lrs)):
        if old_peak == settings.learning_rate:
            continue
        span = old_peak - old_min
        position = (group["lr"] - old_min) / span if span else 1.0  # 1 at the peak, 0 at the minimum
        group["lr"] = new_min + (settings.learning_rate - new_min) * position
        group["initial_lr"] = scheduler.base_lrs[index] = settings.learning_rate
    scheduler.T_max = float(settings.epochs - settings.warmup_epochs - 1)
    scheduler.eta_min = new_min


def restore_optimisation(checkpoint: dict, optimizer, scheduler, scaler, folder: Path,
                         settings: TrainSettings) -> None:
    """Load the optimizer, schedule and scaler states of `checkpoint`; the schedule then follows
    this command's flags."""
    restore_training_state(checkpoint, optimizer, scheduler, scaler, folder)
    follow_schedule_flags(scheduler, settings)


def resumed_progress(checkpoint: dict, settings: TrainSettings, setup: DistributedSetup) -> Progress:
    """Where `checkpoint` stands; torch's generator is reseeded for the step it resumes at."""
    progress = Progress.from_checkpoint(checkpoint)
    torch.manual_seed(step_seed(settings.seed, progress.global_step, setup.rank, "train"))
    return progress


def step_scheduler(scheduler, epoch: int, warmup_epochs: int) -> None:
    with warnings.catch_warnings():  # resumed runs step the schedule before the first update
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        step_scheduler_for_epoch(scheduler, epoch, warmup_epochs)


def finish_epoch_loss(progress: Progress, device: torch.device) -> float:
    """Mean training loss of the epoch over all processes; closes the epoch in `progress`."""
    totals = torch.tensor([progress.epoch_loss_sum, float(progress.epoch_loss_count)],
                          dtype=torch.float64, device=device)  # [sum, count]
    distributed.sum_tensor_(totals)
    progress.finish_epoch()
    return float(totals[0] / max(float(totals[1]), 1.0))


def run_session(session_type, args: argparse.Namespace, setup: DistributedSetup, device: torch.device,
                resume_command: str) -> TrainResult:
    """Install the stop handlers, open `session_type` for this process, run it, always close it."""
    requests = StopRequests(announce=setup.rank == 0)
    with requests.installed():
        session = session_type.open(args, setup, device, requests, resume_command)
        try:
            return session.run()
        finally:
            session.close()


# ----------------------------------------------------------------------------- the session

@dataclass(kw_only=True)
class Session(ABC):
    """One process's run: the state both kinds keep and the epoch-level procedure.

    A subclass adds `open(args, setup, device, requests, resume_command)`, the classmethod that
    builds it for this process, and the abstract methods below; `validate` is its per-epoch test,
    if it has one."""
    EPOCH_LABEL = "epoch"  # the progress bar's name of an epoch

    args: argparse.Namespace  # NVAE's namespace, as stored in checkpoints
    settings: TrainSettings
    setup: DistributedSetup
    device: torch.device
    loaders: Loaders
    scaler: torch.amp.GradScaler
    precision: Precision  # how the training steps compute (tests always run in float32)
    progress: Progress
    save_dir: Path
    guard: StepGuard
    resume_command: str
    log: RunLog
    board: Board
    last_checkpoint: SavedPoint | None = None
    clock: StageClock = field(default_factory=StageClock)  # seconds per part of this run

    @property
    def is_main(self) -> bool:
        return self.setup.rank == 0

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self.log_start()
        self.log_precision()
        for epoch in range(self.progress.epoch, self.settings.epochs):
            with self.clock.measure("steps"):  # includes data loading, also reported on its own
                self.train_one_epoch(epoch)
            self.finish_epoch(epoch)
        return self.final_test(started)

    def train_one_epoch(self, epoch: int) -> None:
        progress = self.progress
        start_epoch(self.loaders, progress.global_step - progress.step_in_epoch, self.settings.seed)
        if progress.step_in_epoch == 0:  # a mid-epoch checkpoint already stepped the schedules
            for scheduler in self.schedulers():
                step_scheduler(scheduler, epoch, self.settings.warmup_epochs)
        bar = progress_bar(total=len(self.loaders.train), initial=progress.step_in_epoch,
                           desc=f"{self.EPOCH_LABEL} {epoch + 1}/{self.settings.epochs}", unit="step",
                           **({} if self.is_main else {"disable": True}))
        try:
            self.train_steps(bar)
        except StopAfterStep as stop:
            self.stop(stop.signal_number, f"during epoch {epoch + 1}")
        except NonFiniteLoss as err:
            raise self.nonfinite(err, epoch) from None
        finally:
            bar.close()

    def finish_epoch(self, epoch: int) -> None:
        epoch_loss = finish_epoch_loss(self.progress, self.device)
        self.log_epoch_loss(epoch, epoch_loss)
        self.board.scalar("train/epoch_loss", epoch_loss, self.progress.global_step)
        if self.scaler.is_enabled():
            self.log_scaler(epoch)
        if self.settings.param_check:
            self.check_decoder(epoch)
        if self.settings.validates_after(epoch):
            with self.clock.measure("epoch_tests"):
                self.validate(epoch)
        if self.settings.checkpoints_after(epoch):
            with self.clock.measure("checkpoints"):
                self.save()

    def log_scaler(self, epoch: int) -> None:
        """The float16 GradScaler's scale and the steps it skipped so far (normal when rare)."""
        scale = self.scaler.get_scale()
        self.log.info("epoch %d: GradScaler scale %g; %d step(s) skipped for inf/NaN gradients so "
                      "far in this process (%d in a row at most allowed)", epoch + 1, scale,
                      self.guard.skipped_steps, self.guard.max_consecutive_skips)
        self.board.scalar("train/grad_scale", scale, self.progress.global_step)

    def log_precision(self) -> None:
        """How the steps compute; a resumed fp16 run also states the scale it continues with."""
        scaled = f", GradScaler scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() else ""
        self.log.info("precision %s%s; tests in float32", self.precision.describe(), scaled)

    def check_decoder(self, epoch: int) -> None:
        """--param_check: stop if the frozen decoder no longer equals the parent's."""
        model, lineage = self.decoder_and_lineage()
        require_parent_decoder(model.decoder_fingerprint(), lineage,
                               f"during epoch {epoch + 1} (--param_check)")

    def validate(self, epoch: int) -> None:
        """The per-epoch test after `epoch`; a kind without one keeps this."""

    # ------------------------------------------------------------------------- what each kind adds

    @abstractmethod
    def log_start(self) -> None:
        """Describe the run (and where it resumes) in the log."""

    @abstractmethod
    def schedulers(self) -> list:
        """The learning-rate schedules, stepped at the start of each epoch."""

    @abstractmethod
    def train_steps(self, bar) -> None:
        """The rest of the current epoch's steps, updating self.progress and `bar`; raises
        StopAfterStep or NonFiniteLoss."""

    @abstractmethod
    def log_epoch_loss(self, epoch: int, epoch_loss: float) -> None:
        """Log the epoch's mean training loss."""

    @abstractmethod
    def decoder_and_lineage(self) -> tuple:
        """(a model holding the run's decoder, the lineage recording its parent decoder)."""

    @abstractmethod
    def save(self) -> Path | None:
        """Write the checkpoint(s) of the current state and set self.last_checkpoint."""

    @abstractmethod
    def save_for_stop(self) -> str:
        """Make sure checkpoint(s) hold the current state; the sentence that says where."""

    @abstractmethod
    def stopped_progress(self) -> str:
        """What a stop message adds after the global step (may be empty)."""

    @abstractmethod
    def failed_step(self, epoch: int) -> str:
        """Where in the run a non-finite value stopped it."""

    @abstractmethod
    def kept_checkpoint(self) -> str:
        """'checkpoint(s) ... kept; resume from it/them' for self.last_checkpoint."""

    @abstractmethod
    def final_test(self, started: float) -> TrainResult:
        """The final test with settings.final_iw_samples samples; write and return the result."""

    # ------------------------------------------------------------------------- stops

    def stop(self, signal_number: int, where: str) -> NoReturn:
        """Write checkpoint(s) of the current state and raise TrainingStopped (exit 128 + N)."""
        written = self.save_for_stop()
        raise TrainingStopped(
            f"training stopped by {signal_name(signal_number)} {where}, at global step "
            f"{self.progress.global_step}{self.stopped_progress()}. {written} Resume with:\n  "
            f"{self.resume_command}", 128 + signal_number)

    def nonfinite(self, err: NonFiniteLoss, epoch: int) -> TrainingStopped:
        """The stop for a non-finite loss or gradient: no update, no checkpoint, the last kept."""
        first_place = f"; the first value that went non-finite: {err.first_place}" if err.first_place else ""
        return TrainingStopped(
            f"training stopped: {err} ({self.failed_step(epoch)}){first_place}; the weights were not "
            f"updated with it and no checkpoint was written. {self.kept_sentence()}", EXIT_TRAINING_FAILED)

    def kept_sentence(self) -> str:
        """Which checkpoint a failed run leaves and how to resume from it."""
        if self.last_checkpoint is None:
            return "No checkpoint had been written yet; start again, e.g. with a lower --learning_rate."
        return (f"The last good {self.kept_checkpoint()} (perhaps with a lower --learning_rate) "
                f"with:\n  {self.resume_command}")

    def require_finite_checkpoint(self, states) -> None:
        """Before a save: stop (exit 3) if any tensor the checkpoint(s) would hold, parameters,
        buffers (batch-norm statistics) or optimizer state, is not finite on any process, so a bad
        checkpoint never replaces the last good one. `states`: (label, model, optimizer) per file."""
        bad = None
        for label, model, optimizer in states:
            found = first_nonfinite_state(model, optimizer)
            if found is not None:
                bad = f"{label}{found}"
                break
        any_bad = torch.tensor([0.0 if bad is None else 1.0], device=self.device)  # [1]
        if float(distributed.sum_tensor_(any_bad)) == 0.0:
            return
        raise TrainingStopped(
            f"training stopped at global step {self.progress.global_step}: "
            f"{bad or 'a tensor of another process'} is not finite, so no checkpoint was written. "
            f"{self.kept_sentence()}", EXIT_TRAINING_FAILED)

    # ------------------------------------------------------------------------- tests, the end

    def evaluate(self, model, num_samples: int, where: str, loader=None) -> TestResult:
        """The test bounds of `model` (on the test set, or `loader`); a stop request during the
        test stops the run as a signal during training does."""
        try:
            return evaluate_bounds(self.loaders.test if loader is None else loader, model,
                                   num_samples, self.settings.num_x_bits,
                                   should_stop=self.guard.stop_requested)
        except EvaluationInterrupted:
            self.stop(self.guard.stop_signal, where)

    def bpd_coefficient(self) -> float:
        """Nats per image to bits per dimension."""
        return 1.0 / (math.log(2.0) * num_output_dims(data_set_of(self.args)))

    def result_of(self, folder: Path, model, lineage, test: TestResult, started: float,
                  seconds: dict | None = None) -> TrainResult:
        """The TrainResult of `model` (checkpoint in `folder`) after its final test."""
        bpd = self.bpd_coefficient()
        return TrainResult(
            checkpoint_path=folder / "checkpoint.pt", save_dir=folder, role=lineage.role,
            seed=lineage.seed, epochs=self.progress.epoch, global_step=self.progress.global_step,
            test_nelbo=test.nelbo, test_neg_log_p=test.neg_log_p, test_nelbo_bpd=test.nelbo * bpd,
            test_neg_log_p_bpd=test.neg_log_p * bpd, final_iw_samples=self.settings.final_iw_samples,
            decoder_fingerprint=model.decoder_fingerprint(), parameter_sha256=parameter_sha256(model),
            wall_seconds=time.perf_counter() - started, seconds=dict(seconds or {}),
            precision=self.precision.name, skipped_steps=self.guard.skipped_steps)

    def close(self) -> None:
        """Close the reports; neither raises on a full disk, so the run's own error is what shows."""
        try:
            self.board.close()
        finally:
            self.log.close()
