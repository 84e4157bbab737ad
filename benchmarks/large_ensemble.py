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

Gate, before any time is printed (otherwise the benchmark says which check failed and exits 1):
(1) at the smallest S, S2A with A = S (every member active, untimed) gives A2A's tensors
log_p, log_q_own and log_q_mix within A_EQUALS_S_TOLERANCE_NATS (the same draws; only float
rounding may differ); (2) at every S and A < S, S2A's mean over the examples (each with its own
random subset) lies within MC_STANDARD_ERRORS standard errors of MISELBO's mean on the same
examples (the paired per-example difference; S2A is unbiased for MISELBO over the subsets);
(3) S2A's rows are finite inside each example's subset and NaN outside it.

The last line printed is `RESULT {json}`: "sizes" keyed by S (string): a2a_seconds, s2a_seconds
{A: s}, s2a_over_a2a {A: ratio}, ideal_ratio {A: A / S}, peak_mib, s2a_minus_miselbo {A: mean,
stderr}, and for S = 64 also peak_64_over_16 when both were run; "gate" and the settings. It is
stored in benchmarks/results/large_ensemble.json.

    python benchmarks/large_ensemble.py            # S in {8, 16, 32, 64}, L = 32, batch 16
    python benchmarks/large_ensemble.py --quick    # S in {8, 32}, L = 32, batch 16
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402
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
# S2A with every member active samples every member for every example with the same generator as
# A2A, so the tensors can differ by float rounding only (float32 passes reduced in float64).
A_EQUALS_S_TOLERANCE_NATS = 1e-4
# S2A's per-example value is an unbiased estimate of MISELBO's over the random subsets and draws;
# its mean over B examples lies within a few standard errors of MISELBO's. With B = 16 the
# standard error is itself estimated from 16 heavy-tailed values (random-weight members differ by
# tens of nats), so the bound is 5 of them rather than a normal quantile: a wrong S2A (a lost
# mixture term, the wrong members' densities) misses MISELBO by far more.
MC_STANDARD_ERRORS = 5.0


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


def per_example_mixture_bound(reduced) -> torch.Tensor:
    """[B]: the mean over each example's sampled members of logmeanexp_l (log_p - log_q_mix):
    MISELBO for A2A, S2A for a subset (rows outside it are NaN and left out)."""
    log_w = reduced.log_p - reduced.log_q_mix  # [B, S, L]
    per_member = torch.logsumexp(log_w, dim=2) - math.log(log_w.shape[2])  # [B, S]
    return per_member.nanmean(dim=1)


def check_subset_rows(reduced, mask: torch.Tensor, active: int) -> None:
    """S2A's rows: finite inside each example's subset, NaN outside it (Disagreement otherwise)."""
    inside, outside = reduced.log_p[mask], reduced.log_p[~mask]
    if not (bool(torch.isfinite(inside).all()) and bool(torch.isnan(outside).all())):
        raise bench_record.Disagreement(f"S2A with A = {active}: rows inside the subsets are not all finite or rows "
                                        "outside them are not all NaN")


def check_s2a_mean(s2a, a2a, size: int, active: int) -> dict:
    """S2A's mean over the examples against MISELBO's, within MC_STANDARD_ERRORS paired standard
    errors (Disagreement otherwise); returns the difference's mean and standard error."""
    difference = (per_example_mixture_bound(s2a) - per_example_mixture_bound(a2a)).double()  # [B]
    if difference.numel() < 2:
        raise bench_record.Disagreement("the S2A check needs a batch of at least 2 examples")
    mean, stderr = float(difference.mean()), float(difference.std() / math.sqrt(difference.numel()))
    bench_record.check_close(f"S = {size}, A = {active}: S2A's mean over the examples against MISELBO's (nats; "
                             f"the bound is {MC_STANDARD_ERRORS:g} standard errors of {stderr:.3g})",
                             mean, 0.0, MC_STANDARD_ERRORS * stderr)
    return {"mean": mean, "stderr": stderr}


def check_all_active(ensemble: Ensemble, x: torch.Tensor, num_samples: int, device: torch.device) -> float:
    """S2A with every member active against A2A at the same draws (untimed); the largest
    difference over log_p, log_q_own and log_q_mix, or Disagreement above the tolerance."""
    def weights(active):
        generator = torch.Generator(device=device).manual_seed(DRAW_SEED)
        return ensemble.reduced_weights(x, num_samples, generator, active=active)

    a2a = weights(None)
    s2a = weights(torch.ones(x.shape[0], ensemble.num_members, dtype=torch.bool, device=device))
    largest = max(float((getattr(s2a, name) - getattr(a2a, name)).abs().max())
                  for name in ("log_p", "log_q_own", "log_q_mix"))
    bench_record.check_close(f"S = {ensemble.num_members}: S2A with A = S against A2A (largest difference, nats)",
                             largest, 0.0, A_EQUALS_S_TOLERANCE_NATS)
    return largest


