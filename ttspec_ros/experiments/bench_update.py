"""One specialization update step (worst case) against one cascade inference of the same model.

Worst case: the last exit answered, so every earlier head takes a step (batch 1, the paper's
setting). Inference: one batch-1 cascade run through every exit (force_exit = last). Both are
timed interleaved on the same threads; medians are reported. Also timed: the step with the
anchor guard (rehearsal every step, check every ``check_every`` steps: see its mean), export
of the payload, and Cascade.apply_update.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ttspec_ros.experiments import below_minimum, seed_option, thread_option
from ttspec_ros.files import check_writable, write_json
from ttspec_ros.guard import AnchorGuard, AnchorSet
from ttspec_ros.specialize import Specializer, early_head_tensors

MODELS = {"demo": "demo", "revcol_tiny_224": "revcol_tiny"}  # output name -> model spec
LR = 1e-4  # the paper's update rule
THRESHOLD = 0.9  # the cascade's and the guard's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for bench_update.json")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--demo-model", default="demo",
                        help="what 'demo' means: 'demo' (bundled) or a checkpoint path")
    parser.add_argument("--threads", type=thread_option, default=1,
                        help="torch CPU threads (1: steadier timing on a shared machine)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--anchors-per-class", type=int, default=50,
                        help="anchor-set size per class for the guarded step (random features)")
    parser.add_argument("--seed", type=seed_option, default=0)


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def bench_model(spec_name: str, args: argparse.Namespace) -> dict:
    from ttspec_ros.cascade import Cascade
    from ttspec_ros.experiments.export_onnx import resolve_model

    model, size, description = resolve_model(spec_name, seed=args.seed)
    num_exits, last = model.num_exits, model.num_exits - 1
    cascade = Cascade(model, [THRESHOLD] * last, num_threads=args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    image = torch.randn(model.config.in_chans, size, size, generator=gen)
    result = cascade.run(image, force_exit=last)
    feats = [f.numpy().copy() for f in result.features[:last]]
    num_classes = model.config.num_classes
    rng = np.random.default_rng(args.seed)
    m = args.anchors_per_class * min(num_classes, 10)
    anchors = AnchorSet([rng.standard_normal((m, feats[0].size)).astype(np.float32)
                         for _ in range(last)], rng.integers(0, num_classes, m))
    plain = Specializer(early_head_tensors(model), num_exits, lr=LR)
    guard = AnchorGuard(anchors, threshold=THRESHOLD, seed=args.seed)
    guarded = Specializer(early_head_tensors(model), num_exits, lr=LR, guard=guard)
    payload = plain.export()

    jobs: dict[str, Callable[[], object]] = {
        "inference": lambda: cascade.run(image, force_exit=last),
        "update_step": lambda: plain.add_sample(last, int(result.class_id), 1.0, feats),
        "update_step_guarded": lambda: guarded.add_sample(last, int(result.class_id), 1.0, feats),
        "export": plain.export,
        "apply_update": lambda: cascade.apply_update(payload.tensors, payload.version),
    }
    for fn in jobs.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    order = list(jobs)
    shuffle = np.random.default_rng(args.seed)
    for _ in range(args.repeats):  # interleaved so load from other processes hits all alike
        for key in shuffle.permutation(order):
            if key == "apply_update":
                payload = plain.export()
            times[key].append(_ms(jobs[key]))
    median = {k: round(statistics.median(v), 4) for k, v in times.items()}
    return {
        "description": description, "image_shape": list(image.shape),
        "num_classes": num_classes, "feature_dim": int(feats[0].size),
        "early_heads": last, "head_parameters": int(sum(
            np.prod(t.shape) for t in early_head_tensors(model).values())),
        # what the guarded step's time depends on (its check runs every check_every steps)
        "guard": {"anchors_per_class": args.anchors_per_class, **guard.settings(),
                  "threshold": THRESHOLD},
        "median_ms": median,
        "mean_ms": {k: round(statistics.fmean(v), 4) for k, v in times.items()},
        "update_over_inference": round(median["update_step"] / median["inference"], 5),
        # the guard's check runs every check_every steps: its mean is the amortized cost
        "guarded_update_mean_over_inference": round(
            statistics.fmean(times["update_step_guarded"]) / median["inference"], 5),
        "target_max_ratio": 0.02,
        "target_met": median["update_step"] / median["inference"] <= 0.02,
    }


def run(args: argparse.Namespace) -> int:
    reason = below_minimum(args, {"repeats": 1, "warmup": 0, "threads": 1,  # --repeats 0:
                                  "anchors_per_class": 1})  # a StatisticsError at the end
    if reason:
        raise ValueError(reason)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if not names:
        raise ValueError(f"--models names no model; choose from {list(MODELS)}")
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if twice := sorted({n for n in names if names.count(n) > 1}):  # ran twice, kept the last
        raise ValueError(f"--models names {twice} more than once")
    out = check_writable(args.out)
    report = {
        "what": "median ms of one worst-case update step (every earlier head, batch 1) vs one "
                "batch-1 cascade inference through every exit",
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
        "anchors_per_class": args.anchors_per_class, "seed": args.seed,
        "demo_model": args.demo_model, "lr": LR, "threshold": THRESHOLD,
        "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "models": {},
    }
    for name in names:
        spec = args.demo_model if name == "demo" else MODELS[name]
        report["models"][name] = bench_model(spec, args)
    write_json(out / "bench_update.json", report, indent=1)
    print(json.dumps({k: {"median_ms": v["median_ms"], "ratio": v["update_over_inference"]}
                      for k, v in report["models"].items()}, indent=1))
    return 0
