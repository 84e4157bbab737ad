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
component and `joint_result.json` in the experiment folder. The epoch loop, signals, non-finite
losses, decoder fingerprint checks, resume and several processes are miselbo.training.session's,
as for a single-encoder run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from miselbo.runtime import distributed
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import load_nvae_checkpoint, load_state_dict_strict, read_checkpoint
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
from miselbo.data.datasets import pre_process
from miselbo.runtime.distributed import DistributedSetup
from miselbo.ensemble.shared_decoder import share_decoder
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer, build_scheduler
from miselbo.storage.safe_io import atomic_write_text
from miselbo.training.checkpointing import ROLE_Q, Lineage, Progress, save_training_checkpoint
from miselbo.training.joint_checkpoints import (JOINT_RESULT_FILE_NAME, component_folder,
                                                recover_pending, save_component_set)
from miselbo.training.joint_objective import JointSpec, JointTerms
from miselbo.training.joint_step import Component, JointStep, joint_train_step
from miselbo.training.logs import Board, RunLog
from miselbo.training.loop import skip_batches
from miselbo.training.new_encoder import adopt_decoder, load_parent, require_recorded_decoder
from miselbo.training.objective import RegularisedLayers
from miselbo.training.precision import precision_of
from miselbo.training.session import (FINAL_TEST_WHERE, SavedPoint, Session, TrainResult,
                                      annotate_args, build_run_loaders, new_grad_scaler,
                                      restore_optimisation, resumed_progress, seed_everything,
                                      write_train_result)
from miselbo.training.settings import PARAMETER_AVERAGING_PERIOD, TrainSettings
from miselbo.training.stop import StepGuard, StopAfterStep, StopRequests


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
        require_recorded_decoder(model, lineage, path)
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


