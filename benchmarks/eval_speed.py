"""Evaluation speed: the public MISELBO algorithm vs ours vs the decoder-only floor.

One run per ensemble size S, with the same model, the same batch and the same z samples for all three:

  (a) public: for each source s and each of the L samples, one at a time, a full forward pass of
      member s with its draw (bottom-up + top-down + output head + likelihood), then a full forward
      pass of every other member j with the sample injected: S*S*L passes of B rows
      (`miselbo.ensemble.naive.naive_log_weights`, the public MISELBO script's algorithm);
  (b) ours: `Ensemble.log_weights` (S bottom-up passes, S*L samples through batched decoder passes
      with all S posterior heads per group);
  (c) floor: the S*L decoder top-down passes alone (prior densities and output likelihood included),
      chunked exactly like (b), fed with (b)'s post-flow samples.

Model: the paper's NVAE, the `paper` preset of miselbo/pipeline/presets.py (NVAE's MNIST recipe: 2 latent
scales, 10 groups at the finest with ada_groups, 20 latents per group, 32 channels, 2 cells per
conditional in both towers, SE, res_dist, no flows, 2x3 pre/post-processing cells), random weights;
S encoders from seeds 0..S-1 sharing member 0's decoder. Data: real binarised mnist5k test digits.
(b) runs first untimed with a fixed seed and its draws recorded; (a) and (c) reuse those draws.
Each method is warmed up untimed first ((a): one full forward pass).

Fair timing: the three methods are timed the same number of times, --repeats (default 1: the full
mode at S = 8 costs minutes per repetition of (a) on 2 CPU cores), in rounds a, b, c so background
load hits all three alike, and each is reported as the MEDIAN of its timed runs. Every timed (b)
run must reproduce the recorded log-weights exactly.

Correctness gate: before any speed figure of an S is printed, max |a - b| over log_p and log_q and
max |c - b| over log_p must be at most --tolerance (0.05 nats, absolute); otherwise the benchmark
says which and exits with status 1 (bench_record.refuse), so a wrong (b) never prints a speed-up.

Breakdown of (b): after the timed rounds, one more run of (b) with a
`miselbo.ensemble.sections.SectionTimer` active. Ensemble.log_weights opens a named section around
each kind of work, and the timer charges the wall time (time.perf_counter; on CUDA after a
synchronize at every boundary) between a section's start and end to it, excluding the sections
opened inside it:
  decoder      the top-down passes, output head, likelihood and prior densities (what (c) does);
  encoder      the S bottom-up passes and the x-only part of every posterior head (once per batch);
  heads        the cross-member scoring: per group one stacked convolution for all S heads, their
               Normal parameters, the source's draw and log q_j of every sample under every member
               (its stacked convolutions alone are also reported, as head_convolution_s);
  flows        the source's flows and the other members' flow inversions (none in the paper model);
  reductions   storing each pass's rows (log_weights) or its logsumexp mixtures (reduced_weights);
  rest         the run's total minus the parts: Python glue outside every section.
The instrumented run's own total is reported beside ours_s (the sections add a few microseconds
each). `convolution_bound` = (decoder + encoder + head convolutions) / decoder, all from that run:
the ours/floor an implementation of this algorithm would reach if everything but the S·L decoder
passes, the S encoder passes and the S²·L exact head convolutions cost nothing. Counts per example
come from the same run: decoder sample passes (S L), encoder passes (S), head scorings (S^2 L; one scoring = one sample under one member's heads of all G groups), flow
applications (S L with flows) and inversions (S (S - 1) L with flows).

Peak memory: on CUDA torch.cuda.max_memory_allocated over the call minus what was
allocated before it; on CPU the peak resident set size sampled every 2 ms during the call minus the
RSS just before it, after glibc's malloc_trim has handed freed heap pages back to the OS (so the
starting RSS is the live memory; pages the call reuses count again when it touches them).

Also timed: the S bottom-up passes alone (part of (b), not of (c): they are amortised over L, so
they weigh more at the small L used here than at L = 1000), and the S posterior heads of the 8x8 groups as ours (one composed conv on the decoder state)
and as a combiner conv with S*C outputs followed by a grouped sampler conv (groups = S).

`RESULT {json}` is keyed by S (string): public_over_ours, ours_over_floor, breakdown, max_abs_diff
(largest |a - b| over log_p and log_q), plus the times, peaks and relative difference; it is also
stored with the machine, commit and date in benchmarks/results/eval_speed.json (--quick:
eval_speed_quick.json; bench_record.save),
from which `render_markdown` makes the tables of docs/benchmarks.md.

    python benchmarks/eval_speed.py            # S in {2, 5, 8}, batch 16, L = 8, 1 timed run each
    python benchmarks/eval_speed.py --quick    # S in {2, 5}, batch 4, L = 8, 1 timed run each
    add --threads 1 on a machine shared with other jobs (oversubscribed OpenMP threads spin)
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402

from miselbo.runtime.cli import resolve_device  # noqa: E402
from miselbo.data.datasets import load_dataset  # noqa: E402
from miselbo.ensemble.log_weights import Ensemble, default_chunk_size, stacked_head  # noqa: E402
from miselbo.ensemble.naive import naive_log_weights  # noqa: E402
from miselbo.ensemble.sections import SectionTimer, timing  # noqa: E402
from miselbo.ensemble.shared_decoder import share_decoder  # noqa: E402
from miselbo.evaluation.examples import EvaluationExamples  # noqa: E402
from miselbo.nvae.config import get_arch_cells  # noqa: E402
from miselbo.nvae.distributions import Normal, reconstruction_loss  # noqa: E402
from miselbo.nvae.model import AutoEncoder  # noqa: E402
from miselbo.pipeline.presets import PAPER  # noqa: E402
from miselbo.runtime import flags  # noqa: E402

SEED = 0
DEFAULT_TOLERANCE_NATS = 0.05  # float32 sums over 1,000s of terms differ by ~1e-3 nats in order


PARTS = ("decoder", "encoder", "heads", "flows", "reductions", "rest")
# sections opened inside a part, whose exclusive time belongs to that part
INNER_SECTIONS = {"decoder_prior": "decoder", "head_convolution": "heads", "flow_inversions": "flows"}


class WrongResult(bench_record.Disagreement):
    """(a), (b) and (c) disagree beyond the tolerance: no speed figure may be printed."""


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ----------------------------------------------------------------------------- memory

def _release_free_heap() -> bool:
    """glibc malloc_trim(0): give freed heap pages back to the OS, so the RSS is the live memory."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE_BYTES


