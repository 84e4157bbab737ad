"""One writer per run folder: an exclusive `flock` on `<folder>/run.lock` for the whole run.

`hold_run_lock(folder, purpose)` is a context manager. Entering takes the lock without waiting;
when another live process holds it, UserError (exit 2) names that process (pid, host, start time
and command, which the holder writes into the lock file). The kernel releases a flock when its
holder exits in any way, SIGKILL included, so a lock left by a dead process is simply taken over;
the dead holder's details are still in the file, and a message says whose lock was taken over.
Leaving the block (normally or by an exception) removes the file and releases the lock.

The file is unlinked while still locked, so another process may have opened the old inode and lock
it a moment later; `_lock_current_file` therefore checks, after locking, that the path still names
the inode it locked, and retries otherwise.

Limitations: flock is advisory (only miselbo's writers respect it), and on network file systems it
is only as reliable as the file system's lock support. Processes spawned by the holder do not hold
the lock themselves: the parent keeps it until all of them have been joined.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from miselbo.errors import UserError

LOCK_FILE_NAME = "run.lock"
_MAX_ATTEMPTS = 20
logger = logging.getLogger(__name__)


def _holder_record(purpose: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}


def _read_record(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", errors="replace")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text[:200]}
    return record if isinstance(record, dict) else {"raw": text[:200]}


def _describe(record: dict | None) -> str:
    if not record:
        return "a process that has not written its details yet"
    if "raw" in record:
        return f"an unknown process (lock file text {record['raw']!r})"
    return (f"pid {record.get('pid')} on host {record.get('host')} ({record.get('purpose')}, started "
            f"{record.get('started')}, command: {record.get('command')})")


def _lock_current_file(path: Path) -> int | None:
    """An fd holding the flock on the file now at `path`, or None when another process holds it."""
    for _ in range(_MAX_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise _in_use(path, holder) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file as we locked it: lock the new one
    raise UserError(f"could not take the lock {path}: it kept being replaced by other processes.")


def _in_use(path: Path, holder: dict | None) -> UserError:
    return UserError(f"{path.parent} is in use by another run: {_describe(holder)}. Only one "
                     f"training or evaluation run may write into a folder at a time; wait for that "
                     f"run to finish (or stop it), or choose another output folder. A lock left by "
                     f"a process that has died is taken over automatically.")


@contextlib.contextmanager
def hold_run_lock(folder: str | os.PathLike, purpose: str, enabled: bool = True) -> Iterator[Path | None]:
    """Hold `<folder>/run.lock` for the block (see the module docstring); `folder` must exist."""
    if not enabled:
        yield None
        return
    path = Path(folder) / LOCK_FILE_NAME
    try:
        fd = _lock_current_file(path)
    except OSError as err:
        raise UserError(f"cannot create the lock file {path}: {err.strerror or err}.") from None
    try:
        previous = _read_record(fd)
        if previous:
            print(f"note: took over the lock {path} left by {_describe(previous)}, which is no "
                  f"longer running.", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder_record(purpose)) + "\n").encode())
        os.fsync(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked: a waiting process re-checks the inode (see above)
        os.close(fd)
