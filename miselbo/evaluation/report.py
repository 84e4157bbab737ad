"""From log-weights to reported numbers: per-example estimator values, their summary, the table,
results.json, the ablation's CSV and plot, and the samples figure.

Per batch, `ValuePlan.per_example` turns the ensemble's per-sample reductions (log p, own log q and
the mixture log q of every sample, `miselbo.ensemble.log_weights.ReducedLogWeights`) into one row of numbers per
example (every requested estimator, every member's IWELBO, the matched baseline and, for the
ablation, every estimator of the sub-ensemble of the first S' members with the first L' samples).
Rows of all
batches (and all processes) are stacked in example order and summarised: the mean over examples
(each example weighted equally) and its standard error std / sqrt(N) (ddof 1).

Units: nats, log-likelihood sign (a bound on log p(x)); `nll_nats` = -mean and
`nll_bpd` = nll_nats / (D ln 2), D = num_output_dims (784 for MNIST, 3072 for CIFAR-10). The JSD
estimate is a divergence (nats, >= 0 in expectation): its nll fields are None.

Matched baseline: member s's IWELBO from S x L of its own samples (the L that MISELBO used, then
(S - 1) x L more), so that it costs the same number of decoder passes as MISELBO. The best member is
the one with the highest mean on the evaluation set itself (labelled so: choosing on the same data
favours it slightly). Paired differences (miselbo - best matched, pooled - best matched) are formed
per example, then averaged; their standard error is that of the per-example differences.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from miselbo import estimators as est
from miselbo.storage.safe_io import atomic_write_bytes, atomic_write_text

# Estimators reduced from the full tensors; "iwelbo" means every member's own IWELBO.
BOUND_FUNCTIONS = {
    "miselbo": est.miselbo,
    "pooled": est.pooled_mis_bound,
    "avg_iwelbo": est.average_iwelbo,
    "avg_elbo": est.average_elbo,
    "jsd": lambda log_p, log_q: est.jsd(log_q),
}
SUBSET_ESTIMATORS = ("s2a", "s2s")
ESTIMATOR_NAMES = ("miselbo", "pooled", "avg_iwelbo", "iwelbo", "avg_elbo", "jsd", "s2a", "s2s")
DEFAULT_ESTIMATORS = ("miselbo", "pooled", "avg_iwelbo", "iwelbo", "avg_elbo", "jsd")
DIVERGENCES = ("jsd",)
PRIOR_COLUMNS = 4


# ----------------------------------------------------------------------------- per example

@dataclass(frozen=True)
class ValuePlan:
    """Which per-example values to compute: `columns()` names them, `per_example` fills them.

    Always present unless `active_only`: miselbo, avg_iwelbo (for the running value and the gap) and
    every member's IWELBO. ablation_sizes / ablation_samples: the S' and L' of the ablation grid
    (empty: none). matched_baseline: add each member's IWELBO at S x L samples (and pooled).
    active_only: every requested estimator is s2a / s2s, so only the active members are sampled.
    """
    estimators: tuple
    num_members: int
    subset_size: int | None = None
    ablation_sizes: tuple = ()
    ablation_samples: tuple = ()
    matched_baseline: bool = False

    @property
    def active_only(self) -> bool:
        return all(name in SUBSET_ESTIMATORS for name in self.estimators)

    @property
    def bounds(self) -> tuple:
        """The full-ensemble estimators computed: requested ones plus miselbo and avg_iwelbo."""
        if self.active_only:
            return ()
        wanted = set(self.estimators) | {"miselbo", "avg_iwelbo"} | ({"pooled"} if self.matched_baseline else set())
        return tuple(name for name in BOUND_FUNCTIONS if name in wanted)

    @property
    def subset_estimators(self) -> tuple:
        return tuple(name for name in SUBSET_ESTIMATORS if name in self.estimators)

    @property
    def ablation_estimators(self) -> tuple:
        return tuple(name for name in BOUND_FUNCTIONS if name in self.estimators)

    def columns(self) -> list[tuple]:
        columns = [("bound", name) for name in self.bounds]
        columns += [("bound", name) for name in self.subset_estimators]
        if self.active_only:
            return columns
        columns += [("member", index) for index in range(self.num_members)]
        if self.matched_baseline:
            columns += [("matched", index) for index in range(self.num_members)]
        for size in self.ablation_sizes:
            for samples in self.ablation_samples:
                columns += [("ablation", size, samples, name) for name in self.ablation_estimators]
                if self.matched_baseline:
                    columns += [("ablation_matched", size, samples, index) for index in range(size)]
        return columns

    def per_example(self, weights) -> torch.Tensor:
        """[B, K] float64 on the CPU, K = len(columns()), in column order, from a
        miselbo.ensemble.log_weights.ReducedLogWeights (with active / prefix mixtures / extra draws as planned)."""
        values = [_bound_values(name, weights.log_p, weights.log_q_own, weights.log_q_mix) for name in self.bounds]
        values += [_subset_values(name, weights) for name in self.subset_estimators]
        if self.active_only:
            return torch.stack(values, dim=1).cpu()
        log_w_own = weights.log_p - weights.log_q_own  # [B, S, L]
        values += list(est.reduced.iwelbo(log_w_own).unbind(dim=-1))
        if self.matched_baseline:
            matched_log_w = _matched_log_weights(log_w_own, weights.log_w_own_extra)  # [B, S, S L]
            values += list(est.reduced.iwelbo(matched_log_w).unbind(dim=-1))
        for size in self.ablation_sizes:
            for samples in self.ablation_samples:
                values += self._ablation_values(weights, size, samples)
        return torch.stack(values, dim=1).cpu()

    def _ablation_values(self, weights, size: int, samples: int) -> list:
        """The ablation estimators of members 0..size-1 with their first `samples` draws."""
        log_p, log_q_own = weights.log_p[:, :size, :samples], weights.log_q_own[:, :size, :samples]
        log_q_mix = weights.log_q_mix_prefix[size][:, :, :samples]  # [B, S', L']
        values = [_bound_values(name, log_p, log_q_own, log_q_mix) for name in self.ablation_estimators]
        if self.matched_baseline:
            log_w = _matched_log_weights(weights.log_p - weights.log_q_own, weights.log_w_own_extra)
            values += list(est.reduced.iwelbo(log_w[:, :size, :size * samples]).unbind(dim=-1))
        return values


def _matched_log_weights(log_w_own: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Each member's S x L own log-weights [B, S, S L]: the L that MISELBO used, then the (S - 1) x L
    extra draws. With S = 1 there are no extra draws (None): the matched baseline is the IWELBO."""
    if extra is None or extra.shape[-1] == 0:
        return log_w_own
    return torch.cat([log_w_own, extra], dim=-1)


