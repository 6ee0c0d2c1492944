"""Reversible Column Networks (RevCol) for classification, checkpoint-compatible with the
official release (Cai et al., arXiv 2212.11696).

Module and parameter names follow the official state dict exactly, so official checkpoints
load with ``strict=True``. The forward pass is the non-reversible form, which computes the
same values as the reversible one (only training memory differs).

Besides ``forward`` (the official forward's class outputs; ``forward_with_reconstruction``
adds its reconstructions), the model exposes the pieces the early-exit cascade runs one at a
time: ``stem``, ``run_column``, ``pool`` and ``head``.

Generalisations that leave the official configurations unchanged: ``in_chans`` (the official
stem and decoders assume 3 channels; here the decoders reconstruct ``in_chans`` channels) and
any multiple of 4 columns. As officially, models with more than 1000 classes get the simple
reconstruction decoders (LN, 1x1 conv, PixelShuffle(32)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttspec_ros.checks import is_integer, is_real

NUM_EXITS = 4  # the official model has a head after every num_columns // 4 columns
STEM_PATCH = 4  # stem conv stride (= kernel in the official model): one token per 4x4 pixels
# The stem (4 px) and three 2x downsamplings need input sides divisible by this.
INPUT_MULTIPLE = STEM_PATCH * 2 ** 3
DECODER_KERNEL = 3  # the official decoders use kernel 3 whatever the columns use


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over C of an (N, C, H, W) tensor, as the official ``channels_first`` LN."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def global_pool(c3: Tensor) -> Tensor:
    """Global average of an (N, C, H, W) map, shape (N, C): the heads' input. One function for
    the heads and the cascade, so both give bit-identical logits."""
    return F.adaptive_avg_pool2d(c3, 1).flatten(1)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ConvNextBlock(nn.Module):
    """dwconv → LN (NHWC) → Linear → GELU → Linear → gamma → DropPath → residual."""

    def __init__(self, dim: int, hidden: int, kernel_size: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(
            dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + drop_path(y, self.drop_path, self.training)


class UpSampleConvnext(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.channel_reschedule = nn.Sequential(
            nn.Linear(in_channels, out_channels), nn.LayerNorm(out_channels, eps=1e-6)
        )
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.up(x)


class Fusion(nn.Module):
    def __init__(self, level: int, channels: Sequence[int], first_col: bool) -> None:
        super().__init__()
        self.first_col = first_col
        if level == 0:
            self.down: nn.Module = nn.Identity()
        else:
            self.down = nn.Sequential(
                nn.Conv2d(channels[level - 1], channels[level], 2, stride=2),
                ChannelsFirstLayerNorm(channels[level]),
            )
        self.up = (
            UpSampleConvnext(channels[level + 1], channels[level])
            if not first_col and level in (0, 1, 2)
            else None
        )

    def forward(self, c_down: Tensor, c_up: Tensor | None) -> Tensor:
        if self.first_col or self.up is None or c_up is None:
            return self.down(c_down)
        return self.up(c_up) + self.down(c_down)


class Level(nn.Module):
    def __init__(
        self,
        level: int,
        channels: Sequence[int],
        layers: Sequence[int],
        kernel_size: int,
        first_col: bool,
        dp_rates: Sequence[float],
    ) -> None:
        super().__init__()
        start = sum(layers[:level])
        c = channels[level]
        self.fusion = Fusion(level, channels, first_col)
        self.blocks = nn.Sequential(
            *[
                ConvNextBlock(c, 4 * c, kernel_size, dp_rates[start + j])
                for j in range(layers[level])
            ]
        )

    def forward(self, c_down: Tensor, c_up: Tensor | None) -> Tensor:
        return self.blocks(self.fusion(c_down, c_up))


ColumnState = tuple[Tensor | float, Tensor | float, Tensor | float, Tensor | float]
# A column's output: c0..c3, all tensors (only the first column's input state is 0.0)
ColumnTensors = tuple[Tensor, Tensor, Tensor, Tensor]


class SubNet(nn.Module):
    """One column: four levels, each mixing its previous value (× alpha) with a new one."""

    # Registered by name in __init__ (register_parameter); declared for the type checker.
    alpha0: nn.Parameter
    alpha1: nn.Parameter
    alpha2: nn.Parameter
    alpha3: nn.Parameter

    def __init__(
        self,
        channels: Sequence[int],
        layers: Sequence[int],
        kernel_size: int,
        first_col: bool,
        dp_rates: Sequence[float],
    ) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            self.register_parameter(f"alpha{i}", nn.Parameter(0.5 * torch.ones(1, c, 1, 1)))
        self.level0 = Level(0, channels, layers, kernel_size, first_col, dp_rates)
        self.level1 = Level(1, channels, layers, kernel_size, first_col, dp_rates)
        self.level2 = Level(2, channels, layers, kernel_size, first_col, dp_rates)
        self.level3 = Level(3, channels, layers, kernel_size, first_col, dp_rates)

    @staticmethod
    def _clamp_abs(data: Tensor, value: float) -> None:
        # Official behaviour: keep |alpha| >= value, sign kept (a zero stays zero).
        with torch.no_grad():
            sign = data.sign()
            data.abs_().clamp_(value)
            data *= sign

    def clamp_alphas(self) -> None:
        """The official clamp of every alpha to |alpha| >= 1e-3, done before each forward."""
        for i in range(4):
            self._clamp_abs(getattr(self, f"alpha{i}").data, 1e-3)

    def forward(self, x: Tensor, c0: Tensor | float, c1: Tensor | float, c2: Tensor | float,
                c3: Tensor | float) -> ColumnTensors:
        self.clamp_alphas()
        # Order matters: each level reads the *new* value below it and the *previous* above.
        # (new names: the new values are tensors, the previous ones may be the first 0.0)
        new0: Tensor = self.alpha0 * c0 + self.level0(x, c1 if torch.is_tensor(c1) else None)
        new1: Tensor = self.alpha1 * c1 + self.level1(new0, c2 if torch.is_tensor(c2) else None)
        new2: Tensor = self.alpha2 * c2 + self.level2(new1, c3 if torch.is_tensor(c3) else None)
        new3: Tensor = self.alpha3 * c3 + self.level3(new2, None)
        return new0, new1, new2, new3


class Classifier(nn.Module):
    """Global average pool → LayerNorm → Linear (``cls_blocks.i.classifier.{0,1}``)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.LayerNorm(in_channels, eps=1e-6), nn.Linear(in_channels, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(global_pool(x))


class Decoder(nn.Module):
    """Reconstruction decoder of an exit's c3: three (1x1 conv, LN, GELU, ×2 bilinear, block)
    stages on the reversed channel list, then a 1x1 conv and PixelShuffle to image size."""

    def __init__(self, channels: Sequence[int], out_chans: int) -> None:
        super().__init__()
        dims = list(channels)[::-1]
        # Registration order = the official state-dict order.
        self.normal_layers = nn.ModuleList()
        self.upsample_layers = nn.ModuleList()
        self.proj_layers = nn.ModuleList()
        for i in range(1, len(dims)):
            self.proj_layers.append(
                nn.Sequential(
                    nn.Conv2d(dims[i - 1], dims[i], 1), ChannelsFirstLayerNorm(dims[i]), nn.GELU()
                )
            )
            self.upsample_layers.append(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            )
            self.normal_layers.append(
                nn.Sequential(ConvNextBlock(dims[i], dims[i], DECODER_KERNEL))
            )
        self.projback = nn.Sequential(
            nn.Conv2d(dims[-1], STEM_PATCH * STEM_PATCH * out_chans, 1),
            nn.PixelShuffle(STEM_PATCH),
        )

    def forward(self, c3: Tensor) -> Tensor:
        x = c3
        for proj, up, block in zip(
            self.proj_layers, self.upsample_layers, self.normal_layers, strict=True
        ):
            x = block(up(proj(x)))
        return self.projback(x)


class SimDecoder(nn.Module):
    """The official decoder for > 1000 classes: channels-first LN, 1x1 conv, PixelShuffle."""

    def __init__(self, in_channels: int, out_chans: int, stride: int = 32) -> None:
        super().__init__()
        self.projback = nn.Sequential(
            ChannelsFirstLayerNorm(in_channels),
            nn.Conv2d(in_channels, stride * stride * out_chans, 1),
            nn.PixelShuffle(stride),
        )

    def forward(self, c3: Tensor) -> Tensor:
        return self.projback(c3)


SIMPLE_DECODER_ABOVE = 1000  # official: more classes than this -> SimDecoder


def check_stem_kernel(stem_kernel: int) -> None:
    if stem_kernel < STEM_PATCH or (stem_kernel - STEM_PATCH) % 2:
        raise ValueError(
            f"stem_kernel must be {STEM_PATCH} or {STEM_PATCH} plus an even number (patches "
            f"overlap symmetrically at stride {STEM_PATCH}), got {stem_kernel}"
        )


def check_architecture(channels: Sequence[int], layers: Sequence[int], num_columns: int,
                       num_classes: int, kernel_size: int = 3, in_chans: int = 3,
                       drop_path: float = 0.0, stem_kernel: int = STEM_PATCH,
                       stem_width: int = 0) -> None:
    """ValueError naming the first argument of ``RevCol`` that cannot build a model (also
    checks a card's architecture before any tensor is made)."""
    if len(channels) != 4 or len(layers) != 4:
        raise ValueError("RevCol needs 4 levels: channels and layers of length 4")
    # From a card (not in the tensors): 8.0 for 8 failed deep in torch with a TypeError
    for name, values in (("channels", channels), ("layers", layers)):
        if not all(is_integer(v) and v >= 1 for v in values):
            raise ValueError(f"{name} must be 4 integers >= 1, got {list(values)!r}")
    for name, value in (("num_columns", num_columns), ("stem_kernel", stem_kernel)):
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not is_integer(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        # an even depthwise kernel with (k-1)//2 padding shrinks the map: no residual add
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    check_stem_kernel(stem_kernel)
    if not is_integer(stem_width) or stem_width < 0 \
            or (stem_width and stem_kernel != STEM_PATCH):
        raise ValueError(f"stem_width must be an integer >= 0 (0: the patchify stem), and "
                         f"the conv stem takes no stem_kernel; got stem_width "
                         f"{stem_width!r}, stem_kernel {stem_kernel}")
    # From a card (not in the tensors): a wrong type failed deep in torch.linspace
    if not is_real(drop_path) or not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be a number in [0, 1), got {drop_path!r}")
    if num_columns < NUM_EXITS or num_columns % NUM_EXITS:
        raise ValueError(f"num_columns must be a multiple of {NUM_EXITS}, got {num_columns}")
    for name, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        # 0 built heads whose max() failed at the first forward; < 0 failed in torch.empty
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class RevColConfig:
    """Everything that decides the state-dict layout; stored in model cards."""

    channels: tuple[int, ...]
    layers: tuple[int, ...]
    num_columns: int
    num_classes: int
    kernel_size: int = 3
    in_chans: int = 3
    drop_path: float = 0.0
    with_decoders: bool = True
    stem_kernel: int = STEM_PATCH
    stem_width: int = 0  # 0: the official patchify stem; > 0: a conv stem (see RevCol)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RevColConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["channels"] = tuple(known["channels"])
        known["layers"] = tuple(known["layers"])
        return cls(**known)


def make_stem(in_chans: int, dim: int, stem_kernel: int = STEM_PATCH, stem_width: int = 0
              ) -> nn.Sequential:
    """The stem: /4 from pixels to the token grid.

    ``stem_width`` 0 is the official one: a ``stem_kernel`` conv at stride 4 (kernel 4 =
    non-overlapping patches; a larger kernel overlaps neighbouring patches, padding keeps the
    grid at size / 4), then LayerNorm. ``stem_width`` > 0 is a small conv stem for tiny
    images (two 3x3 stride-2 convs, ``stem_width`` channels between, as in Xiao et al. 2021,
    "Early convolutions help transformers see better"). Pilot, demo recipe otherwise (20
    epochs, 5,000 training images held out, 1 thread, seed 0), test exits 0-3: stem_width 16
    90.8 / 91.2 / 91.4 / 91.3 %, patchify 88.5 / 89.5 / 89.8 / 90.0 %, for about the same
    training time (a 3x3 conv at full resolution before the 4x4 patchify, not kept: 91.3 /
    91.7 / 91.8 / 92.0 % at ~25 % more time). Every exit gains, the early ones most: the exits
    then spread by 0.6-0.8 point instead of 1.5, which leaves the cascade little to decide, so
    the demo model keeps the patchify stem."""
    if stem_width == 0:
        return nn.Sequential(
            nn.Conv2d(in_chans, dim, stem_kernel, stride=STEM_PATCH,
                      padding=(stem_kernel - STEM_PATCH) // 2),
            ChannelsFirstLayerNorm(dim),
        )
    return nn.Sequential(
        nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1),
        ChannelsFirstLayerNorm(stem_width),
        nn.GELU(),
        nn.Conv2d(stem_width, dim, 3, stride=2, padding=1),
        ChannelsFirstLayerNorm(dim),
    )


class RevCol(nn.Module):
    def __init__(
        self,
        channels: Sequence[int],
        layers: Sequence[int],
        num_columns: int,
        num_classes: int,
        kernel_size: int = 3,
        in_chans: int = 3,
        drop_path: float = 0.0,
        with_decoders: bool = True,
        stem_kernel: int = STEM_PATCH,
        stem_width: int = 0,
    ) -> None:
        super().__init__()
        check_architecture(channels, layers, num_columns, num_classes, kernel_size, in_chans,
                           drop_path, stem_kernel, stem_width)
        self.config = RevColConfig(
            tuple(channels), tuple(layers), num_columns, num_classes, kernel_size, in_chans,
            drop_path, with_decoders, stem_kernel, stem_width,
        )
        self.num_columns = num_columns
        self.interval = num_columns // NUM_EXITS
        self.stem = make_stem(in_chans, channels[0], stem_kernel, stem_width)
        dp_rates = torch.linspace(0, drop_path, sum(layers), device="cpu").tolist()
        for k in range(num_columns):
            self.add_module(
                f"subnet{k}", SubNet(channels, layers, kernel_size, k == 0, dp_rates)
            )
        self.cls_blocks = nn.ModuleList(
            [Classifier(channels[-1], num_classes) for _ in range(NUM_EXITS)]
        )
        self.decoder_blocks = (
            nn.ModuleList(
                [
                    SimDecoder(channels[-1], in_chans)
                    if num_classes > SIMPLE_DECODER_ABOVE
                    else Decoder(channels, in_chans)
                    for _ in range(NUM_EXITS - 1)
                ]
            )
            if with_decoders
            else None
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            assert m.bias is not None, "every Conv2d and Linear of a RevCol has a bias"
            nn.init.constant_(m.bias, 0)

    # -- pieces the cascade runs one at a time -------------------------------------------
    @property
    def num_exits(self) -> int:
        return NUM_EXITS

    def exit_columns(self, exit_index: int) -> range:
        """Columns evaluated between exit ``exit_index - 1`` and exit ``exit_index``."""
        return range(exit_index * self.interval, (exit_index + 1) * self.interval)

    def run_column(self, k: int, x: Tensor, state: ColumnState) -> ColumnTensors:
        return getattr(self, f"subnet{k}")(x, *state)

    def run_columns(self, columns: range, x: Tensor, state: ColumnState) -> ColumnTensors:
        """Columns ``columns`` (at least one) in order, starting from ``state``."""
        out = self.run_column(columns[0], x, state)
        for k in columns[1:]:
            out = self.run_column(k, x, out)
        return out

    @staticmethod
    def pool(c3: Tensor) -> Tensor:
        """The exit's head input: global average of the column's c3, shape (N, C3)."""
        return global_pool(c3)

    def exit_head(self, exit_index: int) -> Classifier:
        """``cls_blocks[exit_index]``, typed: a ModuleList's items are plain Modules to mypy."""
        # cast: __init__ fills cls_blocks with Classifier modules only
        return cast(Classifier, self.cls_blocks[exit_index])

    def head(self, exit_index: int, pooled: Tensor) -> Tensor:
        return self.exit_head(exit_index).classifier(pooled)

    def head_device(self, exit_index: int) -> torch.device:
        """Where the parameters of exit ``exit_index``'s head are."""
        # cast: Classifier.classifier is Sequential(LayerNorm, Linear)
        return cast(nn.Linear, self.exit_head(exit_index).classifier[1]).weight.device

    def require_decoders(self) -> nn.ModuleList:
        """The reconstruction decoders after exits 0..2; RuntimeError for a model without."""
        if self.decoder_blocks is None:
            raise RuntimeError("this model was built without reconstruction decoders")
        return self.decoder_blocks

    def run_exit(self, exit_index: int, x: Tensor, state: ColumnState) -> ColumnTensors:
        # exit_columns is never empty: interval = num_columns // 4 >= 1 (check_architecture)
        return self.run_columns(self.exit_columns(exit_index), x, state)

    # -- whole-model forwards ------------------------------------------------------------
    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit (no decoders), equal to the official forward's class outputs."""
        x = self.stem(x)
        state: ColumnState = (0.0, 0.0, 0.0, 0.0)
        logits = []
        for i in range(NUM_EXITS):
            state = self.run_exit(i, x, state)
            logits.append(self.cls_blocks[i](state[3]))
        return logits

    def forward_with_reconstruction(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(logits of every exit, reconstructions after exits 0..2), as the official forward."""
        decoders = self.require_decoders()
        x = self.stem(x)
        state: ColumnState = (0.0, 0.0, 0.0, 0.0)
        logits, images = [], []
        for i in range(NUM_EXITS):
            state = self.run_exit(i, x, state)
            logits.append(self.cls_blocks[i](state[3]))
            if i < NUM_EXITS - 1:
                images.append(decoders[i](state[3]))
        return logits, images

    def forward_last(self, x: Tensor) -> Tensor:
        """Plain backbone forward with only the last head (the paper's baseline)."""
        x = self.stem(x)
        state = self.run_columns(range(self.num_columns), x, (0.0, 0.0, 0.0, 0.0))
        return self.cls_blocks[-1](state[3])

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_exits(x)


PRESETS: dict[str, dict] = {
    "revcol_tiny": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_columns=4,
                        drop_path=0.1),
    "revcol_small": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_columns=8,
                         drop_path=0.3),
    "revcol_base": dict(channels=(72, 144, 288, 576), layers=(1, 1, 3, 2), num_columns=16,
                        drop_path=0.4),
    "revcol_large": dict(channels=(128, 256, 512, 1024), layers=(1, 2, 6, 2), num_columns=8,
                         drop_path=0.5),
}


def build_preset(name: str, num_classes: int = 1000, **overrides: Any) -> RevCol:
    if name not in PRESETS:
        raise ValueError(f"unknown RevCol preset {name!r}; known: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[name], "num_classes": num_classes, **overrides}
    return RevCol(**kwargs)


def revcol_tiny(**kw: Any) -> RevCol:
    return build_preset("revcol_tiny", **kw)


def revcol_small(**kw: Any) -> RevCol:
    return build_preset("revcol_small", **kw)


def revcol_base(**kw: Any) -> RevCol:
    return build_preset("revcol_base", **kw)


def revcol_large(**kw: Any) -> RevCol:
    return build_preset("revcol_large", **kw)


__all__ = [
    "RevCol", "RevColConfig", "PRESETS", "NUM_EXITS", "build_preset", "revcol_tiny",
    "revcol_small", "revcol_base", "revcol_large",
]
