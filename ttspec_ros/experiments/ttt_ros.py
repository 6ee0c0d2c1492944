"""Classifier accuracy on a corrupted stream through the real node pipeline, per adapter strategy.

For each strategy (``none`` = adapter disabled, ``specialize``, ``ttt_online``, ``both``) the
three installed node executables start afresh in their own namespace; this process publishes
the same seeded sequence of corrupted Fashion-MNIST test images (mono8, 28 px) on image_raw at
--rate Hz and scores every prediction the classifier publishes against the label. Writes
<out>/ttt_ros.json: per strategy the accuracy overall and per window of the stream (accuracy
"over time"), the mean exit, how many frames the adapter trained on and the final model version.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ttspec_ros import data, params, replay, topics
from ttspec_ros.experiments import seed_option
from ttspec_ros.files import check_writable, write_json

STRATEGIES = ("none", "specialize", "ttt_online", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ttspec_ros.corruptions import CORRUPTIONS, SEVERITIES

    parser.add_argument("--out", required=True, help="directory for ttt_ros.json")
    parser.add_argument("--model", default="", help="model path stem ('' = bundled demo model)")
    parser.add_argument("--strategies", default="none,specialize,ttt_online",
                        help=f"comma-separated, from {', '.join(STRATEGIES)} "
                             "(none = adapter disabled)")
    parser.add_argument("--corruption", default="gaussian_noise", choices=list(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=5, choices=SEVERITIES)
    parser.add_argument("--frames", type=int, default=600, help="stream length")
    parser.add_argument("--rate", type=float, default=8.0, help="published frames per second")
    parser.add_argument("--windows", type=int, default=4, help="windows the stream is scored in")
    update, lr = (params.spec(topics.ADAPTER_NODE, n) for n in ("ttt_update", "ttt_learning_rate"))
    parser.add_argument("--ttt-update", default=update.default, choices=update.choices,
                        help="adapter ttt_update")
    parser.add_argument("--ttt-lr", type=float, default=lr.default,
                        help="adapter ttt_learning_rate")
    parser.add_argument("--seed", type=seed_option, default=0,
                        help="image order and corruption noise")
    parser.add_argument("--namespace", default="ttspec_tttros")


def _stream_images(args: argparse.Namespace) -> tuple[list[np.ndarray], np.ndarray]:
    from ttspec_ros.corruptions import corrupt, image_rng

    images, labels = data.load_fashion_mnist("test")
    order = np.random.default_rng(args.seed).permutation(len(images))[: args.frames]
    out = [corrupt(images[i], args.corruption, args.severity,
                   image_rng(args.seed, "test", args.corruption, args.severity, int(i)))
           for i in order]
    return out, labels[order]


def _adapter_params(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    model = {"model": args.model} if args.model else {}  # `-p model:=` does not parse
    return {**model, "publish_period_s": 0.5,
            "strategy": "specialize" if strategy == "none" else strategy,
            "enabled": strategy != "none", "ttt_update": args.ttt_update,
            "ttt_learning_rate": args.ttt_lr}


def _run_strategy(strategy: str, images: list[np.ndarray], labels: np.ndarray,
                  args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    from ttspec_ros.image_codec import encode_image
    from ttspec_ros.nodes.probe import NodeProcess, process_problems, started

    ns = f"{args.namespace}_{strategy}"
    model = {"model": args.model} if args.model else {}  # `-p model:=` does not parse
    adapter = _adapter_params(strategy, args)
    procs = {topics.CAMERA_NODE: NodeProcess(topics.CAMERA_NODE, model,
                                             log_dir, namespace=ns),
             topics.CLASSIFIER_NODE: NodeProcess(topics.CLASSIFIER_NODE, model,
                                                 log_dir, namespace=ns),
             topics.ADAPTER_NODE: NodeProcess(topics.ADAPTER_NODE, adapter, log_dir,
                                              namespace=ns)}
    with started(procs, ns, f"ttt_ros_probe_{strategy}") as (probe, codes):
        if not probe.wait_until_up(procs, 120.0):
            raise ChildProcessError(f"{strategy}: nodes did not come up: "
                                    f"{probe.not_up_reason(procs)}; see logs in {log_dir}")
        probe.clear()
        start = time.monotonic()
        for i, image in enumerate(images):
            probe.publish_image(encode_image(image, "mono8"), frame_id=str(i))
            time.sleep(max(0.0, start + (i + 1) / args.rate - time.monotonic()))
        time.sleep(2.0)
        with probe.lock:
            preds = [r.msg for r in probe.predictions]
        cls, ada = probe.diag(topics.CLASSIFIER_NODE), probe.diag(topics.ADAPTER_NODE)
        alive = {n: p.alive() for n, p in procs.items()}
    index = np.array([int(p.header.frame_id) for p in preds], dtype=np.int64)
    correct = np.array([p.class_id for p in preds]) == labels[index]
    windows = []
    edges = np.linspace(0, len(images), args.windows + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (index >= lo) & (index < hi)
        windows.append({"frames": [int(lo), int(hi)], "answered": int(sel.sum()),
                        "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return {
        "strategy": strategy, "published": len(images), "answered": len(preds),
        "accuracy": float(correct.mean()) if len(preds) else None,
        "windows": windows,
        "mean_exit": float(np.mean([p.exit_index for p in preds])) if preds else None,
        "final_model_version": int(max((p.model_version for p in preds), default=0)),
        "adapter": {k: ada.get(k) for k in ("frames_adapted", "frames_dropped", "samples_used",
                                            "mean_ttt_step_ms", "ttt_loss", "model_version")},
        "classifier": {k: cls.get(k) for k in ("updates_applied", "updates_rejected",
                                               "dropped", "mean_model_ms")},
        "nodes_alive_at_end": alive,
        "exit_codes": codes,
        "problems": process_problems(alive, codes),
    }


def run(args: argparse.Namespace) -> int:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {STRATEGIES}")
    if args.windows < 1 or args.frames < args.windows or not 0 < args.rate < math.inf:
        raise ValueError("--windows must be >= 1, --frames >= --windows and --rate > 0 "
                         "and finite")
    for strategy in strategies:  # what the adapter would refuse only once it started
        reason = params.check_adapter(_adapter_params(strategy, args))
        if reason:
            raise ValueError(f"adapter: {reason}")
    args.namespace = topics.relative_namespace(args.namespace)
    replay.read_model_card(args.model)  # a missing or corrupt model, named before nodes start
    test_size = data.SPLIT_SIZES["test"]
    if args.frames > test_size:  # the stream is a permutation of the test split, never repeated
        raise ValueError(f"--frames {args.frames} exceeds the test split's {test_size} images")
    out = check_writable(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROS_LOG_DIR", str(out / "ros_logs"))
    for name, value in topics.localhost_discovery().items():
        os.environ.setdefault(name, value)
    images, labels = _stream_images(args)
    runs = [_run_strategy(s, images, labels, args, out) for s in strategies]
    result = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs}
    write_json(out / "ttt_ros.json", result)
    for r in runs:
        acc = [w["accuracy"] for w in r["windows"]]
        print(f"{r['strategy']}: accuracy {r['accuracy']}, windows {acc}, "
              f"adapted {r['adapter']['frames_adapted']}, version {r['final_model_version']}")
    problems = [f"{r['strategy']}: {p}" for r in runs for p in r["problems"]]
    for problem in problems:  # its figures are not the strategy's: say so, fail
        print(f"ttspec ttt-ros: {problem} (logs in {out})", file=sys.stderr)
    return 1 if problems else 0
