"""The forgetting guard of test-time specialization (``AnchorGuard``): anchors, rehearsal,
and check-and-rollback of the early heads.

Self-training on a stream dominated by a few classes pushes the early heads' biases and
weights towards those classes; other classes then either exit later (cost) or, worse, exit
early with a confident wrong subset class (accuracy). The guard uses an *anchor set*: pooled
features of exits 0..H-1 of a small class-balanced set of unlabeled images, labelled by the
model's own last exit. Because the backbone and the last head never change, these features
and labels stay valid for the model's whole life, and the last exit is what the cascade falls
back to, so "agreement with the last exit" is exactly what an early exit can lose. The anchor
set is built once from unlabeled images (``build_anchor_set``) and stored as a small file.
The guard does two things:

1. Rehearsal: every update step also fits ``rehearsal`` anchors drawn evenly over classes, so
   the heads keep seeing every class, not only the ones the robot currently sees. This slows
   drift instead of merely detecting it. The default target is each original head's own
   softmax on the anchor (distillation, ``rehearsal_target="original"``): it holds the heads'
   behaviour on classes the stream does not show where it was, neither eroding it nor
   self-training it further; ``"labels"`` fits the last exit's class instead, which also makes
   other classes exit earlier (it is self-training on the anchors).
2. Check and roll back: every ``check_every`` steps it runs the cascade's decision rule on the
   anchors (first early head whose confidence reaches ``threshold``, else the last exit) and
   compares, per class, the agreement with the last exit (and, if ``exit_cost`` is given, the
   mean cost) with the original heads. If any class lost more than ``class_tolerance``, or the
   class mean lost more than ``tolerance``, the heads roll back to the last state that passed
   (and the optimizer's momentum is cleared); otherwise that state becomes the new snapshot.
   Only snapshots are published (``export``), so a classifier never runs unchecked heads.
   Rollback bounds the damage even if rehearsal is not enough (e.g. a far too large lr).
   ``check_every=0`` turns the check off: rehearsal only, every step published.

A replay buffer of the stream's own samples (the Specializer's ``replay_size``) is a separate
option: it balances the classes the stream has shown, but cannot protect classes it has not
shown yet, which is why the guard relies on anchors instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ttspec_ros.cascade import reaches_threshold
from ttspec_ros.files import atomic_write_bytes, safetensors_bytes
from ttspec_ros.model_update import all_finite, as_numpy
from ttspec_ros.models.checkpoint import validate_thresholds
from ttspec_ros.models.revcol import RevCol
from ttspec_ros.specialize import StackedHeads, pooled_features

# AnchorGuard's default rollback tolerances: mean and per-class loss of anchor agreement
GUARD_TOLERANCE = 0.005
GUARD_CLASS_TOLERANCE = 0.03


@dataclass
class AnchorSet:
    """Pooled features of exits 0..H-1 (each (M, C)); reference labels (M,) from the last exit;
    ``model_id`` of the model they come from (features of another backbone mean nothing)."""

    features: list[np.ndarray]
    labels: np.ndarray
    model_id: str = ""

    def __post_init__(self) -> None:
        self.features = [np.ascontiguousarray(as_numpy(f), dtype=np.float32) for f in self.features]
        labels = np.asarray(as_numpy(self.labels))
        if labels.dtype.kind not in "iu":  # astype would read 2.7 as class 2
            raise ValueError(f"anchor labels must be integers, got {labels.dtype} values")
        self.labels = labels.astype(np.int64).reshape(-1)
        if not self.features:
            raise ValueError("an anchor set needs the features of at least one early exit")
        m = self.labels.size
        for i, f in enumerate(self.features):
            if f.ndim != 2 or f.shape[0] != m:
                raise ValueError(f"anchor features of exit {i} have shape {f.shape}; "
                                 f"expected ({m}, C) to match {m} labels")
            if not np.all(np.isfinite(f)):
                raise ValueError(f"anchor features of exit {i} hold NaN or infinite values")
        if m == 0:
            raise ValueError("an anchor set needs at least one anchor")

    def save(self, path: str | os.PathLike, made_with: Mapping[str, Any] | None = None) -> Path:
        """``made_with`` (JSON-able: source, seed, ...) is kept in the file's metadata."""
        tensors = {f"features.{i}": f for i, f in enumerate(self.features)}
        tensors["labels"] = self.labels
        metadata = {"format": "ttspec-anchors-1", "model_id": self.model_id}
        if made_with is not None:
            metadata["made_with"] = json.dumps(dict(made_with), sort_keys=True)
        return atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata))

    def check_matches(self, model_id: str, num_early: int, feature_dim: int) -> None:
        """Refuse anchors of another model, or whose shapes do not fit its early heads."""
        if self.model_id != model_id:
            raise ValueError(f"anchors come from model {self.model_id or '(unrecorded)'!r}, "
                             f"not {model_id!r}: build them with this model")
        dims = [f.shape[1] for f in self.features]
        if len(dims) != num_early or any(d != feature_dim for d in dims):
            raise ValueError(f"anchor features of {len(dims)} exits of sizes {dims} do not fit "
                             f"{num_early} early heads of {feature_dim} inputs")

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnchorSet:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"anchor file {path} does not exist")
        try:
            t = load_file(str(path))
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable safetensors anchor file ({e})") from e
        n = sum(1 for k in t if k.startswith("features."))
        if "labels" not in t or n == 0 or any(f"features.{i}" not in t for i in range(n)):
            raise ValueError(f"{path}: not an anchor set (needs labels and features.0..N)")
        return cls([t[f"features.{i}"] for i in range(n)], t["labels"],
                   model_id=meta.get("model_id", ""))


