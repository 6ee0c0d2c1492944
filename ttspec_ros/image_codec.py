"""sensor_msgs/Image and CompressedImage fields <-> numpy, without ROS or cv_bridge.

``decode_image`` takes the message fields (height, width, encoding, is_bigendian, step, data)
and returns (H, W) for mono8/mono16, (H, W, 3) RGB for rgb8/bgr8 and for the YUV 4:2:2 and
Bayer encodings in ``CONVERTED``, (H, W, 4) RGBA for rgba8/bgra8 (colour order normalised so
callers never care), or (H, W, C) float32 for the 32FC1/32FC3 frames the camera node
publishes. ``step`` (row stride, may include padding) and ``is_bigendian`` are honoured.
Malformed input raises ``ImageDecodeError`` whose ``reason`` is one of ``REASONS`` (the nodes
count rejections per reason).

Frames (camera -> classifier) carry the preprocessed (C, S, S) float32 tensor as a
``32FC{C}`` image of S x S pixels, channels interleaved (the ROS layout), native byte order:
``encode_frame`` / ``decode_frame``.
"""

from __future__ import annotations

import array
import sys
from typing import Any, Literal, get_args

import numpy as np

# encoding -> (channels, numpy dtype, reorder to RGB(A) by reversing the first 3 channels)
ENCODINGS: dict[str, tuple[int, np.dtype, bool]] = {
    "rgb8": (3, np.dtype(np.uint8), False),
    "bgr8": (3, np.dtype(np.uint8), True),
    "rgba8": (4, np.dtype(np.uint8), False),
    "bgra8": (4, np.dtype(np.uint8), True),
    "mono8": (1, np.dtype(np.uint8), False),
    "mono16": (1, np.dtype(np.uint16), False),
    "32FC1": (1, np.dtype(np.float32), False),
    "32FC3": (3, np.dtype(np.float32), False),
}
# Preprocessed model-input frames (the classifier's input), not camera images.
FRAME_ENCODINGS = ("32FC1", "32FC3")
# Camera encodings decoded to RGB by OpenCV, as cv_bridge does: packed YUV 4:2:2 (USB and
# CSI cameras; sensor_msgs' "yuv422" is UYVY and "yuv422_yuy2" YUYV, Jazzy adds the aliases)
# and raw 8-bit Bayer mosaics. encoding -> (bytes per pixel, cv2 conversion). OpenCV names a
# Bayer pattern by the second row's second and third pixels, so ROS's rggb is OpenCV's BG.
CONVERTED: dict[str, tuple[int, str]] = {
    "yuv422": (2, "COLOR_YUV2RGB_UYVY"), "uyvy": (2, "COLOR_YUV2RGB_UYVY"),
    "yuv422_yuy2": (2, "COLOR_YUV2RGB_YUY2"), "yuyv": (2, "COLOR_YUV2RGB_YUY2"),
    "bayer_rggb8": (1, "COLOR_BayerBG2RGB"), "bayer_bggr8": (1, "COLOR_BayerRG2RGB"),
    "bayer_gbrg8": (1, "COLOR_BayerGR2RGB"), "bayer_grbg8": (1, "COLOR_BayerGB2RGB"),
}
MAX_SIDE = 16384  # pixels; larger sides are treated as corrupt headers
MAX_BYTES = 256 * 1024 * 1024

# Why an image is refused; mypy checks that every ImageDecodeError names one of these.
Reason = Literal["unsupported_encoding", "zero_size", "absurd_size", "wrong_step", "truncated",
                 "data_length", "undecodable", "non_finite"]
REASONS: tuple[Reason, ...] = get_args(Reason)
NATIVE_BIG_ENDIAN = sys.byteorder == "big"


