"""Atomic, verifiable file writes: temp file + fsync + rename, and a SHA-256 sidecar.

`atomic_write(path, write_fn)` never leaves a half-written target: the bytes go to a temporary
file in the same folder, are flushed and fsynced, and only then renamed over the target (an
atomic step on POSIX file systems); the folder is fsynced so the rename survives a power cut.
On any exception the temporary file is removed and the previous target is untouched.

Beside each target a sidecar `<file>.sha256` holds the digest in `sha256sum` format
(`<hex>  <name>`), so `sha256sum -c checkpoint.pt.sha256` works too. Order of the steps: the
old sidecar is removed before the rename and the new one is written after it, so a crash at
any moment leaves either a verified file or a file without a sidecar, never a good file with a
wrong digest. Files without a sidecar (e.g. NVAE's own checkpoints) are read unverified.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

SIDECAR_SUFFIX = ".sha256"
_HASH_CHUNK_BYTES = 1 << 20


class SafeIOError(Exception):
    """A file could not be written or verified; the message says which file and why."""


class UnwritableFolderError(SafeIOError):
    """The folder that should receive a file does not exist or refuses new files."""


class ChecksumMismatchError(SafeIOError):
    """A file's SHA-256 differs from the digest recorded in its sidecar."""


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the SHA-256 of `path` is recorded: `<path>.sha256`."""
    target = Path(path)
    return target.with_name(target.name + SIDECAR_SUFFIX)


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object],
                 record_sha256: bool = True) -> str | None:
    """Write `path` atomically: `write_fn(binary_file)` writes the bytes into a temp file.

    Returns the hex SHA-256 of the written file when `record_sha256` (and writes the sidecar),
    else None. Raises UnwritableFolderError when the folder is missing or refuses files, and
    SafeIOError for I/O failures while writing; exceptions of `write_fn` itself propagate
    unchanged. In every failure case the previous target is untouched and no temp file is left.
    """
    target = Path(path)
    folder = target.parent
    _require_folder(folder, target)
    temp_path = _create_temp_file(folder, target)
    try:
        with open(temp_path, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = sha256_of_file(temp_path) if record_sha256 else None
        if record_sha256:
            sidecar_path(target).unlink(missing_ok=True)
        os.replace(temp_path, target)
        _fsync_folder(folder)
    except OSError as err:
        temp_path.unlink(missing_ok=True)
        raise SafeIOError(f"could not write {target}: {_reason(err)}. The previous version of the "
                          f"file (if any) is untouched.") from err
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    if record_sha256:
        sidecar_text = f"{digest}  {target.name}\n"
        atomic_write(sidecar_path(target), lambda handle: handle.write(sidecar_text.encode()),
                     record_sha256=False)
    return digest


def atomic_write_bytes(path: str | os.PathLike, data: bytes, record_sha256: bool = True) -> str | None:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda handle: handle.write(data), record_sha256)


def atomic_write_text(path: str | os.PathLike, text: str, record_sha256: bool = True) -> str | None:
    """`atomic_write` of a str, encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), record_sha256)


def atomic_torch_save(obj: object, path: str | os.PathLike, record_sha256: bool = True) -> str | None:
    """`atomic_write` of `torch.save(obj)` (zip format)."""
    import torch  # only here, so plain-file writers need no torch
    return atomic_write(path, lambda handle: torch.save(obj, handle), record_sha256)


def read_sidecar_digest(path: str | os.PathLike) -> str | None:
    """The digest recorded beside `path`, or None when there is no sidecar."""
    sidecar = sidecar_path(path)
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    fields = text.split()
    recorded = fields[0].lower() if fields else ""
    if len(recorded) != 64 or any(char not in "0123456789abcdef" for char in recorded):
        raise ChecksumMismatchError(
            f"{sidecar} is not a SHA-256 sidecar (expected '<64 hex digits>  {Path(path).name}', "
            f"found {text[:80]!r}); cannot verify {path}.")
    return recorded


def verify_sha256(path: str | os.PathLike) -> bool:
    """Check `path` against its sidecar: True when verified, False when there is no sidecar.

    Raises ChecksumMismatchError (naming the file and both digests) when they differ.
    """
    expected = read_sidecar_digest(path)
    if expected is None:
        return False
    actual = sha256_of_file(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"SHA-256 mismatch for {path}: {sidecar_path(path).name} records {expected} but the "
            f"file hashes to {actual}; the file is corrupted or was changed after writing.")
    return True


def _require_folder(folder: Path, target: Path) -> None:
    """Raise UnwritableFolderError unless `folder` is an existing directory."""
    if not folder.exists():
        raise UnwritableFolderError(f"cannot write {target}: folder {folder} does not exist.")
    if not folder.is_dir():
        raise UnwritableFolderError(f"cannot write {target}: {folder} is not a folder.")


def _create_temp_file(folder: Path, target: Path) -> Path:
    """Create an empty, uniquely named temp file beside `target` (permissions follow the umask)."""
    temp_path = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise UnwritableFolderError(
            f"cannot write {target}: folder {folder} does not accept new files ({_reason(err)}).") from err
    return temp_path


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; Windows cannot open folders)."""
    if os.name == "nt":
        return
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # some file systems cannot fsync a folder
            raise
    finally:
        os.close(folder_fd)


def _reason(err: OSError) -> str:
    """The human part of an OSError ('Permission denied'), falling back to its text."""
    return err.strerror or str(err)
