"""Image message fields <-> numpy: every encoding, padded steps, both byte orders, bad input."""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest

from ttspec_ros.image_codec import (
    ImageDecodeError,
    decode_compressed,
    decode_frame,
    decode_image,
    encode_frame,
    encode_image,
    header_claim,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
MONO16 = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)


def _fields(image: np.ndarray, encoding: str, pad: int = 0, big: bool = False) -> dict:
    """Fields laid out by hand: ``pad`` bytes after every row, explicit byte order."""
    image = image if image.ndim == 3 else image[:, :, None]
    raw = image.astype(image.dtype.newbyteorder(">" if big else "<"))
    rows = raw.reshape(image.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 0xAB, np.uint8)], axis=1)
    return {"height": image.shape[0], "width": image.shape[1], "encoding": encoding,
            "is_bigendian": int(big), "step": padded.shape[1], "data": padded.tobytes()}


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(("encoding", "source", "expected"), [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1], RGB),
    ("rgba8", RGBA, RGBA),
    ("bgra8", RGBA[:, :, [2, 1, 0, 3]], RGBA),
    ("mono8", RGB[:, :, 0], RGB[:, :, 0]),
])
def test_8bit_encodings_come_back_as_rgb_or_gray(encoding, source, expected, pad):
    out = decode_image(**_fields(source, encoding, pad))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("pad", [0, 1, 4])
def test_mono16_honours_byte_order_and_unaligned_step(big, pad):
    out = decode_image(**_fields(MONO16, "mono16", pad, big))
    assert out.dtype == np.uint16 and out.dtype.isnative
    np.testing.assert_array_equal(out, MONO16)


def test_rclpy_style_array_data_is_accepted():
    f = _fields(RGB, "rgb8")
    f["data"] = array.array("B", f["data"])
    np.testing.assert_array_equal(decode_image(**f), RGB)


def test_encoded_data_is_an_array_of_bytes_not_bytes():
    # Humble's generated Image setter checks a bytes value byte by byte in Python (tens of ms
    # per camera-sized frame); an array('B') is taken as it is.
    data = encode_frame(np.zeros((3, 4, 4), np.float32))["data"]
    assert isinstance(data, array.array) and data.typecode == "B" and len(data) == 3 * 16 * 4


def test_frame_round_trip_keeps_the_tensor():
    tensor = RNG.standard_normal((3, 8, 8)).astype(np.float32)
    fields = encode_frame(tensor)
    assert fields["encoding"] == "32FC3" and fields["step"] == 8 * 3 * 4
    np.testing.assert_array_equal(decode_frame(**fields), tensor)
    one = tensor[:1]
    np.testing.assert_array_equal(decode_frame(**encode_frame(one)), one)


def test_big_endian_float_frames_are_swapped():
    tensor = RNG.standard_normal((1, 4, 4)).astype(np.float32)
    big = _fields(np.transpose(tensor, (1, 2, 0)), "32FC1", big=True)
    np.testing.assert_array_equal(decode_frame(**big), tensor)


def test_encode_image_round_trip():
    np.testing.assert_array_equal(decode_image(**encode_image(MONO16, "mono16")), MONO16)
    with pytest.raises(ValueError, match="needs"):
        encode_image(RGB, "mono8")
    # values that do not fit are refused, not wrapped or truncated
    for image, encoding in ((MONO16, "mono8"), (np.full((2, 2), 0.5), "mono8"),
                            (np.full((2, 2), -1), "mono16")):
        with pytest.raises(ValueError, match=f"{encoding} takes uint"):
            encode_image(image, encoding)
    # a safe cast is fine: uint8 into mono16, float64 into a float frame
    assert decode_image(**encode_image(RGB[..., 0], "mono16")).dtype == np.uint16
    frame = encode_image(np.zeros((2, 2, 1)), "32FC1")
    assert frame["step"] == 2 * 4


@pytest.mark.parametrize(("change", "reason"), [
    ({"encoding": "nv12"}, "unsupported_encoding"),
    ({"encoding": "RGB8"}, "unsupported_encoding"),
    ({"height": 0}, "zero_size"),
    ({"width": 0, "step": 0}, "zero_size"),
    ({"height": 100000}, "absurd_size"),
    ({"height": 10000, "width": 10000, "step": 30000}, "absurd_size"),
    ({"step": 20}, "wrong_step"),
    ({"step": 10**12}, "wrong_step"),
    ({"data": bytes(21 * 5 - 1)}, "truncated"),
    ({"data": b""}, "truncated"),
    ({"data": bytes(21 * 5 + 7)}, "data_length"),
])
def test_malformed_images_raise_with_reason(change, reason):
    fields = {**_fields(RGB, "rgb8"), **change}
    with pytest.raises(ImageDecodeError) as err:
        decode_image(**fields)
    assert err.value.reason == reason
    assert str(err.value)  # says what is wrong


