"""Image -> model input: the one preprocessing used by training, the camera node and replay.

A frame (any size, mono or RGB, uint8 or uint16) becomes grayscale (cv2 luma) for a 1-channel
model and RGB for a 3-channel one (a mono frame repeated), is centre-cropped to a square and
resized to ``content_size`` with INTER_AREA, zero-padded to ``size`` (zero = black, the
Fashion-MNIST background) and normalised with the training mean/std. The input spec
is the model card's ``input`` dict: {channels, size, content_size, mean, std}.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from ttspec_ros.checks import is_integer, is_real, real_numbers

_SPEC_KEYS = ("channels", "size", "content_size", "mean", "std")
MAX_SIZE = 4096  # px; a larger model input side is a corrupt card, not a model


def check_input_spec(input_spec: Mapping) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """(channels, size, content_size, mean, std) of a model card's ``input`` spec; ValueError
    saying what is wrong (wrong types too: a card is data from a file)."""
    try:
        return _check_spec(input_spec)
    except (TypeError, AttributeError, OverflowError) as e:  # "size": null / Infinity, ...
        raise ValueError(f"input spec has a field of the wrong type ({e})") from e


def input_shape(input_spec: Mapping) -> tuple[int, int, int]:
    """(channels, size, size): the model input ``preprocess`` gives for this spec."""
    channels, size = check_input_spec(input_spec)[:2]
    return channels, size, size


# How far outside the range ``preprocess`` gives (per channel, as a share of its width) a frame
# may reach. Frames made here stay inside it up to float rounding; the margin leaves room for
# a sender's own resizer (bicubic overshoots by a few percent). An unnormalised frame (0..255)
# or one of another scale lies far outside: it would give confident answers for nothing, and
# test-time training on it wrecks the backbone with finite losses (nothing non-finite stops it).
RANGE_MARGIN = 0.1


def frame_bounds(input_spec: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (C, 1, 1): the values a frame of this spec may hold (RANGE_MARGIN)."""
    channels, _, _, mean, std = check_input_spec(input_spec)
    low, high = (np.broadcast_to((v - mean) / std, (channels,)) for v in (0.0, 1.0))
    margin = RANGE_MARGIN * (high - low)
    return ((low - margin).reshape(-1, 1, 1).astype(np.float32),
            (high + margin).reshape(-1, 1, 1).astype(np.float32))


def out_of_range(frame: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> str | None:
    """Why a (C, H, W) model-input frame cannot come from ``preprocess`` with this spec, or None."""
    low, high = bounds
    below, above = frame < low, frame > high
    if not (below.any() or above.any()):
        return None
    channel = int(np.argmax((below | above).reshape(len(low), -1).any(axis=1)))
    return (f"frame values {float(frame[channel].min()):.4g}..{float(frame[channel].max()):.4g} "
            f"in channel {channel} lie outside {float(low[channel, 0, 0]):.4g}.."
            f"{float(high[channel, 0, 0]):.4g}, the range this model's preprocessing gives "
            "(unnormalised or differently normalised frames?)")


def frame_problem(frame: np.ndarray, shape: tuple[int, int, int],
                  bounds: tuple[np.ndarray, np.ndarray]) -> tuple[str, str] | None:
    """(reason, message) why a decoded model-input frame is not one this model's
    preprocessing gives (``input_shape``, ``frame_bounds``), or None. The classifier and the
    adapter's test-time training take frames from any sender, so both check them this way."""
    if frame.shape != shape:
        return "wrong_shape", f"frame is {frame.shape}, the model takes {shape}"
    problem = out_of_range(frame, bounds)
    return ("out_of_range", problem) if problem else None


def _check_spec(input_spec: Mapping) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    missing = [k for k in _SPEC_KEYS if k not in input_spec]
    if missing:
        raise ValueError(f"input spec lacks {missing}; expected keys {list(_SPEC_KEYS)}")
    for key in ("channels", "size", "content_size"):
        value = input_spec[key]
        # int() would take true as 1, 32.7 as 32 and "32" as 32: a corrupt card, not a model
        if not is_integer(value):
            raise ValueError(f"input spec has a field of the wrong type ({key} must be an "
                             f"integer, got {value!r})")
    channels, size = int(input_spec["channels"]), int(input_spec["size"])
    content = int(input_spec["content_size"])
    if channels not in (1, 3):
        raise ValueError(f"input spec channels must be 1 or 3, got {channels}")
    if not 0 < content <= size <= MAX_SIZE:
        raise ValueError(f"input spec needs 0 < content_size <= size <= {MAX_SIZE}, got "
                         f"{content} and {size}")
    # one number or a list of them: not a string ("123" read as 3 digits) or a bool
    mean, std = (np.asarray(real_numbers([v] if is_real(v) else v, f"input spec {key}"),
                            dtype=np.float32) for key, v in (("mean", input_spec["mean"]),
                                                             ("std", input_spec["std"])))
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise ValueError(f"input spec mean/std must have 1 or {channels} values")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"input spec mean/std must be finite, got {mean.tolist()} and "
                         f"{std.tolist()}")
    if np.any(std <= 0):
        raise ValueError(f"input spec std must be positive, got {std.tolist()}")
    return channels, size, content, mean, std


