"""The main job in one command: train p_theta + q_phi_1, train more encoders against the frozen
decoder, evaluate the ensemble with MISELBO and its companions.

    python -m miselbo.pipeline                              # the demo on the embedded mnist5k digits
    python -m miselbo.pipeline --preset paper --data DIR    # NVAE's MNIST recipe, as the paper
    python -m miselbo.pipeline --preset paper --dry_run     # print the commands, run nothing

Stages (one progress bar over them, each stage shows its own):
  1. `train.py --save p_and_q1 --seed <seed_1>`                         decoder + first encoder
  2. `train.py --train_new_q --p_and_q1_path <stage 1> --save q<s> --seed <seed_s>`, s = 2..S
     (on CPU side by side, each a single-threaded child process logging to <out>/logs/q<s>.log;
     --parallel_stages 1 runs them one after another in this process; miselbo.pipeline.parallel_stages)
  3. `miselbo_eval.py --checkpoints <all S> --ablation --save <out>/results`
     (on CPU its batches split over the cores, `--world_size`; see --eval_processes)
With `--joint OBJECTIVE` stage 2 is ONE run, `train.py --train_new_q ... --save joint
--num_new_encoders S-1 --mixture_objective OBJECTIVE` (seeds seed_2, seed_2 + 1, ...), whose
components <out>/eval-joint/component-k are members 2..S.

Everything lands in `--out` (`eval-p_and_q1/`, `eval-q2/`, ..., `results/`, and
`pipeline_stages.json`, the settings each training stage was run with). Re-running the same
command continues: a stage whose checkpoint has all its epochs is skipped, an interrupted one
resumes with `--cont_training`; a re-run whose settings differ from a stage in `--out` is refused
(exit 2) unless `--retrain_changed` is given. The presets (architecture and schedule) are defined in
miselbo/pipeline/presets.py; flags this module does not know are handed to every training stage unchanged
(NVAE's flags: architecture, epochs, learning rate, ...), and override the preset. `--export DIR`
writes the S checkpoints, without optimizer state, into a `models/`-style folder with a manifest
written from what the checkpoints record. At the end it prints the wall time of every stage (for
training stages also steps, data loading, per-epoch tests, checkpoints and the final test) and
writes it to `<out>/stage_times.json` (tests/test_main_job.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from miselbo.runtime import distributed
from miselbo.data.datasets import nvae_dataset_name
from miselbo.errors import DataError, UserError
from miselbo.evaluation import evaluate, memory
from miselbo.evaluation.settings import validated_settings
from miselbo.nvae.config import ModelConfig, add_nvae_train_arguments
from miselbo.storage.folders import removed_if_left_empty
from miselbo.storage.run_lock import hold_run_lock
from miselbo.pipeline import parallel_stages
from miselbo.runtime import stage_clock
from miselbo.pipeline import stage_record
from miselbo import training
from miselbo.storage.checkpoints import read_checkpoint
from miselbo.runtime.cli import progress, resolve_device, run_cli
from miselbo.pipeline.export import export_ensemble, export_stoppable  # noqa: F401 (tests call them here)
from miselbo.pipeline.settings import (JOINT_STAGE, PROG, RETRAIN_FLAG, PipelineSettings,  # noqa: F401
                                       build_parser, parse_settings)
from miselbo.pipeline.presets import get_preset
from miselbo.training.run import RESULT_FILE_NAME as TRAIN_RESULT_FILE_NAME

STAGE_TIMES_FILE_NAME = "stage_times.json"  # seconds per stage and training part


class PipelineStopped(Exception):
    """A signal stopped the pipeline's training stages (checkpoints kept); exit_code = 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- stages

def _finished_epochs(checkpoint: Path) -> tuple[int, int] | None:
    """(epochs done, epochs asked) of a stage's checkpoint, None when there is none."""
    if not checkpoint.is_file():
        return None
    stored = read_checkpoint(checkpoint)
    return int(stored["epoch"]), int(stored["args"].epochs)


