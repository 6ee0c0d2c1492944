"""Batch-1 CPU latency of a RevCol preset per forced cascade exit vs the plain forward."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ttspec_ros.cascade import Cascade, exit_costs
from ttspec_ros.experiments import seed_option, thread_option
from ttspec_ros.files import check_writable, write_json
from ttspec_ros.models.revcol import INPUT_MULTIPLE, PRESETS, build_preset

TARGET_OVERHEAD_RATIO = 1.02  # issue 3: forced last exit through the cascade / plain forward


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="revcol_tiny", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--out", required=True, help="directory for bench_exits.json")
    parser.add_argument("--repeats", type=int, default=40,
                        help="timed rounds; each round runs every configuration once")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per configuration")
    parser.add_argument("--threads", type=thread_option, default=2, help="torch CPU threads")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--seed", type=seed_option, default=0, help="weights and input")


def _stats(samples: list[tuple[float, float]]) -> dict:
    wall = [w for w, _ in samples]
    return {
        "latency_ms": statistics.fmean(wall),
        "latency_std_ms": statistics.stdev(wall) if len(wall) > 1 else 0.0,
        "median_ms": statistics.median(wall),
        "min_ms": min(wall),
        # Process CPU time per call: with --threads 1 it resists other load on the machine.
        "cpu_ms": statistics.fmean(c for _, c in samples),
    }


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def measure(arch: str, size: int, repeats: int, warmup: int, threads: int, num_classes: int,
            seed: int) -> dict:
    if repeats < 2 or warmup < 0 or threads < 1 or size < INPUT_MULTIPLE or size % INPUT_MULTIPLE:
        raise ValueError("need repeats >= 2, warmup >= 0, threads >= 1 and a size that is a "
                         f"positive multiple of {INPUT_MULTIPLE} (three stride-2 levels after "
                         "a stride-4 stem)")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    # Decoders built only to time the official forward; the cascade never runs them.
    model = build_preset(arch, num_classes=num_classes).eval()
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    cascade = Cascade(model, 1.0)

    def plain() -> None:
        with torch.inference_mode():
            model.forward_last(image)

    def official() -> None:  # what the official eval forward computes: 4 heads + 3 decoders
        with torch.inference_mode():
            model.forward_with_reconstruction(image)

    configs: list[tuple[str, Callable[[], object]]] = [
        (f"exit{i}", lambda i=i: cascade.run(image, force_exit=i))
        for i in range(model.num_exits)
    ] + [("plain", plain), ("official", official)]
    for _, fn in configs:
        for _ in range(warmup):
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in configs}
    load_before = os.getloadavg()
    started = time.perf_counter()
    for r in range(repeats):
        # Rotate the order every round so slow drifts of a shared machine hit all alike.
        for name, fn in configs[r % len(configs):] + configs[:r % len(configs)]:
            samples[name].append(_timed(fn))
    elapsed_s = time.perf_counter() - started
    last = f"exit{model.num_exits - 1}"
    paired = [a[0] / b[0] for a, b in zip(samples[last], samples["plain"], strict=True)]
    plain_stats, last_stats = _stats(samples["plain"]), _stats(samples[last])
    overhead = last_stats["latency_ms"] / plain_stats["latency_ms"]
    return {
        "settings": {
            "arch": arch, "size": size, "batch": 1, "device": "cpu", "threads": threads,
            "repeats": repeats, "warmup": warmup, "seed": seed, "num_classes": num_classes,
            "weights": "random (seeded)", "torch": torch.__version__,
            "python": sys.version.split()[0], "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "timed_seconds": elapsed_s,
        },
        "exit_cost": exit_costs(model, size),
        "forced_exits": [
            {"exit": i, **_stats(samples[f"exit{i}"])} for i in range(model.num_exits)
        ],
        "plain_forward": plain_stats,
        "official_forward": {
            "what": "forward_with_reconstruction (all heads and decoders), as the official "
                    "RevCol forward with intermediate supervision",
            **_stats(samples["official"]),
        },
        "overhead_ratio": overhead,
        "overhead_ratio_median_paired": statistics.median(paired),
        "overhead_ratio_cpu": last_stats["cpu_ms"] / plain_stats["cpu_ms"],
        "target_overhead_ratio": TARGET_OVERHEAD_RATIO,
        "meets_target": overhead <= TARGET_OVERHEAD_RATIO,
    }


def run(args: argparse.Namespace) -> int:
    out = check_writable(args.out)
    result = measure(args.arch, args.size, args.repeats, args.warmup, args.threads,
                     args.num_classes, args.seed)
    path = write_json(out / "bench_exits.json", result)
    for e in result["forced_exits"]:
        print(f"exit {e['exit']}: {e['latency_ms']:.1f} ± {e['latency_std_ms']:.1f} ms "
              f"(median {e['median_ms']:.1f})")
    p = result["plain_forward"]
    print(f"plain forward: {p['latency_ms']:.1f} ± {p['latency_std_ms']:.1f} ms "
          f"(median {p['median_ms']:.1f})")
    o = result["official_forward"]
    print(f"official-style forward (heads + decoders): {o['latency_ms']:.1f} ± "
          f"{o['latency_std_ms']:.1f} ms (median {o['median_ms']:.1f})")
    print(f"overhead ratio {result['overhead_ratio']:.3f} (median of paired "
          f"{result['overhead_ratio_median_paired']:.3f}, CPU time "
          f"{result['overhead_ratio_cpu']:.3f}; target <= {TARGET_OVERHEAD_RATIO})")
    print(f"wrote {path}")
    return 0
