"""Checkpoint loading and saving: official checkpoint dicts through the restricted unpickler
(foreign objects neutralised, their payload never run), our safetensors + model card format,
clear errors for mismatches and corrupt files."""

from __future__ import annotations

import json
import pathlib
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from ttspec_ros.models import checkpoint
from ttspec_ros.models.checkpoint import (
    ForeignObject,
    ModelCard,
    check_state_dict,
    file_hash,
    load_model,
    save_model,
)
from ttspec_ros.models.revcol import RevCol

torch.set_num_threads(1)

TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1), num_columns=4, num_classes=3)


class CfgNode(dict):
    """Stands for yacs' CfgNode: a dict subclass with attributes, pickled by class reference."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["frozen"] = True


class History(list):
    """A list subclass (pickled with APPENDS onto an object of a foreign class)."""


class Payload:
    """Unpickling it creates the marker file (if anything executes pickled callables)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def make_model(seed: int = 0, **kwargs) -> RevCol:
    torch.manual_seed(seed)
    return RevCol(**{**TINY, **kwargs}).eval()


def make_card(model: RevCol, model_id: str = "") -> ModelCard:
    return ModelCard(
        model_id=model_id, architecture=model.config.to_dict(),
        class_names=["a", "b", "c"],
        input={"channels": 3, "size": 32, "content_size": 28, "mean": [0.5] * 3,
               "std": [0.25] * 3},
        thresholds=[0.6, 0.7, 0.8], exit_cost=[0.25, 0.5, 0.75, 1.0],
        training={"seed": 1, "data": "unit test"}, metrics={},
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def official_training_checkpoint(path, marker, model, ema):
    torch.save({
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "max_accuracy": 81.2,
        "epoch": 299,
        "state_dict_ema": ema.state_dict(),
        "config": CfgNode(MODEL=CfgNode(TYPE="revcol_tiny")),
        "stray": Payload(marker),
        "history": History([1.0, 2.0]),
    }, path)


def test_training_checkpoint_loads_without_running_pickled_code(tmp_path):
    model, ema = make_model(0), make_model(1)
    marker = tmp_path / "payload-ran"
    path = tmp_path / "official.pth"
    official_training_checkpoint(path, marker, model, ema)
    with pytest.raises(pickle.UnpicklingError):  # why the restricted path exists
        torch.load(path, weights_only=True)

    loaded, card = load_model(path)
    assert_same_weights(loaded, model)
    assert not marker.exists()
    assert card.model_id == file_hash(path) and len(card.model_id) == 12
    assert card.architecture == model.config.to_dict() | {"drop_path": 0.0}
    assert card.exit_cost[-1] == 1.0 and card.exit_cost == sorted(card.exit_cost)
    assert card.training == {"ema": False}

    loaded_ema, ema_card = load_model(path, use_ema=True)
    assert_same_weights(loaded_ema, ema)
    assert ema_card.model_id == card.model_id + "-ema"  # the other weights take other updates
    assert ema_card.training == {"ema": True}
    assert not marker.exists()

    # The objects themselves come back inert: the class is recorded, never imported.
    raw = checkpoint.read_pickled_checkpoint(path)
    assert isinstance(raw["config"], ForeignObject)
    assert raw["config"].pickled_global.endswith("CfgNode")
    assert raw["config"]["MODEL"]["TYPE"] == "revcol_tiny"
    assert isinstance(raw["stray"], ForeignObject)
    assert raw["stray"].pickled_global.endswith("getattr.<call>")  # getattr(Path, "touch")(.)
    assert raw["history"]["<items>"] == [1.0, 2.0]
    assert not marker.exists()

    # Control: an unrestricted load of the same file does run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_is_only_a_payload_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"'model' holds a pickled .*getattr.*\(not loaded\)"):
        load_model(path)
    plain = tmp_path / "plain.pkl"  # a bare pickle is not a torch checkpoint at all
    plain.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_model(plain)
    path2 = tmp_path / "evil2.pth"
    torch.save(Payload(marker), path2)
    with pytest.raises(ValueError, match="holds a pickled .*getattr"):
        load_model(path2)
    assert not marker.exists()


def test_state_dict_keys_that_are_not_names_are_refused(tmp_path):
    state = dict(make_model().state_dict())
    state[7] = state.pop("subnet0.alpha0")  # str methods on the keys would raise otherwise
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="state dict key 7 is not a tensor name"):
        load_model(tmp_path / "bad.pth")


