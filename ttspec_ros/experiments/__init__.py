"""Experiment and benchmark commands of the ``ttspec`` CLI; each writes its results as JSON."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence

from ttspec_ros.checks import MAX_SEED


def below_minimum(args: argparse.Namespace, minimums: Mapping[str, float],
                  positive: Sequence[str] = ()) -> str | None:
    """``"--name must be >= low, got value"`` for the first option under its minimum (or, for
    the names in ``positive``, not above 0), or None. NaN and infinity are refused too; options
    left at None (not given) pass. A negative count would slice from the end, a zero one or a
    zero rate divide by zero, a NaN pass every comparison, far into a run."""
    bounds = [(name, low, ">=") for name, low in minimums.items()]
    bounds += [(name, 0, ">") for name in positive]
    for name, low, rule in bounds:
        value = getattr(args, name)
        if value is None:
            continue
        if not (value >= low if rule == ">=" else value > low) or value == math.inf:
            finite = "" if math.isfinite(value) else "a finite number "
            return f"--{name.replace('_', '-')} must be {finite}{rule} {low}, got {value}"
    return None


MAX_THREADS = 256  # far above any CPU this runs on; 100000 hung torch without a word


def thread_option(text: str) -> int:
    """argparse type of every thread-count option: 1..MAX_THREADS."""
    value = int(text)
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_THREADS}, got {value}")
    return value


def seed_option(text: str) -> int:
    """argparse type of every seed option: numpy's generators refuse negative seeds and torch's
    seeds of 2**64 and above, mid-run and naming no option, so they are refused while parsing."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be in 0..{MAX_SEED}, got {value}")
    return value
