"""Separate vs joint training of three encoders against one frozen decoder (train.py
--num_new_encoders).

Configurations, each for every base seed s (components get seeds s, s + 1, s + 2):
  (a) separate     three `train.py --train_new_q` runs, seeds s, s + 1, s + 2 (the pipeline's default)
  (b) independent  one run, `--num_new_encoders 3 --mixture_objective independent`
  (c) miselbo      one run, `--num_new_encoders 3 --mixture_objective miselbo`
  (d) s2a          one run, `--num_new_encoders 3 --mixture_objective s2a --num_active 1`
All train against the same parent decoder with the parent's schedule (inherited flags), so every
encoder makes the same number of optimizer updates (epochs x steps per epoch; in s2a each step
draws from one component, but every component is updated through the mixture). Each trio of
encoders (without the parent) is then evaluated by `miselbo_eval.py` on the test digits: MISELBO,
pooled, average IWELBO, average ELBO and JSD (nats), plus the training wall time.

Default: the parent is models/mnist5k_demo/p_and_q1 (the demo preset, mnist5k), all 1,000 test
digits, L = 20, seeds 1 and 4. `--quick` trains a tiny parent and runs every configuration for
one short epoch on 64 images, evaluating 16 test digits at L = 2 (a smoke test of the script,
not a measurement).

Runs go to <--out>/full or, with --quick, <--out>/quick (default --out runs/joint_comparison).
Every (configuration, seed) is keyed by all settings that change its numbers (record_settings:
the configuration and its flags, the seed, the number of encoders, quick or full with its data
flags, the parent checkpoint's SHA-256, the per-epoch test size, L, the number of test digits,
the chunk size and the evaluation seed): the key's hash is part of its folder and file names and
the settings are stored in its record, and a finished record is reused only when its stored
settings equal the run's (reusable_record); otherwise it is measured again.

Output: one row per configuration (mean +- spread over seeds, the spread being half the range),
then `RESULT {json}` with the settings and every per-seed number, stored in
benchmarks/results/joint_comparison.json (--quick: joint_comparison_quick.json).

    python benchmarks/joint_comparison.py [--quick] [--seeds 1 4] [--out DIR] [--parent DIR]
                                          [--num_iw_samples 20] [--num_examples 1000]
                                          [--eval_chunk_size C] [--epoch_test_examples 100]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402

from miselbo.pipeline.presets import TINY  # noqa: E402
from miselbo.runtime import flags  # noqa: E402

NUM_ENCODERS = 3
CONFIGURATIONS = {
    "separate": None,
    "independent": ["--mixture_objective", "independent"],
    "miselbo": ["--mixture_objective", "miselbo"],
    "s2a": ["--mixture_objective", "s2a", "--num_active", "1"],
}
ESTIMATORS = ("miselbo", "pooled", "avg_iwelbo", "avg_elbo", "jsd")
QUICK_DATA = ["--num_train_examples", "64", "--num_test_examples", "16", "--final_iw_samples", "2"]
EVAL_SEED = 0
# the settings that change a trained trio (the rest of record_settings changes only its evaluation)
TRAINING_SETTINGS = ("configuration", "configuration_flags", "seed", "num_encoders", "quick", "data_flags",
                     "parent_sha256", "epoch_test_examples")


def _run(command: list, log_file: Path) -> float:
    """Run a command from the repository root, output to log_file; wall seconds. Fails loudly."""
    began = time.perf_counter()
    with open(log_file, "w") as log:
        done = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, CI=os.environ.get("CI", "true")))
    if done.returncode != 0:
        raise SystemExit(f"command failed (exit {done.returncode}), see {log_file}:\n  {' '.join(command)}")
    return time.perf_counter() - began


def train_command(out: Path, parent: Path, save: str, seed: int, extra: list, options) -> list:
    return [sys.executable, "train.py", "--train_new_q", "--p_and_q1_path", str(parent), "--root", str(out),
            "--save", save, "--seed", str(seed), "--epoch_test_examples", str(options.epoch_test_examples),
            *extra, *(QUICK_DATA if options.quick else [])]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_settings(name: str, seed: int, options, parent_sha256: str) -> dict:
    """Everything that changes the numbers of one (configuration, seed) record."""
    return {"configuration": name, "configuration_flags": CONFIGURATIONS[name], "seed": seed,
            "num_encoders": NUM_ENCODERS, "quick": options.quick, "data_flags": QUICK_DATA if options.quick else [],
            "parent_sha256": parent_sha256, "epoch_test_examples": options.epoch_test_examples,
            "L": options.num_iw_samples, "num_examples": options.num_examples,
            "eval_chunk_size": options.eval_chunk_size, "eval_seed": EVAL_SEED}


def settings_key(settings: dict, names=None) -> str:
    """A short hash of the settings (of those `names` only, when given)."""
    chosen = {key: settings[key] for key in (names or sorted(settings))}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


def record_path(out: Path, settings: dict) -> Path:
    return out / f"{settings['configuration']}-s{settings['seed']}-{settings_key(settings)}.record.json"


def reusable_record(path: Path, settings: dict) -> dict | None:
    """The record stored at `path` if it was made under exactly `settings`, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("settings") == settings else None


