"""Latent and output distributions of the NVAE-compatible model (docs/nvae.md 0, 2.7, 5, 6.6).

Every function takes its device and dtype from its inputs: float32 in gives float32 out, float64
works too, CPU and CUDA alike.
"""
import math

import torch
import torch.nn.functional as F

NVAE_BERNOULLI_DATASETS = ("mnist", "omniglot")
NVAE_COLOUR_DATASETS = (
    "stacked_mnist", "cifar10", "celeba_64", "celeba_256", "imagenet_32", "imagenet_64", "ffhq",
    "lsun_bedroom_128", "lsun_bedroom_256", "lsun_church_64", "lsun_church_128",
)
CROP_START, CROP_STOP = 2, 30  # the 28x28 MNIST area inside the 32x32 canvas (docs/nvae.md 2.7)
SIGMA_FLOOR = 1e-2
LOG_SCALE_MIN = -7.0
GUMBEL_UNIFORM_EPS = 1e-5
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def soft_clamp(x: torch.Tensor) -> torch.Tensor:
    """sc(x) = 5 * tanh(x / 5): a smooth clamp of x to (-5, 5)."""
    return torch.tanh(x / 5.0) * 5.0


def soft_clamp_(x: torch.Tensor) -> torch.Tensor:
    """soft_clamp in place: the same operations in the same order, so the same float values."""
    return x.div_(5.0).tanh_().mul_(5.0)


