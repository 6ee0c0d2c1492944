"""TensorRT engine cache: key logic and refusal of mismatched entries (always runs, no
tensorrt import), plus engine tests that need TensorRT and a CUDA device (skipped here)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import torch

from ttspec_ros.backends.tensorrt_backend import (
    EngineCache,
    EngineKey,
    StaleEngineError,
    entry_name,
)
from ttspec_ros.files import atomic_write_bytes

KEY = EngineKey("a" * 64, "10.3.0", "Orin (nvgpu)", "fp16")
ENGINE = b"serialized-engine-bytes"


def counting_builder(data: bytes = ENGINE):
    calls = []

    def build() -> bytes:
        calls.append(1)
        return data

    return build, calls


def test_key_digest_is_stable_and_depends_on_every_field():
    assert KEY.digest() == EngineKey(**KEY.to_dict()).digest()
    changed = {
        "graph_sha256": "b" * 64, "tensorrt_version": "10.4.0",
        "gpu_name": "Xavier", "precision": "fp32",
    }
    digests = {dataclasses.replace(KEY, **{k: v}).digest() for k, v in changed.items()}
    assert len(digests) == 4 and KEY.digest() not in digests


def test_key_rejects_bad_fields():
    with pytest.raises(ValueError, match="precision"):
        EngineKey("a" * 64, "10.3.0", "Orin", "int8")
    with pytest.raises(ValueError, match="gpu_name"):
        EngineKey("a" * 64, "10.3.0", "", "fp32")


def test_cached_engine_is_never_rebuilt(tmp_path):
    build, calls = counting_builder()
    assert EngineCache(tmp_path).get_or_build("m-stage0-fp16", KEY, build) == ENGINE
    # A fresh cache object (as after a restart) finds the entry and does not build.
    assert EngineCache(tmp_path).get_or_build("m-stage0-fp16", KEY, build) == ENGINE
    assert len(calls) == 1
    sidecar = json.loads((tmp_path / "m-stage0-fp16.json").read_text())
    assert sidecar["key"] == KEY.to_dict()


# Each process waits until both are ready, so both find no entry; a build takes a second and
# returns different bytes each time, as TensorRT builds do.
CONCURRENT_BUILDER = """
import hashlib, os, sys, time
from pathlib import Path
from ttspec_ros.backends.tensorrt_backend import EngineCache, EngineKey
cache_dir, me = Path(sys.argv[1]), sys.argv[2]
(cache_dir / f"ready-{me}").touch()
while len(list(cache_dir.glob("ready-*"))) < 2:
    time.sleep(0.01)
def build():
    time.sleep(1.0)
    with open(cache_dir / "builds.txt", "a") as f:
        f.write(me + "\\n")
    return os.urandom(64)
