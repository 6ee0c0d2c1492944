"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` and the project's fixed splits.

Splits, all decided by a seed: ``train`` (what the demo model is trained on) and ``pool`` (the
unlabeled deployment pool, held out of the 60k training split, stratified, never trained on);
the 10k ``test`` split is used for evaluation only.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ttspec_ros.checks import MAX_SEED, is_integer

DATA_DIR_ENV = "TTSPEC_FASHION_MNIST_DIR"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
IMAGE_SIZE = 28
NUM_CLASSES = 10

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Class groups a robot might see for a while (specialization scenarios).
SUBSETS: dict[str, list[int]] = {
    "footwear": [5, 7, 9],
    "tops": [0, 2, 4, 6],
    "bags": [8],
    "other": [1, 3, 8],
}

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
DEFAULT_POOL_SIZE = 6000  # 600 per class


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"Fashion-MNIST file {path} not found. Install the Debian package {DEBIAN_PACKAGE} "
        f"(apt-get install -y {DEBIAN_PACKAGE}) or point {DATA_DIR_ENV} at a directory "
        f"holding {', '.join(f for pair in FILES.values() for f in pair)}."
    )


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...], count: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes, checking magic, dimensions and length."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except EOFError as err:  # gzip's way of saying the stream stops early
        raise ValueError(f"{path}: truncated gzip file (the compressed data ends early); "
                         f"reinstall {DEBIAN_PACKAGE} or replace the file") from err
    except (OSError, zlib.error) as err:  # BadGzipFile (an OSError), corrupt deflate data, I/O
        raise ValueError(f"{path}: cannot be read as a gzipped idx file "
                         f"({type(err).__name__}: {err})") from err
    ndim = 1 + len(item_shape)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise ValueError(f"{path}: idx magic {got_magic:#010x}, expected {magic:#010x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != (count, *item_shape):
        raise ValueError(f"{path}: idx dimensions {dims}, expected {(count, *item_shape)}")
    body = np.frombuffer(raw, dtype=np.uint8, offset=header_len)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} data bytes, header promises {int(np.prod(dims))}")
    return body.reshape(dims)


@functools.lru_cache(maxsize=2)
def _load_cached(split: str, directory: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = FILES[split]
    n = SPLIT_SIZES[split]
    images = read_idx(Path(directory) / image_file, IDX_IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE), n)
    labels = read_idx(Path(directory) / label_file, IDX_LABELS_MAGIC, (), n).astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        raise ValueError(f"{label_file}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels int64 (N,)) of split "train" (60k) or "test" (10k).

    The arrays are shared and read-only; copy before modifying."""
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    return _load_cached(split, str(data_dir()))


def source_files() -> list[dict]:
    """The idx files with their sha256 (for model cards and experiment JSON)."""
    out = []
    for split in ("train", "test"):
        for name in FILES[split]:
            path = data_dir() / name
            if not path.is_file():
                raise _missing(path)
            out.append({"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return out


class Splits(NamedTuple):
    """Indices into the 60k training split."""

    train: np.ndarray
    pool: np.ndarray


def splits(seed: int, pool_size: int = DEFAULT_POOL_SIZE) -> Splits:
    """Train / deployment-pool indices (disjoint, sorted); the pool is stratified by class."""
    if pool_size % NUM_CLASSES or not 0 < pool_size < SPLIT_SIZES["train"]:
        raise ValueError(f"pool_size must be a positive multiple of {NUM_CLASSES} below 60000")
    _, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    per_class = pool_size // NUM_CLASSES
    pool = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(NUM_CLASSES)]
    )
    pool.sort()
    train = np.setdiff1d(np.arange(labels.size), pool)
    return Splits(train=train, pool=pool)


def index_hash(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def splits_card(seed: int, pool_size: int = DEFAULT_POOL_SIZE) -> dict:
    """What the model card records about the splits: seed, sizes, hashes of the index lists."""
    s = splits(seed, pool_size)
    return {
        "seed": seed,
        "source_split": "train",
        "train": {"size": int(s.train.size), "sha256": index_hash(s.train)},
        "pool": {"size": int(s.pool.size), "sha256": index_hash(s.pool), "stratified": True},
        "test": {"size": SPLIT_SIZES["test"], "source_split": "test"},
    }


def recorded_split(training: Mapping | None) -> tuple[int, int]:
    """(seed, pool size) of the split a model card's ``training`` section records
    (``splits_card``). Guessing would risk streaming images the model was trained on."""
    _, seed, size = _recorded_split(training)
    return seed, size


def _recorded_split(training: Mapping | None) -> tuple[Mapping, int, int]:
    """(training.splits, seed, pool size): ``recorded_split`` with the checked section."""
    recorded = training.get("splits") if isinstance(training, Mapping) else None
    if not isinstance(recorded, Mapping) or "seed" not in recorded:
        raise ValueError("the model card records no training.splits.seed; cannot tell which "
                         "images are the deployment pool")
    pool_entry = recorded.get("pool")
    pool: Mapping = pool_entry if isinstance(pool_entry, Mapping) else {}
    seed, size = recorded["seed"], pool.get("size", DEFAULT_POOL_SIZE)
    # int() would take true as 1 and 3.7 as 3, and fail on null with a TypeError
    if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"the model card's training.splits.seed must be an integer in "
                         f"0..{MAX_SEED}, got {seed!r}")
    if not is_integer(size) or size < 1:
        raise ValueError(f"the model card's training.splits.pool.size must be a positive "
                         f"integer, got {size!r}")
    return recorded, int(seed), int(size)


def recorded_pool(training: Mapping | None) -> np.ndarray:
    """The deployment-pool indices of the split a model card records, checked against the
    recorded sha256 when there is one."""
    recorded_splits, seed, size = _recorded_split(training)
    pool = splits(seed, size).pool
    recorded = recorded_splits.get("pool")
    digest = recorded.get("sha256") if isinstance(recorded, Mapping) else None
    if digest is not None and digest != index_hash(pool):
        raise ValueError(f"the model card's deployment pool (sha256 {digest}) is not the split "
                         f"data.splits(seed {seed}, size {size}) gives; cannot tell which images "
                         "the model was not trained on")
    return pool


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of uint8 images in [0, 1] units (the normalisation of the model input)."""
    counts = np.bincount(np.asarray(images, dtype=np.uint8).reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0  # a histogram: exact and no float copy
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    return mean, float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
