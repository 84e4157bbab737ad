"""train.py --train_new_q --num_new_encoders K (K >= 2, or --include_parent_encoder): K encoders
trained against one frozen decoder in one run.

Component k (1-based) is built after seeding with `--seed + k - 1`, gets every decoder tensor of
the parent copied and frozen (new_encoder.adopt_decoder, as a single `--train_new_q` run), and
then uses component 1's decoder objects (one decoder in memory). Each component has its own
optimizer and cosine schedule, saved in its own checkpoint (Adamax updates each parameter from its
own gradient, so K optimizers act as one over all encoders); one GradScaler scales the joint
loss. The objective is joint_objective's. Data: one pass over the training set, each batch used by
every component (the data order follows `--seed`, so a single run with component 1's seed sees
the same batches; the others' single runs would see other orders).

Not as in a single run: no per-epoch validation (the final test runs for every component);
checkpoints are written as a set (joint_checkpoints); `train_result.json` is written per
component and `joint_result.json` in the experiment folder. Signals, non-finite losses, decoder
fingerprint checks, resume and several processes behave as in miselbo.training.run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from miselbo.runtime import distributed
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import load_nvae_checkpoint, load_state_dict_strict, read_checkpoint
from miselbo.runtime.cli import progress as progress_bar
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
from miselbo.data.datasets import num_output_dims, pre_process, start_epoch
from miselbo.runtime.distributed import DistributedSetup
from miselbo.seeding import step_seed
from miselbo.ensemble.shared_decoder import share_decoder
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer, build_scheduler
from miselbo.storage.safe_io import atomic_write_text
from miselbo.training.checkpointing import (ROLE_Q, Lineage, Progress, require_parent_decoder,
                                            restore_training_state, save_training_checkpoint)
from miselbo.training.evaluation import EvaluationInterrupted, evaluate_bounds
from miselbo.training.joint_checkpoints import (JOINT_RESULT_FILE_NAME, component_folder,
                                                recover_pending, save_component_set)
from miselbo.training.joint_objective import JointSpec, JointTerms
from miselbo.training.joint_step import Component, JointStep, joint_train_step
from miselbo.training.logs import Board, RunLog
from miselbo.training.loop import skip_batches
from miselbo.training.new_encoder import adopt_decoder, load_parent
from miselbo.training.objective import RegularisedLayers
from miselbo.training.options import data_set_of
from miselbo.training.run import (RESULT_FILE_NAME, TrainResult, _annotate, _follow_schedule_flags,
                                  _loaders, _step_scheduler, finish_epoch_loss, parameter_sha256, run_session,
                                  seed_everything)
from miselbo.training.settings import GRAD_SCALER_INIT_SCALE, PARAMETER_AVERAGING_PERIOD, TrainSettings
from miselbo.training.stop import (EXIT_TRAINING_FAILED, NonFiniteLoss, StepGuard, StopAfterStep,
                                   StopRequests, TrainingStopped, signal_name)

def is_joint_run(args: argparse.Namespace) -> bool:
    """True when train.py must train several encoders together (else the single-run path)."""
    return bool(getattr(args, "train_new_q", False)) and (
        getattr(args, "num_new_encoders", 1) > 1 or bool(getattr(args, "include_parent_encoder", False)))


def component_seed(base_seed: int, index: int) -> int:
    """Seed of component `index` (1-based): --seed + index - 1."""
    return base_seed + index - 1


def joint_spec(args: argparse.Namespace) -> JointSpec:
    objective = args.mixture_objective
    active = args.num_active if objective in ("s2a", "s2s") else args.num_new_encoders
    return JointSpec(objective=objective, num_active=active, include_parent=args.include_parent_encoder)


def _component_args(args: argparse.Namespace, index: int) -> argparse.Namespace:
    folder = component_folder(Path(args.save), index)
    return argparse.Namespace(**dict(vars(args), seed=component_seed(args.seed, index), save=str(folder)))


def _fresh_models(args, count: int) -> tuple[list, list]:
    parent = load_parent(args.p_and_q1_path, args.trust_checkpoint)
    models, lineages = [], []
    for index in range(1, count + 1):
        seed = component_seed(args.seed, index)
        seed_everything(seed)
        model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
        adopt_decoder(model, parent)
        models.append(model)
        lineages.append(Lineage(ROLE_Q, seed, str(parent.path), parent.fingerprint))
    return models, lineages


def _resumed_models(args, count: int) -> tuple[list, list, list]:
    models, lineages, checkpoints = [], [], []
    for index in range(1, count + 1):
        path = component_folder(Path(args.save), index) / "checkpoint.pt"
        checkpoint = read_checkpoint(path, trust=args.trust_checkpoint)
        model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
        load_state_dict_strict(model, checkpoint["state_dict"], source=str(path))
        lineage = Lineage.from_checkpoint(checkpoint, args)
        if lineage.role != ROLE_Q:
            raise CheckpointError(f"{path} is not a new-encoder checkpoint; it cannot resume a joint run.")
        model.freeze_decoder()
        if model.decoder_fingerprint() != lineage.parent_fingerprint:
            raise CheckpointError(f"{path}: its decoder differs from the parent decoder it records "
                                  f"({lineage.parent_path}); the file was changed after writing.")
        models.append(model)
        lineages.append(lineage)
        checkpoints.append(checkpoint)
    steps = {int(c["global_step"]) for c in checkpoints}
    if len(steps) > 1:
        raise CheckpointError(f"the component checkpoints in {args.save} stand at different steps "
                              f"{sorted(steps)}; they were not written by one joint run.")
    return models, lineages, checkpoints


def _parent_member(parent_path: str, trust: bool, decoder_owner: AutoEncoder) -> AutoEncoder:
    """The parent's encoder as a fixed mixture member (eval mode, no gradients, shared decoder)."""
    model, _args, _checkpoint = load_nvae_checkpoint(parent_path, map_location="cpu", trust=trust)
    for param in model.parameters():
        param.requires_grad_(False)
    share_decoder(decoder_owner, model)
    return model.eval()


