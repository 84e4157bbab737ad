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
Concurrent writers of one target are serialised (an exclusive flock on the folder around the
"remove sidecar, rename, write sidecar" steps), so the sidecar always describes the file beside it.

A sidecar belongs to the file, not to the path that names it: `regular_file(path)` follows
symlinks to the real file (and refuses folders, pipes, devices and sockets, each with its own
message) and verification uses the sidecar next to that real file. `read_verified_bytes` hashes
exactly the bytes it returns, so a file swapped between check and use cannot slip through.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from miselbo.errors import SafeIOError

SIDECAR_SUFFIX = ".sha256"
_HASH_CHUNK_BYTES = 1 << 20
_MAX_SIDECAR_BYTES = 4096  # a sidecar is one line: 64 hex digits, two spaces, a file name


class UnwritableFolderError(SafeIOError):
    """The folder that should receive a file does not exist or refuses new files."""


class ChecksumMismatchError(SafeIOError):
    """A file's SHA-256 differs from the digest recorded in its sidecar."""


class NotARegularFileError(SafeIOError):
    """A path names a folder, pipe, device or socket where a regular file is needed."""


_NOT_REGULAR_KINDS = (
    (stat.S_ISDIR, "a folder", "pass a file inside it"),
    (stat.S_ISFIFO, "a named pipe (FIFO)", "reading it would wait for a writer forever; save the "
                                           "data to a regular file first"),
    (stat.S_ISCHR, "a character device", "pass a regular file"),
    (stat.S_ISBLK, "a block device", "pass a regular file"),
    (stat.S_ISSOCK, "a socket", "pass a regular file"),
)


def regular_file(path: str | os.PathLike) -> Path:
    """The real path of `path` (symlinks followed), which must be an existing regular file.

    Raises FileNotFoundError for a missing file or a dangling link, NotARegularFileError (naming
    the kind) for folders, pipes, devices and sockets.
    """
    real = Path(os.path.realpath(path))
    mode = os.stat(real).st_mode  # FileNotFoundError for a dangling link too
    if stat.S_ISREG(mode):
        return real
    via = f" (the symlink {path} points to {real})" if str(real) != os.path.abspath(path) else ""
    for is_kind, kind, advice in _NOT_REGULAR_KINDS:
        if is_kind(mode):
            raise NotARegularFileError(f"{path} is {kind}, not a regular file{via}; {advice}.")
    raise NotARegularFileError(f"{path} is not a regular file{via} (mode {oct(mode)}).")


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
        with _folder_write_lock(folder) if record_sha256 else contextlib.nullcontext():
            _replace_with_sidecar(temp_path, target, digest)
    except OSError as err:
        temp_path.unlink(missing_ok=True)
        raise SafeIOError(f"could not write {target}: {_reason(err)}. The previous version of the "
                          f"file (if any) is untouched.") from err
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return digest


def _replace_with_sidecar(temp_path: Path, target: Path, digest: str | None) -> None:
    """Old sidecar out, file renamed in, new sidecar written (when `digest` is given)."""
    if digest is not None:
        sidecar_path(target).unlink(missing_ok=True)
    os.replace(temp_path, target)
    _fsync_folder(target.parent)
    if digest is not None:
        sidecar_text = f"{digest}  {target.name}\n"
        atomic_write(sidecar_path(target), lambda handle: handle.write(sidecar_text.encode()),
                     record_sha256=False)


@contextlib.contextmanager
def _folder_write_lock(folder: Path):
    """Exclusive flock on the folder itself, so two writers' file/sidecar steps never interleave.

    Where folders cannot be locked (some network file systems) the block runs unlocked.
    """
    try:
        folder_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(folder_fd)  # closing releases the lock


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
        regular_file(sidecar)  # a pipe or device as sidecar would block or never end
        with open(sidecar, "rb") as handle:
            text = handle.read(_MAX_SIDECAR_BYTES).decode("utf-8", errors="replace")
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
    """Check the real file behind `path` against its sidecar(s): True when verified, False when
    there is none. The sidecar next to the real file counts; one next to a symlink is checked too.

    Raises ChecksumMismatchError (naming the file and both digests) when they differ, and
    NotARegularFileError when `path` is not a regular file.
    """
    real = regular_file(path)
    return _check_digest(path, real, sha256_of_file(real))


def read_verified_bytes(path: str | os.PathLike) -> tuple[bytes, Path, bool]:
    """(the bytes of the real file behind `path`, that real path, whether a sidecar verified them).

    The digest is taken of the very bytes returned. Raises like verify_sha256.
    """
    real = regular_file(path)
    with open(real, "rb") as handle:
        data = handle.read()
    return data, real, _check_digest(path, real, hashlib.sha256(data).hexdigest())


def _check_digest(path, real: Path, actual: str) -> bool:
    """Compare `actual` with the sidecar of `real` (and of the link `path`, if it has its own)."""
    checked = False
    candidates = [real] + ([Path(path)] if Path(path).is_symlink() else [])
    for named in candidates:
        expected = read_sidecar_digest(named)
        if expected is None:
            continue
        if actual != expected:
            raise ChecksumMismatchError(
                f"SHA-256 mismatch for {path}{_via(path, real)}: {sidecar_path(named)} records "
                f"{expected} but the file hashes to {actual}; the file is corrupted or was changed "
                f"after writing.")
        checked = True
    return checked


def _via(path, real: Path) -> str:
    return f" (a symlink to {real})" if Path(path).is_symlink() else ""


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
