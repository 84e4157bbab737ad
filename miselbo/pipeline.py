"""The main job in one command: train p_theta + q_phi_1, train more encoders against the frozen
decoder, evaluate the ensemble with MISELBO and its companions.

    python -m miselbo.pipeline                       # the demo on the embedded mnist5k digits
    python -m miselbo.pipeline --dataset mnist --preset paper --epochs 400 ...   # the real run

Stages (one progress bar over them, each stage shows its own):
  1. `train.py --save p_and_q1 --seed <seed_1>`                         decoder + first encoder
  2. `train.py --train_new_q --p_and_q1_path <stage 1> --save q<s> --seed <seed_s>`, s = 2..S
  3. `miselbo_eval.py --checkpoints <all S> --ablation --save <out>/results`

Everything lands in `--out` (`eval-p_and_q1/`, `eval-q2/`, ..., `results/`). Re-running the same
command continues: a stage whose checkpoint has all its epochs is skipped, an interrupted one
resumes with `--cont_training`. Flags this module does not know are handed to every training stage
unchanged (NVAE's flags: architecture, epochs, learning rate, ...), and override the preset.
`--export DIR` writes the S checkpoints, without optimizer state, into a `models/`-style folder
with a manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from miselbo import evaluate, training
from miselbo.checkpoints import CHECKPOINT_FILE_NAME, read_checkpoint
from miselbo.cli import UserError, progress, require_positive, run_cli
from miselbo.safe_io import atomic_torch_save, atomic_write_text

PROG = "python -m miselbo.pipeline"
MANIFEST_FILE_NAME = "manifest.json"
# Architecture and schedule presets (NVAE train.py flags). `demo` is the shipped ensemble's
# configuration (models/mnist5k_demo/README.md); `paper` is the MISELBO paper's MNIST NVAE.
PRESETS = {
    "demo": ["--num_latent_scales", "2", "--num_groups_per_scale", "2", "--num_latent_per_group", "8",
             "--num_channels_enc", "8", "--num_channels_dec", "8", "--num_preprocess_blocks", "2",
             "--num_preprocess_cells", "1", "--num_postprocess_blocks", "2",
             "--num_postprocess_cells", "1", "--use_se", "--res_dist", "--arch_instance", "res_bnswish",
             "--epochs", "8", "--warmup_epochs", "1", "--batch_size", "32", "--weight_decay_norm", "1e-2",
             "--fast_adamax", "--final_iw_samples", "10"],
    "tiny": ["--num_latent_scales", "1", "--num_groups_per_scale", "2", "--num_latent_per_group", "2",
             "--num_channels_enc", "4", "--num_channels_dec", "4", "--num_preprocess_blocks", "1",
             "--num_preprocess_cells", "1", "--num_postprocess_blocks", "1",
             "--num_postprocess_cells", "1", "--epochs", "1", "--warmup_epochs", "0",
             "--batch_size", "16", "--final_iw_samples", "2"],
    "paper": ["--num_latent_scales", "2", "--num_groups_per_scale", "10", "--ada_groups",
              "--num_latent_per_group", "20", "--num_channels_enc", "32", "--num_channels_dec", "32",
              "--num_preprocess_blocks", "2", "--num_preprocess_cells", "3",
              "--num_postprocess_blocks", "2", "--num_postprocess_cells", "3",
              "--num_cell_per_cond_enc", "1", "--num_cell_per_cond_dec", "1", "--use_se",
              "--res_dist", "--num_nf", "0", "--epochs", "400", "--batch_size", "200",
              "--weight_decay_norm", "1e-2", "--fast_adamax"],
}


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

    def data_flags(self) -> list[str]:
        return [] if self.data is None else ["--data", self.data]

    def stage_names(self) -> list[str]:
        return ["p_and_q1"] + [f"q{member}" for member in range(2, self.num_encoders + 1)]

    def checkpoint(self, stage: str) -> Path:
        return self.out / f"eval-{stage}" / CHECKPOINT_FILE_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/mnist5k_demo", help="folder for every stage's output")
    parser.add_argument("--dataset", default="mnist5k", help="mnist5k (embedded), mnist or cifar10")
    parser.add_argument("--data", default=None,
                        help="data root of torchvision data sets, for training and evaluation "
                             "(mnist5k needs none)")
    parser.add_argument("--num_encoders", type=int, default=3, help="ensemble size S")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one seed per encoder (default 1..S)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="architecture and schedule; any NVAE train.py flag given overrides it")
    parser.add_argument("--num_iw_samples", type=int, default=20, help="importance samples L per encoder")
    parser.add_argument("--num_eval_examples", type=int, default=None,
                        help="evaluate this many test images (default: all)")
    parser.add_argument("--eval_batch_size", type=int, default=50)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--export", default=None,
                        help="copy the S checkpoints here (models/ layout with manifest.json)")
    return parser


def parse_settings(argv: Sequence[str]) -> PipelineSettings:
    """Settings from the command line; unknown flags are kept as training flags."""
    args, train_flags = build_parser().parse_known_args(list(argv))
    require_positive("--num_encoders", args.num_encoders)
    require_positive("--num_iw_samples", args.num_iw_samples)
    seeds = tuple(args.seeds) if args.seeds else tuple(range(1, args.num_encoders + 1))
    if len(seeds) != args.num_encoders or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs {args.num_encoders} distinct values (one per encoder), got "
                        f"{list(seeds)}.")
    for flag in ("--save", "--root", "--seed", "--train_new_q", "--p_and_q1_path", "--cont_training"):
        if flag in train_flags:
            raise UserError(f"{flag} is set by the pipeline for each stage; use --out and --seeds.")
    return PipelineSettings(
        out=Path(args.out), dataset=args.dataset, num_encoders=args.num_encoders, seeds=seeds,
        preset=args.preset, train_flags=tuple(train_flags), num_iw_samples=args.num_iw_samples,
        num_eval_examples=args.num_eval_examples, eval_batch_size=args.eval_batch_size,
        device=args.device, export=Path(args.export) if args.export else None, data=args.data)


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
    argv += PRESETS[settings.preset] + list(settings.train_flags)
    if stage != "p_and_q1":
        argv += ["--train_new_q", "--p_and_q1_path", str(settings.checkpoint("p_and_q1").parent)]
    return argv


def run_training_stage(settings: PipelineSettings, stage: str, seed: int) -> str:
    """Train one stage, resuming or skipping it as its checkpoint says; returns what was done."""
    argv = training_argv(settings, stage, seed)
    state = _finished_epochs(settings.checkpoint(stage))
    if state is not None and state[0] >= state[1]:
        return f"{stage}: already trained ({state[0]} epochs), skipped"
    if state is not None:
        argv.append("--cont_training")
    result = training.train(argv)
    return (f"{stage}: test NELBO {result.test_nelbo:.2f} nats, -log p {result.test_neg_log_p:.2f} "
            f"nats ({result.final_iw_samples} samples), {result.wall_seconds:.0f} s")


def evaluation_argv(settings: PipelineSettings) -> list[str]:
    argv = ["--checkpoints", *[str(settings.checkpoint(stage)) for stage in settings.stage_names()],
            "--num_iw_samples", str(settings.num_iw_samples), "--batch_size", str(settings.eval_batch_size),
            "--save", str(settings.out / "results"), "--device", settings.device, "--ablation",
            "--dataset", settings.dataset, *settings.data_flags()]
    if settings.num_eval_examples is not None:
        argv += ["--num_examples", str(settings.num_eval_examples)]
    return argv


def export_for_evaluation(source: Path, destination: Path) -> None:
    """Write `source` to `destination` without its optimizer state (about 2/3 of a p_and_q file):
    same NVAE format and weights, loadable by miselbo_eval.py and NVAE's evaluate.py, not resumable."""
    checkpoint = read_checkpoint(source)
    checkpoint["optimizer"] = None
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, destination)


