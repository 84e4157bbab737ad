"""NVAE's hierarchical VAE `AutoEncoder` (docs/nvae.md 6, 7), plus the API MISELBO builds on.

Latent groups are numbered in decoder order g = 0..G-1 (g = 0 coarsest). One top-down routine,
`top_down(batch_size, choose_z)`, serves `forward` and `sample`: at every group it hands the
callback the decoder state and the prior's raw parameters and feeds the z it returns to the
decoder combiner. The posterior side is split into `encode_bottom_up` (once per x), `posterior_raw`
(per group, on any decoder state) and `apply_flows` / `invert_flows`, so an evaluator can score
several encoders on one decoder pass.

State_dict keys, module order and the order of random draws follow NVAE (docs/nvae.md 6.2, 6.11, 7.1).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from miselbo.nvae.config import CHANNEL_MULT, ModelConfig
from miselbo.nvae.distributions import Normal, output_distribution
from miselbo.nvae.flows import ARConv2d, PairedCellAR, invert_flow_chain
from miselbo.nvae.layers import Cell, Conv2D, DecCombinerCell, EncCombinerCell

# The two halves (docs/nvae.md 6.10): top-level modules of the encoder q_phi and the decoder p_theta.
ENCODER_MODULE_NAMES = ("stem", "pre_process", "enc_tower", "enc0", "enc_sampler", "nf_cells")
DECODER_MODULE_NAMES = ("prior_ftr0", "dec_tower", "dec_sampler", "post_process", "image_conditional",
                        "stem_decoder")
CONV_LAYER_TYPES = (Conv2D, ARConv2d)
BN_LAYER_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
NUM_POWER_ITER = 4
POWER_ITER_RESTART_FACTOR = 10
POWER_ITER_NORM_EPS = 1e-3
_ALIAS_SUFFIX = ".weight_normalized"


def is_decoder_key(state_dict_key: str) -> bool:
    """True for a state_dict key of the decoder p_theta, False for the encoder q_phi (docs/nvae.md 6.10)."""
    top = state_dict_key.split(".", 1)[0]
    if top in DECODER_MODULE_NAMES:
        return True
    if top in ENCODER_MODULE_NAMES:
        return False
    raise ValueError(f"is_decoder_key: {state_dict_key!r} belongs to neither half (top-level module "
                     f"{top!r} is in neither ENCODER_MODULE_NAMES nor DECODER_MODULE_NAMES)")


class PriorRaw(NamedTuple):
    """Raw prior parameters of one group, each [B, L, h, w] (zeros for g = 0)."""
    mu_raw: torch.Tensor
    log_sigma_raw: torch.Tensor


class PosteriorRaw(NamedTuple):
    """Raw posterior parameters of one group and what produced them."""
    mu_raw: torch.Tensor  # [B, L, h, w]
    log_sigma_raw: torch.Tensor  # [B, L, h, w]
    enc_param: torch.Tensor  # [B, 2L, h, w], the encoder sampler's output
    flow_context: torch.Tensor  # [B, C, h, w], the sampler's input (handed to the flows)


@dataclass
class EncoderFeatures:
    """One encoder's bottom-up pass: `top` = enc0 output (input of group 0's posterior) and
    `bottom_up[g]` = the stored tower feature paired with group g >= 1 (`bottom_up[0]` is None)."""
    top: torch.Tensor
    bottom_up: list


@dataclass
class GroupRecord:
    """Everything forward computed for one latent group (elementwise tensors are [B, L, h, w])."""
    q: Normal  # base posterior (before flows)
    p: Normal
    q_mu_raw: torch.Tensor
    q_log_sigma_raw: torch.Tensor
    q_enc_param: torch.Tensor  # [B, 2L, h, w]
    p_mu_raw: torch.Tensor
    p_log_sigma_raw: torch.Tensor
    z_pre: torch.Tensor
    z_post: torch.Tensor
    log_q: torch.Tensor  # log q(z_post) elementwise = log N(z_pre) - log_det
    log_p: torch.Tensor  # log p(z_post) elementwise
    flow_context: torch.Tensor


@dataclass
class ForwardResult:
    """forward_detailed's output; `as_nvae_tuple()` gives NVAE's (logits, log_q, log_p, kl_all, kl_diag)."""
    logits: torch.Tensor
    log_q: torch.Tensor  # [B]
    log_p: torch.Tensor  # [B]
    kl_all: list  # G x [B]
    kl_diag: list  # G x [L]
    groups: list  # G x GroupRecord

    def as_nvae_tuple(self):
        return self.logits, self.log_q, self.log_p, self.kl_all, self.kl_diag


ChooseZ = Callable[[int, torch.Tensor, PriorRaw], torch.Tensor]


class AutoEncoder(nn.Module):
    """NVAE's AutoEncoder(args, writer, arch_instance); the model reads only ModelConfig.from_args(args)."""

    def __init__(self, args, writer, arch_instance: dict):
        super().__init__()
        self.decoder_frozen = False
        config = ModelConfig.from_args(args)
        self.config = config
        self.writer = writer
        self.arch_instance = arch_instance
        self._copy_nvae_attributes(config)
        mult = 1
        latent_size = config.latent_size
        self.prior_ftr0 = nn.Parameter(torch.rand(
            size=(int(config.spatial_scaling * self.num_channels_dec), latent_size, latent_size)))
        self.z0_size = [self.num_latent_per_group, latent_size, latent_size]
        self.stem = Conv2D(config.input_channels, self.num_channels_enc, 3, padding=1, bias=True)
        self.pre_process, mult = self._build_pre_process(mult)
        self.enc_tower, mult = self._build_enc_tower(mult)
        num_c = int(self.num_channels_enc * mult)
        self.enc0 = nn.Sequential(nn.ELU(), Conv2D(num_c, num_c, kernel_size=1, bias=True), nn.ELU())
        self.enc_sampler, self.dec_sampler, self.nf_cells = self._build_samplers(mult)
        self.enc_kv, self.dec_kv, self.query = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        if self.vanilla_vae:
            self.dec_tower = []
            self.stem_decoder = Conv2D(self.num_latent_per_group, int(mult * self.num_channels_enc),
                                       kernel_size=1, bias=True)
        else:
            self.dec_tower, mult = self._build_dec_tower(mult)
        self.post_process, mult = self._build_post_process(mult)
        self.image_conditional = nn.Sequential(
            nn.ELU(), Conv2D(int(self.num_channels_dec * mult), config.output_channels, 3, padding=1,
                             bias=True))
        self.collect_layers()
        self.sr_u, self.sr_v = {}, {}
        self.num_power_iter = NUM_POWER_ITER
        self.enc_combiner_index = self._encoder_combiner_positions()
        self.latent_shapes = self._latent_shapes()

    # ------------------------------------------------------------------------- construction

    def _copy_nvae_attributes(self, config: ModelConfig) -> None:
        """The plain attributes NVAE's model carries (docs/nvae.md 6.1)."""
        self.dataset = config.dataset
        self.crop_output = config.crop_output
        self.use_se = config.use_se
        self.res_dist = config.res_dist
        self.num_bits = config.num_x_bits
        self.num_mix_output = config.num_mixture_dec
        self.num_latent_scales = config.num_latent_scales
        self.num_groups_per_scale = config.num_groups_per_scale
        self.num_latent_per_group = config.num_latent_per_group
        self.groups_per_scale = list(config.groups_per_scale)
        self.vanilla_vae = config.vanilla_vae
        self.num_channels_enc = config.num_channels_enc
        self.num_channels_dec = config.num_channels_dec
        self.num_preprocess_blocks = config.num_preprocess_blocks
        self.num_preprocess_cells = config.num_preprocess_cells
        self.num_cell_per_cond_enc = config.num_cell_per_cond_enc
        self.num_postprocess_blocks = config.num_postprocess_blocks
        self.num_postprocess_cells = config.num_postprocess_cells
        self.num_cell_per_cond_dec = config.num_cell_per_cond_dec
        self.with_nf = config.num_nf > 0
        self.num_flows = config.num_nf

    def _cell(self, C_in: int, C_out: int, cell_type: str) -> Cell:
        return Cell(C_in, C_out, cell_type, self.arch_instance[cell_type], self.use_se)

    def _decoder_scale_groups(self) -> list[int]:
        """Groups of each scale in decoder order (coarsest first)."""
        return list(reversed(self.groups_per_scale))

    def _build_pre_process(self, mult):
        """Blocks of normal_pre cells, each ending in a down_pre cell that doubles the width."""
        cells = nn.ModuleList()
        for _ in range(self.num_preprocess_blocks):
            for index in range(self.num_preprocess_cells):
                num_c = int(self.num_channels_enc * mult)
                if index == self.num_preprocess_cells - 1:
                    cells.append(self._cell(num_c, int(CHANNEL_MULT * num_c), "down_pre"))
                    mult = CHANNEL_MULT * mult
                else:
                    cells.append(self._cell(num_c, num_c, "normal_pre"))
        return cells, mult

    def _build_enc_tower(self, mult):
        """Per scale (finest first) and group: normal_enc cells, then an encoder combiner (not after
        the very last group); a down_enc cell between scales. Empty list for the vanilla VAE."""
        if self.vanilla_vae:
            return [], mult
        tower = nn.ModuleList()
        for scale, num_groups in enumerate(self.groups_per_scale):
            for group in range(num_groups):
                num_ce, num_cd = int(self.num_channels_enc * mult), int(self.num_channels_dec * mult)
                for _ in range(self.num_cell_per_cond_enc):
                    tower.append(self._cell(num_ce, num_ce, "normal_enc"))
                if not (scale == self.num_latent_scales - 1 and group == num_groups - 1):
                    tower.append(EncCombinerCell(num_ce, num_cd, num_ce, cell_type="combiner_enc"))
            if scale < self.num_latent_scales - 1:
                num_ci = int(self.num_channels_enc * mult)
                tower.append(self._cell(num_ci, int(CHANNEL_MULT * num_ci), "down_enc"))
                mult = CHANNEL_MULT * mult
        return tower, mult

    def _build_samplers(self, mult):
        """Per group in decoder order: an encoder sampler, num_nf flow cells, and (g >= 1) a
        decoder sampler; created interleaved, in NVAE's order of random draws."""
        latent = self.num_latent_per_group
        enc_sampler, dec_sampler, nf_cells = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for scale, num_groups in enumerate(self._decoder_scale_groups()):
            for group in range(num_groups):
                num_ce = int(self.num_channels_enc * mult)
                enc_sampler.append(Conv2D(num_ce, 2 * latent, kernel_size=3, padding=1, bias=True))
                for _ in range(self.num_flows):
                    nf_cells.append(PairedCellAR(latent, num_ce, 8 * latent))
                if not (scale == 0 and group == 0):
                    num_cd = int(self.num_channels_dec * mult)
                    dec_sampler.append(nn.Sequential(
                        nn.ELU(), Conv2D(num_cd, 2 * latent, kernel_size=1, padding=0, bias=True)))
            mult = mult / CHANNEL_MULT
        return enc_sampler, dec_sampler, nf_cells

    def _build_dec_tower(self, mult):
        """Per decoder scale and group: normal_dec cells (not before group 0), then a decoder
        combiner; an up_dec cell between scales."""
        tower = nn.ModuleList()
        num_scales = self.num_latent_scales
        for scale, num_groups in enumerate(self._decoder_scale_groups()):
            num_c = int(self.num_channels_dec * mult)
            for group in range(num_groups):
                if not (scale == 0 and group == 0):
                    for _ in range(self.num_cell_per_cond_dec):
                        tower.append(self._cell(num_c, num_c, "normal_dec"))
                tower.append(DecCombinerCell(num_c, self.num_latent_per_group, num_c,
                                             cell_type="combiner_dec"))
            if scale < num_scales - 1:
                tower.append(self._cell(num_c, int(num_c / CHANNEL_MULT), "up_dec"))
                mult = mult / CHANNEL_MULT
        return tower, mult

    def _build_post_process(self, mult):
        """Blocks starting with an up_post cell that halves the width, then normal_post cells."""
        cells = nn.ModuleList()
        for _ in range(self.num_postprocess_blocks):
            for index in range(self.num_postprocess_cells):
                num_c = int(self.num_channels_dec * mult)
                if index == 0:
                    cells.append(self._cell(num_c, int(num_c / CHANNEL_MULT), "up_post"))
                    mult = mult / CHANNEL_MULT
                else:
                    cells.append(self._cell(num_c, num_c, "normal_post"))
        return cells, mult

    def collect_layers(self) -> None:
        """all_conv_layers, all_log_norm (None without weight norm) and all_bn_layers in walk order
        (docs/nvae.md 6.7)."""
        self.all_log_norm, self.all_conv_layers, self.all_bn_layers = [], [], []
        for module in self.modules():
            if isinstance(module, CONV_LAYER_TYPES):
                self.all_conv_layers.append(module)
                self.all_log_norm.append(module.log_weight_norm)
            elif isinstance(module, BN_LAYER_TYPES):
                self.all_bn_layers.append(module)

    def _encoder_combiner_positions(self) -> list:
        """enc_combiner_index[g] = position in enc_tower of group g's combiner (None for g = 0):
        group g >= 1 pairs with the (g-1)-th combiner counted from the top (docs/nvae.md 6.4, notes)."""
        positions = [i for i, cell in enumerate(self.enc_tower) if isinstance(cell, EncCombinerCell)]
        return [None] + list(reversed(positions))

    def _latent_shapes(self) -> list:
        """(L, h, w) of every group in decoder order."""
        shapes, size = [], self.z0_size[1]
        for num_groups in self._decoder_scale_groups():
            shapes += [(self.num_latent_per_group, size, size)] * num_groups
            size *= 2
        return shapes

    @property
    def num_groups(self) -> int:
        return len(self.latent_shapes)

    # ------------------------------------------------------------------------- encoder side

    def encode_bottom_up(self, x: torch.Tensor) -> EncoderFeatures:
        """stem(2x - 1) -> pre_process -> enc_tower (storing the feature at every combiner) -> enc0."""
        state = self.stem(2 * x - 1.0)
        for cell in self.pre_process:
            state = cell(state)
        stored = []
        for cell in self.enc_tower:
            if isinstance(cell, EncCombinerCell):
                stored.append(state)
            else:
                state = cell(state)
        stored.reverse()  # stored[g - 1] pairs with group g
        return EncoderFeatures(top=self.enc0(state), bottom_up=[None] + stored)

    def encoder_combiner(self, group: int) -> EncCombinerCell:
        """The encoder combiner cell of group g >= 1."""
        if not 1 <= group < self.num_groups:
            raise ValueError(f"encoder_combiner: group must be in 1..{self.num_groups - 1}, got {group}")
        return self.enc_tower[self.enc_combiner_index[group]]

    def posterior_raw(self, group: int, features: EncoderFeatures, state: torch.Tensor,
                      prior_raw: PriorRaw | None) -> PosteriorRaw:
        """Raw posterior of group g (docs/nvae.md 6.4, steps 4 and 6.i.2-4): h = enc0 output (g = 0) or
        combiner_g(feature_g, state); (mu_q, ls_q) = sampler_g(h); with res_dist and g >= 1 the
        prior's raw values are added: (mu_p + mu_q, ls_p + ls_q)."""
        if group == 0:
            context = features.top
        else:
            context = self.encoder_combiner(group)(features.bottom_up[group], state)
        enc_param = self.enc_sampler[group](context)  # [B, 2L, h, w]
        mu_raw, log_sigma_raw = torch.chunk(enc_param, 2, dim=1)
        if self.res_dist and group > 0:
            if prior_raw is None:
                raise ValueError(f"posterior_raw: group {group} needs prior_raw (res_dist is on)")
            mu_raw = prior_raw.mu_raw + mu_raw
            log_sigma_raw = prior_raw.log_sigma_raw + log_sigma_raw
        return PosteriorRaw(mu_raw, log_sigma_raw, enc_param, context)

    def flow_cells(self, group: int) -> list:
        """The num_nf paired flow cells of group g, in application order."""
        return list(self.nf_cells[group * self.num_flows:(group + 1) * self.num_flows])

    def apply_flows(self, group: int, z_pre: torch.Tensor, context: torch.Tensor):
        """z_post = f_n(... f_1(z_pre)) with group g's flow cells; returns (z_post, summed log_det)."""
        z, log_det = z_pre, torch.zeros_like(z_pre)
        for cell in self.flow_cells(group):
            z, cell_log_det = cell(z, context)
            log_det = log_det + cell_log_det
        return z, log_det

    def invert_flows(self, group: int, z_post: torch.Tensor, tol: float | None = None,
                     max_iter: int | None = None):
        """z_pre with apply_flows(g, z_pre) = z_post, by fixed-point iteration (flows.invert_flow_chain);
        returns (z_pre, max abs residual of the forward map)."""
        cells = self.flow_cells(group)
        if not cells:
            return z_post, 0.0
        return invert_flow_chain(cells, z_post, tol, max_iter)

    # ------------------------------------------------------------------------- decoder side

    def prior_raw(self, group: int, state: torch.Tensor) -> PriorRaw:
        """Raw prior of group g: zeros of z0 shape for g = 0 (sigma 1.01), else the halves of
        dec_sampler[g - 1](state)."""
        if group == 0:
            zeros = state.new_zeros((state.shape[0], *self.z0_size))
            return PriorRaw(zeros, zeros)
        mu_raw, log_sigma_raw = torch.chunk(self.dec_sampler[group - 1](state), 2, dim=1)
        return PriorRaw(mu_raw, log_sigma_raw)

    def top_down(self, batch_size: int, choose_z: ChooseZ) -> torch.Tensor:
        """The decoder pass: s = prior_ftr0; at group g, z = choose_z(g, s, prior_raw(g, s)) (the
        post-flow z) and s = combiner(s, z); other cells s = cell(s); then post-processing and the
        output head. Returns logits [B, C_out, H, W]."""
        state = self.prior_ftr0.unsqueeze(0).expand(batch_size, -1, -1, -1)
        group = 0
        for cell in self.dec_tower:
            if isinstance(cell, DecCombinerCell):
                z = choose_z(group, state, self.prior_raw(group, state))
                state = cell(state, z)
                group += 1
            else:
                state = cell(state)
        if self.vanilla_vae:
            state = self.stem_decoder(choose_z(0, state, self.prior_raw(0, state)))
        for cell in self.post_process:
            state = cell(state)
        return self.image_conditional(state)

    # ------------------------------------------------------------------------- forward, sample

    def _check_latents(self, z: Sequence[torch.Tensor] | None, batch_size: int, where: str) -> None:
        if z is None:
            return
        if len(z) != self.num_groups:
            raise ValueError(f"{where}: z must hold {self.num_groups} per-group tensors, got {len(z)}")
        for group, (latent, shape) in enumerate(zip(z, self.latent_shapes)):
            if tuple(latent.shape) != (batch_size, *shape):
                raise ValueError(f"{where}: z[{group}] must have shape {(batch_size, *shape)}, "
                                 f"got {tuple(latent.shape)}")

    def posterior_group(self, group, features, state, prior, z_given) -> GroupRecord:
        """Posterior draw (or the given pre-flow z), flows, and both densities for one group."""
        posterior = self.posterior_raw(group, features, state, prior)
        q = Normal(posterior.mu_raw, posterior.log_sigma_raw)
        z_pre = q.sample()[0] if z_given is None else z_given
        log_q = q.log_p(z_pre)
        z_post, log_det = self.apply_flows(group, z_pre, posterior.flow_context)
        if self.with_nf:
            log_q = log_q - log_det
        p = Normal(prior.mu_raw, prior.log_sigma_raw)
        return GroupRecord(q=q, p=p, q_mu_raw=posterior.mu_raw, q_log_sigma_raw=posterior.log_sigma_raw,
                           q_enc_param=posterior.enc_param, p_mu_raw=prior.mu_raw,
                           p_log_sigma_raw=prior.log_sigma_raw, z_pre=z_pre, z_post=z_post,
                           log_q=log_q, log_p=p.log_p(z_post), flow_context=posterior.flow_context)

    def forward_detailed(self, x: torch.Tensor, z: Sequence[torch.Tensor] | None = None) -> ForwardResult:
        """NVAE's forward with every per-group quantity; z = per-group pre-flow latents to use
        instead of posterior draws (then no random numbers are consumed)."""
        self._check_latents(z, x.shape[0], "forward")
        features = self.encode_bottom_up(x)
        records = []

        def choose_posterior_z(group, state, prior):
            record = self.posterior_group(group, features, state, prior, None if z is None else z[group])
            records.append(record)
            return record.z_post

        logits = self.top_down(x.shape[0], choose_posterior_z)
        return self._summarise(logits, records)

    def _summarise(self, logits: torch.Tensor, records: list) -> ForwardResult:
        """kl_g = log q - log p (flows) or KL(q_g || p_g); kl_all[g] = sum_chw kl_g [B];
        kl_diag[g] = mean_b sum_hw kl_g [L]; log_q = sum_g sum_chw log q_g [B], likewise log_p."""
        kl_all, kl_diag = [], []
        log_q, log_p = 0.0, 0.0
        for record in records:
            kl = record.log_q - record.log_p if self.with_nf else record.q.kl(record.p)
            kl_diag.append(torch.mean(torch.sum(kl, dim=(2, 3)), dim=0))
            kl_all.append(torch.sum(kl, dim=(1, 2, 3)))
            log_q = log_q + torch.sum(record.log_q, dim=(1, 2, 3))
            log_p = log_p + torch.sum(record.log_p, dim=(1, 2, 3))
        return ForwardResult(logits, log_q, log_p, kl_all, kl_diag, records)

    def forward(self, x: torch.Tensor, z: Sequence[torch.Tensor] | None = None):
        """(logits, log_q [B], log_p [B], kl_all G x [B], kl_diag G x [L]) as in NVAE (docs/nvae.md 6.4)."""
        return self.forward_detailed(x, z).as_nvae_tuple()

    def sample(self, num_samples: int, t: float, z: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of prior samples at temperature t (every group's sigma times t, docs/nvae.md 6.5); z = the
        per-group latents to feed the decoder instead of drawing them."""
        self._check_latents(z, num_samples, "sample")

        def choose_prior_z(group, state, prior):
            if z is not None:
                return z[group]
            return Normal(prior.mu_raw, prior.log_sigma_raw, temp=t).sample()[0]

        return self.top_down(num_samples, choose_prior_z)

    def decoder_output(self, logits: torch.Tensor):
        """The output distribution of `logits` (docs/nvae.md 6.6)."""
        return output_distribution(logits, self.dataset, self.num_mix_output, self.num_bits)

    # ------------------------------------------------------------------------- regularisers

    def spectral_norm_parallel(self, conv_layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """R_sn = sum_j sigma_j, sigma_j = u_j^T W_j v_j with u, v from batched power iteration on
        each conv's weight_normalized (as a C_out x rest matrix), grouped by shape (docs/nvae.md 6.8).

        Vectors persist in sr_u / sr_v per shape; a new shape (or a changed layer count for a
        shape, when called with another subset) restarts with 10 * num_power_iter iterations.
        """
        matrices = {}
        for layer in self.all_conv_layers if conv_layers is None else conv_layers:
            matrix = layer.weight_normalized.reshape(layer.weight_normalized.shape[0], -1)  # [r, c]
            matrices.setdefault(tuple(matrix.shape), []).append(matrix)
        loss = self.prior_ftr0.new_zeros(())
        for shape, mats in matrices.items():
            stacked = torch.stack(mats)  # [n, r, c]
            u, v = self._power_iteration(shape, stacked)
            sigma = torch.matmul(u.unsqueeze(1), torch.matmul(stacked, v.unsqueeze(2)))  # [n, 1, 1]
            loss = loss + torch.sum(sigma)
        return loss

    def _power_iteration(self, shape: tuple, stacked: torch.Tensor):
        """Update and return the stored (u [n, r], v [n, c]): v <- norm(u^T W), u <- norm(W v)."""
        with torch.no_grad():
            count, rows, cols = stacked.shape
            num_iter = self.num_power_iter
            stored = self.sr_u.get(shape)
            if stored is None or stored.shape[0] != count:
                u = F.normalize(torch.randn(count, rows), dim=1, eps=POWER_ITER_NORM_EPS)
                v = F.normalize(torch.randn(count, cols), dim=1, eps=POWER_ITER_NORM_EPS)
                self.sr_u[shape], self.sr_v[shape] = u.to(stacked), v.to(stacked)
                num_iter = POWER_ITER_RESTART_FACTOR * self.num_power_iter
            u, v = self.sr_u[shape].to(stacked), self.sr_v[shape].to(stacked)
            for _ in range(num_iter):
                v = F.normalize(torch.matmul(u.unsqueeze(1), stacked).squeeze(1), dim=1,
                                eps=POWER_ITER_NORM_EPS)  # [n, c]
                u = F.normalize(torch.matmul(stacked, v.unsqueeze(2)).squeeze(2), dim=1,
                                eps=POWER_ITER_NORM_EPS)  # [n, r]
            self.sr_u[shape], self.sr_v[shape] = u, v
        return u, v

    def batchnorm_loss(self, bn_layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """R_bn = sum over affine BN layers of max_c |gamma_c| (docs/nvae.md 6.9); 0 without any.

        Layers of one width are reduced together (a handful of operations instead of three per
        layer); amax shares the gradient among tied maxima exactly as a per-layer max does."""
        widths = {}
        for layer in self.all_bn_layers if bn_layers is None else bn_layers:
            if layer.affine:
                widths.setdefault((layer.weight.shape, layer.weight.dtype), []).append(layer.weight)
        loss = self.prior_ftr0.new_zeros(())
        for gammas in widths.values():
            stacked = torch.stack(gammas)  # [n, C]
            loss = loss + torch.sum(torch.amax(torch.abs(stacked), dim=1))
        return loss

    # ------------------------------------------------------------------------- the two halves

    def _half_modules(self, names: Sequence[str]) -> list:
        return [module for name in names if isinstance(module := getattr(self, name, None), nn.Module)]

    def _half_parameters(self, names: Sequence[str]) -> list:
        return [param for key, param in self.named_parameters() if key.split(".", 1)[0] in names]

    def encoder_parameters(self) -> list:
        """Parameters of the encoder q_phi (each once)."""
        return self._half_parameters(ENCODER_MODULE_NAMES)

    def decoder_parameters(self) -> list:
        """Parameters of the decoder p_theta (each once; prior_ftr0 included)."""
        return self._half_parameters(DECODER_MODULE_NAMES)

    def _half_layers(self, names: Sequence[str], types: tuple) -> list:
        return [module for key, module in self.named_modules()
                if isinstance(module, types) and key.split(".", 1)[0] in names]

    def encoder_conv_layers(self) -> list:
        """The encoder's conv layers, in all_conv_layers order."""
        return self._half_layers(ENCODER_MODULE_NAMES, CONV_LAYER_TYPES)

    def encoder_bn_layers(self) -> list:
        """The encoder's BN layers, in all_bn_layers order."""
        return self._half_layers(ENCODER_MODULE_NAMES, BN_LAYER_TYPES)

    def decoder_state_items(self) -> list:
        """(key, tensor) of every decoder parameter and buffer in the state_dict, sorted by key.

        The rule-W aliases `<p>.weight_normalized` that hold the very tensor of `<p>.weight` are
        left out, so the list has each tensor once whether or not a checkpoint carried the alias.
        """
        state = self.state_dict(keep_vars=True)
        items = []
        for key, value in state.items():
            if not is_decoder_key(key):
                continue
            if key.endswith(_ALIAS_SUFFIX) and state.get(key[:-len(_ALIAS_SUFFIX)] + ".weight") is value:
                continue
            items.append((key, value.detach()))
        return sorted(items, key=lambda item: item[0])

    def decoder_fingerprint(self) -> str:
        """SHA-256 hex over name, dtype, shape and raw bytes of each decoder_state_items() entry."""
        digest = hashlib.sha256()
        for key, tensor in self.decoder_state_items():
            data = tensor.to("cpu").contiguous()
            digest.update(f"{key}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def freeze_decoder(self) -> "AutoEncoder":
        """Fix the decoder: its parameters stop requiring gradients, its conv layers never data-init,
        and from now on train() keeps every decoder module (batch norm!) in eval mode. Idempotent."""
        for param in self.decoder_parameters():
            param.requires_grad_(False)
        for module in self._half_modules(DECODER_MODULE_NAMES):
            for layer in module.modules():
                if isinstance(layer, Conv2D):
                    layer.init_done = True
        self.decoder_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> "AutoEncoder":
        super().train(mode)
        if self.decoder_frozen:
            for module in self._half_modules(DECODER_MODULE_NAMES):
                module.eval()
        return self
