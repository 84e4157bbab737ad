"""A full disk or a dead TensorBoard writer must not hide the run's own error: the reports say so
in one line on stderr, switch themselves off, never block and never raise from close()."""
import errno
import threading
from types import SimpleNamespace

import pytest

from miselbo.errors import SafeIOError
from miselbo.training.logs import Board, RunLog
from miselbo.training.session import Session, run_session


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullDisk:
    """Stands in for tensorboardX's record file on a full disk."""
    write = flush = close = staticmethod(_disk_full)


@pytest.fixture
def thread_errors(monkeypatch):
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda hook_args: seen.append(hook_args.exc_value))
    return seen


def _events(board):
    return board.writer.file_writer.event_writer


def _within(seconds, action):
    """Run `action` in a daemon thread; False if it had not returned after `seconds` (it blocked)."""
    worker = threading.Thread(target=action, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


def test_a_full_disk_switches_the_board_off_without_a_thread_traceback(tmp_path, capsys, thread_errors):
    board = Board(tmp_path, enabled=True)
    records = _events(board)._ev_writer
    records._py_recordio_writer.close()
    records._py_recordio_writer = _FullDisk()
    board.scalar("a", 1.0, 0)
    _events(board)._worker._next_flush_time = 0  # the writer's thread flushes at its next wake-up
    board.scalar("a", 2.0, 1)
    assert _within(10, board.close)
    assert board.writer is None and thread_errors == []
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    board.scalar("a", 3.0, 2)  # off: nothing happens
    board.close()


def test_a_dead_writer_thread_cannot_block_add_scalar_or_close(tmp_path, capsys):
    board = Board(tmp_path, enabled=True)
    _events(board)._worker.stop()  # the thread is gone, as after an exception in it

    def many_scalars():
        for step in range(100):  # far more than the writer's queue of 10 holds
            board.scalar("a", float(step), step)
        board.close()
    assert _within(10, many_scalars)
    assert board.writer is None
    assert "the event writer's thread has stopped" in capsys.readouterr().err


def test_an_unwritable_log_txt_goes_on_to_stdout_and_closes_quietly(tmp_path, capsys):
    log = RunLog(tmp_path)
    log._file.close()
    log._file = _FullDisk()
    log.info("first %d", 1)
    log.info("second")
    log.close()
    out, err = capsys.readouterr()
    assert "first 1" in out and "second" in out
    assert err.count("log.txt cannot be written") == 1


def test_the_runs_own_storage_error_propagates_when_the_reports_fail_too(tmp_path, capsys):
    board = Board(tmp_path, enabled=True)
    board.writer.close = _disk_full  # the close flush fails like the checkpoint write did
    log = RunLog(tmp_path)
    log._file.close()
    log._file = _FullDisk()

    class Failing:
        @classmethod
        def open(cls, *args):
            session = cls()
            session.board, session.log = board, log
            return session

        def run(self):
            raise SafeIOError("cannot write checkpoint.pt: No space left on device")
        close = Session.close

    with pytest.raises(SafeIOError, match="cannot write checkpoint.pt"):
        run_session(Failing, SimpleNamespace(), SimpleNamespace(rank=0), None, "train.py --cont_training")
    assert "TensorBoard events could not be closed" in capsys.readouterr().err
