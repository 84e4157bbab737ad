"""SIGINT/SIGTERM in commands that have no natural stopping point (evaluation, export).

Inside `signals_raise()` either signal raises `StopSignal` in the main thread at once (between two
Python operations, so within one tensor operation's time); the caller says what was kept and exits
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). Training has its own handling
(miselbo.training.stop): it finishes the current step and writes a checkpoint first.
"""
from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignal(BaseException):
    """SIGINT or SIGTERM arrived; `exit_code` is 128 + its number. A BaseException, so that
    `except Exception` blocks on the way up do not swallow it."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.name = signal.Signals(signal_number).name
        self.exit_code = 128 + signal_number


def _raise(signal_number, frame) -> None:
    raise StopSignal(signal_number)


@contextlib.contextmanager
def signals_raise():
    """Turn SIGINT and SIGTERM into StopSignal for the block (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _raise) for number in HANDLED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
