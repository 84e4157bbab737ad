"""The generic evaluator: layout of the tensors, chunking, classical and amortized VI, bad members."""
import math

import pytest
import torch

from miselbo.estimators.generic import LogWeights, compute_log_weights


class PoolMember:
    """Hands out pre-drawn samples in order, so chunked and unchunked runs see identical z.

    Amortized when batch is an int: sample(x, n) -> [n, B, *event]; classical when batch is None.
    Its density is a diagonal Gaussian with its own location, scored on the last len(event) dims.
    """

    def __init__(self, loc, total, batch, event=(2,), seed=0):
        generator = torch.Generator().manual_seed(seed)
        lead = (total,) if batch is None else (total, batch)
        self.pool = loc + torch.randn(*lead, *event, generator=generator, dtype=torch.float64)
        self.loc, self.event_dims, self.cursor = loc, len(event), 0

    def sample(self, x, num_samples):
        z = self.pool[self.cursor:self.cursor + num_samples]
        self.cursor += num_samples
        return z

    def log_prob(self, z, x):
        shift = 0.0 if x is None else x.reshape(-1, *[1] * self.event_dims)  # amortized: depends on x
        log_density = torch.distributions.Normal(self.loc + shift, 1.0).log_prob(z)
        return log_density.flatten(-self.event_dims).sum(-1)


def log_joint(x, z):
    """A made-up joint: a standard normal in z plus a term in x (per batch element)."""
    num_lead_dims = 1 if x is None else 2  # [n] or [n, B]
    value = torch.distributions.Normal(0.0, 2.0).log_prob(z).flatten(num_lead_dims).sum(-1)
    return value if x is None else value + x


def make_members(batch, event=(2,), total=12, num=3):
    return [PoolMember(float(s), total, batch, event, seed=s) for s in range(num)]


def test_amortized_layout_matches_direct_scoring():
    x = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)  # B = 3
    members = make_members(batch=3, event=(2, 2))
    log_p, log_q = compute_log_weights(members, log_joint, x, num_samples=4, chunk_size=3)
    assert log_p.shape == (3, 3, 4) and log_q.shape == (3, 3, 4, 3)
    assert log_p.dtype == log_q.dtype == torch.float64
    for s in range(3):
        z = members[s].pool[:4]  # [L, B, 2, 2], the samples member s handed out
        torch.testing.assert_close(log_p[:, s, :], log_joint(x, z).T)
        for j in range(3):
            torch.testing.assert_close(log_q[:, s, :, j], members[j].log_prob(z, x).T)


def test_classical_layout_has_no_batch_dimension():
    members = make_members(batch=None)
    log_p, log_q = compute_log_weights(members, log_joint, None, num_samples=5, chunk_size=2)
    assert log_p.shape == (3, 5) and log_q.shape == (3, 5, 3)
    for s in range(3):
        z = members[s].pool[:5]  # [L, 2]
        torch.testing.assert_close(log_p[s], log_joint(None, z))
        for j in range(3):
            torch.testing.assert_close(log_q[s, :, j], members[j].log_prob(z, None))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 7, 100])
def test_chunked_equals_unchunked(chunk_size):
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    whole = compute_log_weights(make_members(batch=2), log_joint, x, num_samples=7)
    chunked = compute_log_weights(make_members(batch=2), log_joint, x, num_samples=7, chunk_size=chunk_size)
    assert isinstance(chunked, LogWeights)
    torch.testing.assert_close(chunked.log_p, whole.log_p, rtol=0, atol=0)
    torch.testing.assert_close(chunked.log_q, whole.log_q, rtol=0, atol=0)


def test_chunks_bound_the_samples_drawn_at_once():
    requests = []

    class Recording(PoolMember):
        def sample(self, x, num_samples):
            requests.append(num_samples)
            return super().sample(x, num_samples)

    compute_log_weights([Recording(0.0, 10, None)], log_joint, None, num_samples=10, chunk_size=4)
    assert requests == [4, 4, 2]


def test_results_do_not_keep_a_graph():
    loc = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    class Learnable:
        def sample(self, x, num_samples):
            return loc + torch.randn(num_samples, 2, dtype=torch.float64)

        def log_prob(self, z, x):
            return torch.distributions.Normal(loc, 1.0).log_prob(z).sum(-1)

    log_p, log_q = compute_log_weights([Learnable(), Learnable()], log_joint, None, num_samples=3)
    assert not log_p.requires_grad and not log_q.requires_grad


