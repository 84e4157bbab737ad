"""Training-step speed and peak memory: a full NVAE step vs a --train_new_q step (frozen decoder).

Both steps are the real `miselbo.training.loop.train_step` on the paper's NVAE (the `paper` preset
of miselbo/pipeline/presets.py, NVAE's MNIST recipe: 2 latent scales, 10 groups at the finest with
ada_groups, 20 latents per group, 32 channels, 2 cells per conditional in both towers, SE,
res_dist, no flows, 2x3 pre/post-processing cells, weight_decay_norm 1e-2 so both regularisers
run, fast Adamax) and the same batch of real binarised mnist5k digits. Times: the two kinds of step alternate
(so background load hits both alike), warm-up steps are dropped, the median is reported. Peak
memory: on CUDA torch.cuda.max_memory_allocated during the steps (minus what was allocated
before them); on CPU the peak resident set size (VmHWM) of a fresh subprocess per kind of step,
and its rise over the RSS measured just before the first step.

The last line printed is `RESULT {json}` with both times, the memory figures and new_q/full.
Before it, with --joint_encoders K (default 4), a joint step of K encoders (train.py
--num_new_encoders K; each --joint_objectives value, default independent and miselbo) is timed
against one new-encoder step on the same batch, alternating, and `RESULT_JOINT {json}` gives the
ratio joint / (K x new-encoder step) (target <= 0.80). The joint step's memory is not measured.

    python benchmarks/train_speed.py [--batch_size 16] [--steps 10] [--warmup_steps 3] [--device auto]
                                     [--threads N] [--joint_encoders 4] [--joint_objectives independent,miselbo]
                                     [--joint_only]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miselbo.runtime.cli import resolve_device  # noqa: E402
from miselbo.data.datasets import load_dataset  # noqa: E402
from miselbo.nvae.config import get_arch_cells  # noqa: E402
from miselbo.nvae.model import AutoEncoder, is_decoder_key  # noqa: E402
from miselbo.nvae.objectives import kl_balance_alpha  # noqa: E402
from miselbo.nvae.optim import build_optimizer  # noqa: E402
from miselbo.pipeline.presets import PAPER  # noqa: E402
from miselbo.training.loop import StepParts, train_step  # noqa: E402
from miselbo.training.new_encoder import Parent, adopt_decoder  # noqa: E402
from miselbo.training.objective import RegularisedLayers  # noqa: E402
from miselbo.training.options import build_parser  # noqa: E402
from miselbo.training.settings import TrainSettings  # noqa: E402
from miselbo.training.stop import StepGuard, StopRequests  # noqa: E402
from miselbo.ensemble.shared_decoder import share_decoder  # noqa: E402
from miselbo.training.joint_objective import JointSpec  # noqa: E402
from miselbo.training.joint_step import Component, JointStep, joint_train_step  # noqa: E402

# The paper recipe's architecture and schedule (the batch size of a step is --batch_size below).
MNIST_PAPER_FLAGS = ["--dataset", "mnist", *PAPER.architecture, *PAPER.schedule]
STEP_INDEX = 100  # a global step past the (here irrelevant) learning-rate warm-up, β < 1
MODES = ("full", "new_q")


def build_step_parts(mode: str, device: torch.device, parent: AutoEncoder | None = None, seed: int = 1,
                     flags: list[str] = MNIST_PAPER_FLAGS):
    """(StepParts, model) for a full step (seed 0) or a new-encoder step (`seed`, parent's decoder),
    of the model and schedule train.py `flags` give (default: the paper recipe's)."""
    args = build_parser().parse_args(flags)
    torch.manual_seed(0 if mode == "full" else seed)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    if mode == "new_q":
        parent = parent or build_step_parts("full", torch.device("cpu"), flags=flags)[1]
        adopt_decoder(model, Parent(Path("<parent in memory>"), parent.decoder_fingerprint(),
                                    {k: v for k, v in parent.state_dict().items() if is_decoder_key(k)}))
        trainable, layers = model.encoder_parameters(), RegularisedLayers.encoder_of(model)
    else:
        trainable, layers = list(model.parameters()), RegularisedLayers()
    model.to(device).train()
    parts = StepParts(model=model, optimizer=build_optimizer(trainable, args.learning_rate, args.weight_decay,
                                                             fast=args.fast_adamax),
                      grad_scaler=torch.amp.GradScaler(device.type, enabled=device.type == "cuda"),
                      trainable=trainable, alpha=kl_balance_alpha(model.groups_per_scale, device=device),
                      layers=layers, settings=TrainSettings.from_args(args),
                      iterations_per_epoch=1000, device=device)
    return parts, model


def build_joint_step(count: int, objective: str, device: torch.device, parent: AutoEncoder) -> JointStep:
    """One joint step of `count` new encoders (seeds 1..count) on the parent's frozen decoder,
    the real miselbo.training.joint_step.joint_train_step with the paper recipe's settings."""
    components = []
    for index in range(1, count + 1):
        parts, model = build_step_parts("new_q", torch.device("cpu"), parent=parent, seed=index)
        if components:
            share_decoder(components[0].model, model)
        components.append(Component(index=index, model=model.to(device), args=None, lineage=None,
                                    optimizer=parts.optimizer, scheduler=None, layers=parts.layers))
    return JointStep(components=components, parent=None, spec=JointSpec(objective, count, False),
                     settings=parts.settings, scaler=parts.grad_scaler,
                     alpha=kl_balance_alpha(components[0].model.groups_per_scale, device=device),
                     iterations_per_epoch=1000, device=device)


def timed_joint_step(parts: JointStep, x: torch.Tensor, guard: StepGuard) -> float:
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)
    began = time.perf_counter()
    joint_train_step(parts, x, STEP_INDEX, guard)
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)
    return time.perf_counter() - began