@dataclass(kw_only=True)
class JointSession(Session):
    """One process's joint run: K components against one frozen decoder, one GradScaler, the
    checkpoints written as a set, no per-epoch test, a final test per component."""
    EPOCH_LABEL = "joint epoch"

    spec: JointSpec
    components: list  # Component
    parent: AutoEncoder | None  # the parent's encoder as a fixed mixture member, or None
    alpha: torch.Tensor  # [G] KL balancing weights

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
        precision = precision_of(args, device)
        loaders = build_run_loaders(args, setup, device)
        args = annotate_args(args, setup, len(loaders.train), precision)
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
        components = [_component(args, index, model.to(device), lineage, settings)
                      for index, (model, lineage) in enumerate(zip(models, lineages), start=1)]
        use_fast_cpu_layout([component.model for component in components] + ([parent] if parent else []))
        scaler = new_grad_scaler(device, precision)
        progress, last_checkpoint = Progress(), None
        if checkpoints is not None:
            for component, checkpoint in zip(components, checkpoints):
                restore_optimisation(checkpoint, component.optimizer, component.scheduler, scaler,
                                     Path(component.args.save), settings)
            progress = resumed_progress(checkpoints[0], settings, setup)
            last_checkpoint = SavedPoint(save_dir, progress.epoch, progress.global_step)
        is_main = setup.rank == 0
        return cls(args=args, settings=settings, spec=joint_spec(args), setup=setup, device=device,
                   loaders=loaders, components=components, parent=parent, scaler=scaler,
                   precision=precision,
                   alpha=kl_balance_alpha(models[0].groups_per_scale, device=device),
                   progress=progress, save_dir=save_dir, guard=StepGuard(requests, device),
                   resume_command=resume_command, log=RunLog(save_dir, enabled=is_main),
                   board=Board(save_dir, enabled=is_main), last_checkpoint=last_checkpoint)

    # ------------------------------------------------------------------------- the epochs

    def log_start(self) -> None:
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

    def schedulers(self) -> list:
        return [component.scheduler for component in self.components]

    def train_steps(self, bar) -> None:
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
                          iterations_per_epoch=len(self.loaders.train), device=self.device,
                          precision=self.precision)
        return joint_train_step(parts, x, global_step, self.guard)

    def log_epoch_loss(self, epoch: int, epoch_loss: float) -> None:
        self.log.info("epoch %d/%d done: joint training loss %.4f (nats, summed over components), "
                      "global step %d", epoch + 1, self.settings.epochs, epoch_loss,
                      self.progress.global_step)

    def decoder_and_lineage(self) -> tuple:
        return self.models[0], self.components[0].lineage

    # ------------------------------------------------------------------------- checkpoints, stops

    def _writer(self, component: Component):
        extra = {"component": component.index, "num_components": len(self.components),
                 "objective": self.spec.objective}
        return partial(_write_component, component, self.scaler, self.progress, extra)

    def save(self) -> None:
        self.require_finite_checkpoint([(f"component {c.index}: ", c.model, c.optimizer)
                                        for c in self.components])
        if self.is_main:
            paths = save_component_set(self.save_dir, [self._writer(c) for c in self.components])
            self.log.info("checkpoints written: %s (epoch %d done, global step %d)",
                          ", ".join(str(p) for p in paths), self.progress.epoch, self.progress.global_step)
        distributed.barrier()
        self.last_checkpoint = SavedPoint(self.save_dir, self.progress.epoch, self.progress.global_step)

    def save_for_stop(self) -> str:
        """The whole set again, also when the last set holds the current state."""
        self.save()
        return f"Checkpoints of all {len(self.components)} components written to {self.save_dir}/component-*."

    def stopped_progress(self) -> str:
        return ""

    def failed_step(self, epoch: int) -> str:
        return f"joint run, epoch {epoch + 1}"

    def kept_checkpoint(self) -> str:
        return (f"checkpoints (global step {self.last_checkpoint.global_step}) in {self.save_dir} "
                f"are kept; resume from them")

    # ------------------------------------------------------------------------- the end

    def final_test(self, started: float) -> TrainResult:
        """Every component's final test and result; returns component 1's result, except that its
        parameter_sha256 covers every component (SHA-256 of the components' hashes in order)."""
        samples = self.settings.final_iw_samples
        results = []
        for component in self.components:
            test = self.evaluate(component.model, samples, FINAL_TEST_WHERE)
            self.log.info("component %d final test (%d images, %d samples): NELBO %.4f nats, -log p "
                          "%.4f nats", component.index, test.num_images, samples, test.nelbo, test.neg_log_p)
            results.append(self.result_of(Path(component.args.save), component.model, component.lineage,
                                          test, started))
        if self.is_main:
            for result in results:
                write_train_result(result)
            summary = {"objective": self.spec.objective, "num_active": self.spec.num_active,
                       "include_parent_encoder": self.spec.include_parent,
                       "wall_seconds": time.perf_counter() - started,
                       "components": [json.loads(result.to_json()) for result in results]}
            atomic_write_text(self.save_dir / JOINT_RESULT_FILE_NAME, json.dumps(summary, indent=2) + "\n",
                              record_sha256=False)
        every_component = hashlib.sha256("".join(r.parameter_sha256 for r in results).encode()).hexdigest()
        return replace(results[0], parameter_sha256=every_component,
                       wall_seconds=time.perf_counter() - started)


def _component(args, index: int, model: AutoEncoder, lineage: Lineage, settings: TrainSettings) -> Component:
    """Component `index` of the run: its own optimizer, schedule, regularised layers and folder."""
    optimizer = build_optimizer(model.encoder_parameters(), settings.learning_rate,
                                settings.weight_decay, settings.fast_adamax)
    scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs,
                                settings.learning_rate_min)
    layers = RegularisedLayers.encoder_of(model) if settings.regularised else None
    return Component(index=index, model=model, args=_component_args(args, index), lineage=lineage,
                     optimizer=optimizer, scheduler=scheduler, layers=layers)


def _write_component(component: Component, scaler, progress: Progress, extra: dict, target: Path) -> Path:
    return save_training_checkpoint(Path(component.args.save), component.model, component.args,
                                    component.optimizer, component.scheduler, scaler, progress,
                                    component.lineage, target=target, extra=extra)
