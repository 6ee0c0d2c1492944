"""Type checks for values that come from JSON, YAML, model cards and callers.

``bool`` is a subclass of ``int`` (and so an ``Integral`` and a ``Real``): without these checks
``true`` in a file passes as 1, which is never what a count, size or rate meant.
"""

from __future__ import annotations

import numbers
from typing import Any


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A Python or NumPy integer or float, not a bool (NaN and inf included: check those
    where they matter)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
