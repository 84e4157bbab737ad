"""The main job's export: the S trained checkpoints as a `models/`-style folder (what
models/mnist5k_demo is), each without optimizer state, plus a manifest.json taken from what the
checkpoints and the evaluation's results.json record. `settings` is the pipeline's PipelineSettings.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from miselbo.pipeline import stage_record
from miselbo.storage.checkpoints import CHECKPOINT_FILE_NAME, read_checkpoint
from miselbo.storage.safe_io import atomic_torch_save, atomic_write_text
from miselbo.runtime.stop_signals import StopSignal, signals_raise
from miselbo.training.options import data_set_of

PROG = "python -m miselbo.pipeline"  # as miselbo.pipeline.PROG (that module imports this one)
MANIFEST_FILE_NAME = "manifest.json"


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


def export_ensemble(settings, target: Path) -> None:
    """Export the S checkpoints to target/<stage>/checkpoint.pt and write target/manifest.json from
    what the checkpoints (seeds, flags) and the evaluation's results.json (L) record."""
    # An interrupted export must not leave an earlier manifest naming newly written files.
    (target / MANIFEST_FILE_NAME).unlink(missing_ok=True)
    members, first_args = [], None
    for stage, source in zip(settings.member_names(), settings.member_checkpoints()):
        path = f"{stage}/{CHECKPOINT_FILE_NAME}"
        checkpoint = export_for_evaluation(source, target / path)
        members.append(_member_entry(path, checkpoint))
        first_args = first_args or checkpoint["args"]
    results = json.loads((settings.out / "results" / "results.json").read_text(encoding="utf-8"))
    manifest = {"checkpoints": [member["checkpoint"] for member in members],
                "dataset": data_set_of(first_args), "seeds": [member["seed"] for member in members],
                "members": members, "train_args": _training_flags(first_args),
                "eval_defaults": {"num_iw_samples": results["L"]}}
    atomic_write_text(target / MANIFEST_FILE_NAME, json.dumps(manifest, indent=2) + "\n",
                      record_sha256=False)


def export_stoppable(settings) -> int:
    """export_ensemble that answers SIGINT/SIGTERM at once: says what was kept, returns 130/143."""
    try:
        with signals_raise():
            export_ensemble(settings, settings.export)
    except StopSignal as stop:
        finished = (settings.export / MANIFEST_FILE_NAME).is_file()
        state = ("it had finished (manifest.json written)" if finished else
                 "it has no manifest.json yet (each file in it is complete or absent)")
        print(f"{PROG}: export to {settings.export} stopped by {stop.name}. Kept: every trained "
              f"checkpoint and the results in {settings.out}; as for the export, {state}. Run the "
              f"same command again to export.", file=sys.stderr)
        return stop.exit_code
    return 0
