"""Shared test fixtures: where the golden vectors live and which device to test on.

Set MISELBO_TEST_DEVICE=cuda to re-run the device-aware tests on a GPU; where CUDA is absent that
setting stops the run with a usage error (exit 4) instead of skipping those tests.
The golden vectors (outputs of the public NVAE implementation, see tests/golden/README.md) live in
tests/golden; set MISELBO_GOLDEN_DIR to read them from another folder instead.
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("MISELBO_GOLDEN_DIR", REPO_ROOT / "tests" / "golden"))


def golden_case_dir(name: str) -> Path:
    """Folder of one golden configuration; fails (never skips) if its files are absent.

    The vectors ship with the repository, so a missing file means a broken checkout or a wrong
    MISELBO_GOLDEN_DIR, not an optional extra.
    """
    folder = GOLDEN_DIR / name
    missing = [f for f in ("checkpoint.pt", "golden.pt", "args.json") if not (folder / f).is_file()]
    if missing:
        pytest.fail(f"golden vectors {missing} not found in {folder} (check MISELBO_GOLDEN_DIR)")
    return folder


def _cuda_requested_but_absent() -> str | None:
    """The message for MISELBO_TEST_DEVICE=cuda[...] on a machine without CUDA, else None."""
    name = os.environ.get("MISELBO_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        return (f"MISELBO_TEST_DEVICE={name} asks for CUDA, but torch.cuda.is_available() is False "
                f"on this machine: unset MISELBO_TEST_DEVICE (or set it to cpu) to test on the CPU")
    return None


def pytest_configure(config):
    """Requesting CUDA where there is none stops the whole run before collection (exit 4), so a
    GPU run cannot pass by skipping the device tests."""
    message = _cuda_requested_but_absent()
    if message is not None:
        raise pytest.UsageError(message)


@pytest.fixture
def test_device() -> torch.device:
    message = _cuda_requested_but_absent()
    if message is not None:  # only if pytest_configure was bypassed
        pytest.fail(message)
    return torch.device(os.environ.get("MISELBO_TEST_DEVICE", "cpu"))


@pytest.fixture
def pipe_path():
    """A /dev/fd/N path of an anonymous pipe holding a few bytes, as the shell's
    `<(cat checkpoint.pt)` passes it."""
    if not os.path.isdir("/dev/fd"):
        pytest.skip("no /dev/fd on this system")
    read_end, write_end = os.pipe()
    os.write(write_end, b"not a checkpoint")
    yield f"/dev/fd/{read_end}"
    os.close(read_end)
    os.close(write_end)
