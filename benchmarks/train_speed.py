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

Gate, before any time is printed: the new-encoder step must be the full step with the decoder
frozen. (1) One real new-encoder step leaves every decoder tensor (parameters and buffers)
bit-identical. (2) At the same weights (the new encoder's, the parent's decoder) and the same
posterior draws, the new-encoder step's gradient of every encoder parameter equals the gradient
the full step's computation gives it when every parameter is trained (decoder batch norm in
eval mode, as a frozen decoder keeps it, and the regulariser over the encoder's layers, as the
new-encoder step applies it: the full step batches the power iteration of layers of one shape
across encoder and decoder, which changes the encoder's spectral term by design, not by a bug):
|g_new - g_full| / |g_full| <= ENCODER_GRAD_REL_ERROR_MAX over all encoder parameters as one
vector. Otherwise the benchmark says which check failed and exits 1 (bench_record.refuse).

With --joint_encoders K (default 4), a joint step of K encoders (train.py --num_new_encoders K;
each --joint_objectives value, default independent and miselbo) is timed against one
new-encoder step on the same batch, alternating, and `RESULT_JOINT {json}` gives the ratio
joint / (K x new-encoder step) (target <= 0.80). The joint step's memory is not measured.
The last line printed is `RESULT {json}` with both times, the memory figures, new_q/full, the
gate's figures and the joint figures under "joint"; it is stored in
benchmarks/results/train_speed.json (bench_record.save).

With --precision P1,P2,... (train.py's --precision values) the precisions are compared instead,
float32 always the reference (added first when not listed), the models channels-last on the CPU
as train.py trains them there. First a gate: at the same weights and the same posterior draws,
each precision's loss and gradient (the step's nelbo_loss under its autocast; with a GradScaler
the scaled gradient unscaled) must agree with float32's within LOSS_REL_TOL, GRAD_COSINE_MIN and
GRAD_REL_ERROR_MAX; otherwise the benchmark says which comparison failed and exits 1 before any
timing. Then full and new-encoder steps of every precision alternate (each from the same initial
weights), and each (step kind, precision) gets its peak memory as above. `RESULT {json}` holds the
median step times per precision, the ratios to float32 (keys such as ratio_full_bf16_over_fp32),
the memory figures and the loss differences, stored in benchmarks/results/train_speed_precision.json.
On the CPU the CUDA part (float16 as NVAE trains) is
skipped with a line that says so; on a GPU the same command with --device cuda measures it. A
precision the device cannot run is refused (exit 2). --precision runs no joint comparison. --preset demo or tiny times another preset's model instead.

    python benchmarks/train_speed.py [--batch_size 16] [--steps 10] [--warmup_steps 3] [--device auto]
                                     [--threads N] [--joint_encoders 4] [--joint_objectives independent,miselbo]
                                     [--joint_only] [--precision fp32,bf16] [--preset paper]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402

from miselbo.errors import UserError  # noqa: E402
from miselbo.runtime.cli import resolve_device  # noqa: E402
from miselbo.runtime.cpu_layout import use_fast_cpu_layout  # noqa: E402
from miselbo.data.datasets import load_dataset  # noqa: E402
from miselbo.nvae.config import get_arch_cells  # noqa: E402
from miselbo.nvae.model import AutoEncoder, is_decoder_key  # noqa: E402
from miselbo.nvae.objectives import kl_balance_alpha  # noqa: E402
from miselbo.nvae.optim import build_optimizer  # noqa: E402
from miselbo.pipeline.presets import PAPER, PRESETS  # noqa: E402
from miselbo.training.loop import StepParts, step_weights, train_step  # noqa: E402
from miselbo.training.new_encoder import Parent, adopt_decoder  # noqa: E402
from miselbo.training.objective import RegularisedLayers, nelbo_loss  # noqa: E402
from miselbo.training.options import build_parser  # noqa: E402
from miselbo.training.precision import Precision, default_precision, resolve_precision  # noqa: E402
from miselbo.training.settings import TrainSettings  # noqa: E402
from miselbo.training.stop import StepGuard, StopRequests  # noqa: E402
from miselbo.ensemble.shared_decoder import share_decoder  # noqa: E402
from miselbo.training.joint_objective import JointSpec  # noqa: E402
from miselbo.training.joint_step import Component, JointStep, joint_train_step  # noqa: E402
from miselbo.runtime import flags  # noqa: E402

