"""Named NVAE configurations, defined once: the pipeline, the benchmarks, the README's commands and
the tests take them from here.

A preset is a list of train.py flags split in two: `architecture` (flags that decide the model's
parameters) and `schedule` (how it is trained). `launch` holds how NVAE's published recipe starts
its processes (two GPUs for `paper`); it goes into printed commands and the pipeline's training
stages, and any flag typed after it overrides it.

- `paper`: NVAE's published MNIST recipe, which the MISELBO paper trains: 2 latent scales, 10
  groups per scale with --ada_groups ([10, 5]), 20 latents per group, 32 encoder and decoder
  channels, 2 x 3 pre- and post-processing cells, 2 cells per conditional in both towers, SE,
  res_dist, no flows, --weight_decay_norm 1e-2, batch 200 per GPU on 2 GPUs, 400 epochs,
  --fast_adamax. Built, it has 33,363,134 parameters (tests/test_presets.py).
- `demo`: the small configuration the shipped ensemble in models/mnist5k_demo was trained with
  (p_and_q1 8 epochs on mnist5k, then every new encoder q2..qS the same 8 epochs and schedule
  against the frozen decoder, as the paper trains its encoders); its per-epoch tests use 50 fixed test digits instead of all
  1,000, which leaves the trained weights unchanged, the final test of every stage uses one
  importance sample (the pipeline's evaluation gives every member's IWELBO right after), and the
  pipeline evaluates it with 20 samples per decoder pass (changes only which draws are used) and
  without the compute-matched baseline (about S times MISELBO's decoder passes; the
  pipeline's --matched_baseline adds it). These choices make the main job cheaper without changing
  how any encoder trains; benchmarks/main_job.py measures its time and table.
- `tiny`: a model of a few thousand parameters, one epoch; for tests and smoke runs.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from miselbo.nvae.config import add_nvae_train_arguments


@dataclass(frozen=True)
class Preset:
    """One named configuration; every field is a tuple of train.py command-line tokens."""
    name: str
    dataset: str  # what the pipeline trains on unless --dataset is given
    num_iw_samples: int  # importance samples per encoder at the pipeline's evaluation
    architecture: tuple[str, ...]
    schedule: tuple[str, ...]
    launch: tuple[str, ...] = ()
    # samples per example in one decoder pass at the pipeline's evaluation (miselbo_eval.py
    # --chunk_size); None: miselbo_eval.py's default for the device
    eval_chunk_size: int | None = None
    # whether the pipeline's evaluation adds the compute-matched baseline (miselbo_eval.py
    # --matched_baseline); the pipeline's --matched_baseline / --no-matched_baseline decide instead
    eval_matched_baseline: bool = True

    def flags(self) -> list[str]:
        """architecture + schedule + launch: everything a training stage gets from the preset (the
        same for p_and_q1 and every new encoder)."""
        return [*self.architecture, *self.schedule, *self.launch]

    def nvae_args(self, dataset: str = "mnist") -> argparse.Namespace:
        """NVAE's train.py namespace (NVAE's defaults) with this architecture for `dataset`."""
        parser = add_nvae_train_arguments(argparse.ArgumentParser(add_help=False))
        args = parser.parse_args(list(self.architecture))
        args.dataset = dataset
        return args

    def architecture_text(self) -> str:
        """The architecture flags, shell-quoted, as one line."""
        return shlex.join(self.architecture)


PAPER = Preset(
    name="paper", dataset="mnist", num_iw_samples=1000,
    architecture=("--num_latent_scales", "2", "--num_groups_per_scale", "10", "--ada_groups",
                  "--num_latent_per_group", "20", "--num_channels_enc", "32", "--num_channels_dec", "32",
                  "--num_preprocess_blocks", "2", "--num_preprocess_cells", "3",
                  "--num_postprocess_blocks", "2", "--num_postprocess_cells", "3",
                  "--num_cell_per_cond_enc", "2", "--num_cell_per_cond_dec", "2",
                  "--use_se", "--res_dist", "--num_nf", "0"),
    schedule=("--batch_size", "200", "--epochs", "400", "--weight_decay_norm", "1e-2", "--fast_adamax"),
    launch=("--num_process_per_node", "2"),
)
DEMO = Preset(
    name="demo", dataset="mnist5k", num_iw_samples=20,
    architecture=("--num_latent_scales", "2", "--num_groups_per_scale", "2", "--num_latent_per_group", "8",
                  "--num_channels_enc", "8", "--num_channels_dec", "8", "--num_preprocess_blocks", "2",
                  "--num_preprocess_cells", "1", "--num_postprocess_blocks", "2",
                  "--num_postprocess_cells", "1", "--use_se", "--res_dist", "--arch_instance", "res_bnswish"),
    schedule=("--epochs", "8", "--warmup_epochs", "1", "--batch_size", "32", "--weight_decay_norm", "1e-2",
              "--fast_adamax",
              # the final test of each stage uses one importance sample (its NELBO; the weights do
              # not change): the pipeline's evaluation scores every member with L samples right after
              "--final_iw_samples", "1",
              # the test after each epoch on 50 of the 1,000 test digits; the weights stay
              # bit-identical to NVAE's full per-epoch test (tests/test_main_job.py)
              "--epoch_test_examples", "50"),
    # all 20 samples of the 50 examples of a batch in one pass: 1,000 rows suit this 8-channel model
    # on CPU better than the default 32 rows tuned for the paper's 32 channels (benchmarks/main_job.py)
    eval_chunk_size=20,
    eval_matched_baseline=False,
)
TINY = Preset(
    name="tiny", dataset="mnist5k", num_iw_samples=20,
    architecture=("--num_latent_scales", "1", "--num_groups_per_scale", "2", "--num_latent_per_group", "2",
                  "--num_channels_enc", "4", "--num_channels_dec", "4", "--num_preprocess_blocks", "1",
                  "--num_preprocess_cells", "1", "--num_postprocess_blocks", "1",
                  "--num_postprocess_cells", "1"),
    schedule=("--epochs", "1", "--warmup_epochs", "0", "--batch_size", "16", "--final_iw_samples", "2"),
)
PRESETS = {preset.name: preset for preset in (DEMO, TINY, PAPER)}


def get_preset(name: str) -> Preset:
    """The preset called `name` (KeyError naming the known ones otherwise)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