def _bound_values(name: str, log_p, log_q_own, log_q_mix) -> torch.Tensor:
    """One full-ensemble estimator per example, [B], from [B, S, L] reductions."""
    if name == "miselbo":
        return est.reduced.miselbo(log_p, log_q_mix)
    if name == "pooled":
        return est.reduced.pooled(log_p, log_q_mix)
    if name == "avg_iwelbo":
        return est.reduced.iwelbo(log_p - log_q_own).mean(dim=-1)
    if name == "avg_elbo":
        return est.reduced.average_elbo(log_p, log_q_own)
    if name == "jsd":
        return est.reduced.jsd(log_q_own, log_q_mix)
    raise ValueError(f"unknown estimator {name!r}")


def _subset_values(name: str, weights) -> torch.Tensor:
    """S2A (full mixture) or S2S (the subset's mixture), averaged over each example's subset: [B]."""
    log_q_mix = weights.log_q_mix if name == "s2a" else weights.log_q_mix_active
    per_member = est.reduced.per_member_mis(weights.log_p, log_q_mix)  # [B, S], NaN outside the subset
    return est.reduced.subset_mean(per_member, weights.active)


# ----------------------------------------------------------------------------- summaries

def mean_and_stderr(values: torch.Tensor) -> tuple[float, float | None]:
    """Mean over examples and std / sqrt(N) (None for a single example)."""
    mean = float(values.mean())
    if values.numel() < 2:
        return mean, None
    return mean, float(values.std(unbiased=True)) / math.sqrt(values.numel())


def estimate_entry(values: torch.Tensor, name: str, num_output_dims: int) -> dict:
    """{"mean", "stderr", "nll_nats", "nll_bpd"} of one estimator's per-example values."""
    mean, stderr = mean_and_stderr(values)
    if name in DIVERGENCES:
        return {"mean": mean, "stderr": stderr, "nll_nats": None, "nll_bpd": None}
    return {"mean": mean, "stderr": stderr, "nll_nats": -mean, "nll_bpd": -mean / (num_output_dims * math.log(2))}


