"""Spawned processes (evaluation workers, NVAE-style training ranks) die with the process that
started them: a SIGKILLed miselbo_eval.py leaves no worker computing on."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miselbo.runtime.parent_death import follow_parent
from process_helpers import spawned_children

REPO_ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # a zombie has finished


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_evaluation_workers_end_when_the_evaluation_is_killed(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "miselbo_eval.py"), "--world_size", "2", "--num_iw_samples", "500",
               "--num_examples", "400", "--save", str(tmp_path / "out")]
    env = dict(os.environ, CI="true", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers = []
        while len(workers) < 2:
            assert process.poll() is None, "the evaluation ended before its workers could be seen"
            assert time.monotonic() < deadline, "no workers appeared"
            time.sleep(0.2)
            workers = spawned_children(process.pid)
        time.sleep(1.0)
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived the killed evaluation"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in spawned_children(process.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_parent_that_is_already_gone_ends_the_child_at_once():
    with pytest.raises(SystemExit) as ended:
        follow_parent(os.getppid() + 10**7, signal.SIGTERM)  # not our parent: as if it had died
    assert ended.value.code == 128 + signal.SIGTERM
    follow_parent(os.getppid(), 0)  # our real parent: nothing happens (signal 0 clears the request)
