"""What a run reports: text lines (stdout and <save>/log.txt) and TensorBoard scalars and images.

Only the main process writes; on the others both objects do nothing. Lines go through tqdm.write
so they do not break a progress bar.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from miselbo.nvae.distributions import output_image
from miselbo.training.objective import LossTerms

ACTIVE_UNIT_KL = 0.1  # a latent channel with KL > 0.1 nats counts as active (docs/nvae.md 8.4, step 8)
SAMPLE_TEMPERATURES = (0.7, 0.8, 0.9, 1.0)
NUM_SAMPLE_IMAGES = 16
MAX_GRID_IMAGES = 64


def _warn(line: str) -> None:
    """One line on stderr: a report that cannot be written must not stop the run or hide its error."""
    print(line, file=sys.stderr, flush=True)


class RunLog:
    """NVAE-style logger: `info(format, *args)` prints a time-stamped line and appends it to log.txt.

    If log.txt cannot be written (disk full, folder gone), one line says so on stderr and the lines
    go on to stdout only; close() never raises."""

    def __init__(self, folder: Path | None, enabled: bool = True):
        self.enabled = enabled
        self._file = open(folder / "log.txt", "a", encoding="utf-8") if enabled and folder else None

    def info(self, message: str, *args) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%m/%d %H:%M:%S')} {message % args if args else message}"
        tqdm.write(line, file=sys.stdout)
        if self._file is not None:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as error:
                self._drop_file(f"log.txt cannot be written ({error}); log lines go to stdout only.")

    def _drop_file(self, line: str) -> None:
        file, self._file = self._file, None
        _warn(line)
        try:
            file.close()
        except OSError:
            pass  # the reason was just reported; a second failure adds nothing

    def close(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.close()
        except OSError as error:
            _warn(f"log.txt could not be closed ({error}); its last lines may be missing.")


class _GuardedEvents:
    """Wraps the event file of a tensorboardX writer so that the writer's background thread never
    raises: an OSError is kept (the first one) and the write is dropped. The thread then stays alive,
    prints no traceback and keeps emptying its queue, so add_scalar cannot block."""

    def __init__(self, events):
        self.error: OSError | None = None
        for name in ("write_event", "flush", "close"):
            setattr(events, name, self._guarded(getattr(events, name)))

    def _guarded(self, method):
        def call(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                return method(*args, **kwargs)
            except OSError as error:
                self.error = error
                return None
        return call


class Board:
    """A tensorboardX SummaryWriter(log_dir=folder, flush_secs=20) on the main process.

    Events are a report, not the run's result: if they cannot be written (disk full, folder gone) or
    the writer's thread has died, the Board says so in one line on stderr and switches itself off, so
    the run goes on, or fails with its own error; close() never raises."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        self._guard: _GuardedEvents | None = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported only where events are written
            try:
                self.writer = SummaryWriter(log_dir=str(folder), flush_secs=20)
            except OSError as error:
                _warn(f"TensorBoard events are off: they cannot be written to {folder} ({error}).")
                return
            self._guard = self._guard_events(self.writer)

    @staticmethod
    def _guard_events(writer) -> _GuardedEvents | None:
        events = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None),
                         "_ev_writer", None)
        return _GuardedEvents(events) if events is not None else None

    def _usable(self) -> bool:
        """False (and the Board off) once the event file failed or the writer's thread died."""
        if self.writer is None:
            return False
        if self._guard is not None and self._guard.error is not None:
            self._switch_off(f"TensorBoard events are off: the event file cannot be written "
                             f"({self._guard.error}).")
            return False
        if not self._worker_alive_for(self.writer):
            self._switch_off("TensorBoard events are off: the event writer's thread has stopped.")
            return False
        return True

    def _switch_off(self, line: str) -> None:
        writer, self.writer = self.writer, None
        _warn(line)
        if self._worker_alive_for(writer):  # a dead thread's writer would wait on it in close()
            try:
                writer.close()
            except OSError:
                pass  # the reason was just reported

    @staticmethod
    def _worker_alive_for(writer) -> bool:
        """Whether the writer's background thread runs (True where there is none to check)."""
        worker = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None),
                         "_worker", None)
        return worker is None or worker.is_alive()

    def scalar(self, tag: str, value, step: int) -> None:
        if self._usable():
            try:
                self.writer.add_scalar(tag, float(value), step)
            except OSError as error:
                self._switch_off(f"TensorBoard events are off: the event file cannot be written "
                                 f"({error}).")

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A grid of images [N, C, H, W] in [0, 1]."""
        if self._usable():
            from torchvision.utils import make_grid
            count = min(len(images), MAX_GRID_IMAGES)
            grid = make_grid(images[:count].float().cpu(), nrow=int(count ** 0.5))
            try:
                self.writer.add_image(tag, grid, step)
            except OSError as error:
                self._switch_off(f"TensorBoard events are off: the event file cannot be written "
                                 f"({error}).")

    def close(self) -> None:
        """Flush and close the event file; a failure is one line on stderr, never an exception.
        A writer whose thread died is not closed (closing it would wait on that thread)."""
        if not self._usable():
            return
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except OSError as error:
            _warn(f"TensorBoard events could not be closed ({error}); the last ones may be missing.")
            return
        if self._guard is not None and self._guard.error is not None:
            _warn(f"TensorBoard events could not be written ({self._guard.error}); the last ones "
                  f"may be missing.")


def log_step_scalars(board: Board, terms: LossTerms, epoch_loss: float, lr: float, step: int) -> None:
    """Regularisers, λ, epoch average, lr, KL, reconstruction, β, per-group values (docs/nvae.md 8.4)."""
    for tag, value in (("train/norm_loss", terms.spectral), ("train/bn_loss", terms.batchnorm),
                       ("train/norm_coeff", terms.reg_coeff), ("train/nelbo_avg", epoch_loss),
                       ("train/lr", lr), ("train/nelbo_iter", terms.loss.detach()),
                       ("train/kl_iter", terms.kl), ("train/recon_iter", terms.reconstruction),
                       ("kl_coeff/coeff", terms.kl_weight)):
        board.scalar(tag, value, step)
    total_active = 0
    for group, (gamma, kl_value, kl_diag) in enumerate(zip(terms.balance_coeffs, terms.kl_per_group,
                                                           terms.kl_diag)):
        active = int((kl_diag > ACTIVE_UNIT_KL).sum())
        total_active += active
        board.scalar(f"kl/active_{group}", active, step)
        board.scalar(f"kl_coeff/layer_{group}", gamma, step)
        board.scalar(f"kl_vals/layer_{group}", kl_value, step)
    board.scalar("kl/total_active", total_active, step)


def log_reconstructions(board: Board, model, x: torch.Tensor, terms: LossTerms, step: int) -> None:
    """Input and reconstruction grids (the output distribution's mean image)."""
    board.images("train/input", x, step)
    board.images("train/reconstruction", output_image(model.decoder_output(terms.logits.float()),
                                                      mean=True), step)


@torch.no_grad()
def log_prior_samples(board: Board, model, step: int) -> None:
    """16 prior samples per temperature (Bernoulli mean, else one draw), without touching the RNG
    stream that training uses."""
    if board.writer is None:
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for temperature in SAMPLE_TEMPERATURES:
            logits = model.sample(NUM_SAMPLE_IMAGES, temperature)
            images = output_image(model.decoder_output(logits), t=temperature)
            board.images(f"generated_{temperature}", images, step)
