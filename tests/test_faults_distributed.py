"""A diverging two-process (gloo) run stops like a single-process one: exit 3, the non-finite place
named, the last good checkpoint kept, and no hang; a killed rank is named with the resume command."""
import hashlib
import os
import signal
import time

import pytest

from process_helpers import spawned_children
from test_train_common import run_args, run_train_script

pytestmark = pytest.mark.slow
PAIR = ("--batch_size", "8", "--num_process_per_node", "2")


def test_a_diverging_two_process_run_stops_with_exit_3_and_keeps_the_good_checkpoint(tmp_path):
    good = run_train_script(run_args(tmp_path, "div2", "--epochs", "1", *PAIR))
    _, err = good.communicate(timeout=240)
    assert good.returncode == 0, err
    checkpoint_path = tmp_path / "eval-div2" / "checkpoint.pt"
    before = hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()
    diverging = run_train_script(run_args(tmp_path, "div2", "--epochs", "3", "--learning_rate", "30",
                                          "--cont_training", *PAIR))
    _, err = diverging.communicate(timeout=240)  # a TimeoutExpired here is the hang this test guards
    assert diverging.returncode == 3, err
    assert "training stopped:" in err and "the first value that went non-finite:" in err, err
    assert "no checkpoint was written" in err and "Traceback" not in err, err
    assert hashlib.sha256(checkpoint_path.read_bytes()).hexdigest() == before


def test_a_killed_rank_is_named_with_the_resume_command_and_no_traceback(tmp_path):
    """SIGKILL one of two spawned ranks: the launcher names it and prints the --cont_training command;
    the surviving rank's gloo error is no traceback."""
    process = run_train_script(run_args(tmp_path, "kill", "--epochs", "50", "--num_train_examples", "256", *PAIR))
    try:
        checkpoint = tmp_path / "eval-kill" / "checkpoint.pt"
        deadline = time.monotonic() + 240
        while not checkpoint.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        ranks = spawned_children(process.pid)
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGKILL)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGKILL, err
    assert "was killed by SIGKILL" in err and "--cont_training" in err, err
    assert "Traceback" not in err, err
