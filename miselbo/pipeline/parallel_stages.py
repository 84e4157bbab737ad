"""Several training stages at once: each a `python -m miselbo.training` child process (train.py)
with its share of the CPU cores. The pipeline uses it for the new-encoder stages q2..qS, which are
independent runs against one frozen decoder.

Why: the demo model is small, so one training process keeps two CPU cores only partly busy (a
second thread speeds its steps up only a little); two single-threaded runs side by side train two
encoders in about the time of one (benchmarks/main_job.py measures the pipeline both ways).

* Each child gets OMP_NUM_THREADS = MKL_NUM_THREADS = max(1, cores // width) and writes its output
  to its own log file; at most `width` run at a time, the next starts when one ends.
* Children run in their own session, so a terminal's Ctrl-C reaches only this process, which passes
  every SIGINT / SIGTERM on to each running child: the first makes each stop after its current step
  with a checkpoint (as train.py does), a second SIGINT stops them at once. No new child starts
  after a signal. On Linux a child also gets SIGTERM when this process dies (even by SIGKILL), so no
  training is left running unattended.
* A child that fails does not stop the others (their work is kept); afterwards StagesFailed names
  every failed stage with the end of its log.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from miselbo.errors import UserError
from miselbo.runtime.distributed import cpu_threads_per_process

PARENT_PID_VARIABLE = "MISELBO_PARENT_PID"  # read by miselbo.training.__main__
POLL_SECONDS = 0.5
LOG_TAIL_LINES = 12
EPOCH_DONE = re.compile(r"epoch (\d+)/(\d+) done")
TRAIN_COMMAND = (sys.executable, "-m", "miselbo.training")  # + a stage's train.py argv


@dataclass
class StageJob:
    """One training stage to run: train.py's argv and where its output goes."""
    name: str
    argv: list[str]
    log: Path
    began: float = 0.0  # time.perf_counter() at start
    seconds: float = 0.0  # wall seconds, once ended
    exit_code: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


class StagesStopped(Exception):
    """A signal stopped the stages; every child wrote its checkpoint. exit_code = 128 + signal."""

    def __init__(self, signal_number: int, stopped: list[str], waiting: list[str]):
        name = signal.Signals(signal_number).name
        parts = [f"{name}: stopped {', '.join(stopped) or 'nothing'} (each with its checkpoint)"]
        if waiting:
            parts.append(f"not started: {', '.join(waiting)}")
        super().__init__("; ".join(parts) + ". Run the same command again to resume.")
        self.exit_code = 128 + signal_number


class StagesFailed(UserError):
    """At least one stage ended with an error; the message names each with the end of its log."""


def threads_per_child(width: int) -> int:
    return cpu_threads_per_process(width)


def _child_environment(width: int) -> dict:
    threads = str(threads_per_child(width))
    return dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1",
                **{PARENT_PID_VARIABLE: str(os.getpid())})


def _start(job: StageJob, width: int) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join([*TRAIN_COMMAND[1:], *job.argv])}\n")
        log.flush()
        job.process = subprocess.Popen([*TRAIN_COMMAND, *job.argv],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=_child_environment(width), start_new_session=True)
    job.began = time.perf_counter()


def epochs_done(log: Path) -> int:
    """The highest 'epoch k/N done' that a stage's log reports (0 before the first)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return max((int(match.group(1)) for match in EPOCH_DONE.finditer(text)), default=0)


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])


class _Forwarder:
    """While installed, SIGINT / SIGTERM are recorded and passed on to the running children."""

    def __init__(self, running: Callable[[], list]):
        self.running = running
        self.received: int | None = None
        self.previous = {}

    def _handle(self, number, frame) -> None:
        self.received = self.received or number
        for job in self.running():
            try:
                job.process.send_signal(number)
            except ProcessLookupError:
                pass

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def run_in_parallel(jobs: Sequence[StageJob], width: int,
                    on_progress: Callable[[dict], None] | None = None,
                    on_finished: Callable[[StageJob], None] | None = None) -> list[StageJob]:
    """Run the jobs, at most `width` at a time; returns them with exit codes and wall seconds.

    on_progress({name: epochs done}) is called about twice a second, on_finished(job) when a job
    ends with exit code 0. Raises StagesStopped after a signal, StagesFailed when a job failed.
    """
    waiting, running, ended = list(jobs), [], []
    with _Forwarder(lambda: list(running)) as forwarder:
        while running or (waiting and forwarder.received is None):
            while waiting and len(running) < width and forwarder.received is None:
                job = waiting.pop(0)
                _start(job, width)
                running.append(job)
            time.sleep(POLL_SECONDS)
            for job in [job for job in running if job.process.poll() is not None]:
                job.exit_code, job.seconds = job.process.returncode, time.perf_counter() - job.began
                running.remove(job)
                ended.append(job)
                if job.exit_code == 0 and on_finished is not None:
                    on_finished(job)
            if on_progress is not None:
                on_progress({job.name: epochs_done(job.log) for job in jobs})
    if forwarder.received is not None:
        raise StagesStopped(forwarder.received, [job.name for job in ended if job.exit_code != 0],
                            [job.name for job in waiting])
    failed = [job for job in ended if job.exit_code != 0]
    if failed:
        raise StagesFailed("; ".join(f"stage {job.name} failed (exit {job.exit_code}); the end of {job.log}:\n"
                                     f"{_log_tail(job.log)}" for job in failed))
    return ended