class PeakMemory:
    """Peak memory above the starting level during a `with` block (bytes, in .peak)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self.start, self.highest, self.running = _rss_bytes(), _rss_bytes(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.highest = max(self.highest, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.highest, _rss_bytes()) - self.start
        return False


def measured(function, device: torch.device):
    """(seconds, peak bytes, result) of one call."""
    with PeakMemory(device) as memory:
        began = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
    return seconds, memory.peak, result


# ----------------------------------------------------------------------------- the three methods

def model_args():
    """The architecture measured: the paper preset for MNIST (tests substitute a tiny one)."""
    return PAPER.nvae_args(dataset="mnist")


def build_members(count: int, device: torch.device) -> list[AutoEncoder]:
    args = model_args()
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        member = AutoEncoder(args, None, get_arch_cells(args.arch_instance)).to(device).eval()
        if members:
            share_decoder(members[0], member)
        members.append(member)
    return members


@torch.no_grad()
def floor_passes(decoder: AutoEncoder, x: torch.Tensor, latents_post: list, chunk: int) -> torch.Tensor:
    """(c): log p(x, z) [B, S, L] from decoder passes alone, chunked like Ensemble.log_weights."""
    batch, num_members, num_samples = latents_post[0].shape[:3]
    log_p = torch.empty(batch, num_members, num_samples, dtype=torch.float64, device=x.device)
    for source in range(num_members):
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            rows = count * batch
            log_prior = torch.zeros(rows, dtype=torch.float64, device=x.device)

            def given_z(group, state, prior):
                nonlocal log_prior
                given = latents_post[group][:, source, start:start + count]  # [B, n, L, h, w]
                z = given.transpose(0, 1).reshape(rows, *given.shape[2:])
                density = Normal(prior.mu_raw, prior.log_sigma_raw).log_p(z)
                log_prior = log_prior + density.sum(dim=(1, 2, 3)).double()
                return z

            logits = decoder.top_down(rows, given_z)
            x_rows = x.unsqueeze(0).expand(count, *x.shape).reshape(rows, *x.shape[1:])
            log_likelihood = -reconstruction_loss(decoder.decoder_output(logits), x_rows, decoder.crop_output)
            log_p[:, source, start:start + count] = (log_likelihood.double() + log_prior).view(count, batch).T
    return log_p


@torch.no_grad()
def head_convolutions(ensemble: Ensemble, batch_rows: int, device: torch.device, repeats: int = 20) -> dict:
    """Milliseconds of the S heads of one 8x8 group: ours vs combiner conv + grouped sampler conv."""
    group = ensemble.num_groups - 1  # a finest-scale group
    weight, padding, dilation = stacked_head(ensemble.members, group)
    members = ensemble.members
    channels_dec = weight.shape[1]
    _, height, width = members[0].latent_shapes[group]
    state = torch.randn(batch_rows, channels_dec, height, width, device=device)
    feature = torch.randn(batch_rows, len(members) * members[0].encoder_combiner(group).conv.out_channels,
                          height, width, device=device)
    combiner_weight = torch.cat([m.encoder_combiner(group).conv.normalize_weight() for m in members])
    combiner_bias = torch.cat([m.encoder_combiner(group).conv.bias for m in members])
    sampler_weight = torch.cat([m.enc_sampler[group].normalize_weight() for m in members])
    sampler_bias = torch.cat([m.enc_sampler[group].bias for m in members])

    def composed():
        return F.conv2d(state, weight, None, 1, padding, dilation)

    def grouped():
        context = feature + F.conv2d(state, combiner_weight, combiner_bias)
        return F.conv2d(context, sampler_weight, sampler_bias, 1, padding, dilation, groups=len(members))

    timings = {}
    for name, function in (("heads_composed_ms", composed), ("heads_grouped_ms", grouped)):
        function()
        began = time.perf_counter()
        for _ in range(repeats):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = (time.perf_counter() - began) / repeats * 1000
    return timings


# ----------------------------------------------------------------------------- breakdown of (b)

def _synchronizer(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def instrumented_run(ensemble: Ensemble, x: torch.Tensor, num_samples: int, chunk: int,
                     device: torch.device) -> tuple[float, SectionTimer]:
    """(total seconds, the filled timer) of one `Ensemble.log_weights` run with its sections timed."""
    timer = SectionTimer(_synchronizer(device))
    generator = torch.Generator(device=device).manual_seed(SEED)
    with timing(timer):
        began = time.perf_counter()
        ensemble.log_weights(x, num_samples, generator, chunk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - began
    return total, timer


def part_seconds(timer: SectionTimer, total: float) -> dict:
    """Seconds of each of PARTS: the timed sections with their INNER_SECTIONS (decoder = passes +
    prior densities, heads = scoring + stacked convolutions, flows = applications + inversions) and
    the rest of the run's total outside them."""
    seconds = {part: timer.seconds.get(part, 0.0) for part in PARTS[:-1]}
    for inner, part in INNER_SECTIONS.items():
        seconds[part] += timer.seconds.get(inner, 0.0)
    seconds["rest"] = total - sum(seconds.values())
    return seconds