def run_one_size(ensemble: Ensemble, x: torch.Tensor, num_samples: int, device: torch.device) -> dict:
    """Times and peaks of a2a and of s2a for each A (one timed call each), each s2a gated."""
    def call(active):
        generator = torch.Generator(device=device).manual_seed(DRAW_SEED)
        return lambda: ensemble.reduced_weights(x, num_samples, generator, active=active)

    size = ensemble.num_members
    a2a_seconds, a2a_peak, a2a = measured(call(None), device)
    row = {"a2a_seconds": a2a_seconds, "s2a_seconds": {}, "s2a_over_a2a": {}, "ideal_ratio": {},
           "s2a_minus_miselbo": {}}
    peaks = [a2a_peak]
    for active in ACTIVE_COUNTS:
        if active >= size:
            continue
        mask = random_subsets(x.shape[0], size, active).to(device)
        seconds, peak, reduced = measured(call(mask), device)
        check_subset_rows(reduced, mask, active)
        row["s2a_minus_miselbo"][str(active)] = check_s2a_mean(reduced, a2a, size, active)
        row["s2a_seconds"][str(active)] = seconds
        row["s2a_over_a2a"][str(active)] = seconds / a2a_seconds
        row["ideal_ratio"][str(active)] = active / size
        peaks.append(peak)
    row["peak_mib"] = max(peaks) / 2 ** 20
    return row


def measure_sizes(sizes: list[int], x: torch.Tensor, num_samples: int, device: torch.device) -> tuple[dict, dict]:
    """({S: row}, gate figures); raises bench_record.Disagreement before anything is printed."""
    rows, gate = {}, {}
    for index, size in enumerate(sizes):
        began = time.perf_counter()
        ensemble = build_ensemble(size, device)
        if index == 0:  # warm-up, untimed, and the A = S check
            gate = {"a_equals_s_size": size, "a_equals_s_max_abs_diff": check_all_active(ensemble, x, num_samples,
                                                                                         device)}
        rows[str(size)] = run_one_size(ensemble, x, num_samples, device)
        rows[str(size)]["seconds_with_building"] = time.perf_counter() - began
        print(f"S = {size}: measured, gate passed", flush=True)
        del ensemble
    gate.update(a_equals_s_tolerance_nats=A_EQUALS_S_TOLERANCE_NATS, mc_standard_errors=MC_STANDARD_ERRORS,
                passed=True)
    return rows, gate


def print_rows(rows: dict) -> None:
    for size, row in rows.items():
        ratios = ", ".join(f"A={a}: {row['s2a_seconds'][a]:.2f} s ({row['s2a_over_a2a'][a]:.3f} of a2a, ideal "
                           f"{row['ideal_ratio'][a]:.3f})" for a in row["s2a_seconds"])
        print(f"S = {size:>3}: a2a {row['a2a_seconds']:.2f} s | s2a {ratios} | peak {row['peak_mib']:.1f} MiB "
              f"| {row['seconds_with_building']:.0f} s with building")


def main(argv=None) -> int:
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
    try:
        rows, gate = measure_sizes(sizes, x, options.num_samples, device)
    except bench_record.Disagreement as error:
        bench_record.refuse("large_ensemble.py", error)
    print(f"gate: S2A with A = S equals A2A within {gate['a_equals_s_max_abs_diff']:.1e} nats (bound "
          f"{A_EQUALS_S_TOLERANCE_NATS:g}); S2A's means within {MC_STANDARD_ERRORS:g} standard errors of MISELBO's")
    print_rows(rows)
    if "16" in rows and "64" in rows:
        rows["64"]["peak_64_over_16"] = rows["64"]["peak_mib"] / max(rows["16"]["peak_mib"], 1e-9)
    result = {"sizes": rows, "gate": gate, "batch_size": options.batch_size, "num_samples": options.num_samples,
              "active_counts": list(ACTIVE_COUNTS), "preset": "demo"}
    bench_record.save("large_ensemble", result, device, argv=sys.argv[1:] if argv is None else list(argv))
    return 0


def render_markdown(record: dict) -> str:
    """The stored result's table for docs/benchmarks.md (benchmarks/report.py adds the header)."""
    result = record["result"]
    counts = [str(count) for count in result["active_counts"]]
    gate = result["gate"]
    lines = [f"Demo architecture, random weights, batch {result['batch_size']}, L = {result['num_samples']}, "
             "one timed call each.", "",
             "| S | A2A s | " + " | ".join(f"S2A A = {a} s (/ A2A, ideal A/S)" for a in counts)
             + " | S2A − MISELBO, A = " + ", ".join(counts) + " (nats ± stderr) | peak MiB |",
             "|---|---|" + "---|" * len(counts) + "---|---|"]
    for size, row in sorted(result["sizes"].items(), key=lambda item: int(item[0])):
        cells = [f"{row['s2a_seconds'][a]:.2f} ({row['s2a_over_a2a'][a]:.3f}, {row['ideal_ratio'][a]:.3f})"
                 if a in row["s2a_seconds"] else "-" for a in counts]
        errors = ", ".join(f"{row['s2a_minus_miselbo'][a]['mean']:+.3f} ± {row['s2a_minus_miselbo'][a]['stderr']:.3f}"
                           for a in counts if a in row["s2a_minus_miselbo"])
        lines.append(f"| {size} | {row['a2a_seconds']:.2f} | " + " | ".join(cells) + f" | {errors or '-'} | "
                     f"{row['peak_mib']:.1f} |")
    peak_ratio = result["sizes"].get("64", {}).get("peak_64_over_16")
    if peak_ratio is not None:
        lines += ["", f"Peak memory at S = 64 is **{peak_ratio:.2f}** times that at S = 16 (target <= 4.5)."]
    lines += ["", f"Gate passed: S2A with A = S equalled A2A within {gate['a_equals_s_max_abs_diff']:.1e} nats "
              f"(S = {gate['a_equals_s_size']}, bound {gate['a_equals_s_tolerance_nats']:g}); every S2A mean lay "
              f"within {gate['mc_standard_errors']:g} standard errors of MISELBO's."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
