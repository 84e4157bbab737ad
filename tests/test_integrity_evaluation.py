"""Evaluation with non-finite outputs stops with exit 3 naming the member's checkpoint (its weights
are finite, so the file itself passes validation), and writes nothing."""
import math

import pytest
import torch

from miselbo.evaluation import evaluate as evaluate_module
from miselbo.storage.checkpoints import save_nvae_checkpoint
from miselbo.evaluation.evaluate import EvalSettings, evaluate
from miselbo.evaluation.finite import NonFiniteEvaluation
from miselbo.nvae.config import default_nvae_args, get_arch_cells
from miselbo.nvae.model import AutoEncoder

TINY = dict(dataset="mnist", num_channels_enc=4, num_channels_dec=4, num_latent_scales=1,
            num_groups_per_scale=2, num_latent_per_group=2, num_preprocess_blocks=1,
            num_preprocess_cells=1, num_postprocess_blocks=1, num_postprocess_cells=1)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members sharing one decoder; the second's encoder stem bias is 3e38 (finite, but the
    encoder's batch norm then overflows to NaN)."""
    folder = tmp_path_factory.mktemp("members")
    args = default_nvae_args(**TINY)
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    good = save_nvae_checkpoint(folder / "good.pt", model, args)
    name = "stem.bias"
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(3e38)
    bad = save_nvae_checkpoint(folder / "overflowing.pt", model, args)
    return good, bad


def _settings(paths, save=None):
    return EvalSettings(checkpoints=[str(p) for p in paths], num_iw_samples=2, batch_size=4,
                        show_progress=False, save=save)


def _images():
    return (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(3)) < 0.3).float()


def test_member_with_overflowing_outputs_is_named(members, tmp_path):
    good, bad = members
    out = tmp_path / "results"
    with pytest.raises(NonFiniteEvaluation, match=r"member 2 \(.*overflowing.pt\)") as caught:
        evaluate(_settings([good, bad], save=str(out)), images=_images())
    assert caught.value.exit_code == 3
    assert not (out / "results.json").exists()


def _independent_log_weights(path, images, draws_per_example):
    """log w = log p(x | z) + log p(z) - log q(z | x) of the member in `path`, [N, draws], from
    NVAE's forward tuple (logits, log_q, log_p, ...) and a Bernoulli likelihood written out here
    (x l - softplus(l), summed over the central 28 x 28 pixels, as NVAE crops MNIST)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    args = payload["args"]
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    torch.manual_seed(11)
    x = images.repeat_interleave(draws_per_example, dim=0)
    with torch.no_grad():
        logits, log_q, log_p, _, _ = model(x)
    logits = logits.double()[..., 2:30, 2:30]
    pixels = x.double()[..., 2:30, 2:30]
    log_lik = (pixels * logits - torch.nn.functional.softplus(logits)).sum(dim=(1, 2, 3))
    return (log_lik + log_p.double() - log_q.double()).view(len(images), draws_per_example)


def test_healthy_members_evaluate_finitely(members):
    """One healthy member given twice (L = 8): the reported numbers against (a) what must hold draw by
    draw when both members are the same encoder (q_mix = q, so MISELBO = the members' average IWELBO
    and JSD = 0) and (b) the member's expected ELBO and 8-sample IWELBO computed independently from
    512 draws per example, within 5 standard errors of the difference."""
    good, _ = members
    samples_per_member = 8
    settings = _settings([good, good])
    settings.num_iw_samples = samples_per_member
    settings.allow_duplicate_members = True  # one healthy file twice, on purpose
    images = _images()
    results = evaluate(settings, images=images)
    assert results["S"] == 2 and results["L"] == samples_per_member and results["num_examples"] == len(images)
    values = results["estimators"]
    miselbo, avg_iwelbo, avg_elbo = (values[name]["mean"] for name in ("miselbo", "avg_iwelbo", "avg_elbo"))
    assert all(math.isfinite(value) for value in (miselbo, avg_iwelbo, avg_elbo))
    # (a) per draw, for two copies of one encoder
    assert values["jsd"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert miselbo == pytest.approx(avg_iwelbo, rel=1e-6)
    assert avg_iwelbo == pytest.approx(sum(results["iwelbo_per_member"]) / 2, rel=1e-9)
    assert values["pooled"]["mean"] >= miselbo - 1e-9  # logsumexp over 2L draws >= mean of two L-draw ones
    assert values["miselbo"]["nll_bpd"] == pytest.approx(-miselbo / (784 * math.log(2)), rel=1e-9)
    # (b) against an independent Monte Carlo computation of the same expectations
    draws = 512
    log_w = _independent_log_weights(good, images, draws)  # [8, 512]
    groups = log_w.view(len(images), draws // samples_per_member, samples_per_member)
    iwelbos = torch.logsumexp(groups, dim=-1) - math.log(samples_per_member)  # [8, 64]
    for reported, estimates, per_example in ((avg_elbo, log_w, 2 * samples_per_member), (avg_iwelbo, iwelbos, 2)):
        # reported: the mean over 8 examples of `per_example` independent draws of the estimator each
        variance = estimates.var(dim=1)  # per example, of one draw of the estimator
        reported_se = math.sqrt(float((variance / per_example).sum())) / len(images)
        independent_se = math.sqrt(float((variance / estimates.shape[1]).sum())) / len(images)
        independent = float(estimates.mean())
        tolerance = 5 * math.hypot(reported_se, independent_se)
        assert abs(reported - independent) < tolerance, (reported, independent, tolerance)


def test_cli_maps_the_failure_to_exit_3_without_traceback(monkeypatch, capsys, members):
    def failing(settings, images=None):
        raise NonFiniteEvaluation("member 1 (x.pt) gives non-finite log-weights")
    monkeypatch.setattr(evaluate_module, "evaluate", failing)
    status = evaluate_module.main(["--checkpoints", str(members[0])])
    err = capsys.readouterr().err
    assert status == 3 and "evaluation stopped: member 1 (x.pt)" in err and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_during_evaluation_exits_143_and_keeps_the_previous_outputs(tmp_path):
    """The shipped demo ensemble at 1,000 importance samples runs for minutes on CPU; SIGTERM one
    second after the run took its folder lock ends it within 20 s (loaded 2-core machine)."""
    import signal
    import subprocess
    import sys
    import time
    from miselbo.storage.run_lock import LOCK_FILE_NAME
    from test_train_common import REPO_ROOT, quiet_env
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}\n')
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "miselbo_eval.py"), "--checkpoints",
                                str(REPO_ROOT / "models" / "mnist5k_demo"), "--num_iw_samples", "1000",
                                "--save", str(out)], cwd=REPO_ROOT, env=quiet_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / LOCK_FILE_NAME).exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert time.monotonic() - sent < 20.0
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert (out / "results.json").read_text() == '{"previous": true}\n'
    assert not (out / LOCK_FILE_NAME).exists()
