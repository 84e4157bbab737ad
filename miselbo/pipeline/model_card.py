"""The README.md of an exported ensemble folder, written by the export from what its manifest.json
and the evaluation's results.json record (nothing typed by hand, so it cannot drift from them)."""
from __future__ import annotations

import shlex

from miselbo.evaluation.report import format_table

# the pipeline's --out folder and the export folder, as the recorded command lines show them
OUT_PLACEHOLDER = "OUT"
FOLDER_PLACEHOLDER = "FOLDER"


def _member_rows(manifest: dict) -> list[str]:
    rows = ["| file | role | seed | epochs |", "|---|---|---|---|"]
    epochs = manifest.get("train_args", {}).get("epochs")
    for member in manifest["members"]:
        role = "decoder p_theta + first encoder" if member["role"] == "p_and_q" else "encoder against the frozen decoder"
        rows.append(f"| `{member['checkpoint']}` | {role} | {member['seed']} | {epochs} |")
    return rows


def _commands(manifest: dict) -> list[str]:
    lines = [shlex.join(manifest["pipeline_command"])]
    lines += [shlex.join(["python", "train.py", *stage["train.py"]]) for stage in manifest["stages"].values()]
    lines.append(shlex.join(["python", "miselbo_eval.py", *manifest["evaluation"]["miselbo_eval.py"]]))
    return lines


def _provenance(manifest: dict) -> str:
    package = manifest["package"]
    commit = package.get("commit") or "unknown (not a git checkout)"
    if package.get("dirty"):
        commit += " with uncommitted changes"
    return f"miselbo {package['version']}, commit {commit}"


def render_readme(name: str, manifest: dict, results: dict) -> str:
    """The folder's README.md: members, how they were made, and the table their evaluation printed."""
    defaults = manifest["eval_defaults"]
    fingerprints = {member["decoder_fingerprint"] for member in manifest["members"]}
    shared = (f"all {len(manifest['members'])} record the same decoder fingerprint `{fingerprints.pop()}`"
              if len(fingerprints) == 1 else "the members record different decoder fingerprints")
    lines = [f"# {name}: one decoder, {len(manifest['members'])} encoders", "",
             f"An NVAE ensemble exported by `python -m miselbo.pipeline --export` ({_provenance(manifest)}), "
             f"preset `{manifest['preset']}`, data set `{manifest['dataset']}`. This file and `manifest.json` "
             f"are written by that export; {shared}.", "", *_member_rows(manifest), "",
             "The checkpoints are NVAE checkpoints without optimizer state: `miselbo_eval.py` and NVAE's "
             "`evaluate.py` read them; they cannot be resumed (the commands below make resumable ones).",
             "", "## How it was made", "",
             f"The pipeline command, then the train.py and miselbo_eval.py commands it ran ({OUT_PLACEHOLDER} "
             f"stands for its --out folder, {FOLDER_PLACEHOLDER} for this folder):", "", "```bash", *_commands(manifest), "```", "",
             "## What its evaluation printed", "",
             f"`python miselbo_eval.py --checkpoints <this folder>` (or, for the folder `models/` holds, "
             f"`python miselbo_eval.py` alone) takes L = {defaults['num_iw_samples']}, batch size "
             f"{defaults.get('batch_size')} and chunk size {defaults.get('chunk_size')} from manifest.json, "
             "so it repeats this evaluation's draws (wall time aside):", "",
             "```", format_table(results), "```", ""]
    return "\n".join(lines)
