"""Staged backbone on TensorRT (Jetson): one engine per cascade stage, cached on disk.

Engines are built from the stage graphs of ``onnx_export`` (FP32 or FP16) and cached under a
key of (graph sha256, TensorRT version, GPU, precision); the GPU is its name, compute
capability and SM count (``gpu_identity``). A cached engine is never rebuilt.
Entry names hold the model hash, image size, stage, precision, graph sha256 and GPU
(``entry_name``), so another export or GPU gets entries of its own. Each engine has a JSON
sidecar holding its key and sha256; an entry whose sidecar disagrees with what this process
would build (in practice another TensorRT version, which the name leaves out) or whose
engine file changed is refused before deserializing, because TensorRT engines are only valid
for the exact TensorRT version and GPU that built them.

The cache logic (``EngineKey``, ``EngineCache``) is plain Python; ``tensorrt`` and CUDA are
only touched by ``TensorRTBackbone``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from ttspec_ros.backends import BackendUnavailable, release
from ttspec_ros.backends.onnx_export import (
    MANIFEST,
    STATE_NAMES,
    load_manifest,
    read_graph,
    shape_problem,
)
from ttspec_ros.backends.onnxruntime_backend import check_image
from ttspec_ros.files import atomic_write_bytes, write_json

PRECISIONS = ("fp32", "fp16")
SIDECAR_FORMAT = 1
DEFAULT_WORKSPACE_BYTES = 1 << 30
# How build_engine configures a build. Part of every cache key and entry name: engines of an
# older build rule get their own entries and are built again, never reused as if current.
# 2: fp32 engines are built without TF32 (TensorRT enables it by default, and on Ampere GPUs
# such as Orin an "fp32" engine then rounds its convolution inputs to TF32).
BUILD_VERSION = "2"


class StaleEngineError(RuntimeError):
    """A cache entry exists but was not built for this graph / TensorRT / GPU / precision."""


@dataclass(frozen=True)
class EngineKey:
    graph_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str
    build: str = BUILD_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str) or not getattr(self, f.name):
                raise ValueError(f"engine key field {f.name} must be a non-empty string")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


class EngineCache:
    """``name.engine`` + ``name.json`` (sidecar) per entry in ``cache_dir``.

    Names are chosen by the caller (``entry_name``), so the same graph on the same GPU always
    maps to the same entry and a mismatching entry is reported, not ignored.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)

    def paths(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad engine cache entry name {name!r}")
        return self.cache_dir / f"{name}.engine", self.cache_dir / f"{name}.json"

    def load(self, name: str, key: EngineKey) -> bytes | None:
        """The cached engine bytes, None when there is no entry; raises StaleEngineError when
        an entry exists that does not verify against ``key``."""
        engine_path, sidecar_path = self.paths(name)
        if not engine_path.exists() and not sidecar_path.exists():
            return None
        remedy = (
            f"delete {engine_path} and {sidecar_path} to rebuild, or use another cache_dir"
        )
        if not sidecar_path.is_file():
            raise StaleEngineError(
                f"engine cache entry {engine_path} has no sidecar {sidecar_path.name}, so it "
                f"cannot be verified; {remedy}"
            )
        if not engine_path.is_file():
            raise StaleEngineError(f"engine cache sidecar {sidecar_path} has no engine; {remedy}")
        try:
            with open(sidecar_path, encoding="utf-8") as f:
                sidecar = json.load(f)
            stored = sidecar["key"]
            stored_sha = sidecar["engine_sha256"]
            fmt = sidecar["format"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StaleEngineError(
                f"unreadable engine sidecar {sidecar_path} ({e}); {remedy}"
            ) from e
        if fmt != SIDECAR_FORMAT:
            raise StaleEngineError(
                f"engine sidecar {sidecar_path} has format {fmt!r}, expected {SIDECAR_FORMAT}; "
                f"{remedy}"
            )
        expected = key.to_dict()
        if not isinstance(stored, dict) or stored != expected:
            stored = stored if isinstance(stored, dict) else {}
            diffs = "; ".join(
                f"{k}: cached {stored.get(k)!r}, here {v!r}"
                for k, v in expected.items()
                if stored.get(k) != v
            ) or f"unexpected key fields {sorted(set(stored) - set(expected))}"
            kind = (
                "foreign (built by another TensorRT version or GPU)"
                if any(stored.get(k) != expected[k] for k in ("tensorrt_version", "gpu_name"))
                else "stale (built from another graph, precision or build rule)"
            )
            raise StaleEngineError(f"engine cache entry {engine_path} is {kind}: {diffs}; {remedy}")
        data = engine_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != stored_sha:
            raise StaleEngineError(
                f"engine file {engine_path} changed since it was cached (sha256 differs from "
                f"its sidecar); {remedy}"
            )
        return data

    def store(self, name: str, key: EngineKey, engine: bytes) -> None:
        """Write engine then sidecar, each atomically; a complete sidecar marks a valid entry,
        and a failed sidecar write leaves no entry at all."""
        engine_path, sidecar_path = self.paths(name)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "key": key.to_dict(),
            "engine_sha256": hashlib.sha256(engine).hexdigest(),
            "engine_bytes": len(engine),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(engine_path, engine)
        try:
            write_json(sidecar_path, sidecar)
        except BaseException:
            # An engine without a (matching) sidecar cannot be verified and would be refused
            # by every later load: leave no entry, so the next start builds again. The
            # sidecar goes too, as its rename may have happened before the failure (the
            # directory fsync) or an older one may disagree with this engine.
            for path in (engine_path, sidecar_path):
                with contextlib.suppress(OSError):  # the write's error is the one to report
                    path.unlink(missing_ok=True)
            raise

    def get_or_build(self, name: str, key: EngineKey, build: Callable[[], bytes]) -> bytes:
        """Cached engine for ``key``; ``build`` runs only when there is no entry at all, and
        in one process at a time."""
        try:
            cached = self.load(name, key)
        except StaleEngineError:
            # Maybe another process's store() half-way (engine written, sidecar not yet): the
            # check under its lock below decides, and refuses an entry that is still wrong.
            cached = None
        if cached is not None:
            return cached
        # Two nodes starting on one model (a classifier per camera) would both build, and
        # TensorRT builds differ byte for byte: interleaved writes could leave one build's
        # engine beside the other's sidecar, an entry refused as changed until deleted. An
        # exclusive lock per entry makes the second wait and load the first one's engine.
        # The lock file stays: unlinking it would let a third process lock a new inode.
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f"{name}.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            engine_path, sidecar_path = self.paths(name)
            if engine_path.is_file() and not sidecar_path.exists():
                # Entries are only stored under this lock, so an engine without a sidecar
                # here is a store() that never finished (a power cut, or a failed sidecar
                # write whose cleanup failed too): not an entry, so build it again. A sidecar
                # that disagrees with the key is still refused by load().
                engine_path.unlink()
            cached = self.load(name, key)
            if cached is not None:
                return cached
            engine = build()
            self.store(name, key, engine)
            return engine


def entry_name(model_hash: str, image_shape: list[int], stage: int, precision: str,
               graph_sha256: str, gpu: str, build: str = BUILD_VERSION) -> str:
    # The graph's hash, the GPU and the build rule are part of the name: a graph exported
    # again (a new EXPORT_VERSION, or another torch/onnx release), another GPU sharing the
    # cache directory and a new BUILD_VERSION get their own entries instead of a refusal that
    # only deleting the cache would clear. What the name leaves out (the TensorRT version) is
    # refused.
    gpu_tag = hashlib.sha256(gpu.encode()).hexdigest()[:8]
    return (f"{model_hash[:16]}-{image_shape[2]}x{image_shape[3]}-stage{stage}-{precision}"
            f"-g{graph_sha256[:12]}-gpu{gpu_tag}-b{build}")


# 8.6: the ONNX parser's LayerNormalization importer (opset 17; every stage graph has them)
# came with TensorRT 8.6. JetPack 6 ships 8.6.2 (6.0) and 10.3 (6.1, 6.2).
TENSORRT_MIN = (8, 6)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(
            "backend 'tensorrt' needs the `tensorrt` Python package (JetPack on Jetson, or "
            f"NVIDIA's tensorrt wheels with a CUDA GPU); it is not importable here: {e}"
        ) from e
    # Before 8.6 the parser cannot read the graphs (LayerNormalization), and before 8.5 the
    # name-based tensor API the engines are driven by (set_tensor_address, execute_async_v3)
    # did not exist: refused here, not minutes into a build or as an AttributeError.
    version = release(getattr(tensorrt, "__version__", ""))
    if version is not None and version < TENSORRT_MIN:
        raise BackendUnavailable(
            f"backend 'tensorrt' needs TensorRT >= {'.'.join(map(str, TENSORRT_MIN))} (JetPack "
            f"6) for the graphs' LayerNormalization nodes; this is {tensorrt.__version__}"
        )
    return tensorrt


def cuda_device(device: str) -> torch.device:
    """Checks CUDA is usable from torch (buffers and streams) and returns the device."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BackendUnavailable(
            f"backend 'tensorrt' needs device 'cuda' or 'cuda:N', got {device!r}"
        )
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "backend 'tensorrt' needs a CUDA device visible to torch (torch.cuda.is_available() "
            f"is False; torch {torch.__version__} built with CUDA {torch.version.cuda})"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise BackendUnavailable(
            f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)"
        )
    return torch.device("cuda", index)


def gpu_identity(device: torch.device) -> str:
    """The cache key's GPU: name, compute capability and SM count. Every Jetson Orin module
    reports the name "Orin"; an engine tuned on a 16-SM AGX Orin is not the one for a
    4-SM Orin Nano."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"


def build_engine(trt, graph: bytes, onnx_path: Path, precision: str, workspace_bytes: int,
                 logger) -> bytes:
    """Serialized engine for one static-shape ONNX graph, ``graph`` (the bytes of ``onnx_path``,
    which names it in messages). ``logger``: the runtime's (TensorRT warns when a builder gets
    another logger than the one it already has)."""
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT < 10 needs explicit batch requested; from 10 on it is the only mode.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # The bytes, not the path: the graph was hash-checked as read, and the file could have
    # changed since. The graphs hold their weights inline, so the parser needs no path.
    if not parser.parse(graph):
        errors = "; ".join(str(parser.get_error(j)) for j in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            # TensorRT 11 dropped weak typing: FP16 would need an FP16-typed graph, which
            # this exporter does not write (JetPack 6-7 ship TensorRT 8.6-10.x, which have it).
            raise BackendUnavailable(
                f"precision 'fp16' uses BuilderFlag.FP16, which TensorRT {trt.__version__} no "
                "longer has (strongly typed networks only); use precision 'fp32'"
            )
        if not getattr(builder, "platform_has_fast_fp16", True):
            raise BackendUnavailable("precision 'fp16' requested but this GPU has no fast FP16")
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default (see BUILD_VERSION)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} ({precision})")
    return bytes(serialized)


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32}


def _set_address(context, name: str, tensor: Tensor, i: int) -> None:
    """Points an engine tensor at ``tensor``'s memory. TensorRT reports a refused address only
    by the return value; unchecked, it surfaced as a bare "execution failed" a step later."""
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise RuntimeError(
            f"TensorRT refused the address of stage {i}'s tensor {name!r} ({tensor.dtype}, "
            f"{tuple(tensor.shape)} on {tensor.device}, contiguous={tensor.is_contiguous()})")


class TensorRTBackbone:
    """``run_stage(i, carry) -> (carry, pooled (1, C3) on the CPU)``; stage 0 takes the image.

    Output buffers are allocated once per stage and reused every frame, so the carry of one
    frame is only valid until the next frame's same stage runs (the cascade runs frames one
    at a time).
    """

    backend = "tensorrt"

    def __init__(
        self,
        graph_dir: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike,
        precision: str = "fp32",
        device: str = "cuda",
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        trt = import_tensorrt()
        self.device = cuda_device(device)
        self.precision = precision
        self.graph_dir = Path(graph_dir)
        # Each graph is hash-checked as it is read (read_graph), on the bytes the build gets.
        self.manifest = load_manifest(self.graph_dir, verify_files=False)
        self.num_exits = int(self.manifest["num_stages"])
        self.image_shape = list(self.manifest["image_shape"])
        self.model_hash = self.manifest["model_hash"]
        self.cache = EngineCache(cache_dir)
        gpu_name = gpu_identity(self.device)
        self.builds = 0  # engines built by this instance (0 when all came from the cache)

        with torch.cuda.device(self.device):
            logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(logger)
            # A stream of our own: on the legacy default stream TensorRT 10 synchronises
            # around every enqueueV3 (it warns so).
            self._stream = torch.cuda.Stream(self.device)
        self._engines, self._contexts, self._outputs, self._inputs = [], [], [], []
        for entry in self.manifest["stages"]:
            graph = self.graph_dir / entry["file"]
            data = read_graph(self.graph_dir, entry)  # its sha256 is entry["sha256"]
            key = EngineKey(entry["sha256"], trt.__version__, gpu_name, precision)
            name = entry_name(self.model_hash, self.image_shape, entry["index"], precision,
                              key.graph_sha256, gpu_name)

            def build(graph: Path = graph, data: bytes = data) -> bytes:
                self.builds += 1
                return build_engine(trt, data, graph, precision, workspace_bytes, logger)

            with torch.cuda.device(self.device):
                built = self.builds
                engine = runtime.deserialize_cuda_engine(self.cache.get_or_build(name, key, build))
                if engine is None:
                    engine_path, sidecar_path = self.cache.paths(name)
                    remedy = ("it was built just now: see TensorRT's messages above (out "
                              "of device memory?)" if self.builds > built else
                              f"delete it and {sidecar_path} to rebuild")
                    raise RuntimeError(
                        f"TensorRT {trt.__version__} could not deserialize {engine_path} (the "
                        f"engine for {graph}); {remedy}")
                context = engine.create_execution_context()
                if context is None:
                    raise RuntimeError(f"TensorRT could not create an execution context for "
                                       f"{graph} (out of device memory?)")
                inputs, outputs = [], {}
                declared: dict[str, dict[str, list[int]]] = {"inputs": {}, "outputs": {}}
                for j in range(engine.num_io_tensors):
                    tname = engine.get_tensor_name(j)
                    shape = tuple(engine.get_tensor_shape(tname))
                    if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                        inputs.append(tname)
                        declared["inputs"][tname] = list(shape)
                        continue
                    declared["outputs"][tname] = list(shape)
                    dtype = _TORCH_DTYPES.get(engine.get_tensor_dtype(tname).name)
                    if dtype is None:
                        raise ValueError(
                            f"{graph}: engine output {tname!r} is "
                            f"{engine.get_tensor_dtype(tname).name}; the backbone reads "
                            f"{sorted(_TORCH_DTYPES)} outputs")
                    outputs[tname] = torch.empty(shape, dtype=dtype, device=self.device)
                    _set_address(context, tname, outputs[tname], i=entry["index"])
                # As the ONNX Runtime backbone: an edited manifest shape (the image copy uses
                # it) is refused here, not inside TensorRT at the first frame.
                problem = shape_problem(entry, declared)
                if problem:
                    raise ValueError(f"{self.graph_dir / MANIFEST} does not match {entry['file']}: "
                                     f"{problem}; export the graphs again")
            self._engines.append(engine)
            self._contexts.append(context)
            self._inputs.append(inputs)
            self._outputs.append(outputs)
        self._image = torch.empty(self.image_shape, dtype=torch.float32, device=self.device)

    def run_stage(self, i: int, carry: Tensor | dict[str, Tensor]) -> tuple[dict | None, Tensor]:
        if not 0 <= i < self.num_exits:
            raise IndexError(f"stage {i} out of range 0..{self.num_exits - 1}")
        # The device made current, as TensorRT enqueues on the current device (cuda:N, N > 0);
        # our stream waits for the caller's, which may have made the carry.
        with torch.cuda.device(self.device):
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                # casts: stage 0's carry is the image, a later stage's the carry the one
                # before it returned (the StagedBackbone contract the Cascade keeps)
                if i == 0:
                    self._image.copy_(check_image(cast(Tensor, carry), self.image_shape))
                    feeds = {"image": self._image}
                else:
                    feeds = cast(dict[str, Tensor], carry)
                context = self._contexts[i]
                for name in self._inputs[i]:
                    _set_address(context, name, feeds[name], i)
                if not context.execute_async_v3(self._stream.cuda_stream):
                    raise RuntimeError(f"TensorRT execution of stage {i} failed")
                out = self._outputs[i]
                pooled = out["pooled"].to("cpu", torch.float32)  # waits for the stream
        if i == self.num_exits - 1:
            return None, pooled  # the last engine outputs no carry (nothing follows it)
        next_carry = {"x": out["x"] if i == 0 else feeds["x"]}  # feeds: the carry for i > 0
        next_carry.update({f"{n}_in": out[n] for n in STATE_NAMES})
        return next_carry, pooled
