"""KL warm-up, KL balancing and λ: against NVAE's golden vectors and hand-computed values."""
import math

import pytest
import torch

from miselbo.nvae.objectives import (kl_balance_alpha, kl_balancer, kl_coeff, kl_per_group,
                                     regulariser_coefficient)
from conftest import golden_case_dir

ORDER_ONE = dict(rtol=1e-4, atol=1e-5)  # golden README: train/kl_coeffs, train/alpha_i
NATS = dict(rtol=1e-5, atol=1e-3)  # golden README: train/balanced_kl, kl_vals


# ----------------------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("case", ["mnist_small", "cifar_flows"])
def test_balancer_reproduces_nvae_golden_training_pass(case):
    golden = torch.load(golden_case_dir(case) / "golden.pt", weights_only=True)
    alpha = kl_balance_alpha(golden["groups_per_scale"].tolist())
    balanced_kl, coeffs, kl_vals = kl_balancer(golden["train/kl_all"], golden["train/kl_coeff"],
                                               kl_balance=True, alpha=alpha)
    assert golden["train/kl_coeff"] == 0.5
    torch.testing.assert_close(alpha, golden["train/alpha_i"], **ORDER_ONE)
    torch.testing.assert_close(coeffs, golden["train/kl_coeffs"], **ORDER_ONE)
    torch.testing.assert_close(kl_vals, golden["train/kl_vals"], **NATS)
    torch.testing.assert_close(balanced_kl, golden["train/balanced_kl"], **NATS)


# ----------------------------------------------------------------------------- alpha

@pytest.mark.parametrize("groups, expected", [
    ([2, 2], [1, 1, 4, 4]),
    ([10, 5], [1] * 5 + [2] * 10),
    ([1], [1]),
    # decoder-order counts 4, 4, 4, 8, 16 -> 4^i / n_i = 1/4, 1, 4, 8, 16 -> divided by 1/4
    ([16, 8, 4, 4, 4], [1] * 4 + [4] * 4 + [16] * 4 + [32] * 8 + [64] * 16),
])
def test_square_alpha_matches_hand_computed_examples(groups, expected):
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(kl_balance_alpha(groups), expected, rtol=0, atol=0)


@pytest.mark.parametrize("rule, expected", [
    ("equal", [1, 1, 1, 1, 1]),
    ("linear", [1, 1, 2, 2, 2]),
    ("sqrt", [1, 1, math.sqrt(2), math.sqrt(2), math.sqrt(2)]),
])
def test_other_alpha_rules(rule, expected):
    alpha = kl_balance_alpha([3, 2], rule=rule, dtype=torch.float64)
    assert alpha.dtype == torch.float64
    torch.testing.assert_close(alpha, torch.tensor(expected, dtype=torch.float64))


