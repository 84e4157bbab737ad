"""NVAE's training objective for one batch (docs/nvae.md 8.4, step 5).

loss = mean_b [ rec_b + β Σ_g γ_g KL_bg ] + λ (R_sn + R_bn), with rec_b = −log p(x_b | z_b) (cropped
to 28x28 for MNIST), β the KL warm-up weight, γ the balancing weights (only while β < 1), λ the
regulariser coefficient, R_sn the spectral and R_bn the batch-norm regulariser over the layers
being trained (all layers, or the encoder's with a frozen decoder). Units: nats per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from miselbo.nvae.distributions import reconstruction_loss
from miselbo.nvae.objectives import kl_balancer


@dataclass(frozen=True)
class RegularisedLayers:
    """The layers the regularisers cover; None = every layer of the model (NVAE)."""
    conv_layers: Sequence[nn.Module] | None = None
    bn_layers: Sequence[nn.Module] | None = None

    @classmethod
    def encoder_of(cls, model) -> "RegularisedLayers":
        return cls(tuple(model.encoder_conv_layers()), tuple(model.encoder_bn_layers()))


@dataclass
class LossTerms:
    """One batch's objective and what is logged about it (tensors are detached except `loss`)."""
    loss: torch.Tensor  # [], the value that is back-propagated
    reconstruction: torch.Tensor  # [], mean_b rec_b
    kl: torch.Tensor  # [], mean_b Σ_g KL_bg (unweighted)
    spectral: torch.Tensor  # [], R_sn (0 when not computed)
    batchnorm: torch.Tensor  # [], R_bn (0 when not computed)
    kl_weight: float  # β
    reg_coeff: float  # λ
    balance_coeffs: torch.Tensor  # [G], γ
    kl_per_group: torch.Tensor  # [G], mean_b KL_bg
    kl_diag: list  # G x [L], per-channel KL (for the active-unit count)
    logits: torch.Tensor  # decoder output (for reconstruction images)


def nelbo_loss(model, x: torch.Tensor, kl_weight: float, alpha: torch.Tensor, reg_coeff: float,
               layers: RegularisedLayers | None) -> LossTerms:
    """The objective above for a pre-processed batch x [B, C, H, W]; layers None skips R_sn, R_bn."""
    logits, _log_q, _log_p, kl_all, kl_diag = model(x)
    rec = reconstruction_loss(model.decoder_output(logits), x, model.crop_output)  # [B]
    balanced_kl, gamma, kl_vals = kl_balancer(kl_all, kl_weight, kl_balance=True, alpha=alpha)
    loss = torch.mean(rec.float() + balanced_kl.float())  # float32 also under autocast
    spectral = batchnorm = loss.new_zeros(())
    if layers is not None:
        spectral = model.spectral_norm_parallel(layers.conv_layers)
        batchnorm = model.batchnorm_loss(layers.bn_layers)
        loss = loss + reg_coeff * spectral + reg_coeff * batchnorm
    total_kl = torch.stack(kl_all, dim=1).sum(dim=1)  # [B]
    return LossTerms(loss=loss, reconstruction=rec.mean().detach(), kl=total_kl.mean().detach(),
                     spectral=spectral.detach(), batchnorm=batchnorm.detach(), kl_weight=kl_weight,
                     reg_coeff=reg_coeff, balance_coeffs=gamma.detach(),
                     kl_per_group=kl_vals.detach(), kl_diag=[k.detach() for k in kl_diag],
                     logits=logits.detach())
