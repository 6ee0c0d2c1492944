"""Fashion-MNIST-C corruptions and the make-corrupted command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ttspec_ros import corruptions, data


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.array(data.load_fashion_mnist("test")[0][:64])


@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_shape_dtype_determinism_and_severity_order(images, name):
    distances = []
    for s in corruptions.SEVERITIES:
        a = corruptions.corrupt_images(images, name, s, seed=3, source="test")
        b = corruptions.corrupt_images(images, name, s, seed=3, source="test")
        assert a.dtype == np.uint8 and a.shape == images.shape
        np.testing.assert_array_equal(a, b)
        distances.append(np.abs(a.astype(float) - images).mean())
    # every severity changes the images, and more so as the severity rises
    assert distances[0] > 0.5
    assert all(d1 < d2 for d1, d2 in zip(distances, distances[1:], strict=False)), distances



@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_channel_images_keep_their_shape(images, name):
    """(H, W, 1) and (H, W, 3) stay so (motion blur dropped the channel axis of one channel,
    and corrupt_images failed to stack it); 5 channels are refused by name, not by cv2."""
    for c in (1, 2, 3):
        stack = np.repeat(images[:2, :, :, None], c, axis=3)
        assert corruptions.corrupt_images(stack, name, 3, seed=0, source="test").shape == \
            stack.shape
    with pytest.raises(ValueError, match="with C 1 to 4"):
        corruptions.corrupt(np.zeros((28, 28, 5), np.uint8), name, 3,
                            np.random.default_rng(0))

def test_subset_gets_the_same_corruption_as_the_full_set(images):
    full = corruptions.corrupt_images(images[:8], "gaussian_noise", 2, seed=0, source="pool",
                                      indices=np.arange(10, 18))
    part = corruptions.corrupt_images(images[3:5], "gaussian_noise", 2, seed=0, source="pool",
                                      indices=np.array([13, 14]))
    np.testing.assert_array_equal(full[3:5], part)
    other_seed = corruptions.corrupt_images(images[3:5], "gaussian_noise", 2, seed=1,
                                            source="pool", indices=np.array([13, 14]))
    assert not np.array_equal(part, other_seed)


def test_contrast_scales_deviation_from_the_mean(images):
    x = images[0]
    y = corruptions.corrupt(x, "contrast", 5, np.random.default_rng(0))
    c = corruptions.SEVERITY_PARAMS["contrast"][4]
    assert abs(y.std() - c * x.std()) < 1.0
    assert abs(y.mean() - x.mean()) < 1.0


def test_motion_kernel_is_a_normalised_one_sided_streak():
    k = corruptions.motion_blur_kernel(2.0, 0.0)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    centre = k.shape[0] // 2
    row = k[centre]
    assert np.count_nonzero(k) == np.count_nonzero(row)  # angle 0: a horizontal line
    assert row[:centre].sum() == 0 and row[centre] == row.max()  # starts at the centre


def test_works_on_colour_and_other_sizes():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for name in corruptions.CORRUPTIONS:
        assert corruptions.corrupt(x, name, 3, np.random.default_rng(1)).shape == x.shape


def test_bad_input_is_rejected(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        corruptions.corrupt(images[0], "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(images[0], "contrast", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt(images[0].astype(np.float32), "contrast", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="one index per image"):
        corruptions.corrupt_images(images, "contrast", 1, seed=0, source="test",
                                   indices=np.arange(3))


@pytest.mark.parametrize("severity", [True, 5.0, "5", None])
def test_severity_must_be_an_integer_of_the_ladder(images, severity):
    # True == 1 and 5.0 == 5 passed an ``in SEVERITIES`` check (5.0 then failed as an index)
    with pytest.raises(ValueError, match="severity must be one of"):
        corruptions.corrupt(images[0], "contrast", severity, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity must be one of"):
        corruptions.corrupt_images(images[:2], "contrast", severity, seed=0, source="test")
    np.testing.assert_array_equal(  # numpy integers are integers
        corruptions.corrupt(images[0], "contrast", np.int64(5), np.random.default_rng(0)),
        corruptions.corrupt(images[0], "contrast", 5, np.random.default_rng(0)))


def test_negative_seed_or_index_is_refused_by_name():
    for seed, index in ((-1, 0), (0, -3)):
        with pytest.raises(ValueError, match="seed and image index must be >= 0"):
            corruptions.image_rng(seed, "test", "contrast", 1, index)


def test_contrast_keeps_each_channel_mean_as_imagenet_c():
    """ImageNet-C's contrast pulls every channel towards its own mean, not the image's."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(180, 256, (28, 28)), rng.integers(0, 60, (28, 28)),
                  rng.integers(90, 150, (28, 28))], axis=-1).astype(np.uint8)
    y = corruptions.corrupt(x, "contrast", 5, np.random.default_rng(0))
    c = corruptions.SEVERITY_PARAMS["contrast"][4]
    for ch in range(3):
        assert abs(y[..., ch].mean() - x[..., ch].mean()) < 1.0
        assert abs(y[..., ch].std() - c * x[..., ch].std()) < 1.0


