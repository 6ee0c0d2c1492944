"""Experiment and benchmark commands of the ``ttspec`` CLI; each writes its results as JSON."""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def below_minimum(args: argparse.Namespace, minimums: Mapping[str, int]) -> str | None:
    """``"--name must be >= low, got value"`` for the first option under its minimum, or None.
    Options left at None (not given) pass. A negative count would slice from the end and a zero
    one divide by zero, far into a run."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {value}"
    return None


def seed_option(text: str) -> int:
    """argparse type of every seed option: numpy's generators refuse negative seeds, mid-run
    and naming no option, so they are refused while parsing."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed must be >= 0, got {value}")
    return value