# The paper recipe's architecture and schedule (the batch size of a step is --batch_size below).
MNIST_PAPER_FLAGS = ["--dataset", "mnist", *PAPER.architecture, *PAPER.schedule]
# the model and schedule of the steps: the paper recipe unless --preset names another preset
step_flags = MNIST_PAPER_FLAGS
STEP_INDEX = 100  # a global step past the (here irrelevant) learning-rate warm-up, β < 1
MODES = ("full", "new_q")


# The gate of --precision: at the same weights and draws a precision's loss must lie within
# LOSS_REL_TOL of float32's (relative), and its gradient g (all trained parameters as one vector)
# must point the same way, cosine >= GRAD_COSINE_MIN, with |g - g_fp32| / |g_fp32| <=
# GRAD_REL_ERROR_MAX. bfloat16 rounds each operation's result to 8 significant bits (relative
# error up to 2^-9 = 2e-3), float16 to 11; the loss sums many such results whose errors mostly
# cancel, so its error stays below one rounding step (the tolerance allows 2.5), and rounding
# turns the gradient by far less than the 2.6 degrees of cosine 0.999. A wrong path (a lost or
# doubled term, other draws, a gradient left scaled) misses at least one of the three by far.
LOSS_REL_TOL = 5e-3
GRAD_COSINE_MIN = 0.999
GRAD_REL_ERROR_MAX = 0.05
GATE_FAILED = bench_record.EXIT_DISAGREEMENT
REFUSED = 2

# The gate of the default comparison (see the module docstring): both gradients are float32 sums
# of the same terms; only the order of a sum may differ between the two paths, which moves the
# gradient by a few float32 roundings (relative 1e-7 each), far below this bound. A lost term,
# a decoder left unfrozen in batch norm or other draws move it by far more.
ENCODER_GRAD_REL_ERROR_MAX = 1e-5
GATE_DRAW_SEED = 7


def build_step_parts(mode: str, device: torch.device, parent: AutoEncoder | None = None, seed: int = 1,
                     flags: list[str] | None = None, precision: Precision | None = None):
    """(StepParts, model) for a full step (seed 0) or a new-encoder step (`seed`, parent's decoder),
    of the model and schedule train.py `flags` give (default: step_flags, the --preset's), computing
    in `precision` (None: train.py's --precision auto on `device`)."""
    flags = flags or step_flags
    precision = precision or default_precision(device)
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
                      grad_scaler=precision.new_grad_scaler(),
                      trainable=trainable, alpha=kl_balance_alpha(model.groups_per_scale, device=device),
                      layers=layers, settings=TrainSettings.from_args(args),
                      iterations_per_epoch=1000, device=device, precision=precision)
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


def memory_of_one_mode(mode: str, options, precision: Precision | None = None) -> dict:
    """Run in a fresh process: RSS before the first step, peak RSS after the steps (bytes)."""
    device = torch.device("cpu")
    parts, _ = build_step_parts(mode, device, precision=precision)
    if precision is not None:  # --precision: the layout train.py trains in on the CPU
        use_fast_cpu_layout([parts.model])
    x = real_batch(options.batch_size, device)
    guard = StepGuard(StopRequests(announce=False), device)
    before = current_rss_bytes()
    for _ in range(options.warmup_steps + 2):
        train_step(parts, x, STEP_INDEX, guard)
    peak = peak_rss_bytes()
    return {"rss_before_steps": before, "peak_rss": peak}


