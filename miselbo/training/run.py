"""One process's training run (docs/nvae.md 8.1): set up, epochs, checkpoints, final test.

`run_training(args, setup, device, resume_command)` is what every process executes, whether it
was started directly, spawned NVAE-style or by torchrun. Only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from miselbo.runtime import distributed
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import load_state_dict_strict, read_checkpoint
from miselbo.runtime.cli import progress as progress_bar
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
from miselbo.data.datasets import (Loaders, build_loaders, num_output_dims, pre_process,
                          start_epoch)
from miselbo.runtime.distributed import DistributedSetup
from miselbo.seeding import step_seed
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer, build_scheduler, step_scheduler_for_epoch
from miselbo.storage.safe_io import atomic_write_text
from miselbo.training.checkpointing import (ROLE_P_AND_Q, ROLE_Q, Lineage, Progress,
                                            require_parent_decoder, require_resumable,
                                            restore_training_state, save_training_checkpoint)
from miselbo.runtime.stage_clock import StageClock
from miselbo.training.epoch_test import (Draw, UnreplayableDraws, advance_like_full_test,
                                         record_draws)
from miselbo.training.evaluation import (EvaluationInterrupted, TestResult, evaluate_bounds,
                                         subset_loader)
from miselbo.training.logs import (Board, RunLog, log_prior_samples, log_reconstructions,
                                   log_step_scalars)
from miselbo.training.loop import StepParts, train_epoch
from miselbo.training.new_encoder import adopt_decoder, load_parent
from miselbo.training.nonfinite import first_nonfinite_parameter
from miselbo.runtime.distribution_checks import no_distribution_validation
from miselbo.training.objective import RegularisedLayers
from miselbo.training.options import data_set_of
from miselbo.training.settings import (GRAD_SCALER_INIT_SCALE, IMAGE_LOG_PERIOD, SCALAR_LOG_PERIOD,
                                       VALID_IW_SAMPLES, TrainSettings)
from miselbo.training.stop import (EXIT_TRAINING_FAILED, NonFiniteLoss, StepGuard, StopAfterStep,
                                   StopRequests, TrainingStopped, signal_name)

RESULT_FILE_NAME = "train_result.json"


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

    def to_json(self) -> str:
        values = {key: str(value) if isinstance(value, Path) else value
                  for key, value in asdict(self).items()}
        values["rank_parameter_sha256"] = list(self.rank_parameter_sha256)
        return json.dumps(values, indent=2) + "\n"


def _first_place(err: NonFiniteLoss) -> str:
    """'; the first value that went non-finite: ...' when the process located it."""
    return f"; the first value that went non-finite: {err.first_place}" if err.first_place else ""


@dataclass(frozen=True)
class SavedPoint:
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


def build_model(args: argparse.Namespace, settings: TrainSettings, device: torch.device):
    """(model on device, checkpoint being resumed or None, lineage). See new_encoder for role q."""
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    checkpoint = None
    if args.cont_training:
        path = Path(args.save) / "checkpoint.pt"
        checkpoint = read_checkpoint(path, trust=args.trust_checkpoint)
        load_state_dict_strict(model, checkpoint["state_dict"], source=str(path))
        lineage = Lineage.from_checkpoint(checkpoint, args)
        _check_resumed_role(model, lineage, settings, path)
    elif settings.train_new_q:
        parent = load_parent(args.p_and_q1_path, args.trust_checkpoint)
        adopt_decoder(model, parent)
        lineage = Lineage(ROLE_Q, settings.seed, str(parent.path), parent.fingerprint)
    else:
        lineage = Lineage(ROLE_P_AND_Q, settings.seed)
    model = model.to(device)
    use_fast_cpu_layout([model])  # on CPU only: faster convolutions, float rounding differs
    return model, checkpoint, lineage


def _check_resumed_role(model, lineage: Lineage, settings: TrainSettings, path: Path) -> None:
    if settings.train_new_q != (lineage.role == ROLE_Q):
        raise CheckpointError(f"{path} holds a {lineage.role!r} run, which --cont_training cannot "
                              f"resume {'with' if settings.train_new_q else 'without'} --train_new_q.")
    if lineage.role == ROLE_Q:
        model.freeze_decoder()
        if model.decoder_fingerprint() != lineage.parent_fingerprint:
            raise CheckpointError(f"{path}: its decoder differs from the parent decoder it records "
                                  f"({lineage.parent_path}); the file was changed after writing.")


def _follow_schedule_flags(scheduler, settings: TrainSettings) -> None:
    """After resuming, the cosine schedule follows this command's --epochs / --learning_rate_min
    (a loaded state would keep the old period; with more epochs NVAE then divides by zero)."""
    scheduler.T_max = float(settings.epochs - settings.warmup_epochs - 1)
    scheduler.eta_min = settings.learning_rate_min


def _step_scheduler(scheduler, epoch: int, warmup_epochs: int) -> None:
    with warnings.catch_warnings():  # resumed runs step the schedule before the first update
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        step_scheduler_for_epoch(scheduler, epoch, warmup_epochs)


def _annotate(args: argparse.Namespace, setup: DistributedSetup, iterations: int) -> argparse.Namespace:
    """The attributes NVAE's train.py adds to its namespace (they end up in the checkpoint)."""
    return argparse.Namespace(**dict(vars(args), num_total_iter=iterations * args.epochs,
                                     distributed=setup.world_size > 1, local_rank=setup.local_rank,
                                     global_rank=setup.rank))