def output_dir(options) -> Path:
    """--quick and full runs never share a folder."""
    return Path(options.out) / ("quick" if options.quick else "full")


def train_configuration(settings: dict, options, parent: Path) -> tuple[list, float]:
    """Train one configuration for one base seed; (three checkpoint folders, training seconds).
    The run folders are named by the training settings' key, so other settings never resume them."""
    out, name, seed = output_dir(options), settings["configuration"], settings["seed"]
    key = settings_key(settings, TRAINING_SETTINGS)
    if CONFIGURATIONS[name] is None:
        folders, seconds = [], 0.0
        for index in range(NUM_ENCODERS):
            save = f"separate-s{seed}-{key}-q{index + 1}"
            folders.append(out / f"eval-{save}")
            command = train_command(out, parent, save, seed + index, [], options)
            seconds += _run(command, out / f"{save}.log")
        return folders, seconds
    save = f"{name}-s{seed}-{key}"
    extra = ["--num_new_encoders", str(NUM_ENCODERS), *CONFIGURATIONS[name]]
    seconds = _run(train_command(out, parent, save, seed, extra, options), out / f"{save}.log")
    return [out / f"eval-{save}" / f"component-{i + 1}" for i in range(NUM_ENCODERS)], seconds


def evaluate(folders: list, result_dir: Path, options) -> dict:
    command = [sys.executable, "miselbo_eval.py", "--checkpoints", *map(str, folders),
               "--num_iw_samples", str(options.num_iw_samples), "--num_examples", str(options.num_examples),
               "--seed", str(EVAL_SEED), "--save", str(result_dir)]
    if options.eval_chunk_size:
        command += ["--chunk_size", str(options.eval_chunk_size)]
    _run(command, result_dir.parent / f"{result_dir.name}.log")
    return json.loads((result_dir / "results.json").read_text())


def measure(name: str, seed: int, options, parent: Path, parent_sha256: str) -> dict:
    """Per-seed numbers of one configuration (reused from an earlier run under the same settings)."""
    settings = record_settings(name, seed, options, parent_sha256)
    record_file = record_path(output_dir(options), settings)
    reused = reusable_record(record_file, settings)
    if reused is not None:
        return reused
    folders, seconds = train_configuration(settings, options, parent)
    values = evaluate(folders, output_dir(options) / f"results-{name}-s{seed}-{settings_key(settings)}", options)
    record = {"configuration": name, "seed": seed, "train_wall_s": seconds,
              **{key: values["estimators"][key]["mean"] for key in ESTIMATORS},
              "stderr": {key: values["estimators"][key]["stderr"] for key in ESTIMATORS},
              "num_examples": values["num_examples"], "L": values["L"], "S": values["S"], "settings": settings}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def quick_parent(out: Path) -> Path:
    folder = out / "eval-parent"
    if not (folder / "checkpoint.pt").exists():
        _run([sys.executable, "train.py", "--root", str(out), "--save", "parent", "--dataset", TINY.dataset,
              *TINY.architecture, *TINY.schedule, *QUICK_DATA], out / "parent.log")
    return folder


def summarise(records: list) -> dict:
    """name -> {quantity: (mean, half range)} over seeds."""
    table = {}
    for name in CONFIGURATIONS:
        rows = [r for r in records if r["configuration"] == name]
        table[name] = {}
        for key in (*ESTIMATORS, "train_wall_s"):
            values = [r[key] for r in rows]
            table[name][key] = (sum(values) / len(values), (max(values) - min(values)) / 2)
    return table


