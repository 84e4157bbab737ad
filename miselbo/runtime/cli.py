"""What every command-line entry point shares: user errors without tracebacks, devices, progress bars.

A user mistake (bad flag value, missing or damaged checkpoint, unsupported data set, unwritable
folder) raises one of USER_ERRORS with a one-paragraph message saying what and where; `run_cli`
prints it as `<prog>: error: <message>` and returns exit status 2. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from miselbo.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, USER_ERRORS, UserError
from miselbo.runtime import flags

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "USER_ERRORS", "UserError", "progress", "progress_enabled",
           "require_positive", "resolve_device", "run_cli"]


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Run `main(argv)`; a USER_ERRORS exception becomes a message on stderr and exit status 2."""
    name = prog or os.path.basename(sys.argv[0]) or "miselbo"
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def resolve_device(name: str | None) -> torch.device:
    """'auto' or None -> CUDA when available, else CPU; otherwise the named device, checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--device {name!r} is not a device name (use auto, cpu, cuda or "
                        f"cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu "
                        f"or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s).")
    return device


def progress_enabled() -> bool:
    """Bars are shown on a terminal and hidden under CI=true or when stderr is not a TTY."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """A tqdm bar that follows `progress_enabled()` unless `disable` is given."""
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def require_positive(flag: str, value: int) -> int:
    """`value` if it is an int >= 1, else a UserError naming the flag (miselbo.runtime.flags.count)."""
    return flags.count(flag, value)
