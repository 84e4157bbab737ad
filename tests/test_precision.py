"""train.py --precision: the flag per device, autocast steps with float32 master weights, the
GradScaler and the non-finite guard agreeing (skips are normal, limits stop the run with exit 3),
the scaler's state in and out of checkpoints, and the acceptance runs (a bf16 parent, its new
encoders with a bit-identical decoder, the precision in train_result.json).

The float16 tests run on the device MISELBO_TEST_DEVICE names (conftest.test_device): on CPU
through torch's CPU autocast and CPU GradScaler, on a GPU through the CUDA ones NVAE uses."""
import json
import math
import shutil

import pytest
import torch

from miselbo import training
from miselbo.errors import UserError
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.distributions import Normal
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer
from miselbo.training import loop, precision as precision_module, settings as settings_module
from miselbo.training.checkpointing import restore_training_state
from miselbo.training.objective import RegularisedLayers, nelbo_loss
from miselbo.training.options import LOCAL_FLAGS, build_parser
from miselbo.training.precision import Precision, default_precision, resolve_precision
from miselbo.training.settings import TrainSettings
from miselbo.training.stop import (GradientsKeepFailing, NonFiniteLoss, StepGuard, StopRequests,
                                   TrainingStopped)
import test_train_common
from test_train_common import TINY_ARCH, is_decoder, load_raw, run_args

one_thread = test_train_common.one_thread  # the fixture, for this module's tests
pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- the flag

def test_the_flag_parses_and_auto_is_nvae_on_cuda_and_float32_on_cpu():
    assert build_parser().parse_args([]).precision == "auto"
    assert build_parser().parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--precision", "fp8"])
    assert default_precision(CPU) == Precision("fp32", "cpu")
    assert resolve_precision("auto", torch.device("cuda")) == Precision("fp16", "cuda")
    cpu_fp32, cuda_fp16 = resolve_precision("auto", CPU), default_precision(torch.device("cuda:1"))
    assert (cpu_fp32.dtype, cpu_fp32.scaled, cpu_fp32.new_grad_scaler().is_enabled()) == (None, False, False)
    assert (cuda_fp16.dtype, cuda_fp16.scaled) == (torch.float16, True)
    assert Precision("bf16", "cpu").dtype == torch.bfloat16 and not Precision("bf16", "cpu").scaled
    scaler = Precision("fp16", "cpu").new_grad_scaler()  # NVAE's settings (docs/nvae.md 8.1, step 7)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 10
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()) == (
        2.0, 0.5, 2000)


def test_precision_is_not_inherited_like_device():
    assert "precision" in LOCAL_FLAGS and "device" in LOCAL_FLAGS


def test_a_precision_the_device_cannot_run_is_refused_naming_the_flag(monkeypatch, tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--precision fp16 cannot run on cuda: CUDA is not available"):
            resolve_precision("fp16", torch.device("cuda"))
    monkeypatch.setattr(precision_module.torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(UserError, match=r"--precision bf16 cannot run on cpu: this PyTorch has no "
                                        r"autocast for cpu\. Use --precision fp32"):
        resolve_precision("bf16", CPU)
    status = training.main(run_args(tmp_path, "refused", "--device", "cpu", "--precision", "bf16"))
    err = capsys.readouterr().err
    assert status == 2 and "--precision bf16 cannot run on cpu" in err and "Traceback" not in err
    assert not (tmp_path / "eval-refused").exists()  # refused before the folder was made


def test_the_probe_reports_what_fails(monkeypatch):
    def broken_conv(*args, **kwargs):
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'\nmore")

    precision_module.probe_failure.cache_clear()
    monkeypatch.setattr(precision_module.torch.nn.functional, "conv2d", broken_conv)
    try:
        reason = precision_module.unsupported_reason(Precision("fp16", "cpu"))
    finally:
        precision_module.probe_failure.cache_clear()
    assert reason == "RuntimeError: \"slow_conv2d_cpu\" not implemented for 'Half'"


# ----------------------------------------------------------------------------- one step

def _tiny_parts(device: torch.device, precision: Precision, scaler=None, seed: int = 0):
    args = build_parser().parse_args(TINY_ARCH + ["--warmup_epochs", "0", "--kl_anneal_portion", "0",
                                                  "--kl_const_portion", "0", "--weight_decay_norm", "1e-2"])
    args.dataset = "mnist"
    torch.manual_seed(seed)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance)).to(device).train()
    return loop.StepParts(model=model, optimizer=build_optimizer(model.parameters(), 1e-2, 3e-4, False),
                          grad_scaler=scaler or precision.new_grad_scaler(),
                          trainable=list(model.parameters()),
                          alpha=kl_balance_alpha(model.groups_per_scale, device=device),
                          layers=RegularisedLayers(), settings=TrainSettings.from_args(args),
                          iterations_per_epoch=100, device=device, precision=precision)