def print_table(table: dict, options) -> None:
    print(f"three encoders against one decoder; {len(options.seeds)} seed(s) {options.seeds}; "
          f"L = {options.num_iw_samples}, {options.num_examples} test digits; mean +- half range (nats)")
    header = ["configuration", *ESTIMATORS, "train wall s"]
    print(" | ".join(f"{h:>20}" for h in header))
    for name, row in table.items():
        cells = [f"{row[key][0]:>11.4f} +- {row[key][1]:.4f}" for key in (*ESTIMATORS, "train_wall_s")]
        print(" | ".join([f"{name:>20}", *cells]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not a measurement)")
    parser.add_argument("--seeds", type=flags.seed_argument, nargs="+", default=None, help="base seeds (default 1 4)")
    parser.add_argument("--out", default="runs/joint_comparison")
    parser.add_argument("--parent", default=None, help="parent run folder (default: the shipped demo's "
                        "p_and_q1; with --quick a tiny parent trained here)")
    parser.add_argument("--num_iw_samples", type=flags.count_argument, default=None, help="L (default 20; --quick 2)")
    parser.add_argument("--num_examples", type=flags.count_argument, default=None, help="test digits (default 1000; --quick 16)")
    parser.add_argument("--eval_chunk_size", type=int, default=None,
                        help="miselbo_eval.py --chunk_size (samples per example in one decoder pass; "
                             "larger passes are faster for the small demo model; changes only the draws)")
    parser.add_argument("--epoch_test_examples", type=int, default=100,
                        help="test digits of the test after each epoch (train.py flag; the trained weights do "
                             "not depend on it; the final test of each run uses all test digits)")
    options = parser.parse_args(argv)
    options.seeds = options.seeds or [1, 4]
    options.num_iw_samples = options.num_iw_samples or (2 if options.quick else 20)
    options.num_examples = options.num_examples or (16 if options.quick else 1000)
    out = output_dir(options)
    out.mkdir(parents=True, exist_ok=True)
    if options.parent:
        parent = Path(options.parent)
    else:
        parent = quick_parent(out) if options.quick else REPO_ROOT / "models" / "mnist5k_demo" / "p_and_q1"
    parent_sha256 = sha256_of(parent / "checkpoint.pt" if parent.is_dir() else parent)
    records = [measure(name, seed, options, parent, parent_sha256) for name in CONFIGURATIONS for seed in options.seeds]
    table = summarise(records)
    print_table(table, options)
    shown = parent.resolve()
    shown = shown.relative_to(REPO_ROOT) if shown.is_relative_to(REPO_ROOT) else shown
    result = {"quick": options.quick, "parent": str(shown), "parent_sha256": parent_sha256, "seeds": options.seeds,
              "L": options.num_iw_samples, "num_examples": options.num_examples,
              "eval_chunk_size": options.eval_chunk_size, "epoch_test_examples": options.epoch_test_examples,
              "records": records}
    bench_record.save("joint_comparison", result, "cpu", argv=sys.argv[1:] if argv is None else list(argv),
                      stored_as="joint_comparison_quick" if options.quick else None)
    return 0


LABELS = {"separate": "(a) 3 separate `--train_new_q` runs", "independent": "(b) joint, `independent`",
          "miselbo": "(c) joint, `miselbo`", "s2a": "(d) joint, `s2a` A = 1"}


def render_markdown(record: dict) -> str:
    """The stored result's table for docs/benchmarks.md (benchmarks/report.py adds the header)."""
    result = record["result"]
    table = summarise(result["records"])
    lines = [f"{'Quick smoke run (tiny parent, not a measurement)' if result['quick'] else 'Parent'} "
             f"`{result['parent']}` (SHA-256 {result['parent_sha256'][:12]}...), base seeds {result['seeds']}, "
             f"L = {result['L']}, {result['num_examples']} test digits; mean ± half range over the seeds (nats).", "",
             "| configuration | MISELBO | pooled | avg IWELBO | avg ELBO | JSD | training wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        cells = [f"{row[key][0]:.4f} ± {row[key][1]:.4f}" for key in ESTIMATORS]
        wall = row["train_wall_s"]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {wall[0]:.0f} ± {wall[1]:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
