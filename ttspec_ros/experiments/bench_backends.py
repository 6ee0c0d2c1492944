"""Batch-1 latency per backend and forced exit, and the cost of stage boundaries.

Timing scheme (why): each backend is timed in blocks of consecutive runs, the way a robot runs
it frame after frame, with the backends' blocks interleaved (order rotated every round) so
that load from other processes hits every backend alike. Round-robin across backends on
every run measured each one right after another had run: torch's OpenMP workers keep
spinning ~10 ms after a forward, on the cores the next backend needs, and pools that had
gone to sleep had to wake up each time. Each block starts with one untimed run for that. Within
a block the backend's jobs run in a shuffled order; staged and unsplit run back to back in
every repeat, so the stage-boundary overhead is also given as the median of paired ratios,
which cancels slow load changes. Means (the issue's fields) come with medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ttspec_ros.backends import BACKENDS
from ttspec_ros.cascade import StagedBackbone
from ttspec_ros.experiments import below_minimum, seed_option, thread_option
from ttspec_ros.files import check_writable, write_json

MODELS = {"demo": "demo", "revcol_tiny_224": "revcol_tiny"}  # output name -> --model spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for backends.json")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--backends", default="torch,onnxruntime,tensorrt",
                        help="comma-separated; tensorrt is skipped (with the reason recorded) "
                             "when it cannot run here")
    parser.add_argument("--threads", type=thread_option, default=2,
                        help="CPU threads (torch and ORT)")
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per measurement")
    parser.add_argument("--block", type=int, default=5,
                        help="consecutive repeats of one backend before switching to the next")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per measurement")
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--demo-model", default="demo",
                        help="what 'demo' means: 'demo' (bundled) or a checkpoint path")
    parser.add_argument("--onnxruntime-spinning", action="store_true",
                        help="let ONNX Runtime's intra-op threads spin without bound during a "
                             "run (by default they spin at most onnxruntime_backend.SPIN_US "
                             "between ops, as in the classifier node)")
    parser.add_argument("--tensorrt-precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--cache-dir", default=None,
                        help="TensorRT engine cache (default: <out>/cache)")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _forced_exit(backbone, model, image: torch.Tensor, exit_index: int) -> Callable[[], object]:
    """The cascade's work when forced to ``exit_index``: stages 0..exit_index, then its head."""

    def run() -> torch.Tensor:
        carry = image
        for i in range(exit_index + 1):
            carry, pooled = backbone.run_stage(i, carry)
        return model.head(exit_index, pooled).softmax(-1)

    return run


def _all_stages(backbone, image: torch.Tensor) -> Callable[[], object]:
    def run() -> torch.Tensor:
        carry = image
        for i in range(backbone.num_exits):
            carry, pooled = backbone.run_stage(i, carry)
        return pooled

    return run


def _build_backbones(names, model, graph_dir: Path, args, skipped: list
                     ) -> dict[str, StagedBackbone]:
    from ttspec_ros.backends import BackendUnavailable
    from ttspec_ros.backends.onnxruntime_backend import OnnxRuntimeBackbone
    from ttspec_ros.cascade import TorchBackbone

    backbones: dict[str, StagedBackbone] = {}
    for name in names:
        if name == "torch":
            backbones[name] = TorchBackbone(model)
        elif name == "onnxruntime":
            backbones[name] = OnnxRuntimeBackbone(
                graph_dir, num_threads=args.threads, allow_spinning=args.onnxruntime_spinning
            )
        elif name == "tensorrt":
            try:
                from ttspec_ros.backends.tensorrt_backend import TensorRTBackbone

                cache = Path(args.cache_dir) if args.cache_dir else Path(args.out) / "cache"
                backbones[name] = TensorRTBackbone(
                    graph_dir, cache_dir=cache, precision=args.tensorrt_precision, device="cuda"
                )
            except BackendUnavailable as e:
                skipped.append({"backend": name, "reason": str(e)})
        else:
            raise ValueError(f"unknown backend {name!r}")
    return backbones


def _unsplit_runner(name: str, backbone, model, image: torch.Tensor):
    if name == "torch":
        from ttspec_ros.backends.onnx_export import UnsplitForward

        unsplit = UnsplitForward(model)
        return lambda: unsplit(image)
    if name == "onnxruntime":
        return lambda: backbone.run_unsplit(image)
    return None  # no unsplit TensorRT engine is built


