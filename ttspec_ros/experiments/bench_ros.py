"""ROS overhead of the pipeline: 224x224 rgb8 at 30 Hz and at 2x the classifier's capacity.

Starts the three installed node executables (as the launch file does, in their own namespace),
publishes Fashion-MNIST test images upscaled to --size px rgb8 on image_raw from this process,
and times every frame where this process sees it: published -> prediction (end-to-end).
"ROS overhead" = end-to-end minus the model time the classifier reports for that frame, taken
as deployed (only the classifier reads ``frames``). A second 30 Hz phase also subscribes to
``frames`` for the per-hop split: published -> preprocessed frame (camera hop) -> prediction
(classifier hop); that extra subscriber costs the camera a second delivery, so its overhead is
reported but not used for the target. A last phase sends the same stream through two relay
processes (``ttspec_ros.nodes.relay``) that pass it on with no work: the transport floor, the
share of the overhead that rclpy and DDS take on this machine whatever the nodes do. Writes
<out>/bench_ros.json: per-hop p50/p95, drops per stage, the classifier's pending queue, each
process's RSS over time, and the floor.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ttspec_ros import data, params, replay, topics
from ttspec_ros.experiments import below_minimum, seed_option
from ttspec_ros.files import check_writable, write_json

TARGET_OVERHEAD_P50_MS = 2.0
TARGET_MAX_PENDING = 1
RSS_FLAT_MB = 10.0  # growth over the overload phase still called flat
MAX_SIZE = 1024  # px a side: the bench holds 1,200 such rgb8 frames in memory (3.8 GB at 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for bench_ros.json")
    parser.add_argument("--model", default="", help="model path stem ('' = bundled demo model)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of the 30 Hz and the overload phase (0 = skip both)")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate of phase 1 (Hz)")
    parser.add_argument("--hops-seconds", type=float, default=None,
                        help="length of the per-hop phase at --rate, watching frames "
                             "(default: --seconds, at most 10; 0 = skip)")
    parser.add_argument("--overload", type=float, default=2.0,
                        help="phase 2 rate = this x the classifier's measured capacity")
    parser.add_argument("--max-rate", type=float, default=500.0,
                        help="cap on the phase 2 rate (Hz), for very fast models")
    parser.add_argument("--size", type=int, default=224, help="published image side (px)")
    parser.add_argument("--num-threads", type=int, default=1, help="classifier num_threads")
    parser.add_argument("--seed", type=seed_option, default=0, help="image order")
    parser.add_argument("--namespace", default="ttspec_bench")
    parser.add_argument("--floor-seconds", type=float, default=10.0,
                        help="length of the transport-floor phase at --rate: the same two hops "
                             "through relay processes that do no work (0 = skip)")
    parser.add_argument("--adapt-seconds", type=float, default=60.0,
                        help="length of the adaptation phase (0 = skip it)")
    parser.add_argument("--adapt-classes", default="tops",
                        help="class group (ttspec_ros.data.SUBSETS) streamed while adapting")
    parser.add_argument("--adapt-lr", type=float, default=0.01,
                        help="adapter learning_rate for the adaptation phase, set live through "
                             "its parameter service (the config's 1e-4 moves the heads too "
                             "little to see within a minute); negative = keep the config's")
    parser.add_argument("--adapt-windows", type=int, default=6,
                        help="time windows the adaptation phase is summarised in")


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3), "mean": round(float(a.mean()), 3),
            "max": round(float(a.max()), 3)}


def _images(size: int, count: int, seed: int, classes: list[int] | None = None
            ) -> tuple[list[dict[str, Any]], list[int]]:
    """Fashion-MNIST test images upscaled to size x size rgb8 (fields), and their labels."""
    import cv2

    from ttspec_ros.data import load_fashion_mnist
    from ttspec_ros.image_codec import encode_image

    images, labels = load_fashion_mnist("test")
    pool = np.flatnonzero(np.isin(labels, classes)) if classes else np.arange(len(images))
    order = np.random.default_rng(seed).permutation(pool)[:count]
    out = []
    for i in order:
        big = cv2.resize(images[i], (size, size), interpolation=cv2.INTER_LINEAR)
        out.append(encode_image(np.repeat(big[:, :, None], 3, axis=2), "rgb8"))
    return out, [int(labels[i]) for i in order]


def _publish_for(probe: Any, procs: dict[str, Any], images: list[dict], rate_hz: float,
                 seconds: float) -> tuple[dict[tuple[int, int], tuple[float, int]], float, dict]:
    """Publish at ``rate_hz`` for ``seconds`` -> ({stamp: (publish time, image index)},
    seconds taken, RSS samples per process (1 Hz))."""
    published: dict[tuple[int, int], tuple[float, int]] = {}
    rss: dict[str, list[tuple[float, float]]] = {n: [] for n in procs}
    period = 1.0 / rate_hz
    start = time.perf_counter()
    next_t, next_rss, i = start, start, 0
    while (now := time.perf_counter()) - start < seconds:
        if now >= next_rss:
            for name, p in procs.items():
                rss[name].append((round(now - start, 2), round(p.rss_mb(), 1)))
            next_rss += 1.0
        index = i % len(images)
        stamp, t = probe.publish_image(images[index])
        published[(stamp.sec, stamp.nanosec)] = (t, index)
        i += 1
        next_t += period
        delay = next_t - time.perf_counter()
        if delay > 0:  # behind schedule: publish at once (the achieved rate is recorded)
            time.sleep(delay)
    return published, time.perf_counter() - start, rss


def _phase(probe: Any, procs: dict[str, Any], images: list[dict], rate_hz: float,
           seconds: float, watch_frames: bool = False) -> dict[str, Any]:
    cam, cls = topics.CAMERA_NODE, topics.CLASSIFIER_NODE
    probe.watch_frames(watch_frames)
    time.sleep(1.2)  # fresh diagnostics before counting (and the frames subscription matched)
    before = {n: probe.diag(n) for n in (cam, cls)}
    probe.clear()
    sent, sent_for_s, rss = _publish_for(probe, procs, images, rate_hz, seconds)
    published = {k: t for k, (t, _) in sent.items()}
    # Let the last frames through, then wait for a diagnostics round (1 Hz) after them.
    time.sleep(2.2)
    with probe.lock:
        frames = {(r.msg.header.stamp.sec, r.msg.header.stamp.nanosec): r.t for r in probe.frames}
        preds = [(r.msg, r.t) for r in probe.predictions]
    after = {n: probe.diag(n) for n in (cam, cls)}

    def delta(node: str, key: str) -> int:
        return int(after[node].get(key, 0)) - int(before[node].get(key, 0))

    camera_hop, classifier_hop, end_to_end, model, overhead = [], [], [], [], []
    for msg, t in preds:
        key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        if key not in published:
            continue
        e2e = (t - published[key]) * 1000.0
        end_to_end.append(e2e)
        model.append(msg.latency_ms)
        overhead.append(e2e - msg.latency_ms)
        if key in frames:
            camera_hop.append((frames[key] - published[key]) * 1000.0)
            classifier_hop.append((t - frames[key]) * 1000.0)
    exits = [msg.exit_index for msg, _ in preds]
    rss_summary = {
        name: {"samples_s_mb": samples,
               "start_mb": samples[0][1] if samples else None,
               "end_mb": samples[-1][1] if samples else None,
               "max_mb": max(s[1] for s in samples) if samples else None,
               "growth_mb": round(samples[-1][1] - samples[0][1], 1) if samples else None}
        for name, samples in rss.items()}
    return {
        "bench_watches_frames": watch_frames,
        "rate_hz_requested": round(rate_hz, 2),
        "rate_hz_achieved": round(len(published) / sent_for_s, 2),
        "published": len(published),
        "camera_received": delta(cam, "received"),
        "frames_seen_by_bench": len(frames),
        "classifier_received": delta(cls, "received"),
        "classifier_dropped": delta(cls, "dropped"),
        "predictions": len(preds),
        "lost_before_camera": len(published) - delta(cam, "received"),
        "lost_camera_to_classifier": delta(cam, "published") - delta(cls, "received"),
        "drop_rate": round(1.0 - len(preds) / max(1, len(published)), 4),
        "classifier_max_pending": int(after[cls].get("max_pending", -1)),
        # Node-side means since the node started (diagnostics keep running means).
        # (null when a node did not report one: NaN is not JSON)
        "classifier_mean_queue_wait_ms_since_start": _reported(after[cls], "mean_queue_wait_ms"),
        "classifier_mean_handling_ms_since_start": _reported(after[cls], "mean_handling_ms"),
        "camera_mean_convert_ms_since_start": _reported(after[cam], "mean_convert_ms"),
        "latency_ms": {
            "camera_hop": _percentiles(camera_hop),
            "classifier_hop": _percentiles(classifier_hop),
            "end_to_end": _percentiles(end_to_end),
            "model": _percentiles(model),
            "ros_overhead": _percentiles(overhead),
        },
        "mean_exit": round(float(np.mean(exits)), 3) if exits else None,
        "rss": rss_summary,
    }


def _transport_floor(args: argparse.Namespace, images: list[dict], log_dir: Path
                     ) -> dict[str, Any]:
    """publish -> prediction through ``nodes.relay`` processes in place of camera and
    classifier (same topics, types, QoS and executor; no decoding, preprocessing or model):
    what rclpy and DDS alone cost for the pipeline's hops, run after the pipeline stopped."""
    from ttspec_ros.nodes.probe import RelayProcess, started, wait_for
    from ttspec_ros.nodes.relay import ROLES

    namespace = f"{args.namespace}_floor"
    relays = {r: RelayProcess(r, log_dir, namespace, args.model) for r in ROLES}
    predictions = f"/{namespace}/{topics.PREDICTIONS}"
    with started(relays, namespace, "ttspec_bench_floor_probe") as (probe, codes):
        if not wait_for(lambda: probe.image_pub.get_subscription_count() > 0
                        and probe.node.count_publishers(predictions) > 0, 60.0, 0.2):
            raise RuntimeError(f"relays did not come up; logs in {log_dir}")
        for seconds in (2.0, args.floor_seconds):  # warm-up, then measured
            time.sleep(0.5)
            probe.clear()
            sent, sent_for_s, rss = _publish_for(probe, relays, images, args.rate, seconds)
            time.sleep(1.0)
        with probe.lock:
            preds = [(r.msg, r.t) for r in probe.predictions]
    published = {k: t for k, (t, _) in sent.items()}
    e2e = [(t - published[key]) * 1000.0 for msg, t in preds
           if (key := (msg.header.stamp.sec, msg.header.stamp.nanosec)) in published]
    return {"namespace": namespace, "rate_hz_achieved": round(len(published) / sent_for_s, 2),
            "published": len(published), "predictions": len(e2e),
            "latency_ms": {"end_to_end": _percentiles(e2e)},
            "rss_end_mb": {n: s[-1][1] if s else None for n, s in rss.items()},
            "exit_codes": codes}