def _batch(device: torch.device, seed: int = 1) -> torch.Tensor:
    return (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) < 0.3).float().to(device)


def _guard(device: torch.device, **limits) -> StepGuard:
    return StepGuard(StopRequests(announce=False), device, **limits)


def _weights(model) -> dict:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_an_autocast_step_keeps_float32_weights_gradients_and_loss(name, test_device):
    precision = Precision(name, test_device.type)
    if precision_module.unsupported_reason(precision):
        pytest.skip(f"{name} cannot run on {test_device}")
    parts = _tiny_parts(test_device, precision, scaler=torch.amp.GradScaler(test_device.type, init_scale=4.0,
                                                                            enabled=precision.scaled))
    before = _weights(parts.model)
    terms = loop.train_step(parts, _batch(test_device), 3, _guard(test_device))
    assert terms.loss.dtype == torch.float32 and math.isfinite(float(terms.loss.detach()))
    assert terms.logits.dtype == precision.dtype  # the forward did run in reduced precision
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in parts.model.parameters() if p.grad is not None)
    assert any(not torch.equal(before[n], p) for n, p in parts.model.named_parameters())  # updated
    normalised = [m.weight_normalized for m in parts.model.modules() if hasattr(m, "weight_normalized")]
    assert normalised and all(w.dtype == torch.float32 for w in normalised)  # what the tests reuse


def test_reduced_precision_draws_the_float32_draws():
    """Posterior draws under autocast equal float32's and advance the generator alike."""
    mu, log_sigma = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    draws = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(11)
        z, eps = Normal(mu.to(dtype), log_sigma.to(dtype)).sample()
        draws[dtype] = (eps, torch.randn(3))
        assert eps.dtype == torch.float32 and z.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(draws[dtype][0], draws[torch.float32][0])
        assert torch.equal(draws[dtype][1], draws[torch.float32][1])


def test_bf16_loss_is_float32s_within_rounding_at_the_same_weights_and_draws():
    parts = _tiny_parts(CPU, Precision("bf16", "cpu"))
    x = _batch(CPU)
    model = parts.model
    model.eval()  # batch statistics aside, the same function twice
    losses = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(5)
        with Precision(name, "cpu").autocast():
            losses[name] = float(nelbo_loss(model, x, 0.5, parts.alpha, 0.01, parts.layers).loss.detach())
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < 2e-2 * abs(losses["fp32"]), losses


# ----------------------------------------------------------------------------- the guard and the scaler

def _inf_gradient_hook(parameter, steps: set, counter: dict):
    """Make `parameter`'s gradient infinite at the calls numbered in `steps` (0-based)."""
    def hook(grad):
        index = counter["calls"]
        counter["calls"] += 1
        return torch.full_like(grad, math.inf) if index in steps else grad
    return parameter.register_hook(hook)


def _fp16(device: torch.device, init_scale: float = 4.0) -> tuple[Precision, torch.amp.GradScaler]:
    precision = Precision("fp16", device.type)
    if precision_module.unsupported_reason(precision):
        pytest.skip(f"fp16 cannot run on {device}")
    # a small scale: the tiny model's own float16 gradients do not overflow at it
    return precision, torch.amp.GradScaler(device.type, init_scale=init_scale)


def test_fp16_step_with_an_inf_gradient_is_skipped_and_the_scale_halves(test_device):
    precision, scaler = _fp16(test_device)
    parts = _tiny_parts(test_device, precision, scaler)
    name, parameter = next(iter(parts.model.named_parameters()))
    _inf_gradient_hook(parameter, {0}, {"calls": 0})
    guard, x = _guard(test_device), _batch(test_device)
    before = _weights(parts.model)
    loop.train_step(parts, x, 0, guard)  # skipped: no exception, nothing updated
    assert all(torch.equal(before[n], p) for n, p in parts.model.named_parameters())
    assert scaler.get_scale() == 2.0 and guard.skipped_steps == 1 and guard.consecutive_skips == 1
    loop.train_step(parts, x, 1, guard)  # a clean step updates and ends the streak
    assert any(not torch.equal(before[n], p) for n, p in parts.model.named_parameters())
    assert scaler.get_scale() == 2.0 and guard.skipped_steps == 1 and guard.consecutive_skips == 0


