"""Starting a run: one process, NVAE-style spawned processes per node, or torchrun; in each
process, `run_training` picks the session kind (single-encoder or joint) and runs it.

* one process (the default): trains in this process, no process group;
* `--num_process_per_node P --num_proc_node N --node_rank R --master_address A` (NVAE's way):
  this program spawns P processes, ranks R*P .. R*P+P-1 of N*P; gloo on CPU, NCCL on CUDA; the port
  is MASTER_PORT if set, else a free one (one node) or NVAE's 6020 (several nodes must agree);
* torchrun: every process reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the environment.

Batch norm: every process normalises with its own batch statistics (no SyncBatchNorm; NVAE synced
them on CUDA). Gradients are averaged every step, parameters every 100 steps, so parameters stay
identical across ranks; running statistics are rank 0's in the checkpoint.

Signals when spawned: the children handle SIGINT themselves (a terminal sends it to all of them);
the parent ignores SIGINT and forwards SIGTERM to its children.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import time
from typing import Sequence

import torch
import torch.multiprocessing as mp

from miselbo.runtime import distributed
from miselbo.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, USER_ERRORS, UserError
from miselbo.runtime.cli import resolve_device, run_cli
from miselbo.runtime.distributed import DistributedSetup
from miselbo.runtime.distribution_checks import no_distribution_validation
from miselbo.runtime.parent_death import follow_parent
from miselbo.storage.run_lock import hold_run_lock
from miselbo.storage.folders import removed_if_left_empty
from miselbo.training.options import PROG
from miselbo.training.precision import resolve_precision
from miselbo.training.prepare import prepare_save_folder, resolve_run_args
from miselbo.training.joint import JointSession, is_joint_run
from miselbo.training.run import TrainingSession
from miselbo.training.session import TrainResult, run_session
from miselbo.training.stop import TrainingStopped, signal_name

NVAE_MASTER_PORT = 6020
FAILURE_GRACE_SECONDS = 20.0
_POLL_SECONDS = 0.2


def main(argv: Sequence[str] | None = None) -> int:
    """Exactly what `python train.py argv...` does; returns the exit status (see --help)."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: Sequence[str] | None) -> int:
    try:
        train(argv)
    except SystemExit as exit_request:  # argparse: --help, or a malformed command line
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USER_ERROR)
    except TrainingStopped as stop:
        print(f"{PROG}: {stop.message}", file=sys.stderr)
        return stop.exit_code
    return 0


def train(argv: Sequence[str] | None = None) -> TrainResult:
    """Run train.py with `argv` and return its result (rank 0's when several processes train).

    Raises one of miselbo.runtime.cli.USER_ERRORS for a bad command line or input, TrainingStopped when
    the run stops early (signal, non-finite loss), SystemExit for argparse's --help / usage errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = resolve_run_args(argv)
    device = resolve_device(run_args.device)
    resolve_precision(run_args.precision, device)  # refuses a precision the device cannot run
    command = resume_command(argv)
    with removed_if_left_empty(run_args.save):  # a failed run leaves no empty eval-<save> behind
        if distributed.torchrun_environment():
            setup = distributed.setup_from_torchrun_env(device.type)
            prepare_save_folder(run_args, is_writer=setup.rank == 0)
            with hold_run_lock(run_args.save, "training", enabled=setup.rank == 0):
                prepare_save_folder(run_args, is_writer=False)  # again: a run may have ended meanwhile
                return _run_process(setup, run_args, device, command)
        setups = _node_setups(run_args, device)
        prepare_save_folder(run_args, is_writer=run_args.node_rank == 0)
        with hold_run_lock(run_args.save, "training", enabled=run_args.node_rank == 0):
            prepare_save_folder(run_args, is_writer=False)  # again: a run may have ended meanwhile
            if len(setups) == 1:
                return _run_process(setups[0], run_args, device, command)
            return spawn_training(setups, run_args, device, command)


def resume_command(argv: Sequence[str]) -> str:
    """The command that resumes this run (the same arguments plus --cont_training)."""
    arguments = list(argv) + ([] if "--cont_training" in argv else ["--cont_training"])
    if distributed.torchrun_environment():
        return f"your torchrun command with the arguments {shlex.join(arguments)}"
    return f"python train.py {shlex.join(arguments)}"


def _node_setups(run_args, device: torch.device) -> list[DistributedSetup]:
    per_node, nodes = run_args.num_process_per_node, run_args.num_proc_node
    distributed.require_local_process_count(per_node, device.type, "--num_process_per_node")
    if per_node * nodes == 1:
        return [DistributedSetup(device_type=device.type)]
    port = int(os.environ.get("MASTER_PORT") or 0) or (
        NVAE_MASTER_PORT if nodes > 1 else distributed.free_port(run_args.master_address))
    return [DistributedSetup(s.rank, s.local_rank, s.world_size, s.device_type, s.master_address, port)
            for s in distributed.node_setups(per_node, nodes, run_args.node_rank, device.type,
                                             run_args.master_address)]


def _share_cpu_threads(processes_on_this_machine: int) -> None:
    """Give each of several CPU processes its share of the cores (unless OMP_NUM_THREADS says)."""
    if processes_on_this_machine > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(distributed.cpu_threads_per_process(processes_on_this_machine))


def _run_process(setup: DistributedSetup, run_args, device: torch.device, command: str) -> TrainResult:
    if device.type == "cuda" and setup.world_size > 1:
        device = setup.device  # cuda:<local rank>
    if device.type == "cpu":
        local = os.environ.get("LOCAL_WORLD_SIZE") if distributed.torchrun_environment() else None
        _share_cpu_threads(int(local) if local else run_args.num_process_per_node)
    distributed.initialize(setup)
    try:
        return run_training(run_args, setup, device, command)
    finally:
        distributed.shutdown()


def run_training(args, setup: DistributedSetup, device: torch.device, resume_command: str) -> TrainResult:
    """What every process executes, whether started directly, spawned NVAE-style or by torchrun:
    set up this process's part of the run and train it to the end (or raise TrainingStopped).
    Several new encoders (--num_new_encoders K > 1, --include_parent_encoder) train in a
    JointSession; K = 1 without the parent is the single-encoder TrainingSession."""
    session_type = JointSession if is_joint_run(args) else TrainingSession
    with no_distribution_validation():  # NaN reaches our finite checks, not a ValueError
        return run_session(session_type, args, setup, device, resume_command)


# ----------------------------------------------------------------------------- spawned processes

def spawn_training(setups: list[DistributedSetup], run_args, device: torch.device,
                   command: str) -> TrainResult:
    """Train in one spawned child per setup; rank 0's result, with every rank's parameter hash."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_spawned_worker, args=(setup, run_args, device, command, queue, os.getpid()))
                 for setup in setups]
    for process in processes:
        process.start()
    with _parent_signals(processes):
        reports = _wait_for(processes, queue)
    return _outcome(processes, reports, setups, command)


