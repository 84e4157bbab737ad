"""The cross-member scoring of `Ensemble`: the stacked heads, turned into Normal parameters in place,
against each member's own posterior_raw + Normal; the in-place density helpers against Normal bit
for bit; the normalised weights reused without gradients and refreshed when a parameter changes;
and the sections timer's exclusive accounting."""
import pytest
import torch

from ensemble_helpers import binary_batch, make_members, one_torch_thread  # noqa: F401
from miselbo.ensemble.log_weights import Ensemble, _repeat_rows
from miselbo.ensemble.sections import SectionTimer, section, timing
from miselbo.nvae.distributions import Normal, normal_parameters_, summed_log_density
from miselbo.nvae.flows import ARConv2d
from miselbo.nvae.layers import Conv2D


def _per_member_posterior(member, features, group, state, prior, count):
    """The previous path: member j's own posterior_raw on the decoder state, [n, B, L, h, w]."""
    repeated = features.__class__(_repeat_rows(features.top, count),
                                  [None if f is None else _repeat_rows(f, count) for f in features.bottom_up])
    raw = member.posterior_raw(group, repeated, state, prior)
    normal = Normal(raw.mu_raw, raw.log_sigma_raw)
    return normal.mu.view(count, -1, *normal.mu.shape[1:]), normal.sigma.view(count, -1, *normal.mu.shape[1:])


@pytest.mark.parametrize("res_dist", [True, False])
@pytest.mark.parametrize("columns", [None, [2, 0]])
def test_stacked_heads_equal_each_members_own_posterior(res_dist, columns):
    _, members = make_members(3, seed=40, res_dist=res_dist)
    ensemble = Ensemble(members)
    count, batch = 2, 3
    x = binary_batch(members[0], batch=batch)
    with torch.no_grad():
        ctx = ensemble._batch_context(x, count, None, False)
        generator = torch.Generator().manual_seed(0)
        for group in range(1, ensemble.num_groups):
            channels = ensemble._head_weights[group][0].shape[1]
            _, height, width = members[0].latent_shapes[group]
            state = torch.randn(count * batch, channels, height, width, generator=generator)  # [N, C_dec, h, w]
            prior = ensemble.decoder.prior_raw(group, state)
            stacked = ensemble._posterior_all(ctx, group, state, prior, count, columns)  # [n, B, C, L, h, w]
            for column, index in enumerate(columns or range(3)):
                mu, sigma = _per_member_posterior(members[index], ctx.features[index], group, state, prior, count)
                torch.testing.assert_close(stacked.mu[:, :, column], mu, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(stacked.sigma[:, :, column], sigma, rtol=1e-5, atol=1e-6)


def test_in_place_normal_helpers_equal_normal_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    raw = 4 * torch.randn(3, 2, 5, 8, 4, 4, generator=generator)  # [n, B, S, 2L, h, w]
    reference = Normal(*torch.chunk(raw, 2, dim=3))
    mu, sigma = normal_parameters_(raw.clone(), dim=3)
    assert torch.equal(mu, reference.mu) and torch.equal(sigma, reference.sigma)
    z = 2 * torch.randn(3, 2, 1, 4, 4, 4, generator=generator)  # broadcast over the members
    expected = reference.log_p(z).sum(dim=(3, 4, 5))  # [n, B, S]
    assert torch.equal(summed_log_density(mu, sigma, z, (3, 4, 5)), expected)


def test_reduced_and_full_log_weights_agree_after_the_in_place_heads():
    _, members = make_members(3, seed=41)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=2)
    full = ensemble.log_weights(x, 3, torch.Generator().manual_seed(2), chunk_size=2)
    again = ensemble.log_weights(x, 3, torch.Generator().manual_seed(2), chunk_size=2)
    assert torch.equal(full.log_q, again.log_q)  # the in-place work leaves no state behind
    reduced = ensemble.reduced_weights(x, 3, torch.Generator().manual_seed(2), chunk_size=2)
    assert torch.equal(reduced.log_p, full.log_p)
    assert torch.equal(reduced.log_q_own, torch.diagonal(full.log_q, dim1=1, dim2=3).transpose(1, 2))


def test_conv2d_reuses_its_normalised_weight_without_gradients_until_a_parameter_changes():
    conv = Conv2D(3, 4, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        conv(x)
        first = conv.weight_normalized
        conv(x)
        assert conv.weight_normalized is first  # not recomputed
        conv.log_weight_norm.add_(0.5)  # in place, as an optimizer step or load_state_dict
        out = conv(x)
        assert conv.weight_normalized is not first
        torch.testing.assert_close(conv.weight_normalized, conv.normalize_weight())
        torch.testing.assert_close(out, torch.nn.functional.conv2d(x, conv.normalize_weight(), conv.bias, padding=1))
    conv(x)  # with gradients: a fresh weight carrying the graph
    assert conv.weight_normalized.requires_grad


def test_arconv_reuses_its_normalised_weight_without_gradients_until_a_parameter_changes():
    conv = ARConv2d(4, 8, 3, padding=1, masked=True, zero_diag=True)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        conv(x)
        first = conv.weight_normalized
        conv(x)
        assert conv.weight_normalized is first
        conv.weight.mul_(2.0)
        conv.log_weight_norm.sub_(0.25)
        conv(x)
        assert conv.weight_normalized is not first
        torch.testing.assert_close(conv.weight_normalized, conv.normalized_weight())
    conv(x)
    assert conv.weight_normalized.requires_grad


def test_sections_charge_exclusive_time_and_count_units():
    ticks = iter(range(100))
    timer = SectionTimer(clock=lambda: float(next(ticks)))
    assert section("outside") is section("outside")  # inactive: one shared no-op context
    with timing(timer):
        with section("decoder", units=4):  # starts at 0
            with section("heads", units=12):  # 1 .. 2
                pass
            with section("heads", units=12):  # 3 .. 4
                pass
        # decoder ends at 5: its own time is (1 - 0) + (3 - 2) + (5 - 4)
    assert timer.seconds == {"decoder": 3.0, "heads": 2.0}
    assert timer.units == {"decoder": 4, "heads": 24} and timer.calls == {"decoder": 1, "heads": 2}
    assert section("after") is section("again")  # the timer is no longer active

