"""Export a model's backbone to one ONNX graph per cascade stage, plus manifest.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ttspec_ros.experiments import seed_option
from ttspec_ros.files import check_writable
from ttspec_ros.models.revcol import PRESETS, RevCol, build_preset


def resolve_model(spec: str, *, seed: int = 0) -> tuple[RevCol, int, str]:
    """``demo`` (bundled model), a checkpoint path, or a RevCol preset name (random weights,
    ImageNet layout at 224 px). Returns (model in eval mode, image size, description)."""
    if spec in PRESETS:
        torch.manual_seed(seed)
        model = build_preset(spec, num_classes=1000, with_decoders=False)
        with torch.no_grad():
            # Layer scale starts at 1e-6, which makes every block almost the identity; 1.0
            # lets every block count, so comparing backends' outputs tests the whole graph.
            for name, param in model.named_parameters():
                if name.endswith(".gamma"):
                    param.fill_(1.0)
        return model.eval(), 224, f"{spec} (random weights, seed {seed}, layer scale 1)"
    from ttspec_ros.models.checkpoint import load_model

    model, card = load_model(None if spec == "demo" else spec)
    return model.eval(), int(card.input["size"]), f"{card.model_id} ({spec})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="demo",
        help=f"'demo', a checkpoint path, or a preset with random weights ({', '.join(PRESETS)})",
    )
    parser.add_argument("--out", required=True, help="output directory for graphs + manifest")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input height = width (default: the model card's input size; 224 "
                             "for presets)")
    parser.add_argument("--seed", type=seed_option, default=0, help="weights seed for presets")


def run(args: argparse.Namespace) -> int:
    from ttspec_ros.backends.onnx_export import export_stages, image_shape_for

    if args.image_size is not None and args.image_size < 1:  # 0 meant the card's size
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    check_writable(args.out)
    model, size, description = resolve_model(args.model, seed=args.seed)
    try:
        image_shape_for(model, args.image_size or size)
    except ValueError as e:
        raise ValueError(f"--image-size: {e}") from None
    manifest = export_stages(model, args.image_size or size, Path(args.out))
    print(json.dumps({
        "model": description, "out": str(args.out), "opset": manifest["opset"],
        "model_hash": manifest["model_hash"], "image_shape": manifest["image_shape"],
        "graphs": [s["file"] for s in manifest["stages"]] + [manifest["unsplit"]["file"]],
    }, indent=2))
    return 0
