"""Where the time of `Ensemble.log_weights` goes: exclusive wall time and operation counts per
named part, measured only while a `SectionTimer` is active (`timing(timer)`); otherwise every
`section(...)` is a no-op context, so the ordinary evaluation pays one global lookup per call.

A section's time excludes the sections opened inside it (the decoder pass calls the posterior
heads from inside its loop over groups: those seconds count as heads, not as decoder). `units`
counts what a section did, in the caller's unit (benchmarks/eval_speed.py turns them into counts
per example). On CUDA pass `synchronize` so that each boundary waits for the queued kernels;
`clock` is wall time (time.perf_counter) unless another is given (time.thread_time, on a shared
machine, counts only this thread's CPU seconds).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

__all__ = ["SectionTimer", "section", "timing"]

_ACTIVE: "SectionTimer | None" = None
_NO_SECTION = nullcontext()


class SectionTimer:
    """Exclusive seconds (`seconds[name]`) and summed units (`units[name]`) per section."""

    def __init__(self, synchronize: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.seconds: dict[str, float] = {}
        self.units: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._synchronize = synchronize
        self._clock = clock
        self._stack: list[list] = []  # [name, start of its current uninterrupted stretch]

    def _now(self) -> float:
        if self._synchronize is not None:
            self._synchronize()
        return self._clock()

    def _charge(self, entry: list, now: float) -> None:
        self.seconds[entry[0]] = self.seconds.get(entry[0], 0.0) + now - entry[1]

    @contextmanager
    def measure(self, name: str, units: float = 0) -> Iterator[None]:
        now = self._now()
        if self._stack:
            self._charge(self._stack[-1], now)  # the enclosing section pauses
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = self._now()
            self._charge(self._stack.pop(), now)
            if self._stack:
                self._stack[-1][1] = now  # the enclosing section resumes
            self.units[name] = self.units.get(name, 0) + units
            self.calls[name] = self.calls.get(name, 0) + 1


def section(name: str, units: float = 0):
    """A context that charges its time to `name` while a timer is active (else does nothing)."""
    timer = _ACTIVE
    if timer is None:
        return _NO_SECTION
    return timer.measure(name, units)


@contextmanager
def timing(timer: SectionTimer) -> Iterator[SectionTimer]:
    """Make `timer` the active one for the duration of the block (not re-entrant across threads)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, timer
    try:
        yield timer
    finally:
        _ACTIVE = previous