def median_joint_step_times(options, device: torch.device) -> dict:
    """Alternate one new-encoder step and one joint step of each objective; medians (seconds)."""
    _full_parts, full_model = build_step_parts("full", torch.device("cpu"))
    q_parts, _ = build_step_parts("new_q", device, parent=full_model)
    joint = {objective: build_joint_step(options.joint_encoders, objective, device, full_model)
             for objective in options.joint_objectives.split(",")}
    x = real_batch(options.batch_size, device)
    guard = StepGuard(StopRequests(announce=False), device)
    times = {"new_q": [], **{objective: [] for objective in joint}}
    for index in range(options.warmup_steps + options.steps):
        seconds = {"new_q": timed_step(q_parts, x, guard)}
        seconds.update({objective: timed_joint_step(parts, x, guard) for objective, parts in joint.items()})
        if index >= options.warmup_steps:
            for name, value in seconds.items():
                times[name].append(value)
    return {name: statistics.median(values) for name, values in times.items()}


def real_batch(batch_size: int, device: torch.device) -> torch.Tensor:
    """The first `batch_size` mnist5k training digits, padded and binarised: [B, 1, 32, 32]."""
    dataset = load_dataset("mnist5k", "", train=True)
    dataset.reseed(0)
    return torch.stack([dataset[i][0] for i in range(batch_size)]).to(device)


def timed_step(parts: StepParts, x: torch.Tensor, guard: StepGuard) -> float:
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)
    began = time.perf_counter()
    train_step(parts, x, STEP_INDEX, guard)
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)
    return time.perf_counter() - began


def median_step_times(options, device: torch.device) -> dict:
    """Alternate full and new-encoder steps; median seconds of each after the warm-up."""
    full_parts, full_model = build_step_parts("full", device)
    q_parts, _ = build_step_parts("new_q", device, parent=full_model.cpu())
    full_model.to(device)
    x = real_batch(options.batch_size, device)
    guard = StepGuard(StopRequests(announce=False), device)
    times = {mode: [] for mode in MODES}
    for index in range(options.warmup_steps + options.steps):
        for mode, parts in (("full", full_parts), ("new_q", q_parts)):
            seconds = timed_step(parts, x, guard)
            if index >= options.warmup_steps:
                times[mode].append(seconds)
    return {mode: statistics.median(values) for mode, values in times.items()}


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux): VmRSS = resident now, VmHWM = its peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (the CPU memory figures need Linux)")


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS. Not ru_maxrss: after fork + exec that starts at the parent's RSS."""
    return _status_kib("VmHWM") * 1024