def test_ema_requested_but_absent_falls_back_to_model_with_warning(tmp_path):
    model = make_model()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    with pytest.warns(UserWarning, match="state_dict_ema"):
        loaded, card = load_model(path, use_ema=True)
    assert_same_weights(loaded, model)
    assert card.training == {"ema": False} and not card.model_id.endswith("-ema")


def test_checkpoint_holding_only_state_dict_ema_loads_with_warning(tmp_path):
    ema = make_model(seed=3)
    path = tmp_path / "ema_only.pth"
    torch.save({"state_dict_ema": ema.state_dict(), "epoch": 3}, path)
    with pytest.warns(UserWarning, match="no 'model' entry"):
        loaded, card = load_model(path)
    assert_same_weights(loaded, ema)
    # The card says these are EMA weights; one weight set, one id.
    assert card.training == {"ema": True} and card.model_id == file_hash(path)
    loaded, card = load_model(path, use_ema=True)  # asked for: no warning needed
    assert_same_weights(loaded, ema)
    assert card.training == {"ema": True} and card.model_id == file_hash(path)


@pytest.mark.parametrize("with_decoders", [True, False])
def test_raw_state_dict_with_or_without_decoders(tmp_path, with_decoders):
    model = make_model(with_decoders=with_decoders)
    path = tmp_path / "raw.pth"
    torch.save(OrderedDict(model.state_dict()), path)
    loaded, _ = load_model(path)
    assert loaded.config.with_decoders == with_decoders
    assert_same_weights(loaded, model)


def test_decoders_can_be_dropped_on_load(tmp_path):
    model = make_model()
    path = tmp_path / "raw.pth"
    torch.save(model.state_dict(), path)
    loaded, _ = load_model(path, with_decoders=False)
    assert loaded.decoder_blocks is None
    image = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.forward_exits(image)[3], model.forward_exits(image)[3])
    no_decoders = tmp_path / "nodec.pth"
    torch.save({k: v for k, v in model.state_dict().items()
                if not k.startswith("decoder_blocks.")}, no_decoders)
    with pytest.raises(ValueError, match="no decoder tensors"):
        load_model(no_decoders, with_decoders=True)


def test_mismatch_names_first_missing_unexpected_and_wrong_shape_keys():
    model = make_model()
    state = dict(model.state_dict())
    del state["cls_blocks.2.classifier.1.bias"]
    state["subnet9.alpha0"] = torch.zeros(1)
    state["stem.1.weight"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        check_state_dict(model, state)
    msg = str(err.value)
    assert "missing: cls_blocks.2.classifier.1.bias" in msg
    assert "unexpected: subnet9.alpha0" in msg
    assert "wrong shape: stem.1.weight [7] (model: [8])" in msg


def test_official_checkpoint_with_wrong_head_size_is_refused_naming_keys(tmp_path):
    state = dict(make_model().state_dict())
    state["cls_blocks.1.classifier.1.weight"] = torch.zeros(4, 32)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"cls_blocks\.1\.classifier\.1\.weight \[4, 32\]"):
        load_model(path)


def test_one_wrong_alpha_is_named_against_another_tensor_of_its_level(tmp_path):
    # The alphas alone set the widths: this one asked for a level-3 of 6000 channels (GBs in
    # the full model) and then blamed the 64 correct tensors.
    state = dict(make_model().state_dict())
    state["subnet0.alpha3"] = torch.full((1, 6000, 1, 1), 0.5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: the tensors disagree on level 3's channel "
                       r"count: subnet0\.alpha3 \[1, 6000, 1, 1\] says 6000, "
                       r"subnet0\.level3\.blocks\.0\.dwconv\.weight \[32, 1, 3, 3\] says 32"):
        load_model(tmp_path / "bad.pth")


def test_state_dict_is_checked_against_a_model_without_storage(tmp_path, monkeypatch):
    """A config that does not fit the tensors (from a card, or tensors that agree on a wrong
    width) must be refused before a model of that size is allocated."""
    checked_on: list[set[str]] = []
    real_check = checkpoint.check_state_dict

    def spy(model, state, source="state dict", show=5):
        checked_on.append({t.device.type for t in model.state_dict().values()})
        real_check(model, state, source, show)

    monkeypatch.setattr(checkpoint, "check_state_dict", spy)
    model = make_model()
    state = dict(model.state_dict())
    state["cls_blocks.1.classifier.1.weight"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"wrong shape: cls_blocks\.1\.classifier\.1\.weight"):
        checkpoint.build_from_state_dict(state)
    loaded = checkpoint.build_from_state_dict(model.state_dict())
    assert checked_on == [{"meta"}, {"meta"}]
    assert {(t.device.type, t.dtype) for t in loaded.state_dict().values()} == {
        ("cpu", torch.float32)}
    assert_same_weights(loaded, model)


