"""The efficient ensemble evaluator against independent computations: the naive S*S*L full forward
passes (with and without flows, Bernoulli and logistic-mixture outputs, the single-group model), NVAE's
own importance weights in tests/golden, the distribution of the draws, determinism, and the
checks on the members."""
import gc
import math
import weakref

import pytest
import torch

from conftest import golden_case_dir
from ensemble_helpers import binary_batch, build_model, make_members, one_torch_thread, tiny_args  # noqa: F401
from miselbo import estimators as est
from miselbo.storage.checkpoints import load_nvae_checkpoint
from miselbo.ensemble.log_weights import Ensemble, default_chunk_size
from miselbo.ensemble.naive import naive_log_weights
from miselbo.ensemble.shared_decoder import share_decoder, uses_shared_decoder
from miselbo.nvae.model import AutoEncoder

CONFIGS = {
    "bernoulli_res_dist": {},
    "one_flow": dict(num_nf=1),
    "two_flows_no_res_dist": dict(num_nf=2, res_dist=False),
    "cifar_logistic_mixture": dict(dataset="cifar10", num_mixture_dec=3),
    "single_group": dict(num_latent_scales=1, num_groups_per_scale=1),
}
SUMS = dict(rtol=1e-5, atol=1e-3)  # per-example sums in nats (the golden README's tolerance)


