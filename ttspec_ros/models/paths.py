"""Where a model's files are, without importing torch: the camera node and the replay report
read only the card, and this rule must be the one ``checkpoint.load_model`` follows."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_STEM = Path(__file__).resolve().parent.parent / "weights" / "demo"
SAFETENSORS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"


def model_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, card) paths of our format for ``X``, ``X.safetensors`` or ``X.json``.

    Suffixes are appended, not substituted, so a dotted stem such as ``run.v1`` names
    ``run.v1.safetensors`` and not ``run.safetensors``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (SAFETENSORS_SUFFIX, CARD_SUFFIX) else path
    return (stem.with_name(stem.name + SAFETENSORS_SUFFIX),
            stem.with_name(stem.name + CARD_SUFFIX))


def is_our_format(path: str | os.PathLike) -> bool:
    """Whether ``path`` names our safetensors + card pair rather than an official pickled
    checkpoint: our suffixes, no suffix, or a dotted stem that is no file but whose pair
    exists."""
    path = Path(path)
    if path.suffix in (SAFETENSORS_SUFFIX, CARD_SUFFIX, ""):
        return True
    return not path.is_file() and any(p.exists() for p in model_files(path))