def _lost_a_peer(err: RuntimeError) -> bool:
    """True for the collective-communication error of a process whose peer died (gloo, NCCL)."""
    text = str(err)
    return isinstance(err, getattr(torch.distributed, "DistError", ())) or (
        ("gloo" in text or "NCCL" in text) and ("peer" in text or "Connection" in text))


def _spawned_worker(setup: DistributedSetup, run_args, device: torch.device, command: str,
                    queue, parent_pid: int) -> None:
    follow_parent(parent_pid, signal.SIGTERM)  # a killed launcher leaves no rank training on
    code = 0
    try:
        queue.put(("result", setup.rank, _run_process(setup, run_args, device, command)))
    except USER_ERRORS as err:
        queue.put(("user_error", setup.rank, str(err)))
        code = EXIT_USER_ERROR
    except TrainingStopped as stop:
        queue.put(("stopped", setup.rank, (stop.message, stop.exit_code)))
        code = stop.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except RuntimeError as err:
        if not _lost_a_peer(err):
            raise
        queue.put(("lost_peer", setup.rank, str(err).splitlines()[0]))  # the launcher names the cause
        code = 1
    sys.exit(code)


@contextlib.contextmanager
def _parent_signals(processes):
    def forward_sigterm(signal_number, frame):
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward_sigterm)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _wait_for(processes, queue) -> list:
    """Join all children, collecting their reports; if one fails, stop the rest after a grace."""
    reports, failed_at = [], None
    while any(process.is_alive() for process in processes):
        while not queue.empty():
            reports.append(queue.get())
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_SECONDS:
            for process in processes:
                if process.is_alive():
                    process.kill()
        time.sleep(_POLL_SECONDS)
    while not queue.empty():
        reports.append(queue.get())
    for process in processes:
        process.join()
    return reports


def _outcome(processes, reports: list, setups: list[DistributedSetup], command: str) -> TrainResult:
    killed = {setup.rank: -process.exitcode for setup, process in zip(setups, processes)
              if process.exitcode is not None and process.exitcode < 0}
    if killed:
        rank, number = min(killed.items())
        raise TrainingStopped(
            f"the training process of rank {rank} was killed by {signal_name(number)} (SIGKILL is "
            f"often the kernel ending a process that ran out of memory); the other process(es) were "
            f"stopped. The last checkpoint written (if any) is kept; resume from it with:\n  {command}",
            128 + number)
    by_kind = {}
    for kind, rank, payload in sorted(reports, key=lambda report: report[1]):
        by_kind.setdefault(kind, {})[rank] = payload
    if "user_error" in by_kind:
        raise UserError(next(iter(by_kind["user_error"].values())))
    if "stopped" in by_kind:
        message, code = by_kind["stopped"].get(0, next(iter(by_kind["stopped"].values())))
        raise TrainingStopped(message, code)
    results = by_kind.get("result", {})
    codes = {setup.rank: process.exitcode for setup, process in zip(setups, processes)}
    if len(results) != len(setups) or any(codes.values()):
        raise RuntimeError(f"training process(es) failed, exit codes by rank: {codes}; see their "
                           f"output above.")
    hashes = tuple(results[setup.rank].parameter_sha256 for setup in setups)
    return dataclasses.replace(results[min(results)], rank_parameter_sha256=hashes)
