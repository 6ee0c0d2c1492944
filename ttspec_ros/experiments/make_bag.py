"""Write a rosbag2 (mcap/sqlite3) of labelled Fashion-MNIST test images in a class-mix scenario.

The bag holds ``/camera/image_raw`` (sensor_msgs/Image rgb8, upscaled to ``--image-size`` px) and
``/camera/label`` (ttspec_ros/LabelStamped, same header stamp), stamped ``1/rate`` apart.
Scenarios: uniform, footwear-heavy, tops-heavy (90 % of frames from the group), shift
(footwear-heavy first half, tops-heavy second half). Prints a JSON description of the bag (also
stored in its metadata.yaml custom_data).
"""

from __future__ import annotations

import argparse
import json
import time

from ttspec_ros import bags
from ttspec_ros.experiments import seed_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", required=True, choices=sorted(bags.SCENARIOS),
                        help="; ".join(f"{k}: {v}" for k, v in bags.SCENARIOS.items()
                                      ).replace("%", "%%"))  # argparse %-formats help
    parser.add_argument("--out", required=True, help="bag directory to create")
    parser.add_argument("--storage", choices=bags.STORAGES, default="mcap",
                        help="rosbag2 storage plugin (default mcap)")
    parser.add_argument("--frames", type=int, default=bags.DEFAULT_FRAMES,
                        help=f"number of images (default {bags.DEFAULT_FRAMES})")
    parser.add_argument("--rate", type=float, default=bags.DEFAULT_RATE_HZ,
                        help=f"recorded frame rate in Hz (default {bags.DEFAULT_RATE_HZ:g})")
    parser.add_argument("--seed", type=seed_option, default=0,
                        help="seed of the image draw (default 0)")
    parser.add_argument("--image-size", type=int, default=bags.DEFAULT_IMAGE_SIZE,
                        help=f"image side in px (default {bags.DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--force", action="store_true", help="replace an existing bag")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    description = bags.make_scenario_bag(
        args.scenario, args.out, frames=args.frames, rate_hz=args.rate, seed=args.seed,
        storage=args.storage, image_size=args.image_size, overwrite=args.force,
    )
    description["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(description, indent=2))
    return 0
