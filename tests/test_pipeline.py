"""The main job (python -m miselbo.pipeline): end to end on a tiny architecture and a slice of
mnist5k, the dry run, and the stage-settings record that refuses a changed re-run."""
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import miselbo

from miselbo.runtime import distributed
from miselbo.pipeline import run as pipeline
from miselbo.pipeline import stage_record
from miselbo.storage.checkpoints import read_checkpoint
from miselbo.errors import UserError
from miselbo.evaluation.evaluate import main as evaluate_main
from miselbo.nvae.config import NVAE_TRAIN_FLAGS
from miselbo.pipeline.presets import PAPER
from miselbo.training.options import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]

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
    assert manifest["eval_defaults"] == {"num_iw_samples": 3, "batch_size": results["batch_size"],
                                         "chunk_size": results["chunk_size"]}
    assert manifest["preset"] == "tiny" and manifest["package"]["version"] == miselbo.__version__
    recorded = stage_record.read_record(out)
    for stage in ("p_and_q1", "q2", "q3"):  # every stage's exact flags, the --out folder shown as <out>
        shown = manifest["stages"][stage]["train.py"]
        assert shown == [t.replace(str(out), "OUT") for t in recorded[stage]["train.py"]]
        assert str(out) not in " ".join(shown) and "OUT" in shown
    assert manifest["pipeline_command"][:3] == ["python", "-m", "miselbo.pipeline"]
    readme = (export / "README.md").read_text()
    assert f"{estimators['miselbo']['mean']:.4f}" in readme and "python train.py" in readme
    assert manifest["seeds"] == [1, 2, 3] and manifest["dataset"] == "mnist5k"
    assert [m["role"] for m in manifest["members"]] == ["p_and_q", "q", "q"]
    assert len({m["decoder_fingerprint"] for m in manifest["members"]}) == 1
    assert manifest["train_args"]["num_channels_enc"] == 4 and manifest["train_args"]["epochs"] == 1
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

    # the manifest comes from the checkpoints: other seeds on the command line do not reach it
    other = pipeline.parse_settings(TINY_RUN + ["--out", str(out), "--seeds", "4", "5", "6"])
    pipeline.export_ensemble(other, tmp_path / "models" / "again")
    assert json.loads((tmp_path / "models" / "again" / "manifest.json").read_text())["seeds"] == [1, 2, 3]

    # a re-run with other seeds is refused, naming each changed flag, and runs nothing
    assert pipeline.main(TINY_RUN + ["--out", str(out), "--seeds", "4", "5", "6"]) == 2
    error = capsys.readouterr().err
    for stage, old, new in (("p_and_q1", 1, 4), ("q2", 2, 5), ("q3", 3, 6)):
        assert f"stage {stage}: --seed {old} (recorded) -> {new} (now)" in error
    assert "--retrain_changed" in error and "new --out" in error
    assert read_checkpoint(out / "eval-p_and_q1" / "checkpoint.pt")["miselbo"]["seed"] == 1

    # --retrain_changed retrains the changed stage (q3 only here) and keeps the old one aside
    old_q3 = read_checkpoint(out / "eval-q3" / "checkpoint.pt")["state_dict"]
    assert pipeline.main(TINY_RUN + ["--out", str(out), "--seeds", "1", "2", "7", "--retrain_changed"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 2 and "q3: test NELBO" in printed
    assert read_checkpoint(out / "eval-q3" / "checkpoint.pt")["miselbo"]["seed"] == 7
    kept = list(out.glob("eval-q3.replaced-*"))
    assert len(kept) == 1
    for key, tensor in read_checkpoint(kept[0] / "checkpoint.pt")["state_dict"].items():
        assert torch.equal(tensor, old_q3[key]), key
    recorded = json.loads((out / stage_record.RECORD_FILE_NAME).read_text())["stages"]
    assert recorded["q3"]["settings"]["seed"] == 7 and recorded["q2"]["settings"]["seed"] == 2


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


def test_demo_trains_every_encoder_alike_and_a_given_flag_overrides_the_preset(tmp_path):
    demo = pipeline.parse_settings(["--out", str(tmp_path)])
    first = vars(build_parser().parse_args(pipeline.training_argv(demo, "p_and_q1", 1)))
    second = vars(build_parser().parse_args(pipeline.training_argv(demo, "q2", 2)))
    assert (first["epochs"], second["epochs"]) == (8, 8)
    own = {"save", "seed", "train_new_q", "p_and_q1_path"}  # a new encoder's identity
    assert {name for name in first if first[name] != second[name]} == own
    given = pipeline.parse_settings(["--out", str(tmp_path), "--epochs", "5"])  # NVAE's flag, given
    for stage, seed in (("p_and_q1", 1), ("q3", 3)):
        assert build_parser().parse_args(pipeline.training_argv(given, stage, seed)).epochs == 5


def test_evaluation_processes_and_the_matched_baseline_follow_the_flags_and_the_preset(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 4)

    def evaluation(*argv):
        command = pipeline.evaluation_argv(pipeline.parse_settings(["--out", str(tmp_path), *argv]))
        processes = int(command[command.index("--world_size") + 1]) if "--world_size" in command else 1
        return processes, "--no-matched_baseline" not in command

    assert evaluation("--device", "cpu") == (4, False)  # demo: all cores, no matched baseline
    assert evaluation("--device", "cpu", "--num_eval_examples", "60") == (2, False)  # 2 batches of 50
    assert evaluation("--device", "cpu", "--eval_processes", "1", "--matched_baseline") == (1, True)
    assert evaluation("--device", "cpu", "--preset", "tiny") == (4, True)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 1)
    assert evaluation("--device", "cpu")[0] == 1
    with pytest.raises(UserError, match="--eval_processes must be auto or a whole number"):
        pipeline.parse_settings(["--eval_processes", "0"])


def test_process_counts_the_machine_cannot_hold_are_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 2)
    base = ["--out", str(tmp_path / "run"), "--device", "cpu", "--num_encoders", "20"]
    for flag in ("--eval_processes", "--parallel_stages"):
        assert pipeline.main([*base, flag, "1000000000"]) == 2
        error = capsys.readouterr().err
        assert f"{flag} " in error and "would start" in error and "Traceback" not in error
        assert pipeline.main([*base, flag, "1000000000", "--dry_run"]) == 2
        capsys.readouterr()
    assert not (tmp_path / "run").exists()
    assert pipeline.main([*base, "--parallel_stages", "8", "--eval_processes", "8", "--dry_run"]) == 0


