"""benchmarks/eval_speed.py: the gate refuses to print a speed when the methods disagree beyond
its tolerance (a wrong "ours" must fail the benchmark, not make it look fast), the breakdown of
ours is measured and counted consistently, and render_markdown shows the stored figures."""
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ensemble_helpers import make_members, one_torch_thread, tiny_args  # noqa: F401
from miselbo.ensemble.log_weights import Ensemble

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--batch_size", "2", "--num_samples", "3", "--chunk_size", "2", "--threads", "1"]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("eval_speed", REPO_ROOT / "benchmarks" / "eval_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_bench(monkeypatch, tmp_path):
    """The benchmark module on a tiny architecture, storing its record under tmp_path."""
    bench = _benchmark_module()
    monkeypatch.setattr(bench, "model_args", lambda: tiny_args())
    monkeypatch.setattr(bench.bench_record, "RESULTS_DIR", tmp_path)
    grad_enabled = torch.is_grad_enabled()
    yield bench
    torch.set_grad_enabled(grad_enabled)  # main() turns gradients off for the process


def _log_weights(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    log_p = -100 * torch.rand(4, 3, 2, generator=generator, dtype=torch.float64)  # [B, S, L]
    log_q = -50 * torch.rand(4, 3, 2, 3, generator=generator, dtype=torch.float64)  # [B, S, L, S]
    return log_p, log_q


def test_agreement_reports_the_largest_differences_computed_independently():
    bench = _benchmark_module()
    log_p, log_q = _log_weights()
    generator = torch.Generator().manual_seed(1)
    public_p = log_p + 0.01 * (torch.rand(log_p.shape, generator=generator, dtype=torch.float64) - 0.5)
    public_q = log_q + 0.04 * (torch.rand(log_q.shape, generator=generator, dtype=torch.float64) - 0.5)
    floor = log_p - 0.03 * torch.rand(log_p.shape, generator=generator, dtype=torch.float64)
    checked = bench.agreement(SimpleNamespace(log_p=log_p, log_q=log_q), (public_p, public_q), floor, 0.05)
    expected = max(max(abs(a - b) for a, b in zip(public_p.flatten().tolist(), log_p.flatten().tolist())),
                   max(abs(a - b) for a, b in zip(public_q.flatten().tolist(), log_q.flatten().tolist())))
    expected_floor = max(abs(a - b) for a, b in zip(floor.flatten().tolist(), log_p.flatten().tolist()))
    scale = max(max(abs(v) for v in public_p.flatten().tolist()), max(abs(v) for v in public_q.flatten().tolist()))
    assert checked["max_abs_diff"] == expected
    assert checked["floor_log_p_max_abs_diff"] == expected_floor
    assert checked["max_rel_diff"] == pytest.approx(expected / scale, rel=1e-12)
    assert 0.0 < expected <= 0.05 and 0.0 < expected_floor <= 0.05  # the case is a passing one


@pytest.mark.parametrize("where", ["log_p", "log_q", "floor", "nan"])
def test_a_difference_above_the_tolerance_or_nan_is_a_disagreement(where):
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
    with pytest.raises(bench.bench_record.Disagreement, match="above the tolerance 0.05 nats") as caught:
        bench.agreement(SimpleNamespace(log_p=log_p, log_q=log_q), (public_p, public_q), floor, 0.05)
    assert isinstance(caught.value, bench.WrongResult)


def test_main_refuses_a_wrong_ours_and_prints_no_speed(tiny_bench, tmp_path, capsys, monkeypatch):
    class OffByOneColumn(Ensemble):
        def log_weights(self, *args, **kwargs):
            out = super().log_weights(*args, **kwargs)
            return out._replace(log_q=out.log_q[..., [1, 0]])  # [B, S, L, S], members' columns swapped

    monkeypatch.setattr(tiny_bench, "Ensemble", OffByOneColumn)
    with pytest.raises(SystemExit) as stopped:
        tiny_bench.main(["--sizes", "2", *TINY_RUN])
    assert stopped.value.code == tiny_bench.bench_record.EXIT_DISAGREEMENT != 0
    out, err = capsys.readouterr()
    assert "RESULT" not in out and "ours/floor" not in out and "breakdown" not in out
    assert "FAILED" in err and "S=2" in err and "max |a - b|" in err
    assert not (tmp_path / "eval_speed.json").exists()


def test_main_stores_a_breakdown_that_matches_the_cost_model(tiny_bench, tmp_path, capsys):
    num_samples, chunk = 3, 2
    tiny_bench.main(["--sizes", "2", "3", *TINY_RUN])
    out = capsys.readouterr().out
    printed = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    record = json.loads((tmp_path / "eval_speed.json").read_text())
    assert record["benchmark"] == "eval_speed" and record["result"] == printed
    groups = len(make_members(1)[1][0].latent_shapes)
    for size in (2, 3):
        row = printed[str(size)]
        parts = row["breakdown"]
        assert set(parts["seconds"]) == set(tiny_bench.PARTS)
        counts = parts["counts_per_example"]
        assert counts["decoder_sample_passes"] == size * num_samples
        assert counts["encoder_passes"] == size
        assert counts["head_scorings"] == size * size * num_samples
        assert counts["flow_applications"] == counts["flow_inversions"] == 0  # no flows in the tiny model
        assert counts["groups"] == groups
        assert parts["decoder_calls"] == size * math.ceil(num_samples / chunk)
        seconds = parts["seconds"]
        for part in ("decoder", "encoder", "heads"):
            assert seconds[part] > 0, part
        assert seconds["flows"] == 0.0 and seconds["rest"] >= 0.0
        named = sum(value for part, value in seconds.items() if part != "rest")
        assert named <= parts["instrumented_s"]
        # the instrumented run is another run of (b): within generous slack of the timed one
        assert named <= 3 * row["ours_s"] + 0.25
        assert sum(parts["share"].values()) == pytest.approx(1.0)
        assert f"S={size}: breakdown of ours: decoder" in out
        # the stacked convolutions are a part of the heads, and the bound leaves out the rest of (b)
        assert 0 < parts["head_convolution_s"] <= seconds["heads"]
        expected_bound = (seconds["decoder"] + seconds["encoder"] + parts["head_convolution_s"]) / seconds["decoder"]
        assert parts["convolution_bound"] == pytest.approx(expected_bound)
        assert 1 < parts["convolution_bound"] <= parts["instrumented_s"] / seconds["decoder"]


def test_breakdown_counts_flows_and_inversions():
    _, members = make_members(3, seed=5, num_nf=1)
    bench = _benchmark_module()
    x = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) < 0.4).float()
    parts = bench.breakdown(Ensemble(members), x, num_samples=2, chunk=1, device=torch.device("cpu"))
    counts = parts["counts_per_example"]
    assert counts["flow_applications"] == 3 * 2 and counts["flow_inversions"] == 3 * 2 * 2
    assert counts["head_scorings"] == 3 * 3 * 2 and counts["decoder_sample_passes"] == 3 * 2
    assert {key: counts[key] for key in parts["cost_model"]} == parts["cost_model"]
    assert parts["seconds"]["flows"] > 0 and parts["decoder_calls"] == 3 * 2


