"""The benchmarks check their counts and seeds with the rule train.py, miselbo_eval.py and the
pipeline use (miselbo/runtime/flags.py): exit 2 naming the flag, before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, argv, expected", [
    ("eval_speed.py", ["--batch_size", "0"], "argument --batch_size: the value must be a whole number >= 1, got 0."),
    ("train_speed.py", ["--steps", "-2"], "argument --steps: the value must be a whole number >= 1, got -2."),
    ("joint_comparison.py", ["--seeds", "99999999999999999999"], "argument --seeds: the value must lie in 0 .. 4294967295"),
    ("large_ensemble.py", ["--num_samples", "x"], "argument --num_samples: a whole number is needed, got 'x'"),
])
def test_a_benchmark_refuses_a_bad_count_or_seed(script, argv, expected):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