def export_ensemble(settings: PipelineSettings, target: Path) -> None:
    """Export the S checkpoints to target/<stage>/checkpoint.pt and write target/manifest.json."""
    entries = []
    for stage in settings.stage_names():
        export_for_evaluation(settings.checkpoint(stage), target / stage / CHECKPOINT_FILE_NAME)
        entries.append(f"{stage}/{CHECKPOINT_FILE_NAME}")
    manifest = {"checkpoints": entries, "dataset": settings.dataset, "seeds": list(settings.seeds),
                "preset": settings.preset, "train_flags": list(settings.train_flags),
                "eval_defaults": {"num_iw_samples": settings.num_iw_samples}}
    atomic_write_text(target / MANIFEST_FILE_NAME, json.dumps(manifest, indent=2) + "\n",
                      record_sha256=False)


def run_pipeline(settings: PipelineSettings) -> int:
    """All stages in order; returns the evaluation's exit status."""
    started = time.perf_counter()
    stages = list(zip(settings.stage_names(), settings.seeds))
    with progress(total=len(stages) + 1, desc="pipeline", unit="stage") as bar:
        for stage, seed in stages:
            bar.set_postfix_str(f"training {stage}")
            bar.write(run_training_stage(settings, stage, seed))
            bar.update()
        bar.set_postfix_str("evaluating")
        status = evaluate.main(evaluation_argv(settings))
        bar.update()
    if status == 0 and settings.export is not None:
        export_ensemble(settings, settings.export)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; results in "
          f"{settings.out / 'results'}")
    return status


def _main(argv: Sequence[str] | None) -> int:
    return run_pipeline(parse_settings(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
