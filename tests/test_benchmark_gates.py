"""train_speed.py, cpu_layout.py and large_ensemble.py check that their compared paths compute the
same thing before they print a speed: fed a disagreement (one path made to return something off)
each exits with status 1 and prints no speed; agreeing paths pass and store their result. Each
run uses a tiny model or tiny sizes."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_record  # noqa: E402
from ensemble_helpers import one_torch_thread  # noqa: E402,F401 (autouse: one torch thread)

TRAIN_SPEED_TINY = ["--preset", "tiny", "--batch_size", "2", "--steps", "1", "--warmup_steps", "1",
                    "--joint_encoders", "0"]
CPU_LAYOUT_TINY = ["--batch_size", "2", "--num_iw_samples", "2", "--repeats", "1", "--train_steps", "1",
                   "--train_warmup_steps", "0", "--train_batch_size", "2", "--preset", "tiny"]
LARGE_ENSEMBLE_TINY = ["--sizes", "2", "3", "--batch_size", "3", "--num_samples", "2"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gate_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def results_in_tmp(tmp_path, monkeypatch):
    """Stored results go to a temporary folder, never to benchmarks/results/."""
    monkeypatch.setattr(bench_record, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def _refused(module, argv, capsys) -> str:
    """Run the benchmark; it must exit 1 without a RESULT line or a time. Returns stderr."""
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    out, err = capsys.readouterr()
    assert stopped.value.code == bench_record.EXIT_DISAGREEMENT == 1
    assert "FAILED, no speed reported" in err, err
    assert "RESULT" not in out and " s, " not in out and "ms" not in out, out
    return err


def _passed(module, argv, name: str, results: Path, capsys) -> dict:
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "RESULT {" in out
    record = bench_record.load(name, results)
    assert record["result"]["gate" if name != "cpu_layout" else "evaluation"]
    return record


# ----------------------------------------------------------------------------- train_speed.py

@pytest.fixture
def train_speed(monkeypatch):
    module = _load("train_speed")
    # peak memory is measured in subprocesses and compares nothing: not what these tests check
    monkeypatch.setattr(module, "cpu_memory", lambda *args, **kwargs: {
        mode: {"peak_rss_mib": 1.0, "rise_over_rss_before_steps_mib": 0.5} for mode in module.MODES})
    return module


def test_train_speed_refuses_a_new_encoder_step_that_changes_the_decoder(train_speed, monkeypatch, capsys):
    real_step = train_speed.train_step

    def step_that_moves_the_decoder(parts, *args):
        terms = real_step(parts, *args)
        with torch.no_grad():
            parts.model.decoder_parameters()[0].add_(1e-6)
        return terms

    monkeypatch.setattr(train_speed, "train_step", step_that_moves_the_decoder)
    assert "decoder tensor(s)" in _refused(train_speed, TRAIN_SPEED_TINY, capsys)


def test_train_speed_refuses_an_encoder_gradient_off_the_full_steps(train_speed, monkeypatch, capsys):
    real = train_speed.step_loss_and_gradients

    def off_new_encoder_gradient(parts, x, draw_seed, model=None, layers=None):
        loss, gradients = real(parts, x, draw_seed, model, layers)
        if model is None:  # the new-encoder step's own path, not the full-step reference
            gradients = {name: value * 1.001 for name, value in gradients.items()}
        return loss, gradients

    monkeypatch.setattr(train_speed, "step_loss_and_gradients", off_new_encoder_gradient)
    assert "encoder gradient" in _refused(train_speed, TRAIN_SPEED_TINY, capsys)


def test_train_speed_passes_agreeing_paths_and_stores_the_gate(train_speed, results_in_tmp, capsys):
    record = _passed(train_speed, TRAIN_SPEED_TINY, "train_speed", results_in_tmp, capsys)
    gate = record["result"]["gate"]
    assert gate["passed"] and gate["encoder_grad_rel_error"] <= train_speed.ENCODER_GRAD_REL_ERROR_MAX
    assert gate["decoder_tensors_bit_identical"] > 0 and record["result"]["full_step_s"] > 0


# ----------------------------------------------------------------------------- cpu_layout.py

def test_cpu_layout_refuses_evaluation_values_that_differ(monkeypatch, capsys):
    cpu_layout = _load("cpu_layout")
    real = cpu_layout.evaluation_times

    def off_channels_last(x, options):
        seconds, values = real(x, options)
        values["channels_last"] = values["channels_last"] + 0.01  # 10 x the bound, in nats
        return seconds, values

    monkeypatch.setattr(cpu_layout, "evaluation_times", off_channels_last)
    assert "per-example MISELBO" in _refused(cpu_layout, CPU_LAYOUT_TINY, capsys)


def test_cpu_layout_refuses_a_training_loss_that_differs(monkeypatch, capsys):
    cpu_layout = _load("cpu_layout")
    real = cpu_layout.step_loss_and_gradients
    calls = []

    def off_every_second_call(parts, x, draw_seed, *rest):
        loss, gradients = real(parts, x, draw_seed, *rest)
        calls.append(loss)
        return (loss * 1.001 if len(calls) % 2 == 0 else loss), gradients  # channels-last is the second

    monkeypatch.setattr(cpu_layout, "step_loss_and_gradients", off_every_second_call)
    assert "full step's loss" in _refused(cpu_layout, CPU_LAYOUT_TINY, capsys)


def test_cpu_layout_passes_agreeing_layouts(results_in_tmp, capsys):
    cpu_layout = _load("cpu_layout")
    record = _passed(cpu_layout, CPU_LAYOUT_TINY, "cpu_layout", results_in_tmp, capsys)
    agreement = record["result"]["training"]["agreement"]
    assert set(agreement) == {"full", "new_q"}
    assert all(figures["grad_rel_error"] <= cpu_layout.GRAD_REL_ERROR_MAX for figures in agreement.values())


# ----------------------------------------------------------------------------- large_ensemble.py

def _shift_subset_log_p(monkeypatch, module, shift: float, every_member_too: bool) -> None:
    """Make S2A's reduced_weights return log_p shifted by `shift` (also with A = S if asked)."""
    real = module.Ensemble.reduced_weights

    def shifted(self, x, num_samples, generator=None, chunk_size=None, active=None, **kwargs):
        reduced = real(self, x, num_samples, generator, chunk_size, active, **kwargs)
        if active is not None and (every_member_too or not bool(active.all())):
            reduced.log_p = reduced.log_p + shift
        return reduced

    monkeypatch.setattr(module.Ensemble, "reduced_weights", shifted)