def _run(ensemble, x, num_samples, seed=0, **kwargs):
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return ensemble.log_weights(x, num_samples, generator, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_log_weights_equal_the_naive_full_passes(name, test_device):
    _, members = make_members(3, seed=10, **CONFIGS[name])
    members = [member.to(test_device) for member in members]
    x = binary_batch(members[0], batch=2).to(test_device)
    out = _run(Ensemble(members), x, num_samples=3, chunk_size=2, record_latents=True)
    assert out.log_p.shape == (2, 3, 3) and out.log_q.shape == (2, 3, 3, 3)
    assert out.log_p.dtype == out.log_q.dtype == torch.float64

    def check_post(group, reproduced, expected):
        torch.testing.assert_close(reproduced, expected, rtol=1e-4, atol=1e-5)

    log_p, log_q = naive_log_weights(members, x, out.latents_pre, check_post)
    torch.testing.assert_close(out.log_p.cpu(), log_p, **SUMS)
    torch.testing.assert_close(out.log_q.cpu(), log_q, **SUMS)
    # the members really differ, so a mix-up of columns would fail the comparison above
    assert (log_q[..., 0] - log_q[..., 1]).abs().max() > 1.0
    if members[0].with_nf:
        assert out.max_flow_residual < 1e-4
    else:
        assert out.max_flow_residual == 0.0
        torch.testing.assert_close(out.latents_post[0], out.latents_pre[0], rtol=0, atol=0)


def test_flows_round_trip_at_the_recorded_samples():
    _, members = make_members(2, seed=3, num_nf=2)
    x = binary_batch(members[0], batch=2)
    out = _run(Ensemble(members), x, num_samples=2, record_latents=True)
    with torch.no_grad():
        for group in range(members[0].num_groups):
            for source, member in enumerate(members):
                pre = out.latents_pre[group][:, source].flatten(0, 1)
                post = out.latents_post[group][:, source].flatten(0, 1)
                pushed, log_det = member.apply_flows(group, pre, None)
                torch.testing.assert_close(pushed, post, rtol=0, atol=1e-6)
                assert torch.all(log_det == 0)
                assert (post - pre).abs().max() > 1e-3  # the flows do move the sample
                for other in members:
                    inverted, residual = other.invert_flows(group, post)
                    assert residual < 1e-5
                    torch.testing.assert_close(other.apply_flows(group, inverted, None)[0], post, rtol=0, atol=1e-5)


def test_single_member_gives_the_iwelbo_of_independent_passes():
    _, members = make_members(1, seed=4)
    x = binary_batch(members[0], batch=3)
    out = _run(Ensemble(members), x, num_samples=6, chunk_size=4, record_latents=True)
    log_p, log_q = naive_log_weights(members, x, out.latents_pre)
    independent = torch.logsumexp(log_p[:, 0] - log_q[:, 0, :, 0], dim=1) - math.log(6)
    torch.testing.assert_close(est.iwelbo(out.log_p, out.log_q)[:, 0], independent, **SUMS)
    torch.testing.assert_close(est.miselbo(out.log_p, out.log_q), independent, **SUMS)


@pytest.mark.parametrize("case", ["mnist_small", "cifar_flows"])
def test_single_member_replays_nvae_importance_weights(case):
    """NVAE's own log w of K passes (golden iw/*) from our evaluator with the recorded draws."""
    folder = golden_case_dir(case)
    golden = torch.load(folder / "golden.pt", weights_only=True)
    model, _, _ = load_nvae_checkpoint(folder / "checkpoint.pt")
    latents = [z.transpose(0, 1).unsqueeze(1) for z in golden["iw/z_pre_flow"]]  # [B, 1, K, *shape]
    out = Ensemble([model]).log_weights(golden["x"], golden["iw/num_samples"], latents=latents)
    log_w = out.log_p[:, 0] - out.log_q[:, 0, :, 0]
    torch.testing.assert_close(log_w, golden["iw/log_iw"].double(), **SUMS)
    torch.testing.assert_close(est.iwelbo(out.log_p, out.log_q)[:, 0], golden["iw/log_px"].double(), **SUMS)


def test_draws_follow_each_members_own_posterior():
    """Group 0's posterior depends on x only: the draws' mean and std match member s's q_0."""
    _, members = make_members(2, seed=5)
    x = binary_batch(members[0], batch=1)
    num_samples = 600
    out = _run(Ensemble(members), x, num_samples, chunk_size=100, record_latents=True)
    with torch.no_grad():
        for source, member in enumerate(members):
            q0 = member.forward_detailed(x).groups[0].q
            draws = out.latents_pre[0][0, source]  # [L, *shape]
            stderr = q0.sigma[0] / math.sqrt(num_samples)
            assert ((draws.mean(0) - q0.mu[0]).abs() / stderr).max() < 5.5
            assert ((draws.std(0) / q0.sigma[0]) - 1).abs().max() < 0.15  # 5 standard errors
    assert (members[0].forward_detailed(x).groups[0].q.mu - members[1].forward_detailed(x).groups[0].q.mu
            ).abs().max() > 0.05  # the two members' posteriors differ, so a swapped source would fail


def test_seeded_runs_repeat_and_recorded_latents_replay():
    _, members = make_members(2, seed=6, num_nf=1)
    ensemble = Ensemble(members)
    x = binary_batch(members[0], batch=3)
    first = _run(ensemble, x, 5, seed=11, chunk_size=2, record_latents=True)
    again = _run(ensemble, x, 5, seed=11, chunk_size=2)
    other = _run(ensemble, x, 5, seed=12, chunk_size=2)
    assert torch.equal(first.log_p, again.log_p) and torch.equal(first.log_q, again.log_q)
    assert not torch.allclose(first.log_p, other.log_p)
    replay = ensemble.log_weights(x, 5, chunk_size=5, latents=first.latents_pre)
    torch.testing.assert_close(replay.log_p, first.log_p, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(replay.log_q, first.log_q, rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match=r"latents\[0\] must have shape"):
        ensemble.log_weights(x, 4, latents=first.latents_pre)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
            ensemble.log_weights(x, bad)


def test_default_chunk_size_follows_the_device_budget():
    assert default_chunk_size(16, 1000, torch.device("cpu")) == 2
    assert default_chunk_size(200, 1000, torch.device("cpu")) == 1
    assert default_chunk_size(4, 3, torch.device("cpu")) == 3
    assert default_chunk_size(16, 1000, torch.device("cuda")) == 128


def test_different_decoders_are_refused_unless_unchecked():
    args, members = make_members(2, seed=7)
    stranger = build_model(args, seed=99).eval()  # its own decoder
    with pytest.raises(ValueError, match="member 2's decoder differs"):
        Ensemble([members[0], stranger])
    x = binary_batch(members[0], batch=2)
    forced = _run(Ensemble([members[0], stranger], check_decoders=False), x, 3)
    share_decoder(members[0], stranger)
    shared = _run(Ensemble([members[0], stranger]), x, 3)
    assert torch.equal(forced.log_p, shared.log_p) and torch.equal(forced.log_q, shared.log_q)


def test_other_architectures_are_refused():
    _, members = make_members(1, seed=8)
    other = AutoEncoder(tiny_args(num_latent_per_group=3), None, members[0].arch_instance).eval()
    with pytest.raises(ValueError, match="num_latent_per_group: 2 vs 3"):
        Ensemble([members[0], other])
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_share_decoder_leaves_one_decoder_in_memory():
    _, members = make_members(3, seed=9)
    x = binary_batch(members[0], batch=2)
    with torch.no_grad():
        before = [member.encode_bottom_up(x).top for member in members]
    old_decoder = weakref.ref(members[1].dec_tower)
    for member in members[1:]:
        share_decoder(members[0], member)
    gc.collect()
    assert old_decoder() is None
    assert all(uses_shared_decoder(members[0], member) for member in members[1:])
    storages = {param.data_ptr() for member in members for param in member.parameters()}
    expected = len(members[0].decoder_parameters()) + sum(len(m.encoder_parameters()) for m in members)
    assert len(storages) == expected
    with torch.no_grad():
        for member, top in zip(members, before):
            assert torch.equal(member.encode_bottom_up(x).top, top)
