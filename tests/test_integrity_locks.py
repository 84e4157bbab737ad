"""One writer per run folder: a flock on <folder>/run.lock held for the whole run, refused at
start (exit 2, naming the holder) for a second run, taken over when its holder has died."""
import json
import os
import subprocess
import sys
import time

import pytest

from miselbo.errors import UserError
from miselbo.storage.run_lock import LOCK_FILE_NAME, hold_run_lock
from test_train_common import REPO_ROOT, quiet_env, run_args, run_train_script


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with hold_run_lock(tmp_path, "training") as path:
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["purpose"] == "training"
        with pytest.raises(UserError, match=rf"in use by another run: pid {os.getpid()} on host"):
            with hold_run_lock(tmp_path, "evaluation"):
                pass
    assert not (tmp_path / LOCK_FILE_NAME).exists()


def test_a_fresh_lock_prints_no_takeover_note(tmp_path, capsys):
    with hold_run_lock(tmp_path, "training"):
        pass
    assert "took over" not in capsys.readouterr().err


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with hold_run_lock(tmp_path, "training"):
            raise RuntimeError("boom")
    with hold_run_lock(tmp_path, "training"):  # free again
        pass


def test_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from miselbo.storage.run_lock import hold_run_lock\n"
         "with hold_run_lock(sys.argv[1], 'training'):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        with hold_run_lock(tmp_path, "training"):
            pass
    holder.kill()  # SIGKILL: no cleanup runs, the file with its details stays
    holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE_NAME).exists()
    with hold_run_lock(tmp_path, "training"):
        pass
    assert f"took over the lock {tmp_path / LOCK_FILE_NAME} left by pid {holder.pid}" in \
        capsys.readouterr().err


def test_evaluation_into_a_folder_in_use_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    with hold_run_lock(out, "training"):
        completed = subprocess.run([sys.executable, str(REPO_ROOT / "miselbo_eval.py"), "--checkpoints",
                                    str(tmp_path / "absent.pt"), "--save", str(out)], cwd=REPO_ROOT,
                                   env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert f"in use by another run: pid {os.getpid()}" in completed.stderr, completed.stderr


@pytest.mark.slow
def test_two_concurrent_training_runs_into_one_folder_exactly_one_runs(tmp_path):
    argv = run_args(tmp_path, "shared", "--epochs", "2", "--num_train_examples", "128")
    first = run_train_script(argv)
    lock = tmp_path / "eval-shared" / LOCK_FILE_NAME
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    second = run_train_script(argv)
    second_out, second_err = second.communicate(timeout=300)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second_err
    assert f"in use by another run: pid {first.pid}" in second_err and "Traceback" not in second_err
    assert not lock.exists()
    assert "epoch 2/2 done" in first_out and "epoch" not in second_out