def test_consecutive_skipped_steps_stop_naming_the_first_bad_gradient(test_device):
    precision, scaler = _fp16(test_device, init_scale=2.0 ** 10)
    parts = _tiny_parts(test_device, precision, scaler)
    name, parameter = next(iter(parts.model.named_parameters()))
    _inf_gradient_hook(parameter, set(range(100)), {"calls": 0})
    guard, x = _guard(test_device, max_consecutive_skips=4), _batch(test_device)
    before = _weights(parts.model)
    for step in range(3):
        loop.train_step(parts, x, 10 + step, guard)
    with pytest.raises(GradientsKeepFailing) as caught:
        loop.train_step(parts, x, 13, guard)
    assert isinstance(caught.value, NonFiniteLoss)  # the run stops as for a non-finite loss
    assert caught.value.global_step == 13 and scaler.get_scale() == 2.0 ** 6
    assert "not finite in 4 consecutive steps, global steps 10 to 13" in str(caught.value)
    assert "cut its scale from 1024 to 64; 4 in a row is the limit" in str(caught.value)
    assert caught.value.first_place == f"the gradient of parameter {name} (at global step 10)"
    assert all(torch.equal(before[n], p) for n, p in parts.model.named_parameters())


def test_a_scale_below_the_floor_stops_even_without_a_long_streak(test_device):
    precision, scaler = _fp16(test_device, init_scale=4.0)
    parts = _tiny_parts(test_device, precision, scaler)
    name, parameter = next(iter(parts.model.named_parameters()))
    _inf_gradient_hook(parameter, {0, 2, 4}, {"calls": 0})  # never two skips in a row
    guard, x = _guard(test_device, scale_floor=1.0), _batch(test_device)
    for step in range(4):
        loop.train_step(parts, x, step, guard)
    assert scaler.get_scale() == 1.0 and guard.skipped_steps == 2  # at the floor: still training
    with pytest.raises(GradientsKeepFailing) as caught:
        loop.train_step(parts, x, 4, guard)
    assert "the GradScaler's scale fell to 0.5 at global step 4, below the floor 1 (3 step(s) " \
           "skipped" in str(caught.value)
    assert caught.value.first_place == f"the gradient of parameter {name} (at global step 4)"


def test_the_default_limits_and_their_bookkeeping():
    guard = _guard(CPU)
    assert (guard.max_consecutive_skips, guard.scale_floor) == (16, 2.0 ** -14)
    assert (settings_module.MAX_CONSECUTIVE_SKIPPED_STEPS, settings_module.GRAD_SCALE_FLOOR) == (16, 2.0 ** -14)
    places = iter(f"place {i}" for i in range(100))
    scale = 2.0 ** 20
    assert not guard.check_scaler_step(scale, scale * 2, 0, lambda: next(places))  # growth: no skip
    for step in range(1, 16):
        assert guard.check_scaler_step(scale, scale / 2, step, lambda: next(places))
        scale /= 2
    with pytest.raises(GradientsKeepFailing, match="16 consecutive steps, global steps 1 to 16"):
        guard.check_scaler_step(scale, scale / 2, 16, lambda: next(places))
    guard = _guard(CPU)
    assert guard.check_scaler_step(2.0 ** -13, 2.0 ** -14, 5, lambda: "p")  # at the floor
    assert not guard.check_scaler_step(2.0 ** -14, 2.0 ** -14, 6, lambda: "p")  # streak over
    with pytest.raises(GradientsKeepFailing, match=r"fell to 3\.05176e-05 at global step 7, below the floor"):
        guard.check_scaler_step(2.0 ** -14, 2.0 ** -15, 7, lambda: "p")


def test_bf16_non_finite_gradient_stops_before_the_update_as_float32_does():
    parts = _tiny_parts(CPU, Precision("bf16", "cpu"))
    name, parameter = next(iter(parts.model.named_parameters()))
    _inf_gradient_hook(parameter, {0}, {"calls": 0})
    before = _weights(parts.model)
    with pytest.raises(NonFiniteLoss, match="the gradient norm is nan at global step 2") as caught:
        loop.train_step(parts, _batch(CPU), 2, _guard(CPU))
    assert caught.value.first_place == f"the gradient of parameter {name}"
    assert all(torch.equal(before[n], p) for n, p in parts.model.named_parameters())


# ----------------------------------------------------------------------------- runs: exit 3