def run_joint_training(args: argparse.Namespace, setup: DistributedSetup, device: torch.device,
                       resume_command: str) -> TrainResult:
    """Like run.run_training for a joint run; returns component 1's result, except that its
    parameter_sha256 covers every component (SHA-256 of the components' hashes in order)."""
    return run_session(JointSession, args, setup, device, resume_command)


@dataclass
class JointSession:
    """One process's joint run: the components, the data, the epoch procedure."""
    args: argparse.Namespace
    settings: TrainSettings
    spec: JointSpec
    setup: DistributedSetup
    device: torch.device
    loaders: object
    components: list
    parent: AutoEncoder | None
    scaler: torch.amp.GradScaler
    alpha: torch.Tensor
    progress: Progress
    save_dir: Path
    guard: StepGuard
    resume_command: str
    log: RunLog
    board: Board
    saved_step: int | None = None  # global step of the last checkpoint set

    @property
    def is_main(self) -> bool:
        return self.setup.rank == 0

    @property
    def models(self) -> list:
        return [component.model for component in self.components]

    @classmethod
    def open(cls, args, setup: DistributedSetup, device: torch.device, requests: StopRequests,
             resume_command: str) -> "JointSession":
        settings = TrainSettings.from_args(args)
        save_dir = Path(args.save)
        if args.cont_training and setup.rank == 0:
            recover_pending(save_dir)
        distributed.barrier()
        loaders = _loaders(args, setup, device)
        args = _annotate(args, setup, len(loaders.train))
        count = args.num_new_encoders
        checkpoints = None
        if args.cont_training:
            models, lineages, checkpoints = _resumed_models(args, count)
        else:
            models, lineages = _fresh_models(args, count)
        seed_everything(settings.seed)
        for model in models[1:]:
            share_decoder(models[0], model)
        parent = None
        if args.include_parent_encoder:
            parent = _parent_member(lineages[0].parent_path, args.trust_checkpoint, models[0]).to(device)
        components = [cls._component(args, index, model.to(device), lineage, settings)
                      for index, (model, lineage) in enumerate(zip(models, lineages), start=1)]
        use_fast_cpu_layout([component.model for component in components] + ([parent] if parent else []))
        scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE,
                                      enabled=device.type == "cuda")
        progress, saved_step = Progress(), None
        if checkpoints is not None:
            for component, checkpoint in zip(components, checkpoints):
                restore_training_state(checkpoint, component.optimizer, component.scheduler, scaler,
                                       Path(component.args.save))
                _follow_schedule_flags(component.scheduler, settings)
            progress = Progress.from_checkpoint(checkpoints[0])
            saved_step = progress.global_step
            torch.manual_seed(step_seed(settings.seed, progress.global_step, setup.rank, "train"))
        is_main = setup.rank == 0
        return cls(args=args, settings=settings, spec=joint_spec(args), setup=setup, device=device,
                   loaders=loaders, components=components, parent=parent, scaler=scaler,
                   alpha=kl_balance_alpha(models[0].groups_per_scale, device=device),
                   progress=progress, save_dir=save_dir, guard=StepGuard(requests, device),
                   resume_command=resume_command, log=RunLog(save_dir, enabled=is_main),
                   board=Board(save_dir, enabled=is_main), saved_step=saved_step)

    @staticmethod
    def _component(args, index: int, model: AutoEncoder, lineage: Lineage,
                   settings: TrainSettings) -> Component:
        optimizer = build_optimizer(model.encoder_parameters(), settings.learning_rate,
                                    settings.weight_decay, settings.fast_adamax)
        scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs,
                                    settings.learning_rate_min)
        layers = RegularisedLayers.encoder_of(model) if settings.regularised else None
        return Component(index=index, model=model, args=_component_args(args, index), lineage=lineage,
                         optimizer=optimizer, scheduler=scheduler, layers=layers)

    # ------------------------------------------------------------------------- the run

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self.log.info("joint run of %d encoders (seeds %s), objective %s, %d active per step%s, "
                      "frozen decoder from %s; %d steps/epoch of %d images per process",
                      len(self.components), [c.lineage.seed for c in self.components],
                      self.spec.objective, self.spec.num_active,
                      " + parent encoder in the mixture" if self.spec.include_parent else "",
                      self.components[0].lineage.parent_path, len(self.loaders.train),
                      self.args.batch_size)
        if self.progress.global_step:
            self.log.info("resuming at epoch %d, global step %d", self.progress.epoch + 1,
                          self.progress.global_step)
        for epoch in range(self.progress.epoch, self.settings.epochs):
            self._train_one_epoch(epoch)
            self._finish_epoch(epoch)
        return self._final_test(started)

    def _train_one_epoch(self, epoch: int) -> None:
        progress = self.progress
        start_epoch(self.loaders, progress.global_step - progress.step_in_epoch, self.settings.seed)
        if progress.step_in_epoch == 0:
            for component in self.components:
                _step_scheduler(component.scheduler, epoch, self.settings.warmup_epochs)
        bar = progress_bar(total=len(self.loaders.train), initial=progress.step_in_epoch,
                           desc=f"joint epoch {epoch + 1}/{self.settings.epochs}", unit="step",
                           **({} if self.is_main else {"disable": True}))
        try:
            self._steps(bar)
        except StopAfterStep as stop:
            self._stop(stop.signal_number, f"during epoch {epoch + 1}")
        except NonFiniteLoss as err:
            raise self._nonfinite(err, epoch) from None
        finally:
            bar.close()

    def _steps(self, bar) -> None:
        """The rest of the epoch (as loop.train_epoch, with the joint step)."""
        progress = self.progress
        for model in self.models:
            model.train()
        start = progress.step_in_epoch
        for position, (images, *_) in enumerate(skip_batches(self.loaders.train, start), start=start):
            x = pre_process(images.to(self.device, non_blocking=True), self.settings.num_x_bits)
            if position % PARAMETER_AVERAGING_PERIOD == 0:
                distributed.average_parameters_(self._trainable())
            terms = self.step(x, progress.global_step)
            progress.epoch_loss_sum += float(terms.loss.detach())
            progress.epoch_loss_count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms.loss.detach()):.2f}", kl=f"{float(terms.kl):.2f}",
                            mix=f"{float(terms.mixture_term):.3f}", refresh=False)
            progress.global_step += 1
            progress.step_in_epoch = position + 1
            if self.guard.stop_signal:
                raise StopAfterStep(self.guard.stop_signal)

    def _trainable(self) -> list:
        return [p for component in self.components for p in component.model.encoder_parameters()]

    def step(self, x: torch.Tensor, global_step: int) -> JointTerms:
        """One update of every component on x [B, C, H, W]; NonFiniteLoss before updating."""
        parts = JointStep(components=self.components, parent=self.parent, spec=self.spec,
                          settings=self.settings, scaler=self.scaler, alpha=self.alpha,
                          iterations_per_epoch=len(self.loaders.train), device=self.device)
        return joint_train_step(parts, x, global_step, self.guard)

    def _finish_epoch(self, epoch: int) -> None:
        epoch_loss = finish_epoch_loss(self.progress, self.device)
        self.log.info("epoch %d/%d done: joint training loss %.4f (nats, summed over components), "
                      "global step %d", epoch + 1, self.settings.epochs, epoch_loss,
                      self.progress.global_step)
        self.board.scalar("train/epoch_loss", epoch_loss, self.progress.global_step)
        if self.settings.param_check:
            require_parent_decoder(self.models[0].decoder_fingerprint(), self.components[0].lineage,
                                   f"during epoch {epoch + 1} (--param_check)")
        if self.settings.checkpoints_after(epoch):
            self._save()

    # ------------------------------------------------------------------------- checkpoints, stops

    def _writer(self, component: Component):
        extra = {"component": component.index, "num_components": len(self.components),
                 "objective": self.spec.objective}
        return partial(_write_component, component, self.scaler, self.progress, extra)

    def _save(self) -> None:
        if self.is_main:
            paths = save_component_set(self.save_dir, [self._writer(c) for c in self.components])
            self.log.info("checkpoints written: %s (epoch %d done, global step %d)",
                          ", ".join(str(p) for p in paths), self.progress.epoch, self.progress.global_step)
        distributed.barrier()
        self.saved_step = self.progress.global_step

    def _stop(self, signal_number: int, where: str) -> None:
        self._save()
        progress = self.progress
        raise TrainingStopped(
            f"training stopped by {signal_name(signal_number)} {where}, at global step "
            f"{progress.global_step}. Checkpoints of all {len(self.components)} components written "
            f"to {self.save_dir}/component-*. Resume with:\n  {self.resume_command}", 128 + signal_number)

    def _nonfinite(self, err: NonFiniteLoss, epoch: int) -> TrainingStopped:
        if self.saved_step is None:
            kept = "No checkpoint had been written yet; start again, e.g. with a lower --learning_rate."
        else:
            kept = (f"The last good checkpoints (global step {self.saved_step}) in {self.save_dir} are "
                    f"kept; resume from them (perhaps with a lower --learning_rate) with:\n  "
                    f"{self.resume_command}")
        return TrainingStopped(f"training stopped: {err} (joint run, epoch {epoch + 1}); the weights "
                               f"were not updated with it and no checkpoint was written. {kept}",
                               EXIT_TRAINING_FAILED)

    # ------------------------------------------------------------------------- the end

    def _final_test(self, started: float) -> TrainResult:
        samples = self.settings.final_iw_samples
        bpd = 1.0 / (math.log(2.0) * num_output_dims(data_set_of(self.args)))
        results = []
        for component in self.components:
            try:
                test = evaluate_bounds(self.loaders.test, component.model, samples,
                                       self.settings.num_x_bits, should_stop=self.guard.stop_requested)
            except EvaluationInterrupted:
                self._stop(self.guard.stop_signal, "during the final test (training itself is complete)")
            self.log.info("component %d final test (%d images, %d samples): NELBO %.4f nats, -log p "
                          "%.4f nats", component.index, test.num_images, samples, test.nelbo, test.neg_log_p)
            folder = Path(component.args.save)
            results.append(TrainResult(
                checkpoint_path=folder / "checkpoint.pt", save_dir=folder, role=ROLE_Q,
                seed=component.lineage.seed, epochs=self.progress.epoch,
                global_step=self.progress.global_step, test_nelbo=test.nelbo,
                test_neg_log_p=test.neg_log_p, test_nelbo_bpd=test.nelbo * bpd,
                test_neg_log_p_bpd=test.neg_log_p * bpd, final_iw_samples=samples,
                decoder_fingerprint=component.model.decoder_fingerprint(),
                parameter_sha256=parameter_sha256(component.model),
                wall_seconds=time.perf_counter() - started))
        if self.is_main:
            for result in results:
                atomic_write_text(result.save_dir / RESULT_FILE_NAME, result.to_json(), record_sha256=False)
            summary = {"objective": self.spec.objective, "num_active": self.spec.num_active,
                       "include_parent_encoder": self.spec.include_parent,
                       "wall_seconds": time.perf_counter() - started,
                       "components": [json.loads(result.to_json()) for result in results]}
            atomic_write_text(self.save_dir / JOINT_RESULT_FILE_NAME, json.dumps(summary, indent=2) + "\n",
                              record_sha256=False)
        every_component = hashlib.sha256("".join(r.parameter_sha256 for r in results).encode()).hexdigest()
        return replace(results[0], parameter_sha256=every_component,
                       wall_seconds=time.perf_counter() - started)

    def close(self) -> None:
        self.board.close()
        self.log.close()


def _write_component(component: Component, scaler, progress: Progress, extra: dict, target: Path) -> Path:
    return save_training_checkpoint(Path(component.args.save), component.model, component.args,
                                    component.optimizer, component.scheduler, scaler, progress,
                                    component.lineage, target=target, extra=extra)
