"""The main job end to end (python -m miselbo.pipeline) on a tiny architecture and a slice of mnist5k."""
import json

import pytest
import torch

from miselbo import pipeline
from miselbo.checkpoints import read_checkpoint
from miselbo.cli import UserError
from miselbo.evaluate import main as evaluate_main

TINY_RUN = ["--preset", "tiny", "--num_train_examples", "64", "--num_test_examples", "16",
            "--num_eval_examples", "8", "--num_iw_samples", "3", "--device", "cpu"]
RESULT_KEYS = {"S", "L", "num_examples", "dataset", "seed", "device", "wall_seconds", "checkpoints",
               "estimators", "iwelbo_per_member", "delta"}


@pytest.mark.slow
def test_main_job_trains_three_members_evaluates_and_exports(tmp_path, capsys):
    out, export = tmp_path / "run", tmp_path / "models" / "demo"
    assert pipeline.main(TINY_RUN + ["--out", str(out), "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    assert "miselbo" in printed and "pooled" in printed and "jsd" in printed
    results = json.loads((out / "results" / "results.json").read_text())
    assert RESULT_KEYS <= set(results) and results["S"] == 3 and results["L"] == 3
    fingerprints = {entry["decoder_fingerprint"] for entry in results["checkpoints"]}
    assert len(fingerprints) == 1  # one shared decoder
    estimators = results["estimators"]
    assert estimators["pooled"]["mean"] >= estimators["miselbo"]["mean"]
    for name in ("ablation.csv", "ablation.png", "samples.png"):
        assert (out / "results" / name).stat().st_size > 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["checkpoints"] == ["p_and_q1/checkpoint.pt", "q2/checkpoint.pt", "q3/checkpoint.pt"]
    assert manifest["eval_defaults"] == {"num_iw_samples": 3}
    exported = read_checkpoint(export / "q2" / "checkpoint.pt")
    trained = read_checkpoint(out / "eval-q2" / "checkpoint.pt")
    assert exported["optimizer"] is None and trained["optimizer"] is not None
    assert exported["miselbo"] == trained["miselbo"]
    for key, tensor in trained["state_dict"].items():
        assert torch.equal(exported["state_dict"][key], tensor), key
    # the exported folder is an ensemble miselbo_eval.py takes as one argument
    assert evaluate_main(["--checkpoints", str(export), "--num_iw_samples", "2", "--num_examples", "4",
                          "--save", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text())["S"] == 3

    # running the same command again skips every trained stage
    assert pipeline.main(TINY_RUN + ["--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already trained") == 3


@pytest.mark.parametrize("argv, message", [
    (["--save", "x"], "--save is set by the pipeline"),
    (["--num_encoders", "2", "--seeds", "1", "1"], "2 distinct values"),
    (["--num_iw_samples", "0"], "--num_iw_samples"),
])
def test_bad_pipeline_flags_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        pipeline.parse_settings(argv)


def test_unknown_flags_go_to_every_training_stage_after_the_preset(tmp_path):
    settings = pipeline.parse_settings(["--out", str(tmp_path), "--epochs", "3", "--data", "/d"])
    evaluation = pipeline.evaluation_argv(settings)
    assert evaluation[evaluation.index("--data") + 1] == "/d"
    first = pipeline.training_argv(settings, "p_and_q1", 1)
    second = pipeline.training_argv(settings, "q2", 2)
    assert first[-2:] == ["--epochs", "3"] and "--train_new_q" not in first
    assert first[first.index("--data") + 1] == "/d"
    assert second[second.index("--p_and_q1_path") + 1] == str(tmp_path / "eval-p_and_q1")
    assert second[second.index("--seed") + 1] == "2"