def test_large_ensemble_refuses_s2a_with_every_member_off_a2a(monkeypatch, capsys):
    large_ensemble = _load("large_ensemble")
    _shift_subset_log_p(monkeypatch, large_ensemble, 0.01, every_member_too=True)
    assert "S2A with A = S against A2A" in _refused(large_ensemble, LARGE_ENSEMBLE_TINY, capsys)


def test_large_ensemble_refuses_an_s2a_mean_far_from_miselbo(monkeypatch, capsys):
    large_ensemble = _load("large_ensemble")
    _shift_subset_log_p(monkeypatch, large_ensemble, 1000.0, every_member_too=False)
    assert "S2A's mean over the examples against MISELBO's" in _refused(large_ensemble, LARGE_ENSEMBLE_TINY, capsys)


def test_large_ensemble_passes_agreeing_estimators(results_in_tmp, capsys):
    large_ensemble = _load("large_ensemble")
    record = _passed(large_ensemble, LARGE_ENSEMBLE_TINY, "large_ensemble", results_in_tmp, capsys)
    result = record["result"]
    assert result["gate"]["a_equals_s_max_abs_diff"] <= large_ensemble.A_EQUALS_S_TOLERANCE_NATS
    assert set(result["sizes"]) == {"2", "3"} and set(result["sizes"]["3"]["s2a_minus_miselbo"]) == {"1"}