def _plain_onnx_runner(model, image: torch.Tensor, path: Path, threads: int):
    """The issue's reference point, "a plain one-graph export": ``UnsplitForward`` of the model
    as it is (not ``export_form``), traced to one graph and run in an ONNX Runtime session with
    default options but the thread count. Against torch's unsplit forward it shows what this
    machine gives a naive export, beside what the backend's staged graphs give. Its workers
    spin during a run as by default, but stop when the run returns: left spinning, they took
    the cores of the runs timed after it (the backend's stage overhead read 2.1-2.3 % instead
    of 0.4 %)."""
    import onnxruntime as ort

    from ttspec_ros.backends.onnx_export import UnsplitForward, export_graph

    export_graph(UnsplitForward(model).eval(), (image,), path, ["image"], ["pooled"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": image.numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def _accuracy(backbones: dict, model, image: torch.Tensor) -> dict:
    """Max relative difference (max|a-b| / max|b|) of pooled features and logits vs torch."""
    from ttspec_ros.backends.onnx_export import relative_difference

    reference = [p for _, p in _stage_outputs(backbones["torch"], image)]
    report = {}
    for name, backbone in backbones.items():
        if name == "torch":
            continue
        pooled = [p for _, p in _stage_outputs(backbone, image)]
        report[name] = {
            "pooled_max_rel_diff": max(
                relative_difference(a, b) for a, b in zip(pooled, reference, strict=True)
            ),
            "logits_max_rel_diff": max(
                relative_difference(model.head(i, a), model.head(i, b))
                for i, (a, b) in enumerate(zip(pooled, reference, strict=True))
            ),
        }
    return report


def _stage_outputs(backbone, image):
    carry, out = image, []
    for i in range(backbone.num_exits):
        carry, pooled = backbone.run_stage(i, carry)
        out.append((carry, pooled.detach().cpu().clone()))
    return out


def _jobs(name: str, backbone, model, image: torch.Tensor) -> dict[tuple, Callable[[], object]]:
    """(kind, backend, exit) -> callable: every forced exit, plus staged and unsplit backbone
    forwards where an unsplit reference exists."""
    jobs: dict[tuple, Callable[[], object]] = {
        ("exit", name, e): _forced_exit(backbone, model, image, e)
        for e in range(backbone.num_exits)
    }
    unsplit = _unsplit_runner(name, backbone, model, image)
    if unsplit is not None:
        jobs[("staged", name, None)] = _all_stages(backbone, image)
        jobs[("unsplit", name, None)] = unsplit
    return jobs


def _time_in_blocks(jobs: dict[str, dict], repeats: int, block: int, rng: random.Random):
    """Times every job ``repeats`` times, backend by backend in blocks of ``block`` repeats
    (see the module docstring). Returns (job -> times in ms, backend -> staged/unsplit ratio
    of each repeat)."""
    times: dict[tuple, list[float]] = {k: [] for by_job in jobs.values() for k in by_job}
    pairs: dict[str, list[float]] = {}
    backends = list(jobs)
    done, round_index = 0, 0
    while done < repeats:
        n = min(block, repeats - done)
        shift = round_index % len(backends)
        for name in backends[shift:] + backends[:shift]:
            backend_jobs = jobs[name]
            # Untimed: the previous backend's threads stop spinning, this one's pool wakes up.
            backend_jobs[("exit", name, 0)]()
            staged, unsplit = ("staged", name, None), ("unsplit", name, None)
            # staged + unsplit form one unit so they always run back to back.
            units: list[tuple] = [k for k in backend_jobs if k not in (staged, unsplit)]
            if staged in backend_jobs:
                units.append(("pair",))
            for _ in range(n):
                rng.shuffle(units)
                for unit in units:
                    if unit != ("pair",):
                        times[unit].append(_timed(backend_jobs[unit]))
                        continue
                    first, second = (staged, unsplit) if rng.random() < 0.5 else (unsplit, staged)
                    t = {first: _timed(backend_jobs[first]), second: _timed(backend_jobs[second])}
                    times[staged].append(t[staged])
                    times[unsplit].append(t[unsplit])
                    pairs.setdefault(name, []).append(t[staged] / t[unsplit])
        done += n
        round_index += 1
    return times, pairs


def bench_model(label: str, spec: str, args, backend_names, work: Path, meta: dict):
    from ttspec_ros.backends.onnx_export import (
        UnsplitForward,
        export_stages,
        relative_difference,
    )
    from ttspec_ros.backends.onnxruntime_backend import OnnxRuntimeBackbone
    from ttspec_ros.experiments.export_onnx import resolve_model

    model, size, description = resolve_model(spec, seed=args.seed)
    graph_dir = work / label
    t0 = time.perf_counter()
    manifest = export_stages(model, size, graph_dir)
    export_s = round(time.perf_counter() - t0, 2)  # the export alone, not session/engine builds
    skipped: list = []
    backbones = _build_backbones(backend_names, model, graph_dir, args, skipped)
    gen = torch.Generator().manual_seed(args.seed)
    image = torch.randn(manifest["image_shape"], generator=gen)
    info = {
        "description": description, "image_shape": manifest["image_shape"],
        "model_hash": manifest["model_hash"], "export_s": export_s,
        "skipped": skipped,
    }
    onnxruntime = backbones.get("onnxruntime")
    if isinstance(onnxruntime, OnnxRuntimeBackbone):
        # the carries that crossed boundaries without reorders
        info["onnxruntime_blocked_carries"] = onnxruntime.blocked_carries
    with torch.inference_mode():
        if "torch" in backbones:
            info["accuracy_vs_torch"] = _accuracy(backbones, model, image)
        jobs = {name: _jobs(name, backbone, model, image) for name, backbone in backbones.items()}
        if "onnxruntime" in jobs:
            plain = _plain_onnx_runner(model, image, work / f"{label}_plain.onnx", args.threads)
            jobs["onnxruntime"][("plain", "onnxruntime", None)] = plain
            info["onnxruntime_plain_export_pooled_max_rel_diff"] = relative_difference(
                plain(), UnsplitForward(model)(image))
        for backend_jobs in jobs.values():
            for fn in backend_jobs.values():
                for _ in range(args.warmup):
                    fn()
        times, pairs = _time_in_blocks(jobs, args.repeats, args.block, random.Random(args.seed))

    results = [
        {
            "model": label, "backend": name, "exit": e,
            "latency_ms": round(statistics.fmean(t), 3),
            "latency_std_ms": round(statistics.stdev(t) if len(t) > 1 else 0.0, 3),
            "latency_median_ms": round(statistics.median(t), 3),
        }
        for (kind, name, e), t in times.items()
        if kind == "exit"
    ]
    overhead = []
    for name, ratios in pairs.items():
        staged, unsplit = times[("staged", name, None)], times[("unsplit", name, None)]
        overhead.append({
            "model": label, "backend": name,
            "staged_ms": round(statistics.fmean(staged), 3),
            "unsplit_ms": round(statistics.fmean(unsplit), 3),
            "staged_median_ms": round(statistics.median(staged), 3),
            "unsplit_median_ms": round(statistics.median(unsplit), 3),
            "overhead_pct_paired_median": round(100.0 * (statistics.median(ratios) - 1.0), 2),
        })
    plain = times.get(("plain", "onnxruntime", None))
    if plain:
        info["onnxruntime_plain_export"] = {
            "latency_ms": round(statistics.fmean(plain), 3),
            "latency_median_ms": round(statistics.median(plain), 3),
            "note": "unsplit backbone (image -> last pooled) traced from the model as it is, "
                    "default session options but the thread count; compare with the "
                    "unsplit_ms of stage_overhead",
        }
    meta["models"][label] = info
    return results, overhead


def _summary(results: list[dict], overhead: list[dict], models: dict) -> dict:
    """The issue's targets, computed from the written figures, and the plain export's speed-up
    (the issue's reference measurement, repeated on this machine)."""
    out = {}
    last_exit = max((r["exit"] for r in results), default=None)
    for model in sorted({r["model"] for r in results}):  # key order not by PYTHONHASHSEED
        rows = [r for r in results if r["model"] == model and r["exit"] == last_exit]
        for field, suffix in (("latency_ms", ""), ("latency_median_ms", "_median")):
            last = {r["backend"]: r[field] for r in rows}
            if "torch" in last and "onnxruntime" in last:
                out[f"{model}/onnxruntime_speedup_vs_torch_last_exit{suffix}"] = round(
                    last["torch"] / last["onnxruntime"], 3
                )
    for o in overhead:
        out[f"{o['model']}/{o['backend']}/stage_overhead_pct"] = round(
            100.0 * (o["staged_ms"] / o["unsplit_ms"] - 1.0), 2
        )
        out[f"{o['model']}/{o['backend']}/stage_overhead_pct_paired_median"] = o[
            "overhead_pct_paired_median"
        ]
        plain = models.get(o["model"], {}).get("onnxruntime_plain_export")
        if o["backend"] == "torch" and plain:
            out[f"{o['model']}/onnxruntime_plain_export_speedup_vs_torch_unsplit"] = round(
                o["unsplit_ms"] / plain["latency_ms"], 3)
    return out


def run(args: argparse.Namespace) -> int:
    import onnx

    from ttspec_ros.backends.onnxruntime_backend import bounded_spin_us

    labels = [m for m in args.models.split(",") if m]
    unknown = set(labels) - set(MODELS)
    if not labels:
        raise ValueError(f"--models names no model; known: {', '.join(MODELS)}")
    if unknown:
        raise ValueError(f"unknown --models {sorted(unknown)}; known: {', '.join(MODELS)}")
    backend_names = [b for b in args.backends.split(",") if b]
    unknown = set(backend_names) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown --backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    for option, names in (("--models", labels), ("--backends", backend_names)):
        # a model twice wrote its rows twice and _summary kept the last run's
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"{option} names {twice} more than once")
    if "torch" not in backend_names:
        raise ValueError("--backends must include torch (the reference for accuracy)")
    if args.repeats < 2:
        raise ValueError("--repeats must be >= 2 (a standard deviation needs two runs)")
    if args.block < 1:
        raise ValueError("--block must be >= 1")
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if reason := below_minimum(args, {"warmup": 0}):  # -1 silently meant no warm-up
        raise ValueError(reason)
    try:  # a TensorRT machine (Jetson) may have no onnxruntime: only its backend needs it
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError as e:
        if "onnxruntime" in backend_names:
            raise ValueError(f"--backends onnxruntime needs the `onnxruntime` package: {e}"
                             ) from None
        ort_version = None
    out = check_writable(args.out)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    meta = {
        "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
        "block": args.block, "warmup": args.warmup,
        "onnxruntime_spinning": args.onnxruntime_spinning,
        "onnxruntime_spin_us": (None if ort_version is None or args.onnxruntime_spinning
                                else bounded_spin_us(ort_version)),
        "tensorrt_precision": args.tensorrt_precision,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort_version, "python": platform.python_version()},
        "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
        "models": {}, "skipped_models": [],
        "note": "latency = stages 0..exit + that exit's torch head; staged/unsplit = backbone "
                "only (image -> last pooled); latency_ms/staged_ms/unsplit_ms are means, "
                "*_median_ms medians; overhead_pct_paired_median = median over repeats of "
                "staged/unsplit run back to back; backends timed in interleaved blocks of "
                "--block repeats; RevCol-T layer-scale gammas set to 1 (see resolve_model)",
    }
    results, overhead = [], []
    with tempfile.TemporaryDirectory(prefix="ttspec-bench-") as tmp:
        for label in labels:
            spec = args.demo_model if label == "demo" else MODELS[label]
            try:
                r, o = bench_model(label, spec, args, backend_names, Path(tmp), meta)
            except (FileNotFoundError, ImportError) as e:
                if spec != "demo":  # a model asked for by path or preset must run
                    raise
                reason = f"{type(e).__name__}: {e}"
                meta["skipped_models"].append({"model": label, "reason": reason})
                continue
            results += r
            overhead += o
    if not results:
        raise FileNotFoundError(f"no model was benchmarked: {meta['skipped_models']}")
    meta["load_average_end"] = list(os.getloadavg())
    meta["summary"] = _summary(results, overhead, meta["models"])
    write_json(out / "backends.json", {"results": results, "stage_overhead": overhead})
    write_json(out / "backends_meta.json", meta)
    print(json.dumps(meta["summary"], indent=2))
    return 0