key = EngineKey("a" * 64, "10.3.0", "Orin (nvgpu)", "fp16")
print(hashlib.sha256(EngineCache(cache_dir).get_or_build("entry", key, build)).hexdigest())
"""


def test_concurrent_starts_build_once_and_share_the_engine(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILDER, str(tmp_path), str(i)],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    digests = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    cached = EngineCache(tmp_path).load("entry", KEY)  # engine and sidecar belong together
    assert digests[0] == digests[1] == hashlib.sha256(cached).hexdigest()


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("gpu_name", "Xavier", "foreign"),
        ("tensorrt_version", "8.6.1", "foreign"),
        ("graph_sha256", "c" * 64, "stale"),
        ("precision", "fp32", "stale"),
    ],
)
def test_mismatched_entry_is_refused_not_rebuilt(tmp_path, field, value, kind):
    EngineCache(tmp_path).store("entry", KEY, ENGINE)
    build, calls = counting_builder(b"other")
    here = dataclasses.replace(KEY, **{field: value})
    with pytest.raises(StaleEngineError, match=f"{kind}.*{field}"):
        EngineCache(tmp_path).get_or_build("entry", here, build)
    assert calls == [] and (tmp_path / "entry.engine").read_bytes() == ENGINE


def test_changed_engine_file_is_refused(tmp_path):
    EngineCache(tmp_path).store("entry", KEY, ENGINE)
    (tmp_path / "entry.engine").write_bytes(b"tampered")
    with pytest.raises(StaleEngineError, match="changed since it was cached"):
        EngineCache(tmp_path).load("entry", KEY)


def test_entry_without_valid_sidecar_is_refused(tmp_path):
    (tmp_path / "orphan.engine").write_bytes(ENGINE)
    with pytest.raises(StaleEngineError, match="no sidecar"):
        EngineCache(tmp_path).load("orphan", KEY)
    (tmp_path / "orphan.json").write_text("{not json")
    with pytest.raises(StaleEngineError, match="unreadable"):
        EngineCache(tmp_path).load("orphan", KEY)
    assert EngineCache(tmp_path).load("absent", KEY) is None


def test_a_failed_sidecar_write_leaves_no_entry_and_the_next_start_builds(tmp_path,
                                                                           monkeypatch):
    """store() whose sidecar write fails (a full disk) removes the engine it had renamed into
    place; before, the engine stayed without a sidecar and every later start refused it."""
    import ttspec_ros.backends.tensorrt_backend as trt_backend

    real_write_json = trt_backend.write_json
    failures = []

    def disk_full_once(path, obj, **kwargs):
        if not failures:
            failures.append(path)
            raise OSError(28, "No space left on device")
        return real_write_json(path, obj, **kwargs)

    monkeypatch.setattr(trt_backend, "write_json", disk_full_once)
    build, calls = counting_builder()
    with pytest.raises(OSError, match="No space left"):
        EngineCache(tmp_path).get_or_build("entry", KEY, build)
    assert not (tmp_path / "entry.engine").exists()
    assert not (tmp_path / "entry.json").exists()
    assert EngineCache(tmp_path).get_or_build("entry", KEY, build) == ENGINE
    assert len(calls) == 2 and EngineCache(tmp_path).load("entry", KEY) == ENGINE


def test_an_engine_left_without_sidecar_is_rebuilt_under_the_lock(tmp_path):
    """A store() cut short after the engine's rename (a power cut) leaves an engine without a
    sidecar; entries are only stored under the entry's lock, so get_or_build takes it for an
    unfinished store and builds again (it refused the entry on every start before)."""
    (tmp_path / "entry.engine").write_bytes(b"half-stored engine")
    build, calls = counting_builder()
    assert EngineCache(tmp_path).get_or_build("entry", KEY, build) == ENGINE
    assert calls == [1] and EngineCache(tmp_path).load("entry", KEY) == ENGINE


def test_entry_names_are_checked():
    gpu = "Orin (sm_87, 16 SMs)"
    name = entry_name("f" * 64, [1, 3, 224, 224], 2, "fp16", "a" * 64, gpu)
    assert name.startswith("ffffffffffffffff-224x224-stage2-fp16-gaaaaaaaaaaaa-gpu")
    # The same model exported again into a different graph, or on another GPU (a cache
    # directory shared by two robots), gets its own entry.
    assert entry_name("f" * 64, [1, 3, 224, 224], 2, "fp16", "b" * 64, gpu) != name
    assert entry_name("f" * 64, [1, 3, 224, 224], 2, "fp16", "a" * 64,
                      "Orin (sm_87, 4 SMs)") != name
    # Engines of another build rule (BUILD_VERSION) are built again beside the old ones.
    assert entry_name("f" * 64, [1, 3, 224, 224], 2, "fp16", "a" * 64, gpu, build="1") != name
    with pytest.raises(ValueError, match="bad engine cache entry name"):
        EngineCache("/tmp").paths("../escape")


# `import tensorrt` made to fail: the cache logic must work without it (it asserted before
# that an uninstalled package was not in sys.modules, which could not fail).
NO_TENSORRT = """
import sys
sys.modules["tensorrt"] = None
from ttspec_ros.backends.tensorrt_backend import EngineCache, EngineKey, entry_name
key = EngineKey("a" * 64, "10.3.0", "Orin", "fp32")
name = entry_name("f" * 64, [1, 1, 32, 32], 0, "fp32", "a" * 64, "Orin")
cache = EngineCache(sys.argv[1])
assert cache.get_or_build(name, key, lambda: b"engine") == b"engine"
assert cache.load(name, key) == b"engine"
"""


def test_cache_logic_does_not_import_tensorrt(tmp_path):
    run = subprocess.run([sys.executable, "-c", NO_TENSORRT, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_a_store_in_progress_elsewhere_is_waited_for_not_refused(tmp_path):
    """Another process holds the entry's lock and has written the engine but not yet its
    sidecar: a start at that moment waits for the lock and loads that engine (it refused the
    entry as having no sidecar before, outside the lock)."""
    cache = EngineCache(tmp_path)
    engine_path, _ = cache.paths("entry")
    build, calls = counting_builder(b"other")
    outcome: dict = {}

    def start() -> None:
        try:
            outcome["engine"] = EngineCache(tmp_path).get_or_build("entry", KEY, build)
        except Exception as e:  # reported by the asserts below
            outcome["error"] = e

    with open(tmp_path / "entry.lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        atomic_write_bytes(engine_path, ENGINE)  # store() half-way
        thread = threading.Thread(target=start)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), outcome  # waits for the lock
        cache.store("entry", KEY, ENGINE)  # the other process finishes its store
    thread.join(10)
    assert outcome == {"engine": ENGINE} and calls == []


# -- TensorRTBackbone's control flow on a stand-in `tensorrt` ----------------------------
# No GPU here, so a minimal stand-in for the tensorrt API runs each "engine" (the ONNX bytes)
# with ONNX Runtime on CPU memory addressed through the raw pointers the backbone hands over,
# exactly as TensorRT reads and writes device memory. It checks the backbone's wiring (carry
# names, buffers, cache use, refusal before deserializing), not TensorRT itself.


class _FakeTRT(types.ModuleType):
    __version__ = "10.99.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        FP16 = "FP16"
        TF32 = "TF32"

    class TensorIOMode:
        INPUT = "input"
        OUTPUT = "output"

    def __init__(self):
        super().__init__("tensorrt")
        fake = self
        self.deserialized = 0
        self.streams: list[int] = []  # the stream handle of every execute_async_v3
        self.flags: list[tuple[str, str]] = []  # ("set" | "clear", flag) of every build
        self.refused_addresses: set[str] = set()  # tensors whose set_tensor_address fails
        self.dtypes: dict[str, str] = {}  # tensor name -> dtype name other than FLOAT

        class Network:
            model = None

        class Config:
            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                fake.flags.append(("set", flag))

            def clear_flag(self, flag):
                fake.flags.append(("clear", flag))

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse(self, model, path=None):
                self.network.model = bytes(model)
                return True

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                return network.model  # the "engine" is the graph, run by ONNX Runtime

        class Context:
            def __init__(self, engine):
                self.engine, self.addresses = engine, {}

            def set_tensor_address(self, name, address):
                self.addresses[name] = address
                return name not in fake.refused_addresses

            def execute_async_v3(self, stream):
                fake.streams.append(stream)

                def view(name):
                    shape = self.engine.shapes[name]
                    pointer = ctypes.cast(self.addresses[name], ctypes.POINTER(ctypes.c_float))
                    return np.ctypeslib.as_array(pointer, shape=shape)

                feeds = {name: view(name).copy() for name in self.engine.inputs}
                names = list(self.engine.outputs)
                for name, value in zip(names, self.engine.session.run(names, feeds), strict=True):
                    view(name)[...] = value
                return True

        class Engine:
            def __init__(self, data):
                import onnxruntime as ort

                self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                self.inputs = [i.name for i in self.session.get_inputs()]
                self.outputs = [o.name for o in self.session.get_outputs()]
                self.shapes = {
                    v.name: tuple(v.shape)
                    for v in [*self.session.get_inputs(), *self.session.get_outputs()]
                }
                self.names = self.inputs + self.outputs
                self.num_io_tensors = len(self.names)

            def get_tensor_name(self, j):
                return self.names[j]

            def get_tensor_mode(self, name):
                return "input" if name in self.inputs else "output"

            def get_tensor_dtype(self, name):
                return types.SimpleNamespace(name=fake.dtypes.get(name, "FLOAT"))

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.deserialized += 1
                return Engine(data)

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime


def gpu(name: str, sms: int = 16) -> types.SimpleNamespace:
    """What torch.cuda.get_device_properties gives, for a fake device."""
    return types.SimpleNamespace(name=name, major=8, minor=7, multi_processor_count=sms)


@pytest.fixture()
def fake_gpu(monkeypatch):
    """A stand-in tensorrt module and a 'CUDA device' that is the CPU."""
    from ttspec_ros.backends import tensorrt_backend

    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt_backend, "cuda_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu("Fake GPU"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    caller_stream = types.SimpleNamespace(cuda_stream=0)  # the legacy default stream

    class Stream:  # the backend's own stream; records what it was made to wait for
        def __init__(self, device=None):
            self.cuda_stream, self.waited_for = 1234, []

        def wait_stream(self, other):
            self.waited_for.append(other)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller_stream)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    fake.caller_stream = caller_stream
    return fake


def test_backbone_builds_once_reuses_engines_and_refuses_foreign_ones(
    fake_gpu, tmp_path, monkeypatch
):
    from test_backends import make_tiny_model, torch_reference

    from ttspec_ros.backends import create_backbone
    from ttspec_ros.backends.onnx_export import relative_difference
    from ttspec_ros.backends.tensorrt_backend import TensorRTBackbone

    model = make_tiny_model()
    # Selection exports the stage graphs into the cache, then builds and caches engines.
    first = create_backbone("tensorrt", model, device="cuda", cache_dir=tmp_path,
                            image_size=32)
    assert isinstance(first, TensorRTBackbone)
    assert first.builds == 4 and fake_gpu.deserialized == 4
    graphs = first.graph_dir
    assert graphs.parent == tmp_path and len(list((tmp_path / "engines").glob("*.json"))) == 4
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    for frame in range(2):  # buffers are reused across frames
        carry = image
        for i, expected in enumerate(torch_reference(model, image)):
            carry, pooled = first.run_stage(i, carry)
            assert relative_difference(pooled, expected) < 1e-4, (frame, i)
    # Every stage ran on the backend's own stream (not the default stream, around which
    # TensorRT 10 synchronises), after that stream waited for the caller's.
    assert fake_gpu.streams == [1234] * 8
    assert first._stream.waited_for == [fake_gpu.caller_stream] * 8
    again = TensorRTBackbone(graphs, cache_dir=tmp_path / "engines")
    assert again.builds == 0 and fake_gpu.deserialized == 8
    # Same name, another module of the family (Jetson Orins all report "Orin"): its own
    # engines, built beside the first GPU's, which stay as they are.
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: gpu("Fake GPU", sms=4))
    other = TensorRTBackbone(graphs, cache_dir=tmp_path / "engines")
    assert other.builds == 4 and len(list((tmp_path / "engines").glob("*.json"))) == 8
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu("Fake GPU"))
    assert TensorRTBackbone(graphs, cache_dir=tmp_path / "engines").builds == 0
    # Another TensorRT version finds this GPU's entries and refuses them, without rebuilding.
    monkeypatch.setattr(fake_gpu, "__version__", "10.100.0")
    with pytest.raises(StaleEngineError,
                       match="foreign.*tensorrt_version: cached '10.99.0', here '10.100.0'"):
        TensorRTBackbone(graphs, cache_dir=tmp_path / "engines")
    assert fake_gpu.deserialized == 16


def test_exported_graphs_need_no_onnx_package(fake_gpu, tmp_path, monkeypatch):
    """Engines are built by TensorRT's own ONNX parser: with the graphs already in the cache,
    a machine without the `onnx` package runs; without them it is told what is missing."""
    import onnx
    from test_backends import make_tiny_model

    from ttspec_ros.backends import BackendUnavailable, create_backbone

    model = make_tiny_model()
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(BackendUnavailable, match="holds none for this model.*`onnx` package"):
        create_backbone("tensorrt", model, device="cuda", cache_dir=tmp_path, image_size=32)
    monkeypatch.setitem(sys.modules, "onnx", onnx)
    create_backbone("tensorrt", model, device="cuda", cache_dir=tmp_path, image_size=32)
    monkeypatch.setitem(sys.modules, "onnx", None)
    again = create_backbone("tensorrt", model, device="cuda", cache_dir=tmp_path, image_size=32)
    assert again.builds == 0


HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(
    not (HAVE_TRT and torch.cuda.is_available()),
    reason="needs the tensorrt package and a CUDA device (neither is on this machine)",
)


@needs_gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_matches_torch_and_reuses_engines(tmp_path, precision, tolerance):
    from test_backends import make_tiny_model, torch_reference

    from ttspec_ros.backends.onnx_export import export_stages, relative_difference
    from ttspec_ros.backends.tensorrt_backend import TensorRTBackbone

    model = make_tiny_model()
    export_stages(model, 32, tmp_path / "graphs", include_unsplit=False)
    backbone = TensorRTBackbone(tmp_path / "graphs", cache_dir=tmp_path / "engines",
                                precision=precision)
    assert backbone.builds == model.num_exits
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    carry = image
    for i, expected in enumerate(torch_reference(model, image)):
        carry, pooled = backbone.run_stage(i, carry)
        assert relative_difference(pooled, expected) < tolerance
    again = TensorRTBackbone(tmp_path / "graphs", cache_dir=tmp_path / "engines",
                             precision=precision)
    assert again.builds == 0


@pytest.mark.parametrize("version", ["8.5.2.2", "8.4.1.5", "7.1.3"])
def test_tensorrt_before_8_6_is_refused_by_version(monkeypatch, version):
    """JetPack 5 ships TensorRT 8.4-8.5: 8.5's ONNX parser has no LayerNormalization importer
    (the graphs hold them) and 8.4 lacks the name-based tensor API. Refused at start by
    version, not minutes into an engine build."""
    from ttspec_ros.backends import BackendUnavailable
    from ttspec_ros.backends.tensorrt_backend import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    with pytest.raises(BackendUnavailable, match=f"needs TensorRT >= 8.6.*this is {version}"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.2.3"))
    assert import_tensorrt().__version__ == "8.6.2.3"


@pytest.mark.parametrize(("precision", "flags"), [("fp32", [("clear", "TF32")]),
                                                  ("fp16", [("set", "FP16")])])
def test_engine_builds_are_the_precision_named(fake_gpu, tmp_path, precision, flags):
    """fp32 is FP32: TensorRT turns TF32 on by default, which an Orin's fp32 engine would use."""
    from test_backends import make_tiny_model

    from ttspec_ros.backends import create_backbone

    create_backbone("tensorrt", make_tiny_model(), device="cuda", cache_dir=tmp_path,
                    image_size=32, precision=precision)
    assert fake_gpu.flags == flags * 4  # one build per stage