def test_save_and_load_round_trip(tmp_path):
    model = make_model(in_chans=3)
    written = save_model(model, make_card(model), tmp_path / "m")
    assert written.model_id == file_hash(tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    for path in (tmp_path / "m", tmp_path / "m.safetensors", tmp_path / "m.json"):
        loaded, card = load_model(path)
        assert_same_weights(loaded, model)
        assert card == written
    kept_id = save_model(model, make_card(model, model_id="my-model"), tmp_path / "n")
    assert kept_id.model_id == "my-model"
    assert json.loads((tmp_path / "n.json").read_text())["model_id"] == "my-model"


def test_refused_card_leaves_the_saved_pair_untouched(tmp_path):
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = make_card(model)
    bad.class_names = ["too", "few"]
    with pytest.raises(ValueError, match="2 class_names"):
        save_model(make_model(seed=5), bad, tmp_path / "m")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Valid, but json cannot write it: found before the new weights replace the old ones.
    unwritable = make_card(model)
    unwritable.metrics = {"test_accuracy": [np.float32(0.91)]}
    with pytest.raises(ValueError, match=r"m\.safetensors: not JSON-serialisable .*float32"):
        save_model(make_model(seed=5), unwritable, tmp_path / "m")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert_same_weights(load_model(tmp_path / "m")[0], model)


def test_card_whose_architecture_does_not_match_the_tensors_is_refused(tmp_path):
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["architecture"]["channels"] = [8, 16, 24, 48]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"does not match the tensors \(channels: card"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("value", [None, "0.1", 1e308, 10**30, -0.1, True])
def test_card_drop_path_of_a_wrong_type_or_range_is_a_value_error(tmp_path, value):
    # The tensors do not record it, so only this check stands between the card and torch
    # (torch.linspace raised TypeError/OverflowError/RuntimeError, which the nodes' model
    # loading does not turn into a one-line refusal).
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["architecture"]["drop_path"] = value
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"drop_path must be a number in \[0, 1\)"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("field, value, message", [
    ("channels", [8.0, 16, 24, 32], r"channels must be 4 integers >= 1, got \[8.0"),
    ("layers", [1.0, 1, 1, 1], "layers must be 4 integers >= 1"),
    ("kernel_size", 3.0, "kernel_size must be an odd integer >= 1, got 3.0"),
    ("num_columns", 4.0, "num_columns must be an integer, got 4.0"),
    ("stem_kernel", 4.0, "stem_kernel must be an integer, got 4.0"),
    ("num_classes", "10", "num_classes must be an integer >= 1, got '10'"),
])
def test_card_architecture_numbers_of_the_wrong_type_are_named(tmp_path, field, value,
                                                               message):
    """8.0 == 8, so the card matched the tensors, then torch failed with a TypeError that
    named neither the file nor the field."""
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["architecture"][field] = value
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=f"m.json: architecture: {message}"):
        load_model(tmp_path / "m")

def test_stem_kernel_is_read_from_the_tensors_and_checked_against_the_card(tmp_path):
    model = make_model(stem_kernel=8)
    save_model(model, make_card(model), tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.stem_kernel == 8
    assert_same_weights(loaded, model)
    # A card written before the field existed means the official kernel 4.
    card = json.loads((tmp_path / "m.json").read_text())
    del card["architecture"]["stem_kernel"]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"stem_kernel: card 4, tensors 8"):
        load_model(tmp_path / "m")


def test_conv_stem_is_read_from_the_tensors_and_checked_against_the_card(tmp_path):
    model = make_model(stem_width=12)
    save_model(model, make_card(model), tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.stem_width == 12 and loaded.config.stem_kernel == 4
    assert_same_weights(loaded, model)
    card = json.loads((tmp_path / "m.json").read_text())
    del card["architecture"]["stem_width"]  # a card without it means the patchify stem
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"stem_width: card 0, tensors 12"):
        load_model(tmp_path / "m")


