"""Storage faults a user can meet: a checkpoint given as a pipe, a sidecar that is a folder, a reader
racing a writer that rewrites the file, and a full disk during a save. Each ends in one clear
SafeIOError / CheckpointError paragraph that names the file and what to do, never a traceback."""
import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from miselbo.errors import CheckpointError, SafeIOError
from miselbo.storage import safe_io
from miselbo.storage.checkpoints import read_checkpoint
from miselbo.storage.safe_io import (ChecksumMismatchError, NotARegularFileError, atomic_torch_save,
                                     atomic_write_bytes, read_verified_bytes, regular_file,
                                     sidecar_path, verify_sha256)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a pipe as the checkpoint

def test_a_process_substitution_is_refused_as_a_pipe_not_as_a_missing_file(pipe_path):
    with pytest.raises(NotARegularFileError) as raised:
        regular_file(pipe_path)
    message = str(raised.value)
    assert pipe_path in message and "is a pipe" in message and "No such file" not in message
    with pytest.raises(CheckpointError) as raised:  # must not block: nothing is ever written
        read_checkpoint(pipe_path)
    message = str(raised.value)
    assert message.startswith(f"{pipe_path} is a pipe") and "<(" in message
    assert "pass the file itself" in message and "\n" not in message


def test_a_named_pipe_keeps_its_own_message(tmp_path):
    fifo = tmp_path / "checkpoint.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"is a named pipe \(FIFO\)"):
        read_checkpoint(fifo)


def test_a_dev_fd_path_of_a_regular_file_is_read(tmp_path):
    """/dev/fd/N of an open regular file is a magic link too; it must still be readable."""
    if not os.path.isdir("/dev/fd"):
        pytest.skip("no /dev/fd on this system")
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"payload")
    descriptor = os.open(target, os.O_RDONLY)
    try:
        data, _real, _verified = read_verified_bytes(f"/dev/fd/{descriptor}")
    finally:
        os.close(descriptor)
    assert data == b"payload"


# ----------------------------------------------------------------------------- a folder as sidecar

def test_a_sidecar_that_is_a_folder_is_named_as_a_sidecar_with_what_to_do(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"anything")
    sidecar_path(target).mkdir()
    for read in (verify_sha256, read_verified_bytes):
        with pytest.raises(NotARegularFileError) as raised:
            read(target)
        message = str(raised.value)
        assert f"{sidecar_path(target)} is a folder" in message
        assert "should hold the SHA-256 of" in message and "not a checksum file" in message
        assert "Remove or rename" in message and "pass a file inside it" not in message
    with pytest.raises(CheckpointError, match="not a checksum file"):
        read_checkpoint(target)


def test_a_save_beside_a_folder_sidecar_says_so_and_keeps_the_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    sidecar_path(target).mkdir()
    with pytest.raises(SafeIOError) as raised:
        atomic_write_bytes(target, b"new")
    message = str(raised.value)
    assert f"{sidecar_path(target)} is a folder" in message and "not a checksum file" in message
    assert "Is a directory" not in message
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt",
                                                                             "checkpoint.pt.sha256"]


# ----------------------------------------------------------------------------- a reader racing a writer

_REWRITE_LOOP = """
import sys
from miselbo.storage.safe_io import atomic_write_bytes
target, seconds = sys.argv[1], float(sys.argv[2])
import time
print("ready", flush=True)
end, step = time.monotonic() + seconds, 0
while time.monotonic() < end:
    step += 1
    atomic_write_bytes(target, b"%08d" % step * 2000)
"""


def _race(target, seconds, read):
    """Run `read(target)` in a loop while another process rewrites `target`; count the mismatches."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    writer = subprocess.Popen([sys.executable, "-c", _REWRITE_LOOP, str(target), str(seconds)],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    reads, mismatches = 0, []
    try:
        while writer.poll() is None:
            try:
                read(target)
            except ChecksumMismatchError as err:
                mismatches.append(str(err))
            reads += 1
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == 0
    return reads, mismatches


@pytest.mark.parametrize("read", [read_verified_bytes, verify_sha256])
def test_a_reader_never_sees_a_false_mismatch_while_the_file_is_rewritten(tmp_path, read):
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"%08d" % 0 * 2000)
    reads, mismatches = _race(target, 1.0, read)
    assert reads > 100, reads
    assert mismatches == [], f"{len(mismatches)} false mismatches in {reads} reads: {mismatches[0]}"


def test_without_folder_locks_the_reader_retries_instead_of_reporting_a_mismatch(tmp_path, monkeypatch):
    """Where folders cannot be locked (some network file systems) a changed pair is re-read."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(safe_io.fcntl, "flock", no_flock)
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"%08d" % 0 * 2000)
    reads, mismatches = _race(target, 1.0, read_verified_bytes)
    assert reads > 100 and mismatches == [], (reads, mismatches[:1])