def operation_counts(timer: SectionTimer, num_groups: int) -> dict:
    """Operations per example, from the units the sections counted (every pass covers all B
    examples; heads and flows count once per group, so their sums are divided by G)."""
    return {"decoder_sample_passes": timer.units.get("decoder", 0),
            "encoder_passes": timer.units.get("encoder", 0),
            "head_scorings": timer.units.get("heads", 0) / num_groups,
            "flow_applications": timer.units.get("flows", 0) / num_groups,
            "flow_inversions": timer.units.get("flow_inversions", 0) / num_groups,
            "groups": num_groups}


def breakdown(ensemble: Ensemble, x: torch.Tensor, num_samples: int, chunk: int, device: torch.device) -> dict:
    """Where (b)'s time goes, from one instrumented run (module docstring): seconds and share of
    each part, the run's total, and the operation counts per example beside the cost model's."""
    total, timer = instrumented_run(ensemble, x, num_samples, chunk, device)
    seconds = part_seconds(timer, total)
    size = ensemble.num_members
    convolutions = timer.seconds.get("head_convolution", 0.0)
    bound = (seconds["decoder"] + seconds["encoder"] + convolutions) / seconds["decoder"]
    return {"instrumented_s": total, "decoder_calls": timer.calls.get("decoder", 0), "seconds": seconds,
            "head_convolution_s": convolutions, "convolution_bound": bound,
            "share": {part: value / total for part, value in seconds.items()},
            "counts_per_example": operation_counts(timer, ensemble.num_groups),
            "cost_model": {"decoder_sample_passes": size * num_samples, "encoder_passes": size,
                           "head_scorings": size * size * num_samples,
                           "flow_applications": size * num_samples if ensemble.with_flows else 0,
                           "flow_inversions": size * (size - 1) * num_samples if ensemble.with_flows else 0}}