def test_inconsistent_card_is_refused(tmp_path):
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    card = json.loads((tmp_path / "m.json").read_text())
    card["class_names"] = ["only-one"]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="1 class_names for a model with 3 classes"):
        load_model(tmp_path / "m")
    card["class_names"], card["input"]["mean"] = ["a", "b", "c"], "0.5"  # len 3 = 3 channels
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"m\.json: input[ .a-z]*mean: need numbers"):
        load_model(tmp_path / "m")
    card["input"]["mean"], card["thresholds"] = [0.5] * 3, [0.5, 1.5, 0.5]
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"thresholds.*\[0, 1\]"):
        load_model(tmp_path / "m")


def test_corrupt_files_are_refused_clearly(tmp_path):
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(tmp_path / "m")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path / "m")
    (tmp_path / "m.json").write_bytes(b"\xff\xfe{}")  # not UTF-8: named like bad JSON
    with pytest.raises(ValueError, match=r"m\.json: model card is not valid JSON"):
        load_model(tmp_path / "m")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_model(garbage)
    # The end-of-archive record is intact (is_zipfile says yes), the central directory not.
    bad_directory = tmp_path / "bad_directory.pth"
    torch.save(model.state_dict(), bad_directory)
    data = bad_directory.read_bytes()
    bad_directory.write_bytes(data.replace(b"PK\x01\x02", b"XXXX", 1))
    with pytest.raises(ValueError, match=r"bad_directory\.pth: not a readable PyTorch "
                                         r"checkpoint \(corrupt zip archive"):
        load_model(bad_directory)


def test_missing_files_raise_file_not_found(tmp_path, monkeypatch):
    model = make_model()
    save_model(model, make_card(model), tmp_path / "m")
    (tmp_path / "m.json").unlink()
    with pytest.raises(FileNotFoundError, match="m.json"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="other.pth"):
        load_model(tmp_path / "other.pth")
    monkeypatch.setattr(checkpoint, "DEMO_STEM", tmp_path / "nothing" / "demo")
    with pytest.raises(FileNotFoundError, match="bundled demo model"):
        load_model(None)


def test_none_loads_the_bundled_demo_model(tmp_path, monkeypatch):
    model = make_model()
    written = save_model(model, make_card(model), tmp_path / "demo")
    monkeypatch.setattr(checkpoint, "DEMO_STEM", tmp_path / "demo")
    loaded, card = load_model()
    assert_same_weights(loaded, model)
    assert card == written


def test_dotted_stems_name_their_own_files(tmp_path):
    # "run.v1" is a stem, not a file with suffix ".v1": the two saves must not share files.
    v1, v2 = make_model(seed=1), make_model(seed=2)
    save_model(v1, make_card(v1), tmp_path / "run.v1")
    save_model(v2, make_card(v2), tmp_path / "run.v2.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run.v1.json", "run.v1.safetensors", "run.v2.json", "run.v2.safetensors"]
    for path in (tmp_path / "run.v1", tmp_path / "run.v1.safetensors"):
        assert_same_weights(load_model(path)[0], v1)
    assert_same_weights(load_model(tmp_path / "run.v2")[0], v2)


def test_card_from_another_save_is_refused_and_resaving_recomputes_the_id(tmp_path):
    a, b = make_model(seed=1), make_model(seed=2)
    card_a = save_model(a, make_card(a), tmp_path / "a")
    save_model(b, make_card(b), tmp_path / "b")
    (tmp_path / "b.json").write_bytes((tmp_path / "a.json").read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        load_model(tmp_path / "b")
    # A card carried over from a load names the old weights' hash: saving other weights with
    # it writes their own hash.
    card_b = save_model(b, card_a, tmp_path / "c")
    assert card_b.model_id == file_hash(tmp_path / "c.safetensors") != card_a.model_id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("key, value, message", [
    ("cls_blocks.0.classifier.1.bias", lambda t: t.to(torch.int64), "not floating point: "
     r"cls_blocks\.0\.classifier\.1\.bias torch\.int64"),
    ("stem.0.weight", lambda t: torch.full_like(t, float("nan")),
     r"NaN or infinite values: stem\.0\.weight"),
    # finite in the file, inf in the model's float32
    ("stem.0.bias", lambda t: torch.full_like(t, 1e300, dtype=torch.float64),
     r"NaN or infinite values: stem\.0\.bias \(once cast from torch\.float64 to "
     r"torch\.float32\)"),
])
def test_wrongly_typed_or_non_finite_tensors_are_refused(tmp_path, key, value, message):
    state = dict(make_model().state_dict())
    state[key] = value(state[key])
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "bad.pth")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("value, message", [
    (lambda t: torch.empty(t.shape, device="meta"), "is a meta tensor"),
    (lambda t: t.to_sparse(), "is a sparse_coo tensor"),
    (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
     "is a quantized torch.qint8 tensor"),
    # 4 bytes in the file standing for 8 values (a million, and the model allocates them all)
    (lambda t: torch.tensor([0.5]).expand(t.shape),
     r"of shape \[8\] claims 32 bytes but its storage holds 4"),
])
def test_tensors_that_are_not_plain_data_are_refused_naming_the_key(tmp_path, value, message):
    state = dict(make_model().state_dict())
    state["stem.0.bias"] = value(state["stem.0.bias"])
    torch.save({"model": state, "epoch": 1}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=rf"odd\.pth: tensor stem\.0\.bias {message}"):
        load_model(tmp_path / "odd.pth")


