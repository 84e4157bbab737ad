"""A diverging run never writes a non-finite checkpoint over a good one: the guard before every save
looks at parameters, buffers (batch-norm statistics) and optimizer state, stops with exit 3, and
points to the last good checkpoint, from which --cont_training resumes."""
import math

import pytest
import torch

from miselbo.storage.checkpoints import read_checkpoint
from miselbo.training.nonfinite import first_nonfinite_state
from test_train_common import run_args, run_train_script

EXIT_TRAINING_FAILED = 3


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    optimizer = torch.optim.Adamax(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 5, 5)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_finite_state_is_finite():
    model, optimizer = _model_and_optimizer()
    assert first_nonfinite_state(model, optimizer) is None


@pytest.mark.parametrize("spoil, expected", [
    (lambda m, o: m[0].weight.data.fill_(math.nan), "parameter 0.weight"),
    (lambda m, o: m[1].running_var.fill_(math.inf), "buffer 1.running_var"),
    (lambda m, o: o.state[m[1].bias]["exp_inf"].fill_(-math.inf), "optimizer state 'exp_inf' of parameter 1.bias"),
])
def test_the_first_nonfinite_tensor_is_named(spoil, expected):
    model, optimizer = _model_and_optimizer()
    spoil(model, optimizer)
    assert first_nonfinite_state(model, optimizer) == expected
    if not expected.startswith("optimizer"):
        assert first_nonfinite_state(model) == expected  # without an optimizer: the model alone


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint_and_it_resumes(tmp_path):
    """--learning_rate 30 on the tiny model: the batch-norm statistics blow up during epoch 2."""
    diverging = run_args(tmp_path, "div", "--epochs", "3", "--learning_rate", "30")
    process = run_train_script(diverging)
    _, err = process.communicate(timeout=240)
    assert process.returncode == EXIT_TRAINING_FAILED, err
    checkpoint_path = tmp_path / "eval-div" / "checkpoint.pt"
    message = err.strip().splitlines()
    assert any("is not finite, so no checkpoint was written" in line for line in message), err
    assert any(f"The last good checkpoint, {checkpoint_path} (1 epoch(s)" in line for line in message), err
    kept = read_checkpoint(checkpoint_path)  # refused with a CheckpointError if anything were non-finite
    assert kept["epoch"] == 1
    resumed = run_args(tmp_path, "div", "--epochs", "2", "--learning_rate", "1e-3", "--cont_training")
    process = run_train_script(resumed)
    out, err = process.communicate(timeout=240)
    # the checkpoint is accepted and training goes on from it (the weights that epoch 1 reached at
    # --learning_rate 30 may still diverge: then the same guard stops it again, with exit 3)
    assert process.returncode in (0, EXIT_TRAINING_FAILED), err
    assert "resuming at epoch 2, global step 4" in out + err
    assert read_checkpoint(checkpoint_path)["epoch"] in (1, 2)


def test_a_resumed_schedule_follows_a_new_learning_rate():
    """Resuming with another --learning_rate keeps the position on the cosine between the new peak
    and minimum; with the recorded one the rate is left exactly as loaded."""
    from types import SimpleNamespace

    from miselbo.nvae.optim import build_scheduler
    from miselbo.training.session import follow_schedule_flags
    parameter = torch.nn.Parameter(torch.zeros(1))

    def scheduler_after(peak, steps):
        optimizer = torch.optim.Adamax([parameter], lr=peak)
        scheduler = build_scheduler(optimizer, epochs=10, warmup_epochs=1, min_lr=1e-4)
        for _ in range(steps):
            scheduler.step()
        return scheduler

    flags = SimpleNamespace(epochs=10, warmup_epochs=1, learning_rate=30.0, learning_rate_min=1e-4)
    same = scheduler_after(30.0, 3)
    loaded = same.optimizer.param_groups[0]["lr"]
    follow_schedule_flags(same, flags)
    assert same.optimizer.param_groups[0]["lr"] == loaded  # bit for bit
    lowered = scheduler_after(30.0, 3)
    follow_schedule_flags(lowered, SimpleNamespace(**{**vars(flags), "learning_rate": 1e-2}))
    reference = scheduler_after(1e-2, 3)  # a run that had 1e-2 from the start
    assert lowered.optimizer.param_groups[0]["lr"] == pytest.approx(reference.optimizer.param_groups[0]["lr"])
    lowered.step(), reference.step()
    assert lowered.optimizer.param_groups[0]["lr"] == pytest.approx(reference.optimizer.param_groups[0]["lr"])


def test_a_final_test_that_cannot_fit_is_refused_naming_the_largest_that_fits():
    from miselbo.errors import UserError
    from miselbo.training.options import require_test_fits
    available = 8 * 10**9
    with pytest.raises(UserError) as refused:
        require_test_fits(10**11, 16, available=available)
    message = str(refused.value)
    assert message.startswith("--final_iw_samples 100000000000:")
    largest = int(message.rsplit("fits is ", 1)[1].rstrip("."))
    require_test_fits(largest, 16, available=available)  # the value it names fits
    with pytest.raises(UserError):
        require_test_fits(largest + 1, 16, available=available)


def test_train_py_refuses_an_absurd_final_test_before_training(tmp_path):
    process = run_train_script(run_args(tmp_path, "huge", "--final_iw_samples", "100000000000"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "train.py: error: --final_iw_samples 100000000000: the final test would hold" in err
    assert "Traceback" not in err and not (tmp_path / "eval-huge").exists()
