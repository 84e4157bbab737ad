"""A single-encoder run (docs/nvae.md 8.1): one model, trained as NVAE's train.py trains it, with
NVAE's per-epoch test, and one checkpoint file. miselbo.training.session holds the epoch loop and
what joint runs share; miselbo.training.launch picks this session or the joint one.

A p_and_q run trains decoder and encoder; a q run (--train_new_q) trains a new encoder against
the frozen decoder of its parent (miselbo.training.new_encoder). Only rank 0 writes files.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from miselbo.runtime import distributed
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import load_state_dict_strict, read_checkpoint
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
from miselbo.data.datasets import pre_process
from miselbo.runtime.distributed import DistributedSetup
from miselbo.seeding import step_seed
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer, build_scheduler
from miselbo.training.checkpointing import (ROLE_P_AND_Q, ROLE_Q, Lineage, Progress, require_resumable,
                                            save_training_checkpoint)
from miselbo.training.epoch_test import (Draw, UnreplayableDraws, advance_like_full_test,
                                         record_draws)
from miselbo.training.evaluation import TestResult, subset_loader
from miselbo.training.logs import (Board, RunLog, log_prior_samples, log_reconstructions,
                                   log_step_scalars)
from miselbo.training.loop import StepParts, train_epoch
from miselbo.training.new_encoder import adopt_decoder, load_parent, require_recorded_decoder
from miselbo.training.objective import RegularisedLayers
from miselbo.training.options import data_set_of
from miselbo.training.precision import precision_of
from miselbo.training.session import (FINAL_TEST_WHERE, RESULT_FILE_NAME, SavedPoint, Session,
                                      TrainResult, annotate_args, build_run_loaders, new_grad_scaler,
                                      restore_optimisation, resumed_progress, seed_everything,
                                      write_train_result)
from miselbo.training.settings import (IMAGE_LOG_PERIOD, SCALAR_LOG_PERIOD, VALID_IW_SAMPLES,
                                       TrainSettings)
from miselbo.training.stop import StepGuard, StopRequests

# RESULT_FILE_NAME and TrainResult live in miselbo.training.session; importers that know them
# as this module's names keep working.
__all__ = ["RESULT_FILE_NAME", "TrainResult", "TrainingSession", "build_model"]


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
        require_recorded_decoder(model, lineage, path)


@dataclass(kw_only=True)
class TrainingSession(Session):
    """One model's run: its optimizer and schedule, NVAE's per-epoch test, one checkpoint file."""
    model: AutoEncoder
    lineage: Lineage
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    parts: StepParts
    test_draws: list | None = None  # per-row random draws of a test pass (--epoch_test_examples)
    test_draws_recorded: bool = False  # test_draws is None after recording: not replayable

    @classmethod
    def open(cls, args, setup: DistributedSetup, device: torch.device, requests: StopRequests,
             resume_command: str) -> "TrainingSession":
        settings = TrainSettings.from_args(args)
        seed_everything(settings.seed)
        precision = precision_of(args, device)
        loaders = build_run_loaders(args, setup, device)
        args = annotate_args(args, setup, len(loaders.train), precision)
        model, checkpoint, lineage = build_model(args, settings, device)
        trainable = model.encoder_parameters() if lineage.role == ROLE_Q else list(model.parameters())
        optimizer = build_optimizer(trainable, settings.learning_rate, settings.weight_decay,
                                    settings.fast_adamax)
        scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs,
                                    settings.learning_rate_min)
        scaler = new_grad_scaler(device, precision)
        save_dir = Path(args.save)
        progress, last_checkpoint = Progress(), None
        if checkpoint is not None:
            restore_optimisation(checkpoint, optimizer, scheduler, scaler, save_dir, settings)
            progress = resumed_progress(checkpoint, settings, setup)
            require_resumable(progress, len(loaders.train), save_dir / "checkpoint.pt")
            last_checkpoint = SavedPoint(save_dir / "checkpoint.pt", progress.epoch, progress.global_step)
        layers = None
        if settings.regularised:
            layers = RegularisedLayers.encoder_of(model) if lineage.role == ROLE_Q else RegularisedLayers()
        parts = StepParts(model=model, optimizer=optimizer, grad_scaler=scaler, trainable=trainable,
                          alpha=kl_balance_alpha(model.groups_per_scale, device=device),
                          layers=layers, settings=settings, iterations_per_epoch=len(loaders.train),
                          device=device, precision=precision)
        is_main = setup.rank == 0
        return cls(args=args, settings=settings, setup=setup, device=device, loaders=loaders,
                   model=model, lineage=lineage, optimizer=optimizer, scheduler=scheduler,
                   scaler=scaler, precision=precision, parts=parts, progress=progress,
                   last_checkpoint=last_checkpoint,
                   save_dir=save_dir, guard=StepGuard(requests, device), resume_command=resume_command,
                   log=RunLog(save_dir, enabled=is_main), board=Board(save_dir, enabled=is_main))

    # ------------------------------------------------------------------------- the epochs

    def log_start(self) -> None:
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

    def schedulers(self) -> list:
        return [self.scheduler]

    def train_steps(self, bar) -> None:
        train_epoch(self.parts, self.clock.timed_batches(self.loaders.train, "data_loading"),
                    self.progress, self.guard, on_step=partial(self._after_step, bar))

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

    def log_epoch_loss(self, epoch: int, epoch_loss: float) -> None:
        self.log.info("epoch %d/%d done: training loss %.4f (NELBO + regularisers, nats), global "
                      "step %d, lr %.3g", epoch + 1, self.settings.epochs, epoch_loss,
                      self.progress.global_step, self.optimizer.param_groups[0]["lr"])

    def decoder_and_lineage(self) -> tuple:
        return self.model, self.lineage

    def check_decoder(self, epoch: int) -> None:
        super().check_decoder(epoch)
        self.log.info("--param_check: decoder fingerprint unchanged after epoch %d", epoch + 1)

    # ------------------------------------------------------------------------- the per-epoch test

    def validate(self, epoch: int) -> None:
        step = self.progress.global_step
        self.model.eval()
        log_prior_samples(self.board, self.model, step)
        result = self._epoch_test(f"while testing after epoch {epoch + 1}")
        bpd = self.bpd_coefficient()
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
            return self.evaluate(self.model, VALID_IW_SAMPLES, where)
        data_seed, draw_seed = (step_seed(self.settings.seed, step, self.setup.rank, "test")
                                for step in (0, 1))
        loader = subset_loader(self.loaders.test, subset_size, data_seed)
        draws = self._full_test_draws(loader)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(draw_seed)
            result = self.evaluate(self.model, VALID_IW_SAMPLES, where, loader)
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

    # ------------------------------------------------------------------------- checkpoints, stops

    def save(self) -> Path:
        path = self.save_dir / "checkpoint.pt"
        self.require_finite_checkpoint([("", self.model, self.optimizer)])
        if self.is_main:
            path = save_training_checkpoint(self.save_dir, self.model, self.args, self.optimizer,
                                            self.scheduler, self.scaler, self.progress, self.lineage)
            self.log.info("checkpoint written: %s (epoch %d done, global step %d)", path,
                          self.progress.epoch, self.progress.global_step)
        distributed.barrier()
        self.last_checkpoint = SavedPoint(path, self.progress.epoch, self.progress.global_step)
        return path

    def save_for_stop(self) -> str:
        """A checkpoint of the current state, unless the last one holds it already."""
        last, progress = self.last_checkpoint, self.progress
        up_to_date = last is not None and (last.epoch, last.global_step) == (progress.epoch,
                                                                             progress.global_step)
        return f"Checkpoint written to {last.path if up_to_date else self.save()}."

    def stopped_progress(self) -> str:
        progress = self.progress
        return (f" ({progress.epoch} epoch(s) and {progress.step_in_epoch} step(s) of the next "
                f"done)")

    def failed_step(self, epoch: int) -> str:
        return (f"epoch {epoch + 1}, step {self.progress.step_in_epoch + 1} of "
                f"{self.parts.iterations_per_epoch}")

    def kept_checkpoint(self) -> str:
        last = self.last_checkpoint
        return (f"checkpoint, {last.path} ({last.epoch} epoch(s), global step {last.global_step}), "
                f"is kept; resume from it")

    # ------------------------------------------------------------------------- the end

    def final_test(self, started: float) -> TrainResult:
        samples = self.settings.final_iw_samples
        with self.clock.measure("final_test"):
            result = self.evaluate(self.model, samples, FINAL_TEST_WHERE)
        bpd = self.bpd_coefficient()
        self.log.info("final test (%d images, %d importance samples): NELBO %.4f nats (%.4f bpd), "
                      "-log p %.4f nats (%.4f bpd)", result.num_images, samples, result.nelbo,
                      result.nelbo * bpd, result.neg_log_p, result.neg_log_p * bpd)
        self.board.scalar("test/nelbo", result.nelbo, self.progress.global_step)
        self.board.scalar("test/neg_log_p", result.neg_log_p, self.progress.global_step)
        outcome = self.result_of(self.save_dir, self.model, self.lineage, result, started,
                                 self.clock.seconds)
        if self.is_main:
            write_train_result(outcome)
        return outcome
