"""The ``ModelUpdate`` payload without ROS: named float32 tensors with a model id and a version.

The adapter exports one, the classifier applies it (``Cascade.apply_update``). ``to_msg`` /
``from_msg`` convert to and from the generated ``ModelUpdate`` / ``NamedTensor`` messages,
which are imported lazily (or passed in), so the core never imports rclpy. ``save_payload`` /
``load_payload`` keep one as a safetensors file (metadata: model id and version).
``PublishedRecord`` is the adapter's note of the last version it published.
"""

from __future__ import annotations

import array
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from ttspec_ros.checks import is_integer
from ttspec_ros.files import atomic_write_bytes, safetensors_bytes, write_json

if TYPE_CHECKING:  # torch tensors are accepted without importing torch here
    from torch import Tensor

_MAX_UINT64 = 2**64 - 1
# Largest version a saved state or record may hold. The adapter publishes the sum of its two
# engines' versions and a resume offset (each at most this + 1), which stays a uint64 with
# 2**62 updates to go; a larger number in a file is corruption, and taken up it would make
# every later export fail.
MAX_SAVED_VERSION = 2**62


_NO_TENSORS: Mapping[str, Any] = MappingProxyType({})


# init=False: the constructor takes arrays or tensors (anything numpy can convert), the
# payload holds float32 arrays; a generated __init__ would give both the one field type.
@dataclass(frozen=True, init=False)
class ModelUpdatePayload:
    """Tensors (state-dict name -> float32 array) a classifier applies all at once."""

    model_id: str
    version: int
    tensors: dict[str, np.ndarray]

    def __init__(self, model_id: str, version: int,
                 tensors: Mapping[str, npt.ArrayLike | Tensor] = _NO_TENSORS) -> None:
        if not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str, got {type(model_id).__name__}")
        # A bool is an int to Python: True would pass as version 1.
        if not is_integer(version) or not 0 <= version <= _MAX_UINT64:
            raise ValueError(f"version must be an integer in 0..2**64-1, got {version!r}")
        checked = {}
        for name, value in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            try:
                source = as_numpy(value)
            except TypeError as e:  # e.g. a bfloat16 tensor, which numpy has no type for
                raise ValueError(f"tensor {name!r}: not convertible to float32 ({e})") from e
            # Real numbers only: the cast would drop imaginary parts and turn bools into 0/1.
            if source.dtype.kind not in "fiu":
                raise ValueError(f"tensor {name!r} has dtype {source.dtype}, need float or "
                                 "integer numbers")
            # A copy: a view of the caller's parameter or array would change after validation.
            # Left writable, as consumers turn them into tensors (torch.as_tensor warns on
            # read-only arrays).
            t = np.array(source, dtype=np.float32, order="C", copy=True)
            if not within_magnitude([t]):  # one pass; NaN and infinity fail it too
                if not all_finite([t]):
                    raise ValueError(f"tensor {name!r} holds NaN or infinite values")
                raise ValueError(f"tensor {name!r} holds values beyond +-{MAX_MAGNITUDE:g} "
                                 "(a diverged or damaged state)")
            checked[name] = t
        object.__setattr__(self, "model_id", model_id)
        object.__setattr__(self, "version", int(version))
        object.__setattr__(self, "tensors", checked)


# No head or normalisation tensor of a working model comes near this (trained heads hold
# values of order 1; at 1e6, features of order 1 give logits of order 1e6): values past it are
# a diverged or damaged state. The Specializer undoes steps that reach it (before, lr 0.05
# with momentum 0.9 on the demo model grew the heads to 1e12, all finite, and they were
# published: cascade accuracy 0.886 -> 0.43), and updates and saved states holding such
# values are refused (a damaged state file's 1e30 heads loaded and would have gone out).
MAX_MAGNITUDE = 1e6


def within_magnitude(arrays: Any) -> bool:
    """Whether every value lies strictly within +-MAX_MAGNITUDE (NaN fails both comparisons;
    min/max make no temporaries the size of a 1000-class head)."""
    for a in arrays:
        a = as_numpy(a)
        if a.size and not (-MAX_MAGNITUDE < float(a.min()) and float(a.max()) < MAX_MAGNITUDE):
            return False
    return True


def all_finite(arrays: Any) -> bool:
    """Whether every array or tensor in ``arrays`` holds only finite values. numpy, not
    torch.isfinite: on 1000-class heads torch's took ~20x longer (1 thread)."""
    return all(bool(np.isfinite(as_numpy(a)).all()) for a in arrays)