# ----------------------------------------------------------------------------- bad member output

class Broken(PoolMember):
    def __init__(self, fault, batch):
        super().__init__(0.0, 10, batch)
        self.fault = fault

    def sample(self, x, num_samples):
        z = super().sample(x, num_samples)
        if self.fault == "sample_count":
            return z[:-1]
        if self.fault == "sample_event":
            return torch.cat([z, z], dim=-1)
        if self.fault == "sample_type":
            return z.tolist()
        return z

    def log_prob(self, z, x):
        value = super().log_prob(z, x)
        if self.fault == "log_prob_shape":
            return value[..., None]
        if self.fault == "log_prob_nan":
            return value + math.nan
        return value


@pytest.mark.parametrize(
    "fault,message",
    [
        ("sample_count", r"member 1: sample\(x, 3\) returned \(2, 2, 2\)"),
        ("sample_event", r"member 1: sample returned event shape \(4,\), earlier members returned \(2,\)"),
        ("sample_type", r"member 1: sample\(x, 3\) returned list"),
        (
            "log_prob_shape",
            r"member 1: log_prob \(on samples of member 0\) returned \(3, 2, 1\); expected shape \(3, 2\)",
        ),
        ("log_prob_nan", r"member\(s\) \[1\]: log_prob returned NaN"),
    ],
)
def test_bad_member_output_names_the_member(fault, message):
    x = torch.zeros(2, dtype=torch.float64)
    members = [PoolMember(0.0, 10, 2), Broken(fault, 2), PoolMember(1.0, 10, 2)]
    with pytest.raises(ValueError, match=message):
        compute_log_weights(members, log_joint, x, num_samples=3)


