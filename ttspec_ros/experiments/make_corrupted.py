"""Build Fashion-MNIST-C (5 corruptions x severities 1-5) from the test split and deployment pool.

Writes, under ``--out``: ``{source}_{corruption}.npz`` (uint8 ``images`` (severities, N, 28, 28),
``labels``, ``indices`` into the source split, ``severities``), ``{source}_clean.npz``,
``index.json`` (seeds, counts, files with sha256, the corruption parameter mapping) and
``contact_sheet.png`` (corruption x severity). Sources: ``test`` = the first N images of the
10k test split, ``pool`` = the first N of the deployment pool of the demo model card's split
(``data.splits(split_seed, pool_size).pool``, indices into the training split). Every image is
seeded by (seed, source, corruption, severity, index), so the same image gets the same
corruption in any subset (``corruptions.image_rng``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
from pathlib import Path

import numpy as np

from ttspec_ros import corruptions, data
from ttspec_ros.experiments import seed_option
from ttspec_ros.files import atomic_write_bytes, check_writable, save_figure, write_json

SOURCES = ("test", "pool")
DEFAULT_SPLIT_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--test-images", type=int, default=2000,
                        help="first N images of the test split (0 = all 10000)")
    parser.add_argument("--pool-images", type=int, default=2000,
                        help="first N images of the deployment pool (0 = all)")
    parser.add_argument("--seed", type=seed_option, default=0, help="corruption seed")
    parser.add_argument("--split-seed", type=seed_option, default=None,
                        help="seed of data.splits, for models whose card records none (default: "
                             f"the card's, else {DEFAULT_SPLIT_SEED}; the pool size is the "
                             "card's)")
    parser.add_argument("--corruptions", nargs="+", default=list(corruptions.CORRUPTIONS),
                        choices=list(corruptions.CORRUPTIONS))


def split_of(card, seed: int | None = None) -> tuple[int, int]:
    """(seed, pool size) of the deployment pool a model card records (``data.recorded_split``).
    ``seed`` (``--split-seed``) is for cards that record none: another seed or size than the
    card's draws a pool of images the model was trained on (seed 1 against a seed-0 model:
    5,409 of 6,000)."""
    try:
        recorded_seed, size = data.recorded_split(card.training)
    except ValueError as e:
        if seed is None:
            raise ValueError(f"model card {card.model_id!r}: {e}; pass --split-seed") from None
        return seed, data.DEFAULT_POOL_SIZE
    if seed is not None and seed != recorded_seed:
        raise ValueError(f"--split-seed {seed}: model {card.model_id!r} was trained with split "
                         f"seed {recorded_seed}, and another seed's deployment pool holds its "
                         "training images")
    return recorded_seed, size


def default_split(seed: int | None = None) -> tuple[int, int]:
    """``split_of`` the bundled demo model's card (its pool was never trained on)."""
    from ttspec_ros.models.checkpoint import read_card
    from ttspec_ros.models.paths import CARD_SUFFIX, DEMO_STEM

    card_path = DEMO_STEM.with_suffix(CARD_SUFFIX)
    if not card_path.exists():
        return (DEFAULT_SPLIT_SEED if seed is None else seed), data.DEFAULT_POOL_SIZE
    return split_of(read_card(card_path), seed)


