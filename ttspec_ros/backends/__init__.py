"""Inference backends for the cascade's backbone: torch, ONNX Runtime (CPU), TensorRT (CUDA).

Every backend is a staged backbone (``num_exits``, ``run_stage(i, carry) -> (carry, pooled)``,
the protocol of ``ttspec_ros.cascade``); the exit heads stay in torch inside the cascade, so
head updates apply identically whatever runs the backbone. Backends other than torch run
fixed exported graphs: strategies that change backbone parameters need torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ttspec_ros.checks import is_integer

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a library's version string ("1.26.0", "8.5.2.2"); None if it has
    none (a custom build), so callers decide what an unknown release may do."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message names what is missing."""


def check_image_size(image_size: Any) -> tuple[int, int]:
    """(height, width) of an ``image_size`` given as one integer or a pair of integers (a
    tuple or list), all positive; ValueError otherwise. A float, a string or a 1-tuple got
    as far as unpacking the size mid-setup and failed there as a TypeError or ValueError
    that named nothing (bools are refused: ``True`` is not a size)."""
    if is_integer(image_size):
        sides = [image_size, image_size]
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        sides = list(image_size)
    else:
        sides = []
    if len(sides) != 2 or not all(is_integer(v) and v > 0 for v in sides):
        raise ValueError(
            "image_size must be a positive integer or a pair of positive integers "
            f"(height, width), got {image_size!r}"
        )
    return int(sides[0]), int(sides[1])


def check_num_threads(num_threads: Any) -> int | None:
    """``num_threads`` as an int, None for the library's default; ValueError for anything but
    an integer >= 1 (1.5 and True were int()-ed silently, 0 refused only after an export)."""
    if num_threads is None:
        return None
    if not is_integer(num_threads) or num_threads < 1:
        raise ValueError(f"num_threads must be None or an integer >= 1, got {num_threads!r}")
    return int(num_threads)


def default_cache_dir() -> Path:
    """Where exported graphs and TensorRT engines are kept when no cache_dir is given."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ttspec_ros"


def require_torch_for_strategy(backend: str, strategy: str, *, changes_backbone: bool) -> None:
    """Refuse a strategy that changes backbone parameters on a backend running fixed graphs."""
    if changes_backbone and backend != "torch":
        raise ValueError(
            f"strategy {strategy!r} changes backbone parameters, which only the torch backend "
            f"can apply at run time; backend {backend!r} runs exported graphs/engines of a fixed "
            "backbone (only the exit heads stay updatable). Use backend 'torch' for it."
        )


def create_backbone(
    name: str,
    model,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    precision: str = "fp32",
):
    """Staged backbone for ``model`` (a RevCol) on backend ``name``.

    ``image_size`` (input height/width, static in exported graphs) is needed by onnxruntime
    and tensorrt. ``cache_dir`` keeps exported graphs (and TensorRT engines); onnxruntime
    without one exports to a temporary directory on every start, tensorrt defaults to
    ``default_cache_dir()`` because engine builds take minutes. ``precision`` (fp32 | fp16)
    applies to tensorrt only. Raises BackendUnavailable naming what is missing.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    # Checked before anything is imported, exported or built, so a bad value costs nothing.
    num_threads = check_num_threads(num_threads)
    if image_size is not None:
        image_size = check_image_size(image_size)
    if name == "torch":
        return _torch_backbone(model, device, num_threads)
    if image_size is None:
        raise ValueError(f"backend {name!r} needs image_size (its graphs have static shapes)")
    if name == "onnxruntime":
        return _onnxruntime_backbone(model, device, num_threads, cache_dir, image_size)
    return _tensorrt_backbone(model, device, cache_dir, image_size, precision)


def _torch_backbone(model, device: str, num_threads: int | None):
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"backend 'torch' on device {device!r} needs CUDA, but torch {torch.__version__} "
            "sees no CUDA device"
        )
    if num_threads is not None:  # checked by create_backbone
        torch.set_num_threads(num_threads)  # process-wide: torch has no per-model setting
    from ttspec_ros.cascade import TorchBackbone

    return TorchBackbone(model.to(dev))


def _onnxruntime_backbone(model, device: str, num_threads, cache_dir, image_size):
    if device != "cpu":
        raise BackendUnavailable(
            f"backend 'onnxruntime' runs on the CPU execution provider only; device {device!r} "
            "is not supported (use backend 'tensorrt' on a CUDA device)"
        )
    try:
        import onnx  # noqa: F401  (the export needs it)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'onnxruntime' needs the `onnx` and `onnxruntime` packages: {e}"
        ) from e
    from ttspec_ros.backends.onnx_export import ensure_exported
    from ttspec_ros.backends.onnxruntime_backend import OnnxRuntimeBackbone

    if cache_dir is not None:
        graph_dir = ensure_exported(model, image_size, cache_dir)
        return OnnxRuntimeBackbone(graph_dir, num_threads=num_threads)
    with tempfile.TemporaryDirectory(prefix="ttspec-onnx-") as tmp:
        # Sessions read the graphs when created, so the directory can go afterwards.
        return OnnxRuntimeBackbone(ensure_exported(model, image_size, tmp), num_threads=num_threads)


def _tensorrt_backbone(model, device: str, cache_dir, image_size, precision: str):
    from ttspec_ros.backends.onnx_export import ensure_exported
    from ttspec_ros.backends.tensorrt_backend import (
        PRECISIONS,
        TensorRTBackbone,
        cuda_device,
        import_tensorrt,
    )

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    import_tensorrt()  # fail before exporting anything
    cuda_device(device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        graph_dir = ensure_exported(model, image_size, cache)
    except ImportError as e:  # graphs already exported in the cache need no `onnx`
        raise BackendUnavailable(
            f"backend 'tensorrt' builds its engines from ONNX graphs, and {cache} holds none "
            f"for this model yet; exporting them needs the `onnx` package: {e}"
        ) from e
    return TensorRTBackbone(
        graph_dir, cache_dir=cache / "engines", precision=precision, device=device
    )


__all__ = [
    "BACKENDS", "BackendUnavailable", "check_image_size", "check_num_threads", "create_backbone",
    "default_cache_dir", "require_torch_for_strategy",
]