def test_a_refused_tensor_address_is_named(fake_gpu, tmp_path):
    from test_backends import make_tiny_model

    from ttspec_ros.backends import create_backbone

    fake_gpu.refused_addresses.add("c1")
    with pytest.raises(RuntimeError, match="refused the address of stage 0's tensor 'c1' "
                                           r"\(torch.float32, \(1, 16, 4, 4\)"):
        create_backbone("tensorrt", make_tiny_model(), device="cuda", cache_dir=tmp_path,
                        image_size=32)


def test_an_engine_output_of_another_dtype_is_named(fake_gpu, tmp_path):
    from test_backends import make_tiny_model

    from ttspec_ros.backends import create_backbone

    fake_gpu.dtypes["pooled"] = "INT64"
    with pytest.raises(ValueError, match="engine output 'pooled' is INT64; the backbone reads"):
        create_backbone("tensorrt", make_tiny_model(), device="cuda", cache_dir=tmp_path,
                        image_size=32)


def test_tensorrt_refuses_manifest_shapes_that_are_not_the_engines(fake_gpu, tmp_path):
    """The image buffer is allocated by the manifest's image_shape: a manifest edited after the
    export is refused at start, naming the tensor and both shapes, before any frame runs."""
    import json

    from test_backends import make_tiny_model

    from ttspec_ros.backends.onnx_export import export_stages
    from ttspec_ros.backends.tensorrt_backend import TensorRTBackbone

    export_stages(make_tiny_model(), 32, tmp_path / "graphs", include_unsplit=False)
    manifest_path = tmp_path / "graphs" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    tensor = manifest["stages"][1]["outputs"][0]
    tensor["shape"] = [*tensor["shape"][:-1], tensor["shape"][-1] + 1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"'{tensor['name']}' has shape .* in the manifest, "
                                         r".* in the graph; export the graphs again"):
        TensorRTBackbone(tmp_path / "graphs", cache_dir=tmp_path / "engines")


def test_tensorrt_builds_from_the_graph_bytes_it_checked(fake_gpu, tmp_path, monkeypatch):
    """As the ONNX Runtime backbone: engines are built from the bytes that were hash-checked,
    so a graph file replaced after the manifest check is refused, not built and cached."""
    from test_backends import make_tiny_model, replace_graph_after_manifest_check

    from ttspec_ros.backends import tensorrt_backend
    from ttspec_ros.backends.onnx_export import export_stages

    graphs = tmp_path / "graphs"
    export_stages(make_tiny_model(), 32, graphs, include_unsplit=False)
    replace_graph_after_manifest_check(monkeypatch, tensorrt_backend, graphs)
    with pytest.raises(ValueError, match="stage2.onnx is missing or does not match its "
                                         "manifest hash; export the graphs again"):
        tensorrt_backend.TensorRTBackbone(graphs, cache_dir=tmp_path / "engines")
    assert not list((tmp_path / "engines").glob("*stage2*"))
