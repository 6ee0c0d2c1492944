"""Replay a rosbag2 through the real node graph; write report.json, report.md and plots.

Starts the installed camera/classifier/adapter executables (installed config/ttspec.yaml,
namespace /ttspec, fresh processes per run, a private DDS domain), publishes the bag's images on
the camera topic (recorded timing scaled by --rate, or --lockstep: the next frame once the
previous prediction arrived) and matches every prediction to its frame by header stamp. Any
sensor_msgs/Image or CompressedImage topic works; accuracy needs a ttspec_ros/LabelStamped topic.
"""

from __future__ import annotations

import argparse
import math
import sys

from ttspec_ros import replay, replay_report, replay_runs
from ttspec_ros.bags import BagError


# argparse type functions: a bad value is refused while parsing, before any replay work (a
# negative --window used to fail only in the report, after every run had been played).
def _checked(convert, ok, kind: str, rule: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from err
        if not ok(value):  # written so that NaN fails too
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


_frames = _checked(int, lambda v: v >= 1, "a whole number of frames",
                   "a number of frames >= 1")
_seconds = _checked(float, lambda v: v > 0 and math.isfinite(v), "a number of seconds",
                    "a finite number of seconds > 0")
_threshold = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number", "in [0, 1] (a confidence)")
_domain_id = _checked(int, lambda v: 0 <= v <= replay.MAX_DOMAIN_ID, "a whole number",
                      f"in 0..{replay.MAX_DOMAIN_ID} (DDS derives its ports from it)")


def _thresholds(text: str) -> list[float]:
    try:  # an empty item ("0.5,,0.7") is more likely a lost value than a separator
        values = [float(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from err
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be in [0, 1], got {text}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="rosbag2 directory, or its .mcap/.db3 file")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--image-topic", default=None,
                        help="Image/CompressedImage topic (default: /camera/image_raw, else the "
                             "bag's only image topic)")
    parser.add_argument("--label-topic", default=None,
                        help="LabelStamped topic (default: /camera/label, else the bag's only "
                             "LabelStamped topic)")
    parser.add_argument("--no-labels", action="store_true", help="ignore labels in the bag")
    parser.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                        help="run the adapter (test-time specialization); default on")
    thresholds = parser.add_mutually_exclusive_group()
    thresholds.add_argument("--threshold", type=_threshold, default=None,
                            help="classifier threshold for every early exit (default: params "
                                 "file)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--rate", type=float, default=1.0,
                        help="playback speed factor of the recorded timing (default 1.0)")
    timing.add_argument("--lockstep", action="store_true",
                        help="publish the next frame once the previous prediction arrived")
    parser.add_argument("--timeout", type=_seconds, default=replay_runs.DEFAULT_TIMEOUT_S,
                        help="seconds a frame may wait for its prediction before it counts as "
                             f"lost (default {replay_runs.DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--compare", action="store_true",
                        help="run with adaptation on and off, both in one report")
    thresholds.add_argument("--sweep-thresholds", type=_thresholds, default=None,
                            metavar="T1,T2,...",
                            help="one replay per threshold; plots the latency/accuracy curve")
    parser.add_argument("--max-frames", type=_frames, default=None, help="play only the first N")
    parser.add_argument("--window", type=_frames, default=None,
                        help="frames per report window (default: a sixth of the bag)")
    parser.add_argument("--tail", type=_frames, default=None,
                        help="frames at the end reported separately (default: min(1000, 1/3))")
    parser.add_argument("--model", default="", help="model path stem ('' = bundled demo model)")
    parser.add_argument("--params-file", default=None,
                        help="params file (default: the installed config/ttspec.yaml)")
    parser.add_argument("--param", action="append", default=[], metavar="NODE.NAME=VALUE",
                        help="set a node parameter on every run, e.g. "
                             "adapter.learning_rate=0.01 (repeatable)")
    parser.add_argument("--domain-id", type=_domain_id, default=None,
                        help="DDS domain of the replay graph (default: a private one, 60..101)")


def run_settings(args: argparse.Namespace) -> list[replay_runs.RunSettings]:
    if args.rate is not None and not args.rate > 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    if args.compare and args.adapt is not None:  # --compare used to win silently
        raise ValueError("--compare runs with the adapter on and off; drop "
                         f"--{'' if args.adapt else 'no-'}adapt")
    rate = None if args.lockstep else args.rate
    thresholds = args.sweep_thresholds or [args.threshold]
    adapts = [True, False] if args.compare else [args.adapt is not False]
    return [replay_runs.RunSettings(adapt=a, threshold=t, rate=rate, timeout_s=args.timeout)
            for t in thresholds for a in adapts]


def run(args: argparse.Namespace) -> int:
    try:
        runs = run_settings(args)
        params = [replay.parse_param(p) for p in args.param]
        report, plots = replay.replay_bag(
            args.bag, args.out, runs, image_topic=args.image_topic, label_topic=args.label_topic,
            use_labels=not args.no_labels, model=args.model, params_file=args.params_file,
            params=params,
            domain_id=args.domain_id,
            max_frames=args.max_frames, window=args.window, tail=args.tail)
    except (BagError, OSError, ValueError, RuntimeError) as err:
        print(f"ttspec replay: {err}", file=sys.stderr)
        return 2
    print(replay_report.summary_table(report))
    print(f"\nreport: {args.out}/report.json, {args.out}/report.md; plots: "
          + ", ".join(str(p) for p in plots))
    return 0
