"""torch.distributed for training and evaluation: start-up, averaging, and rank-0 duties.

Two ways to start, both ending in `init_process_group`:

* NVAE's way: the program spawns `processes_per_node` processes itself (`spawn_processes`); each
  calls `initialize(DistributedSetup(...))` with its ranks, `MASTER_ADDR` = the master address and
  a port that rank 0's parent chose (NVAE hard-wires 6020; we take a free one unless
  `MASTER_PORT` is set, so two runs on one machine do not collide).
* torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` are in the
  environment; `setup_from_torchrun_env()` reads them.

The backend follows the device: NCCL for CUDA, gloo for CPU (never chosen by user name, cf. the
public MISELBO code's defect D10). A single process creates no process group at all, so every
helper below is a no-op then.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miselbo.errors import UserError
from miselbo.runtime.parent_death import follow_parent

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# More CPU processes than cores run no faster, and each holds its own models and data: a few per
# core are allowed (tests oversubscribe small machines), a thousand are a typing mistake.
CPU_PROCESSES_PER_CORE_LIMIT = 4


@dataclass(frozen=True)
class DistributedSetup:
    """Where one process sits: global rank, local rank and world size; device type 'cpu' or 'cuda'."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"
    master_address: str = "127.0.0.1"
    master_port: int | None = None

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def device(self) -> torch.device:
        """The device this process computes on: cuda:<local_rank> for CUDA, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port the operating system reports free on `address`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def torchrun_environment() -> bool:
    """True when launched by torchrun (RANK, WORLD_SIZE and LOCAL_RANK are set)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def setup_from_torchrun_env(device_type: str) -> DistributedSetup:
    """The DistributedSetup torchrun describes in the environment."""
    return DistributedSetup(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), device_type=device_type,
                            master_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                            master_port=int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ
                            else None)


def initialize(setup: DistributedSetup) -> None:
    """Join the process group described by `setup` (nothing for a world of one)."""
    if setup.world_size <= 1 or is_initialized():
        return
    os.environ["MASTER_ADDR"] = setup.master_address
    if setup.master_port is not None:
        os.environ["MASTER_PORT"] = str(setup.master_port)
    os.environ.setdefault("MASTER_PORT", str(free_port(setup.master_address)))
    if setup.device_type == "cuda":
        torch.cuda.set_device(setup.local_rank)
    dist.init_process_group(backend=setup.backend, init_method="env://", rank=setup.rank,
                            world_size=setup.world_size, timeout=DEFAULT_TIMEOUT)


def shutdown() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()


def spawn_processes(worker: Callable[[DistributedSetup], None], setups: list[DistributedSetup]) -> None:
    """Run `worker(setup)` in one child process per setup (torch.multiprocessing.spawn); joins them.

    All setups must share master address and port; a free port is chosen here when none is given.
    """
    port = setups[0].master_port or int(os.environ.get("MASTER_PORT") or free_port(setups[0].master_address))
    setups = [DistributedSetup(s.rank, s.local_rank, s.world_size, s.device_type, s.master_address, port)
              for s in setups]
    mp.spawn(_spawned_entry, args=(worker, setups, os.getpid()), nprocs=len(setups), join=True)


def _spawned_entry(index: int, worker, setups: list[DistributedSetup], parent_pid: int) -> None:
    """A spawned process: it gets SIGTERM when the process that spawned it dies (a SIGKILLed
    evaluation or training leaves no workers behind), then runs its share."""
    follow_parent(parent_pid, signal.SIGTERM)
    worker(setups[index])


def node_setups(processes_per_node: int, num_nodes: int, node_rank: int, device_type: str,
                master_address: str) -> list[DistributedSetup]:
    """NVAE's launch: process r of node n gets local rank r and global rank r + n * per_node."""
    world_size = processes_per_node * num_nodes
    return [DistributedSetup(rank=r + node_rank * processes_per_node, local_rank=r, world_size=world_size,
                             device_type=device_type, master_address=master_address)
            for r in range(processes_per_node)]


# ----------------------------------------------------------------------------- collectives

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs and results."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def require_local_process_count(count: int, device_type: str, flag: str) -> None:
    """Refuse to start `count` processes on this machine when it cannot hold them: more than one
    per CUDA device, or more than CPU_PROCESSES_PER_CORE_LIMIT per CPU core."""
    if device_type == "cuda":
        devices = torch.cuda.device_count()
        if count > devices:
            raise UserError(f"{flag} {count} asks for one CUDA device per process, and this machine "
                            f"has {devices}.")
        return
    cores = os.cpu_count() or 1
    if count > CPU_PROCESSES_PER_CORE_LIMIT * cores:
        raise UserError(f"{flag} {count} would start {count} processes on this machine's {cores} CPU "
                        f"core(s); at most {CPU_PROCESSES_PER_CORE_LIMIT * cores} are allowed (each "
                        f"holds its own copy of the models and data, and more processes than cores "
                        f"run no faster). Use {flag} {cores} (one per core) or fewer.")


def cpu_threads_per_process(processes_on_this_machine: int) -> int:
    """Each of several CPU processes' share of this machine's cores (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes_on_this_machine))


def average_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` in place over all processes; returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def sum_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all processes; returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_tensors_(tensors: Iterable[torch.Tensor]) -> None:
    """Average many tensors in place over all processes with one all-reduce per dtype and device
    (one message instead of one per tensor, whose latency dominated a 2-process CPU run of the demo
    model). The same average as one all-reduce per tensor, up to the order of floating-point sums."""
    if not is_initialized():
        return
    buckets: dict = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])  # [sum of numel]
        average_tensor_(flat)
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def average_gradients_(params: Iterable[torch.nn.Parameter]) -> None:
    """Average every existing gradient over all processes (frozen parameters have none)."""
    average_tensors_(param.grad.data for param in params if param.grad is not None)


def average_parameters_(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the values of trainable parameters over all processes (NVAE does it every 100 steps)."""
    average_tensors_(param.data for param in params if param.requires_grad)


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate `tensor` from every process along `dim` (sizes may differ between ranks)."""
    if not is_initialized():
        return tensor
    size = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padded_shape = list(tensor.shape)
    padded_shape[dim] = largest
    padded = tensor.new_zeros(padded_shape)
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([part.narrow(dim, 0, int(s.item())) for part, s in zip(gathered, sizes)], dim=dim)
