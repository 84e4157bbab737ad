"""How much memory one evaluation batch needs, estimated from the architecture before anything large
is allocated, and the refusal (exit 2) of settings that cannot fit.

The estimate (`peak_bytes`) follows what `miselbo.ensemble.log_weights.Ensemble.reduced_weights` and
`miselbo.evaluation.report.ValuePlan.per_example` hold at their busiest moment, in three parts:

* per example of the batch (`batch_bytes`): every member's stored bottom-up features, the x-only
  part of every group's posterior heads, and the encoder pass of one member;
* per row of one decoder pass (`row_bytes`, rows = chunk x batch): the largest moment of the
  decoder walk, cell by cell (input, skip branch, the widest intermediate tensors of the cell's
  operations, its output), at each latent group the S members' posterior parameters and
  log-densities, with flows their inversion, and at the end the output distribution's
  log-likelihood;
* per example and sample (`sample_bytes`, float64): the reductions kept for the whole batch
  (log p, own log q, mixture log q, the ablation's prefix mixtures, the matched baseline's extra
  draws) and the temporary tensors of the per-example values made from them.

Float32 activations and float64 reductions, as the code computes them. Against the live tensor
bytes counted op by op (every tensor a torch operation returns, until it is freed) the estimate was
1.0x to 1.6x on ten architectures (Bernoulli, Normal and logistic-mixture outputs, mbconv cells,
flows, S = 1..6, with and without the matched baseline and the ablation). What a process really
grows by is more: on the CPU the allocator keeps freed blocks and oneDNN its workspaces, so in a
process's first pass of 0.3 to 1.2 GB of live tensors (demo and tiny models) the peak resident
memory rose by 1.2x to 2.0x the live bytes, plus a one-off growth that varied between runs by up
to 0.35 GB (which the share of memory left free, 1 - MEMORY_FRACTION, is for). `process_bytes`
multiplies by ALLOCATOR_OVERHEAD of the device; tests/test_faults_evaluation.py checks that this
lies within 0.5x to 2.5x of the measured growth of a process's peak resident memory (ru_maxrss) on
the tiny and demo models (0.9x to 1.7x in the runs made when it was written).

The chunk size (samples per example in one decoder pass) is never lowered on the user's behalf: the
draws of a pass depend on it (each pass draws one tensor per group), so another chunk size gives
other numbers. A setting that does not fit is refused instead, naming the flag and the largest value
that fits, before the first batch is evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from miselbo.ensemble.log_weights import default_chunk_size
from miselbo.errors import UserError
from miselbo.evaluation import report
from miselbo.nvae.config import CHANNEL_MULT, ModelConfig, get_arch_cells
from miselbo.runtime.available_memory import available_bytes

FLOAT32, FLOAT64 = 4, 8
# Share of the available memory one evaluation may plan to use: the rest is left for what the
# estimate does not count (libraries' workspaces, other programs, estimation error).
MEMORY_FRACTION = 0.7
# Peak resident memory / peak live tensor bytes: the CPU allocator keeps freed blocks (measured
# 1.2x to 2.0x, see the module docstring); CUDA's caching allocator rounds and splits blocks (not
# measured here: no GPU was at hand).
ALLOCATOR_OVERHEAD = {"cpu": 2.0, "cuda": 1.25}
FLOW_EXPANSION = 6  # the hidden width of a flow cell, as a multiple of the latent channels


# ----------------------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class PassPlan:
    """The sizes one evaluation batch runs with (what the estimate depends on besides the model)."""
    batch: int  # examples in the batch
    num_samples: int  # L
    chunk: int  # samples per example in one decoder pass
    num_members: int  # S
    prefix_sizes: tuple = ()  # the ablation's sub-ensemble sizes S'
    matched_baseline: bool = False
    subsets: bool = False  # s2a / s2s requested (an active-subset mixture is kept)
    num_examples: int = 0  # rows of per-example values kept over the whole run
    num_columns: int = 0  # per-example values of each row

    @property
    def rows(self) -> int:
        return self.batch * min(self.chunk, self.num_samples)


def _op_peak(op: str, c_in: int, c_out: int, side_in: int, side_out: int, upsample: bool) -> int:
    """Float32 elements per row one cell operation adds to its input at its busiest."""
    area_in, area_out = side_in * side_in, side_out * side_out
    inner = c_in * (area_out if upsample else area_in)  # the input after the optional up-sampling
    out = c_out * area_out
    if op.startswith("mconv"):  # [up-sampling], BN, 1x1 conv to the hidden width, BN-swish, depthwise, ...
        hidden = int(round(c_in * int(op.split("_e")[1].split("k")[0]))) * area_out
        return max(2 * inner + (inner if upsample else 0), inner + 3 * hidden, 4 * hidden, hidden + out, 2 * out)
    # res_*: (BN) activation, optional up-sampling, convolution
    return max(2 * c_in * area_in, c_in * area_in + inner, inner + out)


def _cell_peak(ops: list, c_in: int, c_out: int, side_in: int, stride: int) -> tuple[int, int]:
    """(peak float32 elements per row, output side) of one residual cell, its input included."""
    side_out = side_in * 2 if stride == -1 else side_in // 2 if stride == 2 else side_in
    held, out = c_in * side_in * side_in, c_out * side_out * side_out
    if stride == 1:
        skip, skip_making = 0, 0
    elif stride == -1:  # bilinear up-sampling, then a 1x1 conv
        skip, skip_making = out, c_in * side_out * side_out + out
    else:  # swish, four stride-2 convs, concatenated
        skip, skip_making = out, held + 2 * out
    peak = held + skip_making
    op_input = 0
    for index, op in enumerate(ops):
        first = index == 0
        peak = max(peak, held + skip + op_input + _op_peak(op, c_in if first else c_out, c_out,
                                                           side_in if first else side_out, side_out,
                                                           stride == -1 and first))
        op_input = out
    return max(peak, held + skip + 3 * out), side_out


def _group_peak(config: ModelConfig, num_members: int, channels: int, side: int, top: bool) -> int:
    """Float32 elements per row at one latent group: decoder state, prior, every member's posterior
    parameters and log-densities at the source's sample, flows, and the combiner."""
    area = side * side
    state, latent = channels * area, config.num_latent_per_group * area
    members = num_members * latent
    posterior = 5 * members if top else 11 * members  # per-sample heads: conv, sum, res_dist, mu, sigma
    posterior += 2 * state + 6 * latent  # the prior (ELU of the state, its conv) and the draw
    if config.num_nf:
        hidden = FLOW_EXPANSION * latent
        posterior += 3 * hidden + 2 * members + channels * area  # flow cells, inverted points, context
    return max(state + posterior, 3 * state + latent)  # ... or the combiner's concatenation and conv


