"""CPU speed in the default layout vs channels-last weights (miselbo.runtime.cpu_layout.use_fast_cpu_layout).

Evaluation: loads the shipped ensemble (models/mnist5k_demo) twice, once converted to
channels-last, and times Ensemble.reduced_weights on the same batch of test digits with the same
draws, alternating the two layouts; prints the medians, their ratio and the largest difference
between the two layouts' per-example MISELBO values (float rounding only).

Training (`--train_steps N`, default 20; 0 skips it): the demo preset's model (the main job's) in
both layouts, built from the same seed, takes N real training steps (miselbo.training.loop.train_step)
of each kind, a full step (decoder and encoder) and a new-encoder step (frozen decoder), on the
same batch of 32 digits, alternating the layouts after a warm-up of 3 steps; prints the medians
and their ratios. The last line is `RESULT {json}`.

    python benchmarks/cpu_layout.py [--batch_size 50] [--num_iw_samples 20] [--chunk_size 20] [--repeats 5]
                                    [--train_steps 20]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miselbo.data.datasets import load_dataset  # noqa: E402
from miselbo.ensemble.log_weights import Ensemble  # noqa: E402
from miselbo.runtime.cpu_layout import use_fast_cpu_layout  # noqa: E402
from miselbo.evaluation.members import discover_demo_ensemble, load_members  # noqa: E402
from miselbo.pipeline.presets import DEMO  # noqa: E402
from miselbo.training.stop import StepGuard, StopRequests  # noqa: E402
from miselbo.runtime import flags  # noqa: E402
from train_speed import build_step_parts, real_batch, timed_step  # noqa: E402

DEMO_FLAGS = ["--dataset", "mnist", *DEMO.architecture, *DEMO.schedule]
TRAIN_WARMUP_STEPS = 3


def ensemble(channels_last: bool) -> Ensemble:
    members = load_members(discover_demo_ensemble(), "cpu")
    if channels_last:
        use_fast_cpu_layout(members.models)
    return Ensemble(members.models, check_decoders=False)


def timed(model: Ensemble, x: torch.Tensor, options) -> tuple[float, torch.Tensor]:
    draws = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    with torch.no_grad():
        weights = model.reduced_weights(x, options.num_iw_samples, draws, options.chunk_size)
    log_w = weights.log_p - weights.log_q_mix  # [B, S, L]
    per_example = (torch.logsumexp(log_w, dim=2) - math.log(log_w.shape[2])).mean(dim=1)  # [B], MISELBO
    return time.perf_counter() - began, per_example


def training_step_medians(steps: int) -> dict:
    """Median seconds of full and new-encoder demo steps in both layouts, alternating."""
    cpu = torch.device("cpu")
    guard = StepGuard(StopRequests(announce=False), cpu)
    x = real_batch(32, cpu)  # [32, 1, 32, 32]
    runs = {}
    for layout in ("default", "channels_last"):
        full, model = build_step_parts("full", cpu, flags=DEMO_FLAGS)
        new_q, new_model = build_step_parts("new_q", cpu, parent=model, flags=DEMO_FLAGS)
        if layout == "channels_last":
            use_fast_cpu_layout([model, new_model])
        runs[f"full_{layout}"], runs[f"new_q_{layout}"] = full, new_q
    seconds = {name: [] for name in runs}
    for index in range(TRAIN_WARMUP_STEPS + steps):
        for name, parts in runs.items():
            spent = timed_step(parts, x, guard)
            if index >= TRAIN_WARMUP_STEPS:
                seconds[name].append(spent)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    ratios = {kind: medians[f"{kind}_channels_last"] / medians[f"{kind}_default"] for kind in ("full", "new_q")}
    return {"median_seconds": medians, "channels_last_over_default": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=flags.count_argument, default=50)
    parser.add_argument("--num_iw_samples", type=flags.count_argument, default=20)
    parser.add_argument("--chunk_size", type=int, default=20)
    parser.add_argument("--repeats", type=flags.count_argument, default=5)
    parser.add_argument("--train_steps", type=int, default=20, help="timed training steps of each kind (0: none)")
    options = parser.parse_args(argv)
    dataset = load_dataset("mnist5k", "", train=False)
    dataset.reseed(0)
    x = torch.stack([dataset[i][0] for i in range(options.batch_size)])  # [B, 1, 32, 32]
    layouts = {"default": ensemble(False), "channels_last": ensemble(True)}
    seconds = {name: [] for name in layouts}
    values = {}
    for _ in range(options.repeats):
        for name, model in layouts.items():
            spent, values[name] = timed(model, x, options)
            seconds[name].append(spent)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    difference = float((values["default"] - values["channels_last"]).abs().max())
    result = {"median_seconds": medians, "channels_last_over_default": medians["channels_last"] / medians["default"],
              "max_abs_difference_nats": difference, "threads": torch.get_num_threads(), **vars(options)}
    print(f"evaluation: default {medians['default']:.3f} s, channels-last {medians['channels_last']:.3f} s "
          f"(ratio {result['channels_last_over_default']:.3f}); largest difference {difference:.2e} nats")
    if options.train_steps > 0:
        result["training"] = training = training_step_medians(options.train_steps)
        for kind in ("full", "new_q"):
            times = training["median_seconds"]
            print(f"training, {kind} step: default {1000 * times[f'{kind}_default']:.1f} ms, channels-last "
                  f"{1000 * times[f'{kind}_channels_last']:.1f} ms (ratio "
                  f"{training['channels_last_over_default'][kind]:.3f})")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
