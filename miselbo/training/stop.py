"""Stopping early: SIGINT/SIGTERM become a request to stop after the current step, a non-finite
loss stops before the update, and every process of a run takes the same decision.

With an enabled GradScaler (--precision fp16) a step whose gradients hold inf/NaN is skipped by
the scaler and its scale halved: that is float16 overflow, not divergence, and the run goes on.
It stops (exit 3) only when MAX_CONSECUTIVE_SKIPPED_STEPS steps in a row were skipped or the scale
fell below GRAD_SCALE_FLOOR (miselbo.training.settings says why these values), naming the first
non-finite gradient of the streak. Every process takes the same decision without communicating:
the gradients are averaged before the scaler looks at them.

Signals: the first SIGINT or SIGTERM only sets a flag (the loop finishes its step, writes a
checkpoint and exits with 128 + signal number). A second SIGINT (Ctrl-C twice) raises
KeyboardInterrupt at once; checkpoints are written atomically, so the last one stays intact.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from typing import Callable

import torch

from miselbo.runtime import distributed
from miselbo.training import settings

EXIT_TRAINING_FAILED = 3
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training ended before its last epoch; `message` says why and how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class NonFiniteLoss(Exception):
    """The loss (or the gradients) of a step was NaN or infinite on some process; no update was
    made. `first_place` names the first non-finite value found, when this process looked."""

    def __init__(self, global_step: int, value: float | None, first_place: str | None = None,
                 what: str = "the loss"):
        state = f"is {value}" if value is not None else "is not finite on another process"
        super().__init__(f"{what} {state} at global step {global_step}")
        self.global_step = global_step
        self.value = value
        self.first_place = first_place


class GradientsKeepFailing(NonFiniteLoss):
    """The GradScaler skipped too many steps (see the module docstring); `reason` says which limit
    was reached, `first_place` names the first non-finite gradient of the streak."""

    def __init__(self, global_step: int, reason: str, first_place: str | None):
        Exception.__init__(self, reason)
        self.global_step = global_step
        self.value = None
        self.first_place = first_place


class StopAfterStep(Exception):
    """A stop was requested by `signal_number`; the step that was running has finished."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def signal_name(signal_number: int) -> str:
    return signal.Signals(signal_number).name


class StopRequests:
    """Records SIGINT/SIGTERM while installed (main thread only); `announce` prints a notice once."""

    def __init__(self, announce: bool = True):
        self.signal_number = 0
        self.announce = announce
        self._previous = {}

    def _handle(self, signal_number, frame) -> None:
        if signal_number == signal.SIGINT and self.signal_number:
            raise KeyboardInterrupt
        if self.signal_number:
            return
        self.signal_number = signal_number
        if self.announce:
            print(f"\n{signal_name(signal_number)} received: finishing the current step, then writing "
                  f"a checkpoint (Ctrl-C again stops at once).", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        """Install the handlers for the duration of the block, then restore the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # handlers can only be set from the main thread; signals then act as usual
            return
        self._previous = {number: signal.signal(number, self._handle) for number in HANDLED_SIGNALS}
        try:
            yield self
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)


class StepGuard:
    """Per-step agreement of all processes on (stop signal, non-finite loss), one all-reduce."""

    def __init__(self, requests: StopRequests, device: torch.device,
                 max_consecutive_skips: int | None = None, scale_floor: float | None = None):
        """The limits default to MAX_CONSECUTIVE_SKIPPED_STEPS and GRAD_SCALE_FLOOR."""
        self.requests = requests
        self.device = device
        self.stop_signal = 0
        self.max_consecutive_skips = max_consecutive_skips or settings.MAX_CONSECUTIVE_SKIPPED_STEPS
        self.scale_floor = settings.GRAD_SCALE_FLOOR if scale_floor is None else scale_floor
        self.skipped_steps = 0  # steps the GradScaler skipped in this process's run
        self.consecutive_skips = 0
        self.streak_start: tuple[int, str, float] | None = None  # (global step, first place, scale)

    def _agree(self, nonfinite: bool) -> tuple[int, bool]:
        flags = torch.tensor([float(self.requests.signal_number), float(nonfinite)], device=self.device)
        if distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def check_loss(self, loss_value: float, global_step: int,
                   locate: Callable[[], str] | None = None) -> None:
        """Call between forward and backward: raise NonFiniteLoss if any process saw one, and
        remember whether any process was asked to stop (the step then still completes).
        `locate()` (asked only on failure, on the processes that saw it) names the first place."""
        signal_number, nonfinite = self._agree(not math.isfinite(loss_value))
        self.stop_signal = self.stop_signal or signal_number
        if nonfinite:
            local = not math.isfinite(loss_value)
            raise NonFiniteLoss(global_step, loss_value if local else None,
                                locate() if local and locate is not None else None)

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (asked between test batches)."""
        signal_number, _ = self._agree(False)
        self.stop_signal = self.stop_signal or signal_number
        return bool(self.stop_signal)

    def check_scaler_step(self, scale_before: float, scale_after: float, global_step: int,
                          locate: Callable[[], str]) -> bool:
        """Call after GradScaler.update(): the step was skipped iff the scale fell. Counts skips and
        raises GradientsKeepFailing when a limit is reached; `locate()` (asked at the first skip of
        a streak) names the first non-finite gradient. Returns whether the step was skipped."""
        skipped = scale_after < scale_before
        if not skipped:
            self.consecutive_skips, self.streak_start = 0, None
            return False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.streak_start is None:
            self.streak_start = (global_step, locate(), scale_before)
        first_step, first_place, first_scale = self.streak_start
        where = f"{first_place} (at global step {first_step})"
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise GradientsKeepFailing(global_step, (
                f"the gradients were not finite in {self.consecutive_skips} consecutive steps, global "
                f"steps {first_step} to {global_step} (the GradScaler skipped each and cut its scale "
                f"from {first_scale:g} to {scale_after:g}; {self.max_consecutive_skips} in a row is "
                f"the limit)"), where)
        if scale_after < self.scale_floor:
            raise GradientsKeepFailing(global_step, (
                f"the GradScaler's scale fell to {scale_after:g} at global step {global_step}, below "
                f"the floor {self.scale_floor:g} ({self.skipped_steps} step(s) skipped for non-finite "
                f"gradients in this run)"), where)
        return True