def memory_of_one_mode(mode: str, options) -> dict:
    """Run in a fresh process: RSS before the first step, peak RSS after the steps (bytes)."""
    device = torch.device("cpu")
    parts, _ = build_step_parts(mode, device)
    x = real_batch(options.batch_size, device)
    guard = StepGuard(StopRequests(announce=False), device)
    before = current_rss_bytes()
    for _ in range(options.warmup_steps + 2):
        train_step(parts, x, STEP_INDEX, guard)
    peak = peak_rss_bytes()
    return {"rss_before_steps": before, "peak_rss": peak}


def cpu_memory(options) -> dict:
    """memory_of_one_mode of each kind of step, each in its own subprocess."""
    figures = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--memory_of", mode, "--batch_size",
                   str(options.batch_size), "--warmup_steps", str(options.warmup_steps),
                   "--threads", str(options.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        figures[mode] = {"peak_rss_mib": measured["peak_rss"] / 2 ** 20,
                         "rise_over_rss_before_steps_mib":
                             (measured["peak_rss"] - measured["rss_before_steps"]) / 2 ** 20}
    return figures


def cuda_memory(options, device: torch.device) -> dict:
    figures = {}
    for mode in MODES:
        parts, _ = build_step_parts(mode, device)
        x = real_batch(options.batch_size, device)
        guard = StepGuard(StopRequests(announce=False), device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(options.warmup_steps + 2):
            train_step(parts, x, STEP_INDEX, guard)
        torch.cuda.synchronize(device)
        figures[mode] = {"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20,
                         "rise_over_allocated_before_steps_mib":
                             (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20}
        del parts
    return figures


def print_joint_result(options, device: torch.device) -> None:
    """Joint step of K encoders vs K single new-encoder steps (target: ratio <= 0.8)."""
    times = median_joint_step_times(options, device)
    count = options.joint_encoders
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "batch_size": options.batch_size,
              "num_encoders": count, "timed_steps": options.steps, "new_q_step_s": times["new_q"]}
    for objective in options.joint_objectives.split(","):
        ratio = times[objective] / (count * times["new_q"])
        result[f"joint_{objective}_step_s"] = times[objective]
        result[f"ratio_joint_{objective}_over_{count}_new_q"] = ratio
        print(f"joint step, {count} encoders, {objective}: {times[objective]:.4f} s; {count} new-encoder "
              f"steps {count * times['new_q']:.4f} s; ratio {ratio:.3f} (target <= 0.80)")
    print("RESULT_JOINT " + json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps of each kind")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is robust on a shared machine")
    parser.add_argument("--joint_encoders", type=int, default=4,
                        help="also time one joint step of this many encoders (train.py "
                             "--num_new_encoders) against as many new-encoder steps; 0: skip")
    parser.add_argument("--joint_objectives", default="independent,miselbo",
                        help="comma-separated --mixture_objective values of the joint steps")
    parser.add_argument("--joint_only", action="store_true", help="skip the full-vs-new_q part")
    parser.add_argument("--memory_of", choices=MODES, help=argparse.SUPPRESS)  # internal
    options = parser.parse_args(argv)
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    if options.memory_of:
        print(json.dumps(memory_of_one_mode(options.memory_of, options)))
        return
    device = resolve_device(options.device)
    if options.joint_encoders > 0:
        print_joint_result(options, device)
    if options.joint_only:
        return
    memory = cuda_memory(options, device) if device.type == "cuda" else cpu_memory(options)
    times = median_step_times(options, device)
    result = {"device": str(device), "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "batch_size": options.batch_size,
              "timed_steps": options.steps, "warmup_steps": options.warmup_steps,
              "full_step_s": times["full"], "new_q_step_s": times["new_q"],
              "ratio_new_q_over_full": times["new_q"] / times["full"], "memory": memory}
    print(f"full step {times['full']:.4f} s, new-encoder step {times['new_q']:.4f} s, "
          f"ratio {result['ratio_new_q_over_full']:.3f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