def test_make_corrupted_tiny(tmp_path, monkeypatch):
    from ttspec_ros.cli import main

    assert main(["make-corrupted", "--out", str(tmp_path), "--test-images", "6",
                 "--pool-images", "4", "--split-seed", "0"]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["seed"] == 0 and index["split_seed"] == 0
    assert index["sources"]["test"]["count"] == 6 and index["sources"]["pool"]["count"] == 4
    assert index["parameter_mapping"]["params"] == corruptions.SEVERITY_PARAMS
    assert len(index["files"]) == 2 * (1 + len(corruptions.CORRUPTIONS))
    with np.load(tmp_path / "pool_motion_blur.npz") as f:
        stack, indices, labels = f["images"], f["indices"], f["labels"]
    assert stack.shape == (5, 4, 28, 28) and stack.dtype == np.uint8
    pool = data.splits(0).pool[:4]
    np.testing.assert_array_equal(indices, pool)
    train_images, train_labels = data.load_fashion_mnist("train")
    np.testing.assert_array_equal(labels, train_labels[pool])
    expected = corruptions.corrupt_images(train_images[pool], "motion_blur", 3, seed=0,
                                          source="pool", indices=pool)
    np.testing.assert_array_equal(stack[2], expected)
    assert (tmp_path / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # again with fewer corruptions: the earlier run's other files do not stay beside its index
    assert main(["make-corrupted", "--out", str(tmp_path), "--test-images", "2",
                 "--pool-images", "2", "--split-seed", "0", "--corruptions", "contrast"]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == sorted(
        f["file"] for f in index["files"]) == [
        "pool_clean.npz", "pool_contrast.npz", "test_clean.npz", "test_contrast.npz"]
    # a run that fails midway leaves no index.json: the old one no longer describes the files
    from ttspec_ros.experiments import make_corrupted

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(make_corrupted, "contact_sheet", disk_full)
    assert main(["make-corrupted", "--out", str(tmp_path), "--test-images", "2",
                 "--pool-images", "2", "--split-seed", "0", "--seed", "1",
                 "--corruptions", "contrast"]) == 2
    assert not (tmp_path / "index.json").exists()


@pytest.mark.parametrize("counts, message", [
    (["--test-images", "3", "--pool-images", "999999"], "pool has 6000 images, asked for 999999"),
    (["--test-images", "-1", "--pool-images", "2"], "test has 10000 images, asked for -1"),
])
def test_make_corrupted_checks_both_counts_before_writing(tmp_path, capsys, counts, message):
    from ttspec_ros.cli import main

    out = tmp_path / "mc"
    assert main(["make-corrupted", "--out", str(out), "--split-seed", "0", *counts]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-made


def test_the_deployment_pool_is_the_model_cards_split_size_included():
    """A pool of another size than the card's holds images the model was trained on, so the
    corrupted-data tools take both the seed and the size from the card."""
    from types import SimpleNamespace

    from ttspec_ros.experiments.make_corrupted import split_of
    from ttspec_ros.experiments.ttt_experiment import DataSource, Options

    card = SimpleNamespace(model_id="m", training={"splits": data.splits_card(3, 1000)})
    assert split_of(card) == (3, 1000)
    assert split_of(card, seed=3) == (3, 1000)
    with pytest.raises(ValueError, match="trained with split seed 3.*training images"):
        split_of(card, seed=5)  # another seed's pool holds training images
    bare = SimpleNamespace(model_id="m", training={})
    assert split_of(bare, seed=2) == (2, data.DEFAULT_POOL_SIZE)
    with pytest.raises(ValueError, match="records no training.splits.seed.*pass --split-seed"):
        split_of(bare)
    spec = {"size": 32, "channels": 1, "content_size": 28, "mean": [0.5], "std": [0.5]}
    source = DataSource(spec, Options(split_seed=3, pool_size=1000, stream=1000, images=1,
                                      clean_images=1))
    assert set(source.pool_indices) == set(data.splits(3, 1000).pool)
