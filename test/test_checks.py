import math

import numpy as np

from ttspec_ros.checks import is_integer, is_real


def test_bools_are_neither_integers_nor_numbers():
    for value in (True, False, np.bool_(True)):
        assert not is_integer(value) and not is_real(value)


def test_integers_and_numbers_of_python_and_numpy():
    assert all(is_integer(v) for v in (0, -3, np.int64(7), np.uint8(255)))
    assert not any(is_integer(v) for v in (1.0, np.float32(2), "3", None, [1]))
    assert all(is_real(v) for v in (0, 2.5, np.float32(1.5), np.int16(-1), math.inf))
    assert not any(is_real(v) for v in ("1.5", None, 1j, [0.5]))


def test_real_numbers_takes_ordered_lists_only():
    import pytest

    from ttspec_ros.checks import real_numbers

    assert real_numbers([0.5, np.float32(1), 2], "s") == [0.5, 1.0, 2.0]
    assert real_numbers(np.array([0.25, 0.5]), "s") == [0.25, 0.5]
    # a 0-d array raised "iteration over a 0-d array" (TypeError); a set has no order
    for values in (np.array(0.5), 0.5, "05", {0.5, 0.25}, {"a": 1}, [True], [[0.5]]):
        with pytest.raises(ValueError, match="s: need numbers"):
            real_numbers(values, "s")