def build_anchor_set(model: RevCol, images: Tensor | np.ndarray, per_class: int | None = None,
                     seed: int = 0, batch_size: int = 256, model_id: str = "") -> AnchorSet:
    """Anchors from unlabeled preprocessed images: early-exit features + the last exit's class.

    With ``per_class``, keep at most that many anchors of each last-exit class (seeded)."""
    if len(images) == 0:
        raise ValueError("no images to build anchors from")
    feats = pooled_features(model, images, batch_size)
    with torch.inference_mode():
        labels = model.head(model.num_exits - 1, feats[-1]).argmax(1).numpy()
    keep = np.arange(labels.size)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
        ))
    return AnchorSet([f[keep].numpy() for f in feats[:-1]], labels[keep], model_id=model_id)


def cascade_answers(head_probs: Sequence[Tensor], last_pred: Tensor, thresholds: Sequence[float]
                    ) -> tuple[Tensor, Tensor]:
    """The cascade's rule (``reaches_threshold``) on precomputed probabilities: the first
    early exit i whose max softmax reaches thresholds[i] answers, else the last exit.
    -> (exit index (N,), class (N,))."""
    n = last_pred.shape[0]
    exit_index = torch.full((n,), len(head_probs), dtype=torch.long)
    pred = last_pred.clone()
    undecided = torch.ones(n, dtype=torch.bool)
    for i, p in enumerate(head_probs):
        conf, cls = p.max(1)
        take = undecided & reaches_threshold(conf, thresholds[i])
        exit_index[take] = i
        pred[take] = cls[take]
        undecided &= ~take
    return exit_index, pred


def check_guard_settings(*, rehearsal: int = 2, check_every: int = 10,
                         tolerance: float = GUARD_TOLERANCE,
                         class_tolerance: float = GUARD_CLASS_TOLERANCE,
                         cost_tolerance: float | None = None) -> None:
    """Raise ValueError naming the first bad `AnchorGuard` setting. Callers that build the guard
    only after loading a model and its data (the experiments) check their options with it
    first."""
    for name, value in (("rehearsal", rehearsal), ("check_every", check_every)):
        if value < 0:
            raise ValueError(f"guard {name} must be >= 0, got {value}")
    # A NaN tolerance fails every comparison in `passes`, which would then never roll back.
    for name, tol in (("tolerance", tolerance), ("class_tolerance", class_tolerance),
                      ("cost_tolerance", cost_tolerance)):
        if tol is not None and not 0.0 <= tol < math.inf:
            raise ValueError(f"guard {name} must be finite and >= 0, got {tol}")