def _adaptation(probe: Any, procs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Stream one class group at the nominal rate with the adapter on (from the original heads,
    after ~/reset): mean exit depth, accuracy and model version per time window."""
    from ttspec_ros.data import SUBSETS

    classes = SUBSETS[args.adapt_classes]
    images, labels = _images(args.size, 1000, args.seed, classes)
    if args.adapt_lr >= 0:
        result = probe.set_parameters(topics.ADAPTER_NODE, learning_rate=args.adapt_lr)[0]
        if not result.successful:
            raise ValueError(f"adapter refused learning_rate {args.adapt_lr}: {result.reason}")
    learning_rate = probe.get_parameters(topics.ADAPTER_NODE, "learning_rate")["learning_rate"]
    reset = probe.trigger(topics.ADAPTER_NODE, "reset")
    time.sleep(1.5)  # the reset heads reach the classifier (reliable, transient local)
    probe.clear()
    sent, _, _ = _publish_for(probe, procs, images, args.rate, args.adapt_seconds)
    time.sleep(1.0)
    with probe.lock:
        preds = [(r.msg, r.t) for r in probe.predictions]
    rows = []
    for msg, _ in preds:
        key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        if key in sent:
            t, index = sent[key]
            rows.append((t, msg.exit_index, int(msg.class_id == labels[index]),
                         int(msg.model_version)))
    rows.sort()
    windows = []
    for chunk in np.array_split(np.asarray(rows, dtype=np.float64), args.adapt_windows):
        if len(chunk):
            windows.append({"frames": int(len(chunk)),
                            "mean_exit": round(float(chunk[:, 1].mean()), 3),
                            "accuracy": round(float(chunk[:, 2].mean()), 4),
                            "model_version_min": int(chunk[:, 3].min()),
                            "model_version_max": int(chunk[:, 3].max())})
    first, last = (windows[0], windows[-1]) if windows else ({}, {})
    return {
        "classes": args.adapt_classes, "class_ids": classes, "seconds": args.adapt_seconds,
        "rate_hz": args.rate, "learning_rate": learning_rate,
        "reset": {"success": reset.success, "message": reset.message},
        "predictions": len(rows), "windows": windows,
        "mean_exit_first_window": first.get("mean_exit"),
        "mean_exit_last_window": last.get("mean_exit"),
        "mean_exit_fell": bool(windows) and last["mean_exit"] < first["mean_exit"],
        "model_version_rose": bool(windows)
        and last["model_version_max"] > first["model_version_min"],
    }


def _reported(values: dict[str, str], key: str) -> float | None:
    """A diagnostics value as a finite float, None if the node did not report one."""
    try:
        x = float(values[key])
    except (KeyError, ValueError):
        return None
    return x if math.isfinite(x) else None


def overload_ratio(overload: dict[str, Any], capacity_hz: float) -> float:
    """The rate the overload phase achieved over the classifier's measured capacity: above 1
    only if the classifier was sent more frames than it can handle (--max-rate may cap the
    phase below it)."""
    return overload["rate_hz_achieved"] / capacity_hz


def _targets(nominal: dict[str, Any], overload: dict[str, Any], capacity_hz: float,
             floor: dict[str, Any] | None = None) -> dict[str, Any]:
    """The issue's targets. The overload ones are met = None, with the reason, when the phase
    did not exceed the classifier's capacity: a bounded queue and flat memory then say nothing
    about overload (at --max-rate 50, 0.3 x capacity, they read as met)."""
    overhead_p50 = nominal["latency_ms"]["ros_overhead"]["p50"]
    pending = overload["classifier_max_pending"]
    growth = {n: r["growth_mb"] for n, r in overload["rss"].items()}
    ratio = overload_ratio(overload, capacity_hz)
    not_overloaded = None if ratio > 1.0 else (
        f"not overloaded: the phase ran at {overload['rate_hz_achieved']} Hz, {ratio:.2f} x the "
        f"classifier's measured capacity {capacity_hz:.2f} Hz (raise --max-rate or --overload)")
    pending_met = 0 <= pending <= TARGET_MAX_PENDING
    growth_met = all(g is not None and g <= RSS_FLAT_MB for g in growth.values())
    return {
        "ros_overhead_p50_ms": {"target": TARGET_OVERHEAD_P50_MS, "measured": overhead_p50,
                                "met": overhead_p50 is not None
                                and overhead_p50 <= TARGET_OVERHEAD_P50_MS,
                                # the same hops with no work in them (None: not measured)
                                "transport_floor_p50_ms":
                                floor["latency_ms"]["end_to_end"]["p50"]
                                if floor and "error" not in floor else None},
        "overload_max_pending": {"target": TARGET_MAX_PENDING, "measured": pending,
                                 "met": None if not_overloaded else pending_met,
                                 **({"reason": not_overloaded} if not_overloaded else {})},
        "overload_rss_growth_mb": {"target": f"<= {RSS_FLAT_MB} per process",
                                   "measured": growth,
                                   "met": None if not_overloaded else growth_met,
                                   **({"reason": not_overloaded} if not_overloaded else {})},
    }


def _settings(args: argparse.Namespace, overload_rate: float | None,
              overload: dict[str, Any] | None, capacity_hz: float | None) -> dict[str, Any]:
    """The options that change the figures, and the rate the overload phase was asked for
    (min(--max-rate, --overload x capacity)) and achieved over the capacity."""
    return {"model": args.model or "(bundled demo)", "seconds": args.seconds,
            "rate_hz": args.rate, "hops_seconds": args.hops_seconds,
            "overload": args.overload, "max_rate": args.max_rate,
            "overload_rate_hz": round(overload_rate, 2) if overload_rate else None,
            "overload_ratio_achieved": round(overload_ratio(overload, capacity_hz), 3)
            if overload and capacity_hz else None,
            "size": args.size, "num_threads": args.num_threads, "seed": args.seed,
            "encoding": "rgb8", "namespace": args.namespace,
            "floor_seconds": args.floor_seconds, "adapt_seconds": args.adapt_seconds,
            "adapt_classes": args.adapt_classes, "adapt_lr": args.adapt_lr}


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad options with one line before a node starts (--rate 0 divided by zero after
    the nodes came up, a NaN --adapt-lr silently kept the config's, a bad --num-threads or
    --model left the nodes down and the bench waiting two minutes)."""
    reason = below_minimum(args, {"seconds": 0, "hops_seconds": 0, "floor_seconds": 0,
                                  "adapt_seconds": 0, "size": 1, "adapt_windows": 1},
                           positive=("rate", "overload", "max_rate"))
    if reason:
        raise ValueError(reason)
    if args.size > MAX_SIZE:
        raise ValueError(f"--size must be at most {MAX_SIZE} px, got {args.size}")
    if not math.isfinite(args.adapt_lr) or args.adapt_lr == 0:
        raise ValueError(f"--adapt-lr must be > 0, or negative to keep the config's, got "
                         f"{args.adapt_lr}")
    if args.adapt_classes not in data.SUBSETS:
        raise ValueError(f"--adapt-classes {args.adapt_classes!r} is not one of "
                         f"{sorted(data.SUBSETS)}")
    reason = params.check_params(topics.CLASSIFIER_NODE, {"num_threads": args.num_threads})
    if reason:
        raise ValueError(f"--num-threads: {reason}")
    args.namespace = topics.relative_namespace(args.namespace)
    replay.read_model_card(args.model)  # a missing or corrupt model, named here


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    out = check_writable(args.out)
    log_dir = out / "bench_ros_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, value in topics.localhost_discovery().items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("ROS_LOG_DIR", str(log_dir / "ros"))
    from ttspec_ros.nodes.probe import NodeProcess, process_problems, started

    model = {"model": args.model} if args.model else {}
    procs = {
        topics.CAMERA_NODE: NodeProcess(topics.CAMERA_NODE, model, log_dir, args.namespace),
        topics.CLASSIFIER_NODE: NodeProcess(topics.CLASSIFIER_NODE,
                                            {**model, "num_threads": args.num_threads},
                                            log_dir, args.namespace),
        topics.ADAPTER_NODE: NodeProcess(topics.ADAPTER_NODE, model, log_dir, args.namespace),
    }
    if args.hops_seconds is None:
        args.hops_seconds = min(args.seconds, 10.0)
    images, _ = _images(args.size, 200, args.seed)
    load_before = os.getloadavg()
    with started(procs, args.namespace, "ttspec_bench_probe") as (probe, codes):
        if not probe.wait_until_up(procs, 120.0):
            raise ChildProcessError(f"nodes did not come up: {probe.not_up_reason(procs)}; "
                                    f"logs in {log_dir}")
        # Warm-up (first inferences are slower), not measured.
        _phase(probe, procs, images, args.rate, 3.0)
        nominal = overload = hops = None
        capacity_hz = overload_rate = None
        if args.seconds > 0:
            nominal = _phase(probe, procs, images, args.rate, args.seconds)
        if args.hops_seconds > 0:
            hops = _phase(probe, procs, images, args.rate, args.hops_seconds, watch_frames=True)
        if nominal is not None:  # args.seconds > 0
            capacity_hz = 1000.0 / (nominal["latency_ms"]["model"]["mean"] or 1.0)
            overload_rate = min(args.max_rate, args.overload * capacity_hz)
            overload = _phase(probe, procs, images, overload_rate, args.seconds)
        adaptation = _adaptation(probe, procs, args) if args.adapt_seconds > 0 else None
        alive = {n: p.alive() for n, p in procs.items()}
    floor = None
    if args.floor_seconds > 0:
        try:
            floor = _transport_floor(args, images, log_dir)
        except RuntimeError as e:  # keep the pipeline's figures; say why the floor is missing
            floor = {"error": str(e)}
    # capacity_hz is measured whenever nominal is
    targets = (_targets(nominal, overload, capacity_hz, floor)
               if nominal and overload and capacity_hz is not None else None)
    result = {
        "command": "bench-ros",
        "settings": _settings(args, overload_rate, overload, capacity_hz),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                    "rmw": os.environ.get("RMW_IMPLEMENTATION", "default (rmw_fastrtps_cpp)")},
        "classifier_capacity_hz": round(capacity_hz, 2) if capacity_hz else None,
        "nominal": nominal,
        "nominal_watching_frames": hops,
        "overload": overload,
        "transport_floor": floor,
        "adaptation": adaptation,
        "nodes_alive_at_end": alive,
        "exit_codes": codes,
        "targets": targets,
        "notes": "Times are taken in the bench process: publish -> prediction arrival "
                 "(end_to_end); ros_overhead = end-to-end - model latency reported by the "
                 "classifier for that frame. nominal and overload run as deployed (only the "
                 "classifier subscribes to frames); nominal_watching_frames also subscribes to "
                 "frames for publish -> frames arrival (camera hop: DDS + decode + preprocess "
                 "+ DDS) and frames arrival -> prediction arrival (classifier hop: waiting + "
                 "model + DDS); its extra subscriber makes the camera deliver each frame twice. "
                 "transport_floor: publish -> prediction through relay processes (nodes.relay) "
                 "in place of camera and classifier, with the same topics, message types and "
                 "QoS but no work, after the pipeline stopped: the part of ros_overhead that "
                 "rclpy and DDS cost on this machine. "
                 "All processes share the machine's CPUs with whatever else runs (loadavg "
                 "recorded).",
    }
    path = out / "bench_ros.json"
    write_json(path, result)
    print(f"wrote {path}")
    if nominal and overload and targets is not None:  # targets: computed for these two
        n, o = nominal["latency_ms"], overload["latency_ms"]
        print(f"{args.rate:g} Hz: overhead p50 {n['ros_overhead']['p50']} ms p95 "
              f"{n['ros_overhead']['p95']} ms, model p50 {n['model']['p50']} ms, drops "
              f"{nominal['drop_rate']:.1%}")
        print(f"{overload['rate_hz_requested']} Hz: max pending "
              f"{overload['classifier_max_pending']}, drops {overload['drop_rate']:.1%}, "
              f"RSS growth {targets['overload_rss_growth_mb']['measured']}, e2e p50 "
              f"{o['end_to_end']['p50']} ms")
    if hops:
        h = hops["latency_ms"]
        print(f"{args.rate:g} Hz watching frames: camera hop p50 {h['camera_hop']['p50']} ms, "
              f"classifier hop p50 {h['classifier_hop']['p50']} ms, overhead p50 "
              f"{h['ros_overhead']['p50']} ms")
    if floor and "error" in floor:
        print(f"transport floor not measured: {floor['error']}")
    elif floor:
        f = floor["latency_ms"]["end_to_end"]
        print(f"{args.rate:g} Hz transport floor (relays, no work): publish -> prediction p50 "
              f"{f['p50']} ms p95 {f['p95']} ms ({floor['predictions']} of "
              f"{floor['published']})")
    if adaptation and adaptation["windows"]:
        w = adaptation["windows"]
        print(f"adapting on {args.adapt_classes}: mean exit per window "
              f"{[x['mean_exit'] for x in w]}, model version {w[0]['model_version_min']} -> "
              f"{w[-1]['model_version_max']}")
    problems = process_problems(alive, codes)
    for problem in problems:  # the figures are not the pipeline's: say so, fail
        print(f"ttspec bench-ros: {problem} (logs in {log_dir})", file=sys.stderr)
    return 1 if problems else 0
