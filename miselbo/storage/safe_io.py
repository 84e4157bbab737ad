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
Readers take the same flock shared while they open the file and read its sidecar (then read the
bytes unlocked: the open file cannot change, renames only replace the name), so a reader racing
a writer never pairs a new file with an old sidecar; where folders cannot be locked, a mismatch
is read again whenever the file or its sidecar was replaced in the meantime. A full disk is
reported as such, also when torch.save wraps the ENOSPC in its own RuntimeError.

A sidecar belongs to the file, not to the path that names it: `regular_file(path)` follows
symlinks to the real file (and refuses folders, pipes, devices and sockets, each with its own
message; a /dev/fd/N pipe, as `<(cat file)` passes, is refused as a pipe) and verification uses
the sidecar next to that real file. `read_verified_bytes` hashes
exactly the bytes it returns, so a file swapped between check and use cannot slip through.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import time
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
_PIPE_ADVICE = ("its bytes can be read only once and no SHA-256 sidecar can vouch for them; pass the "
                "file itself (e.g. checkpoint.pt rather than <(cat checkpoint.pt))")


def regular_file(path: str | os.PathLike) -> Path:
    """The real path of `path` (symlinks followed), which must be an existing regular file.

    Raises FileNotFoundError for a missing file or a dangling link, NotARegularFileError (naming
    the kind) for folders, pipes, devices and sockets. A /dev/fd/N or /proc/<pid>/fd/N path (what
    the shell passes for `<(command)`) leads to no real path; it is judged by what it opens: an
    anonymous pipe is refused as a pipe, an open regular file is returned as given.
    """
    real = Path(os.path.realpath(path))
    try:
        mode = os.stat(real).st_mode  # FileNotFoundError for a dangling link too
    except FileNotFoundError:
        mode = os.stat(path).st_mode  # a magic link such as /dev/fd/63 -> 'pipe:[1234]' still opens
        if stat.S_ISREG(mode):
            return Path(path)
        if stat.S_ISFIFO(mode):
            raise NotARegularFileError(f"{path} is a pipe, not a regular file (the shell passes "
                                       f"<(command) as such a pipe): {_PIPE_ADVICE}.") from None
        real = Path(path)
    if stat.S_ISREG(mode):
        return real
    via = f" (the symlink {path} points to {real})" if str(real) != os.path.abspath(path) else ""
    kind, advice = _not_regular_kind(mode)
    raise NotARegularFileError(f"{path} is {kind}, not a regular file{via}; {advice}.")


def _not_regular_kind(mode: int) -> tuple[str, str]:
    """(what a non-regular file is, what to do instead) for an st_mode."""
    for is_kind, kind, advice in _NOT_REGULAR_KINDS:
        if is_kind(mode):
            return kind, advice
    return f"an unknown kind of file (mode {oct(mode)})", "pass a regular file"


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the SHA-256 of `path` is recorded: `<path>.sha256`."""
    target = Path(path)
    return target.with_name(target.name + SIDECAR_SUFFIX)


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as handle:
        return _sha256_of_handle(handle)


def _sha256_of_handle(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
        digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object],
                 record_sha256: bool = True) -> str | None:
    """Write `path` atomically: `write_fn(binary_file)` writes the bytes into a temp file.

    Returns the hex SHA-256 of the written file when `record_sha256` (and writes the sidecar),
    else None. Raises UnwritableFolderError when the folder is missing or refuses files, and
    SafeIOError for I/O failures while writing, a full disk included (also when `write_fn` wraps
    the OSError in its own exception, as torch.save does); other exceptions of `write_fn` propagate
    unchanged. In every failure case the previous target is untouched and no temp file is left.
    """
    target = Path(path)
    folder = target.parent
    _require_folder(folder, target)
    if record_sha256:
        _require_sidecar_slot(target)
    temp_path = _create_temp_file(folder, target)
    try:
        with open(temp_path, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = sha256_of_file(temp_path) if record_sha256 else None
        with _folder_lock(folder, fcntl.LOCK_EX) if record_sha256 else contextlib.nullcontext():
            _replace_with_sidecar(temp_path, target, digest)
    except OSError as err:
        temp_path.unlink(missing_ok=True)
        raise SafeIOError(_write_failure(target, err)) from err
    except SafeIOError:  # the sidecar could not be written; the message says so
        temp_path.unlink(missing_ok=True)
        raise
    except BaseException as err:
        temp_path.unlink(missing_ok=True)
        storage_error = _storage_error_behind(err) if isinstance(err, Exception) else None
        if storage_error is not None:
            raise SafeIOError(_write_failure(target, storage_error)) from err
        raise
    return digest


def _write_failure(target: Path, err: OSError) -> str:
    """The one-paragraph message for an OSError while writing `target`."""
    return (f"could not write {target}: {_failure_reason(target, err)}. The previous version of the "
            f"file (if any) is untouched.")


def _failure_reason(target: Path, err: OSError) -> str:
    """Why writing `target` failed; a full disk (or quota) says which disk, its free space, what to do."""
    reason = _reason(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        whose = "the disk" if err.errno == errno.ENOSPC else "your quota on the disk"
        reason += (f": {whose} that holds {target.parent} is full ({_free_space(target.parent)} "
                   f"free). Free some space there, or save to another disk, and run again")
    return reason


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


def _storage_error_behind(err: BaseException) -> OSError | None:
    """The OSError of a failed write (disk full, quota, I/O error...) that `err` was raised while
    handling, e.g. torch.save's '[enforce fail at inline_container.cc] unexpected pos' after ENOSPC."""
    seen = set()
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRNOS:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


