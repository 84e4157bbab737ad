"""Distributions against golden vectors, torch.distributions, closed forms and brute-force sums."""
import itertools
import math

import pytest
import torch

from conftest import golden_case_dir
from miselbo.nvae.distributions import (
    DiscMixLogistic,
    Normal,
    NormalDecoder,
    bernoulli_output,
    log_importance_weight,
    output_distribution,
    output_image,
    reconstruction_loss,
    soft_clamp,
)

GOLDEN_CASES = [("mnist_small", "mnist", True), ("cifar_flows", "cifar10", False)]


def load_golden(name):
    return torch.load(golden_case_dir(name) / "golden.pt", weights_only=True)


# ---------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("name, dataset, crop", GOLDEN_CASES)
def test_stress_log_prob_and_recon_loss_match_golden(name, dataset, crop, test_device):
    golden = load_golden(name)
    logits = golden["stress/logits"].to(test_device)
    x = golden["stress/x"].to(test_device)
    dist = output_distribution(logits, dataset, num_mix_output=10, num_bits=8)
    log_prob = dist.log_prob(x).cpu()
    recon = reconstruction_loss(dist, x, crop).cpu()
    assert log_prob.dtype == torch.float32 and recon.shape == (4,)
    torch.testing.assert_close(log_prob, golden["stress/log_prob"], rtol=1e-4, atol=5e-2)
    torch.testing.assert_close(recon, golden["stress/recon_loss"], rtol=1e-4, atol=5e-2)


@pytest.mark.parametrize("name, dataset, crop", GOLDEN_CASES)
def test_eval_recon_loss_and_log_iw_match_golden(name, dataset, crop):
    golden = load_golden(name)
    dist = output_distribution(golden["eval/logits"], dataset, num_mix_output=10, num_bits=8)
    recon = reconstruction_loss(dist, golden["x"], crop)
    torch.testing.assert_close(recon, golden["eval/recon_loss"], rtol=1e-5, atol=1e-3)
    log_iw = log_importance_weight(dist, golden["x"], golden["eval/log_q"], golden["eval/log_p"], crop)
    expected = -golden["eval/recon_loss"] - golden["eval/log_q"] + golden["eval/log_p"]
    torch.testing.assert_close(log_iw, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["mnist_small", "cifar_flows"])