class ImageDecodeError(ValueError):
    """A malformed image; ``reason`` is one of REASONS, the message says what and why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _buffer(data: Any) -> np.ndarray:
    # bytes, bytearray, array.array('B') (rclpy's uint8[]), memoryview or ndarray; no copy
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def check_size(height: int, width: int, channels: int = 1, itemsize: int = 1) -> None:
    if height <= 0 or width <= 0:
        raise ImageDecodeError("zero_size", f"image is {height}x{width}: nothing to decode")
    if height > MAX_SIDE or width > MAX_SIDE or height * width * channels * itemsize > MAX_BYTES:
        raise ImageDecodeError(
            "absurd_size", f"image claims {height}x{width}x{channels} ({itemsize} B each); "
            f"the limit is {MAX_SIDE} px a side and {MAX_BYTES // 2**20} MiB")


def decode_image(height: int, width: int, encoding: str, is_bigendian: int | bool, step: int,
                 data: Any, *, frames: bool = True) -> np.ndarray:
    """Image message fields -> array (a copy; see the module docstring for shapes).
    ``frames=False``: camera images only (FRAME_ENCODINGS refused by name)."""
    if encoding in CONVERTED:
        channels, dtype, reverse = CONVERTED[encoding][0], np.dtype(np.uint8), False
    elif encoding in ENCODINGS and (frames or encoding not in FRAME_ENCODINGS):
        channels, dtype, reverse = ENCODINGS[encoding]
    else:
        known = [e for e in (*ENCODINGS, *CONVERTED) if frames or e not in FRAME_ENCODINGS]
        raise ImageDecodeError(
            "unsupported_encoding", f"encoding {encoding!r} is not supported; use one of {known}")
    height, width, step = int(height), int(width), int(step)
    check_size(height, width, channels, dtype.itemsize)
    if encoding in CONVERTED and channels == 2 and width % 2:
        raise ImageDecodeError("undecodable", f"{encoding} pairs pixels (4:2:2): its width "
                               f"must be even, got {width}")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes or step > MAX_BYTES:
        raise ImageDecodeError(
            "wrong_step", f"step {step} is too small for {width} px of {encoding} "
            f"({row_bytes} bytes a row)" if step < row_bytes else f"step {step} is absurd")
    buf = _buffer(data)
    if buf.size < step * height:
        raise ImageDecodeError(
            "truncated", f"{height} rows of step {step} need {step * height} bytes, "
            f"data has {buf.size}")
    if buf.size > step * height:
        raise ImageDecodeError(
            "data_length", f"data has {buf.size} bytes, but height*step = {step * height}")
    rows = buf.reshape(height, step)[:, :row_bytes]
    if dtype.itemsize > 1:
        # A row slice of a bigger buffer need not be aligned for the wider type: copy rows first.
        order: Literal[">", "<"] = ">" if is_bigendian else "<"
        image = np.ascontiguousarray(rows).view(dtype.newbyteorder(order))
        image = image.astype(dtype.newbyteorder("="), copy=False)
    else:
        image = rows
    image = image.reshape(height, width, channels)
    if encoding in CONVERTED:
        import cv2

        code = getattr(cv2, CONVERTED[encoding][1])
        return cv2.cvtColor(np.ascontiguousarray(image if channels == 2 else image[:, :, 0]),
                            code)
    if reverse:
        image = image[:, :, [2, 1, 0, 3][:channels]]
    if channels == 1 and encoding.startswith("mono"):
        image = image[:, :, 0]
    return np.array(image, copy=True, order="C")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Channels cv2.imdecode(IMREAD_UNCHANGED) makes of each PNG colour type, at most: palette images
# with transparency and gray + alpha both come out as BGRA.
PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC share the range but are not
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def header_claim(buf: np.ndarray) -> tuple[int, int, int, int] | None:
    """(height, width, channels, bytes per sample) a PNG or JPEG header claims, read before
    decoding so that a small file claiming a huge image is refused without allocating it
    (OpenCV's own cap is 2^30 pixels, up to 8 GiB at 4 channels of 16 bits); None for other
    formats or a header this does not understand."""
    if bytes(buf[:8]) == PNG_SIGNATURE and buf.size >= 26 and bytes(buf[12:16]) == b"IHDR":
        width, height = (int.from_bytes(bytes(buf[k : k + 4]), "big") for k in (16, 20))
        channels = PNG_CHANNELS.get(int(buf[25]))
        return (height, width, channels, 2 if buf[24] == 16 else 1) if channels else None
    if bytes(buf[:2]) != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= buf.size:  # walk the segments up to the first start of frame
        if buf[i] != 0xFF:
            return None
        marker = int(buf[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in JPEG_SOF:  # length, precision, height, width, components
            if i + 10 > buf.size:
                return None
            height, width = (int.from_bytes(bytes(buf[k : k + 2]), "big") for k in (i + 5, i + 7))
            if not height:  # 0: the height comes later (DNL)
                return None
            return height, width, int(buf[i + 9]), 2 if buf[i + 4] > 8 else 1
        i += 2 + (int(buf[i + 2]) << 8 | int(buf[i + 3]))
    return None


def _ends_jpeg(buf: np.ndarray, chunk: int = 4096) -> bool:
    """Whether a JPEG's bytes end with its end-of-image marker (FF D9), after any amount of
    zero padding: V4L2/UVC MJPEG buffers are often the driver's fixed buffer size, zero-filled
    after the image (a check of the last 64 bytes refused those as cut off). The zeros are
    skipped a chunk at a time from the end, so the cost is bounded by the padding."""
    end = buf.size
    while end > 0:
        start = max(0, end - chunk)
        nonzero = np.flatnonzero(buf[start:end])
        if nonzero.size:
            end = start + int(nonzero[-1]) + 1
            break
        end = start
    return b"\xff\xd9" in bytes(buf[max(0, end - 8):end])


def decode_compressed(format_: str, data: Any) -> np.ndarray:
    """CompressedImage, PNG or JPEG (what image_transport's compressed transport sends)
    -> (H, W) or RGB(A), uint8 or uint16."""
    import cv2

    buf = _buffer(data)
    if buf.size == 0:
        raise ImageDecodeError("zero_size", f"compressed image ({format_!r}) has no data")
    if buf.size > MAX_BYTES:
        raise ImageDecodeError("absurd_size", f"compressed image has {buf.size} bytes")
    claimed = header_claim(buf)
    if claimed is None:
        # Other formats (TIFF, WebP, ...) would be decoded blind: a few kB of TIFF can claim
        # gigabytes, which only OpenCV's own cap bounds.
        raise ImageDecodeError(
            "unsupported_encoding", f"compressed image ({format_!r}, {buf.size} bytes, first "
            f"bytes {bytes(buf[:8]).hex()}) has no PNG or JPEG header this can read; only PNG "
            "and JPEG are decoded")
    check_size(*claimed)
    if bytes(buf[:2]) == b"\xff\xd8" and not _ends_jpeg(buf):
        # A cut-off frame (common from USB cameras' MJPEG): OpenCV 4 (what rosdep installs)
        # decodes it with a warning and black rows for the missing part, which would be
        # answered and trained on. FF D9 (end of image) occurs nowhere else at a file's end:
        # entropy-coded data stuffs every FF. Zero padding after it is allowed.
        raise ImageDecodeError(
            "truncated", f"JPEG ({format_!r}, {buf.size} bytes) has no end-of-image marker: "
            "the frame was cut off")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageDecodeError(
            "undecodable", f"cv2.imdecode refused {buf.size} bytes (format {format_!r}): "
            f"{str(e).strip().splitlines()[-1]}") from e
    if image is None:
        raise ImageDecodeError(
            "undecodable", f"cv2.imdecode could not decode {buf.size} bytes (format {format_!r})")
    check_size(image.shape[0], image.shape[1], image.shape[2] if image.ndim == 3 else 1,
               image.itemsize)
    if image.dtype not in (np.uint8, np.uint16):  # the model's input takes neither
        raise ImageDecodeError(
            "unsupported_encoding", f"compressed image ({format_!r}) decodes to {image.dtype} "
            "pixels; only 8- or 16-bit unsigned images are taken")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def encode_image(image: np.ndarray, encoding: str) -> dict[str, Any]:
    """Array -> Image fields (height, width, encoding, is_bigendian, step, data as array('B')).

    ``image`` is laid out for ``encoding`` already (e.g. BGR order for bgr8)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r} is not supported; use one of {list(ENCODINGS)}")
    channels, dtype, _ = ENCODINGS[encoding]
    given = np.asarray(image).dtype
    if not (np.can_cast(given, dtype, "safe") or given.kind == np.dtype(dtype).kind == "f"):
        # a cast here would wrap (uint16 300 -> mono8 44) or truncate (0.5 -> 0) silently
        raise ValueError(f"{encoding} takes {np.dtype(dtype).name} pixels, got {given.name}; "
                         "convert them first")
    image = np.ascontiguousarray(image, dtype=dtype)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] != channels:
        raise ValueError(f"{encoding} needs (H, W, {channels}) data, got {image.shape}")
    h, w = image.shape[:2]
    return {"height": h, "width": w, "encoding": encoding, "is_bigendian": int(NATIVE_BIG_ENDIAN),
            # array('B'): Humble's generated setter checks a bytes value element by element in
            # Python (~40 ms for a 224x224x3 float frame); an array('B') skips that check.
            "step": w * channels * dtype.itemsize, "data": array.array("B", image.tobytes())}


def encode_frame(tensor: np.ndarray) -> dict[str, Any]:
    """Preprocessed (C, S, S) float32 -> 32FC{C} Image fields."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"a frame is (1 or 3, H, W) float32, got {tensor.shape}")
    return encode_image(np.transpose(tensor, (1, 2, 0)), f"32FC{tensor.shape[0]}")


def decode_frame(height: int, width: int, encoding: str, is_bigendian: int | bool, step: int,
                 data: Any) -> np.ndarray:
    """32FC1/32FC3 Image fields -> (C, H, W) float32 (contiguous)."""
    if encoding not in ("32FC1", "32FC3"):
        raise ImageDecodeError("unsupported_encoding",
                               f"frames must be 32FC1 or 32FC3, got {encoding!r}")
    image = decode_image(height, width, encoding, is_bigendian, step, data)
    if not np.isfinite(image).all():
        # NaN never passes a threshold and argmax of NaN logits is class 0: an answer that
        # looks real. Preprocessed frames are always finite, so this is a broken sender.
        raise ImageDecodeError("non_finite", "frame holds NaN or infinite values")
    return np.ascontiguousarray(np.transpose(image, (2, 0, 1)))