def _fp16_run(tmp_path, save, *extra):
    return run_args(tmp_path, save, "--device", "cpu", "--precision", "fp16", *extra)


def _with_inf_gradients_at(monkeypatch, steps: set):
    """From the first training step on, the first parameter's gradient is infinite at `steps`."""
    real_loss, counter = loop.nelbo_loss, {"calls": 0, "hooked": False}

    def loss(model, *args, **kwargs):
        if not counter["hooked"]:
            counter["hooked"] = True
            counter["name"], parameter = next(iter(model.named_parameters()))
            _inf_gradient_hook(parameter, steps, counter)
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(loop, "nelbo_loss", loss)
    return counter


def test_fp16_run_with_a_nan_loss_stops_with_exit_3(tmp_path, monkeypatch):
    real_loss, calls = loop.nelbo_loss, {"count": 0}

    def loss_turning_nan(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls["count"] += 1
        if calls["count"] == 6:  # global step 5
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(loop, "nelbo_loss", loss_turning_nan)
    with pytest.raises(TrainingStopped) as stop:
        training.train(_fp16_run(tmp_path, "nan"))
    assert stop.value.exit_code == 3
    assert "the loss is nan at global step 5 (epoch 2, step 2 of 4)" in stop.value.message


def test_fp16_run_whose_gradients_stay_infinite_stops_with_exit_3(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "GRAD_SCALER_INIT_SCALE", 4.0)  # no overflow of its own
    monkeypatch.setattr(settings_module, "MAX_CONSECUTIVE_SKIPPED_STEPS", 3)
    counter = _with_inf_gradients_at(monkeypatch, set(range(4, 100)))
    with pytest.raises(TrainingStopped) as stop:
        training.train(_fp16_run(tmp_path, "inf", "--epochs", "3"))
    message = stop.value.message
    assert stop.value.exit_code == 3 and "global steps 4 to 6" in message, message
    assert f"the first value that went non-finite: the gradient of parameter {counter['name']} " \
           f"(at global step 4)" in message
    assert "no checkpoint was written" in message and "--cont_training" in message
    assert load_raw(tmp_path / "eval-inf" / "checkpoint.pt")["global_step"] == 4  # epoch 1's, kept


def test_fp16_run_whose_scale_erodes_below_the_floor_stops_with_exit_3(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "GRAD_SCALER_INIT_SCALE", 4.0)  # no overflow of its own
    monkeypatch.setattr(settings_module, "GRAD_SCALE_FLOOR", 1.0)
    counter = _with_inf_gradients_at(monkeypatch, {4, 6, 8})  # never two in a row
    with pytest.raises(TrainingStopped) as stop:
        training.train(_fp16_run(tmp_path, "floor", "--epochs", "3"))
    message = stop.value.message
    assert stop.value.exit_code == 3, message
    assert "scale fell to 0.5 at global step 8, below the floor 1 (3 step(s) skipped" in message
    assert f"the gradient of parameter {counter['name']} (at global step 8)" in message


# ----------------------------------------------------------------------------- the scaler's state

NVAE_SCALER_STATE = {"scale": 64.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                     "_growth_tracker": 7}


def _restored(precision: Precision):
    model = torch.nn.Linear(2, 2)
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), precision.new_grad_scaler()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    checkpoint = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "grad_scalar": dict(NVAE_SCALER_STATE)}
    restore_training_state(checkpoint, optimizer, scheduler, scaler, source=None)
    return scaler


def test_nvae_grad_scalar_state_is_restored_by_an_fp16_run_and_ignored_by_others(test_device):
    precision, _ = _fp16(test_device)
    assert _restored(precision).state_dict() == NVAE_SCALER_STATE
    for name in ("fp32", "bf16"):
        assert _restored(Precision(name, test_device.type)).state_dict() == {}


@pytest.fixture(scope="module")
def fp16_parent(tmp_path_factory, one_thread):
    """A 2-epoch fp16 run on CPU whose gradients are infinite at step 5 (besides any float16
    overflow of the tiny model's own at NVAE's 2^10), so its saved scale is below 2^10."""
    root = tmp_path_factory.mktemp("fp16")
    with pytest.MonkeyPatch.context() as patch:
        _with_inf_gradients_at(patch, {5})
        return root, training.train(_fp16_run(root, "p"))


