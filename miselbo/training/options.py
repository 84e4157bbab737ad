"""train.py's command line: NVAE's flags plus ours, validation, and flag inheritance.

The argparse namespace is the external format. After `parse_train_args` it is NVAE's: `dataset`
holds the NVAE data-set name the model is built for (`mnist5k` -> `mnist`), `miselbo_dataset` the
data set the loaders read (`mnist5k`), and `save` the experiment folder `<root>/eval-<save>`.
Checkpoints store exactly this namespace, so NVAE's evaluate.py builds the right model and reads
torchvision MNIST, while our loaders read `data_set_of(args)`.

Inheritance (`--cont_training`, `--train_new_q`): every flag the user did not type is taken from
the stored run (the run's own checkpoint, or the parent's), except the LOCAL_FLAGS (where to write
and how to launch) and, for a new encoder, its own identity (NEW_ENCODER_OWN_FLAGS: --seed and the
MISELBO flags). A flag typed with a value that conflicts with the stored architecture is refused.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from miselbo.storage.checkpoint_fields import architecture_problem
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import fill_defaults, require_same_architecture
from miselbo.errors import UserError
from miselbo.errors import DataError
from miselbo.data.datasets import SUPPORTED_DATASETS, check_dataset_name, nvae_dataset_name
from miselbo.nvae.config import ModelConfig, add_nvae_train_arguments
from miselbo.training.precision import PRECISION_CHOICES
from miselbo.runtime import flags
from miselbo.runtime.available_memory import available_bytes
from miselbo.training.evaluation import test_bytes_per_sample
from miselbo.runtime.flags import MAX_SEED

MEMORY_FRACTION = 0.7  # of the memory available, as for an evaluation batch

PROG = "train.py"
DEFAULT_FINAL_IW_SAMPLES = 1000
# Never taken from a stored run: where this run writes and how its processes start.
# --precision is one of them: like --device it says how to compute, not what to train (a checkpoint
# records the resolved one in its args).
LOCAL_FLAGS = ("root", "save", "cont_training", "num_proc_node", "node_rank", "local_rank",
               "global_rank", "num_process_per_node", "master_address", "device", "num_workers",
               "trust_checkpoint", "precision")
# A new encoder's own identity, never taken from the parent it is trained against.
NEW_ENCODER_OWN_FLAGS = ("seed", "train_new_q", "p_and_q1_path", "param_check", "num_new_encoders",
                         "mixture_objective", "num_active", "include_parent_encoder")

_DESCRIPTION = """\
Train an NVAE (decoder p and first encoder q1), or with --train_new_q another encoder against the
frozen decoder of a trained run. Accepts every flag of NVAE's train.py with NVAE's defaults.
Writes <root>/eval-<save>/{checkpoint.pt, log.txt, TensorBoard events, train_result.json}."""

_EPILOG = """\
Flag inheritance: with --cont_training, flags you do not type are taken from the checkpoint in the
save folder; with --train_new_q, from the parent run (except --seed, the MISELBO flags, and the
launch/output flags, --device and --precision). Typed architecture flags that differ from the
stored ones are refused.
Exit status: 0 done, 2 usage or input error, 3 training failed (non-finite loss, gradients that
stay non-finite under the float16 GradScaler, decoder changed),
128+N stopped by signal N after writing a resumable checkpoint."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every default."""