class AnchorGuard:
    """Rehearsal of anchors plus check-and-rollback against the original heads (see module doc).

    ``threshold``: the cascade threshold the check simulates (one for every early exit, or a
    sequence). ``exit_cost``: cumulative compute share of every exit (model card); with
    ``cost_tolerance`` set, a class whose anchor mean cost rises by more than that fraction
    also triggers a rollback."""

    def __init__(self, anchors: AnchorSet, *, threshold: float | Sequence[float] = 0.9,
                 rehearsal: int = 2, check_every: int = 10, tolerance: float = GUARD_TOLERANCE,
                 class_tolerance: float = GUARD_CLASS_TOLERANCE,
                 exit_cost: Sequence[float] | None = None,
                 cost_tolerance: float | None = None, rehearsal_target: str = "original",
                 seed: int = 0) -> None:
        if rehearsal_target not in ("original", "labels"):
            raise ValueError(f"rehearsal_target must be 'original' or 'labels', got "
                             f"{rehearsal_target!r}")
        self.rehearsal_target = rehearsal_target
        check_guard_settings(rehearsal=rehearsal, check_every=check_every, tolerance=tolerance,
                             class_tolerance=class_tolerance, cost_tolerance=cost_tolerance)
        if cost_tolerance is not None and exit_cost is None:
            raise ValueError("cost_tolerance needs exit_cost")
        self.anchors = anchors
        h = len(anchors.features)
        self.thresholds = validate_thresholds(threshold, h + 1, source="guard thresholds")
        self.rehearsal, self.check_every = int(rehearsal), int(check_every)
        self.tolerance, self.class_tolerance = float(tolerance), float(class_tolerance)
        self.exit_cost = None if exit_cost is None else torch.tensor(exit_cost, dtype=torch.float64)
        if self.exit_cost is not None and self.exit_cost.numel() != h + 1:
            raise ValueError(f"exit_cost needs {h + 1} values (one per exit), got "
                             f"{self.exit_cost.numel()}")
        self.cost_tolerance = cost_tolerance
        self._x = torch.stack([torch.from_numpy(f) for f in anchors.features])  # (H, M, C)
        self._labels = torch.from_numpy(anchors.labels)
        self._classes = torch.unique(self._labels)
        self._by_class = [torch.nonzero(self._labels == c).flatten() for c in self._classes]
        self._rng = np.random.default_rng(seed)
        self.reference: dict[str, Tensor] | None = None
        self._targets: Tensor | None = None

    def settings(self) -> dict:
        """What decides the guard's work and its rollbacks, for experiment records."""
        return {"anchors": int(self.anchors.labels.size), "rehearsal": self.rehearsal,
                "check_every": self.check_every, "tolerance": self.tolerance,
                "class_tolerance": self.class_tolerance, "cost_tolerance": self.cost_tolerance}

    def bind(self, heads: StackedHeads) -> None:
        """Record the original heads' per-class agreement/cost (the reference)."""
        if heads.num_heads != self._x.shape[0] or heads.feature_dim != self._x.shape[2]:
            raise ValueError(
                f"anchors are for {self._x.shape[0]} heads of width {self._x.shape[2]}, the "
                f"specializer has {heads.num_heads} of width {heads.feature_dim}"
            )
        k = heads.weight.shape[1]
        if self._labels.numel() and not 0 <= int(self._labels.min()) <= int(self._labels.max()) < k:
            raise ValueError(f"anchor labels must lie in [0, {k - 1}] for heads of {k} classes, "
                             f"got {int(self._labels.min())}..{int(self._labels.max())}")
        self.reference = self.measure(heads)
        with torch.no_grad():
            self._targets = heads.logits(self._x).softmax(-1)  # (H, M, K) distillation targets

    @torch.no_grad()
    def measure(self, heads: StackedHeads) -> dict[str, Tensor]:
        """Per-class agreement with the last exit (and mean cost) of the cascade on the anchors."""
        probs = list(heads.logits(self._x).softmax(-1))
        exit_index, pred = cascade_answers(probs, self._labels, self.thresholds)
        agree = (pred == self._labels).double()
        out = {"agreement": torch.stack([agree[i].mean() for i in self._by_class])}
        if self.exit_cost is not None:
            cost = self.exit_cost[exit_index]
            out["cost"] = torch.stack([cost[i].mean() for i in self._by_class])
        return out

    def passes(self, heads: StackedHeads) -> bool:
        if self.reference is None:
            raise RuntimeError("AnchorGuard.bind(heads) must be called first")
        # NaN confidences never reach a threshold, so NaN heads would send every anchor to
        # the last exit and look like perfect agreement.
        if not all_finite(heads.parameters()):
            return False
        now, ref = self.measure(heads), self.reference
        drop = ref["agreement"] - now["agreement"]
        if drop.mean() > self.tolerance + 1e-12 or drop.max() > self.class_tolerance + 1e-12:
            return False
        if self.cost_tolerance is not None:
            if (now["cost"] > ref["cost"] * (1.0 + self.cost_tolerance) + 1e-12).any():
                return False
        return True

    def rehearsal_batch(self, num_classes: int) -> tuple[Tensor, Tensor] | None:
        """``rehearsal`` anchors drawn evenly over classes -> (features (H, R, C), target
        distributions (H, R, K))."""
        if self.rehearsal == 0:
            return None
        if self._targets is None:
            raise RuntimeError("AnchorGuard.bind(heads) must be called first")
        picks = self._rng.integers(len(self._by_class), size=self.rehearsal)
        idx = torch.tensor([int(self._by_class[c][self._rng.integers(len(self._by_class[c]))])
                            for c in picks])
        if self.rehearsal_target == "original":
            return self._x[:, idx], self._targets[:, idx]
        onehot = F.one_hot(self._labels[idx], num_classes).float()
        return self._x[:, idx], onehot.expand(self._x.shape[0], -1, -1)


__all__ = ["AnchorGuard", "AnchorSet", "build_anchor_set", "cascade_answers"]
