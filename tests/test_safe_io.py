"""Atomic writes and SHA-256 sidecars, with every fault provoked for real."""
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from miselbo.storage import safe_io
from miselbo.errors import SafeIOError
from miselbo.storage.safe_io import (ChecksumMismatchError, UnwritableFolderError, atomic_torch_save,
                                     atomic_write, atomic_write_bytes, atomic_write_text, sha256_of_file,
                                     sidecar_path, verify_sha256)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_entries(folder):
    return sorted(os.listdir(folder))


def test_write_records_the_sha256_of_the_bytes_in_sha256sum_format(tmp_path):
    target = tmp_path / "results.json"
    data = b'{"miselbo": -80.5}\n' * 1000
    digest = atomic_write_bytes(target, data)
    expected = hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data
    assert digest == expected
    assert sidecar_path(target).read_text() == f"{expected}  results.json\n"
    assert verify_sha256(target) is True
    assert folder_entries(tmp_path) == ["results.json", "results.json.sha256"]


def test_sidecar_passes_the_system_sha256sum_check(tmp_path):
    tool = shutil.which("sha256sum")
    if tool is None:
        pytest.skip("sha256sum is not installed; the format is also checked with hashlib above")
    atomic_write_text(tmp_path / "log.txt", "hello\n")
    result = subprocess.run([tool, "-c", "log.txt.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_overwrite_replaces_content_and_sidecar(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert verify_sha256(target)
    assert folder_entries(tmp_path) == ["a.bin", "a.bin.sha256"]


def test_torch_save_round_trip(tmp_path):
    target = tmp_path / "t.pt"
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7)}
    atomic_torch_save(tensors, target)
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["w"], tensors["w"]) and loaded["step"].item() == 7
    assert sha256_of_file(target) == hashlib.sha256(target.read_bytes()).hexdigest()


def test_file_mode_follows_the_umask(tmp_path):
    old_umask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "m.bin", b"x")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o640


def _half_then_raise(error):
    def write_fn(handle):
        handle.write(b"N" * 5000)
        raise error
    return write_fn


def test_write_fn_failure_half_way_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    atomic_write_bytes(target, b"previous good version")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, _half_then_raise(RuntimeError("boom")))
    assert target.read_bytes() == b"previous good version"
    assert verify_sha256(target)
    assert folder_entries(tmp_path) == ["ckpt.bin", "ckpt.bin.sha256"]


def test_io_error_half_way_is_reported_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    atomic_write_bytes(target, b"previous good version")
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SafeIOError) as caught:
        atomic_write(target, _half_then_raise(disk_full))
    message = str(caught.value)
    assert str(target) in message and "No space left on device" in message and "untouched" in message
    assert target.read_bytes() == b"previous good version"
    assert folder_entries(tmp_path) == ["ckpt.bin", "ckpt.bin.sha256"]


def test_interrupt_half_way_removes_the_temp_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, _half_then_raise(KeyboardInterrupt()))
    assert folder_entries(tmp_path) == []


def make_folder_refuse_new_files(folder, monkeypatch):
    """Make `folder` refuse new files: chmod when that works, else (root) make os.open fail there.

    Returns how it was done, so the test reports which path it exercised.
    """
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return "chmod"
    probe.unlink()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(folder) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(safe_io.os, "open", refusing_open)
    return "patched os.open (running as root, chmod does not stop writes)"


def test_unwritable_folder_names_the_folder_and_why(tmp_path, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    target = folder / "ckpt.bin"
    atomic_write_bytes(target, b"previous good version")
    how = make_folder_refuse_new_files(folder, monkeypatch)
    try:
        with pytest.raises(UnwritableFolderError) as caught:
            atomic_write_bytes(target, b"new")
        monkeypatch.undo()
    finally:
        folder.chmod(0o755)
    message = str(caught.value)
    assert str(folder) in message and "Permission denied" in message, how
    assert target.read_bytes() == b"previous good version"
    assert verify_sha256(target)
    assert folder_entries(folder) == ["ckpt.bin", "ckpt.bin.sha256"]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UnwritableFolderError, match="does not exist") as caught:
        atomic_write_bytes(tmp_path / "nope" / "x.bin", b"x")
    assert str(tmp_path / "nope") in str(caught.value)


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, bytes(range(256)) * 10)
    recorded = hashlib.sha256(target.read_bytes()).hexdigest()
    corrupted = bytearray(target.read_bytes())
    corrupted[1234] ^= 0x01
    target.write_bytes(bytes(corrupted))
    actual = hashlib.sha256(bytes(corrupted)).hexdigest()
    with pytest.raises(ChecksumMismatchError) as caught:
        verify_sha256(target)
    message = str(caught.value)
    assert str(target) in message and recorded in message and actual in message
    assert "the file is corrupted or was changed after writing" in message


def test_file_without_sidecar_is_not_verified(tmp_path):
    target = tmp_path / "nvae_checkpoint.pt"
    target.write_bytes(b"anything")
    assert verify_sha256(target) is False


def test_malformed_sidecar_is_an_error(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"x")
    sidecar_path(target).write_text("not a digest\n")
    with pytest.raises(ChecksumMismatchError, match="is not a SHA-256 sidecar"):
        verify_sha256(target)


_WRITER_LOOP = """
import sys
from miselbo.storage.safe_io import atomic_write_bytes
target = sys.argv[1]
step = 0
print("ready", flush=True)
while True:
    step += 1
    atomic_write_bytes(target, b"%08d" % step * 250_000)
"""


def test_sigkill_during_repeated_writes_leaves_a_good_file_and_never_a_wrong_digest(tmp_path):
    """SIGKILL at random moments of a 2 MB write loop: the file is always one complete version,
    and its sidecar is either absent or right (never a digest of another version)."""
    target = tmp_path / "checkpoint.pt"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    delays = [0.013 * k for k in range(1, 25)]
    unverified = 0
    for delay in delays:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER_LOOP, str(target)], env=env,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if not target.exists():
            continue
        unverified += not verify_sha256(target)  # raises on a mismatch
        content = target.read_bytes()
        assert len(content) == 2_000_000 and content == content[:8] * 250_000
    assert target.exists()
