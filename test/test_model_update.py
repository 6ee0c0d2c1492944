"""ModelUpdatePayload: validation, message conversion (fake and, if built, real messages), files."""

from __future__ import annotations

import array
import importlib.util
import types

import numpy as np
import pytest

from ttspec_ros.model_update import (
    PUBLISHED_FILE,
    ModelUpdatePayload,
    PublishedRecord,
    from_msg,
    load_payload,
    save_payload,
    to_msg,
)


class FakeNamedTensor:
    def __init__(self) -> None:
        self.name, self.shape, self.data = "", array.array("I"), array.array("f")


class FakeModelUpdate:
    def __init__(self) -> None:
        self.header, self.model_id, self.version, self.tensors = None, "", 0, []


FAKE_MSGS = types.SimpleNamespace(ModelUpdate=FakeModelUpdate, NamedTensor=FakeNamedTensor)


def _payload() -> ModelUpdatePayload:
    rng = np.random.default_rng(0)
    return ModelUpdatePayload(
        "demo-1", 7,
        {"cls_blocks.0.classifier.1.weight": rng.standard_normal((10, 16)).astype(np.float32),
         "cls_blocks.0.classifier.1.bias": rng.standard_normal(10).astype(np.float32)},
    )


def test_payload_validates_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ModelUpdatePayload("m", 1, {"a": np.array([np.nan], np.float32)})
    with pytest.raises(ValueError, match="beyond"):  # finite, but no model's (diverged)
        ModelUpdatePayload("m", 1, {"a": np.array([0.5, -1e30], np.float32)})
    assert ModelUpdatePayload("m", 1, {"a": np.zeros(0, np.float32)}).tensors["a"].size == 0
    with pytest.raises(ValueError, match="version"):
        ModelUpdatePayload("m", -1, {})
    with pytest.raises(ValueError, match="names"):
        ModelUpdatePayload("m", 1, {"": np.zeros(1)})
    p = ModelUpdatePayload("m", 1, {"a": np.zeros((2, 3), np.float64)})
    assert p.tensors["a"].dtype == np.float32


@pytest.mark.parametrize("value", [np.array([1 + 2j]), np.array([True]),
                                   np.array([None]), np.array(["1.0"])])
def test_payload_refuses_tensors_that_are_not_real_numbers(value) -> None:
    # The float32 cast would drop imaginary parts, turn bools into 0/1 and parse strings.
    with pytest.raises(ValueError, match="'a' has dtype"):
        ModelUpdatePayload("m", 1, {"a": value})


def test_payload_refuses_a_bool_version_and_unconvertible_tensors(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="version"):
        ModelUpdatePayload("m", True, {})  # not version 1
    with pytest.raises(ValueError, match="'a': not convertible"):
        ModelUpdatePayload("m", 1, {"a": torch.zeros(2, dtype=torch.bfloat16)})
    path = tmp_path / "bf16.safetensors"
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16)}, str(path),
              metadata={"model_id": "m", "version": "1"})
    # numpy reads bfloat16 only once ml_dtypes is imported (onnx imports it): either way refused
    with pytest.raises(ValueError, match="not a readable safetensors file|has dtype bfloat16"):
        load_payload(path)


def test_payload_keeps_its_own_copy() -> None:
    import torch

    param = torch.nn.Parameter(torch.zeros(3))
    array_ = np.zeros((3, 2), np.float32)
    p = ModelUpdatePayload("m", 1, {"param": param, "array": array_, "transposed": array_.T})
    with torch.no_grad():
        param += 5
    array_[:] = np.nan  # after validation: must not reach the payload
    np.testing.assert_array_equal(p.tensors["param"], np.zeros(3))
    np.testing.assert_array_equal(p.tensors["array"], np.zeros((3, 2)))
    assert p.tensors["transposed"].flags.c_contiguous
    msg = to_msg(_payload(), FAKE_MSGS)
    back = from_msg(msg)
    msg.tensors[1].data[0] = 1e6
    assert back.tensors["cls_blocks.0.classifier.1.bias"][0] != 1e6


