"""TensorRT engine cache: key logic and refusal of mismatched entries (always runs, no
tensorrt import), plus engine tests that need TensorRT and a CUDA device (skipped here)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest
import torch

from ttspec_ros.backends.tensorrt_backend import (
    EngineCache,
    EngineKey,
    StaleEngineError,
    entry_name,
)

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


def test_entry_names_are_checked():
    name = entry_name("f" * 64, [1, 3, 224, 224], 2, "fp16")
    assert name == "ffffffffffffffff-224x224-stage2-fp16"
    with pytest.raises(ValueError, match="bad engine cache entry name"):
        EngineCache("/tmp").paths("../escape")


def test_cache_logic_does_not_import_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt" not in sys.modules


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