def as_numpy(value: Any) -> np.ndarray:
    """An array of ``value`` (a torch tensor is detached and moved to the CPU first; torch
    is not imported here)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _message_classes(msg_module: ModuleType | None) -> tuple[type, type]:
    if msg_module is None:
        # Generated by the ROS build; only the nodes (which run inside ROS) reach this import.
        from ttspec_ros import msg
        msg_module = msg
    return msg_module.ModelUpdate, msg_module.NamedTensor


def to_msg(payload: ModelUpdatePayload, msg_module: ModuleType | None = None) -> Any:
    """A ``ModelUpdate`` message (header left for the caller to stamp).

    ``msg_module`` is anything with ``ModelUpdate`` and ``NamedTensor`` attributes (default:
    the generated ``ttspec_ros.msg``)."""
    model_update_cls, named_tensor_cls = _message_classes(msg_module)
    msg = model_update_cls()
    msg.model_id = payload.model_id
    msg.version = payload.version
    tensors = []
    for name, t in payload.tensors.items():
        nt = named_tensor_cls()
        nt.name = name
        nt.shape = array.array("I", [int(d) for d in t.shape])
        # array('f', bytes) copies the buffer without a per-element Python loop; array('f')
        # is native-endian, so the bytes must be too.
        nt.data = array.array("f", t.astype(np.float32, copy=False).tobytes())
        tensors.append(nt)
    msg.tensors = tensors
    return msg


def from_msg(msg: Any) -> ModelUpdatePayload:
    """Payload from a ``ModelUpdate`` message; every tensor's shape must match its data length."""
    tensors: dict[str, np.ndarray] = {}
    for nt in msg.tensors:
        shape = tuple(int(d) for d in nt.shape)
        data = np.asarray(nt.data, dtype=np.float32)
        needed = math.prod(shape)  # Python ints: np.prod wraps around on huge shapes
        if data.size != needed:
            raise ValueError(
                f"tensor {nt.name!r}: shape {list(shape)} needs {needed} values, "
                f"message carries {data.size}"
            )
        if nt.name in tensors:
            raise ValueError(f"tensor {nt.name!r} appears twice in the update")
        tensors[nt.name] = data.reshape(shape)  # the payload copies it
    return ModelUpdatePayload(model_id=str(msg.model_id), version=int(msg.version), tensors=tensors)


def save_payload(payload: ModelUpdatePayload, path: str | os.PathLike) -> Path:
    """Write the payload as one safetensors file, atomically (temp file + rename)."""
    data = safetensors_bytes(
        dict(payload.tensors),
        metadata={"model_id": payload.model_id, "version": str(payload.version)},
    )
    return atomic_write_bytes(path, data)


def load_payload(path: str | os.PathLike) -> ModelUpdatePayload:
    """Read a payload written by ``save_payload``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model update file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta: Mapping[str, str] = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, TypeError) as e:  # TypeError: a dtype numpy lacks (bfloat16)
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if "model_id" not in meta or "version" not in meta:
        raise ValueError(f"{path}: not a model update (metadata lacks model_id/version)")
    try:
        version = int(meta["version"])
    except ValueError as e:
        raise ValueError(f"{path}: version {meta['version']!r} is not an integer") from e
    return ModelUpdatePayload(model_id=meta["model_id"], version=version, tensors=tensors)


PUBLISHED_FILE = "published.json"  # in an adapter's state_dir


@dataclass(frozen=True)
class PublishedRecord:
    """A bound on the versions an adapter published (none above ``version``), kept beside its
    state.

    State is saved every few seconds, updates go out more often: after a crash the resumed
    engines are older than what classifiers hold. With this record the restarted adapter
    numbers its updates above every published one instead of reusing numbers for other
    tensors. The adapter reserves RESERVE versions per write, so a restart skips up to that
    many numbers."""

    model_id: str
    version: int

    RESERVE: ClassVar[int] = 1000

    def save(self, directory: str | os.PathLike) -> Path:
        return write_json(Path(directory) / PUBLISHED_FILE,
                          {"model_id": self.model_id, "version": self.version})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PublishedRecord | None:
        """The record in ``directory`` (None if there is none); ValueError if it is malformed."""
        path = Path(directory) / PUBLISHED_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            record = cls(d["model_id"], d["version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a published-version record ({e})") from e
        if not isinstance(record.model_id, str) or not is_integer(record.version) \
                or not 0 <= record.version <= MAX_SAVED_VERSION:
            raise ValueError(f"{path}: model_id must be a string and version an integer in "
                             f"0..2**62, got {d}")
        return record

    def offset_for(self, engine_version: int) -> int:
        """What to add to resumed engines at ``engine_version`` so that their first update is
        numbered above the last published one. Always above, even when the resumed tensors may
        be the published ones: engine versions cannot tell (a load counts as a change, and a
        crash between two engines' saves pairs states never published together), and a new
        number for the same tensors is harmless."""
        return max(0, self.version + 1 - engine_version)


__all__ = ["MAX_MAGNITUDE", "MAX_SAVED_VERSION", "ModelUpdatePayload", "PublishedRecord",
           "all_finite", "as_numpy", "within_magnitude", "to_msg", "from_msg", "save_payload",
           "load_payload"]
