"""Evaluation speed: the public MISELBO algorithm vs ours vs the decoder-only floor.

One run per ensemble size S, with the same model, the same batch and the same z samples for all three:

  (a) public: for each source s and each of the L samples, one at a time, a full forward pass of
      member s with its draw (bottom-up + top-down + output head + likelihood), then a full forward
      pass of every other member j with the sample injected: S*S*L passes of B rows
      (`miselbo.ensemble.naive_log_weights`, the public algorithm of reference doc §10.4);
  (b) ours: `Ensemble.log_weights` (S bottom-up passes, S*L samples through batched decoder passes
      with all S posterior heads per group);
  (c) floor: the S*L decoder top-down passes alone (prior densities and output likelihood included),
      chunked exactly like (b), fed with (b)'s post-flow samples.

Model: NVAE's MNIST paper architecture (2 latent scales, 10 groups at the finest with ada_groups,
20 latents per group, 32 channels, SE, res_dist, no flows, 2x3 pre/post-processing cells, 1 cell per
group), random weights; S encoders from seeds 0..S-1 sharing member 0's decoder. Data: real binarised
mnist5k test digits. (b) runs first untimed with a fixed seed and its draws recorded; (a) and (c)
reuse those draws. Each method is warmed up untimed first ((a): one full forward pass). (b) and (c)
are then timed --repeats times (3; quick: 1), alternating, and the minimum is reported (the least disturbed by background load); every
timed (b) run must reproduce the recorded log-weights exactly. (a) is timed once. Peak memory: on CUDA torch.cuda.max_memory_allocated over the call minus what was
allocated before it; on CPU the peak resident set size sampled every 2 ms during the call minus the
RSS just before it, after glibc's malloc_trim has handed freed heap pages back to the OS (so the
starting RSS is the live memory; pages the call reuses count again when it touches them).

Also timed: the S bottom-up passes alone (part of (b), not of (c): they are amortised over L, so
they weigh more at the small L used here than at L = 1000), and the S posterior heads of the 8x8 groups as ours (one composed conv on the decoder state)
and as a combiner conv with S*C outputs followed by a grouped sampler conv (groups = S).

The last line printed is `RESULT {json}` keyed by S (string): public_over_ours, ours_over_floor,
max_abs_diff (largest |a - b| over log_p and log_q), plus the times, peaks and relative difference.

    python benchmarks/eval_speed.py            # S in {2, 5, 8}, batch 16, L = 8
    python benchmarks/eval_speed.py --quick    # S in {2, 5}, batch 4, L = 8 (about a minute on 2 cores)
    add --threads 1 on a machine shared with other jobs (oversubscribed OpenMP threads spin)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miselbo.cli import resolve_device  # noqa: E402
from miselbo.data import load_dataset  # noqa: E402
from miselbo.ensemble import Ensemble, default_chunk_size, naive_log_weights, share_decoder  # noqa: E402
from miselbo.eval_data import EvaluationExamples  # noqa: E402
from miselbo.nvae.config import default_nvae_args, get_arch_cells  # noqa: E402
from miselbo.nvae.distributions import Normal, reconstruction_loss  # noqa: E402
from miselbo.nvae.model import AutoEncoder  # noqa: E402

MNIST_PAPER = dict(dataset="mnist", num_latent_scales=2, num_groups_per_scale=10, ada_groups=True,
                   num_latent_per_group=20, num_channels_enc=32, num_channels_dec=32, use_se=True,
                   res_dist=True, num_nf=0, num_preprocess_blocks=2, num_preprocess_cells=3,
                   num_postprocess_blocks=2, num_postprocess_cells=3, num_cell_per_cond_enc=1,
                   num_cell_per_cond_dec=1)
SEED = 0
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

def build_members(count: int, device: torch.device) -> list[AutoEncoder]:
    args = default_nvae_args(**MNIST_PAPER)
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
    weight, padding, dilation = ensemble._head_weights[group]
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


# ----------------------------------------------------------------------------- one ensemble size

def compare(members: list, x: torch.Tensor, num_samples: int, chunk: int, device: torch.device,
            repeats: int) -> dict:
    """Time (b) and (c) `repeats` times, alternating (their minimum is reported, which background
    load affects least), and (a) once; check that every (b) run repeats the recorded one exactly."""
    ensemble = Ensemble(members)
    num_members = len(members)

    def ours(record: bool = False):
        generator = torch.Generator(device=device).manual_seed(SEED)
        return ensemble.log_weights(x, num_samples, generator, chunk, record_latents=record)

    ensemble.log_weights(x, 1, torch.Generator(device=device).manual_seed(SEED), chunk)  # warm-up
    recorded = ours(record=True)
    latents_pre, latents_post = recorded.latents_pre, recorded.latents_post
    floor_passes(members[0], x, [z[:, :, :1] for z in latents_post], 1)  # warm-up
    ours_runs, floor_runs = [], []
    for _ in range(repeats):
        ours_runs.append(measured(ours, device))
        floor_runs.append(measured(lambda: floor_passes(members[0], x, latents_post, chunk), device))
        fast = ours_runs[-1][2]
        if not (torch.equal(recorded.log_p, fast.log_p) and torch.equal(recorded.log_q, fast.log_q)):
            raise RuntimeError("two runs of Ensemble.log_weights with one seed differ")
    members[0].forward_detailed(x)  # warm-up: the shapes of (a)'s passes
    time_public, peak_public, (public_p, public_q) = measured(
        lambda: naive_log_weights(members, x, latents_pre), device)
    time_bottom_up = min(measured(lambda: [m.encode_bottom_up(x) for m in members], device)[0]
                         for _ in range(repeats))

    time_ours, time_floor = min(run[0] for run in ours_runs), min(run[0] for run in floor_runs)
    ours_p, ours_q = recorded.log_p.cpu(), recorded.log_q.cpu()
    diff = max((public_p - ours_p).abs().max().item(), (public_q - ours_q).abs().max().item())
    scale = max(public_p.abs().max().item(), public_q.abs().max().item(), 1.0)
    floor_diff = (floor_runs[0][2].cpu() - ours_p).abs().max().item()
    return {"S": num_members, "public_s": time_public, "ours_s": time_ours, "floor_s": time_floor,
            "ours_runs_s": [run[0] for run in ours_runs], "floor_runs_s": [run[0] for run in floor_runs],
            "bottom_up_s": time_bottom_up,
            "public_over_ours": time_public / time_ours, "ours_over_floor": time_ours / time_floor,
            "public_over_ours_per_S": time_public / time_ours / num_members,
            "peak_mib": {"public": peak_public / 2 ** 20, "ours": max(run[1] for run in ours_runs) / 2 ** 20,
                         "floor": max(run[1] for run in floor_runs) / 2 ** 20},
            "max_abs_diff": diff, "max_rel_diff": diff / scale, "floor_log_p_max_abs_diff": floor_diff,
            **head_convolutions(ensemble, chunk * x.shape[0], device)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S in {2, 5}, batch 4, L = 8")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="ensemble sizes S")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per batch (16; quick: 4)")
    parser.add_argument("--num_samples", type=int, default=8, help="L per member")
    parser.add_argument("--chunk_size", type=int, default=None, help="samples per decoder pass (default by device)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of (b) and (c) (3; quick: 1)")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    sizes = options.sizes or ([2, 5] if options.quick else [2, 5, 8])
    batch_size = options.batch_size or (4 if options.quick else 16)
    repeats = options.repeats or (1 if options.quick else 3)
    device = resolve_device(options.device)
    trimmed = device.type == "cpu" and _release_free_heap()
    torch.set_grad_enabled(False)
    dataset = load_dataset("mnist5k", ".", train=False, max_examples=batch_size)
    x = EvaluationExamples(dataset, "mnist5k", SEED, num_x_bits=8).batch(0, batch_size).to(device)
    chunk = options.chunk_size or default_chunk_size(batch_size, options.num_samples, device)
    print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, batch {batch_size}, L {options.num_samples}, chunk {chunk} "
          f"(decoder rows {chunk * batch_size}), {repeats} timed runs of (b), (c), min reported, memory: "
          f"{'CUDA allocator' if device.type == 'cuda' else 'sampled RSS' + (' after malloc_trim' if trimmed else '')}")
    all_members = build_members(max(sizes), device)
    result = {}
    for size in sizes:
        row = compare(all_members[:size], x, options.num_samples, chunk, device, repeats)
        result[str(size)] = row
        peaks = row["peak_mib"]
        print(f"S={size}: public {row['public_s']:.2f} s, ours {row['ours_s']:.2f} s (S bottom-up passes alone "
              f"{row['bottom_up_s']:.2f} s), floor {row['floor_s']:.2f} s | "
              f"public/ours {row['public_over_ours']:.2f} (= {row['public_over_ours_per_S']:.2f} S), "
              f"ours/floor {row['ours_over_floor']:.3f} | peak MiB public {peaks['public']:.1f}, ours "
              f"{peaks['ours']:.1f}, floor {peaks['floor']:.1f} | max |a-b| {row['max_abs_diff']:.3g} "
              f"(rel {row['max_rel_diff']:.2g}) | heads per 8x8 group: composed {row['heads_composed_ms']:.2f} ms, "
              f"combiner+grouped {row['heads_grouped_ms']:.2f} ms", flush=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