def source_images(source: str, count: int, split_seed: int, pool_size: int = data.DEFAULT_POOL_SIZE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, indices into the source's Fashion-MNIST split) of the first ``count``
    images of ``source`` ("test" or "pool"; count 0 = all)."""
    if source == "test":
        images, labels = data.load_fashion_mnist("test")
        indices = np.arange(len(images))
    elif source == "pool":
        images, labels = data.load_fashion_mnist("train")
        indices = data.splits(split_seed, pool_size).pool
    else:
        raise ValueError(f"unknown source {source!r}; use one of {SOURCES}")
    if count < 0 or count > len(indices):
        raise ValueError(f"{source} has {len(indices)} images, asked for {count}")
    indices = indices[:count] if count else indices
    return images[indices], labels[indices], indices


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # numpy >= 2.1's stub lets **arrays fill its allow_pickle flag; not passing the flag keeps
    # numpy 1.x (Humble's), which has none and would store it as an array
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def contact_sheet(images: np.ndarray, names: list[str], seed: int, path: Path) -> None:
    """Rows = corruptions, columns = clean + severities; each cell shows the same few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.arange(len(images))
    cols = ["clean"] + [f"severity {s}" for s in corruptions.SEVERITIES]
    size = (2.0 * len(cols), 0.9 * len(names) + 0.6)
    fig, axes = plt.subplots(len(names), len(cols), figsize=size, squeeze=False)
    for r, name in enumerate(names):
        for c, title in enumerate(cols):
            cell = images if c == 0 else corruptions.corrupt_images(
                images, name, c, seed=seed, source="test", indices=idx)
            ax = axes[r][c]
            ax.imshow(np.concatenate(list(cell), axis=1), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    split_seed, pool_size = default_split(args.split_seed)
    out = check_writable(args.out)
    if split_seed < 0:  # a model card's (the options' are checked while parsing)
        raise ValueError(f"the model card's split seed must be >= 0, got {split_seed}")
    # both counts checked before anything is written: no half-made dataset
    selected = {source: source_images(source, count, split_seed, pool_size)
                for source, count in (("test", args.test_images), ("pool", args.pool_images))}
    out.mkdir(parents=True, exist_ok=True)
    # index.json is written last and means "complete": an earlier run's, left in place while
    # this one replaced files, described a mix of two seeds' files if this run died midway.
    (out / "index.json").unlink(missing_ok=True)
    # An earlier run's files of corruptions this run leaves out would sit beside an index.json
    # of other seeds and counts: only what this run writes stays.
    written = {f"{source}_{name}.npz" for source in selected
               for name in ("clean", *args.corruptions)}
    for source in selected:
        for name in ("clean", *corruptions.CORRUPTIONS):
            stale = out / f"{source}_{name}.npz"
            if stale.name not in written and stale.exists():
                stale.unlink()
                print(f"removed {stale.name} of an earlier run", flush=True)
    started = time.time()
    files, sources = [], {}
    for source, (images, labels, indices) in selected.items():
        sources[source] = {"count": int(len(images)), "indices_sha256": data.index_hash(indices),
                           "split": "test" if source == "test" else "train"}
        variants = {"clean": images[None]}
        for name in args.corruptions:
            variants[name] = np.stack([
                corruptions.corrupt_images(images, name, s, seed=args.seed, source=source,
                                           indices=indices)
                for s in corruptions.SEVERITIES
            ])
        for name, stack in variants.items():
            severities = [0] if name == "clean" else list(corruptions.SEVERITIES)
            blob = _npz_bytes(images=stack, labels=labels, indices=indices,
                              severities=np.asarray(severities, dtype=np.int64))
            path = atomic_write_bytes(out / f"{source}_{name}.npz", blob)
            files.append({"file": path.name, "source": source, "corruption": name,
                          "severities": severities, "shape": list(stack.shape),
                          "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
            print(f"{path.name}: {list(stack.shape)} {len(blob) / 1e6:.1f} MB", flush=True)
    test_images, _ = data.load_fashion_mnist("test")
    contact_sheet(test_images[:3], list(args.corruptions), args.seed, out / "contact_sheet.png")
    index = {
        "dataset": "Fashion-MNIST-C (ttspec_ros)",
        "seed": args.seed,
        "split_seed": split_seed,
        "pool_size": pool_size,
        "sources": sources,
        "corruptions": list(args.corruptions),
        "severities": list(corruptions.SEVERITIES),
        "image_seeding": "numpy default_rng([seed, crc32(source), crc32(corruption), severity, "
                         "index]) per image (ttspec_ros.corruptions.image_rng)",
        "parameter_mapping": corruptions.parameter_mapping(),
        "files": files,
        "contact_sheet": "contact_sheet.png",
        "data_source": "Fashion-MNIST idx files of Debian dataset-fashion-mnist",
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "index.json", index)
    print(f"wrote {len(files)} files, index.json and contact_sheet.png to {out}")
    return 0
