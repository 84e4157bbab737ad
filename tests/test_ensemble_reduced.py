"""Ensemble.reduced_weights (memory linear in S) against the full log_p / log_q tensors of
Ensemble.log_weights (themselves tested against naive full passes in test_ensemble.py): the same
numbers for the same draws, the matched baseline's extra draws, active subsets (S2A / S2S) with
their exact special cases and their unbiasedness over many seeds, and the stacked heads following
weight changes."""
import itertools
import math

import pytest
import torch

from ensemble_helpers import binary_batch, make_members, one_torch_thread  # noqa: F401
from miselbo import estimators as est
from miselbo.ensemble.log_weights import Ensemble
from miselbo.evaluation.report import ValuePlan

CONFIGS = {"bernoulli_res_dist": {}, "one_flow": dict(num_nf=1)}
ROUND_OFF = dict(rtol=1e-12, atol=1e-10)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reductions_equal_the_full_tensors(name):
    _, members = make_members(3, seed=30, **CONFIGS[name])
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=3)
    full = ensemble.log_weights(x, 4, _generator(1), chunk_size=3)
    active = _mask([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    reduced = ensemble.reduced_weights(x, 4, _generator(1), chunk_size=3, active=active, prefix_sizes=(1, 2, 3),
                                       sample_only_active=False)
    assert torch.equal(reduced.log_p, full.log_p)
    torch.testing.assert_close(reduced.log_q_own, torch.diagonal(full.log_q, dim1=1, dim2=3).transpose(1, 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(reduced.log_q_mix, est.log_mixture_density(full.log_q), **ROUND_OFF)
    for size in (1, 2, 3):
        expected = est.log_mixture_density(full.log_q[:, :size, :, :size])
        torch.testing.assert_close(reduced.log_q_mix_prefix[size], expected, **ROUND_OFF)
    for row in range(3):  # the subset mixture by a loop over the subset's columns
        columns = active[row].nonzero().flatten()
        expected = torch.logsumexp(full.log_q[row][..., columns], dim=-1) - math.log(len(columns))
        torch.testing.assert_close(reduced.log_q_mix_active[row], expected, **ROUND_OFF)
    if members[0].with_nf:
        assert 0.0 < reduced.max_flow_residual == full.max_flow_residual < 1e-4
        assert reduced.flow_residual_at == full.flow_residual_at


def test_plan_values_equal_the_full_tensor_estimators():
    _, members = make_members(3, seed=31)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=4)
    full = ensemble.log_weights(x, 5, _generator(2), chunk_size=2)
    plan = ValuePlan(("miselbo", "pooled", "avg_iwelbo", "iwelbo", "avg_elbo", "jsd"), 3,
                     ablation_sizes=(2, 3), ablation_samples=(1, 5))
    reduced = ensemble.reduced_weights(x, 5, _generator(2), chunk_size=2, prefix_sizes=plan.ablation_sizes)
    rows = plan.per_example(reduced)
    column = {key: index for index, key in enumerate(plan.columns())}
    expected = {"miselbo": est.miselbo, "pooled": est.pooled_mis_bound, "avg_iwelbo": est.average_iwelbo,
                "avg_elbo": est.average_elbo, "jsd": lambda p, q: est.jsd(q)}
    for name, function in expected.items():
        torch.testing.assert_close(rows[:, column[("bound", name)]], function(full.log_p, full.log_q), **ROUND_OFF)
        for size, samples in itertools.product((2, 3), (1, 5)):
            sub = function(full.log_p[:, :size, :samples], full.log_q[:, :size, :samples, :size])
            torch.testing.assert_close(rows[:, column[("ablation", size, samples, name)]], sub, **ROUND_OFF)
    iwelbo = est.iwelbo(full.log_p, full.log_q)
    for member in range(3):
        torch.testing.assert_close(rows[:, column[("member", member)]], iwelbo[:, member], **ROUND_OFF)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matched_draws_are_each_members_own_importance_weights(name):
    """The extra draws equal those of single-member ensembles fed the same generator afterwards."""
    _, members = make_members(3, seed=32, **CONFIGS[name])
    x = binary_batch(members[0], batch=2)
    reduced = Ensemble(members).reduced_weights(x, 3, _generator(5), chunk_size=2, extra_own_samples=6)
    generator = _generator(5)
    Ensemble(members).log_weights(x, 3, generator, chunk_size=2)  # the same main draws
    for source, member in enumerate(members):
        alone = Ensemble([member]).log_weights(x, 6, generator, chunk_size=2)
        expected = alone.log_p[:, 0] - alone.log_q[:, 0, :, 0]  # [B, 6]
        torch.testing.assert_close(reduced.log_w_own_extra[:, source], expected, rtol=1e-6, atol=1e-4)
    assert reduced.log_w_own_extra.shape == (2, 3, 6)


def test_active_subsets_sample_only_their_members():
    _, members = make_members(4, seed=33)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=3)
    active = _mask([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    reduced = ensemble.reduced_weights(x, 3, _generator(3), active=active)
    assert torch.equal(torch.isfinite(reduced.log_p).all(dim=-1), active)
    assert torch.isnan(reduced.log_p[~active]).all()
    plan = ValuePlan(("s2a", "s2s"), 4, subset_size=2)
    rows = plan.per_example(reduced)
    assert plan.active_only and rows.shape == (3, 2) and torch.isfinite(rows).all()
    assert (rows[:, 0] >= rows[:, 1] - 2 * math.log(2)).all()  # s2a's mixture has at most 2x fewer members
    with pytest.raises(ValueError, match="at least one active member"):
        ensemble.reduced_weights(x, 2, active=_mask([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="extra_own_samples needs every member sampled"):
        ensemble.reduced_weights(x, 2, active=active, extra_own_samples=2)


def test_all_members_active_gives_miselbo_and_one_member_s2s_its_iwelbo():
    _, members = make_members(3, seed=34, num_nf=1)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=2)
    full = ensemble.log_weights(x, 4, _generator(4), chunk_size=2)
    everyone = ensemble.reduced_weights(x, 4, _generator(4), chunk_size=2, active=torch.ones(2, 3, dtype=torch.bool))
    rows = ValuePlan(("s2a", "s2s"), 3, subset_size=3).per_example(everyone)
    miselbo = est.miselbo(full.log_p, full.log_q)
    torch.testing.assert_close(rows[:, 0], miselbo, **ROUND_OFF)
    torch.testing.assert_close(rows[:, 1], miselbo, **ROUND_OFF)
    one = _mask([[0, 1, 0], [0, 0, 1]])
    single = ensemble.reduced_weights(x, 4, _generator(4), chunk_size=2, active=one, sample_only_active=False)
    plan = ValuePlan(("miselbo", "s2s"), 3, subset_size=1)
    rows = plan.per_example(single)
    iwelbo = est.iwelbo(full.log_p, full.log_q)
    s2s = rows[:, plan.columns().index(("bound", "s2s"))]
    torch.testing.assert_close(s2s, torch.stack([iwelbo[0, 1], iwelbo[1, 2]]), **ROUND_OFF)


def _random_subsets(batch, num_members, num_active, generator):
    active = torch.zeros(batch, num_members, dtype=torch.bool)
    for row in range(batch):
        active[row, torch.randperm(num_members, generator=generator)[:num_active]] = True
    return active


@pytest.mark.slow
def test_s2a_is_unbiased_for_miselbo_and_s2s_for_the_average_subset_miselbo():
    """Over many seeds, on a real (tiny, random-weight) ensemble of S = 4 with A = 2: mean S2A =
    mean A2A MISELBO, and mean S2S = the average over all 6 subsets of their MISELBO, within 3 se."""
    num_members, num_active, seeds = 4, 2, 300
    _, members = make_members(num_members, seed=35)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=2)
    plan = ValuePlan(("s2a", "s2s"), num_members, subset_size=num_active)
    s2a, s2s, a2a, subset_average = [], [], [], []
    pairs = list(itertools.combinations(range(num_members), num_active))
    for seed in range(seeds):
        active = _random_subsets(2, num_members, num_active, _generator(10_000 + seed))
        rows = plan.per_example(ensemble.reduced_weights(x, 2, _generator(seed), active=active))
        s2a.append(rows[:, 0])
        s2s.append(rows[:, 1])
        full = ensemble.log_weights(x, 2, _generator(50_000 + seed))
        a2a.append(est.miselbo(full.log_p, full.log_q))
        subset_average.append(torch.stack([est.some_to_some(full.log_p, full.log_q, list(pair))
                                           for pair in pairs]).mean(dim=0))
    for estimate, target in ((s2a, a2a), (s2s, subset_average)):
        estimate, target = torch.stack(estimate), torch.stack(target)  # [seeds, B]
        gap = estimate.mean(0) - target.mean(0)
        stderr = torch.sqrt(estimate.var(0) / seeds + target.var(0) / seeds)
        assert (gap.abs() < 3 * stderr).all(), (gap, stderr)
    # the test has power: s2s's target is clearly below MISELBO's on this ensemble
    assert (torch.stack(a2a).mean(0) - torch.stack(subset_average).mean(0) > 0.05).all()


def test_stacked_heads_follow_weight_changes():
    """Changing a member's head weights after construction (in place or by load_state_dict) is
    picked up: the results equal those of a freshly built Ensemble."""
    _, members = make_members(2, seed=36)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=2)
    before = ensemble.log_weights(x, 2, _generator(0))
    with torch.no_grad():
        members[1].enc_sampler[1].log_weight_norm.add_(0.5)  # in place (the weight's direction is normalised)
    changed = ensemble.log_weights(x, 2, _generator(0))
    fresh = Ensemble(members).log_weights(x, 2, _generator(0))
    assert not torch.allclose(changed.log_q, before.log_q)
    assert torch.equal(changed.log_q, fresh.log_q)
    state = {key: value.clone() for key, value in members[0].state_dict().items()}
    state["enc_sampler.1.log_weight_norm"] = state["enc_sampler.1.log_weight_norm"] - 0.7
    members[0].load_state_dict(state)
    reloaded = ensemble.log_weights(x, 2, _generator(0)).log_q
    assert not torch.allclose(reloaded, changed.log_q)
    assert torch.equal(reloaded, Ensemble(members).log_weights(x, 2, _generator(0)).log_q)


def test_channels_last_layout_gives_the_same_weights():
    """use_fast_cpu_layout (evaluation on CPU) changes only the float rounding of every weight."""
    from miselbo.runtime.cpu_layout import use_fast_cpu_layout
    _args, models = make_members(3, seed=5, num_channels_enc=8, num_channels_dec=8)
    x = binary_batch(models[0], 4)
    default = Ensemble(models).reduced_weights(x, 3, torch.Generator().manual_seed(1), 2, extra_own_samples=3)
    use_fast_cpu_layout(models)
    assert models[0].stem.weight.is_contiguous(memory_format=torch.channels_last)
    converted = Ensemble(models).reduced_weights(x, 3, torch.Generator().manual_seed(1), 2, extra_own_samples=3)
    for name in ("log_p", "log_q_own", "log_q_mix", "log_w_own_extra"):
        assert torch.allclose(getattr(converted, name), getattr(default, name), rtol=0, atol=1e-3), name
