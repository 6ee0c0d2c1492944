"""Build the forgetting guard's anchor set (early-exit features + last-exit labels) from images.

Source: unlabeled Fashion-MNIST deployment-pool images (the model card's split), a rosbag2 of
the robot's camera (any Image/CompressedImage topic; frames preprocessed as the camera node
does), or a .npy of uint8 images (N, H, W) already at the model's content size.
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

from ttspec_ros.experiments import below_minimum, seed_option, thread_option
from ttspec_ros.files import check_writable
from ttspec_ros.guard import build_anchor_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="anchor file to write (.safetensors)")
    parser.add_argument("--model", default=None, help="checkpoint stem (default: demo model)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bag", default=None,
                        help="rosbag2 directory or file of the robot's camera images")
    source.add_argument("--images", default=None,
                        help="uint8 .npy (N, H, W) at content size (default: deployment pool)")
    parser.add_argument("--image-topic", default=None,
                        help="with --bag: Image/CompressedImage topic (default: "
                             "/camera/image_raw, else the bag's only image topic)")
    parser.add_argument("--per-class", type=int, default=50,
                        help="at most this many anchors per last-exit class")
    parser.add_argument("--candidates", type=int, default=1000,
                        help="images (randomly chosen) to label before capping per class")
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--threads", type=thread_option, default=1)


def run(args: argparse.Namespace) -> int:
    from ttspec_ros.models.checkpoint import load_model

    reason = below_minimum(args, {"per_class": 1, "candidates": 1, "threads": 1})
    if reason:
        raise ValueError(reason)
    if args.image_topic is not None and not args.bag:  # was ignored: anchors from the pool
        raise ValueError("--image-topic needs --bag (it names a topic of the bag)")
    check_writable(args.out, directory=False)
    torch.set_num_threads(args.threads)
    model, card = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    if args.bag:
        x, source = _bag_inputs(args.bag, args.image_topic, card.input, args.candidates, rng)
    else:
        x, source = _array_inputs(args, card, rng)
    anchors = build_anchor_set(model, x, per_class=args.per_class, seed=args.seed,
                               model_id=card.model_id)
    path = anchors.save(Path(args.out), made_with={
        "source": source, "seed": args.seed, "per_class": args.per_class,
        "candidates": args.candidates})
    counts = np.bincount(anchors.labels, minlength=len(card.class_names)).tolist()
    print(json.dumps({"out": str(path), "model_id": card.model_id, "source": source,
                      "anchors": int(anchors.labels.size), "per_class": counts,
                      "seed": args.seed}, indent=1))
    return 0


def _bag_inputs(bag: str, topic: str | None, input_spec, candidates: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, str]:
    """Up to ``candidates`` frames of the bag (a seeded choice), preprocessed like the camera's."""
    from ttspec_ros import bags
    from ttspec_ros.image_codec import ImageDecodeError
    from ttspec_ros.preprocess import preprocess

    stream = bags.open_image_stream(bag, topic, use_labels=False)
    take = set(rng.permutation(stream.image_count)[:candidates].tolist())
    x, skipped = [], 0
    for frame in stream.frames():
        if frame.index in take:
            try:
                x.append(preprocess(bags.decode_image(frame.raw, stream.image_type), input_spec))
            except ImageDecodeError:
                skipped += 1  # a malformed frame is not an anchor; the others still are
    if not x:
        raise ValueError(f"bag {bag}: none of {len(take)} frames of {stream.image_topic} "
                         "could be decoded")
    note = f", {skipped} undecodable frames skipped" if skipped else ""
    return torch.from_numpy(np.stack(x)), f"bag {bag} topic {stream.image_topic}{note}"


def _array_inputs(args: argparse.Namespace, card, rng: np.random.Generator
                  ) -> tuple[torch.Tensor, str]:
    from ttspec_ros.preprocess import preprocess_batch

    if args.images:
        images = np.load(args.images, allow_pickle=False)
        source = args.images
    else:
        from ttspec_ros.experiments.specialize_experiment import pool_images, split_seed

        _, images, _ = pool_images(card)
        source = f"Fashion-MNIST deployment pool (data.splits seed {split_seed(card)})"
    take = np.sort(rng.permutation(len(images))[: args.candidates])
    return torch.from_numpy(preprocess_batch(np.ascontiguousarray(images[take]),
                                             card.input)), source
