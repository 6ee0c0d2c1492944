"""MAE-style random patch masking and the masked-patch reconstruction loss.

Used by training (the decoders learn to fill in hidden patches) and by test-time training,
which must use these exact functions. Patches are the stem's 4x4 patches: with the default
stem kernel 4 a masked patch is exactly one stem token (a larger stem kernel, which overlaps
its neighbours, also sees the edges of neighbouring patches). Hidden pixels are set to 0 in
the normalised input (= the training mean), the usual way to mask for a convolutional encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ttspec_ros.models.revcol import STEM_PATCH

DEFAULT_MASK_RATIO = 0.75


def _grid(images: Tensor, patch: int) -> tuple[int, int]:
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    return h // patch, w // patch


def random_patch_mask(
    images: Tensor,
    ratio: float = DEFAULT_MASK_RATIO,
    patch: int = STEM_PATCH,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Hide round(ratio * patches) random patches of every image, independently per image.

    Returns (masked images, mask) with mask of shape (N, 1, H/patch, W/patch), float 1 = hidden.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    gh, gw = _grid(images, patch)
    n, count = images.shape[0], gh * gw
    hidden = max(1, min(count - 1, round(ratio * count)))
    noise = torch.rand(n, count, generator=generator, device=images.device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch in a random order
    mask = (ranks < hidden).to(images.dtype).reshape(n, 1, gh, gw)
    pixel_mask = mask.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return images * (1.0 - pixel_mask), mask


def _patchify(x: Tensor, patch: int) -> Tensor:
    """(N, C, H, W) -> (N, L, C*patch*patch)."""
    n, c, _, _ = x.shape
    gh, gw = _grid(x, patch)
    x = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, gh * gw, c * patch * patch)


def masked_reconstruction_loss(
    reconstruction: Tensor,
    target: Tensor,
    mask: Tensor,
    patch: int = STEM_PATCH,
    norm_pix: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """MSE on hidden patches only (normalised pixels; per-patch normalised target if norm_pix).

    ``reduction="mean"``: scalar over all hidden patches; ``"none"``: (N,) per image.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ"
        )
    pred, tgt = _patchify(reconstruction, patch), _patchify(target, patch)
    if norm_pix:
        mean = tgt.mean(dim=-1, keepdim=True)
        var = tgt.var(dim=-1, keepdim=True)
        tgt = (tgt - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - tgt).pow(2).mean(dim=-1)  # (N, L)
    m = mask.reshape(mask.shape[0], -1).to(per_patch.dtype)
    if m.shape != per_patch.shape:
        raise ValueError(f"mask has {m.shape[1]} patches, images have {per_patch.shape[1]}")
    if reduction == "none":
        return (per_patch * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if reduction == "mean":
        return (per_patch * m).sum() / m.sum().clamp_min(1.0)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