def test_bad_log_joint_and_arguments():
    members = make_members(batch=None)
    with pytest.raises(ValueError, match=r"log_joint \(on samples of member 0\) returned \(3, 1\)"):
        compute_log_weights(members, lambda x, z: log_joint(x, z)[:, None], None, num_samples=3)
    with pytest.raises(ValueError, match="log_joint returned NaN"):
        compute_log_weights(members, lambda x, z: log_joint(x, z) * math.nan, None, num_samples=3)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1; got 0"):
        compute_log_weights(members, log_joint, None, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1; got 0"):
        compute_log_weights(members, log_joint, None, num_samples=2, chunk_size=0)
    with pytest.raises(ValueError, match="at least one member"):
        compute_log_weights([], log_joint, None, num_samples=2)
    with pytest.raises(ValueError, match="batch dimension first"):
        compute_log_weights(members, log_joint, torch.tensor(1.0), num_samples=2)


# ----------------------------------------------------------------------------- sources (S2A cost saving)

def test_sources_sample_only_from_the_subset_and_feed_some_to_all():
    from miselbo import estimators as est

    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    requests = []

    class Counting(PoolMember):
        def sample(self, x, num_samples):
            requests.append(self.loc)
            return super().sample(x, num_samples)

    full = compute_log_weights(make_members(batch=2, num=4), log_joint, x, num_samples=5)
    members = [Counting(float(s), 12, 2, seed=s) for s in range(4)]
    partial = compute_log_weights(members, log_joint, x, num_samples=5, chunk_size=2, sources=[3, 1])
    assert sorted(set(requests)) == [1.0, 3.0]  # members 0 and 2 never sampled
    assert partial.log_p[:, [0, 2]].isnan().all() and partial.log_q[:, [0, 2]].isnan().all()
    torch.testing.assert_close(partial.log_q[:, [1, 3]], full.log_q[:, [1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(
        est.some_to_all(*partial, [1, 3]), est.some_to_all(*full, [1, 3]), rtol=0, atol=0
    )


@pytest.mark.parametrize("sources", [[], [0, 0], [4], [-1]])
def test_bad_sources_raise(sources):
    with pytest.raises(ValueError, match=r"sources must be distinct member indices in \[0, S = 3\)"):
        compute_log_weights(make_members(batch=None), log_joint, None, num_samples=2, sources=sources)


# ----------------------------------------------------------------------------- the compute-matched baseline

def _f64(value):
    return torch.as_tensor(value, dtype=torch.float64)


class LinearGaussian:
    """z ~ N(0, I_2), x | z ~ N(z, noise^2 I_2): log p(x) = log N(x; 0, (1 + noise^2) I_2) is known."""

    noise = 0.5

    def log_joint(self, x, z):  # x [B, 2], z [n, B, 2] -> [n, B]
        prior = torch.distributions.Normal(_f64(0.0), _f64(1.0)).log_prob(z).sum(-1)
        return prior + torch.distributions.Normal(z, _f64(self.noise)).log_prob(x).sum(-1)

    def log_evidence(self, x):  # [B]
        return torch.distributions.Normal(_f64(0.0), _f64(math.sqrt(1 + self.noise ** 2))).log_prob(x).sum(-1)

    def posterior(self, x):
        precision = 1 + 1 / self.noise ** 2
        return torch.distributions.Normal(x / self.noise ** 2 / precision, _f64(math.sqrt(1 / precision)))


class PoolProposal:
    """An amortized Gaussian q(z | x) = N(posterior mean + shift, scale) handing out a pre-drawn pool."""

    def __init__(self, model, x, shift, scale, total, seed):
        self.distribution = torch.distributions.Normal(model.posterior(x).mean + shift, _f64(scale))  # [B, 2]
        self.pool = self.distribution.sample((total,)) if seed is None else \
            self.distribution.mean + scale * torch.randn(total, *x.shape, generator=torch.Generator().manual_seed(seed),
                                                         dtype=torch.float64)
        self.cursor = 0

    def sample(self, x, num_samples):
        z = self.pool[self.cursor:self.cursor + num_samples]
        self.cursor += num_samples
        return z

    def log_prob(self, z, x):
        return self.distribution.log_prob(z).sum(-1)


def test_matched_baseline_is_the_iwelbo_of_the_first_S_L_own_samples():
    from miselbo import estimators as est
    from miselbo.estimators.generic import compute_own_log_weights

    model = LinearGaussian()
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)  # B = 2
    S, L = 3, 5
    members = [PoolProposal(model, x, 0.4 * s - 0.3, 0.5 + 0.2 * s, S * L, seed=s) for s in range(S)]
    log_p, log_q = compute_log_weights(members, model.log_joint, x, num_samples=L, chunk_size=2)
    own = log_p - torch.diagonal(log_q, dim1=-3, dim2=-1).transpose(-1, -2)  # [B, S, L]
    extra = compute_own_log_weights(members, model.log_joint, x, num_samples=(S - 1) * L, chunk_size=4)
    matched = est.iwelbo_from_log_weights(torch.cat([own, extra], dim=-1))  # [B, S]
    for s, member in enumerate(members):  # independently: the first S L draws of the pool, one loop
        log_w = [model.log_joint(x, z[None])[0] - member.log_prob(z[None], x)[0] for z in member.pool[:S * L]]
        independent = torch.logsumexp(torch.stack(log_w), dim=0) - math.log(S * L)  # [B]
        torch.testing.assert_close(matched[:, s], independent, rtol=1e-12, atol=1e-12)


def test_matched_baseline_of_the_exact_posterior_is_log_evidence():
    """Every importance weight of the exact posterior equals p(x), so its IWELBO is log p(x) exactly."""
    from miselbo import estimators as est
    from miselbo.estimators.generic import compute_own_log_weights

    model = LinearGaussian()
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    exact = PoolProposal(model, x, 0.0, model.posterior(x).stddev, 40, seed=1)
    off = PoolProposal(model, x, 0.8, 0.7, 40, seed=2)
    matched = est.iwelbo_from_log_weights(compute_own_log_weights([exact, off], model.log_joint, x, 40))
    torch.testing.assert_close(matched[:, 0], model.log_evidence(x), rtol=0, atol=1e-12)
    assert ((matched[:, 1] - model.log_evidence(x)).abs() > 1e-3).all()  # a wrong proposal is not exact
    with pytest.raises(ValueError, match="log_w must not contain NaN"):
        est.iwelbo_from_log_weights(torch.tensor([[0.0, math.nan]]))
