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