def _to_unit(image: np.ndarray, channels: int, square: bool = False) -> np.ndarray:
    """(H,W) / (H,W,1) / (H,W,3) RGB / (H,W,4) RGBA uint8 or uint16 -> float32 in [0,1]:
    (H,W) grayscale for a 1-channel model, (H,W,3) RGB for a 3-channel one; centre-cropped
    to a square first if ``square`` (per-pixel steps commute with the crop, so converting
    only the kept pixels gives the same values for less work)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype == np.uint8:
        scale = 255.0
    elif image.dtype == np.uint16:
        scale = 65535.0
    else:
        raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if (image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4))
            or min(image.shape[:2]) == 0):
        raise ValueError(
            f"image must be (H,W) or (H,W,C) with C in 1/3/4 and H,W > 0, got shape {image.shape}"
        )
    if square:
        image = _center_square(image)
    if channels == 1 and image.ndim == 3:
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        image = cv2.cvtColor(np.ascontiguousarray(image), code)
    elif channels == 3 and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif channels == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # RGBA: the colour, without alpha
    # One pass, same float32 division as astype(float32) / scale.
    return np.divide(image, np.float32(scale), dtype=np.float32)


def _center_square(gray: np.ndarray) -> np.ndarray:
    # Crop rather than squash so a 4:3 camera frame keeps the object's proportions.
    h, w = gray.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return gray[top : top + side, left : left + side]


def _to_content_size(unit: np.ndarray, content_size: int) -> np.ndarray:
    """Square unit-range (s, s) grayscale or (s, s, 3) RGB -> content_size a side; shared by
    ``preprocess`` and ``preprocess_batch`` so both resize alike."""
    if unit.shape[:2] == (content_size, content_size):
        return unit
    return cv2.resize(unit, (content_size, content_size), interpolation=cv2.INTER_AREA)


def _pad_and_normalise(content: np.ndarray,
                       checked: tuple[int, int, int, np.ndarray, np.ndarray]) -> np.ndarray:
    """Content-sized unit-range (..., K, c, c), K = 1 (grayscale) or the model's channels ->
    normalised (..., C, size, size) float32."""
    channels, size, content_size, mean, std = checked
    if content.shape[-2:] != (content_size, content_size) or content.shape[-3] not in (1,
                                                                                     channels):
        raise ValueError(f"content must be (1 or {channels}) x {content_size}x{content_size}, "
                         f"got {content.shape[-3:]}")
    out: np.ndarray = np.zeros(content.shape[:-2] + (size, size), dtype=np.float32)
    off = (size - content_size) // 2
    out[..., off : off + content_size, off : off + content_size] = content
    if out.shape[-3] != channels:  # a grayscale image for a 3-channel model
        out = np.repeat(out, channels, axis=-3)
    shape = (channels, 1, 1)
    mean_b = np.broadcast_to(mean.reshape(-1, 1, 1), shape)
    std_b = np.broadcast_to(std.reshape(-1, 1, 1), shape)
    return ((out - mean_b) / std_b).astype(np.float32)


def preprocess(image: np.ndarray, input_spec: Mapping) -> np.ndarray:
    """One frame (H,W) or (H,W,C), uint8/uint16 -> float32 (channels, size, size)."""
    checked = check_input_spec(input_spec)
    channels, content_size = checked[0], checked[2]
    unit = _to_content_size(_to_unit(image, channels, square=True), content_size)
    # (c, c) grayscale or (c, c, 3) RGB -> (K, c, c)
    return _pad_and_normalise(unit[None] if unit.ndim == 2 else unit.transpose(2, 0, 1), checked)


def preprocess_batch(images: np.ndarray, input_spec: Mapping) -> np.ndarray:
    """Dataset fast path: uint8 (N, s, s) grayscale -> (N, C, size, size), resized to the
    spec's content size as ``preprocess`` resizes (only when s differs from it).

    Gives exactly what ``preprocess`` gives for each image (a test checks this)."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected uint8 (N, H, W) images with H = W, got {images.dtype} "
                         f"{images.shape}")
    checked = check_input_spec(input_spec)
    content_size = checked[2]
    unit = images.astype(np.float32) / 255.0
    if unit.shape[1:] != (content_size, content_size):
        unit = np.stack([_to_content_size(im, content_size) for im in unit])
    return _pad_and_normalise(unit[:, None], checked)