def test_tensor_with_the_wrong_number_of_dimensions_is_named(tmp_path):
    state = dict(make_model().state_dict())
    state["subnet0.alpha0"] = state["subnet0.alpha0"].flatten()
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"tensor subnet0\.alpha0 has shape \[8\]"):
        load_model(tmp_path / "bad.pth")


@pytest.mark.parametrize("field, value, message", [
    ("exit_cost", [0.2, 0.5, 0.7, float("nan")], "exit_cost needs"),
    ("exit_cost", [0.5, 0.3, 0.7, 1.0], "exit_cost needs"),
    ("exit_cost", [None] * 4, "exit_cost: need numbers"),
    ("exit_cost", ["0.25", "0.5", "0.75", "1"], "exit_cost: need numbers"),  # kept as text
    ("exit_cost", [0.25, 0.5, 0.75, 10**400], "wrong type"),  # no float holds it
    ("thresholds", [0.9, np.True_, 0.9], "thresholds: need numbers"),
    ("training", ["x"], "training must be an object"),
    ("metrics", "x", "metrics must be an object"),
    ("class_names", None, "wrong type"),
    ("class_names", "abc", "class_names has the wrong type"),  # not three one-letter names
    ("class_names", [0, 1, 2], "class_names has the wrong type"),  # predictions need strings
    ("thresholds", ["a", "b", "c"], "thresholds: need numbers"),
    ("thresholds", "000", "thresholds: need numbers"),  # not three zeros
    ("thresholds", True, "thresholds: need numbers"),  # not 1.0 for every exit
    ("thresholds", [0.9, False, 0.9], "thresholds: need numbers"),
    ("model_id", 123, "model_id must be a string"),
])
def test_malformed_card_fields_are_refused_with_value_errors(field, value, message):
    card = make_card(make_model()).to_dict()
    card[field] = value
    with pytest.raises(ValueError, match=message):
        ModelCard.from_dict(card)
    card = make_card(make_model()).to_dict()
    card["input"]["channels"] = None
    with pytest.raises(ValueError, match="wrong type"):
        ModelCard.from_dict(card)


@pytest.mark.parametrize("change, message", [
    ({"std": [0.0, 0.5, 0.5]}, "std must be positive"),
    ({"content_size": 64}, "content_size"),
    ({"size": None}, "wrong type"),
    ({"size": float("inf")}, "wrong type"),
    ({"size": 10**300}, "size <= 4096"),
    ({"std": [float("nan")] * 3}, "finite"),
    ({"size": 36, "content_size": 28}, "not a multiple of 32"),  # every frame would fail
])
def test_card_input_spec_is_checked_as_preprocessing_needs_it(change, message):
    # Nodes build their preprocessing from it: a bad spec fails at load, naming the field.
    card = make_card(make_model()).to_dict()
    card["input"].update(change)
    with pytest.raises(ValueError, match=message):
        ModelCard.from_dict(card)


def test_one_threshold_for_all_exits_is_a_list_after_validation():
    card = make_card(make_model()).to_dict()
    card["thresholds"] = 0.5
    assert ModelCard.from_dict(card).thresholds == [0.5, 0.5, 0.5]
    card["thresholds"] = [np.float32(0.5), 0.5, 1]  # numpy and integer numbers are numbers
    assert ModelCard.from_dict(card).thresholds == [0.5, 0.5, 1.0]
