"""argparse ``type=`` converters shared by the ``pqproxy`` command and ``pqproxy bench``:
a bad value becomes argparse's one-line usage error, never a traceback."""

from __future__ import annotations

import argparse


def _number(value: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None


def positive_int(value: str) -> int:
    number = int(_number(value, int))
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def positive_int_or_auto(value: str) -> int | str:
    """A count of at least 1, or "auto" (for --workers: the CPUs the process may use)."""
    if value == "auto":
        return value
    return positive_int(value)


def non_negative_int(value: str) -> int:
    number = int(_number(value, int))
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def positive_float(value: str) -> float:
    number = _number(value, float)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


def non_negative_float(value: str) -> float:
    number = _number(value, float)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number