def test_fp16_run_finishes_despite_skips_and_saves_the_scale_as_grad_scalar(fp16_parent):
    root, result = fp16_parent
    assert result.precision == "fp16" and result.skipped_steps >= 1 and result.epochs == 2
    raw = load_raw(result.checkpoint_path)
    assert raw["args"].precision == "fp16"
    assert set(raw["grad_scalar"]) == set(NVAE_SCALER_STATE)
    assert raw["grad_scalar"]["scale"] == 2.0 ** 10 / 2 ** result.skipped_steps
    recorded = json.loads((result.save_dir / "train_result.json").read_text())
    assert (recorded["precision"], recorded["skipped_steps"]) == ("fp16", result.skipped_steps)
    assert "GradScaler scale" in (result.save_dir / "log.txt").read_text()


def test_resuming_an_fp16_checkpoint_restores_its_scale(fp16_parent, tmp_path, monkeypatch):
    root, result = fp16_parent
    saved = load_raw(result.checkpoint_path)["grad_scalar"]
    shutil.copytree(result.save_dir, tmp_path / "eval-resumed")
    seen, real_step = [], loop.train_step

    def spy(parts, x, global_step, guard):
        seen.append(parts.grad_scaler.get_scale())
        return real_step(parts, x, global_step, guard)

    monkeypatch.setattr(loop, "train_step", spy)
    resumed = training.train(_fp16_run(tmp_path, "resumed", "--epochs", "3", "--cont_training"))
    assert seen[0] == saved["scale"] < 2.0 ** 10 and resumed.global_step == 12
    assert f"GradScaler scale {saved['scale']:g}" in (tmp_path / "eval-resumed" / "log.txt").read_text()


# ----------------------------------------------------------------------------- acceptance: bf16 runs

@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, one_thread):
    """A bf16 parent, a bf16 new encoder, a bf16 joint run of two, and a new encoder without the
    flag (precision is not inherited: it computes in float32)."""
    root = tmp_path_factory.mktemp("bf16")
    if precision_module.unsupported_reason(Precision("bf16", "cpu")):
        pytest.skip("this CPU cannot run bfloat16 autocast")
    parent = training.train(run_args(root, "p", "--device", "cpu", "--precision", "bf16"))
    new_q = ["--train_new_q", "--p_and_q1_path", str(parent.save_dir), "--device", "cpu"]
    child = training.train(["--root", str(root), "--save", "q2", *new_q, "--seed", "2", "--precision", "bf16"])
    joint = training.train(["--root", str(root), "--save", "j", *new_q, "--seed", "3", "--precision", "bf16",
                            "--num_new_encoders", "2", "--mixture_objective", "miselbo", "--epochs", "1"])
    plain = training.train(["--root", str(root), "--save", "q5", *new_q, "--seed", "5"])
    return parent, child, joint, plain


def test_bf16_parent_and_new_encoders_finish_with_a_bit_identical_decoder(bf16_runs):
    parent, child, joint, plain = bf16_runs
    parent_state = load_raw(parent.checkpoint_path)["state_dict"]
    decoder_keys = [key for key in parent_state if is_decoder(key)]
    assert decoder_keys and any(key.endswith("running_mean") for key in decoder_keys)
    checkpoints = [child.checkpoint_path, plain.checkpoint_path,
                   *(joint.save_dir.parent / f"component-{k}" / "checkpoint.pt" for k in (1, 2))]
    for path in checkpoints:
        state = load_raw(path)["state_dict"]
        for key in decoder_keys:
            assert state[key].dtype == parent_state[key].dtype
            assert torch.equal(state[key], parent_state[key]), (path, key)
    assert child.decoder_fingerprint == joint.decoder_fingerprint == parent.decoder_fingerprint


def test_train_result_and_checkpoint_record_the_precision(bf16_runs):
    parent, child, joint, plain = bf16_runs
    for result, name in ((parent, "bf16"), (child, "bf16"), (joint, "bf16"), (plain, "fp32")):
        assert result.precision == name and result.skipped_steps == 0
        recorded = json.loads((result.save_dir / "train_result.json").read_text())
        assert recorded["precision"] == name
        assert load_raw(result.checkpoint_path)["args"].precision == name
    joint_summary = json.loads((joint.save_dir.parent / "joint_result.json").read_text())
    assert [c["precision"] for c in joint_summary["components"]] == ["bf16", "bf16"]
    assert all(math.isfinite(r.test_nelbo) for r in bf16_runs)
    assert "precision bf16 (autocast bfloat16" in (parent.save_dir / "log.txt").read_text()


