"""Large ensembles: time and peak memory of A2A MISELBO and of S2A on active subsets, S up to 64.

For each ensemble size S: S encoders of the `demo` architecture (miselbo/pipeline/presets.py, random weights
from seeds 0..S-1) sharing member 0's decoder, one batch of real binarised mnist5k test digits, L
samples per sampled member, and three evaluations through `Ensemble.reduced_weights` (the
evaluator's path, memory linear in S):

  a2a     every member sampled for every example: S x L decoder samples per example, each scored
          under all S posteriors (MISELBO, pooled, IWELBO, ... come from these);
  s2a A   each example draws A of the S members (per example, seeded) and only those are sampled:
          A x L decoder samples per example, still scored under all S posteriors (S2A; S2S uses the
          same passes).

Each is warmed up untimed once at the smallest S, then timed once per S (run the full
version on a quiet machine). ideal_ratio = A / S is the share of decoder samples S2A needs; the
S bottom-up passes per batch and the S posterior heads per group are paid by both.

Peak memory: `benchmarks/eval_speed.py`'s meter (CUDA allocator peak, or on CPU the RSS sampled
every 2 ms above the level just before the call after malloc_trim), so the model weights are
excluded; it is reported per S as the largest of the three calls. Memory linear in S means
peak(S = 64) / peak(S = 16) <= 4.5 (4 is linear).

The last line printed is `RESULT {json}` keyed by S (string): a2a_seconds, s2a_seconds {A: s},
s2a_over_a2a {A: ratio}, ideal_ratio {A: A / S}, peak_mib, and for S = 64 also
peak_64_over_16 when both were run.

    python benchmarks/large_ensemble.py            # S in {8, 16, 32, 64}, L = 32, batch 16
    python benchmarks/large_ensemble.py --quick    # S in {8, 32}, L = 32, batch 16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import measured  # noqa: E402
from miselbo.runtime.cli import resolve_device  # noqa: E402
from miselbo.data.datasets import load_dataset  # noqa: E402
from miselbo.ensemble.log_weights import Ensemble  # noqa: E402
from miselbo.ensemble.shared_decoder import share_decoder  # noqa: E402
from miselbo.evaluation.examples import EvaluationExamples  # noqa: E402
from miselbo.nvae.config import get_arch_cells  # noqa: E402
from miselbo.nvae.model import AutoEncoder  # noqa: E402
from miselbo.pipeline.presets import DEMO  # noqa: E402
from miselbo.runtime import flags  # noqa: E402

ACTIVE_COUNTS = (1, 4)
SUBSET_SEED, DRAW_SEED = 1, 0


def build_ensemble(size: int, device: torch.device) -> Ensemble:
    """S demo-architecture members from seeds 0..S-1, all using member 0's decoder."""
    args = DEMO.nvae_args(dataset="mnist")
    members = []
    for seed in range(size):
        torch.manual_seed(seed)
        member = AutoEncoder(args, None, get_arch_cells(args.arch_instance)).to(device).eval()
        if members:
            share_decoder(members[0], member)
        members.append(member)
    return Ensemble(members)


def random_subsets(batch: int, size: int, active: int) -> torch.Tensor:
    """[B, S] bool: A members per example, uniform without replacement, seeded."""
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    mask = torch.zeros(batch, size, dtype=torch.bool)
    for row in range(batch):
        mask[row, torch.randperm(size, generator=generator)[:active]] = True
    return mask


def run_one_size(ensemble: Ensemble, x: torch.Tensor, num_samples: int, device: torch.device) -> dict:
    """Times and peaks of a2a and of s2a for each A (one timed call each)."""
    def call(active):
        generator = torch.Generator(device=device).manual_seed(DRAW_SEED)
        return lambda: ensemble.reduced_weights(x, num_samples, generator, active=active)

    size = ensemble.num_members
    a2a_seconds, a2a_peak, _ = measured(call(None), device)
    row = {"a2a_seconds": a2a_seconds, "s2a_seconds": {}, "s2a_over_a2a": {}, "ideal_ratio": {}}
    peaks = [a2a_peak]
    for active in ACTIVE_COUNTS:
        if active > size:
            continue
        mask = random_subsets(x.shape[0], size, active).to(device)
        seconds, peak, reduced = measured(call(mask), device)
        assert torch.isfinite(reduced.log_p[mask]).all() and torch.isnan(reduced.log_p[~mask]).all()
        row["s2a_seconds"][str(active)] = seconds
        row["s2a_over_a2a"][str(active)] = seconds / a2a_seconds
        row["ideal_ratio"][str(active)] = active / size
        peaks.append(peak)
    row["peak_mib"] = max(peaks) / 2 ** 20
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S in {8, 32} only")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="ensemble sizes S")
    parser.add_argument("--batch_size", type=flags.count_argument, default=16)
    parser.add_argument("--num_samples", type=flags.count_argument, default=32, help="L per sampled member")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    sizes = options.sizes or ([8, 32] if options.quick else [8, 16, 32, 64])
    device = resolve_device(options.device)
    data = load_dataset("mnist5k", ".", False, options.batch_size * 8)
    examples = EvaluationExamples(data, "mnist5k", 0, 8)
    x = examples.batch(0, options.batch_size).to(device)  # [B, 1, 32, 32]
    print(f"demo architecture, random weights; B = {options.batch_size}, L = {options.num_samples}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    results = {}
    for index, size in enumerate(sizes):
        began = time.perf_counter()
        ensemble = build_ensemble(size, device)
        if index == 0:  # warm-up, untimed
            ensemble.reduced_weights(x, options.num_samples, torch.Generator(device=device).manual_seed(0))
        row = run_one_size(ensemble, x, options.num_samples, device)
        results[str(size)] = row
        ratios = ", ".join(f"A={a}: {row['s2a_seconds'][a]:.2f} s ({row['s2a_over_a2a'][a]:.3f} of a2a, ideal "
                           f"{row['ideal_ratio'][a]:.3f})" for a in row["s2a_seconds"])
        print(f"S = {size:>3}: a2a {row['a2a_seconds']:.2f} s | s2a {ratios} | peak {row['peak_mib']:.1f} MiB "
              f"| {time.perf_counter() - began:.0f} s with building")
        del ensemble
    if "16" in results and "64" in results:
        results["64"]["peak_64_over_16"] = results["64"]["peak_mib"] / max(results["16"]["peak_mib"], 1e-9)
    print("RESULT " + json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
