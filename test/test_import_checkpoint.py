"""`ttspec import-checkpoint`: an official checkpoint becomes our safetensors + model card with
the same weights and outputs, the user's class names and thresholds, and a record of its
source; bad input is refused in one line and writes nothing."""

from __future__ import annotations

import pytest
import torch

from ttspec_ros import cli
from ttspec_ros.models.checkpoint import file_sha256, load_model
from ttspec_ros.models.revcol import RevCol

TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1), num_columns=4, num_classes=3)


def _model(seed: int) -> RevCol:
    torch.manual_seed(seed)
    return RevCol(**TINY).eval()


@pytest.fixture
def official(tmp_path):
    """A training checkpoint as the official release saves one: 'model' and 'state_dict_ema'."""
    path = tmp_path / "revcol_tiny.pth"
    model, ema = _model(0), _model(1)
    torch.save({"model": model.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 3},
               path)
    return path, model, ema


def _outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(5)
    with torch.inference_mode():
        return model.forward_exits(torch.randn(2, 3, 64, 64))


def test_import_keeps_weights_and_outputs_and_writes_the_users_card(official, tmp_path, capsys):
    path, model, ema = official
    names = tmp_path / "classes.txt"
    names.write_text("\ufeffcat\r\n  dog \r\nbird\n\n", encoding="utf-8")  # BOM, CRLF
    out = tmp_path / "models" / "robot_v1"
    argv = ["import-checkpoint", str(path), "--out", str(out), "--class-names", str(names),
            "--thresholds", "0.6", "0.7", "0.8", "--input-size", "64"]
    assert cli.main(argv) == 0
    imported, card = load_model(out)
    for a, b in zip(_outputs(imported), _outputs(model), strict=True):
        assert torch.equal(a, b)
    assert card.class_names == ["cat", "dog", "bird"]
    assert card.thresholds == [0.6, 0.7, 0.8]
    assert card.input["size"] == card.input["content_size"] == 64
    assert card.training["imported_from"] == {
        "file": path.name, "sha256": file_sha256(path),
        "model_id": load_model(path)[1].model_id, "ema": False, "decoders": True}
    # The id is the new weights file's hash: load_model checks it against the file.
    assert card.model_id != load_model(path)[1].model_id
    assert card.model_id in capsys.readouterr().out

    # --ema takes the other weight set; --no-decoders leaves the decoders out.
    ema_out = tmp_path / "robot_ema"
    assert cli.main(["import-checkpoint", str(path), "--out", str(ema_out), "--ema",
                     "--no-decoders"]) == 0
    imported_ema, ema_card = load_model(ema_out)
    for a, b in zip(_outputs(imported_ema), _outputs(ema), strict=True):
        assert torch.equal(a, b)
    assert imported_ema.decoder_blocks is None
    assert ema_card.class_names == ["class_0", "class_1", "class_2"]
    assert ema_card.training["imported_from"]["model_id"].endswith("-ema")
    assert ema_card.training["imported_from"]["decoders"] is False

def _refused(argv: list[str], capsys, expected: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ttspec import-checkpoint: "), err
    assert expected in err[0], err[0]


@pytest.mark.parametrize(("lines", "expected"), [
    ("cat\ndog\n", "2 class_names for a model with 3 classes"),
    ("cat\n\ndog\nbird\n", "line 2 is blank"),
])
def test_class_names_that_do_not_fit_are_refused_and_nothing_is_written(official, tmp_path,
                                                                          capsys, lines,
                                                                          expected):
    path = official[0]
    names = tmp_path / "classes.txt"
    names.write_text(lines, encoding="utf-8")
    out = tmp_path / "robot"
    _refused(["import-checkpoint", str(path), "--out", str(out), "--class-names", str(names)],
             capsys, expected)
    assert not list(tmp_path.glob("robot*"))


def test_bad_options_and_sources_are_refused_in_one_line(official, tmp_path, capsys):
    path = official[0]
    out = tmp_path / "robot"
    _refused(["import-checkpoint", str(path), "--out", str(out), "--input-size", "60"],
             capsys, "--input-size must be a positive multiple of 32")
    # Refused up front, not after a forward at that size (GBs at 8192) by the card's check
    _refused(["import-checkpoint", str(path), "--out", str(out), "--input-size", "4128"],
             capsys, "--input-size must be a positive multiple of 32 (the stem and three 2x "
                     "downsamplings) of at most 4096, got 4128")
    _refused(["import-checkpoint", str(path), "--out", str(out), "--thresholds", "1.5"],
             capsys, "thresholds")
    assert not list(tmp_path.glob("robot*"))
    # Our own format is not an official checkpoint; a file that is none is named.
    assert cli.main(["import-checkpoint", str(path), "--out", str(out)]) == 0
    _refused(["import-checkpoint", str(out), "--out", str(tmp_path / "again")], capsys,
             "names this package's format")
    _refused(["import-checkpoint", str(path), "--out", str(tmp_path)], capsys,
             "is a directory; give a path stem")
    _refused(["import-checkpoint", str(path), "--out", f"{tmp_path / 'new'}/"], capsys,
             "is a directory; give a path stem")
    # --ema on a checkpoint without EMA weights (a plain state dict): refused, not ignored
    raw = tmp_path / "raw.pth"
    torch.save(_model(0).state_dict(), raw)
    _refused(["import-checkpoint", str(raw), "--out", str(tmp_path / "raw_ema"), "--ema"],
             capsys, "holds no state_dict_ema weights")
    model_only = tmp_path / "model_only.pth"
    torch.save({"model": _model(0).state_dict(), "epoch": 1}, model_only)
    _refused(["import-checkpoint", str(model_only), "--out", str(tmp_path / "raw_ema"),
              "--ema"], capsys, "holds no state_dict_ema weights (top-level keys: model, epoch)")
    assert not list(tmp_path.glob("raw_ema*")) and not (tmp_path / "new").exists()
    # A release of the EMA weights alone is imported as such without --ema: the card says so.
    ema_only = tmp_path / "ema_only.pth"
    torch.save({"state_dict_ema": _model(1).state_dict()}, ema_only)
    with pytest.warns(UserWarning, match="no 'model' entry"):
        assert cli.main(["import-checkpoint", str(ema_only), "--out",
                         str(tmp_path / "ema_only")]) == 0
    assert load_model(tmp_path / "ema_only")[1].training["imported_from"]["ema"] is True
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    _refused(["import-checkpoint", str(garbage), "--out", str(tmp_path / "g")], capsys,
             "garbage.pth")


def test_an_existing_model_is_kept_unless_forced(official, tmp_path, capsys):
    path = official[0]
    out = tmp_path / "robot"
    assert cli.main(["import-checkpoint", str(path), "--out", str(out)]) == 0
    before = out.with_suffix(".json").read_bytes()
    _refused(["import-checkpoint", str(path), "--out", str(out), "--thresholds", "0.5"],
             capsys, "--force replaces it")
    assert out.with_suffix(".json").read_bytes() == before
    assert cli.main(["import-checkpoint", str(path), "--out", str(out), "--thresholds", "0.5",
                     "--force"]) == 0
    assert load_model(out)[1].thresholds == [0.5, 0.5, 0.5]
