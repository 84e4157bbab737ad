"""What each training stage of the main job was run with, kept in `<out>/pipeline_stages.json`, and
the comparison that refuses a re-run whose settings differ from a stage already in `<out>`.

A stage's settings are the values of every train.py flag its command line gives (typed, from the
preset, or train.py's default), except the flags that say where and how a run executes rather than
what it trains (output folders, devices, process counts, the data folder) and the flags that only
change what a run reports (its tests), not its weights. Comparing effective
values rather than command lines means `--epochs 8` typed and `--epochs 8` from the preset agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from miselbo.storage.checkpoints import read_checkpoint
from miselbo.errors import UserError
from miselbo.storage.safe_io import atomic_write_text
from miselbo.training.options import LOCAL_FLAGS, build_parser, data_set_of

RECORD_FILE_NAME = "pipeline_stages.json"
RECORD_FORMAT = 1
# Where and how a stage runs, not what it trains; p_and_q1_path follows from --out. The final test
# runs after the last checkpoint, and the per-epoch test on a subset leaves the weights bit-identical
# (tests/test_main_job.py), so neither test's size changes what a stage trains.
NOT_COMPARED = frozenset(LOCAL_FLAGS) | {"data", "p_and_q1_path", "final_iw_samples", "epoch_test_examples"}


@dataclass(frozen=True)
class Difference:
    """One flag whose value for a stage differs between the recorded run and this command."""
    flag: str
    recorded: Any
    now: Any

    def describe(self) -> str:
        return f"--{self.flag} {_shown(self.recorded)} (recorded) -> {_shown(self.now)} (now)"


def _shown(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def stage_settings(train_argv: Sequence[str]) -> dict[str, Any]:
    """{flag name: effective value} of a train.py command line, without the NOT_COMPARED flags."""
    parsed = vars(build_parser().parse_args(list(train_argv)))
    return {name: value for name, value in sorted(parsed.items()) if name not in NOT_COMPARED}


def read_record(out: Path) -> dict[str, dict]:
    """{stage: {"train.py": argv, "settings": {...}}} from `out`, {} when there is no record yet."""
    path = out / RECORD_FILE_NAME
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        stages = content["stages"]
        if not isinstance(stages, dict) or not all(isinstance(v.get("settings"), dict) for v in stages.values()):
            raise ValueError("'stages' must map stage names to {'train.py': [...], 'settings': {...}}")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"cannot read the pipeline's stage record {path}: {err}. Fix or delete it (the "
                        f"stages' settings are then compared with their checkpoints), or use a new "
                        f"--out.") from err
    return stages


def record_stage(out: Path, stage: str, train_argv: Sequence[str]) -> None:
    """Store `stage`'s command line and settings in the record (atomic rewrite of the JSON)."""
    stages = read_record(out)
    stages[stage] = {"train.py": list(train_argv), "settings": stage_settings(train_argv)}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": RECORD_FORMAT, "stages": stages}, indent=2) + "\n"
    atomic_write_text(out / RECORD_FILE_NAME, text, record_sha256=False)


def recorded_settings(out: Path, stage: str, checkpoint: Path) -> dict[str, Any] | None:
    """The settings `stage` was trained with: from the record, else (a folder from before records
    were kept) from the namespace its checkpoint stores; None when the stage has neither."""
    entry = read_record(out).get(stage)
    if entry is not None:
        return entry["settings"]
    if not checkpoint.is_file():
        return None
    stored = read_checkpoint(checkpoint)["args"]
    settings = dict(vars(stored))
    settings["dataset"] = data_set_of(stored)
    return settings


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[Difference]:
    """Flags of `now` whose recorded value differs (flags the record lacks are not compared)."""
    return [Difference(flag, recorded[flag], value) for flag, value in now.items()
            if flag in recorded and recorded[flag] != value]


def refusal(out: Path, changed: dict[str, list[Difference]], retrain_flag: str) -> UserError:
    """The exit-2 error for a re-run whose settings differ, naming every flag and the ways forward."""
    lines = "; ".join(f"stage {stage}: " + ", ".join(d.describe() for d in diffs)
                      for stage, diffs in changed.items())
    return UserError(
        f"{out} already holds stages trained with other settings than this command gives: {lines}. "
        f"Nothing was run. Either write this run to a new --out folder, or add {retrain_flag} to "
        f"retrain the changed stages and every stage after them (their old folders are kept, renamed "
        f"to eval-<stage>.replaced-<time>).")