def test_normal_transform_matches_golden_posterior_and_tempered_prior(name):
    golden = load_golden(name)
    for group in range(golden["num_groups"]):
        posterior = Normal(golden["eval/q_mu_raw"][group], golden["eval/q_log_sigma_raw"][group])
        torch.testing.assert_close(posterior.mu, golden["eval/q_mu"][group], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(posterior.sigma, golden["eval/q_sigma"][group], rtol=1e-4, atol=1e-5)
        prior = Normal(golden["sample/p_mu_raw"][group], golden["sample/p_log_sigma_raw"][group],
                       temp=golden["sample/t"])
        torch.testing.assert_close(prior.sigma, golden["sample/p_sigma"][group], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- Normal

def test_soft_clamp_formula_and_range():
    x = torch.linspace(-100, 100, 1001)
    torch.testing.assert_close(soft_clamp(x), 5 * torch.tanh(x / 5))
    assert soft_clamp(x).abs().max() <= 5.0
    torch.testing.assert_close(soft_clamp(torch.tensor([1e-3])), torch.tensor([1e-3]), rtol=1e-6, atol=0)


def random_normal_params(dtype=torch.float32, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu_raw = scale * torch.randn(2, 3, 4, 5, generator=generator, dtype=dtype)
    log_sigma_raw = scale * torch.randn(2, 3, 4, 5, generator=generator, dtype=dtype)
    return mu_raw, log_sigma_raw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_parameters_log_p_and_kl_against_torch(dtype):
    mu_raw, log_sigma_raw = random_normal_params(dtype)
    dist = Normal(mu_raw, log_sigma_raw)
    assert dist.mu.dtype == dtype and dist.sigma.dtype == dtype
    reference = torch.distributions.Normal(
        5 * torch.tanh(mu_raw / 5), torch.exp(5 * torch.tanh(log_sigma_raw / 5)) + 0.01
    )
    z = 4 * torch.randn(mu_raw.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dist.log_p(z), reference.log_prob(z))
    other_mu_raw, other_log_sigma_raw = random_normal_params(dtype, seed=2)
    other = Normal(other_mu_raw, other_log_sigma_raw)
    other_reference = torch.distributions.Normal(other.mu, other.sigma)
    torch.testing.assert_close(
        dist.kl(other), torch.distributions.kl_divergence(reference, other_reference)
    )
    assert torch.all(dist.kl(dist).abs() < 1e-6)


def test_standard_prior_has_sigma_1_01():
    zeros = torch.zeros(3)
    assert torch.equal(Normal(zeros, zeros).sigma, torch.full((3,), 1.01))


def test_temperature_scales_sigma_only():
    mu_raw, log_sigma_raw = random_normal_params()
    base, tempered = Normal(mu_raw, log_sigma_raw), Normal(mu_raw, log_sigma_raw, temp=0.7)
    torch.testing.assert_close(tempered.sigma, base.sigma * 0.7)
    assert torch.equal(tempered.mu, base.mu)


def test_sample_consumes_rng_like_randn_like():
    mu_raw, log_sigma_raw = random_normal_params()
    dist = Normal(mu_raw, log_sigma_raw)
    torch.manual_seed(123)
    z, eps = dist.sample()
    torch.manual_seed(123)
    expected_eps = torch.randn_like(dist.mu)
    assert torch.equal(eps, expected_eps)
    assert torch.equal(z, eps * dist.sigma + dist.mu)
    assert torch.equal(dist.sample_given_eps(eps), z)
    generator_draw, _ = dist.sample(torch.Generator().manual_seed(5))
    again, _ = dist.sample(torch.Generator().manual_seed(5))
    assert torch.equal(generator_draw, again)


def test_normal_on_test_device(test_device):
    mu_raw, log_sigma_raw = (t.to(test_device) for t in random_normal_params())
    dist = Normal(mu_raw, log_sigma_raw)
    z, eps = dist.sample()
    assert z.device.type == test_device.type and eps.device.type == test_device.type
    assert dist.log_p(z).device.type == test_device.type


def test_normal_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        Normal(torch.zeros(2, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------- Normal decoder

def test_normal_decoder_log_prob_sample_mean():
    logits = 2 * torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    decoder = NormalDecoder(logits)
    reference = torch.distributions.Normal(
        5 * torch.tanh(logits[:, :3] / 5), torch.exp(5 * torch.tanh(logits[:, 3:] / 5)) + 0.01
    )
    torch.testing.assert_close(decoder.log_prob(x), reference.log_prob(2 * x - 1))
    torch.manual_seed(3)
    draw = decoder.sample(t=0.1)
    torch.manual_seed(3)
    assert torch.equal(decoder.sample(t=1.0), draw)  # t is ignored (NVAE quirk)
    torch.manual_seed(3)
    expected = torch.clamp(torch.randn(2, 3, 5, 5) * reference.scale + reference.loc, -1, 1) / 2 + 0.5
    torch.testing.assert_close(draw, expected)
    torch.testing.assert_close(decoder.mean(), torch.clamp(reference.loc, -1, 1) / 2 + 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        decoder.log_prob(x + 1.5)
    with pytest.raises(ValueError, match="6"):
        NormalDecoder(torch.zeros(1, 5, 2, 2))


# ---------------------------------------------------------------- mixture of logistics

def random_mixture_param(num_mix, height=1, width=1, batch=1, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, 10 * num_mix, height, width, generator=generator, dtype=torch.float64)


def all_colour_combinations(num_bits):
    levels = torch.arange(2 ** num_bits, dtype=torch.float64) / (2 ** num_bits - 1)
    combos = torch.tensor(list(itertools.product(levels.tolist(), repeat=3)), dtype=torch.float64)
    return combos.view(-1, 3, 1, 1)  # [N, 3, 1, 1]


@pytest.mark.parametrize("num_bits", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixture_probabilities_sum_to_one_over_all_colours(num_bits, seed):
    param = random_mixture_param(num_mix=3, seed=seed)
    param[:, 3 + 3 * 1: 3 + 3 * 2] -= 1.0  # red log-scales < 0 so the tiny-probability branch stays off
    x = all_colour_combinations(num_bits)
    dist = DiscMixLogistic(param.expand(x.shape[0], -1, -1, -1), num_mix=3, num_bits=num_bits)
    total = torch.exp(dist.log_prob(x)).sum()
    assert abs(total.item() - 1.0) < 1e-4


def logistic_cdf(u):
    return 1.0 / (1.0 + math.exp(-u))


def test_mixture_log_prob_brute_force_single_component():
    """One component, no coupling: log P = sum_c ln(CDF(upper_c) - CDF(lower_c)) with the bin edges."""
    param = torch.zeros(1, 10, 1, 1, dtype=torch.float64)
    param[0, 1::3, 0, 0] = torch.tensor([0.2, -0.4, 0.6], dtype=torch.float64)  # means
    param[0, 2::3, 0, 0] = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64)  # log-scales
    param[0, 3::3, 0, 0] = 0.0  # tanh(0) = 0: no colour coupling
    num_bits = 3
    x = torch.tensor([0.0, 3 / 7, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    dist = DiscMixLogistic(param, num_mix=1, num_bits=num_bits)
    expected = 0.0
    for colour, (mean, log_scale) in enumerate([(0.2, -1.0), (-0.4, -0.5), (0.6, -2.0)]):
        y = 2 * x[0, colour, 0, 0].item() - 1
        upper = 1.0 if y > 0.99 else logistic_cdf((y + 1 / 7 - mean) / math.exp(log_scale))
        lower = 0.0 if y < -0.999 else logistic_cdf((y - 1 / 7 - mean) / math.exp(log_scale))
        expected += math.log(upper - lower)
    assert dist.log_prob(x).item() == pytest.approx(expected, rel=1e-9)


def test_mixture_log_scale_is_clamped_at_minus_7():
    param = random_mixture_param(num_mix=2, batch=2, height=3, width=3)
    param[:, 2 + 2:2 + 4] = -50.0  # red log-scales of both components
    assert torch.all(DiscMixLogistic(param, num_mix=2).log_scales[:, 0] == -7.0)


def test_mixture_samples_follow_log_prob_without_coupling():
    """Histogram of quantised draws matches exp(log_prob) (coefficients 0, so colours decouple)."""
    num_mix, num_bits, draws = 2, 2, 40000
    param = random_mixture_param(num_mix=num_mix, seed=4)
    for colour in range(3):
        start = num_mix + 3 * num_mix * colour + 2 * num_mix
        param[:, start:start + num_mix] = 0.0
    dist = DiscMixLogistic(param.expand(draws, -1, -1, -1), num_mix=num_mix, num_bits=num_bits)
    samples = dist.sample(generator=torch.Generator().manual_seed(0))  # [N, 3, 1, 1]
    levels = torch.round(samples * (2 ** num_bits - 1)).long().view(draws, 3)
    codes = (levels[:, 0] * 4 + levels[:, 1]) * 4 + levels[:, 2]
    empirical = torch.bincount(codes, minlength=64).double() / draws
    combos = all_colour_combinations(num_bits)
    single = DiscMixLogistic(param.expand(combos.shape[0], -1, -1, -1), num_mix=num_mix, num_bits=num_bits)
    expected = torch.exp(single.log_prob(combos)).view(64)
    standard_error = torch.sqrt(expected * (1 - expected) / draws)
    assert torch.all((empirical - expected).abs() <= 5 * standard_error + 1e-4)


def test_mixture_sample_and_mean_shapes_ranges_and_determinism(test_device):
    param = random_mixture_param(num_mix=10, batch=2, height=4, width=5, scale=3.0).float().to(test_device)
    dist = DiscMixLogistic(param, num_mix=10, num_bits=8)
    generator = torch.Generator(device=test_device).manual_seed(0)
    draw = dist.sample(t=0.8, generator=generator)
    generator.manual_seed(0)
    assert torch.equal(dist.sample(t=0.8, generator=generator), draw)
    for image in (draw, dist.mean()):
        assert image.shape == (2, 3, 4, 5) and image.dtype == torch.float32
        assert image.device.type == test_device.type
        assert image.min() >= 0 and image.max() <= 1


def test_mixture_mean_closed_form_with_coupling():
    """mean(): softmax-weighted means and coefficients, then clamp and couple R -> G -> B."""
    param = torch.zeros(1, 20, 1, 1)
    param[0, :2, 0, 0] = torch.tensor([0.0, math.log(3.0)])  # weights 1/4, 3/4
    means = torch.tensor([[0.4, 0.8], [1.5, 2.0], [-0.5, -0.3]])  # green saturates, blue does not
    raw_coeffs = torch.tensor([[0.3, -0.1], [0.2, 0.6], [-0.5, 0.4]])
    for colour in range(3):
        start = 2 + 6 * colour
        param[0, start:start + 2, 0, 0] = means[colour]
        param[0, start + 4:start + 6, 0, 0] = raw_coeffs[colour]
    weights = torch.tensor([0.25, 0.75])
    mean_values = means @ weights
    mean_coeffs = torch.tanh(raw_coeffs) @ weights
    red = mean_values[0].clamp(-1, 1)
    green = (mean_values[1] + mean_coeffs[0] * red).clamp(-1, 1)
    blue = (mean_values[2] + mean_coeffs[1] * red + mean_coeffs[2] * green).clamp(-1, 1)
    expected = torch.stack([red, green, blue]) / 2 + 0.5
    torch.testing.assert_close(DiscMixLogistic(param, num_mix=2).mean().view(3), expected)


def test_mixture_bad_inputs_raise():
    with pytest.raises(ValueError, match="100"):
        DiscMixLogistic(torch.zeros(1, 99, 2, 2))
    dist = DiscMixLogistic(torch.zeros(1, 100, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dist.log_prob(torch.full((1, 3, 2, 2), -0.1))
    with pytest.raises(ValueError, match="3"):
        dist.log_prob(torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- dispatch, images, losses

def test_output_distribution_dispatch():
    assert isinstance(output_distribution(torch.zeros(1, 1, 4, 4), "omniglot", 10, 8),
                      torch.distributions.Bernoulli)
    assert isinstance(output_distribution(torch.zeros(1, 6, 4, 4), "celeba_64", 1, 8), NormalDecoder)
    mixture = output_distribution(torch.zeros(1, 50, 4, 4), "imagenet_32", 5, 5)
    assert isinstance(mixture, DiscMixLogistic) and mixture.num_mix == 5 and mixture.max_value == 31
    with pytest.raises(ValueError, match="'svhn' is not supported"):
        output_distribution(torch.zeros(1, 1, 4, 4), "svhn", 10, 8)


def test_bernoulli_output_and_output_image():
    logits = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    bernoulli = bernoulli_output(logits)
    x = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    torch.testing.assert_close(bernoulli.log_prob(x), x * logits - torch.nn.functional.softplus(logits))
    torch.testing.assert_close(output_image(bernoulli), torch.sigmoid(logits))
    mixture = DiscMixLogistic(torch.zeros(2, 100, 4, 4))
    torch.testing.assert_close(output_image(mixture, mean=True), mixture.mean())
    draw = output_image(mixture, t=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, mixture.sample(0.5, generator=torch.Generator().manual_seed(0)))


def test_reconstruction_loss_crop_ignores_the_border():
    logits = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    dist = bernoulli_output(logits)
    full = -dist.log_prob(x).sum(dim=(1, 2, 3))
    cropped = -dist.log_prob(x)[:, :, 2:30, 2:30].sum(dim=(1, 2, 3))
    torch.testing.assert_close(reconstruction_loss(dist, x, crop=False), full)
    torch.testing.assert_close(reconstruction_loss(dist, x, crop=True), cropped)
    x_other_border = x.clone()
    x_other_border[:, :, :2] = 1 - x_other_border[:, :, :2]
    x_other_border[:, :, :, 30:] = 1 - x_other_border[:, :, :, 30:]
    assert torch.equal(reconstruction_loss(dist, x_other_border, crop=True),
                       reconstruction_loss(dist, x, crop=True))
    assert not torch.equal(reconstruction_loss(dist, x_other_border, crop=False), full)
    with pytest.raises(ValueError, match="crop"):
        reconstruction_loss(bernoulli_output(logits[..., :20, :20]), x[..., :20, :20], crop=True)
