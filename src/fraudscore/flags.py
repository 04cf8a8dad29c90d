"""Values of command-line flags and environment variables, checked where they are read.

Each function here is an argparse ``type=``: a bad value becomes argparse's one-line usage error
naming the flag.  Every command (``cli``, ``loadtest``, ``model``, ``worker``…) uses these, so a
port or a count means the same everywhere.

>>> positive_int("3"), positive_float("0.5"), port_arg("9999")
(3, 0.5, 9999)
>>> parse_port("70000")
Traceback (most recent call last):
...
ValueError: must be a port number 1-65535, got '70000'
"""

from __future__ import annotations

import argparse
import math

from fraudscore.defaults import MAX_PORT, MIN_PORT


def parse_port(text: str) -> int:
    """A TCP port, 1-65535; ValueError (with the reason) otherwise."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"must be a port number {MIN_PORT}-{MAX_PORT}, got {text!r}")
    return port


def port_arg(text: str) -> int:
    """A port flag."""
    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, multipliers)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value