def training_argv(settings: PipelineSettings, stage: str, seed: int) -> list[str]:
    """train.py's command line for one stage (without --cont_training)."""
    argv = ["--root", str(settings.out), "--save", stage, "--seed", str(seed),
            "--dataset", settings.dataset, "--device", settings.device, *settings.data_flags()]
    argv += get_preset(settings.preset).flags() + list(settings.train_flags)
    if stage != "p_and_q1":
        argv += ["--train_new_q", "--p_and_q1_path", str(settings.checkpoint("p_and_q1").parent)]
    if stage == JOINT_STAGE:
        argv += ["--num_new_encoders", str(settings.num_encoders - 1), "--mixture_objective", settings.joint]
        if settings.joint_num_active is not None:
            argv += ["--num_active", str(settings.joint_num_active)]
    return argv


def stage_argv(settings: PipelineSettings, stage: str, seed: int) -> list[str] | None:
    """train.py's argv for a stage as its checkpoint says (resume with --cont_training), recorded in
    pipeline_stages.json; None when the stage has all its epochs already."""
    argv = training_argv(settings, stage, seed)
    state = _finished_epochs(settings.checkpoint(stage))
    if state is not None and state[0] >= state[1]:
        return None
    stage_record.record_stage(settings.out, stage, argv)
    return argv + (["--cont_training"] if state is not None else [])


def _stage_line(stage: str, test_nelbo: float, test_neg_log_p: float, samples: int, seconds: float) -> str:
    if samples == 1:  # one sample bounds -log p by the NELBO itself
        return f"{stage}: test NELBO {test_nelbo:.2f} nats (1 sample), {seconds:.0f} s"
    return (f"{stage}: test NELBO {test_nelbo:.2f} nats, -log p {test_neg_log_p:.2f} nats ({samples} "
            f"samples), {seconds:.0f} s")


def _skipped_line(settings: PipelineSettings, stage: str) -> str:
    return f"{stage}: already trained ({_finished_epochs(settings.checkpoint(stage))[0]} epochs), skipped"


def run_training_stage(settings: PipelineSettings, stage: str, seed: int) -> str:
    """Train one stage in this process, resuming or skipping it as its checkpoint says; returns what
    was done."""
    argv = stage_argv(settings, stage, seed)
    if argv is None:
        return _skipped_line(settings, stage)
    result = training.train(argv)
    return _stage_line(stage, result.test_nelbo, result.test_neg_log_p, result.final_iw_samples,
                       result.wall_seconds)


def parallel_width(settings: PipelineSettings, num_stages: int) -> int:
    """How many new-encoder stages train side by side: --parallel_stages, or with 'auto' on CPU
    min(stages, cores) (1 on CUDA, with --joint, or on one core)."""
    if settings.parallel_stages != "auto":
        return max(1, min(int(settings.parallel_stages), num_stages))
    if settings.joint is not None or resolve_device(settings.device).type != "cpu":
        return 1
    return max(1, min(num_stages, os.cpu_count() or 1))


def require_stage_folder_free(settings: PipelineSettings, stage: str) -> None:
    """Refuse (naming the holder) a stage whose folder another run holds the lock of, before its log
    is opened: a side-by-side stage's child process takes that lock only after its log file has
    been opened for appending."""
    folder = settings.checkpoint(stage).parent
    if folder.is_dir():
        with hold_run_lock(folder, "pipeline check"):
            pass