def test_a_one_sample_final_test_is_reported_as_a_nelbo_only():
    assert pipeline._stage_line("q2", 105.5, 105.5, 1, 99.6) == "q2: test NELBO 105.50 nats (1 sample), 100 s"
    assert "-log p 101.40 nats (10 samples)" in pipeline._stage_line("q2", 105.5, 101.4, 10, 99.6)


# ----------------------------------------------------------------------------- dry run

def _printed_commands(text: str, program: str) -> list[list[str]]:
    """The argument lists of the printed `python <program> ...` lines."""
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith(f"python {program} ")]
    return [command[2:] for command in commands]


def test_dry_run_of_paper_prints_the_full_recipe_runs_nothing_and_writes_nothing(tmp_path):
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "miselbo.pipeline", "--preset", "paper", "--dry_run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - began
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even runs/
    assert seconds < 60  # no training: the time of importing torch and parsing
    assert "--num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2" in done.stdout
    trainings = _printed_commands(done.stdout, "train.py")
    assert len(trainings) == 3
    for index, argv in enumerate(trainings):
        args = build_parser().parse_args(argv)
        architecture = PAPER.nvae_args()
        for flag in NVAE_TRAIN_FLAGS:
            if flag.category in ("A", "C"):
                assert getattr(args, flag.name) == getattr(architecture, flag.name), flag.name
        assert args.num_cell_per_cond_enc == args.num_cell_per_cond_dec == 2
        assert args.dataset == "mnist" and args.seed == index + 1 and args.train_new_q == (index > 0)
        assert args.num_process_per_node == 2 and args.batch_size == 200 and args.epochs == 400
    evaluation = _printed_commands(done.stdout, "miselbo_eval.py")
    assert len(evaluation) == 1 and evaluation[0][evaluation[0].index("--num_iw_samples") + 1] == "1000"


def test_dry_run_prints_what_a_run_would_call(tmp_path, capsys):
    argv = ["--preset", "tiny", "--out", str(tmp_path / "run dir"), "--epochs", "3", "--num_encoders", "2"]
    assert pipeline.main(argv + ["--dry_run"]) == 0
    printed = capsys.readouterr().out
    settings = pipeline.parse_settings(argv)
    assert _printed_commands(printed, "train.py") == [pipeline.training_argv(settings, "p_and_q1", 1),
                                                      pipeline.training_argv(settings, "q2", 2)]
    assert _printed_commands(printed, "miselbo_eval.py") == [pipeline.evaluation_argv(settings)]
    assert not (tmp_path / "run dir").exists()


