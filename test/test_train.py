"""Training recipe pieces and a tiny seeded training run (1 thread, a few images)."""

from __future__ import annotations

import argparse

import pytest
import torch

from ttspec_ros import data, train
from ttspec_ros.masking import masked_reconstruction_loss, random_patch_mask
from ttspec_ros.models.checkpoint import ModelCard, load_model
from ttspec_ros.models.revcol import RevCol
from ttspec_ros.ttt import card_norm_pix

TINY = dict(channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), epochs=1, batch_size=32, limit=64,
            test_limit=40, threads=1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_official_exit_weighting_and_falling_reconstruction_weights():
    assert train.exit_weights() == pytest.approx([0.175, 0.35, 0.525, 1.0])
    rec = train.recon_weights()
    assert len(rec) == 3 and rec[0] > rec[1] > rec[2] > 0


def test_mask_hides_a_fixed_share_of_stem_patches_and_is_seeded():
    x = torch.randn(4, 1, 32, 32)
    masked, mask = random_patch_mask(x, 0.75, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (4, 1, 8, 8) and mask.sum((1, 2, 3)).tolist() == [48.0] * 4
    pixel = mask.repeat_interleave(4, 2).repeat_interleave(4, 3).bool()
    assert (masked[pixel] == 0).all() and torch.equal(masked[~pixel], x[~pixel])
    _, again = random_patch_mask(x, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, again)


def test_reconstruction_loss_counts_hidden_patches_only():
    x = torch.randn(2, 1, 32, 32)
    _, mask = random_patch_mask(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert masked_reconstruction_loss(x, x, mask) == 0
    pixel = mask.repeat_interleave(4, 2).repeat_interleave(4, 3).bool()
    wrong_visible = x.clone()
    wrong_visible[~pixel] += 5.0
    assert masked_reconstruction_loss(wrong_visible, x, mask) == 0
    wrong_hidden = x.clone()
    wrong_hidden[pixel] += 1.0
    assert masked_reconstruction_loss(wrong_hidden, x, mask) == pytest.approx(1.0)
    per_image = masked_reconstruction_loss(wrong_hidden, x, mask, reduction="none")
    assert per_image.shape == (2,)


def test_augment_keeps_shape_and_fills_with_background():
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 2:30, 2:30] = 1.0
    out = train.augment(x, -0.5, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= {-0.5, 0.0, 1.0}
    assert (out == 1.0).sum(dim=(1, 2, 3)).eq(28 * 28).all()  # shifted by <= 2 px: all kept


def test_augment_options_switch_shift_and_flip_off():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(8 * 32 * 32, dtype=torch.float32).reshape(8, 1, 32, 32)
    assert torch.equal(train.augment(x, -0.5, g, shift=0, flip=False), x)
    flipped = train.augment(x, -0.5, g, shift=0, flip=True)
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x, strict=True)]
    kept = [torch.equal(f, i) for f, i in zip(flipped, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)
    assert torch.equal(x, torch.arange(8 * 32 * 32, dtype=torch.float32).reshape(8, 1, 32, 32))


def test_ema_saves_the_average_not_the_last_weights():
    plain, _ = train.train(train.TrainConfig(**TINY), log=lambda msg: None)
    averaged, card = train.train(train.TrainConfig(**TINY, ema=0.5), log=lambda msg: None)
    again, _ = train.train(train.TrainConfig(**TINY, ema=0.5), log=lambda msg: None)
    p, a, b = plain.state_dict(), averaged.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], p[k]) for k in a)
    assert card["training"]["config"]["ema"] == 0.5


def test_tiny_training_changes_weights_and_is_deterministic():
    cfg = train.TrainConfig(**TINY)
    model_a, card = train.train(cfg, log=lambda msg: None)
    model_b, _ = train.train(train.TrainConfig(**TINY), log=lambda msg: None)
    torch.manual_seed(cfg.seed)
    init = RevCol(cfg.channels, cfg.layers, cfg.num_columns, 10, in_chans=1,
                  drop_path=cfg.drop_path, with_decoders=True)
    a, b, i = model_a.state_dict(), model_b.state_dict(), init.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = [k for k in a if not torch.equal(a[k], i[k])]
    assert any(k.startswith("decoder_blocks.") for k in changed)
    assert any(k.startswith("cls_blocks.0") for k in changed)
    ModelCard.from_dict(card)  # the card validates
    assert card["training"]["seed"] == 0 and card["training"]["splits"]["pool"]["size"] >= 5000
    assert card["exit_cost"][-1] == 1.0 and card["exit_cost"] == sorted(card["exit_cost"])
    assert len(card["metrics"]["test_accuracy"]) == 4
    assert card["metrics"]["test_images"] == TINY["test_limit"]
    # The normalisation is of the images trained on (here the first 64), nothing held out.
    images, _ = data.load_fashion_mnist("train")
    trained_on = data.splits(cfg.seed, cfg.pool_size).train[: TINY["limit"]]
    mean, std = data.pixel_stats(images[trained_on])
    assert card["input"]["mean"] == [mean] and card["input"]["std"] == [std]


def test_cli_writes_a_loadable_model(tmp_path):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    stem = tmp_path / "tiny"
    args = parser.parse_args(["--out", str(stem), "--channels", "8,8,8,8", "--layers", "1,1,1,1",
                              "--limit", "32", "--batch-size", "32", "--epochs", "1",
                              "--test-limit", "20", "--norm-pix"])
    assert train.run(args) == 0
    model, card = load_model(str(stem))
    assert card.input["size"] == 32 and card.input["channels"] == 1
    assert card_norm_pix(card)  # test-time training will reconstruct the same target
    assert model.config.with_decoders and model.config.channels == (8, 8, 8, 8)
    with pytest.raises(ValueError, match="--epochs"):
        train.run(parser.parse_args(["--out", str(stem), "--epochs", "0"]))


@pytest.mark.parametrize("option, value, message", [
    ("--max-steps", "-1", "--max-steps must be >= 0"),  # ran no step, saved the untrained model
    ("--limit", "-5", "--limit must be >= 0"),
    ("--val-size", "54000", "--val-size must leave training images"),
    ("--stem-width", "-1", "--stem-width must be >= 0"),
])
def test_cli_refuses_bad_counts_before_training(tmp_path, option, value, message):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    stem = tmp_path / "never"
    with pytest.raises(ValueError, match=message):
        train.run(parser.parse_args(["--out", str(stem), option, value]))
    assert not stem.with_suffix(".json").exists()
