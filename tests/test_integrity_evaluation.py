"""Evaluation with non-finite outputs stops with exit 3 naming the member's checkpoint (its weights
are finite, so the file itself passes validation), and writes nothing."""
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


def test_healthy_members_evaluate_finitely(members):
    good, _ = members
    settings = _settings([good, good])
    settings.allow_duplicate_members = True  # one healthy file twice, on purpose
    results = evaluate(settings, images=_images())
    assert results["S"] == 2


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
