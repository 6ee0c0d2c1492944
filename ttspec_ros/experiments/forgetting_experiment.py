"""Forgetting: a long one-subset stream then all classes, with and without the anchor guard.

Stream: ``--subset-frames`` deployment-pool frames of one subset (drawn with replacement, the
pool holds 600 per class), then ``--mixed-frames`` pool frames of all classes. Every
``--eval-every`` frames the test split's other classes (and the subset) are evaluated at
``--threshold``: accuracy and mean cost. The backbone's features of the pool and the test
split are computed once; each frame then goes through the cascade's decision rule with the
current heads and into the Specializer, as camera -> classifier -> adapter would. Anchors for
the guard come from pool images that are never streamed, labelled by the last exit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ttspec_ros import data
from ttspec_ros.experiments import below_minimum, seed_option, thread_option
from ttspec_ros.experiments.exit_curves import (
    ExitFeatures,
    curve,
    empty_groups,
    group_description,
    simulate_stream,
)
from ttspec_ros.experiments.specialize_experiment import PRESETS, pool_images, split_seed
from ttspec_ros.files import check_writable, save_figure, write_json
from ttspec_ros.guard import AnchorGuard, AnchorSet, check_guard_settings
from ttspec_ros.specialize import (
    Specializer,
    StackedHeads,
    check_specializer_settings,
    early_head_tensors,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for forgetting.json/.png")
    parser.add_argument("--model", default=None, help="checkpoint stem (default: demo model)")
    parser.add_argument("--subset", default="bags", choices=sorted(data.SUBSETS),
                        help="the long one-subset phase (bags: one class, the harshest case)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--subset-frames", type=int, default=5000)
    parser.add_argument("--mixed-frames", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    tuned = PRESETS["tuned"]
    parser.add_argument("--lr", type=float, default=tuned["lr"])
    parser.add_argument("--momentum", type=float, default=tuned["momentum"])
    parser.add_argument("--batch-size", type=int, default=tuned["batch_size"])
    parser.add_argument("--min-confidence", type=float, default=tuned["min_confidence"])
    parser.add_argument("--anchors-per-class", type=int, default=50)
    parser.add_argument("--guard-rehearsal", type=int, default=tuned["guard_rehearsal"],
                        help="anchors rehearsed per update step in the guarded run")
    parser.add_argument("--guard-tolerance", type=float, default=tuned["guard_tolerance"])
    parser.add_argument("--guard-class-tolerance", type=float,
                        default=tuned["guard_class_tolerance"])
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--threads", type=thread_option, default=1)
    parser.add_argument("--batch", type=int, default=250, help="feature-extraction batch size")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="use only the first N test images (quick checks only)")


def anchors_from(pool_data: ExitFeatures, candidates: np.ndarray, per_class: int, seed: int
                 ) -> tuple[AnchorSet, np.ndarray]:
    """At most ``per_class`` anchors per last-exit class from ``candidates`` (pool positions)."""
    rng = np.random.default_rng(seed)
    labels = pool_data.last_pred.numpy()
    picked = np.sort(np.concatenate([
        rng.permutation(candidates[labels[candidates] == c])[:per_class]
        for c in np.unique(labels[candidates])
    ]))
    h = len(pool_data.features) - 1
    return AnchorSet([pool_data.features[i][picked].numpy() for i in range(h)],
                     labels[picked]), picked


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad options with one line before any work (--eval-every 0 used to stop with a
    ZeroDivisionError, a --threshold outside [0, 1] only after the whole unguarded run)."""
    if not 0.0 <= args.threshold <= 1.0:  # NaN fails too
        raise ValueError(f"--threshold must be in [0, 1], got "
                         f"{args.threshold}")
    reason = below_minimum(args, {"eval_every": 1, "anchors_per_class": 1, "threads": 1,
                                  "batch": 1, "subset_frames": 0, "mixed_frames": 0,
                                  "test_limit": 0})
    if reason:
        raise ValueError(f"{reason}")
    if args.subset_frames + args.mixed_frames < 1:
        raise ValueError("the stream needs at least one frame")
    check_specializer_settings(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size,
                               min_confidence=args.min_confidence)
    check_guard_settings(rehearsal=args.guard_rehearsal, tolerance=args.guard_tolerance,
                         class_tolerance=args.guard_class_tolerance)


