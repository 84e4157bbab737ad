"""The joint objective of K encoders trained against one frozen decoder (train.py --num_new_encoders).

Notation: x one image, z_k ~ q_k(z | x) one reparameterised draw of component k (k = 1..K),
q_mix = (1 / M) sum_{j in scorers} q_j the uniform mixture of the M scoring members (the K
components, plus the parent's encoder as a fixed member with --include_parent_encoder),
beta the KL warm-up weight, gamma_g the KL balancing weights (only while beta < 1), lambda the
regulariser coefficient. NVAE's objective of component k (miselbo.training.objective):

    N_k = rec_k + beta * sum_g gamma_g KL_g(q_k || p)          (rec_k = -log p(x | z_k))

Per objective (loss = mean over the batch, then as below):

* independent:  loss = sum_k N_k                                  (= K separate runs' losses)
* miselbo:      loss = sum_k [ N_k - beta * (log q_k(z_k|x) - log q_mix(z_k|x)) ]
* s2a (A of K): loss = (K / A) sum_{k in active} [ N_k - beta * (log q_k(z_k) - log q_mix(z_k)) ],
                the active set drawn uniformly without replacement each step, q_mix over all K
                (an unbiased estimate of the miselbo loss);
* s2s (A of K): as s2a but q_mix over the active set only (the bound of a random sub-ensemble).

Each plus lambda * sum_k (R_sn,k + R_bn,k) over every component's encoder layers.

Why this form: log p(x, z_k) - log q_mix(z_k) = [log p(x, z_k) - log q_k(z_k)] + [log q_k(z_k) -
log q_mix(z_k)], so at beta = 1 (warm-up over, balancing off) the miselbo loss is, in expectation
over the draws z_k, minus the sum over k of the one-sample MISELBO terms. Not draw by draw: component
k's own ELBO enters in NVAE's analytic-KL form, so per draw the two differ by sum_k D_k with
D_k = sum_g KL_g(q_k || p) - [log q_k(z_k|x) - log p(z_k)] (each KL_g at the drawn z_<g), E[D_k] = 0.
The mixture density does not factor over latent groups, so the cooperative term cannot be balanced
per group; it is scaled by beta like the KL it extends (during warm-up the whole entropy side of
the bound is down-weighted together). log q_k - log q_mix <= log M, so the term is bounded above.

Computation for one batch x [B, C, H, W]: one bottom-up pass per scoring encoder, then ONE decoder
pass of A*B rows (block i = active component i, row i*B + b). At every group each block draws from
its own posterior (the same code path as AutoEncoder.forward); with a mixture objective every
scorer's posterior head is evaluated on all rows with the stacked-head convolution of
miselbo.ensemble.log_weights (here with gradients), and log N_j(z) is summed into scores [A, B, M].
Mixture objectives need num_nf = 0 (scoring a foreign flow needs its inverse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from miselbo.ensemble.log_weights import head_base, stacked_head
from miselbo.nvae.distributions import Normal, reconstruction_loss
from miselbo.nvae.model import PriorRaw
from miselbo.nvae.objectives import kl_balancer

OBJECTIVES = ("independent", "miselbo", "s2a", "s2s")
MIXTURE_OBJECTIVES = ("miselbo", "s2a", "s2s")


@dataclass(frozen=True)
class JointSpec:
    """Which objective, how many active components per step, and the fixed parent member."""
    objective: str
    num_active: int  # A (= K for independent and miselbo)
    include_parent: bool


@dataclass
class JointTerms:
    """One batch's joint loss and what is logged about it (all but `loss` detached)."""
    loss: torch.Tensor  # [], back-propagated
    reconstruction: torch.Tensor  # [], mean over active components of mean_b rec
    kl: torch.Tensor  # [], mean over active components of mean_b sum_g KL_g (unweighted)
    mixture_term: torch.Tensor  # [], mean over active components of mean_b (log q_k - log q_mix)
    spectral: torch.Tensor  # [], sum over components of R_sn
    batchnorm: torch.Tensor  # [], sum over components of R_bn
    kl_weight: float  # beta
    reg_coeff: float  # lambda
    active: tuple  # the active component indices (0-based)


