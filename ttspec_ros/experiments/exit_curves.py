"""Shared by the specialization experiments: precomputed exit features and threshold curves.

Specialization changes only the early heads, so the backbone's pooled features of every exit
are computed once per image set; every threshold, before/after state and control is then a
cheap pass of the heads over those features, using the cascade's own decision rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ttspec_ros.cascade import reaches_threshold
from ttspec_ros.guard import cascade_answers
from ttspec_ros.specialize import Specializer, StackedHeads, pooled_features

THRESHOLDS = tuple(round(0.50 + 0.01 * i, 2) for i in range(50))  # 0.50 .. 0.99


@dataclass
class ExitFeatures:
    """Pooled head inputs of every exit for N images, and the (fixed) last exit's answer."""

    features: list[Tensor]  # num_exits tensors (N, C)
    last_pred: Tensor  # (N,)
    last_conf: Tensor  # (N,)

    @classmethod
    def compute(cls, model, images: np.ndarray | Tensor, batch_size: int = 256) -> ExitFeatures:
        feats = pooled_features(model, images, batch_size)
        with torch.inference_mode():
            conf, pred = model.head(model.num_exits - 1, feats[-1]).softmax(1).max(1)
        return cls(feats, pred, conf)

    def subset(self, index: np.ndarray | Tensor) -> ExitFeatures:
        index = torch.as_tensor(index)
        return ExitFeatures([f[index] for f in self.features], self.last_pred[index],
                            self.last_conf[index])


def measure_exit_latency(cascade, images: Sequence[Tensor], frames: int, num_exits: int,
                         seed: int = 0) -> list[float]:
    """Median batch-1 latency (ms, from CascadeResult) of the cascade forced to each exit.

    Exits are interleaved frame by frame in a shuffled order, so a burst of load from other
    processes hits every exit alike instead of inflating one of them."""
    times: list[list[float]] = [[] for _ in range(num_exits)]
    rng = np.random.default_rng(seed)
    for i in range(frames):
        for e in rng.permutation(num_exits):
            times[int(e)].append(
                cascade.run(images[i % len(images)], force_exit=int(e)).latency_ms)
    return [float(np.median(t)) for t in times]


def answers(heads: StackedHeads, data: ExitFeatures, threshold: float) -> tuple[Tensor, Tensor]:
    """(exit index, class) of every image under one threshold for all early exits."""
    with torch.inference_mode():
        probs = [heads.logits_of(i, data.features[i]).softmax(1) for i in range(heads.num_heads)]
    return cascade_answers(probs, data.last_pred, [threshold] * heads.num_heads)


def empty_groups(groups: dict[str, np.ndarray]) -> list[str]:
    """The class groups (boolean masks over the images) that hold no image: their curves would
    be means of nothing, NaN in the JSON."""
    return [g for g, mask in groups.items() if not np.any(mask)]


def group_description(group: str, subset: str) -> str:
    """"the tops classes" / "the classes outside tops", for messages naming a group."""
    return f"the {subset} classes" if group == "subset" else f"the classes outside {subset}"


def curve(heads: StackedHeads, data: ExitFeatures, labels: np.ndarray,
          groups: dict[str, np.ndarray], exit_cost: Sequence[float],
          exit_latency_ms: Sequence[float] | None, thresholds: Sequence[float] = THRESHOLDS
          ) -> dict[str, list[dict]]:
    """Per group (boolean mask over images), one row per threshold: threshold, latency_ms
    (per-exit measured latency of the exits taken), accuracy, mean_exit, mean_cost. A group
    with no image is refused (ValueError): its rows would be NaN; commands check
    ``empty_groups`` first, naming the option that emptied it."""
    if empty := empty_groups(groups):
        raise ValueError(f"class group(s) {empty} hold no image: no curve to compute")
    with torch.inference_mode():
        probs = [heads.logits_of(i, data.features[i]).softmax(1) for i in range(heads.num_heads)]
    cost = np.asarray(exit_cost, dtype=np.float64)
    latency = None if exit_latency_ms is None else np.asarray(exit_latency_ms, dtype=np.float64)
    out: dict[str, list[dict]] = {g: [] for g in groups}
    for t in thresholds:
        exit_index, pred = cascade_answers(probs, data.last_pred, [t] * heads.num_heads)
        exits, correct = exit_index.numpy(), (pred.numpy() == labels)
        for g, mask in groups.items():
            e = exits[mask]
            out[g].append({
                "threshold": round(float(t), 2),
                "latency_ms": None if latency is None else round(float(latency[e].mean()), 4),
                "accuracy": round(float(correct[mask].mean()), 6),
                "mean_exit": round(float(e.mean()), 6),
                "mean_cost": round(float(cost[e].mean()), 6),
            })
    return out


def row_at(rows: list[dict], threshold: float) -> dict:
    for r in rows:
        if abs(r["threshold"] - threshold) < 1e-9:
            return r
    raise ValueError(f"threshold {threshold} is not on the curve (0.50..0.99 step 0.01)")


def iso_accuracy_cost_ratio(before: list[dict], after: list[dict], threshold: float,
                            tolerance: float = 0.001) -> float | None:
    """Lowest cost on ``after`` whose accuracy >= before-at-threshold - tolerance, over the
    cost before at that threshold (None if no threshold reaches that accuracy)."""
    ref = row_at(before, threshold)
    ok = [r["mean_cost"] for r in after if r["accuracy"] >= ref["accuracy"] - tolerance - 1e-12]
    return round(min(ok) / ref["mean_cost"], 6) if ok else None


def simulate_stream(spec: Specializer, data: ExitFeatures, order: Sequence[int],
                    threshold: float, on_frame: Callable[[int], None] | None = None) -> None:
    """Feed frames (indices into ``data``) through the cascade's rule with the specializer's
    current heads, then into ``add_sample`` - what camera -> classifier -> adapter does, with
    the backbone's features precomputed. ``on_frame(n)`` runs after frame n (1-based).

    After the last frame the specializer is flushed before its ``on_frame``, as the adapter
    does at shutdown: with ``batch_size`` > 1 the last partial batch (and, with a checking
    guard, the steps since its last check) would otherwise never be learned or published."""
    h = spec.num_exits - 1
    heads = spec.heads()
    for n, idx in enumerate(order, start=1):
        feats = [data.features[i][idx] for i in range(h)]
        exit_index, cls, conf = h, int(data.last_pred[idx]), float(data.last_conf[idx])
        with torch.inference_mode():
            for i in range(h):
                c, k = heads.logits_of(i, feats[i][None]).softmax(1)[0].max(0)
                if reaches_threshold(float(c), threshold):
                    exit_index, cls, conf = i, int(k), float(c)
                    break
        if spec.add_sample(exit_index, cls, conf, feats[:exit_index]):
            heads = spec.heads()
        if n == len(order):
            spec.flush()
        if on_frame is not None:
            on_frame(n)