def _readme_nvae_commands() -> str:
    """The code block of docs/nvae_users.md's "For NVAE users" that shows a pipeline dry run and its output."""
    text = (REPO_ROOT / "docs" / "nvae_users.md").read_text()
    section = text[text.index("## For NVAE users"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [chunk.split("```", 1)[0] for chunk in section.split("```bash")[1:]]
    [block] = [block for block in blocks if "--dry_run" in block]
    return block


def test_readme_commands_for_nvae_users_are_the_dry_run_output(capsys, monkeypatch):
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 1)  # as on a GPU: one evaluation process
    block = _readme_nvae_commands().replace("\\\n", " ")
    written = [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]
    dry_run_line = [command for command in written if command[:3] == ["python", "-m", "miselbo.pipeline"]]
    assert len(dry_run_line) == 1 and "--dry_run" in dry_run_line[0]
    assert pipeline.main(dry_run_line[0][3:]) == 0
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert [command for command in written if command[:2] != ["python", "-m"]] == printed


# ----------------------------------------------------------------------------- stage settings

def test_changed_settings_of_a_recorded_stage_are_refused_naming_each_flag(tmp_path, capsys):
    base = ["--preset", "tiny", "--out", str(tmp_path), "--num_encoders", "2"]
    first = pipeline.parse_settings(base)
    for stage, seed in zip(first.stage_names(), first.seeds):
        stage_record.record_stage(tmp_path, stage, pipeline.training_argv(first, stage, seed))
        (tmp_path / f"eval-{stage}").mkdir()
    # device and data folder say where a stage runs, not what it trains: not compared
    assert pipeline.changed_stages(pipeline.parse_settings(base + ["--device", "cpu", "--data", "/d"])) == {}
    # nor the sizes of the tests, which leave the weights as they are
    tests_only = ["--final_iw_samples", "7", "--epoch_test_examples", "3"]
    assert pipeline.changed_stages(pipeline.parse_settings(base + tests_only)) == {}
    assert pipeline.main(base + ["--epochs", "3", "--learning_rate", "0.5"]) == 2
    error = capsys.readouterr().err
    assert "--epochs 1 (recorded) -> 3 (now)" in error and "--learning_rate 0.01 (recorded) -> 0.5 (now)" in error
    assert "stage p_and_q1:" in error and "stage q2:" in error
    assert "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-p_and_q1", "eval-q2", "pipeline_stages.json"]
    # the dry run says the same without refusing; a stage whose folder is gone is not compared
    assert pipeline.main(base + ["--epochs", "3", "--dry_run"]) == 0
    assert "--epochs 1 (recorded) -> 3 (now)" in capsys.readouterr().out
    (tmp_path / "eval-q2").rmdir()
    assert list(pipeline.changed_stages(pipeline.parse_settings(base + ["--epochs", "3"]))) == ["p_and_q1"]


def test_retrain_changed_sets_aside_the_first_changed_stage_and_all_after_it(tmp_path):
    base = ["--preset", "tiny", "--out", str(tmp_path)]
    first = pipeline.parse_settings(base)
    for stage, seed in zip(first.stage_names(), first.seeds):
        stage_record.record_stage(tmp_path, stage, pipeline.training_argv(first, stage, seed))
        (tmp_path / f"eval-{stage}").mkdir()
        (tmp_path / f"eval-{stage}" / "log.txt").write_text(stage)
    changed = pipeline.parse_settings(base + ["--seeds", "1", "5", "3", "--retrain_changed"])
    assert list(pipeline.changed_stages(changed)) == ["q2"]
    pipeline.check_stage_settings(changed)
    assert (tmp_path / "eval-p_and_q1" / "log.txt").read_text() == "p_and_q1"
    for stage in ("q2", "q3"):  # q3 follows a changed stage, so it is retrained too
        assert not (tmp_path / f"eval-{stage}").exists()
        [kept] = tmp_path.glob(f"eval-{stage}.replaced-*")
        assert (kept / "log.txt").read_text() == stage


def test_a_stage_without_a_record_is_compared_with_its_checkpoint(tmp_path, capsys):
    # the shipped ensemble's decoder run, made before stage records existed, trained with `demo`
    source = REPO_ROOT / "models" / "mnist5k_demo" / "p_and_q1"
    shutil.copytree(source, tmp_path / "eval-p_and_q1")
    same = pipeline.parse_settings(["--preset", "demo", "--out", str(tmp_path), "--num_encoders", "1"])
    assert pipeline.changed_stages(same) == {}
    assert pipeline.main(["--preset", "demo", "--out", str(tmp_path), "--num_encoders", "1",
                          "--epochs", "9", "--num_channels_dec", "16"]) == 2
    error = capsys.readouterr().err
    assert "--epochs 8 (recorded) -> 9 (now)" in error and "--num_channels_dec 8 (recorded) -> 16 (now)" in error


def test_an_unreadable_stage_record_is_a_user_error(tmp_path):
    (tmp_path / stage_record.RECORD_FILE_NAME).write_text("{not json")
    (tmp_path / "eval-p_and_q1").mkdir()
    with pytest.raises(UserError, match="pipeline_stages.json"):
        pipeline.changed_stages(pipeline.parse_settings(["--preset", "tiny", "--out", str(tmp_path)]))


def test_the_help_text_opens_with_the_module_docstring():
    first_paragraph = " ".join(pipeline.__doc__.split("\n\n")[0].split())
    assert pipeline.build_parser().description == first_paragraph
