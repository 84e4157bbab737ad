"""The checks of the numeric flags that several entry points share (train.py, miselbo_eval.py, the
pipeline): one rule per kind of value, so that a seed or a sample count is refused with the same
range and the same message wherever it is typed. Each check returns the value when it is fine and
raises UserError (exit 2) naming the flag otherwise. A value that is not a whole number (a manifest's
2.7, true, "abc" or null) is refused as well, never rounded: bools are not counts.

    seed          --seed, --seeds           0 .. MAX_SEED (NumPy's seed range, which torch accepts too)
    count         sample, example, batch, process and member counts: a whole number >= 1
    optional_count  the same, or None (not given)
"""
from __future__ import annotations

import json

from miselbo.errors import UserError

MAX_SEED = 2 ** 32 - 1  # NumPy's seed range; train.py's data order and the evaluation's draws use it

__all__ = ["MAX_SEED", "count", "is_whole_number", "optional_count", "seed", "whole_number"]


def is_whole_number(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value, as_json: bool) -> str:
    if as_json:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    return repr(value)


def whole_number(flag: str, value, low: int = 1, high: int | None = None, as_json: bool = False) -> int:
    """`value` if it is a whole number in [low, high] (high None: no upper bound), else a UserError
    naming `flag`. as_json: show a refused value as JSON spells it (for values read from a file)."""
    if is_whole_number(value) and value >= low and (high is None or value <= high):
        return value
    shown = _shown(value, as_json)
    if high is None:
        raise UserError(f"{flag} must be a whole number >= {low}, got {shown}.")
    if not is_whole_number(value):
        raise UserError(f"{flag} must be a whole number in {low} .. {high}, got {shown}.")
    raise UserError(f"{flag} must lie in {low} .. {high}, got {shown}.")


def seed(flag: str, value, as_json: bool = False) -> int:
    """A seed: a whole number in 0 .. MAX_SEED."""
    return whole_number(flag, value, 0, MAX_SEED, as_json)


def count(flag: str, value, as_json: bool = False) -> int:
    """A count of samples, examples, batch rows, processes or members: a whole number >= 1."""
    return whole_number(flag, value, 1, None, as_json)


def optional_count(flag: str, value, as_json: bool = False) -> int | None:
    """None (not given), or a count."""
    return None if value is None else count(flag, value, as_json)


def count_argument(text: str) -> int:
    """argparse `type=` for a count flag of a script (the benchmarks): the same rule as `count`,
    reported by argparse as `error: argument --flag: ...` with exit 2."""
    return _argument(text, lambda value: count("the value", value))


def seed_argument(text: str) -> int:
    """argparse `type=` for a seed flag of a script: the same range as `seed`."""
    return _argument(text, lambda value: seed("the value", value))


def _argument(text: str, check) -> int:
    import argparse
    try:
        return check(int(text))
    except (ValueError, UserError) as err:
        raise argparse.ArgumentTypeError(str(err) if isinstance(err, UserError) else
                                         f"a whole number is needed, got {text!r}") from None
