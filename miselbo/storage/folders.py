"""Output folders a run creates are removed again when the run fails before writing anything into them.

    with removed_if_left_empty(save_dir):
        save_dir.mkdir(parents=True)
        ...work that may raise...

If the body raises (a refusal, a failure, Ctrl-C), every folder on the path to `save_dir` that did not
exist on entry is removed again, deepest first, as long as it is empty; a folder holding anything (a
checkpoint, a log) is kept, and so are its parents.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


@contextlib.contextmanager
def removed_if_left_empty(folder: str | os.PathLike | None) -> Iterator[None]:
    """On an exception in the body, remove the folders this call found missing if they are empty."""
    created = _missing_folders(Path(folder).absolute()) if folder is not None else []
    try:
        yield
    except BaseException:
        for path in created:
            try:
                path.rmdir()  # only succeeds on an empty folder
            except OSError:
                break
        raise