def run(args: argparse.Namespace) -> int:
    from ttspec_ros.models.checkpoint import load_model
    from ttspec_ros.preprocess import preprocess_batch

    _check_args(args)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = check_writable(args.out)
    classes = list(data.SUBSETS[args.subset])
    model, card = load_model(args.model)
    model.eval()
    h = model.num_exits - 1

    test_images, test_labels = data.load_fashion_mnist("test")
    if args.test_limit:
        test_images, test_labels = test_images[: args.test_limit], test_labels[: args.test_limit]
    in_subset = np.isin(test_labels, classes)
    groups = {"others": ~in_subset, "subset": in_subset}
    if empty := empty_groups(groups):  # its accuracy and cost would be means of nothing: NaN
        raise ValueError(f"--test-limit {args.test_limit} keeps {test_labels.size} test "
                         f"image(s): none of {group_description(empty[0], args.subset)}; "
                         "raise --test-limit")
    test_data = ExitFeatures.compute(
        model, torch.from_numpy(preprocess_batch(np.ascontiguousarray(test_images), card.input)),
        args.batch)

    rng = np.random.default_rng(args.seed)
    pool, pool_imgs, pool_labels = pool_images(card)
    pool_data = ExitFeatures.compute(
        model, torch.from_numpy(preprocess_batch(np.ascontiguousarray(pool_imgs), card.input)),
        args.batch)
    # Anchors first (from a reserved part of the pool), the stream from the rest.
    reserve = rng.permutation(len(pool))[: 2 * args.anchors_per_class * data.NUM_CLASSES]
    anchors, _ = anchors_from(pool_data, reserve, args.anchors_per_class, args.seed)
    rest = np.setdiff1d(np.arange(len(pool)), reserve)
    subset_pos = rest[np.isin(pool_labels[rest], classes)]
    if (subset_pos.size == 0 and args.subset_frames) or (rest.size == 0 and args.mixed_frames):
        raise ValueError(f"--anchors-per-class "
                         f"{args.anchors_per_class} reserves the whole deployment pool for "
                         "anchors; nothing is left to stream")
    order = np.concatenate([
        rng.choice(subset_pos, args.subset_frames, replace=True),
        rng.choice(rest, args.mixed_frames, replace=args.mixed_frames > rest.size),
    ])
    initial = early_head_tensors(model)

    def evaluate(heads: StackedHeads) -> dict:
        c = curve(heads, test_data, test_labels, groups, card.exit_cost, None,
                  thresholds=[args.threshold])
        return {g: {"accuracy": rows[0]["accuracy"], "mean_cost": rows[0]["mean_cost"]}
                for g, rows in c.items()}

    before = evaluate(StackedHeads.from_tensors(initial, h))
    runs: dict[str, dict[str, object]] = {}  # the JSON's runs: traces, stats, settings
    traces: dict[str, dict[str, list[float]]] = {}  # per run: frames and each group's values
    for name, use_guard in (("no_guard", False), ("guard", True)):
        guard = AnchorGuard(anchors, threshold=args.threshold, rehearsal=args.guard_rehearsal,
                            tolerance=args.guard_tolerance,
                            class_tolerance=args.guard_class_tolerance,
                            exit_cost=card.exit_cost, seed=args.seed) if use_guard else None
        spec = Specializer(initial, model.num_exits, model_id=card.model_id, lr=args.lr,
                           momentum=args.momentum, batch_size=args.batch_size,
                           min_confidence=args.min_confidence, guard=guard, seed=args.seed)
        trace: dict[str, list[float]] = {
            "frames": [0], **{f"{g}_{k}": [before[g][k]] for g in groups
                              for k in ("accuracy", "mean_cost")}}

        def on_frame(n: int, spec: Specializer = spec,
                     trace: dict[str, list[float]] = trace) -> None:
            if n % args.eval_every == 0 or n == len(order):
                ev = evaluate(spec.heads())
                trace["frames"].append(n)
                for g in groups:
                    for k in ("accuracy", "mean_cost"):
                        trace[f"{g}_{k}"].append(ev[g][k])

        t0 = time.perf_counter()
        # flushes before the last on_frame: the trace's last point (always at the stream's
        # end) and ``final`` include the last partial batch, as specialize-experiment's do
        simulate_stream(spec, pool_data, order.tolist(), args.threshold, on_frame)
        traces[name] = trace
        runs[name] = {**trace, "stats": spec.stats(),
                      "runtime_s": round(time.perf_counter() - t0, 1)}
        if guard is not None:
            runs[name]["guard_settings"] = {"anchors_per_class": args.anchors_per_class,
                                            **guard.settings()}

    final = {name: {
        "others_accuracy_delta": round(r["others_accuracy"][-1] - before["others"]["accuracy"], 6),
        "others_cost_ratio": round(r["others_mean_cost"][-1] / before["others"]["mean_cost"], 6),
        "others_accuracy_min_delta": round(min(r["others_accuracy"])
                                           - before["others"]["accuracy"], 6),
        "subset_accuracy_delta": round(r["subset_accuracy"][-1] - before["subset"]["accuracy"], 6),
        "subset_cost_ratio": round(r["subset_mean_cost"][-1] / before["subset"]["mean_cost"], 6),
    } for name, r in traces.items()}
    result = {
        "subset": args.subset, "classes": classes, "seed": args.seed,
        "settings": {
            "model_id": card.model_id, "threshold": args.threshold, "lr": args.lr,
            "momentum": args.momentum, "batch_size": args.batch_size,
            "min_confidence": args.min_confidence, "subset_frames": args.subset_frames,
            "mixed_frames": args.mixed_frames, "eval_every": args.eval_every,
            "stream_source": f"deployment pool (data.splits seed {split_seed(card)}), subset "
                             "frames with replacement",
            "stream_pool_indices_sha256": data.index_hash(pool[order]),
            "inference": "pooled features precomputed once; the cascade's decision rule with "
                         "the current heads per frame",
            "exit_cost": list(card.exit_cost), "test_images": int(test_labels.size),
            "threads": args.threads, "runtime_s": round(time.perf_counter() - t_start, 1),
        },
        "before": before, "runs": runs, "final": final,
        "target": {"others_accuracy_within": 0.01,
                   "met_with_guard": abs(final["guard"]["others_accuracy_delta"]) <= 0.01},
    }
    write_json(out / "forgetting.json", result, indent=1)
    plot(result, out / "forgetting.png")
    print(json.dumps({"out": str(out / "forgetting.json"), "before": before, "final": final},
                     indent=1))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    boundary = result["settings"]["subset_frames"]
    for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"),
                           (axes[1], "mean_cost", "mean cost (share of full forward)")):
        scale = 100 if key == "accuracy" else 1
        for name, color in (("no_guard", "tab:red"), ("guard", "tab:blue")):
            r = result["runs"][name]
            ax.plot(r["frames"], [scale * v for v in r[f"others_{key}"]], "-", color=color,
                    label=f"others, {name.replace('_', ' ')}")
            ax.plot(r["frames"], [scale * v for v in r[f"subset_{key}"]], ":", color=color,
                    label=f"subset, {name.replace('_', ' ')}")
        ax.axvline(boundary, color="gray", lw=0.8)
        ax.set_xlabel("stream frames (subset only, then all classes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"Forgetting: {result['subset']} stream, threshold {s['threshold']}, lr {s['lr']}"
                 f", batch {s['batch_size']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
