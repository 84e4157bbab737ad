"""Shared test fixtures: where the golden vectors live and which device to test on.

Set MISELBO_TEST_DEVICE=cuda to re-run the device-aware tests on a GPU.
Set MISELBO_GOLDEN_DIR to point at the golden vectors if ../shared/golden is not beside the repo.
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("MISELBO_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def golden_case_dir(name: str) -> Path:
    """Folder of one golden configuration; skips locally, fails under CI, if it is absent."""
    folder = GOLDEN_DIR / name
    if not (folder / "golden.pt").is_file():
        message = f"golden vectors not found at {folder} (set MISELBO_GOLDEN_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture
def test_device() -> torch.device:
    name = os.environ.get("MISELBO_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("MISELBO_TEST_DEVICE asks for CUDA but none is available")
    return torch.device(name)
