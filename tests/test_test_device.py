"""MISELBO_TEST_DEVICE=cuda where CUDA is absent stops pytest with a usage error naming the
variable (conftest.pytest_configure) instead of skipping every device-aware test.

CUDA is hidden from the child with CUDA_VISIBLE_DEVICES="", so the check runs on GPU machines too.
"""
import os
import subprocess
import sys

from conftest import REPO_ROOT

# one fast device-aware test (it takes the test_device fixture)
SMALL_RUN = ["tests/test_flows.py", "-k", "test_masks_are_non_persistent_buffers_that_follow_to"]


def _pytest_child(device: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MISELBO_TEST_DEVICE=device, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SMALL_RUN],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cuda_requested_without_cuda_fails_loudly_naming_the_variable():
    child = _pytest_child("cuda")
    output = child.stdout + child.stderr
    assert child.returncode == 4, output  # pytest's ExitCode.USAGE_ERROR, not 0 with skips
    assert "MISELBO_TEST_DEVICE=cuda" in output and "torch.cuda.is_available() is False" in output, output
    assert "passed" not in output and "skipped" not in output, output  # stopped before any test


def test_the_same_run_on_the_cpu_passes():
    """The control: only the variable differs, and the selected test runs and passes."""
    child = _pytest_child("cpu")
    output = child.stdout + child.stderr
    assert child.returncode == 0, output
    assert "1 passed" in output and "MISELBO_TEST_DEVICE" not in output, output