# ----------------------------------------------------------------------------- one ensemble size

def timed_rounds(methods: dict, device: torch.device, repeats: int) -> dict:
    """Each method timed `repeats` times, in rounds (a, b, c, a, b, c, ...): {name: [(s, peak, result)]}."""
    runs = {name: [] for name in methods}
    for _ in range(repeats):
        for name, function in methods.items():
            runs[name].append(measured(function, device))
    return runs


def agreement(recorded, public: tuple, floor_log_p: torch.Tensor, tolerance: float) -> dict:
    """max |a - b| over log_p and log_q, max |c - b| over log_p; WrongResult above `tolerance` nats
    (NaN counts as above)."""
    ours_p, ours_q = recorded.log_p.cpu(), recorded.log_q.cpu()  # [B, S, L], [B, S, L, S]
    public_p, public_q = public
    # one tensor max, so a NaN anywhere propagates (Python's max() would drop it)
    diff = torch.cat([(public_p - ours_p).abs().flatten(), (public_q - ours_q).abs().flatten()]).max().item()
    floor_diff = (floor_log_p.cpu() - ours_p).abs().max().item()
    for name, value in (("max |a - b| over log_p and log_q", diff), ("max |c - b| over log_p", floor_diff)):
        if not value <= tolerance:
            raise WrongResult(f"{name} is {value:.6g} nats, above the tolerance {tolerance} nats: the "
                              f"methods do not compute the same log-weights, so no speed is reported")
    scale = max(public_p.abs().max().item(), public_q.abs().max().item(), 1.0)
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "floor_log_p_max_abs_diff": floor_diff,
            "tolerance_nats": tolerance}


