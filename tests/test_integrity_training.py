"""Real divergence during training: non-finite logits, KL, loss or gradients stop the step before
its update, name the step and the first non-finite place, and exit 3 without a traceback (no
distribution-validation ValueError reaches the user)."""
import subprocess
import sys

import pytest
import torch

from miselbo import training
from miselbo.storage.checkpoints import save_nvae_checkpoint
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer
from miselbo.training import loop
from miselbo.training.nonfinite import locate_forward
from miselbo.runtime.distribution_checks import no_distribution_validation
from miselbo.training.objective import RegularisedLayers
from miselbo.training.options import build_parser
from miselbo.training.settings import TrainSettings
from miselbo.training.stop import NonFiniteLoss, StepGuard, StopRequests
from test_train_common import REPO_ROOT, TINY_ARCH, one_thread, quiet_env, run_args  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _parts():
    argv = TINY_ARCH + ["--warmup_epochs", "0", "--kl_anneal_portion", "0", "--kl_const_portion", "0"]
    args = build_parser().parse_args(argv)
    args.dataset = "mnist"
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    parts = loop.StepParts(model=model, optimizer=build_optimizer(model.parameters(), 1e-2, 3e-4, False),
                           grad_scaler=torch.amp.GradScaler("cpu", enabled=False),
                           trainable=list(model.parameters()),
                           alpha=kl_balance_alpha(model.groups_per_scale), layers=None,
                           settings=TrainSettings.from_args(args), iterations_per_epoch=10,
                           device=torch.device("cpu"))
    return args, model, parts


def _batch():
    return (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)) < 0.3).float()


def _snapshot(model):
    """Parameters only (train-mode batch norm updates its running statistics in any forward)."""
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def _guard():
    return StepGuard(StopRequests(announce=False), torch.device("cpu"))


def test_nan_decoder_weight_is_named_and_no_validation_error_escapes():
    _, model, parts = _parts()
    name = next(name for name, _ in model.named_parameters() if name.startswith("post_process."))
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")
    before = _snapshot(model)
    model.train()
    with no_distribution_validation(), pytest.raises(NonFiniteLoss) as caught:
        loop.train_step(parts, _batch(), 7, _guard())
    assert caught.value.global_step == 7
    assert f"parameter {name}" in caught.value.first_place
    after = _snapshot(model)
    assert all(torch.equal(before[key], after[key]) or torch.isnan(before[key]).any()
               for key in before)  # nothing updated (the NaN tensor never equals itself)


def test_finite_but_huge_output_bias_is_located_at_the_output():
    """All weights finite (3e38 fits in float32), the output overflows: the place named is the
    decoder output or the reconstruction term computed from it, never the weights."""
    _, model, parts = _parts()
    name = next(name for name, _ in model.named_parameters()
                if name.startswith("image_conditional.") and name.endswith("bias"))
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(3e38)
    model.train()
    with no_distribution_validation(), pytest.raises(NonFiniteLoss) as caught:
        loop.train_step(parts, _batch(), 0, _guard())
    assert caught.value.first_place in ("the decoder's output logits",
                                        "the reconstruction term"), caught.value.first_place


def test_nonfinite_kl_group_is_named(monkeypatch):
    _, model, parts = _parts()
    real_loss = loop.nelbo_loss

    def kl_of_group_1_nan(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        terms.kl_per_group[1] = float("inf")
        terms.loss = terms.loss + terms.kl_per_group[1]
        return terms
    monkeypatch.setattr(loop, "nelbo_loss", kl_of_group_1_nan)
    with pytest.raises(NonFiniteLoss) as caught:
        loop.train_step(parts, _batch(), 3, _guard())
    assert caught.value.first_place == "the KL term of latent group 1"


def test_nonfinite_gradient_stops_before_the_update_naming_the_parameter():
    _, model, parts = _parts()
    name, parameter = next((n, p) for n, p in model.named_parameters() if n.startswith("enc_tower."))
    parameter.register_hook(lambda grad: grad * float("nan"))
    before = _snapshot(model)
    model.train()
    with pytest.raises(NonFiniteLoss) as caught:
        loop.train_step(parts, _batch(), 5, _guard())
    assert caught.value.first_place == f"the gradient of parameter {name}"
    assert "gradient norm" in str(caught.value)
    after = _snapshot(model)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == []  # no parameter was updated


def test_finite_step_is_located_nowhere():
    """locate_forward on a healthy step still returns a place (the loss): it is only asked when
    the loss is non-finite, and says so when every term is finite."""
    _, model, parts = _parts()
    terms = loop.nelbo_loss(model, _batch(), 1.0, parts.alpha, 0.0, None)
    assert locate_forward(model, terms).startswith("the loss")


@pytest.mark.slow
def test_learning_rate_30_exits_3_with_the_message_and_no_traceback(tmp_path):
    argv = [*run_args(tmp_path, "lr30"), "--epochs", "1", "--num_train_examples", "256",
            "--learning_rate", "30", "--warmup_epochs", "0"]
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *argv], cwd=REPO_ROOT,
                               env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 3, completed.stderr[-3000:]
    err = completed.stderr
    assert "Traceback" not in err and "ValueError" not in err and "tensor(" not in err, err[-3000:]
    assert "training stopped: the loss is nan at global step" in err, err
    assert "the first value that went non-finite:" in err, err