def _output_peak(config: ModelConfig, channels: int) -> int:
    """Float32 elements per row of the output head and the log-likelihood of x."""
    area = config.input_size * config.input_size
    logits = config.output_channels * area
    if config.input_channels == 1:  # Bernoulli
        likelihood = 4 * logits
    elif config.num_mixture_dec == 1:  # Normal decoder on 2x - 1
        likelihood = 10 * config.input_channels * area
    else:  # discretised logistic mixture: ~16 tensors of 3 M values per pixel
        likelihood = 16 * 3 * config.num_mixture_dec * area
    return 2 * channels * area + logits + likelihood + 2 * config.input_channels * area


def row_bytes(config: ModelConfig, num_members: int) -> int:
    """Bytes per row (one sample of one example) of one decoder pass at its busiest."""
    cells = get_arch_cells(config.arch_instance)
    mult = CHANNEL_MULT ** (config.num_preprocess_blocks + config.num_latent_scales - 1)
    side = config.latent_size
    peak = 0
    groups = list(reversed(config.groups_per_scale))
    if config.vanilla_vae:
        peak = _group_peak(config, num_members, int(config.num_channels_dec * mult), side, True)
        peak = max(peak, (config.num_latent_per_group + int(config.num_channels_enc * mult)) * side * side)
    else:
        for scale, num_groups in enumerate(groups):
            channels = int(config.num_channels_dec * mult)
            for group in range(num_groups):
                first = scale == 0 and group == 0
                if not first:
                    for _ in range(config.num_cell_per_cond_dec):
                        peak = max(peak, _cell_peak(cells["normal_dec"], channels, channels, side, 1)[0])
                peak = max(peak, _group_peak(config, num_members, channels, side, first))
            if scale < len(groups) - 1:
                cell, side = _cell_peak(cells["up_dec"], channels, channels // CHANNEL_MULT, side, -1)
                peak = max(peak, cell)
                mult /= CHANNEL_MULT
    for _ in range(config.num_postprocess_blocks):
        for index in range(config.num_postprocess_cells):
            channels = int(config.num_channels_dec * mult)
            if index == 0:
                cell, side = _cell_peak(cells["up_post"], channels, channels // CHANNEL_MULT, side, -1)
                mult /= CHANNEL_MULT
            else:
                cell = _cell_peak(cells["normal_post"], channels, channels, side, 1)[0]
            peak = max(peak, cell)
    peak = max(peak, _output_peak(config, int(config.num_channels_dec * mult)))
    return FLOAT32 * peak


def batch_bytes(config: ModelConfig, num_members: int) -> int:
    """Bytes per example of the batch held during all its passes: every member's bottom-up features
    and posterior-head bases, and one member's encoder pass at a time."""
    cells = get_arch_cells(config.arch_instance)
    side, channels = config.input_size, config.num_channels_enc
    encoder_peak = 2 * channels * side * side
    mult = 1
    for _ in range(config.num_preprocess_blocks):
        for index in range(config.num_preprocess_cells):
            channels = int(config.num_channels_enc * mult)
            if index == config.num_preprocess_cells - 1:
                cell, side = _cell_peak(cells["down_pre"], channels, channels * CHANNEL_MULT, side, 2)
                mult *= CHANNEL_MULT
            else:
                cell = _cell_peak(cells["normal_pre"], channels, channels, side, 1)[0]
            encoder_peak = max(encoder_peak, cell)
    stored = 0
    for scale, num_groups in enumerate(config.groups_per_scale):
        channels = int(config.num_channels_enc * mult)
        stored += num_groups * channels * side * side
        encoder_peak = max(encoder_peak, _cell_peak(cells["normal_enc"], channels, channels, side, 1)[0])
        if scale < config.num_latent_scales - 1:
            cell, side = _cell_peak(cells["down_enc"], channels, channels * CHANNEL_MULT, side, 2)
            encoder_peak = max(encoder_peak, cell)
            mult *= CHANNEL_MULT
    heads = sum(6 * config.num_latent_per_group * (config.latent_size * 2 ** scale) ** 2 * count
                for scale, count in enumerate(reversed(config.groups_per_scale)))
    return FLOAT32 * (num_members * (stored + heads) + encoder_peak)


def sample_bytes(plan: PassPlan) -> tuple[int, int]:
    """(kept, temporary) bytes per example and sample L of the float64 reductions."""
    members = plan.num_members
    kept = (3 + plan.subsets) * members + sum(plan.prefix_sizes)
    temporary = 2 * members  # own log-weights, a log-sum-exp
    if plan.matched_baseline:  # S x L own log-weights per member, kept while the ablation makes its own
        kept += members * (members - 1)
        temporary += members * members * (2 if plan.prefix_sizes else 1)
    return FLOAT64 * kept, FLOAT64 * temporary


def peak_bytes(config: ModelConfig, plan: PassPlan) -> int:
    """The estimated peak bytes of one evaluation batch (see the module docstring), plus the
    per-example values of the whole run."""
    kept, temporary = sample_bytes(plan)
    per_batch = plan.batch * (batch_bytes(config, plan.num_members) + kept * plan.num_samples)
    busiest = max(plan.rows * row_bytes(config, plan.num_members), plan.batch * plan.num_samples * temporary)
    values = 2 * FLOAT64 * plan.num_examples * plan.num_columns  # the rows, then stacked
    return per_batch + busiest + values


def process_bytes(config: ModelConfig, plan: PassPlan, device: torch.device | str) -> int:
    """peak_bytes as the process's memory grows by it on `device` (ALLOCATOR_OVERHEAD included)."""
    overhead = ALLOCATOR_OVERHEAD.get(torch.device(device).type, ALLOCATOR_OVERHEAD["cpu"])
    return int(overhead * peak_bytes(config, plan))


# ----------------------------------------------------------------------------- the refusal

def _size(count: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.1f} kB"


def _largest(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n) (fits is monotone), low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class FlagValues:
    """The flags the memory depends on, as resolved, and the names a refusal gives them (the
    pipeline's differ from miselbo_eval.py's; chunk_flag None: the user cannot set the chunk)."""
    num_samples: int
    batch_size: int  # the batch size used (the typed one, or the checkpoint's / the device's)
    batch_size_typed: bool
    chunk_size: int | None  # None: by device (default_chunk_size)
    samples_flag: str = "--num_iw_samples"
    batch_flag: str = "--batch_size"
    chunk_flag: str | None = "--chunk_size"


def require_fits(config: ModelConfig, plan: PassPlan, flags: FlagValues, device: torch.device,
                 default_chunk, processes: int = 1, available: int | None = None) -> None:
    """UserError (exit 2) when the estimated peak of one batch exceeds MEMORY_FRACTION of the memory
    available to each of `processes` processes on this machine; it names the flag to lower and the
    largest value that fits. default_chunk(batch, num_samples) gives the chunk when none was typed."""
    available = available_bytes(device) if available is None else available
    if available is None:
        return
    if device.type == "cpu":
        available //= max(1, processes)
    budget = int(MEMORY_FRACTION * available)

    def chunk_of(batch: int, samples: int) -> int:
        return min(flags.chunk_size, samples) if flags.chunk_size else default_chunk(batch, samples)

    def need(batch: int, samples: int, chunk: int | None = None) -> int:
        chunk = chunk_of(batch, samples) if chunk is None else chunk
        return process_bytes(config, replace(plan, batch=batch, num_samples=samples, chunk=chunk), device)

    needed = need(plan.batch, plan.num_samples, plan.chunk)
    if needed <= budget:
        return
    where = (f"one evaluation batch would need about {_size(needed)} ({plan.batch} example(s) x "
             f"{plan.num_members} member(s) x {plan.num_samples} sample(s), {plan.chunk} sample(s) per "
             f"decoder pass), more than the {_size(budget)} allowed: {MEMORY_FRACTION:.0%} of the "
             f"{_size(available)} available on {device.type}" + (f" to each of {processes} processes"
                                                                  if processes > 1 and device.type == "cpu" else ""))
    samples, batch = plan.num_samples, plan.batch
    chunk = _largest(lambda c: need(batch, samples, c) <= budget, 1, plan.chunk)
    if chunk >= 1 and flags.chunk_flag is not None:
        given = flags.chunk_size if flags.chunk_size else f"{plan.chunk} (the default for {device.type})"
        raise UserError(f"{flags.chunk_flag} {given}: {where}. The largest {flags.chunk_flag} that fits is "
                        f"{chunk} (it changes which draws are made, not what is estimated).")
    largest_batch = _largest(lambda b: need(b, samples) <= budget, 1, batch)
    batch_refusal = (f"{flags.batch_flag} {flags.batch_size}: {where}. The largest {flags.batch_flag} that "
                     f"fits is {largest_batch}.")
    if flags.batch_size_typed and largest_batch >= 1:
        raise UserError(batch_refusal)
    largest_samples = _largest(lambda l: need(batch, l) <= budget, 1, samples)
    if largest_samples >= 1:
        at_one = _largest(lambda l: need(1, l) <= budget, largest_samples, samples)
        other = f" ({at_one} at {flags.batch_flag} 1)" if at_one > largest_samples else ""
        raise UserError(f"{flags.samples_flag} {samples}: {where}. The largest {flags.samples_flag} that fits "
                        f"is {largest_samples} at {flags.batch_flag} {batch}{other}.")
    if largest_batch >= 1:
        raise UserError(batch_refusal)
    raise UserError(f"{where}; not even one example with one sample fits. Free memory, evaluate on "
                    f"another device (--device), or use fewer members.")


def require_evaluation_fits(config: ModelConfig, settings, num_examples: int, flags: FlagValues,
                            device: torch.device, processes: int = 1, available: int | None = None) -> None:
    """require_fits for the batches of an evaluation with these (validated) EvalSettings of S =
    len(settings.checkpoints) members: the full batch and the last, smaller one (whose default chunk
    is larger) are both checked."""
    plan = report.ValuePlan(settings.estimators, len(settings.checkpoints), settings.subset_size,
                            settings.S_list if settings.ablation else (),
                            settings.L_list if settings.ablation else (), settings.matched_baseline)
    samples, batch_size = settings.num_iw_samples, flags.batch_size

    def default_chunk(batch: int, num_samples: int) -> int:
        return default_chunk_size(batch, num_samples, device)

    for batch in sorted({min(batch_size, num_examples), num_examples % batch_size} - {0}, reverse=True):
        chunk = min(settings.chunk_size, samples) if settings.chunk_size else default_chunk(batch, samples)
        pass_plan = PassPlan(batch, samples, chunk, plan.num_members, tuple(plan.ablation_sizes),
                             plan.matched_baseline, bool(plan.subset_estimators), num_examples,
                             len(plan.columns()))
        require_fits(config, pass_plan, flags, device, default_chunk, processes, available)
