"""Where the main job's wall time goes: every pipeline stage and, inside training, the parts.

    python benchmarks/main_job.py                       # the whole demo main job (minutes)
    python benchmarks/main_job.py --quick               # demo architecture, 1 short epoch per stage
    python benchmarks/main_job.py --threads 1 -- --epochs 1   # flags after -- go to the pipeline

Runs `python -m miselbo.pipeline` in a fresh process (so thread settings apply from the start)
into a new folder, then reads the `stage_times.json` it writes: per stage the wall seconds, and
for training stages steps (including data loading), data_loading on its own, epoch_tests,
checkpoints and final_test. `--threads N` sets torch's intra-op threads (OMP_NUM_THREADS and
MKL_NUM_THREADS) and `--omp_passive` sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep
instead of spinning), so CPU settings can be compared on one machine. The last line printed
is `RESULT {json}`: {"stages": {stage: {part: seconds}}, "total": seconds, "wall_seconds": the
subprocess's wall time, "settings": ...}. Times depend on the machine and on its load.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 short epoch per stage: " + " ".join(QUICK_FLAGS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--omp_passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--out", default=None, help="pipeline output folder (default: a new temporary one)")
    parser.add_argument("pipeline_flags", nargs="*", help="after --: flags for python -m miselbo.pipeline")
    args = parser.parse_args()
    flags = (QUICK_FLAGS if args.quick else []) + list(args.pipeline_flags)
    with tempfile.TemporaryDirectory(prefix="main_job_") as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "run"
        if (out / "eval-p_and_q1").exists():
            raise SystemExit(f"{out} already holds a run; the benchmark needs a fresh folder")
        wall = run_main_job(out, flags, pipeline_env(args.threads, args.omp_passive))
        times = json.loads((out / "stage_times.json").read_text(encoding="utf-8"))
    result = dict(times, wall_seconds=wall,
                  settings={"quick": args.quick, "threads": args.threads,
                            "omp_passive": args.omp_passive, "pipeline_flags": flags,
                            "cpu_count": os.cpu_count()})
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
