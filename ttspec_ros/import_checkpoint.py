"""Convert an official RevCol checkpoint (.pth) to this package's safetensors + model card.

The nodes and commands also take an official checkpoint path directly, but with a made-up
card (class_0, class_1, ... as class names, threshold 0.9, ImageNet input at 224), and they
go through the restricted unpickler at every start. Converted once, the model loads from
safetensors, predictions carry the class names given here, and the card records the file it
came from. The weights are those of the checkpoint, tensor for tensor; the model id is the
hash of the new weights file, so anchors made with the .pth path must be made again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ttspec_ros.files import check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official RevCol checkpoint: a state dict or a "
                                           "training checkpoint holding 'model' / "
                                           "'state_dict_ema'")
    parser.add_argument("--out", required=True,
                        help="model path stem to write: <stem>.safetensors + <stem>.json")
    parser.add_argument("--class-names", default=None,
                        help="UTF-8 text file, one class name per line in the head's order "
                             "(default: class_0, class_1, ...)")
    parser.add_argument("--ema", action="store_true",
                        help="take the checkpoint's EMA weights (state_dict_ema)")
    parser.add_argument("--no-decoders", action="store_true",
                        help="leave out the reconstruction decoders (smaller file; test-time "
                             "training then has nothing to reconstruct with)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="default early-exit thresholds: one for all early exits or one "
                             "per early exit (default 0.9)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="input side in pixels, a multiple of 32 up to 4096 "
                             "(default 224)")
    parser.add_argument("--force", action="store_true", help="replace an existing model at --out")


def read_class_names(path: str | Path) -> list[str]:
    """One name per line; surrounding whitespace and blank lines at the end are dropped, a
    blank line among the names is refused (it would shift every later class by one)."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors' "UTF-8 with BOM") is no part of the
        # first name
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: class names must be UTF-8 text ({err})") from err
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is blank: give one class name "
                         "per line, in the head's order")
    return names


def run(args: argparse.Namespace) -> int:
    from ttspec_ros.cascade import exit_costs
    from ttspec_ros.models.checkpoint import file_sha256, load_model, save_model
    from ttspec_ros.models.paths import is_our_format, model_files
    from ttspec_ros.models.revcol import INPUT_MULTIPLE
    from ttspec_ros.preprocess import MAX_SIZE

    source = Path(args.checkpoint)
    # The card's bound, checked before exit_costs runs a forward at that size (GBs at 8192).
    if args.input_size is not None and (not 0 < args.input_size <= MAX_SIZE
                                        or args.input_size % INPUT_MULTIPLE):
        raise ValueError(f"--input-size must be a positive multiple of {INPUT_MULTIPLE} (the "
                         f"stem and three 2x downsamplings) of at most {MAX_SIZE}, got "
                         f"{args.input_size}")
    if is_our_format(source):
        raise ValueError(f"{source} names this package's format (a .safetensors / .json pair, "
                         "or a stem: a path without suffix); give the official checkpoint file "
                         "with its suffix, e.g. .pth")
    # A directory, or one to be (a trailing slash): the pair would land beside it, named
    # after it.
    if Path(args.out).is_dir() or str(args.out).endswith(("/", os.sep)):
        raise IsADirectoryError(f"--out {args.out} is a directory; give a path stem such as "
                                f"{Path(args.out) / source.stem}")
    out_files = model_files(args.out)
    for path in out_files:
        check_writable(path, directory=False)
    existing = [str(p) for p in out_files if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} exists; --force replaces it")
    names = read_class_names(args.class_names) if args.class_names else None
    # --ema: refused for a checkpoint without EMA weights (not the other weights, warned)
    model, card = load_model(source, require_ema=args.ema,
                             with_decoders=False if args.no_decoders else None)
    # The .pth path's own model id ("-ema" marks the EMA set of a file that holds both).
    changes: dict = {"training": {"imported_from": {
        "file": source.name, "sha256": file_sha256(source), "model_id": card.model_id,
        "ema": card.training["ema"], "decoders": model.decoder_blocks is not None}}}
    if names is not None:
        changes["class_names"] = names
    if args.thresholds is not None:
        changes["thresholds"] = args.thresholds[0] if len(args.thresholds) == 1 \
            else args.thresholds
    if args.input_size is not None:
        changes["input"] = dict(card.input, size=args.input_size, content_size=args.input_size)
        changes["exit_cost"] = exit_costs(model, args.input_size)
    # model_id "" = the new weights file's hash (the card made up for the .pth named the .pth's)
    card = dataclasses.replace(card, model_id="", **changes)
    written = save_model(model, card, args.out)  # validates the card before writing
    weights, card_path = out_files
    print(f"model {written.model_id}: {weights} + {card_path} "
          f"({model.config.num_classes} classes, {len(list(model.state_dict()))} tensors)")
    return 0
