"""The inequalities that README.md, docs/own_model.md and miselbo/estimators/bounds.py state about the
estimators, checked numerically; and the false versions they replaced, each on an example where it
visibly fails.

Every example is a 1-d Gaussian ensemble on the target log p(x, z) = log N(z; 0, 1), so log p(x) = 0
and the exact posterior is N(0, 1). Members are q_s = N(mean_s, std_s^2). The estimators run on
Monte Carlo log-weights; the values they must reach are computed independently: member ELBOs in
closed form, mixture expectations by the trapezoidal rule on a fine grid.
"""
import itertools
import math

import torch

from miselbo import estimators

GRID = torch.linspace(-30.0, 30.0, 60001, dtype=torch.float64)  # quadrature nodes for z
MC_SIGMAS = 5.0  # a Monte Carlo mean counts as "on one side" when it is this many standard errors away


def _log_normal(z: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """log N(z; mean, std^2), written out."""
    return -0.5 * ((z - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def _log_target(z: torch.Tensor) -> torch.Tensor:
    """log p(x, z) = log N(z; 0, 1): log p(x) = 0."""
    return _log_normal(z, 0.0, 1.0)


def _closed_form_elbo(member) -> float:
    """ELBO of N(m, s^2) against the target: -KL(N(m, s^2) || N(0, 1)) = log s - (s^2 + m^2 - 1) / 2."""
    mean, std = member
    return math.log(std) - 0.5 * (std ** 2 + mean ** 2 - 1.0)


def _grid_log_mixture(members) -> torch.Tensor:
    """log (1/S) sum_j q_j(z) on GRID: [G]."""
    stacked = torch.stack([_log_normal(GRID, *member) for member in members])  # [S, G]
    return torch.logsumexp(stacked, dim=0) - math.log(len(members))


def _expect_under(member, values: torch.Tensor) -> float:
    """E_{z ~ member}[values(z)] by the trapezoidal rule on GRID."""
    density = torch.exp(_log_normal(GRID, *member))  # [G]
    return float(torch.trapezoid(density * values, GRID))


def _quadrature_basic_miselbo(members) -> float:
    """E[miselbo] at L = 1: (1/S) sum_s E_{q_s}[log p(x, z) - log q_mix(z)]."""
    log_ratio = _log_target(GRID) - _grid_log_mixture(members)  # [G]
    return sum(_expect_under(member, log_ratio) for member in members) / len(members)


def _quadrature_miselbo_limit(members) -> float:
    """miselbo as L -> inf: (1/S) sum_s log E_{q_s}[p(x, z) / q_mix(z)]."""
    ratio = torch.exp(_log_target(GRID) - _grid_log_mixture(members))  # [G]
    return sum(math.log(_expect_under(member, ratio)) for member in members) / len(members)


def _log_weights(members, num_samples: int, num_reps: int, seed: int):
    """Monte Carlo log-weights: log_p [R, S, L], log_q [R, S, L, S], z_sl ~ q_s."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([m for m, _ in members], dtype=torch.float64)  # [S]
    stds = torch.tensor([s for _, s in members], dtype=torch.float64)  # [S]
    noise = torch.randn(num_reps, len(members), num_samples, generator=generator, dtype=torch.float64)
    z = means[:, None] + stds[:, None] * noise  # [R, S, L]
    log_p = _log_target(z)  # [R, S, L]
    log_q = torch.stack([_log_normal(z, *member) for member in members], dim=-1)  # [R, S, L, S]
    return log_p, log_q


def _mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    """Mean over replications and its standard error."""
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# ----------------------------------------------------------------------------- README, line 5

FAR_APART = [(0.5, 1.0), (3.0, 1.0)]  # one good member, one poor one


def test_basic_miselbo_is_the_average_elbo_plus_the_jsd_and_at_most_log_p():
    """True: E[miselbo] >= average ELBO (the gap at L = 1 is the JSD, >= 0) and E[miselbo] <= log p(x)."""
    average_elbo = sum(_closed_form_elbo(member) for member in FAR_APART) / 2  # -2.3125
    expected = _quadrature_basic_miselbo(FAR_APART)
    log_p, log_q = _log_weights(FAR_APART, num_samples=1, num_reps=20000, seed=0)
    value = estimators.miselbo(log_p, log_q)  # [R]
    mean, error = _mean_and_error(value)
    assert abs(mean - expected) < MC_SIGMAS * error
    assert average_elbo + 0.4 < expected < 0.0  # JSD here is about 0.44 nats
    torch.testing.assert_close(value, estimators.average_elbo(log_p, log_q) + estimators.jsd(log_q))
    many = estimators.miselbo(*_log_weights(FAR_APART, num_samples=10, num_reps=2000, seed=1))
    mean_many, error_many = _mean_and_error(many)
    assert average_elbo < mean_many - MC_SIGMAS * error_many and mean_many + MC_SIGMAS * error_many < 0.0


def test_mixture_bound_is_not_tighter_than_the_best_members_bound():
    """False: "the mixture bound is tighter than any single encoder's". The better member's ELBO is
    -0.125; the two-member MISELBO is -1.87 at L = 1 and tends to -0.63 (not 0) as L grows."""
    best_elbo = _closed_form_elbo(FAR_APART[0])
    assert _quadrature_basic_miselbo(FAR_APART) < best_elbo - 1.5
    assert _quadrature_miselbo_limit(FAR_APART) < -0.6
    for num_samples, num_reps in ((1, 4000), (1000, 40)):
        log_p, log_q = _log_weights(FAR_APART, num_samples, num_reps, seed=2)
        gap = estimators.iwelbo(log_p, log_q)[:, 0] - estimators.miselbo(log_p, log_q)  # [R]
        mean, error = _mean_and_error(gap)
        assert mean > 0.5 and mean > MC_SIGMAS * error, (num_samples, mean, error)


def test_pooled_tends_to_log_p_while_miselbo_tends_to_its_own_limit():
    """True: pooled -> log p(x) as L grows, whatever shares the members cover; miselbo tends to
    (1/S) sum_s log E_{q_s}[p / q_mix] (here -0.628: E_{q_s}[p / q_mix] = 1.85 and 0.15), which is
    log p(x) - KL(uniform || w) when the members' supports do not overlap."""
    log_p, log_q = _log_weights(FAR_APART, num_samples=1000, num_reps=400, seed=6)
    pooled_mean, pooled_error = _mean_and_error(estimators.pooled_mis_bound(log_p, log_q))
    assert abs(pooled_mean) < MC_SIGMAS * pooled_error + 1e-3 and pooled_error < 2e-3
    miselbo_mean, _ = _mean_and_error(estimators.miselbo(log_p, log_q))
    assert abs(miselbo_mean - _quadrature_miselbo_limit(FAR_APART)) < 0.02


# ----------------------------------------------------------------------------- average_iwelbo docstring

def test_miselbo_is_at_most_average_iwelbo_plus_log_s_on_every_sample():
    """True on every realization: q_mix >= q_s / S, so miselbo <= average_iwelbo + log S; and by
    Jensen average_elbo <= average_iwelbo."""
    members = [(-1.0, 0.3), (0.0, 2.0), (2.0, 0.05)]
    for num_samples in (1, 3, 50):
        log_p, log_q = _log_weights(members, num_samples, num_reps=500, seed=num_samples)
        bound = estimators.average_iwelbo(log_p, log_q)  # [R]
        assert torch.all(estimators.miselbo(log_p, log_q) <= bound + math.log(3) + 1e-12)
        assert torch.all(estimators.average_elbo(log_p, log_q) <= bound + 1e-12)
    generator = torch.Generator().manual_seed(3)
    log_p = 10 * torch.randn(1000, 4, 5, generator=generator, dtype=torch.float64)  # arbitrary weights
    log_q = 10 * torch.randn(1000, 4, 5, 4, generator=generator, dtype=torch.float64)
    assert torch.all(estimators.miselbo(log_p, log_q) <= estimators.average_iwelbo(log_p, log_q) + math.log(4))


def test_average_iwelbo_can_exceed_miselbo_plus_log_s():
    """False: "average_iwelbo always <= miselbo + log S". S = 2, L = 1, members N(0, 1) and
    N(0, 0.01^2), each one's draw at its mode z = 0. By hand: average_iwelbo = (0 + log 0.01) / 2
    = -2.303; log q_mix(0) - log p(x, 0) = log 50.5, so miselbo + log 2 = -3.922 + 0.693 = -3.229."""
    members = [(0.0, 1.0), (0.0, 0.01)]
    z = torch.zeros(2, 1, dtype=torch.float64)  # [S, L]
    log_p = _log_target(z)  # [S, L]
    log_q = torch.stack([_log_normal(z, *member) for member in members], dim=-1)  # [S, L, S]
    average_iwelbo = float(estimators.average_iwelbo(log_p, log_q))
    miselbo_plus_log_s = float(estimators.miselbo(log_p, log_q)) + math.log(2)
    assert math.isclose(average_iwelbo, 0.5 * math.log(0.01), rel_tol=1e-12)
    assert math.isclose(miselbo_plus_log_s, -math.log(50.5) + math.log(2), rel_tol=1e-12)
    assert average_iwelbo > miselbo_plus_log_s + 0.9


# ----------------------------------------------------------------------------- some_to_some docstring

THREE = [(-1.0, 0.8), (0.0, 1.0), (1.5, 0.7)]


def test_s2s_at_one_sample_is_looser_than_miselbo_on_average_over_subsets():
    """True at L = 1: averaged over all subsets A of one size, E[s2s] <= E[miselbo] (the entropy is
    concave and the subset mixtures average to the full one). Quadrature per subset; the estimator
    reproduces each subset's value within Monte Carlo error."""
    log_p, log_q = _log_weights(THREE, num_samples=1, num_reps=20000, seed=4)
    full = _quadrature_basic_miselbo(THREE)
    for size in (1, 2):
        subsets = list(itertools.combinations(range(3), size))
        per_subset = [_quadrature_basic_miselbo([THREE[i] for i in subset]) for subset in subsets]
        for subset, expected in zip(subsets, per_subset):
            mean, error = _mean_and_error(estimators.some_to_some(log_p, log_q, list(subset)))
            assert abs(mean - expected) <= MC_SIGMAS * error + 1e-9, (subset, mean, expected)  # member 1 is exact
        assert sum(per_subset) / len(per_subset) < full - 0.1, size  # -0.59 (|A| = 1), -0.26 (2), -0.15


def test_s2s_can_be_tighter_than_miselbo_at_many_samples():
    """False: "S2S is looser on average" in general. Two members, L = 1000, |A| = 1: s2s is the
    drawn member's IWELBO, and its average over A (= average_iwelbo, close to log p(x) = 0) beats
    miselbo, which tends to -0.050 here (quadrature) because the members share the posterior unevenly."""
    members = [(0.0, 1.2), (1.5, 1.2)]
    assert _quadrature_miselbo_limit(members) < -0.04
    log_p, log_q = _log_weights(members, num_samples=1000, num_reps=100, seed=5)
    singles = torch.stack([estimators.some_to_some(log_p, log_q, [s]) for s in range(2)], dim=-1)  # [R, 2]
    torch.testing.assert_close(singles, estimators.iwelbo(log_p, log_q))
    gap = singles.mean(dim=-1) - estimators.miselbo(log_p, log_q)  # [R]
    mean, error = _mean_and_error(gap)
    assert mean > 0.03 and mean > MC_SIGMAS * error, (mean, error)