def test_alpha_follows_requested_device(test_device):
    assert kl_balance_alpha([2, 2], device=test_device).device.type == test_device.type


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(groups_per_scale=[2, 2], rule="cubic"), "unknown rule"),
    (dict(groups_per_scale=[]), "non-empty"),
    (dict(groups_per_scale=[2, 0]), "positive"),
])
def test_alpha_rejects_bad_input(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        kl_balance_alpha(**kwargs)


# ----------------------------------------------------------------------------- per group / balancer

def random_kl_all(num_examples=6, num_groups=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # some negative entries, as single-sample KLs with flows can be
    values = torch.randn(num_groups, num_examples, generator=generator, dtype=torch.float64)
    return list(values * 3 + 1)


def test_kl_per_group_matches_a_loop():
    kl_all = random_kl_all()
    kl_vals, abs_mean = kl_per_group(kl_all)
    assert kl_vals.shape == (5,) and abs_mean.shape == (1, 5)
    for group, kl in enumerate(kl_all):
        assert kl_vals[group].item() == pytest.approx(sum(kl.tolist()) / len(kl), rel=1e-12)
        expected_abs = sum(abs(v) for v in kl.tolist()) / len(kl) + 0.01
        assert abs_mean[0, group].item() == pytest.approx(expected_abs, rel=1e-12)


def test_balancer_matches_a_loop_during_warm_up():
    kl_all = random_kl_all()
    alpha = kl_balance_alpha([3, 2], dtype=torch.float64)
    beta = 0.3
    balanced_kl, coeffs, _ = kl_balancer(kl_all, beta, kl_balance=True, alpha=alpha)
    abs_means = [sum(abs(v) for v in kl.tolist()) / len(kl) + 0.01 for kl in kl_all]
    raw = [c / a for c, a in zip(abs_means, alpha.tolist())]
    gamma = [r / (sum(raw) / len(raw)) for r in raw]
    assert coeffs.tolist() == pytest.approx(gamma, rel=1e-12)
    assert sum(coeffs.tolist()) / len(gamma) == pytest.approx(1.0, rel=1e-12)
    for example in range(len(kl_all[0])):
        expected = beta * sum(g * kl[example].item() for g, kl in zip(gamma, kl_all))
        assert balanced_kl[example].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta, balance", [(1.0, True), (0.4, False), (1.0, False)])
def test_balancer_is_a_plain_weighted_sum_when_inactive(beta, balance):
    kl_all = random_kl_all()
    balanced_kl, coeffs, kl_vals = kl_balancer(kl_all, beta, kl_balance=balance,
                                               alpha=kl_balance_alpha([3, 2]))
    torch.testing.assert_close(balanced_kl, beta * sum(kl_all))
    torch.testing.assert_close(coeffs, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(kl_vals, torch.stack(kl_all).mean(dim=1))


def test_balancing_weights_carry_no_gradient():
    kl_all = [kl.clone().requires_grad_(True) for kl in random_kl_all()]
    balanced_kl, coeffs, _ = kl_balancer(kl_all, 0.5, kl_balance=True,
                                         alpha=kl_balance_alpha([3, 2]))
    assert not coeffs.requires_grad
    balanced_kl.sum().backward()
    for group, kl in enumerate(kl_all):  # d(sum_b 0.5 * sum_g gamma_g K_bg)/dK_bg = 0.5 * gamma_g
        torch.testing.assert_close(kl.grad, torch.full_like(kl, 0.5 * coeffs[group].item()))


@pytest.mark.parametrize("kl_all, alpha, fragment", [
    ([], None, "empty"),
    ([torch.ones(3), torch.ones(4)], None, "same length"),
    ([torch.ones(3, 2)], None, r"\[B\] tensor"),
    ([torch.ones(3), torch.ones(3)], None, "needs alpha"),
    ([torch.ones(3), torch.ones(3)], torch.ones(3), "one weight per latent group"),
])
def test_balancer_rejects_bad_input(kl_all, alpha, fragment):
    with pytest.raises(ValueError, match=fragment):
        kl_balancer(kl_all, 0.5, kl_balance=True, alpha=alpha)


# ----------------------------------------------------------------------------- warm-up and lambda

@pytest.mark.parametrize("step, expected", [
    (0, 1e-4),  # (0 - 0.1) / 300 < 0 -> floor
    (1, (1 - 0.1) / 300),
    (150, (150 - 0.1) / 300),
    (300, (300 - 0.1) / 300),
    (301, 1.0),
    (999, 1.0),
])
def test_kl_coeff_follows_nvae_warm_up(step, expected):
    assert kl_coeff(step, 1000, 0.3, 0.0001, 0.0001) == pytest.approx(expected, rel=1e-12)


def test_kl_coeff_without_anneal_steps_is_a_step_function():
    assert kl_coeff(9, 100, 0.0, 0.1, 0.01) == 0.01
    assert kl_coeff(10, 100, 0.0, 0.1, 0.01) == 1.0


def test_kl_coeff_rejects_negative_portions():
    with pytest.raises(ValueError, match="kl_anneal_portion"):
        kl_coeff(0, 100, -0.3, 0.0, 0.0)


def test_regulariser_coefficient():
    assert regulariser_coefficient(0.3, 0.1, 10.0, anneal=False) == 0.1
    assert regulariser_coefficient(0.0, 0.1, 10.0, anneal=True) == pytest.approx(10.0, rel=1e-12)
    assert regulariser_coefficient(1.0, 0.1, 10.0, anneal=True) == pytest.approx(0.1, rel=1e-12)
    assert regulariser_coefficient(0.5, 0.1, 10.0, anneal=True) == pytest.approx(1.0, rel=1e-12)
    quarter_way = regulariser_coefficient(0.25, 1e-2, 1.0, anneal=True)
    assert quarter_way == pytest.approx(10 ** -0.5, rel=1e-12)
    with pytest.raises(ValueError, match="weight_decay_norm"):
        regulariser_coefficient(0.5, 0.0, 10.0, anneal=True)