def summarise(plan: ValuePlan, values: torch.Tensor, num_output_dims: int) -> dict:
    """The estimator part of results.json from the stacked per-example values [N, K]."""
    column = {key: index for index, key in enumerate(plan.columns())}
    requested = [name for name in ESTIMATOR_NAMES if name in plan.estimators and name != "iwelbo"]
    summary = {"estimators": {name: estimate_entry(values[:, column[("bound", name)]], name, num_output_dims)
                              for name in requested}}
    if plan.active_only:
        return summary
    if plan.matched_baseline:
        summary.update(_matched_summary(plan, values, column))
    members = [mean_and_stderr(values[:, column[("member", index)]]) for index in range(plan.num_members)]
    summary["iwelbo_per_member"] = [mean for mean, _ in members]
    summary["iwelbo_per_member_stderr"] = [stderr for _, stderr in members]
    gap = values[:, column[("bound", "miselbo")]] - values[:, column[("bound", "avg_iwelbo")]]
    summary["delta"], summary["delta_stderr"] = mean_and_stderr(gap)
    if plan.ablation_sizes:
        summary["ablation"] = [
            dict(S=size, L=samples, estimator=name,
                 **estimate_entry(values[:, column[("ablation", size, samples, name)]], name, num_output_dims))
            for size in plan.ablation_sizes for samples in plan.ablation_samples
            for name in plan.ablation_estimators]
        if plan.matched_baseline:
            summary["ablation"] += [_ablation_matched_row(values, column, size, samples, num_output_dims)
                                    for size in plan.ablation_sizes for samples in plan.ablation_samples]
    return summary


def _best_column(values: torch.Tensor, columns: list[int]) -> int:
    """Position in `columns` of the column of [N, K] values with the highest mean."""
    return int(torch.stack([values[:, index].mean() for index in columns]).argmax())


def _matched_summary(plan: ValuePlan, values: torch.Tensor, column: dict) -> dict:
    """iwelbo_matched_per_member (+ stderr), best_member_matched and the paired differences."""
    matched_columns = [column[("matched", index)] for index in range(plan.num_members)]
    matched = [mean_and_stderr(values[:, index]) for index in matched_columns]
    best = _best_column(values, matched_columns)
    best_values = values[:, matched_columns[best]]  # [N]
    paired = {}
    for name in ("miselbo", "pooled"):
        mean, stderr = mean_and_stderr(values[:, column[("bound", name)]] - best_values)
        paired[f"{name}_minus_best_matched"] = {"mean": mean, "stderr": stderr}
    return {"iwelbo_matched_per_member": [mean for mean, _ in matched],
            "iwelbo_matched_per_member_stderr": [stderr for _, stderr in matched],
            "matched_num_samples": "S * L per member",
            "best_member_matched": {"member": best + 1, "mean": matched[best][0], "stderr": matched[best][1],
                                    "chosen_on": "the evaluation set (highest mean)"},
            "paired_differences": paired}


def _ablation_matched_row(values, column: dict, size: int, samples: int, num_output_dims: int) -> dict:
    """The best of members 1..S' with S' x L' own samples each (chosen on the evaluation set)."""
    columns = [column[("ablation_matched", size, samples, index)] for index in range(size)]
    best = columns[_best_column(values, columns)]
    return dict(S=size, L=samples, estimator="best_member_matched",
                **estimate_entry(values[:, best], "best_member_matched", num_output_dims))


# ----------------------------------------------------------------------------- text and files

def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """The human-readable summary printed on stdout."""
    lines = [f"MISELBO evaluation: S = {results['S']} encoder(s), L = {results['L']} sample(s) each, "
             f"{results['num_examples']} {results['split']} example(s) of {results['dataset']}, "
             f"seed {results['seed']}, {results['device']}, {results['wall_seconds']:.1f} s",
             f"{'estimator':<14}{'mean (nats)':>14}{'stderr':>10}{'NLL (nats)':>13}{'bits/dim':>10}"]
    for name, entry in results["estimators"].items():
        lines.append(f"{name:<14}{_fmt(entry['mean']):>14}{_fmt(entry['stderr']):>10}"
                     f"{_fmt(entry['nll_nats']):>13}{_fmt(entry['nll_bpd']):>10}")
    for index, (mean, stderr) in enumerate(zip(results.get("iwelbo_per_member", []),
                                               results.get("iwelbo_per_member_stderr", []))):
        lines.append(f"{'iwelbo q' + str(index + 1):<14}{_fmt(mean):>14}{_fmt(stderr):>10}{_fmt(-mean):>13}")
    lines += _matched_lines(results)
    if "delta" in results:
        lines.append(f"delta = miselbo - avg_iwelbo: {_fmt(results['delta'])} nats "
                     f"(stderr {_fmt(results['delta_stderr'])})")
    if "subsets" in results:
        subsets = results["subsets"]
        lines.append(f"s2a / s2s: {subsets['num_active']} of {results['S']} members per example "
                     f"({subsets['scheme']}, subset seed {subsets['seed']})")
    if "flow_inversion_max_residual" in results:
        lines.append(f"largest flow-inversion residual: {results['flow_inversion_max_residual']:.3g}")
    if results.get("decoder_problems"):
        lines.append("WARNING: decoders differ (--allow_decoder_mismatch): every member used the first "
                     "checkpoint's decoder.")
    return "\n".join(lines)


