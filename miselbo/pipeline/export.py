"""The main job's export: the S trained checkpoints as a `models/`-style folder (what
models/mnist5k_demo is), each without optimizer state, plus a manifest.json taken from what the
checkpoints, the stage record, the evaluation's results.json and the package record, and a
README.md rendered from those (miselbo.pipeline.model_card). `settings` is the pipeline's
PipelineSettings.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import miselbo
from miselbo.pipeline import stage_record
from miselbo.pipeline.model_card import FOLDER_PLACEHOLDER, OUT_PLACEHOLDER, render_readme
from miselbo.storage.checkpoints import CHECKPOINT_FILE_NAME, read_checkpoint
from miselbo.storage.safe_io import atomic_torch_save, atomic_write_text
from miselbo.runtime.stop_signals import StopSignal, signals_raise
from miselbo.training.options import data_set_of

PROG = "python -m miselbo.pipeline"  # as miselbo.pipeline.PROG (that module imports this one)
MANIFEST_FILE_NAME = "manifest.json"
README_FILE_NAME = "README.md"
# what a plain miselbo_eval.py of the folder takes from the manifest: the evaluation's own settings
EVAL_DEFAULT_FIELDS = (("num_iw_samples", "L"), ("batch_size", "batch_size"), ("chunk_size", "chunk_size"))


def export_for_evaluation(source: Path, destination: Path) -> dict:
    """Write `source` to `destination` without its optimizer state (about 2/3 of a p_and_q file):
    same NVAE format and weights, loadable by miselbo_eval.py and NVAE's evaluate.py, not resumable.
    Returns the checkpoint."""
    checkpoint = read_checkpoint(source)
    checkpoint["optimizer"] = None
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, destination)
    return checkpoint


def _member_entry(path: str, checkpoint: dict) -> dict:
    """A manifest's description of one member, from what its checkpoint records."""
    recorded = checkpoint.get("miselbo") or {}
    return {"checkpoint": path, "seed": recorded.get("seed", checkpoint["args"].seed),
            "role": recorded.get("role"), "decoder_fingerprint": recorded.get("decoder_fingerprint")}


def _training_flags(args) -> dict:
    """The train.py settings a checkpoint's namespace records (flags absent from it: None)."""
    names = stage_record.stage_settings([])
    flags = {name: getattr(args, name, None) for name in names}
    flags["dataset"] = data_set_of(args)
    return flags


def _git(*arguments: str) -> str | None:
    """`git <arguments>` in the package's source folder; None outside a git checkout."""
    try:
        done = subprocess.run(["git", *arguments], cwd=Path(miselbo.__file__).resolve().parent,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_record() -> dict:
    """The package version, and the git commit of its source with whether tracked files differed."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"name": "miselbo", "version": miselbo.__version__, "commit": _git("rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status)}


def _portable(argv, out: Path) -> list[str]:
    """A recorded command line with the pipeline's --out folder shown as OUT_PLACEHOLDER."""
    return [token.replace(str(out), OUT_PLACEHOLDER) for token in argv]


def _stage_commands(settings) -> dict:
    """{stage: {"train.py": argv}} as the stage record holds them (the exact flags of every stage)."""
    recorded = stage_record.read_record(settings.out)
    return {stage: {"train.py": _portable(recorded[stage]["train.py"], settings.out)}
            for stage in settings.stage_names() if stage in recorded}


def _pipeline_command(settings) -> list[str]:
    """The pipeline command that makes this folder again (flags that change what is trained)."""
    argv = [*PROG.split()[1:], "--preset", settings.preset, "--dataset", settings.dataset,
            "--num_encoders", str(settings.num_encoders), "--seeds", *map(str, settings.seeds),
            "--num_iw_samples", str(settings.num_iw_samples), "--eval_batch_size", str(settings.eval_batch_size)]
    if settings.num_eval_examples is not None:
        argv += ["--num_eval_examples", str(settings.num_eval_examples)]
    if settings.joint is not None:
        argv += ["--joint", settings.joint]
    if settings.joint_num_active is not None:
        argv += ["--joint_num_active", str(settings.joint_num_active)]
    return ["python", *argv, "--export", FOLDER_PLACEHOLDER, *settings.train_flags]


def build_manifest(settings, members: list[dict], first_args, results: dict, evaluation_argv: list[str]) -> dict:
    """manifest.json: members in order, seeds, preset, every stage's train.py flags, the evaluation,
    the package that made it, and the eval_defaults a plain miselbo_eval.py takes."""
    return {"checkpoints": [member["checkpoint"] for member in members],
            "dataset": data_set_of(first_args), "seeds": [member["seed"] for member in members],
            "members": members, "preset": settings.preset, "pipeline_command": _pipeline_command(settings),
            "train_flags": list(settings.train_flags), "stages": _stage_commands(settings),
            "train_args": _training_flags(first_args), "package": package_record(),
            "evaluation": {"miselbo_eval.py": _portable(evaluation_argv, settings.out)},
            "eval_defaults": {flag: results[field] for flag, field in EVAL_DEFAULT_FIELDS
                              if results.get(field) is not None}}


def export_ensemble(settings, target: Path, evaluation_argv: list[str] | None = None) -> None:
    """Export the S checkpoints to target/<stage>/checkpoint.pt and write target/manifest.json and
    README.md from what the checkpoints (seeds, flags), the stage record and the evaluation's
    results.json (L, batch and chunk size, the table) record."""
    # An interrupted export must not leave an earlier manifest naming newly written files.
    (target / MANIFEST_FILE_NAME).unlink(missing_ok=True)
    members, first_args = [], None
    for stage, source in zip(settings.member_names(), settings.member_checkpoints()):
        path = f"{stage}/{CHECKPOINT_FILE_NAME}"
        checkpoint = export_for_evaluation(source, target / path)
        members.append(_member_entry(path, checkpoint))
        first_args = first_args or checkpoint["args"]
    results = json.loads((settings.out / "results" / "results.json").read_text(encoding="utf-8"))
    manifest = build_manifest(settings, members, first_args, results, evaluation_argv or [])
    atomic_write_text(target / README_FILE_NAME, render_readme(target.name, manifest, results),
                      record_sha256=False)
    atomic_write_text(target / MANIFEST_FILE_NAME, json.dumps(manifest, indent=2) + "\n",
                      record_sha256=False)


def export_stoppable(settings, evaluation_argv: list[str] | None = None) -> int:
    """export_ensemble that answers SIGINT/SIGTERM at once: says what was kept, returns 130/143."""
    try:
        with signals_raise():
            export_ensemble(settings, settings.export, evaluation_argv)
    except StopSignal as stop:
        finished = (settings.export / MANIFEST_FILE_NAME).is_file()
        state = ("it had finished (manifest.json written)" if finished else
                 "it has no manifest.json yet (each file in it is complete or absent)")
        print(f"{PROG}: export to {settings.export} stopped by {stop.name}. Kept: every trained "
              f"checkpoint and the results in {settings.out}; as for the export, {state}. Run the "
              f"same command again to export.", file=sys.stderr)
        return stop.exit_code
    return 0
