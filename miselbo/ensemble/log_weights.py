"""One decoder, S encoders: the log-weight tensors of an NVAE ensemble, computed efficiently.

For a batch x [B, C, H, W] and L importance samples per member, `Ensemble.log_weights` returns
``log_p [B, S, L]`` (log p(x, z_sl), z_sl the l-th draw of member s) and ``log_q [B, S, L, S]``
(log q_j(z_sl | x) for every member j), float64, in the convention of `miselbo.estimators`.

How (docs/nvae.md, "Forward pass"):

* each encoder's bottom-up pass runs once per batch (S passes, reused for all L samples);
* for each source member s, its L samples go through ONE batched decoder pass per chunk (rows =
  chunk x B); at every latent group all S posterior heads are evaluated on the shared decoder
  state, s draws its pre-flow z from its own posterior and pushes it through its own flows, and the
  decoder receives the post-flow z;
* log p(x, z) = log p(x | z) (output head, honouring crop_output) + sum_g log p_g(z_g | z_<g).

The S posterior heads of group g >= 1 as one convolution. Member j's head is
enc_param_j = Samp_j(F_j + Comb_j(state)), with Comb_j a 1x1 conv (Wc_j, bc_j), Samp_j a k x k
conv (Ws_j, bs_j) with zero padding and F_j the bottom-up feature. Both are linear, so
    enc_param_j = Samp_j(F_j + bc_j)                       (depends on x only: once per batch)
                + conv(state, Ws_j o Wc_j)                  (per sample, no bias),
where (Ws_j o Wc_j)[o, i] = sum_c Ws_j[o, c] Wc_j[c, i] (zero padding commutes with the 1x1 map).
The S composed kernels are stacked into one [S 2L, C_dec, k, k] convolution that reads the shared
state once; this costs less than a combiner conv with S C outputs followed by a grouped sampler
conv (benchmarks/eval_speed.py times both; docs/benchmarks.md has the ratio), and is exact up to
float32 round-off. The stacked weights are written when the Ensemble is built and rebuilt whenever a
head parameter changed since (checked on every call through the parameters' identities and in-place
version counters, so a load_state_dict or an optimizer step is picked up; tests/test_ensemble.py).
The convolution's output buffer is turned into the S members' Normal parameters in place (base,
prior, soft clamp, sigma) and log q of every member is summed with two temporaries: the same float
operations as `Normal`, bit for bit, without its six intermediate tensors of size S x L per row.
The work is split into named sections (`miselbo.ensemble.sections`: encoder, decoder, heads and,
inside it, head_convolution, flows, reductions), timed only when a SectionTimer is active
(benchmarks/eval_speed.py's breakdown).

Memory linear in S (`reduced_weights`): each source member's samples are reduced as soon as they
are scored, to log p, its own log q, log q_mix (all S members) and, when asked, the mixture of the
example's active members and of the first S' members; nothing of size S x S x L per example is kept.
Active subsets (S2A / S2S, Hotti et al. 2024): member s is sampled only for the examples whose
subset holds s, so the decoder sees A x L samples per example instead of S x L; every sample is
still scored under all S heads (one stacked convolution), which S2S then restricts to its subset.
Matched baseline: `extra_own_samples` more draws per member scored only by that member's own head.

Flows (num_nf > 0): scoring member j at the source's post-flow z* inverts j's flows by fixed-point
iteration (`AutoEncoder.invert_flows`); NVAE's flows preserve volume (log_det = 0), so
log q_j(z*) = log N_j(f_j^-1(z*)); the source's own density uses its own pre-flow draw exactly.
The largest inversion residual is returned with the member and group where it occurred. Later
groups' heads see the states the decoder computed from the post-flow z, as in the decoder itself.

Memory holds one decoder: `miselbo.ensemble.shared_decoder.share_decoder` makes the members use member 0's
decoder modules, so the others' decoders can be freed (`miselbo.evaluation.members` does this right
after loading each checkpoint).
Compute is float32 without autocast; log-densities are summed per group in float32 and accumulated
over groups in float64. Draws come from the `generator` passed in (deterministic for its seed; the
draws depend on the chunk size, since each pass draws one tensor per group).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from miselbo.storage.checkpoints import architecture_differences
from miselbo.nvae.distributions import Normal, normal_parameters_, reconstruction_loss, summed_log_density
from miselbo.nvae.model import AutoEncoder, EncoderFeatures
from miselbo.ensemble.sections import section
from miselbo.ensemble.shared_decoder import uses_shared_decoder

__all__ = ["Ensemble", "EnsembleLogWeights", "ReducedLogWeights", "default_chunk_size", "DEFAULT_PASS_ROWS",
           "stacked_head", "head_base"]

# Rows (chunk x batch) of one decoder pass when no chunk size is given. On the 2-core CPU used for
# development the per-row cost of the NVAE MNIST decoder rises beyond ~32 rows (cache), while GPUs
# want thousands.
DEFAULT_PASS_ROWS = {"cpu": 32, "cuda": 2048}


def default_chunk_size(batch_size: int, num_samples: int, device: torch.device) -> int:
    """Samples per example in one decoder pass: DEFAULT_PASS_ROWS[device] // batch_size, in [1, L]."""
    rows = DEFAULT_PASS_ROWS.get(torch.device(device).type, DEFAULT_PASS_ROWS["cuda"])
    return max(1, min(num_samples, rows // max(1, batch_size)))


# ----------------------------------------------------------------------------- results

class EnsembleLogWeights(NamedTuple):
    """log_p [B, S, L] and log_q [B, S, L, S] (float64), the largest flow-inversion residual
    (0.0 without flows) and, when recorded, each group's draws as [B, S, L, *latent_shape]:
    latents_pre (the source's own pre-flow draw) and latents_post (what the decoder received).
    flow_residual_at: (member, group) of the largest residual (0-based), None without flows."""
    log_p: torch.Tensor
    log_q: torch.Tensor
    max_flow_residual: float
    latents_pre: list | None
    latents_post: list | None
    flow_residual_at: tuple | None = None


@dataclass
class ReducedLogWeights:
    """What the estimators need, reduced per source member (float64, [B, S, L] unless stated).

    log_p: log p(x, z_sl); log_q_own: log q_s(z_sl); log_q_mix: log (1/S) sum_j q_j(z_sl).
    Rows (b, s) of members outside example b's active subset are NaN.
    active: [B, S] bool, the subset each example sampled from (None: every member).
    log_q_mix_active: log (1/|A_b|) sum_{j in A_b} q_j(z_sl), the S2S mixture (None without subsets).
    log_q_mix_prefix: {S': [B, S', L]}, the mixture of members 0..S'-1 at their own samples.
    log_w_own_extra: [B, S, M], log p - log q_s of M further draws of member s (matched baseline).
    """
    log_p: torch.Tensor
    log_q_own: torch.Tensor
    log_q_mix: torch.Tensor
    active: torch.Tensor | None = None
    log_q_mix_active: torch.Tensor | None = None
    log_q_mix_prefix: dict = field(default_factory=dict)
    log_w_own_extra: torch.Tensor | None = None
    max_flow_residual: float = 0.0
    flow_residual_at: tuple | None = None


@dataclass
class _BatchContext:
    """What one batch of x fixes: the input, every member's bottom-up features and the x-only part
    of each group's posterior parameters (group 0: the complete Normal of all members)."""
    x: torch.Tensor  # [B, C, H, W]
    features: list  # S x EncoderFeatures
    top_raw: torch.Tensor  # group 0's raw posterior parameters [1, B, S, 2L, h, w]
    top_posterior: Normal  # group 0, parameters [1, B, S, L, h, w]
    head_bases: list  # group g >= 1: [1, B, S, 2L, h, w] = Samp_j(F_j + bc_j); index 0 unused
    latents: Sequence[torch.Tensor] | None
    record: tuple | None  # (latents_pre, latents_post) lists being filled, or None

    def select_rows(self, rows: torch.Tensor) -> "_BatchContext":
        """The context of the examples `rows` [b] only (no latents given, nothing recorded)."""
        features = [EncoderFeatures(feat.top[rows], [None if f is None else f[rows] for f in feat.bottom_up])
                    for feat in self.features]
        top_raw = self.top_raw[:, rows]
        bases = [None if base is None else base[:, rows] for base in self.head_bases]
        return _BatchContext(self.x[rows], features, top_raw, Normal(*torch.chunk(top_raw, 2, dim=3)),
                             bases, None, None)


class _Posteriors(NamedTuple):
    """The posterior Normals of one group for the scored members: mu, sigma [n or 1, B, S or C, L, h, w]."""
    mu: torch.Tensor
    sigma: torch.Tensor


class _PassState:
    """Accumulators of one decoder pass of `rows = count * B` rows (float64)."""

    def __init__(self, count: int, batch: int, num_members: int, device):
        self.log_prior = torch.zeros(count * batch, dtype=torch.float64, device=device)  # [N]
        self.log_q = torch.zeros(count, batch, num_members, dtype=torch.float64, device=device)
        self.max_residual = 0.0
        self.residual_at = None  # (member, group) of max_residual

    def note_residual(self, residual: float, member: int, group: int) -> None:
        if self.residual_at is None or residual > self.max_residual:
            self.max_residual, self.residual_at = residual, (member, group)


# ----------------------------------------------------------------------------- the ensemble

def stacked_head(members: Sequence[AutoEncoder], group: int) -> tuple[torch.Tensor, int, int]:
    """(composed weight [S 2L, C_dec, k, k], padding, dilation) of group g >= 1's posterior heads of
    every member: Samp_j(Comb_j(F_j, h)) = Samp_j(F_j + bc_j) + conv(h, W_samp_j . W_comb_j), since
    the combiner is a 1x1 convolution (Ensemble uses it without gradients, the joint training
    objective with them)."""
    composed = []
    for member in members:
        combiner = member.encoder_combiner(group).conv
        sampler = member.enc_sampler[group]
        _require_linear_heads(combiner, sampler, group)
        w_comb = combiner.normalize_weight().double()[:, :, 0, 0]  # [C_enc, C_dec]
        w_samp = sampler.normalize_weight().double()  # [2L, C_enc, k, k]
        composed.append(torch.einsum("ocab,ci->oiab", w_samp, w_comb))  # [2L, C_dec, k, k]
    sampler = members[0].enc_sampler[group]
    return torch.cat(composed).float(), sampler.padding, sampler.dilation


def head_base(member: AutoEncoder, features: EncoderFeatures, group: int) -> torch.Tensor:
    """Samp_j(F_j + bc_j): the x-only part of member j's raw posterior parameters, [B, 2L, h, w]."""
    combiner_bias = member.encoder_combiner(group).conv.bias
    return member.enc_sampler[group](features.bottom_up[group] + combiner_bias.view(1, -1, 1, 1))


class Ensemble:
    """S NVAE members sharing member 0's decoder; see the module docstring.

    members: AutoEncoders of one architecture, all on one device. Only member 0's decoder is used.
    check_decoders: refuse (ValueError) members whose decoder weights differ from member 0's,
    unless they already share its decoder objects; pass False to score every member against
    member 0's decoder on purpose. All members are put in eval mode.
    """

    def __init__(self, members: Sequence[AutoEncoder], check_decoders: bool = True):
        if len(members) < 1:
            raise ValueError("Ensemble: need at least one member (S >= 1), got none")
        self.members = list(members)
        self.decoder = self.members[0]
        self._check_members(check_decoders)
        for member in self.members:
            member.eval()
        self.num_members = len(self.members)
        self.num_groups = self.decoder.num_groups
        self.with_flows = self.decoder.with_nf
        self._head_versions = None
        self._refresh_heads()

    def _head_parameter_versions(self) -> tuple:
        """(identity, in-place version) of every parameter the stacked heads are built from."""
        versions = []
        for member in self.members:
            for group in range(1, self.num_groups):
                for module in (member.encoder_combiner(group).conv, member.enc_sampler[group]):
                    versions += [(id(param), param._version) for param in module.parameters()]
        return tuple(versions)

    def _refresh_heads(self) -> None:
        """(Re)build the stacked head weights if any head parameter was replaced or changed in place."""
        versions = self._head_parameter_versions()
        if versions == self._head_versions:
            return
        with torch.no_grad():
            self._head_weights = [None] + [stacked_head(self.members, g) for g in range(1, self.num_groups)]
        self._head_versions = versions

    def _check_members(self, check_decoders: bool) -> None:
        first = self.decoder
        first_fingerprint = None
        devices = {param.device for member in self.members for param in member.parameters()}
        if len(devices) > 1:
            raise ValueError(f"Ensemble: all members must be on one device, found {sorted(map(str, devices))}")
        for index, member in enumerate(self.members[1:], start=2):
            differences = architecture_differences(first.config, member.config)
            if differences:
                listed = "; ".join(f"--{flag}: {a!r} vs {b!r}" for flag, a, b in differences)
                raise ValueError(f"Ensemble: member {index} has another architecture than member 1: {listed}")
            if not check_decoders or uses_shared_decoder(first, member):
                continue
            first_fingerprint = first_fingerprint or first.decoder_fingerprint()
            if member.decoder_fingerprint() != first_fingerprint:
                raise ValueError(f"Ensemble: member {index}'s decoder differs from member 1's; MISELBO "
                                 f"needs one shared decoder (pass check_decoders=False to use member 1's "
                                 f"decoder for every member anyway)")

    # ------------------------------------------------------------------------- per batch

    def _batch_context(self, x: torch.Tensor, num_samples: int, latents, record_latents: bool) -> _BatchContext:
        with section("encoder", units=self.num_members):
            return self._encode_batch(x, num_samples, latents, record_latents)

    def _encode_batch(self, x: torch.Tensor, num_samples: int, latents, record_latents: bool) -> _BatchContext:
        """The S bottom-up passes and the x-only part of every member's posterior heads."""
        features = [member.encode_bottom_up(x) for member in self.members]
        top = torch.stack([member.enc_sampler[0](feat.top) for member, feat in zip(self.members, features)],
                          dim=1)  # [B, S, 2L, h, w]
        top_raw = top.unsqueeze(0)  # [1, B, S, 2L, h, w]
        top_posterior = Normal(*torch.chunk(top_raw, 2, dim=3))  # [1, B, S, L, h, w]
        bases = [None]
        for group in range(1, self.num_groups):
            bases.append(torch.stack([head_base(member, feat, group)
                                      for member, feat in zip(self.members, features)], dim=1).unsqueeze(0))
        record = None
        if record_latents:
            record = tuple([x.new_zeros(x.shape[0], self.num_members, num_samples, *shape)
                            for shape in self.decoder.latent_shapes] for _ in range(2))
        return _BatchContext(x, features, top_raw, top_posterior, bases, latents, record)

    # ------------------------------------------------------------------------- per group

    def _posterior_all(self, ctx: _BatchContext, group: int, state: torch.Tensor, prior, count: int,
                       columns: list | None = None) -> _Posteriors:
        """The posteriors of group g of every member (or of `columns` only, C of them) on the decoder
        state [N, C_dec, h, w]; parameters [count, B, S or C, L, h, w] ([1, B, ...] for g = 0).

        One stacked convolution for all scored members; its output buffer is then turned into the
        Normal parameters in place (the x-only base, the prior under res_dist, the soft clamp and
        sigma's exp), the same operations as Normal(mu_raw, log_sigma_raw) without the temporaries."""
        if group == 0:
            top = ctx.top_posterior
            if columns is None:
                return _Posteriors(top.mu, top.sigma)
            return _Posteriors(top.mu[:, :, columns], top.sigma[:, :, columns])
        weight, padding, dilation = self._head_weights[group]
        base = ctx.head_bases[group]  # [1, B, S, 2L, h, w]
        if columns is not None:
            weight = weight.view(self.num_members, -1, *weight.shape[1:])[columns].flatten(0, 1)
            base = base[:, :, columns]
        with section("head_convolution"):
            per_sample = F.conv2d(state, weight, None, 1, padding, dilation)  # [N, C 2L, h, w], a fresh buffer
        enc_param = per_sample.view(count, -1, *base.shape[2:]).add_(base)  # [n, B, C, 2L, h, w]
        if self.decoder.res_dist:
            mu_raw, log_sigma_raw = torch.chunk(enc_param, 2, dim=3)  # views, [n, B, C, L, h, w]
            prior_shape = (count, -1, 1, *prior.mu_raw.shape[1:])
            mu_raw.add_(prior.mu_raw.view(prior_shape))
            log_sigma_raw.add_(prior.log_sigma_raw.view(prior_shape))
        return _Posteriors(*normal_parameters_(enc_param, dim=3))

    def _source_draw(self, ctx, posterior: _Posteriors, group: int, source: int, own: int, start: int, count: int,
                     generator) -> torch.Tensor:
        """The source's pre-flow z of this pass, [count, B, L, h, w]: given, or eps * sigma + mu."""
        batch = ctx.x.shape[0]
        if ctx.latents is not None:
            given = ctx.latents[group][:, source, start:start + count]  # [B, n, L, h, w]
            return given.transpose(0, 1).to(ctx.x)
        mu, sigma = posterior.mu[:, :, own], posterior.sigma[:, :, own]  # [n or 1, B, L, h, w]
        eps = torch.randn((count, batch, *mu.shape[2:]), generator=generator, dtype=mu.dtype, device=mu.device)
        return eps * sigma + mu

    def _flow_context(self, ctx, group: int, source: int, state: torch.Tensor, count: int) -> torch.Tensor:
        """The source's flow context (the input of its sampler conv), [N, C, h, w]."""
        member, features = self.members[source], ctx.features[source]
        if group == 0:
            return _repeat_rows(features.top, count)
        return member.encoder_combiner(group)(_repeat_rows(features.bottom_up[group], count), state)

    def _points_per_member(self, group: int, source: int, z_pre: torch.Tensor, z_post: torch.Tensor,
                           pass_state: _PassState, columns: list | None = None) -> torch.Tensor:
        """Where each scored member's base Normal is evaluated: [n, B, S or C or 1, L, h, w]. Without
        flows the post-flow z itself (broadcast); with flows f_j^-1(z*) for j != s and the own draw."""
        if not self.with_flows:
            return z_post.unsqueeze(2)
        with section("flow_inversions", units=z_post.shape[0] * (len(columns or range(self.num_members)) - 1)):
            return self._inverted_points(group, source, z_pre, z_post, pass_state, columns)

    def _inverted_points(self, group: int, source: int, z_pre: torch.Tensor, z_post: torch.Tensor,
                         pass_state: _PassState, columns: list | None) -> torch.Tensor:
        """[n, B, S or C, L, h, w]: f_j^-1(z*) of every scored member j, the own pre-flow draw for s."""
        rows_shape = z_post.shape
        flat_post = z_post.reshape(-1, *rows_shape[2:])
        points = []
        for index in (range(self.num_members) if columns is None else columns):
            if index == source:
                points.append(z_pre)
                continue
            pre_image, residual = self.members[index].invert_flows(group, flat_post)
            pass_state.note_residual(float(residual), index, group)
            points.append(pre_image.view(rows_shape))
        return torch.stack(points, dim=2)

    # ------------------------------------------------------------------------- decoder passes

    def _source_pass(self, ctx: _BatchContext, source: int, start: int, count: int, generator,
                     columns: list | None = None):
        """One decoder pass for samples [start, start + count) of member `source`, scored by every
        member (or by `columns`, which must hold source): returns (log_p [B, count],
        log_q [B, count, S or C], the pass's _PassState for the flow residual)."""
        batch = ctx.x.shape[0]
        pass_state = _PassState(count, batch, self.num_members if columns is None else len(columns), ctx.x.device)
        own = source if columns is None else columns.index(source)

        scored = pass_state.log_q.shape[2]

        def choose_z(group: int, state: torch.Tensor, prior) -> torch.Tensor:
            with section("heads", units=count * scored):
                posterior = self._posterior_all(ctx, group, state, prior, count, columns)
                z_pre = self._source_draw(ctx, posterior, group, source, own, start, count, generator)  # [n, B, L, h, w]
            flat_pre = z_pre.reshape(count * batch, *z_pre.shape[2:])
            if self.with_flows:
                with section("flows", units=count):
                    context = self._flow_context(ctx, group, source, state, count)
                    flat_post, _ = self.members[source].apply_flows(group, flat_pre, context)
            else:
                flat_post = flat_pre
            z_post = flat_post.view(z_pre.shape)
            points = self._points_per_member(group, source, z_pre, z_post, pass_state, columns)
            with section("heads"):
                log_q = summed_log_density(posterior.mu, posterior.sigma, points, (3, 4, 5))  # [n, B, S]
                pass_state.log_q += log_q.double()
            with section("decoder_prior"):
                prior_density = Normal(prior.mu_raw, prior.log_sigma_raw).log_p(flat_post)
                pass_state.log_prior += prior_density.sum(dim=(1, 2, 3)).double()  # [N]
            if ctx.record is not None:
                ctx.record[0][group][:, source, start:start + count] = z_pre.transpose(0, 1)
                ctx.record[1][group][:, source, start:start + count] = z_post.transpose(0, 1)
            return flat_post

        with section("decoder", units=count):
            logits = self.decoder.top_down(count * batch, choose_z)
            output = self.decoder.decoder_output(logits)
            log_likelihood = -reconstruction_loss(output, _repeat_rows(ctx.x, count), self.decoder.crop_output)
            log_p = (log_likelihood.double() + pass_state.log_prior).view(count, batch)
        return log_p.transpose(0, 1), pass_state.log_q.transpose(0, 1), pass_state

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
                    chunk_size: int | None = None, latents: Sequence[torch.Tensor] | None = None,
                    record_latents: bool = False) -> EnsembleLogWeights:
        """log_p [B, S, L], log_q [B, S, L, S] for x [B, C, H, W] and L = num_samples per member.

        generator: draws (on x's device); None uses torch's global generator.
        chunk_size: samples per example in one decoder pass (rows = chunk_size * B); None:
        default_chunk_size. The result does not depend on it beyond the random draws.
        latents: per group, the pre-flow draws [B, S, L, *latent_shape] to use instead of drawing
        (e.g. a recorded run's latents_pre); then no random numbers are drawn.
        record_latents: also return every draw (latents_pre, latents_post), same layout.
        """
        num_samples = _positive_int("num_samples", num_samples)
        batch = x.shape[0]
        chunk = self._chunk(batch, num_samples, chunk_size, x.device)
        self._check_latents(latents, batch, num_samples)
        self._refresh_heads()
        ctx = self._batch_context(x, num_samples, latents, record_latents)
        log_p = torch.empty(batch, self.num_members, num_samples, dtype=torch.float64, device=x.device)
        log_q = torch.empty(batch, self.num_members, num_samples, self.num_members, dtype=torch.float64,
                            device=x.device)
        worst = _PassState(0, 0, 0, x.device)
        for source in range(self.num_members):
            for start in range(0, num_samples, chunk):
                count = min(chunk, num_samples - start)
                part_p, part_q, pass_state = self._source_pass(ctx, source, start, count, generator)
                with section("reductions"):
                    log_p[:, source, start:start + count] = part_p
                    log_q[:, source, start:start + count] = part_q
                    _merge_residual(worst, pass_state)
        recorded = ctx.record if ctx.record is not None else (None, None)
        return EnsembleLogWeights(log_p, log_q, worst.max_residual, *recorded,
                                  flow_residual_at=worst.residual_at if self.with_flows else None)

    @staticmethod
    def _chunk(batch: int, num_samples: int, chunk_size: int | None, device) -> int:
        if chunk_size is None:
            return default_chunk_size(batch, num_samples, device)
        return min(_positive_int("chunk_size", chunk_size), num_samples)

    @torch.no_grad()
    def reduced_weights(self, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
                        chunk_size: int | None = None, active: torch.Tensor | None = None,
                        prefix_sizes: Sequence[int] = (), extra_own_samples: int = 0,
                        sample_only_active: bool = True) -> ReducedLogWeights:
        """ReducedLogWeights of x [B, C, H, W] with L = num_samples per sampled member, in memory
        linear in S (see the module docstring).

        active: [B, S] bool, each example's subset (None: all); log_q_mix_active is its mixture.
        sample_only_active: pass a member through the decoder only with the examples whose subset
        holds it (S2A / S2S alone); False samples every member for every example (with A2A).
        prefix_sizes: the S' whose mixture of members 0..S'-1 is kept (the ablation's sub-ensembles).
        extra_own_samples: M further draws per member, scored by its own head only (all members
        sampled: not with sample_only_active subsets). With active None, the first draws are those of log_weights for
        the same generator and chunk size, and the numbers agree with its tensors to round-off.
        """
        num_samples = _positive_int("num_samples", num_samples)
        batch = x.shape[0]
        active = self._check_active(active, batch, extra_own_samples if sample_only_active else 0)
        self._refresh_heads()
        ctx = self._batch_context(x, num_samples, None, False)
        reduced = _empty_reduction(batch, self.num_members, num_samples, active, prefix_sizes, x.device)
        worst = _PassState(0, 0, 0, x.device)
        for source in range(self.num_members):
            rows = active[:, source].nonzero().flatten() if active is not None and sample_only_active else None
            if rows is not None and rows.numel() == 0:
                continue
            source_ctx = ctx if rows is None else ctx.select_rows(rows)
            chunk = self._chunk(source_ctx.x.shape[0], num_samples, chunk_size, x.device)
            for start in range(0, num_samples, chunk):
                count = min(chunk, num_samples - start)
                part_p, part_q, pass_state = self._source_pass(source_ctx, source, start, count, generator)
                with section("reductions"):
                    _reduce_part(reduced, source, rows, slice(start, start + count), part_p, part_q)
                    _merge_residual(worst, pass_state)
        if extra_own_samples:
            reduced.log_w_own_extra = self._own_log_weights(ctx, extra_own_samples, chunk_size, generator, worst)
        reduced.max_flow_residual = worst.max_residual
        reduced.flow_residual_at = worst.residual_at if self.with_flows else None
        return reduced

    def _own_log_weights(self, ctx: _BatchContext, num_samples: int, chunk_size, generator,
                         worst: _PassState) -> torch.Tensor:
        """log p - log q_s of num_samples further draws of every member s, own head only: [B, S, M]."""
        batch = ctx.x.shape[0]
        out = torch.empty(batch, self.num_members, num_samples, dtype=torch.float64, device=ctx.x.device)
        chunk = self._chunk(batch, num_samples, chunk_size, ctx.x.device)
        for source in range(self.num_members):
            for start in range(0, num_samples, chunk):
                count = min(chunk, num_samples - start)
                part_p, part_q, pass_state = self._source_pass(ctx, source, start, count, generator, [source])
                with section("reductions"):
                    out[:, source, start:start + count] = part_p - part_q[..., 0]  # [B, count]
                    _merge_residual(worst, pass_state)
        return out

    def _check_active(self, active, batch: int, extra_own_samples: int):
        if isinstance(extra_own_samples, bool) or not isinstance(extra_own_samples, int) or extra_own_samples < 0:
            raise ValueError(f"reduced_weights: extra_own_samples must be an int >= 0, got {extra_own_samples!r}")
        if active is None:
            return None
        if tuple(active.shape) != (batch, self.num_members) or active.dtype != torch.bool:
            raise ValueError(f"reduced_weights: active must be a bool tensor of shape [B, S] = "
                             f"{(batch, self.num_members)}, got {active.dtype} {tuple(active.shape)}")
        if not bool(active.any(dim=1).all()):
            raise ValueError("reduced_weights: every example needs at least one active member")
        if extra_own_samples:
            raise ValueError("reduced_weights: extra_own_samples needs every member sampled "
                             "(sample_only_active=False or active None)")
        return active.to(self.decoder.prior_ftr0.device)

    def _check_latents(self, latents, batch: int, num_samples: int) -> None:
        if latents is None:
            return
        if len(latents) != self.num_groups:
            raise ValueError(f"log_weights: latents must hold {self.num_groups} per-group tensors, got {len(latents)}")
        for group, (tensor, shape) in enumerate(zip(latents, self.decoder.latent_shapes)):
            expected = (batch, self.num_members, num_samples, *shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"log_weights: latents[{group}] must have shape {expected} = [B, S, L, "
                                 f"*latent_shape], got {tuple(tensor.shape)}")


# ----------------------------------------------------------------------------- helpers

def _merge_residual(worst: _PassState, pass_state: _PassState) -> None:
    if pass_state.residual_at is not None:
        worst.note_residual(pass_state.max_residual, *pass_state.residual_at)


def _empty_reduction(batch: int, num_members: int, num_samples: int, active, prefix_sizes, device):
    """A ReducedLogWeights of NaN tensors to be filled by _reduce_part."""
    def nan(members=num_members):
        return torch.full((batch, members, num_samples), math.nan, dtype=torch.float64, device=device)
    prefix = {}
    for size in prefix_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= num_members:
            raise ValueError(f"reduced_weights: prefix sizes must be ints in 1..{num_members}, got {size!r}")
        prefix[size] = nan(size)
    return ReducedLogWeights(nan(), nan(), nan(), active, None if active is None else nan(), prefix)


def _reduce_part(reduced: ReducedLogWeights, source: int, rows, samples: slice,
                 part_p: torch.Tensor, part_q: torch.Tensor) -> None:
    """Store what the estimators need of one pass: part_p [b, n], part_q [b, n, S] (b = rows or B)."""
    num_members = part_q.shape[-1]
    where = (slice(None) if rows is None else rows, source, samples)
    reduced.log_p[where] = part_p
    reduced.log_q_own[where] = part_q[..., source]
    reduced.log_q_mix[where] = torch.logsumexp(part_q, dim=-1) - math.log(num_members)  # [b, n]
    if reduced.active is not None:
        active = (reduced.active if rows is None else reduced.active[rows]).unsqueeze(1)  # [b, 1, S]
        masked = part_q.masked_fill(~active, -math.inf)
        size = active.sum(dim=-1).double()  # [b, 1]
        reduced.log_q_mix_active[where] = torch.logsumexp(masked, dim=-1) - torch.log(size)
    for prefix, mixture in reduced.log_q_mix_prefix.items():
        if source < prefix:
            mixture[where] = torch.logsumexp(part_q[..., :prefix], dim=-1) - math.log(prefix)


def _repeat_rows(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """[B, ...] -> [count * B, ...], row l * B + b = tensor[b] (the pass layout: sample-major)."""
    return tensor.unsqueeze(0).expand(count, *tensor.shape).reshape(count * tensor.shape[0], *tensor.shape[1:])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"log_weights: {name} must be an int >= 1, got {value!r}")
    return value


def _require_linear_heads(combiner: nn.Conv2d, sampler: nn.Conv2d, group: int) -> None:
    """The composition needs a plain 1x1 combiner conv and a stride-1, ungrouped sampler conv."""
    plain_1x1 = combiner.kernel_size == (1, 1) and combiner.stride == (1, 1) and combiner.padding == (0, 0) \
        and combiner.groups == 1
    if not plain_1x1 or sampler.stride != (1, 1) or sampler.groups != 1 or combiner.bias is None:
        raise ValueError(f"Ensemble: group {group}'s posterior head is not a 1x1 combiner conv followed by a "
                         f"stride-1 sampler conv, which NVAE always builds")
