"""Argument types that check a value's range while the command line is parsed, before any work.

Each factory returns a callable for ``argparse``'s ``type=``: it converts the text, rejects NaN and
infinities, and checks the range, raising ``argparse.ArgumentTypeError`` with a message that says
what is allowed (argparse then exits with status 2 and that one line).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def number(
    kind: type = float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float | int]:
    """A ``type=`` for a finite int or float within [lo, hi] (either end open or absent)."""
    wanted = "a whole number" if kind is int else "a number"
    allowed = _range_text(lo, hi, lo_open, hi_open)

    def convert(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if isinstance(value, float) and not math.isfinite(value):
            wanted_text = "give a finite number" if lo is None and hi is None else f"give a value {allowed}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; {wanted_text}")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a value {allowed}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


positive_int = number(int, 1, 2**31 - 1)
seed_int = number(int, 0, 2**32 - 1)
finite_float = number(float)
probability_open = number(float, 0.0, 1.0, lo_open=True, hi_open=True)
