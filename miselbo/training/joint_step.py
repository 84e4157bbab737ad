"""One update of all components of a joint run (the joint counterpart of miselbo.training.loop).

Used by miselbo.training.joint and by benchmarks/train_speed.py, so the benchmark times the very
step that trains. The s2a / s2s active set of a step is drawn from a generator seeded by
(--seed, global step): the same on every process and after resuming.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from miselbo.runtime import distributed
from miselbo.seeding import mix_seed
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.optim import apply_warmup_learning_rate
from miselbo.training.joint_objective import JointSpec, JointTerms, draw_active, joint_loss
from miselbo.training.loop import step_weights
from miselbo.training.nonfinite import gradients_finite, locate_gradient
from miselbo.training.objective import RegularisedLayers
from miselbo.training.precision import Precision, default_precision
from miselbo.training.settings import TrainSettings
from miselbo.training.stop import NonFiniteLoss, StepGuard

_ACTIVE_SET_STREAM = 0x4A4F494E  # mixes the per-step seed of the s2a / s2s active set


@dataclass
class Component:
    """One encoder of the joint run and what trains and saves it."""
    index: int  # 1-based
    model: AutoEncoder
    args: argparse.Namespace  # its checkpoint's namespace (own seed and folder)
    lineage: object  # checkpointing.Lineage
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    layers: RegularisedLayers | None

    def has_gradients(self) -> bool:
        return any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"])


def _active_generator(seed: int, global_step: int) -> torch.Generator:
    """The same on every process and after resuming: seeded by (seed, step)."""
    return torch.Generator().manual_seed(mix_seed(seed, global_step, _ACTIVE_SET_STREAM))


@dataclass
class JointStep:
    """Everything one joint update uses (the joint counterpart of loop.StepParts)."""
    components: list  # Component
    parent: AutoEncoder | None  # fixed mixture member, or None
    spec: JointSpec
    settings: TrainSettings
    scaler: torch.amp.GradScaler
    alpha: torch.Tensor  # [G] KL balancing weights
    iterations_per_epoch: int
    device: torch.device
    precision: Precision | None = None  # None: `auto` on `device` (float16 on CUDA, else float32)


def _locate_component_gradient(components: list) -> str:
    """The first non-finite gradient, in component order."""
    for component in components:
        if component.has_gradients():
            place = locate_gradient(component.model)
            if place.startswith("the gradient of parameter"):
                return f"component {component.index}: {place}"
    return "the gradients"


def joint_train_step(parts: JointStep, x: torch.Tensor, global_step: int, guard: StepGuard) -> JointTerms:
    """As loop.train_step, for all components at once: warm-up learning rates, zero gradients,
    the joint loss (under the run's precision), agreement on a finite loss, backward, gradients
    averaged across processes, a GradScaler step of each component that received gradients, the
    guard's check of a skipped float16 step."""
    settings = parts.settings
    for component in parts.components:
        apply_warmup_learning_rate(component.optimizer, global_step,
                                   parts.iterations_per_epoch * settings.warmup_epochs,
                                   settings.learning_rate)
        component.optimizer.zero_grad(set_to_none=True)
    beta, lam = step_weights(settings, global_step, parts.iterations_per_epoch * settings.epochs)
    active = draw_active(len(parts.components), parts.spec, _active_generator(settings.seed, global_step))
    layers = [c.layers for c in parts.components] if settings.regularised else None
    with (parts.precision or default_precision(parts.device)).autocast():
        terms = joint_loss([c.model for c in parts.components], parts.parent, x, parts.spec, active,
                           beta, parts.alpha, lam, layers)
    guard.check_loss(float(terms.loss.detach()), global_step)
    scale_before = parts.scaler.get_scale()  # 1.0 when disabled
    parts.scaler.scale(terms.loss).backward()
    trainable = [p for c in parts.components for p in c.model.encoder_parameters()]
    distributed.average_gradients_(trainable)
    if not parts.scaler.is_enabled() and not gradients_finite(trainable):
        raise NonFiniteLoss(global_step, float("nan"), _locate_component_gradient(parts.components),
                            what="the gradient norm")
    for component in parts.components:
        if component.has_gradients():
            parts.scaler.step(component.optimizer)
    parts.scaler.update()
    if parts.scaler.is_enabled():
        guard.check_scaler_step(scale_before, parts.scaler.get_scale(), global_step,
                                locate=lambda: _locate_component_gradient(parts.components))
    return terms
