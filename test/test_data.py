"""Fashion-MNIST loader (idx validation, clear errors) and the seeded splits."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from ttspec_ros import data


def _write_idx(path, magic: int, dims: tuple[int, ...], body: bytes) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_read_idx_accepts_a_valid_file(tmp_path):
    path = tmp_path / "imgs.gz"
    body = np.arange(2 * 28 * 28, dtype=np.uint8).tobytes()  # wraps at 256
    _write_idx(path, data.IDX_IMAGES_MAGIC, (2, 28, 28), body)
    images = data.read_idx(path, data.IDX_IMAGES_MAGIC, (28, 28), 2)
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8
    assert images[1, 0, 0] == (28 * 28) % 256


@pytest.mark.parametrize(
    "magic, dims, body_len, message",
    [
        (data.IDX_LABELS_MAGIC, (2, 28, 28), 2 * 784, "magic"),
        (data.IDX_IMAGES_MAGIC, (3, 28, 28), 3 * 784, "dimensions"),
        (data.IDX_IMAGES_MAGIC, (2, 28, 28), 2 * 784 - 5, "data bytes"),
    ],
)
def test_read_idx_refuses_bad_headers_and_sizes(tmp_path, magic, dims, body_len, message):
    path = tmp_path / "bad.gz"
    _write_idx(path, magic, dims, bytes(body_len))
    with pytest.raises(ValueError, match=message):
        data.read_idx(path, data.IDX_IMAGES_MAGIC, (28, 28), 2)


def test_read_idx_damaged_gzip_is_a_value_error_naming_the_file(tmp_path):
    # gzip.compress without a file name: the deflate data starts at byte 10, the CRC is at -8
    raw = gzip.compress(struct.pack(">II", data.IDX_LABELS_MAGIC, 100) + bytes(100), mtime=0)

    def damaged(name: str, content: bytes, flip: int | None = None) -> Path:
        path = tmp_path / name
        content = bytearray(content)
        if flip is not None:
            content[flip] ^= 0xFF
        path.write_bytes(bytes(content))
        return path

    cases = [
        (damaged("truncated.gz", raw[:-12]), "truncated gzip file"),  # EOFError
        (damaged("plain.gz", b"not gzip at all"), "cannot be read.*BadGzipFile"),
        (damaged("deflate.gz", raw, flip=10), "cannot be read.*error"),  # zlib.error
        (damaged("crc.gz", raw, flip=-8), "cannot be read.*CRC"),
    ]
    for path, what in cases:
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {what}"):
            data.read_idx(path, data.IDX_LABELS_MAGIC, (), 100)


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    data._load_cached.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=data.DEBIAN_PACKAGE):
            data.load_fashion_mnist("test")
    finally:
        data._load_cached.cache_clear()
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation")


def test_real_test_split_loads_read_only_and_balanced():
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10
    assert not images.flags.writeable
    assert len(data.CLASS_NAMES) == data.NUM_CLASSES
    assert all(0 <= c < 10 for subset in data.SUBSETS.values() for c in subset)


def test_splits_are_disjoint_stratified_and_seeded():
    s = data.splits(0)
    _, labels = data.load_fashion_mnist("train")
    assert s.pool.size >= 5000 and s.train.size + s.pool.size == 60000
    assert np.intersect1d(s.train, s.pool).size == 0
    assert np.bincount(labels[s.pool]).tolist() == [s.pool.size // 10] * 10
    again, other = data.splits(0), data.splits(1)
    assert np.array_equal(again.pool, s.pool) and not np.array_equal(other.pool, s.pool)
    card = data.splits_card(0)
    assert card["pool"]["sha256"] == data.index_hash(s.pool)
    assert card["train"]["size"] == s.train.size


def test_the_split_a_card_records_is_the_one_rebuilt():
    card = data.splits_card(3, 5000)
    assert data.recorded_split({"splits": card}) == (3, 5000)
    assert np.array_equal(data.recorded_pool({"splits": card}), data.splits(3, 5000).pool)
    # No recorded seed: refused, not guessed (a guess could stream trained-on images).
    for training in (None, {}, {"seed": 3}, {"splits": {"pool": card["pool"]}}):
        with pytest.raises(ValueError, match="records no training.splits.seed"):
            data.recorded_split(training)
    with pytest.raises(ValueError, match="is not the split"):
        data.recorded_pool({"splits": {**card, "seed": 4}})
    # values of the wrong type are named, not int()-ed (true -> 1, 3.7 -> 3) or a TypeError
    for seed in (None, True, 3.7, [3], "3", -1):
        with pytest.raises(ValueError, match="training.splits.seed must be an integer"):
            data.recorded_split({"splits": {**card, "seed": seed}})
    for size in (None, 6000.9, "6000", 0):
        with pytest.raises(ValueError, match="training.splits.pool.size must be a positive"):
            data.recorded_split({"splits": {**card, "pool": {**card["pool"], "size": size}}})


def test_pixel_stats_match_a_direct_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    mean, std = data.pixel_stats(images)
    x = images / 255.0
    assert mean == pytest.approx(x.mean(), abs=1e-12) and std == pytest.approx(x.std(), abs=1e-12)
