"""What miselbo_eval.py runs: MISELBO and related bounds for an NVAE ensemble given as checkpoints.

    python miselbo_eval.py --checkpoints run1 run1_q2 run1_q3 --num_iw_samples 1000 --save results/ens

With no checkpoint arguments it evaluates the demo ensemble in `models/` (a folder with a
manifest.json). The flags of the public MISELBO script keep working:

  --q0 ... --q5           checkpoints, as in the public script (default None); they come first, in
                          order, followed by --checkpoints. Any S >= 1 is allowed.
  --num_iw_samples L      importance samples per encoder (default 1000; for the demo ensemble in
                          models/, run without checkpoint flags, its manifest's eval_defaults).
  --ablation              also evaluate every sub-ensemble of the first S' members (S' in --S_list,
                          default 1..S) with the first L' samples (L' in --L_list, default
                          1, 2, 3, 5, 10, 50, 100, 500, 1000 up to L, and L), from the same samples;
                          writes <name>.csv and <name>.png in --save.
  --ablation_file_name    <name> of those files (default "ablation"; a suffix such as .xlsx is dropped).
  --save DIR              folder for results.json, samples.png and the ablation files (created).
  --data DIR              data root for torchvision data sets (mnist5k needs none).
  --eval_on_train         evaluate the training split instead of the test split.
  --time_eval             report seconds per batch and per example (wall time is always reported).
  --only_miselbo          report MISELBO only (same cost: the log-weights are computed once).
  --only_iwelbo           report the members' IWELBOs only (same cost: one pass scores all members).
  --seed N                seeds the data binarisation and every draw (used here; the public
                          script ignored it).
  --world_size N          split the examples over N local processes (torch.distributed; gloo on
                          CPU, NCCL on CUDA); under torchrun the environment decides instead.
  --local_rank, --master_address   torch.distributed.launch compatibility / rendezvous address.

Our own flags add, among others:

  --matched_baseline      each member's IWELBO with S x L of its own samples (the L MISELBO used plus
                          (S - 1) x L more: about S times MISELBO's decoder passes), the best member
                          (chosen on the evaluation set) and the paired differences miselbo - best,
                          pooled - best. On by default with --ablation; --no-matched_baseline turns it off.
  --estimators s2a s2s --num_active A
                          S2A / S2S (Hotti et al. 2024): every example draws A of the S members
                          uniformly without replacement (its own subset, seeded by --seed and the
                          example's batch), and when only s2a / s2s are requested only those A members
                          are sampled (A x L decoder passes per example instead of S x L). Subsets are
                          per example, so the examples stay independent and the standard error over
                          examples includes the subset randomness. With other estimators, all members
                          are sampled and s2a / s2s are computed from the same samples.

  --allow_duplicate_members
                          evaluate even if one checkpoint file is given twice or two members have
                          equal encoder weights (refused by default, naming both positions).

Before the first batch, the memory one batch needs is estimated from the architecture, the batch
size, L and the chunk size (miselbo/evaluation/memory.py); settings that would not fit into the
device's available memory are refused (exit 2), naming the flag and the largest value that fits.
The chunk size is never lowered silently: it changes which draws are made.

Determinism: MNIST images are binarised with a generator seeded from (seed, example index), and the
draws of each batch with one seeded from (seed, index of the batch's first example). Shards are
whole batches, so --world_size does not change any number; --batch_size and --chunk_size do
(they change how the draws are grouped), and so do the device type and the torch version.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.multiprocessing as mp

from miselbo.runtime import distributed
from miselbo.errors import USER_ERRORS, UserError
from miselbo.runtime.cli import resolve_device
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
from miselbo.data.datasets import num_output_dims
from miselbo.ensemble.log_weights import Ensemble, default_chunk_size
from miselbo.evaluation.finite import NonFiniteEvaluation, require_finite_rows
from miselbo.runtime.distribution_checks import no_distribution_validation
from miselbo.storage.folders import removed_if_left_empty
from miselbo.storage.result_set import ResultSet
from miselbo.storage.run_lock import hold_run_lock
from miselbo.runtime.stop_signals import StopSignal, signals_raise
from miselbo.evaluation.members import LoadedMembers, load_members
from miselbo.evaluation.examples import EvaluationExamples, evaluation_examples
from miselbo.evaluation.shard import evaluate_shard, gather_shard, shard_batches
from miselbo.nvae.distributions import output_image
from miselbo.evaluation import memory, report
from miselbo.evaluation.settings import (CPU_BATCH_SIZE_CAP, PROG, EvalSettings, build_parser,  # noqa: F401
                                         settings_from_args, validated_settings)

NUM_PRIOR_SAMPLES, NUM_RECONSTRUCTED = 8, 4


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: evaluate, print the table (rank 0 only), return the exit status."""
    settings = settings_from_args(build_parser().parse_args(argv))
    try:
        with signals_raise():
            results = evaluate(settings)
    except NonFiniteEvaluation as err:
        print(f"{PROG}: evaluation stopped: {err}", file=sys.stderr)
        return err.exit_code
    except StopSignal as stop:
        kept = (f"the outputs of the previous run in {settings.save} (if any) are untouched: a run's "
                f"outputs replace them only all together at its end" if settings.save else
                "nothing was written")
        print(f"{PROG}: stopped by {stop.name}; {kept}.", file=sys.stderr)
        return stop.exit_code
    if results is not None:
        print(report.format_table(results))
        if settings.save:
            print(f"results written to {Path(settings.save) / 'results.json'}")
    return 0


