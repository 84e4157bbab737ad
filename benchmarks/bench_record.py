"""What every benchmark shares: the record of the machine and code a figure was measured on, the
stored result file benchmarks/results/<name>.json, and the gate that stops a benchmark before it
prints a speed for paths that do not compute the same thing.

A stored result is {"benchmark", "command", "machine", "commit", "dirty", "date", "result"}:
`result` is what the benchmark's `RESULT {json}` line printed; docs/benchmarks.md's tables are
rendered from these files by `python benchmarks/report.py`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from miselbo.pipeline.export import package_record

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# exit status of a benchmark whose compared paths disagree (no speed printed)
EXIT_DISAGREEMENT = 1


class Disagreement(Exception):
    """The compared paths of a benchmark do not compute the same thing within its tolerance."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def machine(device: str | torch.device = "cpu") -> dict:
    """What the figures depend on: CPU model, cores, torch threads, memory, torch, device, load."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(), "torch": torch.__version__, "python": platform.python_version(),
            "device": device.type, "gpu": gpu, "load_average": _load_average()}


def code_version() -> dict:
    """The commit the benchmark ran at (12 hex digits), and whether tracked files differed from it:
    the package's own record (miselbo.pipeline.export.package_record, what an export stores)."""
    package = package_record()
    commit = package["commit"]
    return {"commit": commit[:12] if commit else None, "dirty": package["dirty"]}


def record(name: str, result: dict, device: str | torch.device = "cpu", argv: list[str] | None = None) -> dict:
    """The stored form of one benchmark run (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    return {"benchmark": name, "command": shlex.join(["python", f"benchmarks/{name}.py", *argv]),
            "machine": machine(device), **code_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "result": result}


def result_path(name: str, results_dir: Path | None = None) -> Path:
    return (results_dir or RESULTS_DIR) / f"{name}.json"


def save(name: str, result: dict, device: str | torch.device = "cpu", argv: list[str] | None = None,
         results_dir: Path | None = None, stored_as: str | None = None) -> Path:
    """Print `RESULT {json}` and write the record to benchmarks/results/<stored_as or name>.json
    (atomically: a stopped benchmark leaves the previous file whole). `stored_as` keeps a second
    kind of run of one script (such as train_speed.py --precision) in a file of its own. Returns
    the path."""
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    path = result_path(stored_as or name, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record(name, result, device, argv), indent=2, sort_keys=True) + "\n",
                         encoding="utf-8")
    os.replace(temporary, path)
    print(f"result stored in {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}",
          flush=True)
    return path


def load(name: str, results_dir: Path | None = None) -> dict:
    """The stored record of benchmark `name`."""
    return json.loads(result_path(name, results_dir).read_text(encoding="utf-8"))


def refuse(benchmark: str, error: Disagreement) -> None:
    """End a benchmark whose compared paths disagree: say which, exit EXIT_DISAGREEMENT, no speed."""
    print(f"{benchmark}: FAILED, no speed reported: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_DISAGREEMENT)


def check_close(what: str, value: float, reference: float, tolerance: float, relative: bool = False) -> float:
    """|value - reference| (relative to |reference| when `relative`), or Disagreement above
    `tolerance` or when either is not finite. Returns the difference."""
    difference = abs(value - reference)
    if relative:
        difference /= max(abs(reference), 1e-30)
    if not difference <= tolerance:  # also catches NaN
        kind = "relative difference" if relative else "difference"
        raise Disagreement(f"{what}: {value!r} against {reference!r}, {kind} {difference:.3g} above the "
                           f"tolerance {tolerance:g}")
    return difference
