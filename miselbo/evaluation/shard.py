"""One evaluation process's share of the examples: its whole batches, each batch's log-weights
with its own seeded draws, the per-example rows the value plan asks for, and the gathering of
every process's rows in example order (miselbo_eval.py --world_size; see miselbo.evaluation.evaluate).

Each batch's draws come from a generator seeded by (seed, the batch's first example), so the rows
do not depend on how the batches are shared out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from miselbo.runtime import distributed
from miselbo.evaluation import report
from miselbo.runtime.cli import progress
from miselbo.ensemble.log_weights import Ensemble
from miselbo.evaluation.examples import STREAM_DRAWS, STREAM_SUBSETS, EvaluationExamples
from miselbo.seeding import example_seed
from miselbo.evaluation.finite import NonFiniteEvaluation

if TYPE_CHECKING:
    from miselbo.evaluation.settings import EvalSettings


@dataclass
class ShardValues:
    """Per-example rows [n, K] of this process, their example indices, and diagnostics."""
    indices: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    max_flow_residual: float = 0.0
    batch_seconds: list = field(default_factory=list)


def shard_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Whole batches [start, stop) of this process: every world_size-th batch, from batch `rank`."""
    starts = range(rank * batch_size, num_examples, world_size * batch_size)
    return [(start, min(start + batch_size, num_examples)) for start in starts]


class FlowInversionError(NonFiniteEvaluation):
    """A member's flows could not be inverted to --max_flow_residual at another member's sample
    (exit 3, like non-finite values: the numbers would not be trustworthy)."""


def check_flow_residual(weights, limit: float, paths: Sequence, start: int) -> None:
    """Raise FlowInversionError when the batch's largest inversion residual exceeds the limit."""
    if weights.flow_residual_at is None or weights.max_flow_residual <= limit:
        return
    member, group = weights.flow_residual_at
    raise FlowInversionError(
        f"inverting the flows of member {member + 1} ({paths[member]}) at latent group {group} "
        f"(0 = top) left a residual of {weights.max_flow_residual:.3g}, above --max_flow_residual "
        f"{limit:g} (batch starting at example {start}): that member's density of the other members' "
        f"samples cannot be trusted. Raise --max_flow_residual to accept it. No results were written.")


def evaluate_shard(ensemble: Ensemble, examples: EvaluationExamples, plan: report.ValuePlan,
                   settings: "EvalSettings", batches, device: torch.device, show: bool | None,
                   paths: Sequence = ()) -> ShardValues:
    shard = ShardValues()
    shown_column = 0  # miselbo, or s2a / s2s when only those are computed
    shown_name = plan.columns()[shown_column][1]
    running_sum, running_count = 0.0, 0
    bar = progress(total=len(batches), desc="MISELBO", unit="batch",
                   **({} if show is None else {"disable": not show}))
    with bar:
        for start, stop in batches:
            began = time.perf_counter()
            x = examples.batch(start, stop).to(device)
            draws = torch.Generator(device=device).manual_seed(example_seed(settings.seed, start, STREAM_DRAWS))
            weights = batch_weights(ensemble, x, plan, settings, start, draws)
            check_flow_residual(weights, settings.max_flow_residual, paths, start)
            rows = plan.per_example(weights)
            shard.indices.append(torch.arange(start, stop))
            shard.rows.append(rows)
            shard.max_flow_residual = max(shard.max_flow_residual, weights.max_flow_residual)
            shard.batch_seconds.append(time.perf_counter() - began)
            running_sum, running_count = running_sum + float(rows[:, shown_column].sum()), running_count + len(rows)
            bar.set_postfix({shown_name: f"{running_sum / running_count:.3f}"})
            bar.update()
    return shard


def active_subsets(batch: int, num_members: int, num_active: int, seed: int, start: int) -> torch.Tensor:
    """[B, S] bool: each example's A members, uniform without replacement, one randperm per example
    from a generator seeded by (seed, first example of the batch)."""
    generator = torch.Generator().manual_seed(example_seed(seed, start, STREAM_SUBSETS))
    active = torch.zeros(batch, num_members, dtype=torch.bool)
    for row in range(batch):
        active[row, torch.randperm(num_members, generator=generator)[:num_active]] = True
    return active


def batch_weights(ensemble: Ensemble, x: torch.Tensor, plan: report.ValuePlan, settings: "EvalSettings",
                  start: int, draws: torch.Generator):
    """The batch's ReducedLogWeights with what the plan needs (subsets, prefix mixtures, extra draws)."""
    active = None
    if plan.subset_estimators:
        active = active_subsets(x.shape[0], ensemble.num_members, settings.subset_size, settings.seed, start)
    extra = (ensemble.num_members - 1) * settings.num_iw_samples if plan.matched_baseline else 0
    return ensemble.reduced_weights(x, settings.num_iw_samples, draws, settings.chunk_size, active=active,
                                    prefix_sizes=plan.ablation_sizes, extra_own_samples=extra,
                                    sample_only_active=plan.active_only)


def gather_shard(shard: ShardValues, num_columns: int, device: torch.device):
    """(indices [N], rows [N, K] in example order, max residual, all batch seconds) on every process."""
    indices = torch.cat(shard.indices) if shard.indices else torch.zeros(0, dtype=torch.int64)
    rows = torch.cat(shard.rows) if shard.rows else torch.zeros(0, num_columns, dtype=torch.float64)
    indices = distributed.all_gather_cat(indices.to(device)).cpu()
    rows = distributed.all_gather_cat(rows.to(device)).cpu()
    residual = distributed.all_gather_cat(torch.tensor([shard.max_flow_residual], device=device)).max().item()
    seconds = distributed.all_gather_cat(torch.tensor(shard.batch_seconds, dtype=torch.float64, device=device))
    order = torch.argsort(indices)
    return indices[order], rows[order], residual, seconds.cpu().tolist()
