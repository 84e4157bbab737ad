"""Child processes that never outlive the process that started them (Linux).

`follow_parent(parent_pid, signal_number)` asks the kernel to send this process `signal_number`
when its parent dies (prctl PR_SET_PDEATHSIG), then checks that the parent is still the one that
started it: if it died before the request took effect, this process exits at once with
128 + signal_number. Elsewhere than Linux it does nothing.
"""
import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1


def follow_parent(parent_pid: int, signal_number: int) -> None:
    """Die with `parent_pid` (see the module docstring); a no-op where prctl is missing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal_number), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(128 + int(signal_number))