def _hand_made_record():
    def row(size, public, ours, floor):
        seconds = {"decoder": 0.8 * ours, "encoder": 0.1 * ours, "heads": 0.06 * ours, "flows": 0.0,
                   "reductions": 0.01 * ours, "rest": 0.03 * ours}
        return {"S": size, "public_s": public, "ours_s": ours, "floor_s": floor, "public_over_ours": public / ours,
                "ours_over_floor": ours / floor, "max_abs_diff": 0.00378,
                "peak_mib": {"public": 172.1, "ours": 234.6, "floor": 204.0},
                "breakdown": {"instrumented_s": ours, "decoder_calls": size, "seconds": seconds,
                              "head_convolution_s": 0.04 * ours, "convolution_bound": (0.8 + 0.1 + 0.04) / 0.8,
                              "share": {part: value / ours for part, value in seconds.items()},
                              "counts_per_example": {"decoder_sample_passes": 8 * size, "encoder_passes": size,
                                                     "head_scorings": 8 * size * size, "flow_applications": 0,
                                                     "flow_inversions": 0, "groups": 15}}}
    return {"benchmark": "eval_speed", "command": "python benchmarks/eval_speed.py --quick --threads 1",
            "machine": {"cpu": "Test CPU 9000", "cores": 2, "torch_threads": 1, "memory_gib": 8.0, "torch": "2.9.9",
                        "python": "3.11.7", "device": "cpu", "gpu": None, "load_average": [0.25, 0.5, 1.5]},
            "commit": "abcdef123456", "dirty": False, "date": "the date of the run",
            "result": {"2": row(2, 6.30, 1.94, 1.55), "5": row(5, 41.06, 5.64, 4.35)}}


def test_render_markdown_shows_the_record():
    bench = _benchmark_module()
    text = bench.render_markdown(_hand_made_record())
    assert "| 2 | 6.30 | 1.94 | 1.55 | 3.25 | 1.252 | 0.0038 | 172 / 235 / 204 |" in text
    assert "| 5 | 41.06 | 5.64 | 4.35 | 7.28 | 1.297 |" in text
    assert "| 5 | heads | 0.338 | 6.0% | 200 (S² L head scorings" in text
    assert "| 2 | decoder | 1.552 | 80.0% | 16 (S L decoder sample passes) |" in text
    assert "| 5 | encoder | 0.564 | 10.0% | 5 (S encoder passes) |" in text
    assert "| 2 | rest | 0.058 | 3.0% |" in text
    assert "| 2 | 0.078 (67%) | 1.250 | 1.175 |" in text  # convolutions alone, b / decoder, the bound
