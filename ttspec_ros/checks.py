"""Type checks for values that come from JSON, YAML, model cards and callers.

``bool`` is a subclass of ``int`` (and so an ``Integral`` and a ``Real``): without these checks
``true`` in a file passes as 1, which is never what a count, size or rate meant.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Set
from typing import Any

# Seeds go to numpy's and torch's generators, some plus a small offset for a derived stream;
# torch refuses 2**64 and above mid-run, with "Overflow when unpacking long long".
MAX_SEED = 2**32 - 1


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A Python or NumPy integer or float, not a bool (NaN and inf included: check those
    where they matter)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real_numbers(values: Any, source: str) -> list[float]:
    """A list of numbers as floats; ValueError for strings (read one character per entry),
    bools (an int to Python), scalars (a 0-d array too), unordered sets and nested lists."""
    if isinstance(values, (str, bytes, Mapping, Set)) or not isinstance(values, Iterable) \
            or getattr(values, "ndim", 1) == 0:
        raise ValueError(f"{source}: need numbers (a list), got {values!r:.80}")
    values = list(values)
    if not all(is_real(v) for v in values):
        raise ValueError(f"{source}: need numbers, got {values!r:.80}")
    return [float(v) for v in values]