def cpu_memory(options, precision: str | None = None) -> dict:
    """memory_of_one_mode of each kind of step, each in its own subprocess."""
    figures = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--memory_of", mode, "--batch_size",
                   str(options.batch_size), "--warmup_steps", str(options.warmup_steps),
                   "--threads", str(options.threads), "--preset", options.preset]
        if precision is not None:
            command += ["--memory_precision", precision]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        figures[mode] = {"peak_rss_mib": measured["peak_rss"] / 2 ** 20,
                         "rise_over_rss_before_steps_mib":
                             (measured["peak_rss"] - measured["rss_before_steps"]) / 2 ** 20}
    return figures


def cuda_memory(options, device: torch.device, precision: Precision | None = None) -> dict:
    figures = {}
    for mode in MODES:
        parts, _ = build_step_parts(mode, device, precision=precision)
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


# ----------------------------------------------------------------------------- the new-encoder gate

def step_loss_and_gradients(parts: StepParts, x: torch.Tensor, draw_seed: int, model: AutoEncoder | None = None,
                            layers: RegularisedLayers | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """The step's float32 loss and {parameter name: gradient} for `model` (default: a copy of the
    parts' model with the parts' layers; the model is left unchanged apart from its .grad), with the
    parts' schedule and alpha and posterior draws from `draw_seed`, without updating; only the
    parameters that require a gradient appear."""
    if model is None:
        model, layers = copy.deepcopy((parts.model, parts.layers))
    beta, lam = step_weights(parts.settings, STEP_INDEX, parts.num_total_iter)
    torch.manual_seed(draw_seed)
    loss = nelbo_loss(model, x, beta, parts.alpha, lam, layers).loss
    loss.backward()
    return float(loss.detach()), {name: p.grad.detach().clone() for name, p in model.named_parameters()
                                  if p.requires_grad and p.grad is not None}


def gradient_relative_error(gradients: dict, reference: dict, names: list[str]) -> float:
    """|g - g_ref| / |g_ref| over the named gradients as one vector (float64 sums)."""
    error = sum(float((gradients[name] - reference[name]).double().pow(2).sum()) for name in names) ** 0.5
    norm = sum(float(reference[name].double().pow(2).sum()) for name in names) ** 0.5
    return error / max(norm, 1e-30)


def full_step_reference(model: AutoEncoder) -> AutoEncoder:
    """A copy of a new-encoder model whose decoder parameters are trained again (its decoder
    modules stay in eval mode, as a frozen decoder keeps them)."""
    reference = copy.deepcopy(model)
    for parameter in reference.decoder_parameters():
        parameter.requires_grad_(True)
    return reference


def check_encoder_gradients(new_q: dict, full: dict) -> float:
    """Relative error of the new-encoder step's encoder gradient against the full step's, or
    Disagreement (a decoder parameter trained, an encoder parameter missing, or above the bound)."""
    trained_decoder = sorted(name for name in new_q if is_decoder_key(name))
    if trained_decoder:
        raise bench_record.Disagreement(f"the new-encoder step trains decoder parameters {trained_decoder[:3]}")
    expected = sorted(name for name in full if not is_decoder_key(name))
    if sorted(new_q) != expected:
        raise bench_record.Disagreement("the new-encoder step trains other encoder parameters than the full step: "
                                        f"{sorted(set(expected) ^ set(new_q))[:3]}")
    return bench_record.check_close("new-encoder step's encoder gradient against the full step's (relative "
                                    "error of all encoder parameters as one vector)",
                                    gradient_relative_error(new_q, full, expected), 0.0, ENCODER_GRAD_REL_ERROR_MAX)


def check_decoder_untouched(parts: StepParts, x: torch.Tensor) -> int:
    """One real new-encoder step; Disagreement naming the first decoder tensor it changed.
    Returns how many decoder tensors were compared."""
    before = {key: value.detach().clone() for key, value in parts.model.state_dict().items() if is_decoder_key(key)}
    train_step(parts, x, STEP_INDEX, StepGuard(StopRequests(announce=False), parts.device))
    after = parts.model.state_dict()
    changed = [key for key, value in before.items()
               if value.dtype != after[key].dtype or not torch.equal(value, after[key])]
    if changed:
        raise bench_record.Disagreement(f"a new-encoder step changed {len(changed)} decoder tensor(s), first "
                                        f"{changed[0]}")
    return len(before)


def new_encoder_gate(parent: AutoEncoder, device: torch.device, x: torch.Tensor) -> dict:
    """The gate of the module docstring on a fresh new-encoder model; Disagreement if it fails."""
    parts, model = build_step_parts("new_q", device, parent=parent)
    reference = full_step_reference(model)
    own = step_loss_and_gradients(parts, x, GATE_DRAW_SEED)[1]
    full = step_loss_and_gradients(parts, x, GATE_DRAW_SEED, reference, RegularisedLayers.encoder_of(reference))[1]
    error = check_encoder_gradients(own, full)
    compared = check_decoder_untouched(parts, x)
    print(f"gate: the new-encoder step's encoder gradient equals the full step's (relative error {error:.1e}, "
          f"bound {ENCODER_GRAD_REL_ERROR_MAX:g}); a step left all {compared} decoder tensors bit-identical")
    return {"encoder_grad_rel_error": error, "encoder_grad_rel_error_max": ENCODER_GRAD_REL_ERROR_MAX,
            "decoder_tensors_bit_identical": compared, "passed": True}


# ----------------------------------------------------------------------------- --precision

def loss_and_gradient(parts: StepParts, x: torch.Tensor, draw_seed: int) -> tuple[float, torch.Tensor]:
    """The step's loss and its gradient over the trained parameters (one float32 vector), computed
    as train_step computes them under the parts' precision, without updating: posterior draws from
    `draw_seed`; with a GradScaler the scaled gradient is unscaled, and the scale halved until the
    float16 gradient is finite (what the scaler's skipped steps do)."""
    scaler, precision = parts.grad_scaler, parts.step_precision
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    beta, lam = step_weights(parts.settings, STEP_INDEX, parts.num_total_iter)
    for _ in range(64):
        # the same weights, batch-norm and power-iteration state every time; layers follow the copy
        model, layers = copy.deepcopy((parts.model, parts.layers))
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(draw_seed)
        with precision.autocast():
            loss = nelbo_loss(model, x, beta, parts.alpha, lam, layers).loss
        (loss * scale).backward()
        gradient = torch.cat([p.grad.reshape(-1).float() / scale for p in trained if p.grad is not None])
        if bool(torch.isfinite(gradient).all()) or not scaler.is_enabled():
            return float(loss.detach()), gradient
        scale /= 2
    raise RuntimeError("the float16 gradient stayed non-finite at every scale")


def compare_with_float32(all_parts: dict, x: torch.Tensor) -> dict:
    """{precision: {mode: agreement}} at the same weights and draws, float32 the reference."""
    agreement = {}
    for mode in MODES:
        reference_loss, reference_gradient = loss_and_gradient(all_parts["fp32"][mode], x, draw_seed=7)
        for name, by_mode in all_parts.items():
            if name == "fp32":
                continue
            loss, gradient = loss_and_gradient(by_mode[mode], x, draw_seed=7)
            cosine = float(torch.nn.functional.cosine_similarity(gradient.double(),
                                                                 reference_gradient.double(), dim=0))
            relative = abs(loss - reference_loss) / abs(reference_loss)
            error = float((gradient - reference_gradient).norm() / reference_gradient.norm())
            agreement.setdefault(name, {})[mode] = {
                "loss": loss, "loss_fp32": reference_loss, "loss_diff": loss - reference_loss,
                "loss_rel_diff": relative, "grad_cosine": cosine, "grad_rel_error": error,
                "agrees": bool(relative <= LOSS_REL_TOL and cosine >= GRAD_COSINE_MIN
                               and error <= GRAD_REL_ERROR_MAX)}
    return agreement


def precision_list(text: str, device: torch.device) -> list[Precision]:
    """The --precision values resolved on `device`, float32 first; UserError for one it cannot run."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    resolved = [resolve_precision(name, device) for name in names]
    ordered = [Precision("fp32", device.type)] + [p for p in resolved if p.name != "fp32"]
    return list(dict.fromkeys(ordered))  # without repeats (auto may equal another)


def median_precision_step_times(all_parts: dict, x: torch.Tensor, options, device: torch.device) -> dict:
    """Alternate every (step kind, precision); median seconds of each after the warm-up."""
    guard = StepGuard(StopRequests(announce=False), device)
    times = {name: {mode: [] for mode in MODES} for name in all_parts}
    for index in range(options.warmup_steps + options.steps):
        for mode in MODES:
            for name, by_mode in all_parts.items():
                seconds = timed_step(by_mode[mode], x, guard)
                if index >= options.warmup_steps:
                    times[name][mode].append(seconds)
    return {name: {mode: statistics.median(values) for mode, values in by_mode.items()}
            for name, by_mode in times.items()}


def cuda_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA part: measured on {torch.cuda.get_device_name(device)}"
    return ("CUDA part: skipped, this run is on the CPU (torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}); on a GPU run the same command with --device cuda and "
            "--precision fp32,fp16,bf16 for NVAE's float16 step")


def print_precision_result(options, device: torch.device) -> int:
    """The --precision comparison; returns the exit status (GATE_FAILED before any timing)."""
    try:
        precisions = precision_list(options.precision, device)
    except UserError as err:
        print(f"train_speed.py: {err}", file=sys.stderr)
        return REFUSED
    print(cuda_line(device))
    _full_parts, full_model = build_step_parts("full", torch.device("cpu"))
    parent = full_model.cpu()
    all_parts = {p.name: {mode: build_step_parts(mode, device, parent=parent, precision=p)[0] for mode in MODES}
                 for p in precisions}
    use_fast_cpu_layout([parts.model for by_mode in all_parts.values() for parts in by_mode.values()])
    x = real_batch(options.batch_size, device)
    agreement = compare_with_float32(all_parts, x)
    for name, by_mode in agreement.items():
        for mode, figures in by_mode.items():
            print(f"{name} vs fp32, {mode} step, same weights and draws: loss {figures['loss']:.4f} vs "
                  f"{figures['loss_fp32']:.4f} (relative difference {figures['loss_rel_diff']:.2e}, "
                  f"tolerance {LOSS_REL_TOL:g}); gradient cosine {figures['grad_cosine']:.6f} (minimum "
                  f"{GRAD_COSINE_MIN:g}), relative error {figures['grad_rel_error']:.2e} (maximum "
                  f"{GRAD_REL_ERROR_MAX:g})")
    failed = [f"{name} {mode}" for name, by_mode in agreement.items() for mode, f in by_mode.items()
              if not f["agrees"]]
    if failed:
        print(f"GATE FAILED: {', '.join(failed)} do(es) not compute what float32 computes within "
              f"the tolerances; no speed is reported.", file=sys.stderr)
        return GATE_FAILED
    memory = {}
    for precision in precisions:
        memory[precision.name] = (cuda_memory(options, device, precision) if device.type == "cuda"
                                  else cpu_memory(options, precision.name))
    times = median_precision_step_times(all_parts, x, options, device)
    result = {"device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "cpu": bench_record.cpu_model(), "preset": options.preset, "batch_size": options.batch_size,
              "layout": "channels_last" if device.type == "cpu" else "default",
              "timed_steps": options.steps, "warmup_steps": options.warmup_steps,
              "precisions": [p.name for p in precisions], "step_s": times, "memory": memory,
              "loss_vs_fp32": agreement,
              "gate": {"loss_rel_tol": LOSS_REL_TOL, "grad_cosine_min": GRAD_COSINE_MIN,
                       "grad_rel_error_max": GRAD_REL_ERROR_MAX, "passed": True},
              "cuda": cuda_line(device)}
    for precision in precisions:
        for mode in MODES:
            result[f"{mode}_step_s_{precision.name}"] = times[precision.name][mode]
            if precision.name != "fp32":
                ratio = times[precision.name][mode] / times["fp32"][mode]
                result[f"ratio_{mode}_{precision.name}_over_fp32"] = ratio
                print(f"{mode} step: {precision.name} {times[precision.name][mode]:.4f} s, fp32 "
                      f"{times['fp32'][mode]:.4f} s, ratio {ratio:.3f}")
    bench_record.save("train_speed", result, device, argv=options.argv, stored_as="train_speed_precision")
    return 0


def print_joint_result(options, device: torch.device) -> dict:
    """Joint step of K encoders vs K single new-encoder steps (target: ratio <= 0.8); returns the
    figures it prints as RESULT_JOINT."""
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
    return result


def run_gate(options, device: torch.device) -> dict:
    """new_encoder_gate on the preset's model at --batch_size; ends the benchmark (exit 1) if it fails."""
    parent = build_step_parts("full", torch.device("cpu"))[1]
    try:
        return new_encoder_gate(parent, device, real_batch(options.batch_size, device))
    except bench_record.Disagreement as error:
        bench_record.refuse("train_speed.py", error)


def full_and_new_q_result(options, device: torch.device) -> dict:
    """The default comparison's figures (memory, median step times, their ratio), printed."""
    memory = cuda_memory(options, device) if device.type == "cuda" else cpu_memory(options)
    times = median_step_times(options, device)
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpu": bench_record.cpu_model(),
              "preset": options.preset, "batch_size": options.batch_size,
              "timed_steps": options.steps, "warmup_steps": options.warmup_steps,
              "full_step_s": times["full"], "new_q_step_s": times["new_q"],
              "ratio_new_q_over_full": times["new_q"] / times["full"], "memory": memory}
    print(f"full step {times['full']:.4f} s, new-encoder step {times['new_q']:.4f} s, "
          f"ratio {result['ratio_new_q_over_full']:.3f}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=flags.count_argument, default=16)
    parser.add_argument("--steps", type=flags.count_argument, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup_steps", type=flags.count_argument, default=3, help="untimed steps of each kind")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is robust on a shared machine")
    parser.add_argument("--joint_encoders", type=int, default=None,
                        help="also time one joint step of this many encoders (train.py "
                             "--num_new_encoders) against as many new-encoder steps; 0: skip "
                             "(default 4, or 0 with --precision)")
    parser.add_argument("--joint_objectives", default="independent,miselbo",
                        help="comma-separated --mixture_objective values of the joint steps")
    parser.add_argument("--joint_only", action="store_true", help="skip the full-vs-new_q part")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                        help="the model and schedule of the steps (miselbo/pipeline/presets.py)")
    parser.add_argument("--precision", default=None,
                        help="comma-separated train.py --precision values to compare with float32 "
                             "(e.g. fp32,bf16); see the module docstring")
    parser.add_argument("--memory_of", choices=MODES, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--memory_precision", default=None, help=argparse.SUPPRESS)  # internal
    options = parser.parse_args(argv)
    options.argv = sys.argv[1:] if argv is None else list(argv)
    global step_flags
    step_flags = ["--dataset", "mnist", *PRESETS[options.preset].architecture, *PRESETS[options.preset].schedule]
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    if options.memory_of:
        precision = (Precision(options.memory_precision, "cpu") if options.memory_precision else None)
        print(json.dumps(memory_of_one_mode(options.memory_of, options, precision)))
        return 0
    device = resolve_device(options.device)
    if options.joint_encoders is None:
        options.joint_encoders = 0 if options.precision else 4
    if options.precision:
        return print_precision_result(options, device)
    result = {"preset": options.preset, "gate": run_gate(options, device)}
    if options.joint_encoders > 0:
        result["joint"] = print_joint_result(options, device)
    if not options.joint_only:
        result.update(full_and_new_q_result(options, device))
    bench_record.save("train_speed", result, device, argv=options.argv)
    return 0


# ----------------------------------------------------------------------------- docs/benchmarks.md

def _memory_cells(memory: dict) -> tuple[str, str]:
    """(peak, rise over the level before the steps) in MiB, whichever meter measured them."""
    peak = memory.get("peak_rss_mib", memory.get("peak_allocated_mib"))
    rise = memory.get("rise_over_rss_before_steps_mib", memory.get("rise_over_allocated_before_steps_mib"))
    return f"{peak:.0f}", f"{rise:.0f}"


def _default_markdown(result: dict) -> list[str]:
    lines = []
    gate = result.get("gate")
    if gate:
        lines.append(f"Gate passed: new-encoder encoder gradient against the full step's, relative error "
                     f"{gate['encoder_grad_rel_error']:.1e} (bound {gate['encoder_grad_rel_error_max']:g}); "
                     f"{gate['decoder_tensors_bit_identical']} decoder tensors bit-identical after a step.")
    if "full_step_s" in result:
        lines += ["", f"Preset `{result.get('preset', 'paper')}`, batch {result['batch_size']}, median of "
                  f"{result['timed_steps']} timed steps after {result['warmup_steps']} warm-up steps, alternating.", "",
                  "| step | median s | peak MiB | rise over before-steps MiB |", "|---|---|---|---|"]
        for mode, label in (("full", "full"), ("new_q", "new encoder (`--train_new_q`)")):
            peak, rise = _memory_cells(result["memory"][mode])
            lines.append(f"| {label} | {result[f'{mode}_step_s']:.3f} | {peak} | {rise} |")
        lines += ["", f"**new-encoder / full: {result['ratio_new_q_over_full']:.3f}** (target <= 0.80)."]
    joint = result.get("joint")
    if joint:
        count = joint["num_encoders"]
        lines += ["", f"Joint step of {count} encoders against {count} new-encoder steps "
                  f"({count} x {joint['new_q_step_s']:.3f} s), batch {joint['batch_size']}:", "",
                  f"| objective | joint step s | joint / ({count} x new-encoder step) |", "|---|---|---|"]
        for key in sorted(joint):
            if key.startswith("joint_") and key.endswith("_step_s"):
                objective = key[len("joint_"):-len("_step_s")]
                ratio = joint[f"ratio_joint_{objective}_over_{count}_new_q"]
                lines.append(f"| `{objective}` | {joint[key]:.3f} | {ratio:.3f} (target <= 0.80) |")
    return lines


def _precision_markdown(result: dict) -> list[str]:
    lines = [f"Preset `{result['preset']}`, batch {result['batch_size']}, layout {result['layout']}, median of "
             f"{result['timed_steps']} timed steps after {result['warmup_steps']} warm-up steps. {result['cuda']}.", "",
             "| precision | full s | full / fp32 | new-encoder s | new-encoder / fp32 | peak MiB full / new-encoder |",
             "|---|---|---|---|---|---|"]
    for name in result["precisions"]:
        ratios = [f"{result[f'ratio_{mode}_{name}_over_fp32']:.3f}" if name != "fp32" else "1"
                  for mode in MODES]
        peaks = " / ".join(_memory_cells(result["memory"][name][mode])[0] for mode in MODES)
        lines.append(f"| {name} | {result['step_s'][name]['full']:.3f} | {ratios[0]} | "
                     f"{result['step_s'][name]['new_q']:.3f} | {ratios[1]} | {peaks} |")
    gate = result["gate"]
    lines += ["", f"Gate passed (loss within {gate['loss_rel_tol']:g} relative, gradient cosine >= "
              f"{gate['grad_cosine_min']:g}, gradient relative error <= {gate['grad_rel_error_max']:g}):", ""]
    for name, by_mode in result["loss_vs_fp32"].items():
        for mode, figures in by_mode.items():
            lines.append(f"- {name} {mode} step: loss {figures['loss']:.4f} against {figures['loss_fp32']:.4f} "
                         f"(relative {figures['loss_rel_diff']:.1e}), cosine {figures['grad_cosine']:.6f}, "
                         f"relative error {figures['grad_rel_error']:.1e}.")
    return lines


def render_markdown(record: dict) -> str:
    """The stored result's table for docs/benchmarks.md (benchmarks/report.py adds the header)."""
    result = record["result"]
    lines = _precision_markdown(result) if "precisions" in result else _default_markdown(result)
    return "\n".join(lines).strip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
