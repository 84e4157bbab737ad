"""Finding the processes torch.multiprocessing spawned for a parent (Linux /proc)."""
from pathlib import Path


def spawned_children(pid: int) -> list[int]:
    """PIDs of the `spawn_main` children of process `pid`, sorted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        if parent == str(pid) and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)
