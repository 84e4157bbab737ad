"""CPU speed in the default layout vs channels-last weights (miselbo.runtime.cpu_layout.use_fast_cpu_layout).

Evaluation: loads the shipped ensemble (models/mnist5k_demo) twice, once converted to
channels-last, and times Ensemble.reduced_weights on the same batch of test digits with the same
draws, alternating the two layouts; prints the medians, their ratio and the largest difference
between the two layouts' per-example MISELBO values (float rounding only).

Training (`--train_steps N`, default 20; 0 skips it): the demo preset's model (the main job's;
--preset picks another) in both layouts, built from the same seed, takes N real training steps
(miselbo.training.loop.train_step) of each kind, a full step (decoder and encoder) and a
new-encoder step (frozen decoder), on the same batch of --train_batch_size (32) digits,
alternating the layouts after --train_warmup_steps (3) untimed steps; prints the medians and
their ratios.

Gate, before any time is printed: both layouts compute the same values up to float rounding.
Evaluation: the largest difference between the two layouts' per-example MISELBO values at the
same draws is at most EVAL_TOLERANCE_NATS. Training (with --train_steps > 0), for each kind of
step at the same initial weights and posterior draws: the losses differ by at most LOSS_REL_TOL
(relative) and the gradients (every trained parameter as one vector) by at most
GRAD_REL_ERROR_MAX (relative). Otherwise the benchmark says which and exits 1.

The last line is `RESULT {json}`, stored in benchmarks/results/cpu_layout.json.

    python benchmarks/cpu_layout.py [--batch_size 50] [--num_iw_samples 20] [--chunk_size 20] [--repeats 5]
                                    [--train_steps 20] [--train_warmup_steps 3] [--train_batch_size 32]
                                    [--preset demo]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402

from miselbo.data.datasets import load_dataset  # noqa: E402
from miselbo.ensemble.log_weights import Ensemble  # noqa: E402
from miselbo.runtime.cpu_layout import use_fast_cpu_layout  # noqa: E402
from miselbo.evaluation.members import discover_demo_ensemble, load_members  # noqa: E402
from miselbo.pipeline.presets import PRESETS  # noqa: E402
from miselbo.training.stop import StepGuard, StopRequests  # noqa: E402
from miselbo.runtime import flags  # noqa: E402
from train_speed import (build_step_parts, gradient_relative_error, real_batch,  # noqa: E402
                         step_loss_and_gradients, timed_step)

KINDS = ("full", "new_q")
LAYOUTS = ("default", "channels_last")
# The gate's bounds. Channels-last convolutions sum the same products in another order: float32
# rounding, relative 1e-7 per operation, moves a loss of hundreds of nats by ~1e-5 nats and the
# gradient by a relative ~1e-6; the bounds leave a factor of 100 and are far below what a wrong
# layout conversion (a transposed or misplaced weight) changes.
EVAL_TOLERANCE_NATS = 1e-3
LOSS_REL_TOL = 1e-5
GRAD_REL_ERROR_MAX = 1e-4
GATE_DRAW_SEED = 7


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


def preset_flags(preset: str) -> list[str]:
    return ["--dataset", "mnist", *PRESETS[preset].architecture, *PRESETS[preset].schedule]


def training_runs(preset: str) -> dict:
    """{f"{kind}_{layout}": StepParts}: full and new-encoder steps in both layouts, same seeds."""
    cpu = torch.device("cpu")
    runs = {}
    for layout in LAYOUTS:
        full, model = build_step_parts("full", cpu, flags=preset_flags(preset))
        new_q, new_model = build_step_parts("new_q", cpu, parent=model, flags=preset_flags(preset))
        if layout == "channels_last":
            use_fast_cpu_layout([model, new_model])
        runs[f"full_{layout}"], runs[f"new_q_{layout}"] = full, new_q
    return runs


def training_agreement(runs: dict, x: torch.Tensor) -> dict:
    """Per kind of step: both layouts' loss and gradients at the same weights and draws; raises
    bench_record.Disagreement above LOSS_REL_TOL or GRAD_REL_ERROR_MAX."""
    figures = {}
    for kind in KINDS:
        loss, gradients = step_loss_and_gradients(runs[f"{kind}_default"], x, GATE_DRAW_SEED)
        loss_cl, gradients_cl = step_loss_and_gradients(runs[f"{kind}_channels_last"], x, GATE_DRAW_SEED)
        if sorted(gradients) != sorted(gradients_cl):
            raise bench_record.Disagreement(f"{kind} step: the layouts train different parameters")
        relative = bench_record.check_close(f"{kind} step's loss, channels-last against default", loss_cl, loss,
                                            LOSS_REL_TOL, relative=True)
        error = bench_record.check_close(f"{kind} step's gradient, channels-last against default (relative error)",
                                         gradient_relative_error(gradients_cl, gradients, sorted(gradients)),
                                         0.0, GRAD_REL_ERROR_MAX)
        figures[kind] = {"loss_default": loss, "loss_channels_last": loss_cl, "loss_rel_diff": relative,
                         "grad_rel_error": error}
    return figures


def training_step_medians(runs: dict, x: torch.Tensor, steps: int, warmup_steps: int) -> dict:
    """Median seconds of full and new-encoder steps in both layouts, alternating."""
    guard = StepGuard(StopRequests(announce=False), torch.device("cpu"))
    seconds = {name: [] for name in runs}
    for index in range(warmup_steps + steps):
        for name, parts in runs.items():
            spent = timed_step(parts, x, guard)
            if index >= warmup_steps:
                seconds[name].append(spent)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    ratios = {kind: medians[f"{kind}_channels_last"] / medians[f"{kind}_default"] for kind in KINDS}
    return {"median_seconds": medians, "channels_last_over_default": ratios}


def evaluation_times(x: torch.Tensor, options) -> tuple[dict, dict]:
    """({layout: seconds of each repeat}, {layout: per-example MISELBO [B]}), alternating layouts."""
    layouts = {layout: ensemble(layout == "channels_last") for layout in LAYOUTS}
    seconds, values = {layout: [] for layout in LAYOUTS}, {}
    for _ in range(options.repeats):
        for layout, model in layouts.items():
            spent, values[layout] = timed(model, x, options)
            seconds[layout].append(spent)
    return seconds, values


def evaluation_result(options) -> dict:
    """The evaluation part, gated (bench_record.Disagreement above EVAL_TOLERANCE_NATS)."""
    dataset = load_dataset("mnist5k", "", train=False)
    dataset.reseed(0)
    x = torch.stack([dataset[i][0] for i in range(options.batch_size)])  # [B, 1, 32, 32]
    seconds, values = evaluation_times(x, options)
    difference = float((values["default"] - values["channels_last"]).abs().max())
    bench_record.check_close("per-example MISELBO, channels-last against default (largest difference, nats)",
                             difference, 0.0, EVAL_TOLERANCE_NATS)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    return {"median_seconds": medians, "channels_last_over_default": medians["channels_last"] / medians["default"],
            "max_abs_difference_nats": difference, "tolerance_nats": EVAL_TOLERANCE_NATS}


def training_result(options) -> dict:
    """The training part: the gate first, then the timed steps."""
    runs = training_runs(options.preset)
    x = real_batch(options.train_batch_size, torch.device("cpu"))  # [B, 1, 32, 32]
    agreement = training_agreement(runs, x)
    result = training_step_medians(runs, x, options.train_steps, options.train_warmup_steps)
    result.update(agreement=agreement, loss_rel_tol=LOSS_REL_TOL, grad_rel_error_max=GRAD_REL_ERROR_MAX,
                  preset=options.preset, batch_size=options.train_batch_size)
    return result


def print_result(result: dict) -> None:
    evaluation = result["evaluation"]
    medians = evaluation["median_seconds"]
    print(f"evaluation: default {medians['default']:.3f} s, channels-last {medians['channels_last']:.3f} s "
          f"(ratio {evaluation['channels_last_over_default']:.3f}); largest difference "
          f"{evaluation['max_abs_difference_nats']:.2e} nats (tolerance {EVAL_TOLERANCE_NATS:g})")
    training = result.get("training")
    for kind in KINDS if training else ():
        times = training["median_seconds"]
        print(f"training, {kind} step: default {1000 * times[f'{kind}_default']:.1f} ms, channels-last "
              f"{1000 * times[f'{kind}_channels_last']:.1f} ms (ratio "
              f"{training['channels_last_over_default'][kind]:.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=flags.count_argument, default=50)
    parser.add_argument("--num_iw_samples", type=flags.count_argument, default=20)
    parser.add_argument("--chunk_size", type=int, default=20)
    parser.add_argument("--repeats", type=flags.count_argument, default=5)
    parser.add_argument("--train_steps", type=int, default=20, help="timed training steps of each kind (0: none)")
    parser.add_argument("--train_warmup_steps", type=int, default=3, help="untimed training steps of each kind")
    parser.add_argument("--train_batch_size", type=flags.count_argument, default=32)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="the trained model's preset")
    options = parser.parse_args(argv)
    try:
        result = {"evaluation": evaluation_result(options), "threads": torch.get_num_threads(), **vars(options)}
        if options.train_steps > 0:
            result["training"] = training_result(options)
    except bench_record.Disagreement as error:
        bench_record.refuse("cpu_layout.py", error)
    print_result(result)
    bench_record.save("cpu_layout", result, "cpu", argv=sys.argv[1:] if argv is None else list(argv))
    return 0


def render_markdown(record: dict) -> str:
    """The stored result's table for docs/benchmarks.md (benchmarks/report.py adds the header)."""
    result = record["result"]
    evaluation = result["evaluation"]
    lines = [f"Evaluation of the shipped ensemble, batch {result['batch_size']}, L = {result['num_iw_samples']}, "
             f"chunk {result['chunk_size']}, median of {result['repeats']} runs per layout, alternating.", "",
             "| what | default s | channels-last s | channels-last / default | gate |", "|---|---|---|---|---|",
             f"| evaluation (`Ensemble.reduced_weights`) | {evaluation['median_seconds']['default']:.3f} | "
             f"{evaluation['median_seconds']['channels_last']:.3f} | {evaluation['channels_last_over_default']:.3f} | "
             f"largest per-example MISELBO difference {evaluation['max_abs_difference_nats']:.1e} nats "
             f"(bound {evaluation['tolerance_nats']:g}) |"]
    training = result.get("training")
    for kind, label in (("full", "full training step"), ("new_q", "new-encoder step")) if training else ():
        times, agreement = training["median_seconds"], training["agreement"][kind]
        lines.append(f"| {label} (`{training['preset']}` preset, batch {training['batch_size']}) | "
                     f"{times[f'{kind}_default']:.4f} | {times[f'{kind}_channels_last']:.4f} | "
                     f"{training['channels_last_over_default'][kind]:.3f} | loss relative difference "
                     f"{agreement['loss_rel_diff']:.1e} (bound {training['loss_rel_tol']:g}), gradient relative "
                     f"error {agreement['grad_rel_error']:.1e} (bound {training['grad_rel_error_max']:g}) |")
    if training:
        lines += ["", f"Training times: median of {result['train_steps']} steps of each kind after "
                  f"{result['train_warmup_steps']} warm-up steps."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