def compare(members: list, x: torch.Tensor, num_samples: int, chunk: int, device: torch.device,
            repeats: int, tolerance: float) -> dict:
    """Time (a), (b) and (c) `repeats` times each in rounds and report each one's median; check
    that every (b) run repeats the recorded one exactly and that the three agree (`agreement`)."""
    ensemble = Ensemble(members)
    num_members = len(members)

    def ours(record: bool = False):
        generator = torch.Generator(device=device).manual_seed(SEED)
        return ensemble.log_weights(x, num_samples, generator, chunk, record_latents=record)

    ensemble.log_weights(x, 1, torch.Generator(device=device).manual_seed(SEED), chunk)  # warm-up
    recorded = ours(record=True)
    latents_pre, latents_post = recorded.latents_pre, recorded.latents_post
    floor_passes(members[0], x, [z[:, :, :1] for z in latents_post], 1)  # warm-up
    members[0].forward_detailed(x)  # warm-up: the shapes of (a)'s passes
    runs = timed_rounds({"public": lambda: naive_log_weights(members, x, latents_pre), "ours": ours,
                         "floor": lambda: floor_passes(members[0], x, latents_post, chunk)}, device, repeats)
    for _, _, fast in runs["ours"]:
        if not (torch.equal(recorded.log_p, fast.log_p) and torch.equal(recorded.log_q, fast.log_q)):
            raise RuntimeError("two runs of Ensemble.log_weights with one seed differ")
    checked = agreement(recorded, runs["public"][0][2], runs["floor"][0][2], tolerance)
    seconds = {name: statistics.median(run[0] for run in method_runs) for name, method_runs in runs.items()}
    time_bottom_up = statistics.median(measured(lambda: [m.encode_bottom_up(x) for m in members], device)[0]
                                       for _ in range(repeats))
    parts = breakdown(ensemble, x, num_samples, chunk, device)
    return {"S": num_members, "statistic": f"median of {repeats}", "public_s": seconds["public"],
            "ours_s": seconds["ours"], "floor_s": seconds["floor"],
            **{f"{name}_runs_s": [run[0] for run in method_runs] for name, method_runs in runs.items()},
            "bottom_up_s": time_bottom_up,
            "public_over_ours": seconds["public"] / seconds["ours"],
            "ours_over_floor": seconds["ours"] / seconds["floor"], "breakdown": parts,
            "public_over_ours_per_S": seconds["public"] / seconds["ours"] / num_members,
            "peak_mib": {name: max(run[1] for run in method_runs) / 2 ** 20 for name, method_runs in runs.items()},
            **checked, **head_convolutions(ensemble, chunk * x.shape[0], device)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S in {2, 5}, batch 4, L = 8")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="ensemble sizes S")
    parser.add_argument("--batch_size", type=flags.count_argument, default=None, help="examples per batch (16; quick: 4)")
    parser.add_argument("--num_samples", type=flags.count_argument, default=8, help="L per member")
    parser.add_argument("--chunk_size", type=int, default=None, help="samples per decoder pass (default by device)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=flags.count_argument, default=1,
                        help="timed runs of each of (a), (b), (c); the median of each is reported")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_NATS,
                        help="largest |a - b| (log_p, log_q) and |c - b| (log_p) accepted, in nats")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    sizes = options.sizes or ([2, 5] if options.quick else [2, 5, 8])
    batch_size = options.batch_size or (4 if options.quick else 16)
    repeats = options.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    device = resolve_device(options.device)
    trimmed = device.type == "cpu" and _release_free_heap()
    torch.set_grad_enabled(False)
    dataset = load_dataset("mnist5k", ".", train=False, max_examples=batch_size)
    x = EvaluationExamples(dataset, "mnist5k", SEED, num_x_bits=8).batch(0, batch_size).to(device)
    chunk = options.chunk_size or default_chunk_size(batch_size, options.num_samples, device)
    print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, batch {batch_size}, L {options.num_samples}, chunk {chunk} "
          f"(decoder rows {chunk * batch_size}), {repeats} timed run(s) of each of (a), (b), (c), median "
          f"reported, tolerance {options.tolerance} nats, memory: "
          f"{'CUDA allocator' if device.type == 'cuda' else 'sampled RSS' + (' after malloc_trim' if trimmed else '')}")
    all_members = build_members(max(sizes), device)
    result = {}
    for size in sizes:
        try:
            row = compare(all_members[:size], x, options.num_samples, chunk, device, repeats, options.tolerance)
        except bench_record.Disagreement as err:
            bench_record.refuse("eval_speed", bench_record.Disagreement(f"S={size}: {err}"))
        result[str(size)] = row
        peaks = row["peak_mib"]
        print(f"S={size}: public {row['public_s']:.2f} s, ours {row['ours_s']:.2f} s (S bottom-up passes alone "
              f"{row['bottom_up_s']:.2f} s), floor {row['floor_s']:.2f} s | "
              f"public/ours {row['public_over_ours']:.2f} (= {row['public_over_ours_per_S']:.2f} S), "
              f"ours/floor {row['ours_over_floor']:.3f} | peak MiB public {peaks['public']:.1f}, ours "
              f"{peaks['ours']:.1f}, floor {peaks['floor']:.1f} | max |a-b| {row['max_abs_diff']:.3g} "
              f"(rel {row['max_rel_diff']:.2g}) | heads per 8x8 group: composed {row['heads_composed_ms']:.2f} ms, "
              f"combiner+grouped {row['heads_grouped_ms']:.2f} ms", flush=True)
        print(f"S={size}: breakdown of ours: " + describe_breakdown(row["breakdown"]), flush=True)
    bench_record.save("eval_speed", result, device, argv=sys.argv[1:] if argv is None else list(argv),
                      stored_as="eval_speed_quick" if options.quick else None)


