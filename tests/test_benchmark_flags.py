"""The benchmarks check their counts and seeds with the rule train.py, miselbo_eval.py and the
pipeline use (miselbo/runtime/flags.py): exit 2 naming the flag, before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, argv, expected", [
    ("eval_speed.py", ["--batch_size", "0"], "argument --batch_size: the value must be a whole number >= 1, got 0."),
    ("train_speed.py", ["--steps", "-2"], "argument --steps: the value must be a whole number >= 1, got -2."),
    ("joint_comparison.py", ["--seeds", "99999999999999999999"], "argument --seeds: the value must lie in 0 .. 4294967295"),
    ("large_ensemble.py", ["--num_samples", "x"], "argument --num_samples: a whole number is needed, got 'x'"),
])
def test_a_benchmark_refuses_a_bad_count_or_seed(script, argv, expected):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2 and expected in done.stderr, done.stderr


# ----------------------------------------------------------------------------- records of the benchmarks

def _benchmark(name: str):
    import importlib.util
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"flags_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _joint_options(tmp_path, quick: bool, **overrides):
    from types import SimpleNamespace
    values = dict(quick=quick, epoch_test_examples=100, num_iw_samples=2 if quick else 20,
                  num_examples=16 if quick else 1000, eval_chunk_size=None, out=str(tmp_path / "runs"))
    return SimpleNamespace(**{**values, **overrides})


def test_a_quick_joint_comparison_record_is_never_reused_by_a_full_run(tmp_path, monkeypatch):
    import json
    joint = _benchmark("joint_comparison")
    parent_sha = "ab" * 32
    quick, full = _joint_options(tmp_path, True), _joint_options(tmp_path, False)
    quick_settings = joint.record_settings("miselbo", 1, quick, parent_sha)
    stored = joint.record_path(joint.output_dir(quick), quick_settings)
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"configuration": "miselbo", "miselbo": -1.0, "settings": quick_settings}))
    assert joint.reusable_record(stored, quick_settings)["miselbo"] == -1.0
    assert joint.output_dir(quick) != joint.output_dir(full)
    # full settings, the quick settings with full-size evaluation, another parent or another chunk size
    others = [joint.record_settings("miselbo", 1, full, parent_sha),
              joint.record_settings("miselbo", 1, _joint_options(tmp_path, False, num_iw_samples=2, num_examples=16),
                                    parent_sha),
              joint.record_settings("miselbo", 1, quick, "cd" * 32),
              joint.record_settings("miselbo", 1, _joint_options(tmp_path, True, eval_chunk_size=20), parent_sha)]
    for settings in others:
        assert joint.reusable_record(stored, settings) is None  # not even at the quick record's own path
        assert joint.record_path(joint.output_dir(full if not settings["quick"] else quick), settings) != stored

    def no_training(*args):
        raise LookupError("trained")

    monkeypatch.setattr(joint, "train_configuration", no_training)
    assert joint.measure("miselbo", 1, quick, None, parent_sha)["miselbo"] == -1.0  # reused, not trained
    with pytest.raises(LookupError, match="trained"):
        joint.measure("miselbo", 1, full, None, parent_sha)


def test_main_job_passes_flags_through_and_stores_the_evaluation_table(tmp_path, monkeypatch):
    import json

    import torch
    main_job = _benchmark("main_job")
    import bench_record
    assert main_job.parse_options(["--quick", "--", "--export", "models/mnist5k_demo"]).pipeline_flags == [
        "--export", "models/mnist5k_demo"]
    seen = []

    def fake_pipeline(out, flags, env):
        seen.append(flags)
        (out / "results").mkdir(parents=True)
        (out / "stage_times.json").write_text(json.dumps({"stages": {"p_and_q1": {"total": 2.0, "steps": 1.5},
                                                                    "evaluation": {"total": 1.0}}, "total": 3.0}))
        estimators = {name: {"mean": -100.0 - index, "stderr": 0.5} for index, name in enumerate(main_job.ESTIMATORS)}
        (out / "results" / "results.json").write_text(json.dumps({
            "S": 3, "L": 20, "num_examples": 1000, "estimators": estimators, "delta": 0.4, "delta_stderr": 0.01,
            "iwelbo_per_member": [-101.0, -102.0, -103.0], "iwelbo_per_member_stderr": [0.7, 0.8, 0.9]}))
        return 3.5

    monkeypatch.setattr(main_job, "run_main_job", fake_pipeline)
    monkeypatch.setattr(bench_record, "RESULTS_DIR", tmp_path / "results")
    threads = torch.get_num_threads()
    try:
        assert main_job.main(["--threads", "1", "--out", str(tmp_path / "run"), "--", "--export", "x/demo"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [["--export", "x/demo"]]
    result = bench_record.load("main_job", tmp_path / "results")["result"]
    assert result["settings"]["pipeline_flags"] == ["--export", "x/demo"] and result["wall_seconds"] == 3.5
    assert bench_record.load("main_job", tmp_path / "results")["machine"]["torch_threads"] == 1
    assert result["stages"]["p_and_q1"]["steps"] == 1.5 and result["evaluation"]["iwelbo_per_member"][2] == -103.0
    text = main_job.render_markdown(bench_record.load("main_job", tmp_path / "results"))
    assert "| miselbo | -100.0000 | 0.5000 |" in text and "| iwelbo q3 | -103.0000 | 0.9000 |" in text
