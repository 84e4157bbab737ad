"""Wall-clock seconds per named part of a run (training steps, per-epoch tests, checkpoints, ...).

    clock = StageClock()
    with clock.measure("steps"):
        ...
    clock.seconds  # {"steps": 12.3}

A part measured several times accumulates; nested measurements each count their own interval
(an outer part includes its inner ones). `timed_batches` charges the time spent waiting for each
batch of an iterable (data loading) to a part of its own.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from miselbo.storage.safe_io import atomic_write_text


@dataclass
class StageClock:
    """Accumulated seconds per part name, in the order the parts were first measured."""
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Charge the wall time of the block to `name`, also when the block raises."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def timed_batches(self, batches: Iterable, name: str) -> Iterator:
        """The items of `batches`, charging the time each `next()` takes to `name`."""
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.add(name, time.perf_counter() - began)
                return
            self.add(name, time.perf_counter() - began)
            yield item


def summary_table(rows: list[tuple[str, dict[str, float]]], total_seconds: float) -> str:
    """A text table: one line per (stage, {part: seconds}) with its total and parts, then the sum.

    A stage's own total is its part named "total" when present, else the sum of its parts.
    """
    lines = [f"{'stage':<14} {'seconds':>9} {'share':>6}  parts (seconds)"]
    for stage, parts in rows:
        own = parts.get("total", sum(parts.values()))
        detail = ", ".join(f"{name} {value:.1f}" for name, value in parts.items() if name != "total")
        share = own / total_seconds if total_seconds > 0 else 0.0
        lines.append(f"{stage:<14} {own:>9.1f} {share:>6.1%}  {detail}".rstrip())
    lines.append(f"{'all':<14} {total_seconds:>9.1f} {1:>6.1%}")
    return "\n".join(lines)


def training_stage_parts(result_file: Path, wall_seconds: float, began_at: float) -> dict[str, float]:
    """{"total": wall_seconds, steps, data_loading, epoch_tests, checkpoints, final_test} of one
    training stage, the parts read from its train_result.json when that file was written after
    `began_at` (time.time()); a stage that was skipped or resumed by an older version has only
    its total."""
    parts = {"total": wall_seconds}
    if result_file.is_file() and result_file.stat().st_mtime >= began_at:
        recorded = json.loads(result_file.read_text(encoding="utf-8")).get("seconds") or {}
        parts.update({name: float(value) for name, value in recorded.items()})
    return parts


def write_stage_times(path: Path, rows: list[tuple[str, dict[str, float]]],
                      total_seconds: float) -> None:
    """`rows` and the total as JSON: {"stages": {stage: {part: seconds}}, "total": seconds}."""
    payload = {"stages": {stage: parts for stage, parts in rows}, "total": total_seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n", record_sha256=False)
