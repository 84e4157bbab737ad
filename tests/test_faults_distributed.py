"""A diverging two-process (gloo) run stops like a single-process one: exit 3, the non-finite place
named, the last good checkpoint kept, and no hang."""
import hashlib

import pytest

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