def run_parallel_stages(settings: PipelineSettings, stages: list, width: int, bar) -> list:
    """Train `stages` [(stage, seed)] as side-by-side processes; [(stage, {part: seconds})]."""
    for stage, _seed in stages:
        require_stage_folder_free(settings, stage)
    jobs, times = [], []
    for stage, seed in stages:
        argv = stage_argv(settings, stage, seed)
        if argv is None:
            bar.write(_skipped_line(settings, stage))
            times.append((stage, {"total": 0.0}))
            bar.update()
        else:
            jobs.append(parallel_stages.StageJob(stage, argv, settings.out / "logs" / f"{stage}.log"))
    if not jobs:
        return times
    bar.write(f"training {', '.join(job.name for job in jobs)} side by side ({width} at a time, "
              f"{parallel_stages.threads_per_child(width)} thread(s) each; logs in {settings.out / 'logs'})")
    began_at = time.time()

    def finished(job) -> None:
        result = json.loads((settings.checkpoint(job.name).parent / TRAIN_RESULT_FILE_NAME).read_text())
        bar.write(_stage_line(job.name, result["test_nelbo"], result["test_neg_log_p"],
                              result["final_iw_samples"], job.seconds))
        bar.update()

    def show(epochs: dict) -> None:
        bar.set_postfix_str("training " + ", ".join(f"{name} epoch {done}" for name, done in epochs.items()))

    try:
        ended = parallel_stages.run_in_parallel(jobs, width, on_progress=show, on_finished=finished)
    except parallel_stages.StagesStopped as stopped:
        raise PipelineStopped(str(stopped), stopped.exit_code) from None
    for job in ended:
        times.append((job.name, stage_clock.training_stage_parts(
            settings.checkpoint(job.name).parent / TRAIN_RESULT_FILE_NAME, job.seconds, began_at)))
    order = [stage for stage, _seed in stages]
    return sorted(times, key=lambda row: order.index(row[0]))


def changed_stages(settings: PipelineSettings) -> dict[str, list[stage_record.Difference]]:
    """{stage: differing flags} for the stages in --out (their folder exists) whose recorded
    settings differ from now."""
    changed = {}
    for stage, seed in zip(settings.stage_names(), settings.seeds):
        if not settings.checkpoint(stage).parent.exists():
            continue
        recorded = stage_record.recorded_settings(settings.out, stage, settings.checkpoint(stage))
        if recorded is None:
            continue
        now = stage_record.stage_settings(training_argv(settings, stage, seed))
        found = stage_record.differences(recorded, now)
        if found:
            changed[stage] = found
    return changed