def test_camera_images_do_not_take_frame_encodings():
    """A depth user told '32FC1' is supported had the camera refuse it later with a dtype
    message that named no encoding: camera images (frames=False) refuse it by name."""
    fields = _fields(np.zeros((2, 2, 1), np.float32), "32FC1")
    assert decode_image(**fields).shape == (2, 2, 1)  # as a model-input frame
    with pytest.raises(ImageDecodeError) as err:
        decode_image(**fields, frames=False)
    assert err.value.reason == "unsupported_encoding"
    assert "'32FC1' is not supported" in str(err.value) and "'32FC3'" not in str(err.value)


def test_frames_must_be_float():
    with pytest.raises(ImageDecodeError, match="32FC1 or 32FC3"):
        decode_frame(**_fields(RGB, "rgb8"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_frames_are_refused(bad):
    # argmax of NaN logits is class 0: without this a broken sender gets confident answers
    tensor = np.zeros((1, 8, 8), np.float32)
    tensor[0, 3, 5] = bad
    with pytest.raises(ImageDecodeError) as err:
        decode_frame(**encode_frame(tensor))
    assert err.value.reason == "non_finite"


def test_compressed_png_and_jpeg():
    ok, png = cv2.imencode(".png", RGB[:, :, ::-1])  # cv2 writes BGR
    assert ok
    np.testing.assert_array_equal(decode_compressed("png", png.tobytes()), RGB)
    ok, jpg = cv2.imencode(".jpg", np.full((16, 16), 128, np.uint8))
    gray = decode_compressed("jpeg", jpg.tobytes())
    assert gray.shape == (16, 16) and abs(int(gray.mean()) - 128) <= 2


@pytest.mark.parametrize("kept", [0.2, 0.5, 0.95, 0.999])
def test_a_cut_off_jpeg_is_refused_whatever_the_decoder_does(kept):
    """OpenCV 4 (rosdep's python3-opencv) decodes a truncated JPEG with black rows for the rest
    and a warning; the end-of-image marker is checked first, so no OpenCV version answers it."""
    rng = np.random.default_rng(0)
    jpg = cv2.imencode(".jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))[1].tobytes()
    with pytest.raises(ImageDecodeError) as err:
        decode_compressed("rgb8; jpeg compressed bgr8", jpg[: int(len(jpg) * kept)])
    assert err.value.reason == "truncated" and "end-of-image marker" in str(err.value)
    padded = decode_compressed("jpeg", jpg + bytes(16))  # zero padding after the marker
    assert padded.shape == (48, 64, 3)


@pytest.mark.parametrize("pad", [63, 64, 200, 4096, 4097, 100_000])
def test_jpeg_with_a_drivers_zero_padding_after_its_end_is_decoded(pad):
    """V4L2/UVC MJPEG buffers are zero-filled to the driver's buffer size: more than ~62
    padding bytes after FF D9 were refused as a cut-off frame."""
    rng = np.random.default_rng(0)
    jpg = cv2.imencode(".jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))[1].tobytes()
    assert decode_compressed("jpeg", jpg + bytes(pad)).shape == (48, 64, 3)
    with pytest.raises(ImageDecodeError) as err:  # cut off, then padded: still refused
        decode_compressed("jpeg", jpg[: len(jpg) // 2] + bytes(pad))
    assert err.value.reason == "truncated"


_PNG_HEAD = cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()[:33]  # up to IHDR's end


@pytest.mark.parametrize(("data", "reason"), [(b"", "zero_size"),
                                              (b"not an image", "unsupported_encoding"),
                                              (_PNG_HEAD, "undecodable")])
def test_bad_compressed_images(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_compressed("jpeg", data)
    assert err.value.reason == reason


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_header_claiming_too_many_pixels_is_refused_before_decoding(ext):
    # cv2.imdecode would allocate what the header claims (up to 2^30 pixels) or raise
    # cv2.error (the camera node used to die of it): the header is read first.
    ok, encoded = cv2.imencode(ext, np.zeros((4, 4), np.uint8))
    data = bytearray(encoded.tobytes())
    if ext == ".png":
        data[16:24] = (40000).to_bytes(4, "big") * 2  # IHDR width and height
        claimed = (40000, 40000)
    else:
        sof = data.index(b"\xff\xc0")  # baseline start of frame: height, width at +5, +7
        data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
        claimed = (20000, 20000)
    assert header_claim(np.frombuffer(bytes(data), np.uint8)) == (*claimed, 1, 1)
    with pytest.raises(ImageDecodeError) as err:
        decode_compressed(ext[1:], bytes(data))
    assert err.value.reason == "absurd_size"
    assert header_claim(encoded) == (4, 4, 1, 1)  # a real header reads right


def test_a_header_is_checked_with_its_channels_and_sample_size():
    # 8000x8000 pixels pass the pixel count, but as 16-bit RGB they are 384 MiB: the limit is on
    # what decoding would allocate (a few hundred bytes of zeros can claim that).
    ok, encoded = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint16))
    data = bytearray(encoded.tobytes())
    assert header_claim(np.frombuffer(bytes(data), np.uint8)) == (4, 4, 3, 2)
    data[16:24] = (8000).to_bytes(4, "big") * 2
    with pytest.raises(ImageDecodeError) as err:
        decode_compressed("png", bytes(data))
    assert err.value.reason == "absurd_size" and "8000x8000x3 (2 B each)" in str(err.value)
    ok, rgba = cv2.imencode(".png", np.zeros((4, 4, 4), np.uint16))
    assert decode_compressed("png", rgba.tobytes()).shape == (4, 4, 4)


@pytest.mark.parametrize(("ext", "image"), [(".tiff", np.ones((4, 4, 3), np.float64)),
                                            (".tiff", np.ones((4, 4), np.uint8)),
                                            (".bmp", np.ones((4, 4, 3), np.uint8))])
def test_compressed_formats_other_than_png_and_jpeg_are_refused(ext, image):
    # Their size is not known before decoding (a small TIFF can claim gigabytes); a float64
    # colour TIFF also made cv2.cvtColor raise cv2.error, of which the camera node died.
    try:
        ok, encoded = cv2.imencode(ext, image)
    except cv2.error as e:  # OpenCV 4.5 (Ubuntu 22.04) writes no float64 TIFF
        pytest.skip(f"this OpenCV cannot write the {image.dtype} {ext}: {e}")
    assert ok
    with pytest.raises(ImageDecodeError) as err:
        decode_compressed(ext[1:], encoded.tobytes())
    assert err.value.reason == "unsupported_encoding" and "only PNG and JPEG" in str(err.value)


# Flat colour patches: 4:2:2 and Bayer keep a flat colour exactly up to rounding.
PATCHES = np.kron(np.array([[[200, 30, 40], [20, 180, 60]], [[30, 50, 210], [240, 240, 240]]],
                           np.uint8), np.ones((4, 4, 1), np.uint8))  # 8x8x3 RGB


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(("encoding", "to_yuv"), [
    ("yuv422", "COLOR_RGB2YUV_UYVY"), ("uyvy", "COLOR_RGB2YUV_UYVY"),
    ("yuv422_yuy2", "COLOR_RGB2YUV_YUY2"), ("yuyv", "COLOR_RGB2YUV_YUY2"),
])
def test_yuv422_encodings_come_back_as_rgb(encoding, to_yuv, pad):
    if not hasattr(cv2, to_yuv):  # OpenCV 4.5 (Ubuntu 22.04) converts from 4:2:2 only
        pytest.skip(f"this OpenCV has no {to_yuv} to build the test image")
    packed = cv2.cvtColor(PATCHES, getattr(cv2, to_yuv))  # (H, W, 2) in the encoding's order
    out = decode_image(**_fields(packed, encoding, pad))
    assert out.shape == PATCHES.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - PATCHES).max() <= 3
    # The other byte order gives other colours: the encoding names decide the order.
    other = "yuv422_yuy2" if encoding in ("yuv422", "uyvy") else "yuv422"
    assert np.abs(decode_image(**_fields(packed, other)).astype(int) - PATCHES).max() > 50


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """The raw Bayer frame a sensor with ``pattern`` (e.g. "rggb": R G / G B) would give."""
    channel = {"r": 0, "g": 1, "b": 2}
    raw = np.empty(rgb.shape[:2], np.uint8)
    for k, c in enumerate(pattern):
        raw[k // 2::2, k % 2::2] = rgb[k // 2::2, k % 2::2, channel[c]]
    return raw


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_encodings_are_demosaiced_to_rgb(pattern):
    image = np.kron(PATCHES[::4, ::4], np.ones((8, 8, 1), np.uint8))  # 16x16, 8-px patches
    out = decode_image(**_fields(_mosaic(image, pattern), f"bayer_{pattern}8", pad=2))
    assert out.shape == image.shape
    inner = (slice(2, 6), slice(2, 6))  # away from patch edges, where demosaicing blends
    for r in (0, 8):
        for c in (0, 8):
            block = out[r:r + 8, c:c + 8][inner].astype(int)
            assert np.abs(block - image[r + 3, c + 3]).max() <= 2, (pattern, r, c)


def test_yuv422_with_an_odd_width_is_refused():
    fields = {"height": 2, "width": 3, "encoding": "yuv422", "is_bigendian": 0, "step": 6,
              "data": bytes(12)}
    with pytest.raises(ImageDecodeError, match="width must be even") as err:
        decode_image(**fields)
    assert err.value.reason == "undecodable"
