"""The main job (python -m miselbo.pipeline) under user mistakes: every flag is checked before the
first stage starts, each refusal naming the flag the user typed (exit 2, one line, no traceback,
nothing written), --out that cannot be a folder, a second pipeline on a folder in use, and an
ensemble of one encoder."""
import json
import os

import pytest

from miselbo.errors import UserError
from miselbo.pipeline import run as pipeline
from miselbo.pipeline import settings as pipeline_settings
from miselbo.runtime import flags
from miselbo.storage.run_lock import hold_run_lock

TINY = ["--preset", "tiny", "--device", "cpu", "--eval_processes", "1", "--parallel_stages", "1"]
TINY_RUN = TINY + ["--num_train_examples", "64", "--num_test_examples", "16", "--num_eval_examples", "8",
                   "--num_iw_samples", "3"]


@pytest.fixture
def no_stage_runs(monkeypatch):
    """Fail the test if any training stage or the evaluation starts."""
    def started(*args, **kwargs):
        raise AssertionError("a stage started")
    monkeypatch.setattr(pipeline.training, "train", started)
    monkeypatch.setattr(pipeline.parallel_stages, "run_in_parallel", started)
    monkeypatch.setattr(pipeline.evaluate, "main", started)


def _refused(capsys, argv, *fragments):
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m miselbo.pipeline: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ----------------------------------------------------------------------------- flags, before any stage

@pytest.mark.parametrize("argv, message", [
    (["--eval_batch_size", "0"], "--eval_batch_size must be a whole number >= 1, got 0."),
    (["--eval_batch_size", "-3"], "--eval_batch_size must be a whole number >= 1, got -3."),
    (["--num_eval_examples", "0"], "--num_eval_examples must be a whole number >= 1, got 0."),
    (["--num_eval_examples", "-1"], "--num_eval_examples must be a whole number >= 1, got -1."),
    (["--num_encoders", "0"], "--num_encoders must be a whole number >= 1, got 0."),
    (["--num_iw_samples", "-2"], "--num_iw_samples must be a whole number >= 1, got -2."),
    (["--seeds", "1", "2", "99999999999"], f"--seeds must lie in 0 .. {flags.MAX_SEED}, got 99999999999."),
    (["--seeds", "-1", "2", "3"], f"--seeds must lie in 0 .. {flags.MAX_SEED}, got -1."),
    (["--joint", "s2a"], "--joint s2a needs --joint_num_active A"),
    (["--joint", "s2s", "--joint_num_active", "3"], "--joint_num_active must lie in 1 .. 2, got 3."),
    (["--joint_num_active", "1"], "--joint_num_active is only used with --joint s2a or s2s"),
    (["--dataset", "svhn"], "--dataset svhn: unknown data set"),
    (["--num_iw_samples", "100000000000"], "--num_iw_samples 100000000000: one evaluation batch would need"),
])
def test_every_flag_is_checked_before_the_first_stage(tmp_path, capsys, no_stage_runs, argv, message):
    out = tmp_path / "run"
    err = _refused(capsys, TINY + ["--out", str(out), *argv], message)
    assert "--batch_size" not in err.replace("--eval_batch_size", "") and "--num_examples" not in err
    assert not out.exists()


def test_an_evaluation_that_cannot_fit_names_the_pipeline_flags(tmp_path, capsys, no_stage_runs, monkeypatch):
    monkeypatch.setattr(pipeline.memory, "available_bytes", lambda device: 1 << 30)
    err = _refused(capsys, TINY + ["--out", str(tmp_path / "run"), "--num_iw_samples", "2000000"],
                   "--num_iw_samples 2000000: one evaluation batch", "at --eval_batch_size 50")
    assert "--chunk_size" not in err and " --batch_size" not in err


def test_the_same_seed_rule_as_the_evaluation():
    with pytest.raises(UserError) as pipeline_error:
        pipeline_settings.parse_settings(["--seeds", "4294967296", "1", "2"])
    with pytest.raises(UserError) as shared:
        flags.seed("--seeds", 4294967296)
    assert str(pipeline_error.value) == str(shared.value)


# ----------------------------------------------------------------------------- --out and --export

def test_out_naming_a_file_is_refused(tmp_path, capsys, no_stage_runs):
    (tmp_path / "a_file").write_text("x")
    _refused(capsys, TINY + ["--out", str(tmp_path / "a_file")], "--out", "names an existing file")
    _refused(capsys, TINY + ["--out", str(tmp_path / "a_file" / "run")], "--out", "is a file")
    _refused(capsys, TINY + ["--out", str(tmp_path / "run"), "--export", str(tmp_path / "a_file")],
             "--export", "names an existing file")
    assert (tmp_path / "a_file").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_out_where_no_folder_can_be_made_is_refused(capsys, no_stage_runs):
    _refused(capsys, TINY + ["--out", "/proc/miselbo_pipeline_test/run"], "--out /proc/miselbo_pipeline_test/run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys, no_stage_runs):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _refused(capsys, TINY + ["--out", str(locked / "run")], "--out", "not writable")
    finally:
        locked.chmod(0o700)


def test_prepare_out_turns_os_errors_into_refusals(tmp_path, monkeypatch):
    settings = pipeline.parse_settings(TINY + ["--out", str(tmp_path / "run")])

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(type(settings.out), "mkdir", read_only)
    with pytest.raises(UserError, match="--out .*: cannot create the output folder \\(Permission denied\\)"):
        pipeline.prepare_out(settings)


# ----------------------------------------------------------------------------- a second pipeline

def test_a_second_pipeline_on_a_folder_in_use_writes_nothing(tmp_path, capsys, no_stage_runs):
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    for stage in ("q2", "q3"):
        (out / "logs" / f"{stage}.log").write_text(f"{stage} of the first run\n")
    with hold_run_lock(out, "pipeline"):  # the first pipeline, training
        _refused(capsys, TINY + ["--out", str(out)], f"{out} is in use by another run")
    for stage in ("q2", "q3"):
        assert (out / "logs" / f"{stage}.log").read_text() == f"{stage} of the first run\n"
    assert sorted(path.name for path in out.iterdir()) == ["logs"]  # no stage record, no lock left


def test_a_stage_folder_another_run_holds_is_refused_before_its_log_is_opened(tmp_path, no_stage_runs):
    settings = pipeline.parse_settings(TINY + ["--out", str(tmp_path)])
    folder = settings.checkpoint("q2").parent
    folder.mkdir()
    (tmp_path / "logs").mkdir()
    with hold_run_lock(folder, "training"):  # e.g. a train.py started by hand into eval-q2
        with pytest.raises(UserError, match="is in use by another run"):
            pipeline.run_parallel_stages(settings, [("q2", 2), ("q3", 3)], 2, bar=None)
    assert list((tmp_path / "logs").iterdir()) == []


# ----------------------------------------------------------------------------- S = 1

@pytest.mark.slow
def test_one_encoder_trains_and_evaluates_with_the_matched_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    assert pipeline.main(TINY_RUN + ["--num_encoders", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "iwelbo q1@SL" in printed and "pipeline finished" in printed
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["S"] == 1
    assert results["iwelbo_matched_per_member"] == pytest.approx(results["iwelbo_per_member"], rel=1e-12)
    assert not (out / "run.lock").exists()