def _loaders(args, setup: DistributedSetup, device: torch.device):
    return build_loaders(data_set_of(args), args.data, args.batch_size, args.seed,
                         num_workers=args.num_workers, device=device,
                         max_train_examples=args.num_train_examples,
                         max_test_examples=args.num_test_examples,
                         world_size=setup.world_size, rank=setup.rank)


def run_training(args: argparse.Namespace, setup: DistributedSetup, device: torch.device,
                 resume_command: str) -> TrainResult:
    """Set up this process's part of the run and train it to the end (or raise TrainingStopped).
    Several new encoders (--num_new_encoders K > 1, --include_parent_encoder) train in
    miselbo.training.joint; K = 1 without the parent is this single-encoder path unchanged."""
    from miselbo.training.joint import is_joint_run, run_joint_training  # joint imports this module
    with no_distribution_validation():  # NaN reaches our finite checks, not a ValueError
        if is_joint_run(args):
            return run_joint_training(args, setup, device, resume_command)
        return _run_single(args, setup, device, resume_command)


def _run_single(args: argparse.Namespace, setup: DistributedSetup, device: torch.device,
                resume_command: str) -> TrainResult:
    return run_session(TrainingSession, args, setup, device, resume_command)


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


@dataclass
class TrainingSession:
    """The state of one process's run and the epoch-level procedure."""
    args: argparse.Namespace  # NVAE's namespace, as stored in checkpoints
    settings: TrainSettings
    setup: DistributedSetup
    is_main: bool
    device: torch.device
    loaders: Loaders
    model: AutoEncoder
    lineage: Lineage
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    parts: StepParts
    progress: Progress
    last_checkpoint: SavedPoint | None
    save_dir: Path
    guard: StepGuard
    resume_command: str
    log: RunLog
    board: Board
    clock: StageClock = field(default_factory=StageClock)  # seconds per part of this run
    test_draws: list | None = None  # per-row random draws of a test pass (--epoch_test_examples)
    test_draws_recorded: bool = False  # test_draws is None after recording: not replayable

    @classmethod
    def open(cls, args, setup: DistributedSetup, device: torch.device, requests: StopRequests,
             resume_command: str) -> "TrainingSession":
        settings = TrainSettings.from_args(args)
        seed_everything(settings.seed)
        is_main = setup.rank == 0
        loaders = _loaders(args, setup, device)
        args = _annotate(args, setup, len(loaders.train))
        model, checkpoint, lineage = build_model(args, settings, device)
        trainable = model.encoder_parameters() if lineage.role == ROLE_Q else list(model.parameters())
        optimizer = build_optimizer(trainable, settings.learning_rate, settings.weight_decay,
                                    settings.fast_adamax)
        scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs,
                                    settings.learning_rate_min)
        scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE,
                                      enabled=device.type == "cuda")
        progress, last_checkpoint = Progress(), None
        if checkpoint is not None:
            restore_training_state(checkpoint, optimizer, scheduler, scaler, Path(args.save))
            _follow_schedule_flags(scheduler, settings)
            progress = Progress.from_checkpoint(checkpoint)
            require_resumable(progress, len(loaders.train), Path(args.save) / "checkpoint.pt")
            last_checkpoint = SavedPoint(Path(args.save) / "checkpoint.pt", progress.epoch,
                                         progress.global_step)
            torch.manual_seed(step_seed(settings.seed, progress.global_step, setup.rank, "train"))
        layers = None
        if settings.regularised:
            layers = RegularisedLayers.encoder_of(model) if lineage.role == ROLE_Q else RegularisedLayers()
        parts = StepParts(model=model, optimizer=optimizer, grad_scaler=scaler, trainable=trainable,
                          alpha=kl_balance_alpha(model.groups_per_scale, device=device),
                          layers=layers, settings=settings, iterations_per_epoch=len(loaders.train),
                          device=device)
        save_dir = Path(args.save)
        return cls(args=args, settings=settings, setup=setup, is_main=is_main, device=device,
                   loaders=loaders, model=model, lineage=lineage, optimizer=optimizer,
                   scheduler=scheduler, scaler=scaler, parts=parts, progress=progress,
                   last_checkpoint=last_checkpoint, save_dir=save_dir,
                   guard=StepGuard(requests, device), resume_command=resume_command,
                   log=RunLog(save_dir, enabled=is_main), board=Board(save_dir, enabled=is_main))

    # ------------------------------------------------------------------------- the run

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self._log_start()
        for epoch in range(self.progress.epoch, self.settings.epochs):
            with self.clock.measure("steps"):  # includes data loading, also reported on its own
                self._train_one_epoch(epoch)
            self._finish_epoch(epoch)
        return self._final_test(started)

    def _log_start(self) -> None:
        args, progress = self.args, self.progress
        trainable = sum(p.numel() for p in self.parts.trainable)
        self.log.info("%s run, seed %d, %s, %d process(es); %d trainable parameters; data %s: %d "
                      "steps/epoch of %d images per process", self.lineage.role, self.lineage.seed,
                      self.device, self.setup.world_size, trainable, data_set_of(args),
                      self.parts.iterations_per_epoch, args.batch_size)
        if self.lineage.role == ROLE_Q:
            self.log.info("frozen decoder from %s (fingerprint %s)", self.lineage.parent_path,
                          self.lineage.parent_fingerprint)
        if progress.global_step:
            self.log.info("resuming at epoch %d, global step %d (step %d of the epoch)",
                          progress.epoch + 1, progress.global_step, progress.step_in_epoch)

    def _train_one_epoch(self, epoch: int) -> None:
        progress = self.progress
        start_epoch(self.loaders, progress.global_step - progress.step_in_epoch, self.settings.seed)
        if progress.step_in_epoch == 0:  # a mid-epoch checkpoint already stepped the scheduler
            _step_scheduler(self.scheduler, epoch, self.settings.warmup_epochs)
        bar = progress_bar(total=self.parts.iterations_per_epoch, initial=progress.step_in_epoch,
                           desc=f"epoch {epoch + 1}/{self.settings.epochs}", unit="step",
                           **({} if self.is_main else {"disable": True}))
        try:
            train_epoch(self.parts, self.clock.timed_batches(self.loaders.train, "data_loading"),
                        progress, self.guard, on_step=partial(self._after_step, bar))
        except StopAfterStep as stop:
            self._stop(stop.signal_number, f"during epoch {epoch + 1}")
        except NonFiniteLoss as err:
            raise self._nonfinite(err, epoch) from None
        finally:
            bar.close()

    def _after_step(self, bar, terms, x: torch.Tensor, seconds: float) -> None:
        step = self.progress.global_step  # before its increment, as in NVAE's logging
        bar.update(1)
        bar.set_postfix(loss=f"{float(terms.loss.detach()):.2f}", kl=f"{float(terms.kl):.2f}",
                        s_step=f"{seconds:.3f}", refresh=False)
        if (step + 1) % SCALAR_LOG_PERIOD == 0:
            average = self.progress.epoch_loss_sum / max(self.progress.epoch_loss_count, 1)
            log_step_scalars(self.board, terms, average, self.optimizer.param_groups[0]["lr"], step)
        if (step + 1) % IMAGE_LOG_PERIOD == 0:
            log_reconstructions(self.board, self.model, x, terms, step)

    def _finish_epoch(self, epoch: int) -> None:
        epoch_loss = finish_epoch_loss(self.progress, self.device)
        self.log.info("epoch %d/%d done: training loss %.4f (NELBO + regularisers, nats), global "
                      "step %d, lr %.3g", epoch + 1, self.settings.epochs, epoch_loss,
                      self.progress.global_step, self.optimizer.param_groups[0]["lr"])
        self.board.scalar("train/epoch_loss", epoch_loss, self.progress.global_step)
        if self.settings.param_check:
            require_parent_decoder(self.model.decoder_fingerprint(), self.lineage,
                                   f"during epoch {epoch + 1} (--param_check)")
            self.log.info("--param_check: decoder fingerprint unchanged after epoch %d", epoch + 1)
        if self.settings.validates_after(epoch):
            with self.clock.measure("epoch_tests"):
                self._validate(epoch)
        if self.settings.checkpoints_after(epoch):
            with self.clock.measure("checkpoints"):
                self._save()

    def _validate(self, epoch: int) -> None:
        step = self.progress.global_step
        self.model.eval()
        log_prior_samples(self.board, self.model, step)
        result = self._epoch_test(f"while testing after epoch {epoch + 1}")
        bpd = self._bpd_coeff()
        self.log.info("epoch %d/%d test (%d images, %d samples): NELBO %.4f nats (%.4f bpd), "
                      "-log p %.4f nats (%.4f bpd)", epoch + 1, self.settings.epochs,
                      result.num_images, VALID_IW_SAMPLES, result.nelbo, result.nelbo * bpd,
                      result.neg_log_p, result.neg_log_p * bpd)
        for tag, value in (("val/neg_log_p", result.neg_log_p), ("val/nelbo", result.nelbo),
                           ("val/bpd_log_p", result.neg_log_p * bpd),
                           ("val/bpd_elbo", result.nelbo * bpd)):
            self.board.scalar(tag, value, epoch)

    def _epoch_test(self, where: str) -> TestResult:
        """NVAE's per-epoch test on the whole test set; with --epoch_test_examples N on N fixed,
        evenly spaced test images with fixed binarisation and posterior draws (a forked random
        state), after which both generators are advanced as the full test would have advanced
        them (miselbo/training/epoch_test.py), so training stays bit-identical to NVAE's."""
        subset_size = getattr(self.args, "epoch_test_examples", None)
        if subset_size is None:
            return self._test(VALID_IW_SAMPLES, where)
        data_seed, draw_seed = (step_seed(self.settings.seed, step, self.setup.rank, "test")
                                for step in (0, 1))
        loader = subset_loader(self.loaders.test, subset_size, data_seed)
        draws = self._full_test_draws(loader)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(draw_seed)
            result = self._test(VALID_IW_SAMPLES, where, loader)
        if draws is not None:  # training continues exactly as after NVAE's full test
            advance_like_full_test(self.loaders.test, draws, VALID_IW_SAMPLES)
        return result

    def _full_test_draws(self, subset) -> list[Draw] | None:
        """The random draws of one test pass per row (recorded once), None if not replayable."""
        if not self.test_draws_recorded:
            self.test_draws_recorded = True
            first, _ = subset.dataset[0]  # [C, H, W]
            x_row = pre_process(first[None].to(self.device), self.settings.num_x_bits)
            self.model.eval()
            try:
                self.test_draws = record_draws(self.model, x_row)
            except UnreplayableDraws as err:
                self.log.info("--epoch_test_examples: %s, so training's random numbers differ from "
                              "a run with the full per-epoch test", err)
            subset.dataset.reseed(step_seed(self.settings.seed, 0, self.setup.rank, "test"))
        return self.test_draws

    def _test(self, num_samples: int, where: str, loader=None) -> TestResult:
        try:
            return evaluate_bounds(self.loaders.test if loader is None else loader, self.model,
                                   num_samples, self.settings.num_x_bits,
                                   should_stop=self.guard.stop_requested)
        except EvaluationInterrupted:
            self._stop(self.guard.stop_signal, where)

    def _bpd_coeff(self) -> float:
        return 1.0 / (math.log(2.0) * num_output_dims(data_set_of(self.args)))

    # ------------------------------------------------------------------------- checkpoints, stops

    def _save(self) -> Path:
        path = self.save_dir / "checkpoint.pt"
        bad = first_nonfinite_parameter(self.model.named_parameters())
        if bad is not None:  # never replace the last good checkpoint by non-finite weights
            raise TrainingStopped(
                f"training stopped at global step {self.progress.global_step}: parameter {bad} is "
                f"not finite, so no checkpoint was written; the last good one is kept "
                f"({self.last_checkpoint.path if self.last_checkpoint else 'none was written yet'}).",
                EXIT_TRAINING_FAILED)
        if self.is_main:
            path = save_training_checkpoint(self.save_dir, self.model, self.args, self.optimizer,
                                            self.scheduler, self.scaler, self.progress, self.lineage)
            self.log.info("checkpoint written: %s (epoch %d done, global step %d)", path,
                          self.progress.epoch, self.progress.global_step)
        distributed.barrier()
        self.last_checkpoint = SavedPoint(path, self.progress.epoch, self.progress.global_step)
        return path

    def _stop(self, signal_number: int, where: str) -> None:
        """Write a checkpoint of the current state (unless the last one holds it already) and raise
        TrainingStopped (exit 128 + N)."""
        last, progress = self.last_checkpoint, self.progress
        up_to_date = last is not None and (last.epoch, last.global_step) == (progress.epoch,
                                                                             progress.global_step)
        path = last.path if up_to_date else self._save()
        raise TrainingStopped(
            f"training stopped by {signal_name(signal_number)} {where}, at global step "
            f"{progress.global_step} ({progress.epoch} epoch(s) and {progress.step_in_epoch} step(s) "
            f"of the next done). Checkpoint written to {path}. Resume with:\n  {self.resume_command}",
            128 + signal_number)

    def _nonfinite(self, err: NonFiniteLoss, epoch: int) -> TrainingStopped:
        last = self.last_checkpoint
        if last is None:
            kept = "No checkpoint had been written yet; start again, e.g. with a lower --learning_rate."
        else:
            kept = (f"The last good checkpoint, {last.path} ({last.epoch} epoch(s), global step "
                    f"{last.global_step}), is kept; resume from it (perhaps with a lower "
                    f"--learning_rate) with:\n  {self.resume_command}")
        return TrainingStopped(
            f"training stopped: {err} (epoch {epoch + 1}, step {self.progress.step_in_epoch + 1} of "
            f"{self.parts.iterations_per_epoch}){_first_place(err)}; the weights were not updated "
            f"with it and no "
            f"checkpoint was written. {kept}", EXIT_TRAINING_FAILED)

    # ------------------------------------------------------------------------- the end

    def _final_test(self, started: float) -> TrainResult:
        samples = self.settings.final_iw_samples
        with self.clock.measure("final_test"):
            result = self._test(samples, "during the final test (training itself is complete)")
        bpd = self._bpd_coeff()
        self.log.info("final test (%d images, %d importance samples): NELBO %.4f nats (%.4f bpd), "
                      "-log p %.4f nats (%.4f bpd)", result.num_images, samples, result.nelbo,
                      result.nelbo * bpd, result.neg_log_p, result.neg_log_p * bpd)
        self.board.scalar("test/nelbo", result.nelbo, self.progress.global_step)
        self.board.scalar("test/neg_log_p", result.neg_log_p, self.progress.global_step)
        outcome = TrainResult(
            checkpoint_path=self.save_dir / "checkpoint.pt", save_dir=self.save_dir,
            role=self.lineage.role, seed=self.lineage.seed, epochs=self.progress.epoch,
            global_step=self.progress.global_step, test_nelbo=result.nelbo,
            test_neg_log_p=result.neg_log_p, test_nelbo_bpd=result.nelbo * bpd,
            test_neg_log_p_bpd=result.neg_log_p * bpd, final_iw_samples=samples,
            decoder_fingerprint=self.model.decoder_fingerprint(),
            parameter_sha256=parameter_sha256(self.model),
            wall_seconds=time.perf_counter() - started, seconds=dict(self.clock.seconds))
        if self.is_main:
            atomic_write_text(self.save_dir / RESULT_FILE_NAME, outcome.to_json(), record_sha256=False)
        return outcome

    def close(self) -> None:
        self.board.close()
        self.log.close()
