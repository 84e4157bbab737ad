"""How much memory this process can still use on a device, before it allocates: on CUDA the
device's free memory plus torch's unused cache; on the CPU MemAvailable (else os.sysconf), lowered
to what the memory cgroup and RLIMIT_AS still allow."""
import os
import resource
from pathlib import Path

import torch

MEMINFO = Path("/proc/meminfo")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """What this process's memory cgroup (v2, else v1) still allows, None without a limit."""
    for limit_file, usage_file in ((CGROUP_V2 / "memory.max", CGROUP_V2 / "memory.current"),
                                   (CGROUP_V1 / "memory.limit_in_bytes", CGROUP_V1 / "memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(0, limit - usage)
    return None


def _address_space_available() -> int | None:
    """What RLIMIT_AS (ulimit -v) still allows this process to map, None without a limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return max(0, soft - mapped)


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still use on `device` (None when it cannot be told): on CUDA the
    device's free memory plus what torch's cache holds unused; on the CPU MemAvailable (else
    os.sysconf), lowered to the memory cgroup's and RLIMIT_AS's remaining allowance."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    known = [value for value in (_meminfo_available(), _cgroup_available(), _address_space_available())
             if value is not None]
    return min(known) if known else None