def draw_active(num_components: int, spec: JointSpec, generator: torch.Generator | None = None) -> list:
    """The components that sample this step: all, or A drawn uniformly without replacement."""
    if spec.objective in ("independent", "miselbo"):
        return list(range(num_components))
    order = torch.randperm(num_components, generator=generator)[:spec.num_active]
    return sorted(int(index) for index in order)


def _scorer_indices(spec: JointSpec, num_components: int, active: Sequence[int]) -> list:
    """Indices of the mixture members among the components (the parent is appended separately)."""
    if spec.objective not in MIXTURE_OBJECTIVES:
        return []
    return list(active) if spec.objective == "s2s" else list(range(num_components))


class _MixtureScorer:
    """Accumulates scores[i, b, j] = log q_j(z_i | x_b) (summed over groups) on one decoder pass."""

    def __init__(self, scorers: Sequence, features: Sequence, num_blocks: int, batch: int):
        self.scorers, self.features = list(scorers), list(features)
        self.num_blocks, self.batch = num_blocks, batch
        self.scores = 0.0  # becomes [A, B, M]

    def _group_params(self, group: int, state: torch.Tensor, prior: PriorRaw) -> Normal:
        """Every scorer's posterior of `group` at every row: parameters [A, B, M, L, h, w]."""
        if group == 0:
            top = torch.stack([m.enc_sampler[0](f.top) for m, f in zip(self.scorers, self.features)],
                              dim=1).unsqueeze(0)  # [1, B, M, 2L, h, w]
            return Normal(*torch.chunk(top, 2, dim=3))
        weight, padding, dilation = stacked_head(self.scorers, group)  # with gradients here
        bases = torch.stack([head_base(m, f, group) for m, f in zip(self.scorers, self.features)],
                            dim=1).unsqueeze(0)  # [1, B, M, 2L, h, w]
        per_row = torch.nn.functional.conv2d(state, weight, None, 1, padding, dilation)  # [A B, M 2L, h, w]
        params = bases + per_row.view(self.num_blocks, self.batch, *bases.shape[2:])
        mu_raw, log_sigma_raw = torch.chunk(params, 2, dim=3)  # [A, B, M, L, h, w]
        if self.scorers[0].res_dist:
            shape = (self.num_blocks, self.batch, 1, *prior.mu_raw.shape[1:])
            mu_raw = mu_raw + prior.mu_raw.view(shape)
            log_sigma_raw = log_sigma_raw + prior.log_sigma_raw.view(shape)
        return Normal(mu_raw, log_sigma_raw)

    def add(self, group: int, state: torch.Tensor, prior: PriorRaw, z: torch.Tensor) -> None:
        """z [A B, L, h, w], the post-flow draws the decoder receives."""
        posterior = self._group_params(group, state, prior)
        points = z.view(self.num_blocks, self.batch, 1, *z.shape[1:])  # [A, B, 1, L, h, w]
        self.scores = self.scores + posterior.log_p(points).sum(dim=(3, 4, 5))  # [A, B, M]


def _block(tensor: torch.Tensor, index: int, batch: int) -> torch.Tensor:
    return tensor[index * batch:(index + 1) * batch]


def _joint_pass(encoders, active, x, features: dict, scorer: _MixtureScorer | None, latents):
    """One decoder pass of len(active) * B rows. Returns (logits, kl_all [A][G x [B]]).
    features[k]: component k's bottom-up pass; latents[i][g]: block i's pre-flow z of group g to
    use instead of a draw (or None)."""
    batch = x.shape[0]
    kl_all = [[] for _ in active]

    def choose_z(group: int, state: torch.Tensor, prior: PriorRaw) -> torch.Tensor:
        draws = []
        for i, k in enumerate(active):
            block_prior = PriorRaw(_block(prior.mu_raw, i, batch), _block(prior.log_sigma_raw, i, batch))
            given = None if latents is None else latents[i][group]
            record = encoders[k].posterior_group(group, features[k], _block(state, i, batch),
                                                  block_prior, given)
            kl = record.log_q - record.log_p if encoders[k].with_nf else record.q.kl(record.p)
            kl_all[i].append(kl.sum(dim=(1, 2, 3)))  # [B]
            draws.append(record.z_post)
        z = torch.cat(draws)  # [A B, L, h, w]
        if scorer is not None:
            scorer.add(group, state, prior, z)
        return z

    logits = encoders[0].top_down(len(active) * batch, choose_z)
    return logits, kl_all