def test_the_epoch_and_final_tests_of_a_bf16_run_run_in_float32(tmp_path, monkeypatch):
    from miselbo.training import session as session_module

    real_evaluate, seen = session_module.evaluate_bounds, []

    def evaluate(loader, model, num_samples, *args, **kwargs):
        seen.append((num_samples, torch.is_autocast_enabled("cpu"), next(model.parameters()).dtype))
        return real_evaluate(loader, model, num_samples, *args, **kwargs)

    monkeypatch.setattr(session_module, "evaluate_bounds", evaluate)
    result = training.train(run_args(tmp_path, "b", "--device", "cpu", "--precision", "bf16", "--epochs", "1"))
    assert result.precision == "bf16"
    assert seen == [(10, False, torch.float32), (4, False, torch.float32)]  # epoch test, final test


def test_fp16_tiny_run_on_the_test_device(test_device, tmp_path):
    """On a GPU (MISELBO_TEST_DEVICE=cuda) this is NVAE's CUDA float16 step end to end."""
    _fp16(test_device)
    result = training.train(run_args(tmp_path, "dev", "--device", str(test_device), "--precision", "fp16",
                                     "--epochs", "1"))
    assert result.precision == "fp16" and math.isfinite(result.test_nelbo)
    assert load_raw(result.checkpoint_path)["grad_scalar"]["scale"] <= 2.0 ** 10


# ----------------------------------------------------------------------------- benchmarks/train_speed.py

TINY_BENCHMARK_FLAGS = ["--dataset", "mnist", *TINY_ARCH[2:], "--weight_decay_norm", "1e-2"]


@pytest.fixture
def train_speed(monkeypatch):
    """benchmarks/train_speed.py with the tiny model in place of the paper's."""
    import functools
    import importlib.util

    path = test_train_common.REPO_ROOT / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "build_step_parts",
                        functools.partial(module.build_step_parts, flags=TINY_BENCHMARK_FLAGS))
    return module


def _benchmark_options(**overrides):
    import types
    values = dict(precision="fp32,bf16", batch_size=4, steps=1, warmup_steps=0, threads=0)
    return types.SimpleNamespace(**{**values, **overrides})


def test_train_speed_gate_passes_bf16_at_the_same_weights_and_draws(train_speed):
    precisions = train_speed.precision_list("bf16,auto", CPU)
    assert [p.name for p in precisions] == ["fp32", "bf16"]  # float32 first, auto = fp32 on CPU
    parent = train_speed.build_step_parts("full", CPU)[1]
    parts = {p.name: {mode: train_speed.build_step_parts(mode, CPU, parent=parent, precision=p)[0]
                      for mode in train_speed.MODES} for p in precisions}
    agreement = train_speed.compare_with_float32(parts, train_speed.real_batch(4, CPU))
    for mode in train_speed.MODES:
        figures = agreement["bf16"][mode]
        assert figures["agrees"] and figures["loss_diff"] != 0, figures
        assert figures["loss_rel_diff"] <= train_speed.LOSS_REL_TOL
        assert figures["grad_cosine"] >= train_speed.GRAD_COSINE_MIN


@pytest.mark.parametrize("wrong", ["gradient left scaled", "loss off by 1%"])
def test_train_speed_gate_fails_a_path_that_computes_something_else(train_speed, monkeypatch, capsys, wrong):
    real_loss = train_speed.nelbo_loss

    def wrong_under_autocast(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            loss = terms.loss
            terms.loss = (loss + 7 * (loss - loss.detach()) if wrong == "gradient left scaled"
                          else loss * 1.01)
        return terms

    def no_timing(*args, **kwargs):
        raise AssertionError("the gate let a wrong path through to the timing")

    monkeypatch.setattr(train_speed, "nelbo_loss", wrong_under_autocast)
    monkeypatch.setattr(train_speed, "cpu_memory", no_timing)
    monkeypatch.setattr(train_speed, "median_precision_step_times", no_timing)
    status = train_speed.print_precision_result(_benchmark_options(), CPU)
    out, err = capsys.readouterr()
    assert status == train_speed.GATE_FAILED == 1
    assert "GATE FAILED: bf16 full, bf16 new_q" in err and "RESULT" not in out
    assert "CUDA part: skipped, this run is on the CPU" in out


def test_train_speed_refuses_a_precision_the_device_cannot_run(train_speed, monkeypatch, capsys):
    monkeypatch.setattr(precision_module.torch.amp, "is_autocast_available", lambda device_type: False)
    assert train_speed.print_precision_result(_benchmark_options(), CPU) == 2
    assert "--precision bf16 cannot run on cpu" in capsys.readouterr().err