def set_aside_changed_stages(settings: PipelineSettings, changed: dict) -> list[str]:
    """With --retrain_changed: rename the folders of the first changed stage and every stage after
    it to eval-<stage>.replaced-<time>, so they train afresh; returns what was moved."""
    names = settings.stage_names()
    first = min(names.index(stage) for stage in changed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for stage in names[first:]:
        folder = settings.checkpoint(stage).parent
        if folder.exists():
            target = folder.with_name(f"{folder.name}.replaced-{stamp}")
            folder.rename(target)
            moved.append(f"{folder} -> {target}")
    return moved


def check_stage_settings(settings: PipelineSettings) -> None:
    """Refuse (exit 2) a re-run whose settings differ from a stage already in --out, or with
    --retrain_changed set the changed stages and those after them aside."""
    changed = changed_stages(settings)
    if not changed:
        return
    if not settings.retrain_changed:
        raise stage_record.refusal(settings.out, changed, RETRAIN_FLAG)
    for line in set_aside_changed_stages(settings, changed):
        print(f"{RETRAIN_FLAG}: kept the old stage as {line}")


def evaluation_argv(settings: PipelineSettings) -> list[str]:
    argv = ["--checkpoints", *[str(path) for path in settings.member_checkpoints()],
            "--num_iw_samples", str(settings.num_iw_samples), "--batch_size", str(settings.eval_batch_size),
            "--save", str(settings.out / "results"), "--device", settings.device, "--ablation",
            "--dataset", settings.dataset, *settings.data_flags()]
    if settings.num_eval_examples is not None:
        argv += ["--num_examples", str(settings.num_eval_examples)]
    chunk_size = get_preset(settings.preset).eval_chunk_size
    if chunk_size is not None:
        argv += ["--chunk_size", str(chunk_size)]  # miselbo_eval.py caps it at L
    if not matched_baseline_on(settings):
        argv += ["--no-matched_baseline"]  # --ablation would turn it on
    processes = evaluation_processes(settings)
    if processes > 1:
        argv += ["--world_size", str(processes)]
    return argv


def matched_baseline_on(settings: PipelineSettings) -> bool:
    """--matched_baseline / --no-matched_baseline, else the preset's choice."""
    if settings.matched_baseline is not None:
        return settings.matched_baseline
    return get_preset(settings.preset).eval_matched_baseline


# the smallest test split of the datasets the pipeline knows (mnist5k's); all of them hold at least this
FEWEST_TEST_IMAGES = 1000


def evaluation_processes(settings: PipelineSettings) -> int:
    """How many processes evaluate: --eval_processes, or with 'auto' on CPU min(cores, batches)
    (1 on CUDA). Each process takes whole batches with their own seeded draws, so the results
    do not depend on the count (tests/test_pipeline.py)."""
    if settings.eval_processes != "auto":
        return int(settings.eval_processes)
    if resolve_device(settings.device).type != "cpu":
        return 1
    num_examples = settings.num_eval_examples or FEWEST_TEST_IMAGES
    num_batches = -(-num_examples // settings.eval_batch_size)
    return max(1, min(os.cpu_count() or 1, num_batches))


def check_process_counts(settings: PipelineSettings) -> None:
    """Refuse, before any stage runs, an --eval_processes or --parallel_stages this machine cannot hold."""
    device_type = resolve_device(settings.device).type
    distributed.require_local_process_count(evaluation_processes(settings), device_type, "--eval_processes")
    if device_type == "cpu":  # side by side on CUDA, the stages share the device
        width = parallel_width(settings, len(settings.stage_names()) - 1)
        distributed.require_local_process_count(width, device_type, "--parallel_stages")


def dry_run_text(settings: PipelineSettings) -> str:
    """The commands the job would run, shell-quoted, with comment lines: each stage's role, and for a
    stage already in --out what a real run would do with it. Reads, never writes."""
    changed = changed_stages(settings)
    lines = [f"# {PROG} --dry_run: preset {settings.preset}, {settings.num_encoders} encoder(s), "
             f"output in {settings.out}; nothing was run or written. The commands a run would start:"]
    for stage, seed in zip(settings.stage_names(), settings.seeds):
        role = "decoder + first encoder" if stage == "p_and_q1" else "another encoder, frozen decoder"
        if stage == JOINT_STAGE:
            role = f"encoders 2..{settings.num_encoders} in one joint run ({settings.joint}), frozen decoder"
        lines.append(f"# stage {stage}: {role}, seed {seed}")
        argv = training_argv(settings, stage, seed)
        stage_record.stage_settings(argv)  # a flag train.py does not know stops here (exit 2)
        if stage in changed:
            lines.append(f"# ({stage} in {settings.out} was trained with other settings: "
                         f"{', '.join(d.describe() for d in changed[stage])}; a run stops with exit 2 "
                         f"unless {RETRAIN_FLAG} is given)")
        elif settings.checkpoint(stage).exists():
            lines.append(f"# ({settings.checkpoint(stage)} exists: a run skips this stage when it has "
                         f"all its epochs and adds --cont_training otherwise)")
        lines.append(shlex.join(["python", "train.py", *argv]))
    lines.append(f"# evaluation of the {settings.num_encoders}-encoder ensemble")
    lines.append(shlex.join(["python", "miselbo_eval.py", *evaluation_argv(settings)]))
    return "\n".join(lines)


def train_stages(settings: PipelineSettings, bar) -> list:
    """Every training stage: p_and_q1 (or the joint run) here, q2..qS here or side by side;
    [(stage, {part: seconds})] in stage order."""
    stages = list(zip(settings.stage_names(), settings.seeds))
    times = []
    later = stages[1:] if settings.joint is None else []
    width = parallel_width(settings, len(later))
    for stage, seed in (stages[:1] if width > 1 else stages):
        bar.set_postfix_str(f"training {stage}")
        began, began_at = time.perf_counter(), time.time()
        bar.write(run_training_stage(settings, stage, seed))
        times.append((stage, stage_clock.training_stage_parts(
            settings.checkpoint(stage).parent / TRAIN_RESULT_FILE_NAME,
            time.perf_counter() - began, began_at)))
        bar.update()
    if width > 1:
        began = time.perf_counter()
        times += run_parallel_stages(settings, later, width, bar)
        times.append(("(side by side)", {"total": time.perf_counter() - began}))
    return times


def check_evaluation_fits(settings: PipelineSettings) -> None:
    """Before any training: the evaluation's own checks of its command line, and whether its batches
    fit into memory with the architecture the stages will train (miselbo.evaluation.memory), each
    refusal naming the pipeline's flag (--eval_batch_size, not the evaluation's --batch_size)."""
    eval_settings = validated_settings(evaluate.settings_from_args(
        evaluate.build_parser().parse_args(evaluation_argv(settings))))
    config = _trained_architecture(settings)
    if config is None:
        return  # train.py refuses such an architecture itself, naming its flags
    device = resolve_device(settings.device)
    num_examples = settings.num_eval_examples or FEWEST_TEST_IMAGES
    names = memory.FlagValues(settings.num_iw_samples, settings.eval_batch_size, True, None,
                              batch_flag="--eval_batch_size", chunk_flag=None)
    memory.require_evaluation_fits(config, eval_settings, num_examples, names, device, evaluation_processes(settings))


def _trained_architecture(settings: PipelineSettings) -> ModelConfig | None:
    """The model configuration the training stages will build (preset + given flags), None when the
    flags do not describe one."""
    parser = add_nvae_train_arguments(argparse.ArgumentParser(add_help=False, exit_on_error=False))
    try:
        args, _unknown = parser.parse_known_args(get_preset(settings.preset).flags() + list(settings.train_flags))
        args.dataset = nvae_dataset_name(settings.dataset)
        return ModelConfig.from_args(args)
    except (argparse.ArgumentError, SystemExit, ValueError, DataError):
        return None


def prepare_out(settings: PipelineSettings) -> None:
    """Create --out (with parents) before anything is written into it; refusals name the flag."""
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--out {settings.out} names an existing file, not a folder; choose another "
                        f"--out.") from None
    except OSError as err:
        raise UserError(f"--out {settings.out}: cannot create the output folder ({err.strerror or err}); "
                        f"choose another --out.") from None
    if not os.access(settings.out, os.W_OK | os.X_OK):
        raise UserError(f"--out {settings.out} is not writable; choose another --out.")


def run_pipeline(settings: PipelineSettings) -> int:
    """All stages in order; returns the evaluation's exit status. Every flag is checked before the
    first stage starts, and the whole run holds <out>/run.lock: a second pipeline on the same --out
    is refused before it writes anything (a stage record, a log line)."""
    check_process_counts(settings)
    check_evaluation_fits(settings)
    if settings.dry_run:
        print(dry_run_text(settings))
        return 0
    with removed_if_left_empty(settings.out):
        prepare_out(settings)
        with hold_run_lock(settings.out, "pipeline"):
            return _run_stages(settings)


def _run_stages(settings: PipelineSettings) -> int:
    started = time.perf_counter()
    check_stage_settings(settings)
    with progress(total=len(settings.stage_names()) + 1, desc="pipeline", unit="stage") as bar:
        try:
            times = train_stages(settings, bar)
        except PipelineStopped as stopped:
            print(f"{PROG}: {stopped}", file=sys.stderr)
            return stopped.exit_code
        bar.set_postfix_str("evaluating")
        began = time.perf_counter()
        status = evaluate.main(evaluation_argv(settings))
        times.append(("evaluation", {"total": time.perf_counter() - began}))
        if status == 0 and not matched_baseline_on(settings):
            bar.write(f"(the compute-matched baseline was not computed: the {settings.preset} preset leaves it "
                      f"out; add --matched_baseline to compute it for this ensemble)")
        bar.update()
    if status == 0 and settings.export is not None:
        began = time.perf_counter()
        status = export_stoppable(settings, evaluation_argv(settings))
        times.append(("export", {"total": time.perf_counter() - began}))
    _report_times(settings, times, time.perf_counter() - started)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; results in "
          f"{settings.out / 'results'}")
    return status


def _report_times(settings: PipelineSettings, times: list, total_seconds: float) -> None:
    """Print the per-stage time summary and write it to <out>/stage_times.json."""
    print("time per stage (training parts: steps include data_loading):")
    print(stage_clock.summary_table(times, total_seconds))
    stage_clock.write_stage_times(settings.out / STAGE_TIMES_FILE_NAME, times, total_seconds)


def _main(argv: Sequence[str] | None) -> int:
    return run_pipeline(parse_settings(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)