def _mixture_members(encoders, parent, scorer_ids, features: dict, x):
    """(scorer models, their bottom-up features); the parent's pass runs without gradients."""
    scorers = [encoders[k] for k in scorer_ids]
    scorer_features = [features[k] for k in scorer_ids]
    if parent is not None:
        with torch.no_grad():
            scorer_features.append(parent.encode_bottom_up(x))
        scorers.append(parent)
    return scorers, scorer_features


def _refresh_normalised_weights(model) -> None:
    """A conv that did not run in this step (an inactive component's heads, which the mixture
    scoring reads through normalize_weight) still holds the previous step's normalised weight,
    which the spectral regulariser reads; recompute it on this step's graph."""
    for layer in model.encoder_conv_layers():
        if getattr(layer, "weight_norm", False):
            layer.weight_normalized = layer.normalize_weight()


def joint_loss(encoders: Sequence, parent, x: torch.Tensor, spec: JointSpec, active: Sequence[int],
               kl_weight: float, alpha: torch.Tensor, reg_coeff: float, layers: Sequence | None,
               latents: Sequence | None = None) -> JointTerms:
    """The module docstring's loss for a pre-processed batch x [B, C, H, W].

    encoders: the K components (sharing encoders[0]'s frozen decoder); parent: the parent model
    (a fixed mixture member) or None; layers: per component a RegularisedLayers, or None to skip
    the regularisers (lambda = 0 throughout); latents: per active component, per group, the
    pre-flow z to use instead of drawing (tests).
    """
    batch, num_components = x.shape[0], len(encoders)
    scorer_ids = _scorer_indices(spec, num_components, active)
    features = {k: encoders[k].encode_bottom_up(x) for k in sorted(set(active) | set(scorer_ids))}
    scorer = None
    if scorer_ids:
        scorers, scorer_features = _mixture_members(encoders, parent if spec.include_parent else None,
                                                    scorer_ids, features, x)
        scorer = _MixtureScorer(scorers, scorer_features, len(active), batch)
    logits, kl_all = _joint_pass(encoders, list(active), x, features, scorer, latents)
    x_rows = x.repeat(len(active), 1, 1, 1)  # [A B, C, H, W], block-major
    rec = reconstruction_loss(encoders[0].decoder_output(logits), x_rows, encoders[0].crop_output)
    rec = rec.view(len(active), batch)  # [A, B]
    mixture_term = rec.new_zeros(len(active), batch)  # [A, B]
    if scorer is not None:
        own = torch.stack([scorer.scores[i, :, scorer_ids.index(k)] for i, k in enumerate(active)])
        log_mix = torch.logsumexp(scorer.scores, dim=2) - math.log(scorer.scores.shape[2])  # [A, B]
        mixture_term = own - log_mix
    loss, kl_totals = rec.new_zeros((), dtype=torch.float32), []  # float32 also under autocast
    for i in range(len(active)):
        balanced_kl, _gamma, _kl_vals = kl_balancer(kl_all[i], kl_weight, kl_balance=True, alpha=alpha)
        loss = loss + torch.mean(rec[i] + balanced_kl - kl_weight * mixture_term[i])
        kl_totals.append(torch.stack(kl_all[i], dim=1).sum(dim=1).mean())
    loss = loss * (num_components / len(active))
    spectral = batchnorm = loss.new_zeros(())
    if layers is not None:
        for index, (model, regularised) in enumerate(zip(encoders, layers)):
            if index not in active:
                _refresh_normalised_weights(model)
            spectral = spectral + model.spectral_norm_parallel(regularised.conv_layers)
            batchnorm = batchnorm + model.batchnorm_loss(regularised.bn_layers)
        loss = loss + reg_coeff * (spectral + batchnorm)
    return JointTerms(loss=loss, reconstruction=rec.mean().detach(),
                      kl=torch.stack(kl_totals).mean().detach(),
                      mixture_term=mixture_term.mean().detach(), spectral=spectral.detach(),
                      batchnorm=batchnorm.detach(), kl_weight=kl_weight, reg_coeff=reg_coeff,
                      active=tuple(active))