def build_parser() -> argparse.ArgumentParser:
    """NVAE's train.py flags (names, defaults) with --dataset widened, plus the MISELBO flags."""
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                                     conflict_handler="resolve",
                                     formatter_class=_HelpFormatter)
    add_nvae_train_arguments(parser)
    parser.add_argument("--dataset", type=str, default="mnist",
                        help=f"data set: {', '.join(SUPPORTED_DATASETS)} (mnist5k: 4,000/1,000 real "
                             f"MNIST digits shipped with the code, no download); inside a clone of "
                             f"NVAE also NVAE's other names (omniglot, celeba_64, imagenet_32, ffhq, "
                             f"lsun_*, ...), read by the clone's datasets.py")
    ours = parser.add_argument_group("MISELBO and run options (not in NVAE)")
    ours.add_argument("--train_new_q", action="store_true",
                      help="train a new encoder against the frozen decoder of --p_and_q1_path; "
                           "only the encoder is optimised, the decoder stays bit-identical")
    ours.add_argument("--p_and_q1_path", type=str, default=None,
                      help="experiment folder (or checkpoint file) of the trained decoder + first "
                           "encoder; needed by --train_new_q")
    ours.add_argument("--param_check", action="store_true",
                      help="with --train_new_q: re-check the decoder fingerprint after every epoch "
                           "and stop if it changed")
    ours.add_argument("--num_new_encoders", type=int, default=1,
                      help="with --train_new_q: train this many encoders in one run (seeds --seed, "
                           "--seed + 1, ...), saved in <save folder>/component-1..K")
    ours.add_argument("--mixture_objective", type=str, default="independent",
                      choices=("independent", "miselbo", "s2a", "s2s"),
                      help="with --num_new_encoders: each encoder's own NVAE objective "
                           "(independent), or the mixture bound over all of them (miselbo), or its "
                           "variants with --num_active components per step (s2a, s2s)")
    ours.add_argument("--num_active", type=int, default=None,
                      help="components that sample per step with --mixture_objective s2a or s2s")
    ours.add_argument("--include_parent_encoder", action="store_true",
                      help="with a mixture objective: the parent's encoder is a fixed member of "
                           "the mixture (it is not trained)")
    ours.add_argument("--device", type=str, default="auto",
                      help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    ours.add_argument("--precision", type=str, default="auto", choices=PRECISION_CHOICES,
                      help="how training steps compute: auto (NVAE's: fp16 on CUDA, fp32 on CPU), "
                           "fp32, fp16 (autocast float16 with NVAE's GradScaler, whose state is the "
                           "checkpoint's grad_scalar) or bf16 (autocast bfloat16); weights stay "
                           "float32 and the tests run in float32. Not inherited by --cont_training "
                           "or --train_new_q, like --device")
    ours.add_argument("--num_workers", type=int, default=0, help="data-loader worker processes")
    ours.add_argument("--trust_checkpoint", action="store_true",
                      help="load checkpoints fully even if they need Python objects beyond NVAE's "
                           "(may run code from the file)")
    ours.add_argument("--final_iw_samples", type=int, default=DEFAULT_FINAL_IW_SAMPLES,
                      help="importance samples of the final test, as in NVAE; small values for quick runs")
    ours.add_argument("--num_train_examples", type=int, default=None,
                      help="train on this many evenly spaced training images (None: all)")
    ours.add_argument("--num_test_examples", type=int, default=None,
                      help="test on this many evenly spaced test images (None: all)")
    ours.add_argument("--epoch_test_examples", type=int, default=None,
                      help="the test after each epoch uses this many evenly spaced test images "
                           "(fixed binarisation and draws, training's random stream untouched); "
                           "None: NVAE's test on all of them. The final test always uses all")
    return parser


_UNSET = object()


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """Destinations of the flags typed in `argv`: argparse fills defaults only into attributes the
    namespace lacks, so a namespace pre-filled with a marker keeps the marker for untyped flags."""
    parser = build_parser()
    marked = argparse.Namespace(**{name: _UNSET for name in vars(parser.parse_args([]))})
    parsed = parser.parse_args(list(argv), namespace=marked)
    return {name for name, value in vars(parsed).items() if value is not _UNSET}


def data_set_of(args: argparse.Namespace) -> str:
    """The data set the loaders read: `miselbo_dataset` if recorded, else NVAE's `dataset`."""
    return getattr(args, "miselbo_dataset", None) or args.dataset


# ----------------------------------------------------------------------------- validation

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _finite(args: argparse.Namespace, name: str, low: float, high: float = math.inf,
            low_open: bool = False) -> None:
    value = getattr(args, name)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high != math.inf:
        bound += f" and <= {high:g}"
    _require(ok, f"--{name} must be a finite number {bound}, got {value!r}.")


def require_test_fits(num_samples: int, batch_size: int, available: int | None = None) -> None:
    """Refuse a --final_iw_samples whose test would hold more than MEMORY_FRACTION of the memory
    available (before training starts, so a typo cannot take the machine's memory first)."""
    available = available_bytes(torch.device("cpu")) if available is None else available
    if available is None:
        return
    per_sample = test_bytes_per_sample(batch_size)
    budget = MEMORY_FRACTION * available
    if num_samples * per_sample > budget:
        largest = int(budget // per_sample)
        raise UserError(f"--final_iw_samples {num_samples}: the final test would hold about "
                        f"{num_samples * per_sample / 1e9:.1f} GB of log-weights per batch of "
                        f"--batch_size {batch_size}, more than {MEMORY_FRACTION:.0%} of the "
                        f"{available / 1e9:.1f} GB available; the largest --final_iw_samples that fits "
                        f"is {largest}.")


def validate_numbers(args: argparse.Namespace) -> None:
    """Refuse numeric flags no training run can use, naming the flag and the allowed range."""
    for name in ("epochs", "batch_size", "num_proc_node", "num_process_per_node", "final_iw_samples"):
        flags.count(f"--{name}", getattr(args, name))
    for name in ("warmup_epochs", "num_workers"):
        _require(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}.")
    for name in ("num_train_examples", "num_test_examples", "epoch_test_examples"):
        flags.optional_count(f"--{name}", getattr(args, name))
    _require(0 <= args.node_rank < args.num_proc_node,
             f"--node_rank must lie in 0 .. --num_proc_node - 1 = {args.num_proc_node - 1}, got "
             f"{args.node_rank}.")
    flags.seed("--seed", args.seed)
    require_test_fits(args.final_iw_samples, args.batch_size)
    _require(1 <= args.num_x_bits <= 8, f"--num_x_bits must lie in 1 .. 8, got {args.num_x_bits}.")
    _finite(args, "learning_rate", 0.0, low_open=True)
    for name in ("learning_rate_min", "weight_decay", "weight_decay_norm", "weight_decay_norm_init"):
        _finite(args, name, 0.0)
    for name in ("kl_anneal_portion", "kl_const_portion", "kl_const_coeff"):
        _finite(args, name, 0.0, 1.0)
    if args.weight_decay_norm_anneal:
        _require(args.weight_decay_norm > 0 and args.weight_decay_norm_init > 0,
                 f"--weight_decay_norm_anneal interpolates geometrically, so --weight_decay_norm "
                 f"({args.weight_decay_norm}) and --weight_decay_norm_init "
                 f"({args.weight_decay_norm_init}) must both be > 0.")


def validate_modes(args: argparse.Namespace) -> None:
    """Refuse MISELBO flag combinations that cannot mean anything."""
    if args.train_new_q:
        _require(bool(args.p_and_q1_path), "--train_new_q needs --p_and_q1_path DIR: the experiment "
                 "folder of the trained decoder and first encoder (it holds checkpoint.pt).")
    else:
        _require(args.p_and_q1_path is None, "--p_and_q1_path is only used with --train_new_q; add "
                 "--train_new_q to train a new encoder against that run's decoder.")
        _require(not args.param_check, "--param_check checks that the frozen decoder stays fixed, "
                 "so it needs --train_new_q (a p_and_q run trains its decoder).")
    validate_joint(args)


def validate_joint(args: argparse.Namespace) -> None:
    """Refuse --num_new_encoders / --mixture_objective / --num_active settings that mean nothing."""
    count = getattr(args, "num_new_encoders", 1)
    objective = getattr(args, "mixture_objective", "independent")
    active = getattr(args, "num_active", None)
    include_parent = getattr(args, "include_parent_encoder", False)
    flags.count("--num_new_encoders", count)
    joint_flags = count > 1 or objective != "independent" or active is not None or include_parent
    _require(args.train_new_q or not joint_flags, "--num_new_encoders, --mixture_objective, "
             "--num_active and --include_parent_encoder train new encoders against a frozen "
             "decoder, so they need --train_new_q and --p_and_q1_path.")
    _require(args.seed + count - 1 <= MAX_SEED, f"--seed {args.seed} with --num_new_encoders {count}: "
             f"the components' seeds --seed .. --seed + {count - 1} must stay <= {MAX_SEED}.")
    if objective in ("s2a", "s2s"):
        _require(active is not None and 1 <= active <= count, f"--mixture_objective {objective} "
                 f"needs --num_active A with 1 <= A <= --num_new_encoders ({count}), got {active}.")
    else:
        _require(active is None, f"--num_active is only used with --mixture_objective s2a or s2s "
                 f"(got --mixture_objective {objective}).")
    _require(not include_parent or objective != "independent",
             "--include_parent_encoder adds the parent to the mixture, so it needs --mixture_objective "
             "miselbo, s2a or s2s (independent encoders do not see each other).")
    _require(objective == "independent" or getattr(args, "num_nf", 0) == 0,
             f"--mixture_objective {objective} scores every sample under every encoder, which this "
             f"code does for models without flows only; the architecture has --num_nf "
             f"{getattr(args, 'num_nf', 0)}. Use --mixture_objective independent.")


def validate_architecture(args: argparse.Namespace) -> None:
    """Build the model configuration once, turning its complaints into user errors."""
    try:
        ModelConfig.from_args(args)
    except ValueError as err:
        raise UserError(f"the architecture flags cannot give a working model: {err}.") from None
    problem = architecture_problem(args)  # ranges, and the model's size before it is built
    if problem is not None:
        raise UserError(f"the architecture flags describe an unusable model: {problem}.")


# ----------------------------------------------------------------------------- inheritance

def inherit_flags(args: argparse.Namespace, explicit: set[str], stored: argparse.Namespace,
                  new_encoder: bool, label: str) -> argparse.Namespace:
    """`args` with every flag the user did not type taken from `stored` (a user-level namespace).

    `stored` is a checkpoint's args; its NVAE data-set name is replaced by the data set its run
    read. Typed architecture flags that conflict with `stored` raise CheckpointError.
    """
    stored = fill_defaults(stored)
    stored_values = dict(vars(stored), dataset=data_set_of(stored))
    keep = set(LOCAL_FLAGS) | (set(NEW_ENCODER_OWN_FLAGS) if new_encoder else set()) | explicit
    merged = argparse.Namespace(**vars(args))
    for name in vars(args):
        if name not in keep and name in stored_values:
            setattr(merged, name, stored_values[name])
    try:
        require_same_architecture(_model_view(stored), _model_view(merged), label, "command line")
    except CheckpointError as err:
        raise CheckpointError(f"{err} Leave these flags out to take them from the {label}.") from None
    return merged


def _model_view(args: argparse.Namespace) -> argparse.Namespace:
    """A copy whose `dataset` is the NVAE name the model is built for (unknown names pass through)."""
    try:
        name = nvae_dataset_name(data_set_of(args))
    except DataError:
        name = data_set_of(args)
    return argparse.Namespace(**dict(vars(args), dataset=name))


# ----------------------------------------------------------------------------- NVAE namespace

def experiment_folder(root: str, save: str) -> Path:
    """NVAE's experiment folder: root + '/eval-' + save."""
    return Path(f"{root}/eval-{save}")


def to_nvae_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace training and checkpoints use (see the module docstring); validates the data set."""
    run_args = argparse.Namespace(**vars(args))
    run_args.miselbo_dataset = check_dataset_name(data_set_of(args))
    run_args.dataset = nvae_dataset_name(run_args.miselbo_dataset)
    run_args.save = str(experiment_folder(args.root, args.save))
    if args.p_and_q1_path:
        run_args.p_and_q1_path = os.path.abspath(args.p_and_q1_path)
    return run_args