def _prepare_save_folder(save: str | None) -> Path | None:
    """Create --save (with parents) and make sure files can be written there, before any work."""
    if save is None:
        return None
    folder = Path(save)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--save {save}: cannot create the output folder ({err.strerror or err}).") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--save {save}: the output folder is not writable; choose another --save.")
    return folder


# ----------------------------------------------------------------------------- one process

def _evaluate_here(settings: EvalSettings, device: torch.device, images) -> dict | None:
    """Load, evaluate this process's shard, gather; on rank 0 assemble and write the results."""
    began = time.perf_counter()
    main_process = distributed.is_main_process()
    members = load_members(settings.checkpoints, device, settings.trust_checkpoint,
                           settings.allow_decoder_mismatch, settings.allow_duplicate_members)
    if members.decoder_problems and main_process:
        print(f"{PROG}: WARNING: --allow_decoder_mismatch: {'; '.join(members.decoder_problems)}. Every "
              f"member is scored with the decoder of {members.paths[0]}.", file=sys.stderr)
    use_fast_cpu_layout(members.models)
    ensemble = Ensemble(members.models, check_decoders=False)  # checked and shared by load_members
    examples = evaluation_examples(settings.dataset, settings.data, settings.eval_on_train, settings.num_examples,
                                   settings.seed, members, images)
    if main_process and settings.num_examples is not None and settings.num_examples > len(examples):
        print(f"{PROG}: note: --num_examples {settings.num_examples} is more than the {len(examples)} "
              f"examples {_source_name(settings, examples, images)}; evaluating all {len(examples)}.",
              file=sys.stderr)
    batch_size = settings.batch_size or _default_batch_size(members.args, device)
    plan = report.ValuePlan(settings.estimators, ensemble.num_members, settings.subset_size,
                            settings.S_list if settings.ablation else (),
                            settings.L_list if settings.ablation else (), settings.matched_baseline)
    _require_memory(settings, members.models[0].config, len(examples), batch_size, device)
    batches = shard_batches(len(examples), batch_size, distributed.rank(), distributed.world_size())
    show = settings.show_progress if main_process else False
    shard = evaluate_shard(ensemble, examples, plan, settings, batches, device, show, members.paths)
    indices, rows, residual, seconds = gather_shard(shard, len(plan.columns()), device)
    if not main_process:
        return None
    require_finite_rows(rows, indices, lambda index: examples.batch(index, index + 1), members.models,
                        members.paths, device)  # else exit 3 naming the member
    results = _assemble(settings, members, examples, plan, rows, residual, device, batch_size)
    results["wall_seconds"] = time.perf_counter() - began
    if settings.time_eval:
        results["timing"] = {"batches": len(seconds), "seconds_per_batch": float(np.mean(seconds)),
                             "seconds_per_example": float(np.sum(seconds)) / max(1, len(indices)),
                             "note": "seconds summed over processes"}
    if settings.save:
        _write_outputs(Path(settings.save), settings, results, ensemble, examples, device)
    return results