def _matched_lines(results: dict) -> list[str]:
    """Rows of the compute-matched baseline (S x L samples from one member) and the paired gaps."""
    if "iwelbo_matched_per_member" not in results:
        return []
    samples = results["S"] * results["L"]
    lines = [f"{'iwelbo q' + str(index + 1) + '@SL':<14}{_fmt(mean):>14}{_fmt(stderr):>10}{_fmt(-mean):>13}"
             for index, (mean, stderr) in enumerate(zip(results["iwelbo_matched_per_member"],
                                                        results["iwelbo_matched_per_member_stderr"]))]
    best = results["best_member_matched"]
    lines.append(f"best member at S*L = {samples} samples: q{best['member']} (chosen on this evaluation set), "
                 f"{_fmt(best['mean'])} nats (stderr {_fmt(best['stderr'])})")
    for name, entry in results["paired_differences"].items():
        label = name.replace("_minus_best_matched", " - best matched")
        lines.append(f"{label} (paired): {_fmt(entry['mean'])} nats (stderr {_fmt(entry['stderr'])})")
    return lines


def write_json(path: Path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")  # + results.json.sha256


ABLATION_FIELDS = ("S", "L", "estimator", "mean", "stderr", "nll_nats", "nll_bpd")


def write_ablation_csv(path: Path, rows: Sequence[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ABLATION_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row[key] is None else row[key]) for key in ABLATION_FIELDS})
    atomic_write_text(path, buffer.getvalue())


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_ablation_plot(path: Path, rows: Sequence[dict]) -> None:
    """Bounds against L (log axis), one colour per ensemble size S'; MISELBO solid, the average
    IWELBO dashed, the pooled bound dotted, the best member at S' x L samples dash-dotted (where
    computed)."""
    from matplotlib.figure import Figure  # Agg canvas, no display needed
    styles = {"miselbo": "-", "avg_iwelbo": "--", "pooled": ":", "best_member_matched": "-."}
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    sizes = sorted({row["S"] for row in rows})
    for colour_index, size in enumerate(sizes):
        colour = f"C{colour_index}"
        for name, style in styles.items():
            points = sorted((row["L"], row["mean"]) for row in rows if row["S"] == size and row["estimator"] == name)
            if points:
                axes.plot(*zip(*points), style, color=colour, marker="o", markersize=3,
                          label=f"{name}, S={size}")
    axes.set_xscale("log")
    axes.set_xlabel("L (importance samples per encoder)")
    axes.set_ylabel("bound on log p(x) (nats)")
    axes.legend(fontsize="small", ncol=2)
    axes.grid(alpha=0.3)
    atomic_write_bytes(path, _figure_bytes(figure), record_sha256=False)


def write_samples_figure(path: Path, prior_images: torch.Tensor, inputs: torch.Tensor,
                         reconstructions: Sequence[torch.Tensor]) -> None:
    """Top: decoder prior samples (rows of PRIOR_COLUMNS). Bottom: rows of [input | reconstruction by
    q1 | ... | qS] (mean images)."""
    from matplotlib.figure import Figure
    num_members = len(reconstructions)
    columns = [inputs] + list(reconstructions)  # each [n, C, H, W]
    grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)  # [C, nH, (S+1)W]
    prior_rows = prior_images.shape[0] // PRIOR_COLUMNS
    prior_grid = torch.cat([torch.cat(list(prior_images[row * PRIOR_COLUMNS:(row + 1) * PRIOR_COLUMNS]), dim=2)
                            for row in range(prior_rows)], dim=1)  # [C, rows H, PRIOR_COLUMNS W]
    figure = Figure(figsize=(max(4.0, 1.2 * (num_members + 1)), 2.5 + 1.2 * inputs.shape[0]))
    top, bottom = figure.subplots(2, 1)
    for axes, image, title in ((top, prior_grid, "decoder prior samples"),
                               (bottom, grid, "input | " + " | ".join(f"q{j + 1}" for j in range(num_members)))):
        array = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=1)
        axes.set_title(title, fontsize="small")
        axes.axis("off")
    atomic_write_bytes(path, _figure_bytes(figure), record_sha256=False)
