"""Build the forgetting guard's anchor set (early-exit features + last-exit labels) from images.

Source: unlabeled Fashion-MNIST deployment-pool images (the model card's split) or a .npy of
uint8 images (N, H, W) already at the model's content size, e.g. frames saved on the robot.
Labels come from the model's own last exit, so no ground truth is used. The file is what
``AnchorSet.load`` reads (safetensors: features.0..H-1, labels; the model id in its metadata)
and what the adapter node's ``anchors_file`` parameter takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ttspec_ros.specialize import build_anchor_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="anchor file to write (.safetensors)")
    parser.add_argument("--model", default=None, help="checkpoint stem (default: demo model)")
    parser.add_argument("--images", default=None,
                        help="uint8 .npy (N, H, W) at content size (default: deployment pool)")
    parser.add_argument("--per-class", type=int, default=50,
                        help="at most this many anchors per last-exit class")
    parser.add_argument("--candidates", type=int, default=1000,
                        help="images (randomly chosen) to label before capping per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from ttspec_ros.models.checkpoint import load_model
    from ttspec_ros.preprocess import preprocess_batch

    torch.set_num_threads(args.threads)
    model, card = load_model(args.model)
    if args.images:
        images = np.load(args.images, allow_pickle=False)
        source = args.images
    else:
        from ttspec_ros.experiments.specialize_experiment import pool_images, split_seed

        _, images, _ = pool_images(card)
        source = f"Fashion-MNIST deployment pool (data.splits seed {split_seed(card)})"
    rng = np.random.default_rng(args.seed)
    take = np.sort(rng.permutation(len(images))[: args.candidates])
    x = torch.from_numpy(preprocess_batch(np.ascontiguousarray(images[take]), card.input))
    anchors = build_anchor_set(model, x, per_class=args.per_class, seed=args.seed,
                               model_id=card.model_id)
    path = anchors.save(Path(args.out))
    counts = np.bincount(anchors.labels, minlength=len(card.class_names)).tolist()
    print(json.dumps({"out": str(path), "model_id": card.model_id, "source": source,
                      "anchors": int(anchors.labels.size), "per_class": counts,
                      "seed": args.seed}, indent=1))
    return 0