def test_parent_with_nan_decoder_weights_is_refused_exit_2(tmp_path, capsys):
    """A parent checkpoint whose decoder holds NaN is refused before anything is built."""
    args = build_parser().parse_args(TINY_ARCH)
    from miselbo.training.options import to_nvae_namespace
    nvae_args = to_nvae_namespace(args)
    model = AutoEncoder(nvae_args, None, get_arch_cells(nvae_args.arch_instance))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("post_process.")).fill_(float("nan"))
    parent = save_nvae_checkpoint(tmp_path / "parent.pt", model, nvae_args)
    argv = [*run_args(tmp_path, "child"), "--train_new_q", "--p_and_q1_path", str(parent)]
    status = training.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "NaN/inf" in err and "post_process." in err, err


@pytest.mark.slow
def test_sigterm_during_the_final_test_is_answered_within_seconds(tmp_path):
    """The final test with 20,000 importance samples takes minutes on 2 cores; SIGTERM sent one
    second into it stops the run within 20 s even on a loaded machine (exit 143) and keeps the finished checkpoint."""
    import signal
    import time
    from miselbo.storage.checkpoints import read_checkpoint
    from test_train_common import run_train_script
    argv = [*run_args(tmp_path, "final"), "--epochs", "1", "--final_iw_samples", "20000"]
    process = run_train_script(argv)
    for line in process.stdout:  # the log line written just before the final test starts
        if "checkpoint written" in line:
            break
    else:
        pytest.fail(process.communicate()[1])
    time.sleep(1.0)
    assert process.poll() is None, "the final test ended too soon to be interrupted"
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    answered = time.monotonic() - sent
    assert process.returncode == 128 + signal.SIGTERM, err
    assert answered < 20.0, answered  # about 1 s on a quiet machine; generous under load
    assert "during the final test" in err and "Traceback" not in err, err
    checkpoint = read_checkpoint(tmp_path / "eval-final")
    assert checkpoint["epoch"] == 1


def test_resume_point_beyond_this_runs_epoch_is_refused_not_a_traceback(tmp_path, capsys):
    """Found by trying to break it: a mid-epoch checkpoint resumed with a larger --batch_size
    (fewer steps per epoch) made the loader skip past its end (StopIteration traceback)."""
    from miselbo.storage.checkpoints import read_checkpoint
    from miselbo.storage.safe_io import atomic_torch_save
    argv = run_args(tmp_path, "resume", "--epochs", "2")
    assert training.main(argv) == 0
    path = tmp_path / "eval-resume" / "checkpoint.pt"
    checkpoint = read_checkpoint(path)
    checkpoint["epoch"], checkpoint["global_step"] = 1, 4 + 3
    checkpoint["miselbo"]["resume"]["step_in_epoch"] = 3  # a SIGTERM after step 3 of epoch 2
    atomic_torch_save(checkpoint, path)
    capsys.readouterr()
    status = training.main(argv + ["--cont_training", "--batch_size", "32"])  # 2 steps per epoch
    err = capsys.readouterr().err
    assert status == 2 and "written at step 3 of epoch 2" in err and "only 2 step(s)" in err, err
    assert "Traceback" not in err