def describe_breakdown(parts: dict) -> str:
    """One line: seconds (share) of each part and the counts per example."""
    timed = ", ".join(f"{part} {parts['seconds'][part]:.3f} s ({100 * parts['share'][part]:.1f}%)" for part in PARTS)
    counts = parts["counts_per_example"]
    return (f"{timed} of {parts['instrumented_s']:.3f} s (head convolutions alone {parts['head_convolution_s']:.3f} s; "
            f"convolution bound on ours/floor {parts['convolution_bound']:.3f}) | per example: "
            f"{counts['decoder_sample_passes']:g} decoder sample passes, {counts['encoder_passes']:g} encoder passes, "
            f"{counts['head_scorings']:g} head scorings, {counts['flow_applications']:g} flow applications, "
            f"{counts['flow_inversions']:g} flow inversions")


# ----------------------------------------------------------------------------- docs/benchmarks.md

def _speed_table(result: dict) -> list[str]:
    lines = ["| S | public s | ours s | floor s | public/ours | ours/floor | max \\|a-b\\| nats | "
             "peak MiB public / ours / floor |", "|---|---|---|---|---|---|---|---|"]
    for size, row in sorted(result.items(), key=lambda item: int(item[0])):
        peaks = row["peak_mib"]
        lines.append(f"| {size} | {row['public_s']:.2f} | {row['ours_s']:.2f} | {row['floor_s']:.2f} | "
                     f"{row['public_over_ours']:.2f} | {row['ours_over_floor']:.3f} | {row['max_abs_diff']:.2g} | "
                     f"{peaks['public']:.0f} / {peaks['ours']:.0f} / {peaks['floor']:.0f} |")
    return lines


COUNT_LABELS = {"decoder": ("decoder_sample_passes", "S L decoder sample passes"),
                "encoder": ("encoder_passes", "S encoder passes"),
                "heads": ("head_scorings", "S² L head scorings (all G groups each)"),
                "flows": ("flow_applications", "S L flow applications + S (S-1) L inversions")}


def _count_cell(part: str, counts: dict) -> str:
    if part not in COUNT_LABELS:
        return ""
    key, label = COUNT_LABELS[part]
    value = f"{counts[key]:g}"
    if part == "flows":
        value += f" + {counts['flow_inversions']:g}"
    return f"{value} ({label})"


def _breakdown_table(result: dict) -> list[str]:
    lines = ["| S | part | seconds | share of (b) | operations per example |", "|---|---|---|---|---|"]
    for size, row in sorted(result.items(), key=lambda item: int(item[0])):
        parts = row["breakdown"]
        for part in PARTS:
            lines.append(f"| {size} | {part} | {parts['seconds'][part]:.3f} | {100 * parts['share'][part]:.1f}% | "
                         f"{_count_cell(part, parts['counts_per_example'])} |")
        lines.append(f"| {size} | total (instrumented run) | {parts['instrumented_s']:.3f} | 100% | "
                     f"{parts['decoder_calls']} batched decoder calls |")
    return lines


def _bound_table(result: dict) -> list[str]:
    lines = ["| S | head convolutions s (share of heads) | instrumented b/decoder | convolution bound |",
             "|---|---|---|---|"]
    for size, row in sorted(result.items(), key=lambda item: int(item[0])):
        parts = row["breakdown"]
        share = parts["head_convolution_s"] / parts["seconds"]["heads"]
        lines.append(f"| {size} | {parts['head_convolution_s']:.3f} ({100 * share:.0f}%) | "
                     f"{parts['instrumented_s'] / parts['seconds']['decoder']:.3f} | {parts['convolution_bound']:.3f} |")
    return lines


def render_markdown(record: dict) -> str:
    """docs/benchmarks.md's part for a stored eval_speed record (bench_record.record's dict): the
    speed table per S and the breakdown of (b) per S (benchmarks/report.py writes the command,
    machine, commit and date line above it)."""
    result = record["result"]
    lines = [*_speed_table(result), "",
             "Where ours spends its time (one instrumented run after the timed ones; exclusive wall time "
             "per part, rest = the run's total outside every part):", "", *_breakdown_table(result), "",
             "The exact convolutions alone (same instrumented run; convolution bound = (decoder + encoder + "
             "head convolutions) / decoder, the b/c left if every other part cost nothing):", "",
             *_bound_table(result)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
