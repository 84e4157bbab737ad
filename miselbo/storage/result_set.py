"""All outputs of one evaluation run replace those of the previous run together, never mixed.

    with ResultSet(folder) as outputs:
        write_json(outputs.path("results.json"), results)   # written into a staging folder
        ...
    # on leaving the block: the previous run's outputs go, then the new ones move in

Files are first written (atomically, with their sidecars) into `<folder>/.staging-<run id>/`. A
crash or a full disk while writing leaves the previous outputs untouched; the staging folder is
removed on any exception, and leftovers of a killed run are removed by the next run.

Commit order: (1) the index `outputs.json` of the previous run is removed, (2) every file it lists
(or, for folders written before this index existed, the `legacy_names`) is removed, (3) the new
files move in by rename, (4) the new index is renamed in last. A crash at any moment therefore
leaves either only old files or only new files (possibly not all of them, and then no index):
never a mix. `outputs.json` records the run id, the time and each file's name, so a complete set
is recognisable by its index.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from miselbo.storage.safe_io import SIDECAR_SUFFIX, atomic_write_text

INDEX_FILE_NAME = "outputs.json"
STAGING_PREFIX = ".staging-"


class ResultSet:
    """A staged set of output files for `folder` (which must exist); see the module docstring."""

    def __init__(self, folder: str | os.PathLike, legacy_names: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        self.staging = self.folder / f"{STAGING_PREFIX}{self.run_id}"
        self.legacy_names = legacy_names

    def __enter__(self) -> "ResultSet":
        remove_stale_staging(self.folder)
        self.staging.mkdir()
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file `name` (a plain file name) during the run."""
        if Path(name).name != name or name.startswith(STAGING_PREFIX) or name == INDEX_FILE_NAME:
            raise ValueError(f"ResultSet.path: {name!r} is not a plain output file name")
        return self.staging / name

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _commit(self) -> None:
        names = sorted(path.name for path in self.staging.iterdir())
        index = {"run_id": self.run_id, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "files": [name for name in names if not name.endswith(SIDECAR_SUFFIX)]}
        atomic_write_text(self.staging / INDEX_FILE_NAME, json.dumps(index, indent=2) + "\n",
                          record_sha256=False)
        previous = previous_outputs(self.folder, self.legacy_names)
        (self.folder / INDEX_FILE_NAME).unlink(missing_ok=True)  # (1)
        for name in previous:  # (2)
            (self.folder / name).unlink(missing_ok=True)
        for name in names:  # (3), sidecars with their files
            os.replace(self.staging / name, self.folder / name)
        os.replace(self.staging / INDEX_FILE_NAME, self.folder / INDEX_FILE_NAME)  # (4)


def previous_outputs(folder: Path, legacy_names: tuple[str, ...] = ()) -> list[str]:
    """Names of the previous run's outputs in `folder` (with sidecars): its index's list, else
    `legacy_names`, keeping only plain names that exist."""
    names = list(legacy_names)
    try:
        index = json.loads((folder / INDEX_FILE_NAME).read_text(encoding="utf-8"))
        names += [str(name) for name in index.get("files", [])]
    except (OSError, ValueError, AttributeError):
        pass
    plain = {name for name in names if Path(name).name == name and name not in ("", ".", "..")}
    with_sidecars = plain | {name + SIDECAR_SUFFIX for name in plain}
    return sorted(name for name in with_sidecars if (folder / name).is_file())


def remove_stale_staging(folder: Path) -> None:
    """Remove staging folders that killed runs left behind (the caller holds the folder's lock)."""
    for path in folder.glob(f"{STAGING_PREFIX}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
