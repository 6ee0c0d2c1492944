"""preprocess: the one image -> model-input path (training, camera node, replay)."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from ttspec_ros.preprocess import frame_bounds, out_of_range, preprocess, preprocess_batch

SPEC = {"channels": 1, "size": 32, "content_size": 28, "mean": [0.25], "std": [0.5]}


def test_fashion_mnist_image_is_padded_and_normalised():
    img = np.zeros((28, 28), np.uint8)
    img[0, 0], img[27, 27] = 255, 51
    out = preprocess(img, SPEC)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    background = (0.0 - 0.25) / 0.5
    assert out[0, 0, 0] == pytest.approx(background)  # padding = black, normalised
    assert out[0, 2, 2] == pytest.approx((1.0 - 0.25) / 0.5)  # content starts at offset 2
    assert out[0, 29, 29] == pytest.approx((0.2 - 0.25) / 0.5)
    assert out[0, 30, 30] == pytest.approx(background)


def test_batch_path_equals_the_frame_path():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    batch = preprocess_batch(images, SPEC)
    assert np.array_equal(batch, np.stack([preprocess(im, SPEC) for im in images]))


def test_batch_path_resizes_to_the_content_size_as_the_frame_path_does():
    spec = {**SPEC, "size": 64, "content_size": 56}
    images = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    batch = preprocess_batch(images, spec)
    assert batch.shape == (3, 1, 64, 64)
    assert np.array_equal(batch, np.stack([preprocess(im, spec) for im in images]))
    with pytest.raises(ValueError, match="H = W"):
        preprocess_batch(np.zeros((2, 28, 30), np.uint8), spec)


def test_camera_frame_rgb_any_size_uses_luma_crop_and_area_resize():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = preprocess(frame, SPEC)
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)[:, 8:56].astype(np.float32) / 255
    expected = cv2.resize(gray, (28, 28), interpolation=cv2.INTER_AREA)
    assert np.allclose(out[0, 2:30, 2:30], (expected - 0.25) / 0.5, atol=1e-5)
    # uint16 mono and (H, W, 1) give the same as their uint8 equivalent
    mono = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    assert np.allclose(preprocess(mono.astype(np.uint16) * 257, SPEC), preprocess(mono, SPEC))
    assert np.array_equal(preprocess(mono[:, :, None], SPEC), preprocess(mono, SPEC))


def test_three_channel_spec_repeats_gray_and_keeps_colour():
    spec = {**SPEC, "channels": 3, "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}
    out = preprocess(np.full((28, 28), 255, np.uint8), spec)
    assert out.shape == (3, 32, 32)
    assert out[:, 10, 10].tolist() == pytest.approx([0.9, 0.8, 0.7])
    # an RGB model (ImageNet RevCol) sees colour, not its luma three times
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = preprocess(frame, spec)
    crop = frame[:, 8:56].astype(np.float32) / 255
    expected = cv2.resize(crop, (28, 28), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    assert np.allclose(out[:, 2:30, 2:30], expected - np.array([0.1, 0.2, 0.3])[:, None, None],
                       atol=1e-5)
    rgba = np.concatenate([frame, np.zeros((48, 64, 1), np.uint8)], axis=2)  # alpha ignored
    assert np.array_equal(preprocess(rgba, spec), out)
    red = np.zeros((28, 28, 3), np.uint8)
    red[..., 0] = 255
    assert preprocess(red, spec)[:, 10, 10].tolist() == pytest.approx([0.9, -0.2, -0.3])


@pytest.mark.parametrize(
    "image, spec, message",
    [
        (np.zeros((28, 28), np.float32), SPEC, "dtype"),
        (np.zeros((28, 28, 2), np.uint8), SPEC, "shape"),
        (np.zeros((28, 28), np.uint8), {**SPEC, "std": [0.0]}, "std"),
        (np.zeros((28, 28), np.uint8), {"channels": 1, "size": 32}, "lacks"),
        (np.zeros((28, 28), np.uint8), {**SPEC, "content_size": 40}, "content_size"),
        # a card is data from a file: wrong types are ValueErrors too (were TypeErrors)
        (np.zeros((28, 28), np.uint8), {**SPEC, "size": None}, "wrong type"),
        (np.zeros((28, 28), np.uint8), None, "wrong type"),
        # int() truncated these silently (a corrupt card ran as another input size)
        (np.zeros((28, 28), np.uint8), {**SPEC, "size": 32.7}, "size must be an integer"),
        (np.zeros((28, 28), np.uint8), {**SPEC, "channels": True}, "channels must be an integer"),
        (np.zeros((28, 28), np.uint8), {**SPEC, "content_size": "28"}, "content_size must be"),
        # "0.5" was read as the three numbers 0, ., 5 would be: as 0.5 (np.asarray of a str)
        (np.zeros((28, 28), np.uint8), {**SPEC, "mean": "0.5"}, "mean: need numbers"),
        (np.zeros((28, 28), np.uint8), {**SPEC, "std": [True]}, "std: need numbers"),
    ],
)
def test_bad_input_is_refused_with_a_reason(image, spec, message):
    with pytest.raises(ValueError, match=message):
        preprocess(image, spec)


def test_input_shape_is_what_preprocess_gives():
    from ttspec_ros.preprocess import input_shape

    assert input_shape(SPEC) == preprocess(np.zeros((40, 30), np.uint8), SPEC).shape == (1, 32, 32)


@pytest.mark.parametrize("channels", [1, 3])
def test_frames_preprocess_gives_are_in_range_and_unnormalised_ones_are_not(channels):
    """What the nodes accept from senders: every frame ``preprocess`` can give (black, white,
    noise, any size) is in range; raw pixels or another normalisation are named."""
    spec = {"channels": channels, "size": 32, "content_size": 28,
            "mean": [0.3] * channels, "std": [0.25] * channels}
    bounds = frame_bounds(spec)
    rng = np.random.default_rng(0)
    for image in (np.zeros((40, 50), np.uint8), np.full((28, 28), 255, np.uint8),
                  rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
                  rng.integers(0, 65536, (30, 30), dtype=np.uint16)):
        assert out_of_range(preprocess(image, spec), bounds) is None
    frame = preprocess(np.zeros((28, 28), np.uint8), spec)
    raw = frame.copy()
    raw[-1, 3, 3] = 255.0  # one raw pixel in the last channel
    assert re.search(rf"channel {channels - 1} lie outside -1.6..3.2,", out_of_range(raw, bounds))
    assert out_of_range(frame * 0.25 - 0.3, bounds) is None  # slightly off, still plausible
    assert out_of_range(frame - 5.0, bounds) is not None
