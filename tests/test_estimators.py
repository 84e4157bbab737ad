"""The estimators against plain loops, exact identities, a linear-Gaussian model and a two-mode target."""
import itertools
import math

import pytest
import torch

from miselbo import estimators as est
from miselbo.estimators.generic import compute_log_weights


def random_log_weights(shape_lead, S, L, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    log_p = scale * torch.randn(*shape_lead, S, L, generator=generator, dtype=torch.float64)
    log_q = scale * torch.randn(*shape_lead, S, L, S, generator=generator, dtype=torch.float64)
    return log_p, log_q


# ----------------------------------------------------------------------------- plain Python references

def py_logsumexp(values):
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def py_estimates(log_p, log_q):
    """Every estimator for one batch element, from nested lists, with loops only."""
    S, L = len(log_p), len(log_p[0])
    log_mix = [[py_logsumexp(log_q[s][l]) - math.log(S) for l in range(L)] for s in range(S)]
    mis_rows = [py_logsumexp([log_p[s][l] - log_mix[s][l] for l in range(L)]) - math.log(L) for s in range(S)]
    iw_rows = [py_logsumexp([log_p[s][l] - log_q[s][l][s] for l in range(L)]) - math.log(L) for s in range(S)]
    all_weights = [log_p[s][l] - log_mix[s][l] for s in range(S) for l in range(L)]
    return {
        "log_mix": log_mix,
        "miselbo": sum(mis_rows) / S,
        "pooled": py_logsumexp(all_weights) - math.log(S * L),
        "iwelbo": iw_rows,
        "average_iwelbo": sum(iw_rows) / S,
        "average_elbo": sum(log_p[s][l] - log_q[s][l][s] for s in range(S) for l in range(L)) / (S * L),
        "jsd": sum(log_q[s][l][s] - log_mix[s][l] for s in range(S) for l in range(L)) / (S * L),
    }


@pytest.mark.parametrize("S,L", [(1, 1), (1, 4), (3, 1), (3, 5), (4, 2)])
def test_vectorised_estimators_equal_python_loops(S, L):
    log_p, log_q = random_log_weights((2, 3), S, L, seed=S * 10 + L)
    log_q[..., 0, 0, S - 1] = -math.inf if S > 1 else log_q[..., 0, 0, 0]  # legal zero density
    results = {
        "log_mix": est.log_mixture_density(log_q),
        "miselbo": est.miselbo(log_p, log_q),
        "pooled": est.pooled_mis_bound(log_p, log_q),
        "iwelbo": est.iwelbo(log_p, log_q),
        "average_iwelbo": est.average_iwelbo(log_p, log_q),
        "average_elbo": est.average_elbo(log_p, log_q),
        "jsd": est.jsd(log_q),
    }
    for index in itertools.product(range(2), range(3)):
        expected = py_estimates(log_p[index].tolist(), log_q[index].tolist())
        for name, value in results.items():
            torch.testing.assert_close(
                value[index], torch.tensor(expected[name], dtype=torch.float64), rtol=1e-12, atol=1e-12,
                msg=lambda m, name=name: f"{name}: {m}",
            )


def test_results_are_float64_with_leading_dims_kept():
    log_p, log_q = random_log_weights((5,), 2, 3)
    log_p32, log_q32 = log_p.float(), log_q.float()
    assert est.miselbo(log_p32, log_q32).dtype == torch.float64
    assert est.miselbo(log_p32, log_q32).shape == (5,)
    assert est.iwelbo(log_p32, log_q32).shape == (5, 2)
    assert est.log_mixture_density(log_q32).shape == (5, 2, 3)
    torch.testing.assert_close(est.miselbo(log_p32, log_q32), est.miselbo(log_p32.double(), log_q32.double()))


# ----------------------------------------------------------------------------- exact identities and orderings

def test_l1_identity_miselbo_equals_average_elbo_plus_jsd():
    log_p, log_q = random_log_weights((7, 2), 4, 1, seed=3)
    lhs = est.miselbo(log_p, log_q)
    rhs = est.average_elbo(log_p, log_q) + est.jsd(log_q)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
    assert (lhs - est.average_elbo(log_p, log_q)).abs().max() > 0.1  # the jsd term is not trivially zero


def test_orderings_hold_for_every_realization():
    log_p, log_q = random_log_weights((500,), 3, 4, seed=11)
    miselbo, pooled = est.miselbo(log_p, log_q), est.pooled_mis_bound(log_p, log_q)
    assert (pooled >= miselbo).all()
    assert (pooled - miselbo).max() > 0.1  # the inequality is strict in general, so the test can fail
    assert (est.average_iwelbo(log_p, log_q) >= est.average_elbo(log_p, log_q)).all()
    assert (miselbo >= est.average_elbo(log_p, log_q) + est.jsd(log_q) - 1e-12).all()
    assert (miselbo <= est.average_iwelbo(log_p, log_q) + math.log(3) + 1e-12).all()
    assert (est.jsd(log_q) <= math.log(3) + 1e-12).all()


def test_single_member_reduces_to_iwelbo():
    log_p, log_q = random_log_weights((4,), 1, 6, seed=5)
    iwelbo = est.iwelbo(log_p, log_q)[..., 0]
    torch.testing.assert_close(est.miselbo(log_p, log_q), iwelbo, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.pooled_mis_bound(log_p, log_q), iwelbo, rtol=0, atol=1e-12)
    assert (est.jsd(log_q) == 0).all()


def test_large_log_weights_and_minus_inf_stay_finite():
    log_p, log_q = random_log_weights((3,), 3, 4, seed=2, scale=1e4)
    log_q[..., 0, :, 1] = -math.inf
    log_p[0, 1, :] = -math.inf  # a whole member with zero weights
    for value in (est.miselbo(log_p, log_q), est.pooled_mis_bound(log_p, log_q), est.jsd(log_q)):
        assert not value.isnan().any()
    assert est.miselbo(log_p, log_q)[0] == -math.inf
    assert est.pooled_mis_bound(log_p, log_q)[0] > -math.inf


# ----------------------------------------------------------------------------- S2A / S2S

def test_s2a_over_all_subsets_of_a_size_equals_miselbo_exactly():
    log_p, log_q = random_log_weights((3,), 5, 4, seed=8)
    miselbo = est.miselbo(log_p, log_q)
    for size in range(1, 6):
        subsets = list(itertools.combinations(range(5), size))
        average = torch.stack([est.some_to_all(log_p, log_q, subset) for subset in subsets]).mean(0)
        torch.testing.assert_close(average, miselbo, rtol=0, atol=1e-12)


def test_s2a_random_draws_average_to_miselbo():
    log_p, log_q = random_log_weights((), 6, 3, seed=9)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([est.some_to_all(log_p, log_q, 2, generator) for _ in range(3000)])
    stderr = draws.std() / math.sqrt(len(draws))
    assert draws.std() > 0.05  # the subsets really differ
    assert abs(draws.mean() - est.miselbo(log_p, log_q)) < 4 * stderr


def test_s2a_s2s_special_cases():
    log_p, log_q = random_log_weights((2,), 4, 3, seed=4)
    everyone = [0, 1, 2, 3]
    torch.testing.assert_close(est.some_to_all(log_p, log_q, everyone), est.miselbo(log_p, log_q), rtol=0, atol=1e-12)
    torch.testing.assert_close(est.some_to_some(log_p, log_q, everyone), est.miselbo(log_p, log_q), rtol=0, atol=1e-12)
    torch.testing.assert_close(est.some_to_some(log_p, log_q, [2]), est.iwelbo(log_p, log_q)[:, 2], rtol=0, atol=1e-12)
    subset = [1, 3]  # S2S = the MISELBO of the sub-ensemble
    sub_q = log_q[..., subset, :, :][..., subset]
    torch.testing.assert_close(
        est.some_to_some(log_p, log_q, subset), est.miselbo(log_p[..., subset, :], sub_q), rtol=0, atol=1e-12
    )


def test_s2a_s2s_never_read_rows_outside_the_subset():
    log_p, log_q = random_log_weights((2,), 4, 3, seed=6)
    subset = [0, 2]
    holey_p, holey_q = log_p.clone(), log_q.clone()
    holey_p[..., [1, 3], :] = math.nan
    holey_q[..., [1, 3], :, :] = math.nan
    torch.testing.assert_close(est.some_to_all(holey_p, holey_q, subset), est.some_to_all(log_p, log_q, subset))
    holey_q[..., [1, 3]] = math.nan  # S2S does not read the other members' densities either
    torch.testing.assert_close(est.some_to_some(holey_p, holey_q, subset), est.some_to_some(log_p, log_q, subset))
    with pytest.raises(ValueError, match="log_q"):
        est.some_to_all(holey_p, holey_q, subset)  # S2A does need every member's density


def test_member_count_draw_is_reproducible_and_matches_draw_members():
    log_p, log_q = random_log_weights((), 5, 2, seed=1)
    drawn = est.draw_members(5, 3, torch.Generator().manual_seed(42))
    value = est.some_to_all(log_p, log_q, 3, torch.Generator().manual_seed(42))
    torch.testing.assert_close(value, est.some_to_all(log_p, log_q, drawn.tolist()))
    assert drawn.unique().numel() == 3


# ----------------------------------------------------------------------------- linear-Gaussian model

class LinearGaussianModel:
    """z ~ N(0, I_d), x | z ~ N(A z + b, noise^2 I_D); posterior and evidence in closed form."""

    def __init__(self, latent_dim=2, data_dim=3, noise=0.7, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(data_dim, latent_dim, generator=generator, dtype=torch.float64)
        self.bias = torch.randn(data_dim, generator=generator, dtype=torch.float64)
        self.noise = noise
        precision = torch.eye(latent_dim, dtype=torch.float64) + self.weight.T @ self.weight / noise**2
        self.posterior_cov = torch.linalg.inv(precision)  # [d, d]

    def log_joint(self, x, z):
        """log N(z; 0, I) + log N(x; A z + b, noise^2 I): x [B, D], z [n, B, d] -> [n, B]."""
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        mean = z @ self.weight.T + self.bias  # [n, B, D]
        return prior + torch.distributions.Normal(mean, self.noise).log_prob(x).sum(-1)

    def posterior_mean(self, x):
        return (x - self.bias) @ self.weight @ self.posterior_cov / self.noise**2  # [B, d]

    def log_evidence(self, x):
        cov = self.weight @ self.weight.T + self.noise**2 * torch.eye(len(self.bias), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.bias, cov).log_prob(x)  # [B]

    def sample_data(self, batch, seed):
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(batch, self.weight.shape[1], generator=generator, dtype=torch.float64)
        noise = torch.randn(batch, len(self.bias), generator=generator, dtype=torch.float64)
        return z @ self.weight.T + self.bias + self.noise * noise  # [B, D]


class ShiftedPosterior:
    """Amortized member q(z | x) = N(mu(x) + shift, scale^2 Sigma) around the exact posterior."""

    def __init__(self, model, shift=(0.0, 0.0), scale=1.0):
        self.model, self.shift, self.scale = model, torch.tensor(shift, dtype=torch.float64), scale

    def _dist(self, x):
        scale_tril = self.scale * torch.linalg.cholesky(self.model.posterior_cov)
        return torch.distributions.MultivariateNormal(self.model.posterior_mean(x) + self.shift, scale_tril=scale_tril)

    def sample(self, x, num_samples):
        return self._dist(x).sample((num_samples,))  # [n, B, d]

    def log_prob(self, z, x):
        return self._dist(x).log_prob(z)  # [n, B]


ALL_BOUNDS = {
    "miselbo": est.miselbo,
    "pooled": est.pooled_mis_bound,
    "average_iwelbo": est.average_iwelbo,
    "average_elbo": est.average_elbo,
    "s2a": lambda log_p, log_q: est.some_to_all(log_p, log_q, [0, 2]),
    "s2s": lambda log_p, log_q: est.some_to_some(log_p, log_q, [1, 2]),
}


def test_exact_posterior_members_make_every_bound_equal_log_evidence():
    model = LinearGaussianModel()
    x = model.sample_data(batch=4, seed=1)
    torch.manual_seed(0)
    members = [ShiftedPosterior(model) for _ in range(3)]
    log_p, log_q = compute_log_weights(members, model.log_joint, x, num_samples=7)
    for name, bound in ALL_BOUNDS.items():
        torch.testing.assert_close(bound(log_p, log_q), model.log_evidence(x), rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(est.jsd(log_q), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)


def perturbed_bounds(num_samples, replications=2000, seed=0):
    """Every bound for one x, replicated as a batch of independent draws: name -> [R]."""
    model = LinearGaussianModel()
    x = model.sample_data(batch=1, seed=2).expand(replications, -1)  # [R, D]
    members = [
        ShiftedPosterior(model, shift=(0.8, 0.0), scale=0.8),
        ShiftedPosterior(model, shift=(-0.6, 0.5), scale=1.2),
        ShiftedPosterior(model, shift=(0.0, -0.7), scale=0.9),
    ]
    torch.manual_seed(seed)
    log_p, log_q = compute_log_weights(members, model.log_joint, x, num_samples=num_samples, chunk_size=50)
    return {name: bound(log_p, log_q) for name, bound in ALL_BOUNDS.items()}, model.log_evidence(x[0])


def mean_and_stderr(values):
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def test_perturbed_members_give_bounds_below_log_evidence():
    bounds, log_evidence = perturbed_bounds(num_samples=10)
    for name, values in bounds.items():
        mean, stderr = mean_and_stderr(values)
        assert mean + 4 * stderr < log_evidence, f"{name}: {mean} +- {stderr} vs log p(x) = {log_evidence}"


def test_bounds_grow_with_num_samples():
    means = {num: perturbed_bounds(num, seed=num) for num in (1, 10, 100)}
    for name in ("miselbo", "pooled", "average_iwelbo", "s2a", "s2s"):
        for small, large in ((1, 10), (10, 100)):
            mean_small, se_small = mean_and_stderr(means[small][0][name])
            mean_large, se_large = mean_and_stderr(means[large][0][name])
            margin = 4 * math.hypot(se_small, se_large)
            assert mean_large - mean_small > margin, f"{name}: L={small} {mean_small}, L={large} {mean_large}"
        assert mean_and_stderr(means[100][0][name])[0] < means[100][1]


# ----------------------------------------------------------------------------- two-mode target

class FixedNormal:
    """Classical-VI member N(loc, 1) that ignores x."""

    def __init__(self, loc):
        self.dist = torch.distributions.Normal(torch.tensor(loc, dtype=torch.float64), 1.0)

    def sample(self, x, num_samples):
        return self.dist.sample((num_samples,))  # [n]

    def log_prob(self, z, x):
        return self.dist.log_prob(z)  # [n]


def two_mode_log_target(x, z):
    """log [0.9 N(z; -5, 1) + 0.1 N(z; 5, 1)], normalised: log Z = 0."""
    weights = torch.tensor([0.9, 0.1], dtype=torch.float64)
    components = torch.distributions.Normal(torch.tensor([-5.0, 5.0], dtype=torch.float64), 1.0)
    return torch.logsumexp(components.log_prob(z[..., None]) + weights.log(), dim=-1)


@pytest.mark.parametrize("num_samples", [1, 10, 100, 1000])
def test_two_mode_pooled_reaches_log_z_and_miselbo_stays_kl_below(num_samples):
    kl_uniform_to_shares = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108 nats
    torch.manual_seed(num_samples)
    members = [FixedNormal(-5.0), FixedNormal(5.0)]
    log_p, log_q = compute_log_weights(members, two_mode_log_target, None, num_samples=num_samples)
    assert log_p.shape == (2, num_samples)
    assert abs(est.pooled_mis_bound(log_p, log_q).item()) < 1e-3
    assert abs(est.miselbo(log_p, log_q).item() + kl_uniform_to_shares) < 1e-3
    assert abs(est.average_iwelbo(log_p, log_q).item()) > 0.5  # each member alone misses a mode


# ----------------------------------------------------------------------------- bad input

def _bad_case(name):
    log_p, log_q = random_log_weights((2,), 3, 4, seed=0)
    if name == "rank":
        return log_p[0, 0], log_q[0, 0], "log_p must have shape"
    if name == "shapes_disagree":
        return log_p, log_q[..., :2, :], "log_q must have shape log_p.shape"
    if name == "not_square":
        return log_p, log_q[..., :2], "log_q must have shape"
    if name == "empty_L":
        return log_p[..., :0], log_q[..., :0, :], "L = 0"
    if name == "nan_p":
        log_p[1, 2, 3] = math.nan
        return log_p, log_q, r"log_p must not contain NaN or \+inf.*\(1, 2, 3\)"
    if name == "posinf_q":
        log_q[0, 1, 2, 0] = math.inf
        return log_p, log_q, r"log_q must not contain NaN or \+inf.*\(0, 1, 2, 0\)"
    if name == "own_density_minus_inf":
        log_q[1, 2, 0, 2] = -math.inf
        return log_p, log_q, r"own density.*\(1, 2, 0\)"
    if name == "not_a_tensor":
        return log_p.tolist(), log_q, "log_p must be a torch.Tensor"
    raise AssertionError(name)


BAD_CASES = [
    "rank", "shapes_disagree", "not_square", "empty_L", "nan_p", "posinf_q", "own_density_minus_inf", "not_a_tensor",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_value_error_naming_the_argument(case):
    log_p, log_q, message = _bad_case(case)
    for estimator in (est.miselbo, est.pooled_mis_bound, est.iwelbo, est.average_elbo, est.validate_log_weights):
        with pytest.raises(ValueError, match=message):
            estimator(log_p, log_q)


def test_bad_log_q_alone_and_empty_members():
    with pytest.raises(ValueError, match="log_q must have shape"):
        est.jsd(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="S = 0"):
        est.log_mixture_density(torch.zeros(2, 0, 4, 0))
    with pytest.raises(ValueError, match="log_q must not contain NaN"):
        est.jsd(torch.full((2, 3, 2), math.nan))


@pytest.mark.parametrize(
    "members,message",
    [
        ([], "non-empty"),
        ([0, 0], "distinct"),
        ([3], r"\[0, S = 3\)"),
        ([-1], "distinct"),
        (0, r"count must be an int in \[1, S = 3\]"),
        (4, "count"),
        ([0.5], "int member indices"),
    ],
)
def test_bad_members_raise(members, message):
    log_p, log_q = random_log_weights((), 3, 2)
    for estimator in (est.some_to_all, est.some_to_some):
        with pytest.raises(ValueError, match=message):
            estimator(log_p, log_q, members)
