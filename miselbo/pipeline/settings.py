"""The main job's command line: its own flags, the PipelineSettings they give, and the checks that
need no files (the stages, the evaluation and the run itself are in miselbo.pipeline)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from miselbo.storage.checkpoints import CHECKPOINT_FILE_NAME
from miselbo.data.datasets import check_dataset_name
from miselbo.errors import UserError
from miselbo.runtime import flags
from miselbo.pipeline.presets import PRESETS, get_preset

PROG = "python -m miselbo.pipeline"
DESCRIPTION = ("The main job in one command: train p_theta + q_phi_1, train more encoders against the "
               "frozen decoder, evaluate the ensemble with MISELBO and its companions.")
RETRAIN_FLAG = "--retrain_changed"
JOINT_STAGE = "joint"


@dataclass(frozen=True)
class PipelineSettings:
    """What the pipeline does; `train_flags` go to every training stage after the preset's."""
    out: Path
    dataset: str
    num_encoders: int
    seeds: tuple[int, ...]
    preset: str
    train_flags: tuple[str, ...]
    num_iw_samples: int
    num_eval_examples: int | None
    eval_batch_size: int
    device: str
    export: Path | None
    data: str | None = None
    dry_run: bool = False
    retrain_changed: bool = False
    joint: str | None = None  # --joint OBJECTIVE: q2..qS in one run (train.py --num_new_encoders)
    joint_num_active: int | None = None
    parallel_stages: str = "auto"  # --parallel_stages: "auto" or a count of side-by-side q stages
    eval_processes: str = "auto"  # --eval_processes: "auto" or a count of evaluation processes
    matched_baseline: bool | None = None  # --[no-]matched_baseline; None: the preset's choice

    def member_names(self) -> list[str]:
        return ["p_and_q1"] + [f"q{member}" for member in range(2, self.num_encoders + 1)]

    def member_checkpoints(self) -> list[Path]:
        """The S checkpoint files of the ensemble (with --joint: the joint run's components)."""
        if self.joint is None or self.num_encoders < 2:
            return [self.checkpoint(stage) for stage in self.stage_names()]
        joint_folder = self.out / f"eval-{JOINT_STAGE}"
        return [self.checkpoint("p_and_q1")] + [joint_folder / f"component-{index}" / CHECKPOINT_FILE_NAME
                                                for index in range(1, self.num_encoders)]

    def data_flags(self) -> list[str]:
        return [] if self.data is None else ["--data", self.data]

    def stage_names(self) -> list[str]:
        if self.joint is not None and self.num_encoders > 1:
            return ["p_and_q1", JOINT_STAGE]
        return self.member_names()

    def checkpoint(self, stage: str) -> Path:
        if stage == JOINT_STAGE:  # component 1's file stands for the joint run (its args, epochs)
            return self.out / f"eval-{stage}" / "component-1" / CHECKPOINT_FILE_NAME
        return self.out / f"eval-{stage}" / CHECKPOINT_FILE_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="folder for every stage's output (default: runs/<dataset>_<preset>, e.g. "
                             "runs/mnist5k_demo)")
    parser.add_argument("--dataset", default=None,
                        help="mnist5k (embedded), mnist or cifar10 (default: the preset's: mnist5k for "
                             "demo and tiny, mnist for paper)")
    parser.add_argument("--data", default=None,
                        help="data root of torchvision data sets, for training and evaluation "
                             "(mnist5k needs none)")
    parser.add_argument("--num_encoders", type=int, default=3, help="ensemble size S")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one seed per encoder (default 1..S)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="architecture and schedule (miselbo/pipeline/presets.py); any NVAE train.py flag "
                             "given overrides it")
    parser.add_argument("--num_iw_samples", type=int, default=None,
                        help="importance samples L per encoder (default: the preset's: 20 for demo and "
                             "tiny, 1000 for paper)")
    parser.add_argument("--num_eval_examples", type=int, default=None,
                        help="evaluate this many test images (default: all)")
    parser.add_argument("--eval_batch_size", type=int, default=50)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--export", default=None,
                        help="copy the S checkpoints here (models/ layout with manifest.json)")
    parser.add_argument("--joint", default=None, choices=("independent", "miselbo", "s2a", "s2s"),
                        help="train q2..qS in one joint run with this --mixture_objective "
                             "(train.py --num_new_encoders S-1; seeds must then be consecutive)")
    parser.add_argument("--joint_num_active", type=int, default=None,
                        help="--num_active of the joint run (with --joint s2a or s2s)")
    parser.add_argument("--parallel_stages", default="auto",
                        help="train this many of the stages q2..qS side by side, each in its own process "
                             "with its share of the CPU cores (1: one after another in this process). "
                             "auto: on CPU min(S - 1, cores), else 1. Side by side, a stage's float "
                             "rounding differs from a one-process run (its thread count differs)")
    parser.add_argument("--matched_baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="add the compute-matched baseline to the evaluation (each member's IWELBO at "
                             "S x L samples; about S times MISELBO's decoder passes). Default: the "
                             "preset's (off for demo, on for tiny and paper)")
    parser.add_argument("--eval_processes", default="auto",
                        help="split the evaluation's batches over this many processes (miselbo_eval.py "
                             "--world_size; the numbers do not depend on it). auto: on CPU min(cores, "
                             "batches), else 1")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the train.py and miselbo_eval.py commands this would run, run nothing")
    parser.add_argument(RETRAIN_FLAG, action="store_true",
                        help="when a stage in --out was trained with other settings, retrain it and "
                             "every stage after it (old folders are renamed, not deleted)")
    return parser


def check_joint_num_active(joint: str | None, num_active: int | None, num_encoders: int) -> None:
    """--joint_num_active A: with --joint s2a / s2s (and S >= 2) required, 1 <= A <= S - 1; else unused."""
    if joint in ("s2a", "s2s") and num_encoders > 1:
        if num_active is None:
            raise UserError(f"--joint {joint} needs --joint_num_active A: how many of the "
                            f"{num_encoders - 1} jointly trained encoders each example samples from.")
        flags.whole_number("--joint_num_active", num_active, 1, num_encoders - 1)
    elif num_active is not None:
        raise UserError(f"--joint_num_active is only used with --joint s2a or s2s and --num_encoders >= 2 "
                        f"(got --joint {joint or 'not given'}, --num_encoders {num_encoders}).")


def check_output_folder(flag: str, folder: Path) -> None:
    """Refuse, without writing anything, an output folder that names an existing file or lies under
    one, or whose nearest existing folder cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} names an existing file, not a folder; choose another {flag}.")
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, so the folder cannot be created there.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable; choose another {flag}.")


def parse_settings(argv: Sequence[str]) -> PipelineSettings:
    """Settings from the command line; unknown flags are kept as training flags."""
    args, train_flags = build_parser().parse_known_args(list(argv))
    preset = get_preset(args.preset)
    num_iw_samples = preset.num_iw_samples if args.num_iw_samples is None else args.num_iw_samples
    dataset = args.dataset or preset.dataset
    flags.count("--num_encoders", args.num_encoders)
    flags.count("--num_iw_samples", num_iw_samples)
    flags.optional_count("--num_eval_examples", args.num_eval_examples)
    flags.count("--eval_batch_size", args.eval_batch_size)
    seeds = tuple(args.seeds) if args.seeds else tuple(range(1, args.num_encoders + 1))
    for seed in seeds:
        flags.seed("--seeds", seed)
    if len(seeds) != args.num_encoders or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs {args.num_encoders} distinct values (one per encoder), got "
                        f"{list(seeds)}.")
    check_joint_num_active(args.joint, args.joint_num_active, args.num_encoders)
    if args.dataset is not None:
        check_dataset_name(args.dataset)
    for flag, folder in (("--out", args.out), ("--export", args.export)):
        if folder is not None:
            check_output_folder(flag, Path(folder))
    for flag in ("--save", "--root", "--seed", "--train_new_q", "--p_and_q1_path", "--cont_training"):
        if flag in train_flags:
            raise UserError(f"{flag} is set by the pipeline for each stage; use --out and --seeds.")
    if args.joint is not None and len(seeds) > 1 and \
            list(seeds[1:]) != list(range(seeds[1], seeds[1] + len(seeds) - 1)):
        raise UserError(f"--joint trains q2..qS with seeds s, s + 1, ...: --seeds after the first must be "
                        f"consecutive, got {list(seeds)}.")
    for flag in ("parallel_stages", "eval_processes"):
        value = getattr(args, flag)
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise UserError(f"--{flag} must be auto or a whole number >= 1, got {value!r}.")
    return PipelineSettings(
        parallel_stages=args.parallel_stages, eval_processes=args.eval_processes,
        matched_baseline=args.matched_baseline,
        joint=args.joint, joint_num_active=args.joint_num_active,
        out=Path(args.out or f"runs/{dataset}_{preset.name}"), dataset=dataset, num_encoders=args.num_encoders,
        seeds=seeds, preset=args.preset, train_flags=tuple(train_flags), num_iw_samples=num_iw_samples,
        num_eval_examples=args.num_eval_examples, eval_batch_size=args.eval_batch_size,
        device=args.device, export=Path(args.export) if args.export else None, data=args.data,
        dry_run=args.dry_run, retrain_changed=args.retrain_changed)
