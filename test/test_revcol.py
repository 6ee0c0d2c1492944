"""RevCol: official state-dict layout, presets, and forward semantics checked against an
independent functional implementation written from the architecture description."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ttspec_ros.models import revcol
from ttspec_ros.models.revcol import PRESETS, RevCol, build_preset

torch.set_num_threads(1)

TSV = Path(__file__).parent / "data" / "revcol_t_state_dict.tsv"  # official RevCol-T layout
EPS = 1e-6
TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1), num_columns=4, num_classes=5)


def official_layout() -> dict[str, list[int]]:
    rows = [line.split("\t") for line in TSV.read_text().splitlines()
            if line and not line.startswith("#")]
    return {name: [int(d) for d in shape.strip("[]").split(",") if d.strip()]
            for name, shape in rows}


def model_layout(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def layout_of_preset(name: str, **kwargs) -> dict[str, list[int]]:
    # Only names and shapes matter here: skip the (slow) random init of 33 M values.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RevCol, "_init_weights", staticmethod(lambda m: None))
        model = build_preset(name, **kwargs)
    # A state dict with exactly the official names and shapes loads strictly.
    official = {k: torch.empty(s) for k, s in official_layout().items()
                if kwargs.get("with_decoders", True) or not k.startswith("decoder_blocks.")}
    model.load_state_dict(official, strict=True)
    return model_layout(model)


def test_revcol_t_state_dict_equals_official_layout():
    expected = official_layout()
    assert len(expected) == 603
    layout = layout_of_preset("revcol_tiny")
    assert list(layout) == list(expected)  # same names in the same order
    assert layout == expected
    assert sum(torch.Size(s).numel() for s in expected.values()) == pytest.approx(33.06e6, 1e-3)


def test_without_decoders_drops_exactly_the_decoder_tensors():
    expected = {k: v for k, v in official_layout().items() if not k.startswith("decoder_blocks.")}
    assert layout_of_preset("revcol_tiny", with_decoders=False) == expected


def test_presets_match_the_official_table():
    # channels, layers, columns, drop path (architecture reference, "Presets")
    table = {
        "revcol_tiny": ((64, 128, 256, 512), (2, 2, 4, 2), 4, 0.1),
        "revcol_small": ((64, 128, 256, 512), (2, 2, 4, 2), 8, 0.3),
        "revcol_base": ((72, 144, 288, 576), (1, 1, 3, 2), 16, 0.4),
        "revcol_large": ((128, 256, 512, 1024), (1, 2, 6, 2), 8, 0.5),
    }
    assert set(PRESETS) == set(table)
    for name, (channels, layers, columns, dp) in table.items():
        preset = PRESETS[name]
        assert (tuple(preset["channels"]), tuple(preset["layers"]), preset["num_columns"],
                preset["drop_path"], preset.get("kernel_size", 3)) == (channels, layers, columns,
                                                                       dp, 3), name
    with pytest.MonkeyPatch.context() as mp:  # build_preset passes the preset on
        mp.setattr(revcol, "RevCol", lambda **kwargs: kwargs)
        kwargs = build_preset("revcol_small", num_classes=10, drop_path=0.0)
    assert kwargs == dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_columns=8,
                          drop_path=0.0, num_classes=10)


def test_more_than_1000_classes_use_the_simple_decoders():
    model = RevCol(**dict(TINY, num_classes=1001)).eval()
    decoder = {k: list(v.shape) for k, v in model.state_dict().items()
               if k.startswith("decoder_blocks.0.")}
    assert decoder == {
        "decoder_blocks.0.projback.0.weight": [32], "decoder_blocks.0.projback.0.bias": [32],
        "decoder_blocks.0.projback.1.weight": [32 * 32 * 3, 32, 1, 1],
        "decoder_blocks.0.projback.1.bias": [32 * 32 * 3],
    }
    _, images = model.forward_with_reconstruction(torch.randn(1, 3, 64, 64))
    assert [tuple(i.shape) for i in images] == [(1, 3, 64, 64)] * 3


def test_drop_path_schedule_is_per_position_within_a_column():
    model = RevCol(**TINY, drop_path=0.3)
    rates = torch.linspace(0, 0.3, sum(TINY["layers"])).tolist()
    for k in (0, 3):
        column = getattr(model, f"subnet{k}")
        got = [b.drop_path for lv in range(4) for b in getattr(column, f"level{lv}").blocks]
        assert got == pytest.approx(rates)


def test_kernel_size_sets_columns_but_decoders_keep_kernel_3():
    model = RevCol(**TINY, kernel_size=5)
    sd = model.state_dict()
    assert sd["subnet0.level0.blocks.0.dwconv.weight"].shape == (8, 1, 5, 5)
    assert sd["decoder_blocks.0.normal_layers.0.0.dwconv.weight"].shape[-1] == 3
    logits = model.eval().forward_exits(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape) for t in logits] == [(1, 5)] * 4


def test_stem_kernel_overlaps_patches_and_keeps_the_token_grid():
    model = randomized(RevCol(**TINY, stem_kernel=8)).eval()
    assert model.state_dict()["stem.0.weight"].shape == (8, 3, 8, 8)
    image = torch.randn(1, 3, 32, 32)
    assert model.stem(image).shape == (1, 8, 8, 8)  # one token per 4x4 pixels, as kernel 4
    # Overlap: pixel x = 5 lies in the next patch, yet reaches the first token (kernel 8 at
    # padding 2 sees x = -2..5); with the official kernel 4 only x = 0..3 reach it.
    nudged = image.clone()
    nudged[..., 0, 5] += 1.0
    with torch.no_grad():
        assert not torch.equal(model.stem[0](image)[..., 0, 0], model.stem[0](nudged)[..., 0, 0])
        official = RevCol(**TINY).eval()
        assert torch.equal(official.stem[0](image)[..., 0, 0],
                           official.stem[0](nudged)[..., 0, 0])


def test_conv_stem_keeps_the_token_grid_and_the_official_stem_names():
    model = randomized(RevCol(**TINY, stem_width=12)).eval()
    sd = model.state_dict()
    assert sd["stem.0.weight"].shape == (12, 3, 3, 3) and sd["stem.3.weight"].shape == (8, 12, 3, 3)
    assert model.stem(torch.randn(1, 3, 32, 32)).shape == (1, 8, 8, 8)
    assert [tuple(t.shape) for t in model.forward_exits(torch.randn(1, 3, 32, 32))] == \
        [(1, TINY["num_classes"])] * 4
    assert "stem.3.weight" not in RevCol(**TINY).state_dict()  # the official stem is unchanged


@pytest.mark.parametrize("options", [{"stem_width": -1}, {"stem_width": True},
                                     {"stem_width": 8, "stem_kernel": 8}])
def test_conv_stem_options_are_checked(options):
    with pytest.raises(ValueError, match="stem_width"):
        RevCol(**TINY, **options)


@pytest.mark.parametrize("stem_kernel", [3, 6 + 1, 0])
def test_stem_kernel_must_overlap_symmetrically(stem_kernel):
    with pytest.raises(ValueError, match="stem_kernel"):
        RevCol(**TINY, stem_kernel=stem_kernel)


# -- independent functional forward ---------------------------------------------------------
def ln_channels_first(x, p, name):
    u = x.mean(1, keepdim=True)
    var = ((x - u) ** 2).mean(1, keepdim=True)
    return p[f"{name}.weight"][:, None, None] * (x - u) / torch.sqrt(var + EPS) \
        + p[f"{name}.bias"][:, None, None]


def ln_last(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], EPS)


def block(x, p, name):
    c = x.shape[1]
    w = p[f"{name}.dwconv.weight"]
    y = F.conv2d(x, w, p[f"{name}.dwconv.bias"], padding=w.shape[-1] // 2, groups=c)
    y = ln_last(y.permute(0, 2, 3, 1), p, f"{name}.norm")
    y = F.linear(y, p[f"{name}.pwconv1.weight"], p[f"{name}.pwconv1.bias"])
    y = F.linear(F.gelu(y), p[f"{name}.pwconv2.weight"], p[f"{name}.pwconv2.bias"])
    return x + (p[f"{name}.gamma"] * y).permute(0, 3, 1, 2)


def level(p, k, lv, layers, c_down, c_up):
    name = f"subnet{k}.level{lv}"
    x = c_down
    if lv > 0:
        x = F.conv2d(x, p[f"{name}.fusion.down.0.weight"], p[f"{name}.fusion.down.0.bias"],
                     stride=2)
        x = ln_channels_first(x, p, f"{name}.fusion.down.1")
    if k > 0 and lv < 3:
        up = F.linear(c_up.permute(0, 2, 3, 1), p[f"{name}.fusion.up.channel_reschedule.0.weight"],
                      p[f"{name}.fusion.up.channel_reschedule.0.bias"])
        up = ln_last(up, p, f"{name}.fusion.up.channel_reschedule.1").permute(0, 3, 1, 2)
        x = x + F.interpolate(up, scale_factor=2, mode="nearest")
    for j in range(layers[lv]):
        x = block(x, p, f"{name}.blocks.{j}")
    return x


def clamped(alpha):
    return torch.sign(alpha) * alpha.abs().clamp(min=1e-3)


def head(p, i, c3):
    pooled = c3.mean(dim=(2, 3))
    y = ln_last(pooled, p, f"cls_blocks.{i}.classifier.0")
    return F.linear(y, p[f"cls_blocks.{i}.classifier.1.weight"],
                    p[f"cls_blocks.{i}.classifier.1.bias"])


def decoder(p, i, c3):
    x, name = c3, f"decoder_blocks.{i}"
    for s in range(3):
        x = F.conv2d(x, p[f"{name}.proj_layers.{s}.0.weight"], p[f"{name}.proj_layers.{s}.0.bias"])
        x = F.gelu(ln_channels_first(x, p, f"{name}.proj_layers.{s}.1"))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        x = block(x, p, f"{name}.normal_layers.{s}.0")
    x = F.conv2d(x, p[f"{name}.projback.0.weight"], p[f"{name}.projback.0.bias"])
    return F.pixel_shuffle(x, 4)


def reference_forward(p, layers, num_columns, image):
    pad = (p["stem.0.weight"].shape[-1] - 4) // 2  # 0 for the official kernel = stride = 4
    x = ln_channels_first(
        F.conv2d(image, p["stem.0.weight"], p["stem.0.bias"], stride=4, padding=pad), p,
        "stem.1")
    c = [0.0, 0.0, 0.0, 0.0]
    logits, images = [], []
    interval = num_columns // 4
    for k in range(num_columns):
        a = [clamped(p[f"subnet{k}.alpha{lv}"]) for lv in range(4)]
        c[0] = a[0] * c[0] + level(p, k, 0, layers, x, c[1])
        c[1] = a[1] * c[1] + level(p, k, 1, layers, c[0], c[2])
        c[2] = a[2] * c[2] + level(p, k, 2, layers, c[1], c[3])
        c[3] = a[3] * c[3] + level(p, k, 3, layers, c[2], None)
        if (k + 1) % interval == 0:
            logits.append(head(p, k // interval, c[3]))
            if k + 1 < num_columns:
                images.append(decoder(p, k // interval, c[3]))
    return logits, images


def randomized(model: RevCol, seed: int = 0) -> RevCol:
    """Non-default values everywhere (gamma ~ 1, alphas of both signs, some tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if ".alpha" in name:
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 2 - 1)
                t.view(-1)[:3] = torch.tensor([1e-5, -2e-4, 0.0])
            elif name.endswith("gamma") or "norm" in name or ".1.weight" in name:
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model