def _source_name(settings: EvalSettings, examples: EvaluationExamples, images) -> str:
    if images is not None:
        return "given"
    return f"in the {'training' if settings.eval_on_train else 'test'} split of {examples.dataset}"


def _require_memory(settings: EvalSettings, config, num_examples: int, batch_size: int,
                    device: torch.device) -> None:
    """Refuse (exit 2, naming the flag and the largest value that fits) settings whose batches would
    not fit into this process's share of the device's memory; see miselbo.evaluation.memory."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
    typed = memory.FlagValues(settings.num_iw_samples, batch_size, settings.batch_size is not None,
                              settings.chunk_size)
    memory.require_evaluation_fits(config, settings, num_examples, typed, device, processes)


def _default_batch_size(args: argparse.Namespace, device: torch.device) -> int:
    stored = int(getattr(args, "batch_size", CPU_BATCH_SIZE_CAP) or CPU_BATCH_SIZE_CAP)
    return min(stored, CPU_BATCH_SIZE_CAP) if device.type == "cpu" else stored


def _assemble(settings, members: LoadedMembers, examples, plan, rows, residual, device, batch_size) -> dict:
    results = {
        "S": len(members.models), "L": settings.num_iw_samples, "num_examples": len(examples),
        "dataset": examples.dataset, "split": "train" if settings.eval_on_train else "test",
        "seed": settings.seed, "device": str(device), "world_size": distributed.world_size(),
        "batch_size": batch_size,
        "chunk_size": settings.chunk_size or default_chunk_size(batch_size, settings.num_iw_samples, device),
        "num_output_dims": num_output_dims(examples.dataset),
        "checkpoints": [{"path": str(path), "decoder_fingerprint": fingerprint}
                        for path, fingerprint in zip(members.paths, members.fingerprints)],
        "decoder_problems": members.decoder_problems,
    }
    if members.duplicates:  # allowed by --allow_duplicate_members
        results["duplicate_members"] = [list(pair) for pair in members.duplicates]
    results.update(report.summarise(plan, rows, results["num_output_dims"]))
    if plan.subset_estimators:
        results["subset_size"] = settings.subset_size
        results["subsets"] = {"scheme": "per_example", "num_active": settings.subset_size, "seed": settings.seed,
                              "sampled": "active members only" if plan.active_only else "all members",
                              "generator": "torch.randperm per example, seeded by (seed, batch's first index)"}
    if members.models[0].with_nf:
        results["flow_inversion_max_residual"] = residual
    return results


def _write_outputs(folder: Path, settings: EvalSettings, results: dict, ensemble: Ensemble,
                   examples: EvaluationExamples, device: torch.device) -> None:
    legacy = ("results.json", "samples.png", f"{settings.ablation_file_name}.csv",
              f"{settings.ablation_file_name}.png")  # folders written before outputs.json existed
    with ResultSet(folder, legacy) as outputs:  # replaces the previous run's outputs all together
        report.write_json(outputs.path("results.json"), results)
        if settings.ablation:
            name = settings.ablation_file_name
            report.write_ablation_csv(outputs.path(f"{name}.csv"), results["ablation"])
            report.write_ablation_plot(outputs.path(f"{name}.png"), results["ablation"])
        prior, inputs, reconstructions = _sample_images(ensemble, examples, settings.seed, device)
        report.write_samples_figure(outputs.path("samples.png"), prior, inputs, reconstructions)


@torch.no_grad()
def _sample_images(ensemble: Ensemble, examples: EvaluationExamples, seed: int, device: torch.device):
    """Prior samples of the decoder, a few inputs, and each member's reconstruction (mean images)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        decoder = ensemble.decoder
        prior = output_image(decoder.decoder_output(decoder.sample(NUM_PRIOR_SAMPLES, 1.0)), mean=True)
        count = min(NUM_RECONSTRUCTED, len(examples))
        spaced = [index * len(examples) // count for index in range(count)]  # mnist5k is sorted by class
        inputs = torch.cat([examples.batch(index, index + 1) for index in spaced]).to(device)
        reconstructions = [output_image(decoder.decoder_output(member(inputs)[0]), mean=True)
                           for member in ensemble.members]
    return prior.cpu(), inputs.cpu(), [image.cpu() for image in reconstructions]


# ----------------------------------------------------------------------------- processes

def evaluate(settings: EvalSettings, images: torch.Tensor | None = None) -> dict | None:
    """Evaluate the ensemble and return the results dict (None on torchrun ranks other than 0).

    images: evaluate these [N, C, H, W] model inputs instead of the data set (programmatic use).
    With world_size > 1 (and no torchrun environment) spawns that many local processes.
    """
    settings = validated_settings(settings)
    with removed_if_left_empty(settings.save), contextlib.ExitStack() as lock:
        lock.enter_context(no_distribution_validation())  # NaN reaches require_finite_rows
        _prepare_save_folder(settings.save)
        if settings.save is not None and int(os.environ.get("RANK", "0")) == 0:
            lock.enter_context(hold_run_lock(settings.save, "evaluation"))  # one writer per folder
        device = resolve_device(settings.device)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            return _run_process(settings, _environment_setup(settings, device), images)
        if settings.world_size == 1:
            return _evaluate_here(settings, device, images)
        distributed.require_local_process_count(settings.world_size, device.type, "--world_size")
        return _spawn(settings, device, images)


def _environment_setup(settings: EvalSettings, device: torch.device) -> distributed.DistributedSetup:
    """torchrun (or torch.distributed.launch, which passes --local_rank) describes the processes."""
    local_rank = int(os.environ.get("LOCAL_RANK", settings.local_rank))
    return distributed.DistributedSetup(
        rank=int(os.environ["RANK"]), local_rank=local_rank, world_size=int(os.environ["WORLD_SIZE"]),
        device_type=device.type, master_address=os.environ.get("MASTER_ADDR", settings.master_address),
        master_port=int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None)


def _run_process(settings: EvalSettings, setup: distributed.DistributedSetup, images) -> dict | None:
    distributed.initialize(setup)
    try:
        return _evaluate_here(settings, setup.device, images)
    finally:
        distributed.shutdown()


def _spawn(settings: EvalSettings, device: torch.device, images) -> dict:
    """Run settings.world_size local processes; rank 0 hands its results back through a file."""
    exchange = Path(tempfile.mkdtemp(prefix="miselbo_eval_"))
    setups = distributed.node_setups(settings.world_size, 1, 0, device.type, settings.master_address)
    worker = functools.partial(_spawned_worker, settings, images, exchange)
    try:
        try:
            distributed.spawn_processes(worker, setups)
        except mp.ProcessExitedException as err:  # killed by a signal, or exited without a report
            raise UserError(_worker_exit_message(err, settings.world_size)) from None
        except Exception:
            errors = sorted(exchange.glob("error*.txt"))
            if errors:
                raise UserError(errors[0].read_text(encoding="utf-8")) from None
            raise
        return json.loads((exchange / "results.json").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(exchange, ignore_errors=True)


def _worker_exit_message(err: "mp.ProcessExitedException", world_size: int) -> str:
    """What to tell the user when an evaluation process ended without a result or an error."""
    how = (f"was killed by {err.signal_name}" if err.signal_name else f"exited with status {err.exit_code}")
    hint = (" SIGKILL usually means the machine ran out of memory: every process holds its own models and "
            "data, so use a smaller --world_size (or --batch_size / --chunk_size)."
            if err.signal_name == "SIGKILL" else "")
    return (f"evaluation process {err.error_index} of {world_size} (--world_size) {how} before it finished; "
            f"no results were written.{hint}")


def _spawned_worker(settings: EvalSettings, images, exchange: Path, setup: distributed.DistributedSetup) -> None:
    if setup.device_type == "cpu":
        torch.set_num_threads(distributed.cpu_threads_per_process(setup.world_size))
    try:
        results = _run_process(settings, setup, images)
    except USER_ERRORS as err:
        (exchange / f"error{setup.rank}.txt").write_text(str(err), encoding="utf-8")
        raise
    if results is not None:
        report.write_json(exchange / "results.json", results)
