"""Five ImageNet-C corruptions re-implemented with numpy + cv2, re-scaled for 28-px images.

The definitions follow ImageNet-C (Hendrycks & Dietterich 2019, the ``imagecorruptions``
package); only the severity parameters change, because ImageNet-C's are tuned for 224-px photos
and Fashion-MNIST frames are 28 px (the model's 28-px content inside its 32-px input). They were
chosen so that accuracy falls monotonically with severity and severity 5 is hard but still
informative. In brackets: last-exit accuracy on the first 1000 test images, severities 1 ... 5,
of the demo model the ladders were chosen with (eb97cba2d245, shift-augmented, 88.6 % clean).
The current demo model (47757d76bccd, 90.4 % clean, trained without shifts) is hit harder by
all but zoom blur, most by motion blur; still monotone in severity: gaussian_noise 87, 78, 64,
46, 28; motion_blur 83, 62, 45, 31, 25; zoom_blur 86, 78, 67, 60, 54; contrast 55, 48, 38, 30,
21; pixelate 84, 77, 63, 49, 39 %.

- ``gaussian_noise``: x + N(0, sigma), clipped to [0, 1]. A per-pixel corruption, so the
  ImageNet-C sigmas 0.08 ... 0.38 are kept unchanged (87, 81, 68, 55, 35 %).
- ``motion_blur``: ImageNet-C's kernel (``imagecorruptions``): a one-sided Gaussian of width
  2*radius+1 and scale sigma along a line at a random angle in [-45, 45] degrees, edges
  replicated. ImageNet-C's (radius, sigma) at 224 px are (10,3) ... (20,15); a geometric
  rescale (x 28/224) gives sigma <= 1.9 px, which the shift-augmented demo model shrugs off
  (71 % at sigma 5). Here sigma = 2, 3.5, 5, 6.5, 8 px, radius = ceil(2 * sigma)
  (85, 77, 70, 61, 51 %).
- ``zoom_blur``: the mean of the image and 11 copies zoomed about the centre by factors evenly
  spaced up to z. ImageNet-C's z = 1.10 ... 1.30 barely blur a 28-px frame (a small RevCol
  keeps ~80 %); here z = 1.16 ... 1.80 (85, 77, 68, 60, 53 %).
- ``contrast``: (x - mean) * c + mean, mean over the image (per channel). ImageNet-C's
  c = 0.4 ... 0.05; at 0.05 a 28-px uint8 frame keeps ~4 grey levels of spread (near chance), so
  here c = 0.4, 0.3, 0.2, 0.15, 0.1 (69, 60, 48, 39, 29 %).
- ``pixelate``: box-downsample to a side of s px, then nearest-neighbour (half-pixel exact) back
  up. ImageNet-C's factors 0.6 ... 0.25 of the side mean s = 17 ... 7 at 28 px; accuracy is not
  monotone in s (it depends on how the blocks meet the 4-px stem patches: s = 11 scores above
  s = 13), so the ladder is s = 13, 10, 8, 6, 5 (84, 78, 72, 62, 46 %).

``SEVERITY_PARAMS`` holds the values used here, ``IMAGENET_C_PARAMS`` the originals; both are
written into every dataset index and experiment JSON (``parameter_mapping()``). Pixel-size
parameters are for 28-px images and scale with the image side for other sizes.

Determinism: every corrupted image depends only on (seed, source, corruption, severity, image
index), through ``image_rng``, so any subset of a dataset is corrupted exactly as the full set.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import cv2
import numpy as np

from ttspec_ros.checks import is_integer

REFERENCE_SIDE = 28  # pixel-size parameters below are for 28-px images
SEVERITIES = (1, 2, 3, 4, 5)

IMAGENET_C_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "motion_blur": [[10, 3], [15, 5], [15, 8], [15, 12], [20, 15]],
    "zoom_blur": [1.10, 1.15, 1.20, 1.25, 1.30],
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
}

SEVERITY_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],  # sigma in [0, 1] units
    "motion_blur": [2.0, 3.5, 5.0, 6.5, 8.0],  # sigma in px; radius = ceil(2 * sigma)
    "zoom_blur": [1.16, 1.32, 1.48, 1.64, 1.80],  # largest zoom factor
    "contrast": [0.4, 0.3, 0.2, 0.15, 0.1],  # contrast factor
    "pixelate": [13, 10, 8, 6, 5],  # reduced side in px (of 28)
}
PARAM_UNITS: dict[str, str] = {
    "gaussian_noise": "noise std in [0,1] intensity units (ImageNet-C: same)",
    "motion_blur": "Gaussian sigma in px at 28 px, radius = ceil(2*sigma), angle U(-45,45) deg "
    "(ImageNet-C: [radius, sigma] in px at 224 px)",
    "zoom_blur": "largest zoom z; the image and 11 zooms evenly spaced in (1, z] are averaged "
    "(ImageNet-C: largest zoom, steps of .01-.03)",
    "contrast": "factor on (x - mean) (ImageNet-C: same)",
    "pixelate": "reduced side in px of a 28-px image (ImageNet-C: factor of the side)",
}
ZOOM_STEPS = 12


def _check(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"corruptions take uint8 images, got {getattr(image, 'dtype', image)}")
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 4 or (
            image.ndim == 3 and not 1 <= image.shape[2] <= 4):  # cv2.resize takes up to 4
        raise ValueError(f"expected an (H, W) or (H, W, C) image with C 1 to 4, at least "
                         f"4x4; got {image.shape}")
    return image.astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _scale(x: np.ndarray) -> float:
    return min(x.shape[:2]) / REFERENCE_SIDE


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _check(image)
    sigma = SEVERITY_PARAMS["gaussian_noise"][severity - 1]
    return _to_uint8(x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _check(image)
    c = SEVERITY_PARAMS["contrast"][severity - 1]
    # ImageNet-C: the mean of each channel (a grey image's single mean, computed as before)
    mean = x.mean(axis=(0, 1), keepdims=True) if x.ndim == 3 else x.mean()
    return _to_uint8((x - mean) * c + mean)


def motion_blur_kernel(sigma: float, angle_deg: float) -> np.ndarray:
    """ImageNet-C's motion kernel: weights exp(-i^2 / 2 sigma^2), i = 0..2*radius, placed along
    a line at ``angle_deg`` starting at the kernel centre (a one-sided streak)."""
    radius = max(1, math.ceil(2.0 * sigma))
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2.0 * sigma**2))
    weights /= weights.sum()
    size = 2 * width + 1
    kernel = np.zeros((size, size), dtype=np.float64)
    dy, dx = math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))
    for i, w in enumerate(weights):
        kernel[width + round(i * dy), width + round(i * dx)] += w
    return kernel.astype(np.float32)


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _check(image)
    sigma = SEVERITY_PARAMS["motion_blur"][severity - 1] * _scale(x)
    kernel = motion_blur_kernel(sigma, float(rng.uniform(-45.0, 45.0)))
    # filter2D returns (H, W) for an (H, W, 1) image
    return _to_uint8(cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REPLICATE)
                     .reshape(x.shape))


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom about the image centre by ``factor`` keeping the size (ImageNet-C's clipped_zoom)."""
    h, w = x.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    matrix = np.array(
        [[factor, 0.0, cx * (1.0 - factor)], [0.0, factor, cy * (1.0 - factor)]], dtype=np.float64
    )
    return cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _check(image)
    largest = SEVERITY_PARAMS["zoom_blur"][severity - 1]
    total = x.copy()
    for factor in np.linspace(1.0, largest, ZOOM_STEPS)[1:]:
        total += _zoom(x, float(factor)).reshape(x.shape)
    return _to_uint8(total / ZOOM_STEPS)


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _check(image)
    h, w = x.shape[:2]
    side = SEVERITY_PARAMS["pixelate"][severity - 1] * _scale(x)
    small = (max(1, round(w * side / min(h, w))), max(1, round(h * side / min(h, w))))
    down = cv2.resize(x, small, interpolation=cv2.INTER_AREA)
    up = cv2.resize(down, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)  # no half-pixel shift
    return _to_uint8(up.reshape(x.shape))


CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "contrast": contrast,
    "pixelate": pixelate,
}
BLUR_CORRUPTIONS = ("motion_blur", "zoom_blur")


def _check_name_severity(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    # not ``in`` alone: True == 1 and 5.0 == 5 would pass it (and 5.0 then fails as an index)
    if not is_integer(severity) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


def _tag(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))  # stable across runs, unlike hash()


def image_rng(seed: int, source: str, name: str, severity: int, index: int) -> np.random.Generator:
    """The generator that corrupts image ``index`` of ``source`` (e.g. "test", "pool")."""
    if int(seed) < 0 or int(index) < 0:  # numpy's own message names neither
        raise ValueError(f"corruption seed and image index must be >= 0, got seed {seed}, "
                         f"index {index}")
    return np.random.default_rng([int(seed), _tag(source), _tag(name), int(severity), int(index)])


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image (H, W) or (H, W, C) -> the corrupted uint8 image of the same shape."""
    _check_name_severity(name, severity)
    return CORRUPTIONS[name](image, severity, rng)


def corrupt_images(
    images: np.ndarray,
    name: str,
    severity: int,
    *,
    seed: int,
    source: str,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> corrupted copy; image i is seeded by ``indices[i]`` (its index in
    ``source``; default 0..N-1) so results do not depend on which subset is corrupted."""
    _check_name_severity(name, severity)
    if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
        shape = getattr(images, "shape", images)
        raise ValueError(f"expected uint8 (N, H, W[, C]) images, got {shape}")
    ids = np.arange(len(images)) if indices is None else np.asarray(indices)
    if ids.shape != (len(images),):
        raise ValueError(f"need one index per image: {len(images)} images, {ids.shape} indices")
    fn = CORRUPTIONS[name]
    out = np.empty_like(images)
    for i, (image, index) in enumerate(zip(images, ids, strict=True)):
        out[i] = fn(image, severity, image_rng(seed, source, name, severity, int(index)))
    return out


def parameter_mapping() -> dict:
    """JSON-ready record of the severity parameters used here and ImageNet-C's originals."""
    return {
        "reference_side_px": REFERENCE_SIDE,
        "severities": list(SEVERITIES),
        "params": {k: list(v) for k, v in SEVERITY_PARAMS.items()},
        "units": dict(PARAM_UNITS),
        "imagenet_c_params": {k: list(v) for k, v in IMAGENET_C_PARAMS.items()},
        "zoom_steps": ZOOM_STEPS,
    }