@pytest.mark.parametrize(("num_columns", "stem_kernel"), [(4, 4), (8, 4), (4, 8)])
def test_forward_equals_independent_functional_forward(num_columns, stem_kernel):
    config = dict(TINY, num_columns=num_columns, stem_kernel=stem_kernel)
    model = randomized(RevCol(**config).double()).eval()
    params = {k: v.clone() for k, v in model.state_dict().items()}  # before any clamping
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator()
                        .manual_seed(1))
    expected_logits, expected_images = reference_forward(params, config["layers"], num_columns,
                                                         image)
    with torch.no_grad():
        logits, images = model.forward_with_reconstruction(image)
    assert len(logits) == 4 and len(images) == 3
    for got, want in zip(logits + images, expected_logits + expected_images, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert images[0].shape == image.shape


def test_reference_forward_is_sensitive_to_the_details_it_checks():
    # Guards the test itself: an eps of 1e-5 instead of 1e-6, or skipping the alpha clamp,
    # must change the outputs by far more than the tolerance used above.
    model = randomized(RevCol(**TINY).double()).eval()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    base, _ = reference_forward(params, TINY["layers"], 4, image)
    global EPS
    EPS = 1e-5
    try:
        other_eps, _ = reference_forward(params, TINY["layers"], 4, image)
    finally:
        EPS = 1e-6
    assert (other_eps[-1] - base[-1]).abs().max() > 1e-7
    global clamped
    real_clamp, clamped = clamped, lambda alpha: alpha  # the raw alphas (1e-5, -2e-4, ...)
    try:
        unclamped, _ = reference_forward(params, TINY["layers"], 4, image)
    finally:
        clamped = real_clamp
    assert (unclamped[-1] - base[-1]).abs().max() > 1e-7


def test_alpha_clamp_keeps_sign_and_minimum_magnitude():
    model = RevCol(**TINY).eval()
    alpha = model.subnet1.alpha2
    with torch.no_grad():
        alpha.view(-1)[:6] = torch.tensor([1e-5, -1e-5, 5e-4, -0.3, 0.7, 0.0])
    model.forward_exits(torch.randn(1, 3, 32, 32))
    assert alpha.view(-1)[:6].tolist() == pytest.approx([1e-3, -1e-3, 1e-3, -0.3, 0.7, 0.0])
    nonzero = alpha[alpha != 0]
    assert (nonzero.abs() >= 1e-3).all()


def test_forward_last_equals_last_exit():
    model = randomized(RevCol(**TINY)).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model.forward_last(image), model.forward_exits(image)[-1])


def test_config_round_trip():
    model = RevCol(**TINY, in_chans=1, with_decoders=False)
    config = type(model.config).from_dict(model.config.to_dict())
    assert config == model.config
    rebuilt = RevCol(**config.to_dict())
    assert model_layout(rebuilt) == model_layout(model)