def test_a_real_corruption_is_still_reported_at_once(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"%08d" % 0 * 2000)
    damaged = bytearray(target.read_bytes())
    damaged[100] ^= 0x01
    target.write_bytes(bytes(damaged))
    started = time.monotonic()
    for read in (read_verified_bytes, verify_sha256):
        with pytest.raises(ChecksumMismatchError, match="the file is corrupted or was changed"):
            read(target)
    assert time.monotonic() - started < 1.0


def test_a_corruption_during_a_rewrite_loop_is_still_reported(tmp_path):
    """A writer keeps rewriting another file in the same folder; the damaged one is still caught."""
    target, busy = tmp_path / "checkpoint.pt", tmp_path / "other.pt"
    atomic_write_bytes(target, b"x" * 5000)
    atomic_write_bytes(busy, b"%08d" % 0 * 2000)
    with open(target, "r+b") as handle:
        handle.seek(10)
        handle.write(b"y")
    outcome = []
    stop = threading.Event()

    def read_damaged():
        while not stop.is_set():
            try:
                verify_sha256(target)
                outcome.append("verified")
            except ChecksumMismatchError:
                outcome.append("mismatch")
    reader = threading.Thread(target=read_damaged)
    reader.start()
    try:
        _race(busy, 0.5, verify_sha256)
    finally:
        stop.set()
        reader.join()
    assert outcome and set(outcome) == {"mismatch"}


# ----------------------------------------------------------------------------- a full disk

class _FullDisk:
    """A file handle on a disk that fills up after `room` bytes: writes then fail with ENOSPC."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


@pytest.fixture
def disk_full_after(monkeypatch):
    """Make the temp file of the next atomic writes hit a full disk after `room` bytes."""
    import builtins
    real_open = builtins.open

    def install(room, only_sidecars=False):
        def opening(path, mode="r", *args, **kwargs):
            handle = real_open(path, mode, *args, **kwargs)
            hit = str(path).endswith(".tmp") and (not only_sidecars or ".sha256." in str(path))
            return _FullDisk(handle, room) if hit and "w" in mode else handle
        monkeypatch.setattr(safe_io, "open", opening, raising=False)
    return install


def test_disk_full_during_torch_save_is_one_clear_safe_io_error(tmp_path, disk_full_after):
    """torch.save turns the ENOSPC of its writer into a RuntimeError ('[enforce fail at
    inline_container.cc] unexpected pos'); the storage layer must still say the disk is full."""
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"weights": torch.zeros(10)}, target)
    before = target.read_bytes()
    disk_full_after(2000)
    with pytest.raises(SafeIOError) as raised:
        atomic_torch_save({"weights": torch.zeros(100_000)}, target)
    message = str(raised.value)
    assert message.startswith(f"could not write {target}: No space left on device")
    assert str(tmp_path) in message and "free" in message and "untouched" in message
    assert "enforce fail" not in message and "\n" not in message
    assert target.read_bytes() == before and verify_sha256(target)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.sha256"]


def test_disk_full_while_writing_bytes_names_the_full_disk(tmp_path, disk_full_after):
    disk_full_after(10)
    with pytest.raises(SafeIOError, match="No space left on device.*is full"):
        atomic_write_bytes(tmp_path / "results.json", b"x" * 100_000)
    assert os.listdir(tmp_path) == []


def test_disk_full_for_the_sidecar_says_the_file_is_complete_but_unverified(tmp_path, disk_full_after):
    """The sidecar is written after the rename: the message must not claim the old file is kept."""
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"old")
    disk_full_after(0, only_sidecars=True)
    with pytest.raises(SafeIOError) as raised:
        atomic_write_bytes(target, b"new")
    message = str(raised.value)
    assert message.startswith(f"{target} was written, but its SHA-256 sidecar {sidecar_path(target)} "
                              f"could not be: No space left on device: the disk that holds {tmp_path} "
                              f"is full")
    assert "untouched" not in message and "read unverified" in message
    assert target.read_bytes() == b"new" and verify_sha256(target) is False
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_write_fn_error_unrelated_to_io_still_propagates_unchanged(tmp_path):
    def broken(handle):
        raise ValueError("not an I/O problem")
    with pytest.raises(ValueError, match="not an I/O problem"):
        safe_io.atomic_write(tmp_path / "x.bin", broken)
    assert os.listdir(tmp_path) == []
