"""benchmarks/eval_speed.py refuses to print a speed-up when the methods disagree beyond its
tolerance (a wrong "ours" must fail the benchmark, not make it look fast)."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("eval_speed", REPO_ROOT / "benchmarks" / "eval_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log_weights(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    log_p = -100 * torch.rand(4, 3, 2, generator=generator, dtype=torch.float64)  # [B, S, L]
    log_q = -50 * torch.rand(4, 3, 2, 3, generator=generator, dtype=torch.float64)  # [B, S, L, S]
    return log_p, log_q


def test_agreeing_methods_pass_and_report_the_largest_difference():
    bench = _benchmark_module()
    log_p, log_q = _log_weights()
    public = (log_p + 0.001, log_q.clone())
    public[1][0, 0, 0, 0] -= 0.02
    checked = bench.agreement(SimpleNamespace(log_p=log_p, log_q=log_q), public, log_p, tolerance=0.05)
    assert checked["max_abs_diff"] == pytest.approx(0.02)
    assert checked["floor_log_p_max_abs_diff"] == 0 and checked["tolerance_nats"] == 0.05


@pytest.mark.parametrize("where", ["log_p", "log_q", "floor", "nan"])
def test_a_difference_above_the_tolerance_or_nan_is_a_wrong_result(where):
    bench = _benchmark_module()
    log_p, log_q = _log_weights()
    public_p, public_q, floor = log_p.clone(), log_q.clone(), log_p.clone()
    if where == "log_p":
        public_p[1, 2, 0] += 0.06
    elif where == "log_q":
        public_q = log_q[..., [1, 0, 2]]  # members' densities swapped: a plausible bug
    elif where == "floor":
        floor[0, 0, 1] -= 1.0
    else:
        public_q[2, 1, 1, 0] = float("nan")
    with pytest.raises(bench.WrongResult, match="above the tolerance 0.05 nats"):
        bench.agreement(SimpleNamespace(log_p=log_p, log_q=log_q), (public_p, public_q), floor, 0.05)