def _require_sidecar_slot(target: Path) -> None:
    """Refuse to write `target` when its sidecar's name is taken by a folder (which no save can
    replace), before any byte is written."""
    sidecar = sidecar_path(target)
    try:
        mode = os.lstat(sidecar).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        raise NotARegularFileError(
            f"cannot save {target}: {sidecar} is a folder, not a checksum file, and that name is "
            f"where the save records the file's SHA-256. Remove or rename that folder and save "
            f"again; {target} was not changed.")


def _replace_with_sidecar(temp_path: Path, target: Path, digest: str | None) -> None:
    """Old sidecar out, file renamed in, new sidecar written (when `digest` is given)."""
    if digest is not None:
        sidecar_path(target).unlink(missing_ok=True)
    os.replace(temp_path, target)
    _fsync_folder(target.parent)
    if digest is not None:
        sidecar_text = f"{digest}  {target.name}\n"
        try:
            atomic_write(sidecar_path(target), lambda handle: handle.write(sidecar_text.encode()),
                         record_sha256=False)
        except SafeIOError as err:
            cause = err.__cause__
            reason = (_failure_reason(target, cause) if isinstance(cause, OSError)
                      else str(err).rstrip("."))
            raise SafeIOError(
                f"{target} was written, but its SHA-256 sidecar {sidecar_path(target)} could not be: "
                f"{reason}. The file is complete and is read unverified until a save records its "
                f"digest.") from err


@contextlib.contextmanager
def _folder_lock(folder: Path, operation: int):
    """flock on the folder itself: writers take it exclusive around "remove sidecar, rename, write
    sidecar", readers shared around "open the file, read its sidecar", so no reader pairs a file
    with another version's sidecar. Where folders cannot be locked (some network file systems)
    the block runs unlocked (readers then re-check a mismatch, see `_read_checked`).
    """
    try:
        folder_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(folder_fd, operation)
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
    except NotARegularFileError:
        kind, _advice = _not_regular_kind(os.stat(sidecar).st_mode)
        raise NotARegularFileError(
            f"{sidecar} is {kind}, but that name should hold the SHA-256 of {path}: it is not a "
            f"checksum file, so {path} cannot be verified. Remove or rename it and run again: the "
            f"file is then read unverified, and its next save writes a proper sidecar.") from None
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
    _data, _real, verified = _read_checked(path, keep_bytes=False)
    return verified


def read_verified_bytes(path: str | os.PathLike) -> tuple[bytes, Path, bool]:
    """(the bytes of the real file behind `path`, that real path, whether a sidecar verified them).

    The digest is taken of the very bytes returned. Raises like verify_sha256.
    """
    return _read_checked(path, keep_bytes=True)


_READ_ATTEMPTS = 20  # a file replaced this often while one reader looks is being rewritten nonstop


def _read_checked(path, keep_bytes: bool) -> tuple[bytes | None, Path, bool]:
    """(the bytes of the real file behind `path` when `keep_bytes`, else None; that real path;
    whether a sidecar verified those very bytes).

    The file is opened and its sidecar(s) read under a shared lock on their folder(s); writers hold
    it exclusively from removing the old sidecar to writing the new one, so the file and sidecar
    read belong together. Where folders cannot be locked, a mismatch is read again when the file
    or a sidecar was replaced meanwhile; a mismatch of an unchanged pair is damage and is raised
    at once as ChecksumMismatchError.
    """
    attempt = 0
    while True:
        attempt += 1
        real = regular_file(path)
        named = [real] + ([Path(path)] if Path(path).is_symlink() and Path(path) != real else [])
        with contextlib.ExitStack() as locks:
            for folder in sorted({str(candidate.parent) for candidate in named}):
                locks.enter_context(_folder_lock(Path(folder), fcntl.LOCK_SH))
            handle = open(real, "rb")
            try:
                recorded = [(candidate, read_sidecar_digest(candidate)) for candidate in named]
            except BaseException:
                handle.close()
                raise
        with handle:
            data = handle.read() if keep_bytes else None
            actual = hashlib.sha256(data).hexdigest() if keep_bytes else _sha256_of_handle(handle)
            wrong = [(candidate, expected) for candidate, expected in recorded
                     if expected is not None and expected != actual]
            if not wrong:
                return data, real, any(expected is not None for _candidate, expected in recorded)
            if attempt < _READ_ATTEMPTS and _replaced_meanwhile(handle, real, recorded):
                time.sleep(0.001 * attempt)
                continue
        candidate, expected = wrong[0]
        raise ChecksumMismatchError(
            f"SHA-256 mismatch for {path}{_via(path, real)}: {sidecar_path(candidate)} records "
            f"{expected} but the file hashes to {actual}; the file is corrupted or was changed "
            f"after writing.")


def _replaced_meanwhile(handle: BinaryIO, real: Path, recorded: list[tuple[Path, str | None]]) -> bool:
    """Whether a writer replaced the file read through `handle` or one of its sidecars since."""
    try:
        now = os.stat(real)
        read = os.fstat(handle.fileno())
        if (now.st_dev, now.st_ino) != (read.st_dev, read.st_ino):
            return True
        return any(read_sidecar_digest(candidate) != expected for candidate, expected in recorded)
    except (OSError, SafeIOError):
        return True  # a file or sidecar missing or half-replaced right now: a writer is busy


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