def normal_parameters_(raw: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of Normal(*torch.chunk(raw, 2, dim)), computed in place in `raw` (which is
    overwritten; mu and sigma are its two halves): equal to Normal's attributes bit for bit."""
    soft_clamp_(raw)
    mu, sigma = torch.chunk(raw, 2, dim=dim)
    sigma.exp_().add_(SIGMA_FLOOR)
    return mu, sigma


def summed_log_density(mu: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, dims: tuple) -> torch.Tensor:
    """Normal.log_p(z) summed over `dims`, with two temporaries instead of six (mu, sigma and z
    broadcast together); equal to Normal.log_p(z).sum(dims) bit for bit."""
    density = torch.sub(z, mu)
    density.div_(sigma)
    density.mul_(density).mul_(-0.5)  # -0.5 s s: the power-of-two factor commutes with the rounding
    density.sub_(_HALF_LOG_2PI).sub_(torch.log(sigma))
    return density.sum(dim=dims)


def _check_unit_interval(x: torch.Tensor, where: str) -> None:
    if bool(torch.any(x < 0)) or bool(torch.any(x > 1)):
        raise ValueError(
            f"{where}: x must lie in [0, 1] (got min {x.min().item():.4g}, max {x.max().item():.4g})"
        )


class Normal:
    """Diagonal Normal with NVAE's parameter transform (docs/nvae.md 5.1).

    mu = sc(mu_raw); sigma = (exp(sc(log_sigma_raw)) + 0.01) * temp.
    """

    def __init__(self, mu_raw: torch.Tensor, log_sigma_raw: torch.Tensor, temp: float = 1.0):
        if mu_raw.shape != log_sigma_raw.shape:
            raise ValueError(
                f"Normal: mu_raw {tuple(mu_raw.shape)} and log_sigma_raw "
                f"{tuple(log_sigma_raw.shape)} must have the same shape"
            )
        self.mu = soft_clamp(mu_raw)
        self.sigma = torch.exp(soft_clamp(log_sigma_raw)) + SIGMA_FLOOR
        if temp != 1.0:
            self.sigma = self.sigma * temp

    def sample(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z = eps * sigma + mu with eps ~ N(0, 1); draws like torch.randn_like(mu). Returns (z, eps).

        Under autocast mu may be float16 or bfloat16: eps is then drawn in float32 (and z is
        float32), so a reduced-precision training step draws exactly the numbers, and advances
        the generator exactly as, a float32 step (torch's CPU randn in bfloat16 draws others)."""
        dtype = torch.float32 if self.mu.dtype in (torch.float16, torch.bfloat16) else self.mu.dtype
        eps = torch.randn(self.mu.shape, generator=generator, dtype=dtype, device=self.mu.device)
        return self.sample_given_eps(eps), eps

    def sample_given_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """z = eps * sigma + mu."""
        return eps * self.sigma + self.mu

    def log_p(self, z: torch.Tensor) -> torch.Tensor:
        """Elementwise log N(z; mu, sigma) = -0.5 ((z - mu) / sigma)^2 - 0.5 ln(2 pi) - ln sigma."""
        standardised = (z - self.mu) / self.sigma
        return -0.5 * standardised * standardised - _HALF_LOG_2PI - torch.log(self.sigma)

    def kl(self, other: "Normal") -> torch.Tensor:
        """Elementwise KL(self || other) = 0.5 (t1^2 + t2^2) - 0.5 - ln t2,
        t1 = (mu - mu_o) / sigma_o, t2 = sigma / sigma_o."""
        mean_term = (self.mu - other.mu) / other.sigma
        scale_ratio = self.sigma / other.sigma
        return 0.5 * (mean_term * mean_term + scale_ratio * scale_ratio) - 0.5 - torch.log(scale_ratio)


class NormalDecoder:
    """Continuous Normal likelihood on 2x - 1 for 3-channel images (docs/nvae.md 5.3).

    logits [B, 6, H, W]: channels 0-2 raw means, 3-5 raw log-scales (transformed as in Normal).
    """

    def __init__(self, logits: torch.Tensor):
        if logits.dim() != 4 or logits.shape[1] != 6:
            raise ValueError(f"NormalDecoder: logits must be [B, 6, H, W], got {tuple(logits.shape)}")
        self.dist = Normal(logits[:, :3], logits[:, 3:])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(2x - 1; mu, sigma) elementwise, [B, 3, H, W]; x in [0, 1]."""
        _check_unit_interval(x, "NormalDecoder.log_prob")
        return self.dist.log_p(2.0 * x - 1.0)

    def sample(self, t: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """x = clamp(z, -1, 1) / 2 + 0.5 with z ~ N(mu, sigma); t is ignored, as in NVAE."""
        del t  # NVAE's Normal decoder ignores the temperature (docs/nvae.md 11.1)
        z, _ = self.dist.sample(generator)
        return torch.clamp(z, -1.0, 1.0) / 2.0 + 0.5

    def mean(self) -> torch.Tensor:
        """clamp(mu, -1, 1) / 2 + 0.5 (not in NVAE; the image of the mean, for display)."""
        return torch.clamp(self.dist.mu, -1.0, 1.0) / 2.0 + 0.5


def _couple_colours(values: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """x_R = c(v_R), x_G = c(v_G + a0 x_R), x_B = c(v_B + a1 x_R + a2 x_G), c = clamp to [-1, 1].

    values, coeffs: [B, 3, H, W]; returns [B, 3, H, W] in [-1, 1].
    """
    red = torch.clamp(values[:, 0], -1.0, 1.0)
    green = torch.clamp(values[:, 1] + coeffs[:, 0] * red, -1.0, 1.0)
    blue = torch.clamp(values[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green, -1.0, 1.0)
    return torch.stack([red, green, blue], dim=1)


class DiscMixLogistic:
    """Discretised mixture of logistics over RGB with linear colour coupling (docs/nvae.md 5.4).

    param [B, 10 M, H, W]: channels [0, M) mixture logits; colour c uses channels
    M + 3Mc + [0, M) means, + [M, 2M) log-scales (clamped below at -7), + [2M, 3M) tanh-coefficients.

    Sampling draws its uniform noise on param's device (from `generator` if given). NVAE drew it on
    the CPU and moved it to the GPU, so our draws differ from NVAE's but have the same distribution.
    """

    def __init__(self, param: torch.Tensor, num_mix: int = 10, num_bits: int = 8):
        if param.dim() != 4 or param.shape[1] != 10 * num_mix:
            raise ValueError(
                f"DiscMixLogistic: param must be [B, {10 * num_mix}, H, W] for num_mix={num_mix}, "
                f"got {tuple(param.shape)}"
            )
        batch, _, height, width = param.shape
        self.num_mix = num_mix
        self.num_bits = num_bits
        self.max_value = 2 ** num_bits - 1  # K
        self.logit_probs = param[:, :num_mix]  # [B, M, H, W]
        per_colour = param[:, num_mix:].reshape(batch, 3, 3 * num_mix, height, width)
        self.means = per_colour[:, :, :num_mix]  # [B, 3, M, H, W]
        self.log_scales = torch.clamp(per_colour[:, :, num_mix:2 * num_mix], min=LOG_SCALE_MIN)
        self.coeffs = torch.tanh(per_colour[:, :, 2 * num_mix:])  # [B, 3, M, H, W]

    def _conditional_means(self, y: torch.Tensor) -> torch.Tensor:
        """m_R = mu_R, m_G = mu_G + a0 y_R, m_B = mu_B + a1 y_R + a2 y_G; y [B, 3, 1, H, W]."""
        mean_red = self.means[:, 0]
        mean_green = self.means[:, 1] + self.coeffs[:, 0] * y[:, 0]
        mean_blue = self.means[:, 2] + self.coeffs[:, 1] * y[:, 0] + self.coeffs[:, 2] * y[:, 1]
        return torch.stack([mean_red, mean_green, mean_blue], dim=1)  # [B, 3, M, H, W]

    def _log_prob_per_colour(self, y: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """log P(bin of y) per colour and component: edge bins use the CDF tails, the others
        ln(CDF(y + 1/K) - CDF(y - 1/K)), or the midpoint density minus ln(K/2) when that is < 1e-5."""
        centred = y - means
        inv_scale = torch.exp(-self.log_scales)
        plus_in = inv_scale * (centred + 1.0 / self.max_value)
        minus_in = inv_scale * (centred - 1.0 / self.max_value)
        log_cdf_plus = plus_in - F.softplus(plus_in)
        log_one_minus_cdf_minus = -F.softplus(minus_in)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(minus_in)
        mid_in = inv_scale * centred
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        log_prob_mid = torch.where(
            cdf_delta > 1e-5,
            torch.log(torch.clamp(cdf_delta, min=1e-10)),
            log_pdf_mid - math.log(self.max_value / 2.0),
        )
        return torch.where(
            y < -0.999, log_cdf_plus, torch.where(y > 0.99, log_one_minus_cdf_minus, log_prob_mid)
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = logsumexp_k [log_softmax(pi)_k + sum_c log P_k(x_c | x_<c)], [B, H, W]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DiscMixLogistic.log_prob: x must be [B, 3, H, W], got {tuple(x.shape)}")
        _check_unit_interval(x, "DiscMixLogistic.log_prob")
        y = (2.0 * x - 1.0).unsqueeze(2)  # [B, 3, 1, H, W]
        per_colour = self._log_prob_per_colour(y, self._conditional_means(y))  # [B, 3, M, H, W]
        per_component = per_colour.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)  # [B, M, H, W]
        return torch.logsumexp(per_component, dim=1)  # [B, H, W]

    def _uniform(self, shape, generator: torch.Generator | None) -> torch.Tensor:
        noise = self.logit_probs.new_empty(shape)
        return noise.uniform_(GUMBEL_UNIFORM_EPS, 1.0 - GUMBEL_UNIFORM_EPS, generator=generator)

    def sample(self, t: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel-max component k* = argmax(pi / t + g), then v = mu + exp(s) / t * logit(u),
        coupled and clamped colour by colour; returns x = v / 2 + 0.5, [B, 3, H, W]."""
        batch, num_mix, height, width = self.logit_probs.shape
        gumbel = -torch.log(-torch.log(self._uniform((batch, num_mix, height, width), generator)))
        chosen = torch.argmax(self.logit_probs / t + gumbel, dim=1)  # [B, H, W]
        index = chosen[:, None, None].expand(batch, 3, 1, height, width)

        def pick(per_component: torch.Tensor) -> torch.Tensor:
            return torch.gather(per_component, 2, index).squeeze(2)  # [B, 3, H, W]

        means, log_scales, coeffs = pick(self.means), pick(self.log_scales), pick(self.coeffs)
        uniform = self._uniform((batch, 3, height, width), generator)
        values = means + torch.exp(log_scales) / t * (torch.log(uniform) - torch.log(1.0 - uniform))
        return _couple_colours(values, coeffs) / 2.0 + 0.5

    def mean(self) -> torch.Tensor:
        """Coupled colours of the mixture-weighted means and coefficients, mapped to [0, 1]."""
        weights = torch.softmax(self.logit_probs, dim=1).unsqueeze(1)  # [B, 1, M, H, W]
        mean_values = (self.means * weights).sum(dim=2)  # [B, 3, H, W]
        mean_coeffs = (self.coeffs * weights).sum(dim=2)  # [B, 3, H, W]
        return _couple_colours(mean_values, mean_coeffs) / 2.0 + 0.5


def bernoulli_output(logits: torch.Tensor) -> torch.distributions.Bernoulli:
    """Bernoulli(logits): log p(x) = x l - softplus(l), mean = sigmoid(l) (docs/nvae.md 5.2)."""
    return torch.distributions.Bernoulli(logits=logits)


def output_distribution(logits: torch.Tensor, dataset: str, num_mix_output: int, num_bits: int):
    """NVAE's decoder_output (docs/nvae.md 6.6): Bernoulli for mnist/omniglot; for colour datasets
    the Normal decoder if num_mix_output == 1, else the discretised logistic mixture."""
    if dataset in NVAE_BERNOULLI_DATASETS:
        return bernoulli_output(logits)
    if dataset in NVAE_COLOUR_DATASETS:
        if num_mix_output == 1:
            return NormalDecoder(logits)
        return DiscMixLogistic(logits, num_mix_output, num_bits)
    supported = ", ".join(NVAE_BERNOULLI_DATASETS + NVAE_COLOUR_DATASETS)
    raise ValueError(f"output_distribution: dataset {dataset!r} is not supported (supported: {supported})")


def output_image(dist, t: float = 1.0, mean: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The image NVAE shows: a Bernoulli's mean (probabilities), otherwise one draw sample(t);
    mean=True gives the distribution's mean image instead of a draw."""
    if isinstance(dist, torch.distributions.Bernoulli):
        return dist.mean
    if mean:
        return dist.mean()
    return dist.sample(t, generator=generator)


def reconstruction_loss(dist, x: torch.Tensor, crop: bool) -> torch.Tensor:
    """-log p(x | z) per example, [B]: -sum of dist.log_prob(x) over non-batch axes, over the
    central rows/columns [2:30] only when crop (28x28 data on a 32x32 canvas, docs/nvae.md 2.7)."""
    log_prob = dist.log_prob(x)  # [B, C, H, W] or [B, H, W]
    if crop:
        height, width = log_prob.shape[-2:]
        if height < CROP_STOP or width < CROP_STOP:
            raise ValueError(
                f"reconstruction_loss: crop needs images of at least {CROP_STOP}x{CROP_STOP}, "
                f"got {height}x{width}"
            )
        log_prob = log_prob[..., CROP_START:CROP_STOP, CROP_START:CROP_STOP]
    return -torch.sum(log_prob, dim=tuple(range(1, log_prob.dim())))


def log_importance_weight(dist, x: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor,
                          crop: bool) -> torch.Tensor:
    """log w = log p(x | z) + log p(z) - log q(z | x) = -recon - log_q + log_p, [B]."""
    return -reconstruction_loss(dist, x, crop) - log_q + log_p
