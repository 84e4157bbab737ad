"""Where the main job's wall time goes: every pipeline stage and, inside training, the parts.

    python benchmarks/main_job.py                       # the whole demo main job (minutes)
    python benchmarks/main_job.py --quick               # demo architecture, 1 short epoch per stage
    python benchmarks/main_job.py --threads 1 -- --epochs 1   # flags after -- go to the pipeline
    python benchmarks/main_job.py -- --export models/mnist5k_demo   # the job that makes the shipped ensemble

Runs `python -m miselbo.pipeline` in a fresh process (so thread settings apply from the start)
into a new folder, then reads the `stage_times.json` it writes: per stage the wall seconds, and
for training stages steps (including data loading), data_loading on its own, epoch_tests,
checkpoints and final_test. `--threads N` sets torch's intra-op threads (OMP_NUM_THREADS and
MKL_NUM_THREADS) and `--omp_passive` sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep
instead of spinning), so CPU settings can be compared on one machine. It also reads the
evaluation's table from `<out>/results/results.json`. The last line printed is `RESULT {json}`:
{"stages": {stage: {part: seconds}}, "total": seconds, "wall_seconds": the subprocess's wall
time, "evaluation": the table (each estimator's mean and stderr, each member's IWELBO and
stderr, S, L, examples), "settings": the flags and thread settings}, stored in
benchmarks/results/main_job.json. Times depend on the machine and on its load.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402
import torch  # noqa: E402

ESTIMATORS = ("miselbo", "pooled", "avg_iwelbo", "avg_elbo", "jsd")
# One short epoch on 640 training images and a 100-image evaluation with the demo architecture.
QUICK_FLAGS = ["--epochs", "1", "--num_train_examples", "640", "--num_test_examples", "200",
               "--num_eval_examples", "100", "--num_iw_samples", "4"]


def pipeline_env(threads: int | None, omp_passive: bool) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run_main_job(out: Path, pipeline_flags: list[str], env: dict[str, str]) -> float:
    """Run the pipeline into `out`; returns its wall seconds; raises on a non-zero exit."""
    command = [sys.executable, "-m", "miselbo.pipeline", "--out", str(out), *pipeline_flags]
    print("running:", " ".join(command), flush=True)
    began = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - began


def evaluation_table(results_file: Path) -> dict | None:
    """The evaluation's figures from the pipeline's results.json (None when it wrote none)."""
    if not results_file.is_file():
        return None
    values = json.loads(results_file.read_text(encoding="utf-8"))
    table = {"S": values["S"], "L": values["L"], "num_examples": values["num_examples"],
             "wall_seconds": values.get("wall_seconds"),  # the evaluation's own header line
             "estimators": {name: {"mean": values["estimators"][name]["mean"],
                                   "stderr": values["estimators"][name]["stderr"]} for name in ESTIMATORS},
             "iwelbo_per_member": values["iwelbo_per_member"],
             "iwelbo_per_member_stderr": values["iwelbo_per_member_stderr"]}
    if "delta" in values:
        table.update(delta=values["delta"], delta_stderr=values.get("delta_stderr"))
    return table


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 short epoch per stage: " + " ".join(QUICK_FLAGS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--omp_passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--out", default=None, help="pipeline output folder (default: a new temporary one)")
    parser.add_argument("pipeline_flags", nargs="*", help="after --: flags for python -m miselbo.pipeline")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_options(argv)
    flags = (QUICK_FLAGS if args.quick else []) + list(args.pipeline_flags)
    with tempfile.TemporaryDirectory(prefix="main_job_") as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "run"
        if (out / "eval-p_and_q1").exists():
            raise SystemExit(f"{out} already holds a run; the benchmark needs a fresh folder")
        wall = run_main_job(out, flags, pipeline_env(args.threads, args.omp_passive))
        times = json.loads((out / "stage_times.json").read_text(encoding="utf-8"))
        evaluation = evaluation_table(out / "results" / "results.json")
    result = dict(times, wall_seconds=wall, evaluation=evaluation,
                  settings={"quick": args.quick, "threads": args.threads,
                            "omp_passive": args.omp_passive, "pipeline_flags": flags,
                            "cpu_count": os.cpu_count()})
    if args.threads is not None:  # the record's machine line names the pipeline's thread count
        torch.set_num_threads(args.threads)
    bench_record.save("main_job", result, "cpu", argv=sys.argv[1:] if argv is None else list(argv))
    return 0


PART_ORDER = ("data_loading", "steps", "epoch_tests", "checkpoints", "final_test")


def _stage_order(stage: str) -> tuple:
    """Training stages by name, then the side-by-side row, then the evaluation (the stored JSON
    keeps its keys sorted, not in the pipeline's order)."""
    return ({"(side by side)": 1, "evaluation": 2}.get(stage, 0), stage)


def _stage_rows(result: dict) -> list[str]:
    total = result["total"]
    rows = ["| stage | seconds | share | parts (seconds) |", "|---|---|---|---|"]
    for stage in sorted(result["stages"], key=_stage_order):
        parts = result["stages"][stage]
        names = [name for name in PART_ORDER if name in parts] + sorted(set(parts) - {"total", *PART_ORDER})
        details = ", ".join(f"{name} {parts[name]:.1f}" for name in names)
        rows.append(f"| {stage} | {parts['total']:.1f} | {100 * parts['total'] / total:.1f}% | {details} |")
    rows.append(f"| all | {total:.1f} | 100.0% | |")
    return rows


def _evaluation_rows(evaluation: dict) -> list[str]:
    rows = [f"Evaluation: S = {evaluation['S']}, L = {evaluation['L']}, {evaluation['num_examples']} test digits.", "",
            "| estimator | mean (nats) | stderr |", "|---|---|---|"]
    rows += [f"| {name} | {evaluation['estimators'][name]['mean']:.4f} | {evaluation['estimators'][name]['stderr']:.4f} |"
             for name in ESTIMATORS]
    rows += [f"| iwelbo q{index + 1} | {mean:.4f} | {stderr:.4f} |" for index, (mean, stderr)
             in enumerate(zip(evaluation["iwelbo_per_member"], evaluation["iwelbo_per_member_stderr"]))]
    if evaluation.get("delta") is not None:
        rows.append(f"| delta = miselbo - avg_iwelbo | {evaluation['delta']:.4f} | {evaluation['delta_stderr']:.4f} |")
    return rows


def render_markdown(record: dict) -> str:
    """The stored result's tables for docs/benchmarks.md (benchmarks/report.py adds the header)."""
    result = record["result"]
    flags = " ".join(result["settings"]["pipeline_flags"]) or "(none)"
    lines = [f"Pipeline flags: `{flags}`; wall clock of `python -m miselbo.pipeline`: "
             f"**{result['wall_seconds']:.1f} s**. Stages (q2 and q3 side by side: the `(side by side)` row, "
             "not their sum, counts towards `all`):", "", *_stage_rows(result), ""]
    evaluation = result.get("evaluation")
    lines += _evaluation_rows(evaluation) if evaluation else ["The run wrote no evaluation table."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
