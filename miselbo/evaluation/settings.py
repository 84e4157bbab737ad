"""miselbo_eval.py's settings: the EvalSettings dataclass, the command line that gives it (flags
as in the public script, plus ours), and the checks that need no checkpoint. The flags are described
in the docstring of miselbo/evaluation/evaluate.py and by `python miselbo_eval.py --help`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from miselbo.data.datasets import check_dataset_name
from miselbo.errors import UserError
from miselbo.evaluation import report
from miselbo.evaluation.members import (defaults_folder, discover_demo_folder, expand_checkpoint_paths,
                                        read_eval_defaults, read_manifest, refuse_repeated_files)
from miselbo.runtime import flags

PROG = "miselbo_eval.py"
NUM_PUBLIC_MEMBER_FLAGS = 6
DEFAULT_NUM_IW_SAMPLES = 1000  # the public script's default
DEFAULT_L_GRID = (1, 2, 3, 5, 10, 50, 100, 500, 1000)
CPU_BATCH_SIZE_CAP = 16
# Largest accepted max |f_j(z_pre) - z*| when inverting a member's flows at another member's sample.
# Float32 fixed-point inversion lands at ~1e-6 on the tested models (tests/test_ensemble.py: < 1e-4).
DEFAULT_MAX_FLOW_RESIDUAL = 1e-3


@dataclass
class EvalSettings:
    """Everything one evaluation needs (the CLI flags, resolved). See the module docstring."""
    checkpoints: list
    num_iw_samples: int = DEFAULT_NUM_IW_SAMPLES
    dataset: str | None = None  # None: the data set the first checkpoint's run read
    data: str = "./data"
    eval_on_train: bool = False
    num_examples: int | None = None  # None: the whole split
    batch_size: int | None = None  # None: the checkpoint's, at most 16 on CPU
    chunk_size: int | None = None  # samples per example in one decoder pass; None: by device
    estimators: tuple = report.DEFAULT_ESTIMATORS
    subset_size: int | None = None  # --num_active A for s2a / s2s; None: max(1, S // 2)
    matched_baseline: bool | None = None  # None: on with --ablation (when all members are sampled)
    max_flow_residual: float = DEFAULT_MAX_FLOW_RESIDUAL  # above it: exit 3 naming member and group
    seed: int = 0
    device: str = "auto"
    save: str | None = None  # None: write no files
    ablation: bool = False
    ablation_file_name: str = "ablation"
    S_list: tuple | None = None
    L_list: tuple | None = None
    time_eval: bool = False
    world_size: int = 1
    local_rank: int = 0
    master_address: str = "127.0.0.1"
    trust_checkpoint: bool = False
    allow_decoder_mismatch: bool = False
    allow_duplicate_members: bool = False  # evaluate one checkpoint (or equal encoders) twice on purpose
    show_progress: bool | None = None  # None: miselbo.runtime.cli.progress decides


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="MISELBO evaluation of an NVAE ensemble (one decoder, "
                                     "S encoders). See the docstring of miselbo/evaluation/evaluate.py.")
    parser.add_argument("--checkpoints", nargs="*", default=None, metavar="PATH",
                        help="member checkpoints in order: files, run folders holding checkpoint.pt, or "
                             "ensemble folders holding manifest.json (default: the ensemble in models/)")
    for index in range(NUM_PUBLIC_MEMBER_FLAGS):
        parser.add_argument(f"--q{index}", default=None, metavar="PATH",
                            help="a member checkpoint (public script's flag; placed before --checkpoints)")
    parser.add_argument("--num_iw_samples", type=int, default=None,
                        help=f"importance samples L per encoder (default {DEFAULT_NUM_IW_SAMPLES}, or the "
                             f"demo ensemble's manifest value when no checkpoint is given)")
    parser.add_argument("--ablation", action="store_true", help="sub-ensemble / fewer-sample ablation")
    parser.add_argument("--ablation_file_name", default=None, help="base name of the ablation files")
    parser.add_argument("--save", default="results/miselbo", help="output folder (created)")
    parser.add_argument("--data", default="./data", help="data root for torchvision data sets")
    parser.add_argument("--eval_on_train", action="store_true", help="evaluate the training split")
    parser.add_argument("--time_eval", action="store_true", help="report seconds per batch and example")
    parser.add_argument("--only_miselbo", action="store_true", help="report MISELBO only")
    parser.add_argument("--only_iwelbo", action="store_true", help="report the members' IWELBOs only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the binarisation and all draws")
    parser.add_argument("--world_size", type=int, default=1, help="local processes to split the data over")
    parser.add_argument("--local_rank", type=int, default=0, help="torch.distributed.launch compatibility")
    parser.add_argument("--master_address", default="127.0.0.1", help="torch.distributed rendezvous address")
    parser.add_argument("--dataset", default=None, help="data set to evaluate on (default: the checkpoint's)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"examples per batch (default: the checkpoint's, at most {CPU_BATCH_SIZE_CAP} on CPU)")
    parser.add_argument("--num_examples", type=int, default=None,
                        help="evaluate this many examples, evenly spaced over the split (mnist5k is "
                             "sorted by class, so a plain prefix would hold one digit)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--estimators", nargs="+", choices=report.ESTIMATOR_NAMES, default=None,
                        help=f"estimators to report (default: {' '.join(report.DEFAULT_ESTIMATORS)})")
    parser.add_argument("--num_active", "--subset_size", dest="subset_size", type=int, default=None,
                        help="A: members each example samples from for s2a / s2s (default S // 2); with "
                             "only s2a / s2s requested, A x L decoder passes per example instead of S x L")
    parser.add_argument("--matched_baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="each member's IWELBO at S x L samples, the best member and paired "
                             "differences; costs about S times MISELBO's decoder passes "
                             "(default: on with --ablation)")
    parser.add_argument("--max_flow_residual", type=float, default=DEFAULT_MAX_FLOW_RESIDUAL,
                        help="largest accepted flow-inversion residual (models with flows; default "
                             f"{DEFAULT_MAX_FLOW_RESIDUAL:g}); above it the evaluation stops with exit 3")
    parser.add_argument("--S_list", nargs="+", type=int, default=None, help="ensemble sizes for --ablation")
    parser.add_argument("--L_list", nargs="+", type=int, default=None, help="sample counts for --ablation")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="samples per example in one decoder pass (memory); default by device")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load checkpoints with full pickle (only for files you trust)")
    parser.add_argument("--allow_decoder_mismatch", action="store_true",
                        help="evaluate even if the decoders differ, using the first checkpoint's for all")
    parser.add_argument("--allow_duplicate_members", action="store_true",
                        help="evaluate even if a checkpoint is given twice or two members have equal "
                             "encoder weights (by default refused: such an ensemble has JSD 0 and "
                             "counts one encoder twice)")
    return parser


def _member_flags(args: argparse.Namespace) -> list[str]:
    flags = [getattr(args, f"q{index}") for index in range(NUM_PUBLIC_MEMBER_FLAGS)]
    return [path for path in flags if path not in (None, "None")]


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """Resolve the parsed flags (checkpoint discovery, --only_* shortcuts) into EvalSettings."""
    given = _member_flags(args) + list(args.checkpoints or [])
    if not given and args.checkpoints is not None:
        raise UserError("--checkpoints was given without any path; the checkpoint list is empty.")
    demo_folder = None if given else discover_demo_folder()
    paths = expand_checkpoint_paths(given) if given else read_manifest(demo_folder)
    # the manifest's settings apply to a plain run and to one ensemble folder given alone
    manifest_folder = defaults_folder(given) if given else demo_folder
    defaults = read_eval_defaults(manifest_folder) if manifest_folder else {}
    num_iw_samples = args.num_iw_samples
    if num_iw_samples is None:  # read_eval_defaults checked the manifest's value, naming the file
        num_iw_samples = defaults.get("num_iw_samples", DEFAULT_NUM_IW_SAMPLES)
    batch_size = args.batch_size if args.batch_size is not None else defaults.get("batch_size")
    chunk_size = args.chunk_size if args.chunk_size is not None else defaults.get("chunk_size")
    if args.only_miselbo and args.only_iwelbo:
        raise UserError("--only_miselbo and --only_iwelbo exclude each other.")
    estimators = tuple(args.estimators) if args.estimators else report.DEFAULT_ESTIMATORS
    if args.only_miselbo or args.only_iwelbo:
        if args.estimators:
            raise UserError("--estimators cannot be combined with --only_miselbo / --only_iwelbo.")
        estimators = ("miselbo",) if args.only_miselbo else ("avg_iwelbo", "iwelbo")
    base_name = Path(args.ablation_file_name).stem if args.ablation_file_name else "ablation"
    return EvalSettings(
        checkpoints=[str(path) for path in paths], num_iw_samples=num_iw_samples, dataset=args.dataset,
        data=args.data, eval_on_train=args.eval_on_train, num_examples=args.num_examples,
        batch_size=batch_size, chunk_size=chunk_size, estimators=tuple(dict.fromkeys(estimators)),
        subset_size=args.subset_size, matched_baseline=args.matched_baseline,
        max_flow_residual=args.max_flow_residual, seed=args.seed,
        device=args.device, save=args.save,
        ablation=args.ablation, ablation_file_name=base_name,
        S_list=tuple(args.S_list) if args.S_list else None, L_list=tuple(args.L_list) if args.L_list else None,
        time_eval=args.time_eval, world_size=args.world_size, local_rank=args.local_rank,
        master_address=args.master_address, trust_checkpoint=args.trust_checkpoint,
        allow_decoder_mismatch=args.allow_decoder_mismatch, allow_duplicate_members=args.allow_duplicate_members)


# ----------------------------------------------------------------------------- validation

def validated_settings(settings: EvalSettings) -> EvalSettings:
    """Check every setting that needs no checkpoint; fill S_list / L_list / subset_size."""
    num_members = len(settings.checkpoints)
    if num_members == 0:
        raise UserError("the checkpoint list is empty; pass at least one checkpoint (S >= 1).")
    num_samples = flags.count("--num_iw_samples", settings.num_iw_samples)
    for flag, value in (("--batch_size", settings.batch_size), ("--chunk_size", settings.chunk_size),
                        ("--num_examples", settings.num_examples), ("--num_active", settings.subset_size)):
        flags.optional_count(flag, value)
    flags.count("--world_size", settings.world_size)
    flags.seed("--seed", settings.seed)
    if not settings.allow_duplicate_members:
        refuse_repeated_files(settings.checkpoints)
    if not settings.max_flow_residual >= 0 or settings.max_flow_residual == float("inf"):
        raise UserError(f"--max_flow_residual must be a finite number >= 0, got {settings.max_flow_residual}.")
    unknown = [name for name in settings.estimators if name not in report.ESTIMATOR_NAMES]
    if unknown or not settings.estimators:
        raise UserError(f"--estimators: unknown or none {unknown}; choose from {', '.join(report.ESTIMATOR_NAMES)}.")
    subset_size = settings.subset_size or max(1, num_members // 2)
    if subset_size > num_members:
        raise UserError(f"--num_active {subset_size} exceeds the number of members S = {num_members}.")
    active_only = all(name in report.SUBSET_ESTIMATORS for name in settings.estimators)
    matched = settings.ablation if settings.matched_baseline is None else settings.matched_baseline
    if active_only and (matched or settings.ablation):
        raise UserError("--matched_baseline and --ablation need every member sampled; add an estimator "
                        "such as miselbo to --estimators, or drop those flags for s2a / s2s alone.")
    sizes = settings.S_list or tuple(range(1, num_members + 1))
    samples = settings.L_list or tuple(sorted({l for l in DEFAULT_L_GRID if l <= num_samples} | {num_samples}))
    for flag, values, top in (("--S_list", sizes, num_members), ("--L_list", samples, num_samples)):
        bad = [value for value in values if not 1 <= value <= top]
        if bad:
            raise UserError(f"{flag} values must lie in 1..{top}, got {bad}.")
    if settings.dataset is not None:
        check_dataset_name(settings.dataset)
    return replace(settings, subset_size=subset_size, matched_baseline=bool(matched), S_list=tuple(sorted(set(sizes))),
                   L_list=tuple(sorted(set(samples))))