def test_message_round_trip_with_fake_classes() -> None:
    p = _payload()
    msg = to_msg(p, FAKE_MSGS)
    assert msg.model_id == "demo-1" and msg.version == 7
    assert [list(t.shape) for t in msg.tensors] == [[10, 16], [10]]
    back = from_msg(msg)
    assert back.model_id == p.model_id and back.version == p.version
    assert set(back.tensors) == set(p.tensors)
    for name, t in p.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], t)


def test_from_msg_rejects_shape_data_mismatch_and_duplicates() -> None:
    msg = to_msg(_payload(), FAKE_MSGS)
    msg.tensors[1].shape = array.array("I", [11])
    with pytest.raises(ValueError, match="needs 11 values"):
        from_msg(msg)
    msg.tensors[1].shape = array.array("I", [2**32 - 1] * 2)  # np.prod wrapped to a negative
    with pytest.raises(ValueError, match=f"needs {(2**32 - 1) ** 2} values"):
        from_msg(msg)
    msg = to_msg(_payload(), FAKE_MSGS)
    msg.tensors[1].name = msg.tensors[0].name
    msg.tensors[1].shape, msg.tensors[1].data = msg.tensors[0].shape, msg.tensors[0].data
    with pytest.raises(ValueError, match="twice"):
        from_msg(msg)


@pytest.mark.skipif(importlib.util.find_spec("ttspec_ros.msg") is None,
                    reason="generated messages not built (ROS build)")
def test_message_round_trip_with_generated_classes() -> None:
    from ttspec_ros import msg as msgs

    p = _payload()
    back = from_msg(to_msg(p))
    assert isinstance(to_msg(p, msgs), msgs.ModelUpdate)
    for name, t in p.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], t)


def test_file_round_trip_is_atomic(tmp_path) -> None:
    p = _payload()
    path = save_payload(p, tmp_path / "u" / "update.safetensors")
    back = load_payload(path)
    assert (back.model_id, back.version) == ("demo-1", 7)
    for name, t in p.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], t)
    assert sorted(x.name for x in path.parent.iterdir()) == ["update.safetensors"]
    # a save that fails keeps the file there was and leaves no partial file beside it
    import dataclasses

    from ttspec_ros import files

    saved = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files.os, "replace", fail)
        with pytest.raises(OSError, match="disk full"):
            save_payload(dataclasses.replace(p, version=8), path)
    assert path.read_bytes() == saved
    assert sorted(x.name for x in path.parent.iterdir()) == ["update.safetensors"]
    with pytest.raises(FileNotFoundError):
        load_payload(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(1, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a model update"):
        load_payload(tmp_path / "plain.safetensors")


def test_published_record_round_trip_and_offsets(tmp_path) -> None:
    assert PublishedRecord.load(tmp_path) is None
    PublishedRecord("demo-1", 12).save(tmp_path)
    record = PublishedRecord.load(tmp_path)
    assert record == PublishedRecord("demo-1", 12)
    # Resumed older than published (a crash before the periodic save): above the last one.
    assert 7 + record.offset_for(7) == 13
    # Resumed at the published engine version: above it too (engines cannot tell whether the
    # tensors are the published ones), and a newer state keeps its own, higher number.
    assert 12 + record.offset_for(12) == 13 and record.offset_for(20) == 0


@pytest.mark.parametrize("text", ["{", "[]", '{"model_id": "m"}',
                                  '{"model_id": "m", "version": -1}',
                                  '{"model_id": 3, "version": 1}',
                                  '{"model_id": "m", "version": true}',
                                  '{"model_id": "m", "version": 18446744073709551615}'])
def test_malformed_published_record_is_refused(tmp_path, text) -> None:
    (tmp_path / PUBLISHED_FILE).write_text(text)
    with pytest.raises(ValueError, match="published-version record|version an integer"):
        PublishedRecord.load(tmp_path)
