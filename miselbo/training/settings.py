"""The training procedure's settings as one frozen dataclass, read once from NVAE's namespace."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

VALID_IW_SAMPLES = 10  # importance samples of the per-epoch test (docs/nvae.md 8.1)
LONG_RUN_EPOCHS = 50  # longer runs validate every LONG_RUN_EVAL_FREQ epochs (docs/nvae.md 8.1)
LONG_RUN_EVAL_FREQ = 20
CHECKPOINTS_PER_RUN = 100  # a checkpoint every ceil(epochs / 100) epochs (docs/nvae.md 1.2)
PARAMETER_AVERAGING_PERIOD = 100  # average parameters across processes every 100 batches (docs/nvae.md 8.4)
SCALAR_LOG_PERIOD = 100  # TensorBoard scalars every 100 global steps
IMAGE_LOG_PERIOD = 1000  # input/reconstruction grids every 1000 global steps
GRAD_SCALER_INIT_SCALE = 2.0 ** 10  # NVAE's GradScaler(init_scale=2**10) (docs/nvae.md 8.1, step 7)
# When the steps a float16 run's GradScaler skips stop being overflow and become a failed run (exit 3).
# The scaler skips a step whose gradients hold inf/NaN and halves its scale; it doubles the scale
# after 2000 clean steps. An isolated skip (a batch, or a scale that had grown one step too large)
# is normal; a skip on every batch means the gradients are NaN or infinite at any scale.
# - MAX_CONSECUTIVE_SKIPPED_STEPS: that many skipped steps in a row have cut the scale by 2^16; no
#   overflow that float16 can represent needs more, and each skip is a batch the run lost.
# - GRAD_SCALE_FLOOR = 2^-14, float16's smallest normal number: below it every scaled gradient
#   smaller than 1 in magnitude is subnormal or zero in float16, so most of a step's gradient is
#   lost; from NVAE's 2^10 that takes 24 more halvings than doublings (a slow erosion by skips
#   that are never consecutive for long).
MAX_CONSECUTIVE_SKIPPED_STEPS = 16
GRAD_SCALE_FLOOR = 2.0 ** -14


@dataclass(frozen=True)
class TrainSettings:
    """What the loop needs from the command line (docs/nvae.md 1.1, 8)."""
    epochs: int
    warmup_epochs: int
    batch_size: int
    learning_rate: float
    learning_rate_min: float
    weight_decay: float
    weight_decay_norm: float
    weight_decay_norm_init: float
    weight_decay_norm_anneal: bool
    kl_anneal_portion: float
    kl_const_portion: float
    kl_const_coeff: float
    num_x_bits: int
    fast_adamax: bool
    seed: int
    final_iw_samples: int
    train_new_q: bool
    param_check: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(args, name) for name in names})

    @property
    def eval_freq(self) -> int:
        """Validate every epoch for runs of <= 50 epochs, else every 20 (and at the last epoch)."""
        return 1 if self.epochs <= LONG_RUN_EPOCHS else LONG_RUN_EVAL_FREQ

    @property
    def checkpoint_freq(self) -> int:
        return math.ceil(self.epochs / CHECKPOINTS_PER_RUN)

    def is_last_epoch(self, epoch: int) -> bool:
        return epoch == self.epochs - 1

    def validates_after(self, epoch: int) -> bool:
        """docs/nvae.md 8.1: epoch % eval_freq == 0 or the last epoch."""
        return epoch % self.eval_freq == 0 or self.is_last_epoch(epoch)

    def checkpoints_after(self, epoch: int) -> bool:
        """docs/nvae.md 1.2: epoch % ceil(epochs / 100) == 0 or the last epoch."""
        return epoch % self.checkpoint_freq == 0 or self.is_last_epoch(epoch)

    @property
    def regularised(self) -> bool:
        """False when λ is 0 throughout (no annealing, --weight_decay_norm 0): R_sn, R_bn skipped."""
        return self.weight_decay_norm_anneal or self.weight_decay_norm != 0
