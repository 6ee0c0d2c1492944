"""Test-time specialization of the early exits.

When a frame is answered by exit k > 0, exit k's class is the pseudo-label for cross-entropy on
heads 0..k-1, computed on the pooled features those exits already produced (what an
``AdaptationSample`` carries). Only those heads (``cls_blocks.i.classifier``: LayerNorm +
Linear) change; the backbone and the last head never do, so the last exit keeps its accuracy.
Defaults follow the paper: plain SGD, lr 1e-4, batch 1, no momentum.

The heads are kept stacked ((H, ...) tensors for the H = num_exits - 1 early heads, which all
share one shape), so one update step is a single small forward/backward whatever the exit.

Against forgetting, a ``Specializer`` can take a guard (``ttspec_ros.guard.AnchorGuard``:
rehearsal of anchors with every step, check and roll back of the heads, only checked heads
published). A replay buffer of the stream's own samples (``replay_size``) is a separate option.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttspec_ros.checks import is_integer
from ttspec_ros.files import atomic_write_bytes
from ttspec_ros.model_update import (
    MAX_MAGNITUDE,
    MAX_SAVED_VERSION,
    ModelUpdatePayload,
    all_finite,
    as_numpy,
    within_magnitude,
)
from ttspec_ros.models.revcol import ColumnState, RevCol

if TYPE_CHECKING:  # guard.py imports this module; the Specializer only calls a guard's methods
    from ttspec_ros.guard import AnchorGuard

LAYER_NORM_EPS = 1e-6  # eps of the classifier LayerNorm (RevCol)
STATE_FILE = "specializer.safetensors"
_STATE_FORMAT = "ttspec-specializer-1"


# -- head tensors ------------------------------------------------------------------------
def head_tensor_names(exit_index: int) -> list[str]:
    """State-dict names of one exit's classifier: LayerNorm weight/bias, Linear weight/bias."""
    p = f"cls_blocks.{exit_index}.classifier."
    return [p + "0.weight", p + "0.bias", p + "1.weight", p + "1.bias"]


def early_head_tensors(model: RevCol | Mapping[str, Tensor], num_exits: int | None = None
                       ) -> dict[str, Tensor]:
    """Copies of the classifier tensors of exits 0..num_exits-2 (the ones specialization trains).

    ``model`` is a RevCol or its state dict; ``num_exits`` defaults to ``model.num_exits``."""
    state: Mapping[str, Tensor]
    if isinstance(model, nn.Module):
        num_exits = num_exits or int(model.num_exits)
        state = model.state_dict()
    else:
        state = model
        if num_exits is None:
            raise ValueError("num_exits is needed when passing a state dict")
    out = {}
    for i in range(num_exits - 1):
        for name in head_tensor_names(i):
            if name not in state:
                raise KeyError(f"state dict lacks {name}")
            out[name] = state[name].detach().clone().float()
    return out


class StackedHeads:
    """Early heads 0..H-1 as stacked tensors: LayerNorm (H,C), Linear (H,K,C) and (H,K)."""

    def __init__(self, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor) -> None:
        self.ln_weight, self.ln_bias, self.weight, self.bias = ln_weight, ln_bias, weight, bias

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], num_early: int) -> StackedHeads:
        if num_early < 1:
            raise ValueError(f"need at least one early head, got num_early={num_early}")
        expected = {n for i in range(num_early) for n in head_tensor_names(i)}
        missing, extra = expected - set(tensors), set(tensors) - expected
        if missing or extra:
            raise ValueError(
                f"early-head tensors must be exactly cls_blocks.0..{num_early - 1}.classifier.*; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        parts: list[list[Tensor]] = [[], [], [], []]
        for i in range(num_early):
            for slot, name in enumerate(head_tensor_names(i)):
                value = np.asarray(as_numpy(tensors[name]))
                if value.dtype.kind != "f":  # integer weights would pass as truncated heads
                    raise ValueError(f"{name} holds {value.dtype} values, not floating point")
                parts[slot].append(torch.as_tensor(value.astype(np.float32, copy=False)))
        ln_w, ln_b, w, b = parts
        c, k = ln_w[0].numel(), b[0].numel()
        for i in range(num_early):
            shapes = (tuple(ln_w[i].shape), tuple(ln_b[i].shape), tuple(w[i].shape),
                      tuple(b[i].shape))
            if shapes != ((c,), (c,), (k, c), (k,)):
                raise ValueError(
                    f"head {i} has shapes {shapes}; every early head must be LayerNorm({c}) + "
                    f"Linear({c}, {k})"
                )
        stacked = [torch.stack(p).contiguous() for p in parts]
        for name, t in zip(("LayerNorm weight", "LayerNorm bias", "weight", "bias"), stacked,
                           strict=True):
            if not torch.isfinite(t).all():
                raise ValueError(f"early-head {name} holds NaN or infinite values")
            if not within_magnitude([t]):
                raise ValueError(f"early-head {name} holds values beyond +-{MAX_MAGNITUDE:g} "
                                 "(a diverged or damaged state)")
        return cls(*stacked)

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[2]

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    def parameters(self) -> list[Tensor]:
        return [self.ln_weight, self.ln_bias, self.weight, self.bias]

    def clone(self) -> StackedHeads:
        return StackedHeads(*(p.detach().clone() for p in self.parameters()))

    def copy_(self, other: StackedHeads) -> None:
        with torch.no_grad():
            for dst, src in zip(self.parameters(), other.parameters(), strict=True):
                dst.copy_(src)

    def logits(self, x: Tensor) -> Tensor:
        """x (h, B, C) pooled features of heads 0..h-1 -> logits (h, B, K)."""
        h = x.shape[0]
        xn = F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)
        xn = xn * self.ln_weight[:h, None, :] + self.ln_bias[:h, None, :]
        return torch.baddbmm(self.bias[:h, None, :], xn, self.weight[:h].transpose(1, 2))

    def logits_of(self, index: int, x: Tensor) -> Tensor:
        """Logits of head ``index`` for x (N, C)."""
        xn = F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)
        xn = xn * self.ln_weight[index] + self.ln_bias[index]
        return xn @ self.weight[index].T + self.bias[index]

    def to_tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for i in range(self.num_heads):
            names = head_tensor_names(i)
            for name, p in zip(names, self.parameters(), strict=True):
                out[name] = p[i].detach().cpu().numpy().astype(np.float32, copy=True)
        return out


def _is_count(value: Any) -> bool:
    """An integer >= 0 as JSON gives it (bool is an int subclass, but no count)."""
    return is_integer(value) and value >= 0


# -- features ----------------------------------------------------------------------------
@torch.inference_mode()
def pooled_features(model: RevCol, images: Tensor | np.ndarray, batch_size: int = 256
                    ) -> list[Tensor]:
    """Pooled head inputs of every exit for a batch of preprocessed images (N, C, H, W).

    The same vectors the cascade produces frame by frame (computed in batches)."""
    was_training = model.training
    model.eval()
    try:
        images = torch.as_tensor(images)
        outs: list[list[Tensor]] = [[] for _ in range(model.num_exits)]
        for start in range(0, images.shape[0], batch_size):
            x = model.stem(images[start : start + batch_size].float())
            state: ColumnState = (0.0, 0.0, 0.0, 0.0)
            for i in range(model.num_exits):
                state = model.run_exit(i, x, state)
                outs[i].append(model.pool(state[3]))
        return [torch.cat(o) if o else torch.zeros(0) for o in outs]
    finally:
        model.train(was_training)


def unpack_features(feature_sizes: Sequence[int], features: Sequence[float] | np.ndarray
                    ) -> list[np.ndarray]:
    """AdaptationSample's (feature_sizes, concatenated features) -> one array per exit."""
    flat = np.asarray(features, dtype=np.float32).reshape(-1)
    sizes = [int(s) for s in feature_sizes]
    if sum(sizes) != flat.size:
        raise ValueError(f"feature_sizes add up to {sum(sizes)}, but {flat.size} features came")
    return [a.copy() for a in np.split(flat, np.cumsum(sizes)[:-1])] if sizes else []


def pack_features(features: Sequence[np.ndarray | Tensor]) -> tuple[list[int], np.ndarray]:
    """One feature vector per exit -> (feature_sizes, concatenated float32 features)."""
    arrays = [np.asarray(as_numpy(f), dtype=np.float32).reshape(-1) for f in features]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
    return [a.size for a in arrays], flat


# -- the specializer -------------------------------------------------------------------------
def check_specializer_settings(*, lr: float = 1e-4, momentum: float = 0.0, batch_size: int = 1,
                               min_confidence: float = 0.0, replay_size: int = 0) -> None:
    """Raise ValueError naming the first bad `Specializer` setting (see
    `ttspec_ros.guard.check_guard_settings` for why it stands alone)."""
    if not 0 < lr < math.inf:  # NaN fails too
        raise ValueError(f"lr must be > 0 and finite, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if replay_size < 0:
        raise ValueError(f"replay_size must be >= 0, got {replay_size}")


class Specializer:
    """Trains early heads 0..k-1 on exit k's pseudo-labels; thread-safe; exports updates.

    ``add_sample`` queues one frame's sample and takes an SGD step when ``batch_size`` samples
    are queued (``flush`` learns from a partly filled one); ``export`` gives the current
    heads as a ``ModelUpdatePayload`` whose version increases with every change (step,
    rollback, reset, load).

    ``replay_size`` > 0 keeps that many of the stream's learned samples at most (and at most
    ceil(replay_size / classes) per class, so classes share it) and replays ``batch_size`` of
    them, drawn over classes evenly, with every step. With a checking guard a batch enters
    it only once the check of its step passed: a rolled-back batch is not replayed later."""

    def __init__(self, initial_heads: Mapping[str, Any], num_exits: int, *, model_id: str = "",
                 lr: float = 1e-4, momentum: float = 0.0, batch_size: int = 1,
                 min_confidence: float = 0.0, replay_size: int = 0,
                 guard: AnchorGuard | None = None, seed: int = 0) -> None:
        if num_exits < 2:
            raise ValueError(f"specialization needs at least 2 exits, got {num_exits}")
        check_specializer_settings(lr=lr, momentum=momentum, batch_size=batch_size,
                                   min_confidence=min_confidence, replay_size=replay_size)
        self.num_exits = int(num_exits)
        self.model_id = model_id
        self.lr, self.momentum, self.batch_size = float(lr), float(momentum), int(batch_size)
        self.min_confidence, self.replay_size = float(min_confidence), int(replay_size)
        self.seed = int(seed)
        self._initial = StackedHeads.from_tensors(initial_heads, self.num_exits - 1)
        self._heads = self._initial.clone()
        # numpy views sharing memory with the trained head tensors (updated in place only)
        self._views = [p.numpy() for p in self._heads.parameters()]
        self.guard = guard
        if guard is not None:
            guard.bind(self._initial)
        # With a guard, what export() gives is the last state that passed its check.
        self._published = self._initial.clone()
        self._changes = 0
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(seed)
        self._pending: list[tuple[np.ndarray, int]] = []
        per_class = math.ceil(replay_size / self.num_classes) if replay_size else 0
        # class -> deque of (features, label, arrival number), oldest first
        self._replay: dict[int, deque] = {}
        self._replay_per_class = per_class
        self._replay_count = 0  # samples ever added: orders evictions across classes
        # Samples of steps a checking guard has not passed yet: they join the buffer when the
        # check passes and are dropped when it rolls the heads back.
        self._replay_unchecked: list[tuple[np.ndarray, int]] = []
        self._new_optimizer()
        self.version = 0  # of the published heads
        self.counters = {"samples": 0, "skipped_low_confidence": 0, "skipped_first_exit": 0,
                         "steps": 0, "rollbacks": 0, "resets": 0,
                         "overflows": 0}

    # -- properties
    @property
    def lock(self) -> threading.RLock:
        """Held by every method; hold it to make several calls one atomic step."""
        return self._lock

    @property
    def num_classes(self) -> int:
        return self._initial.num_classes

    @property
    def feature_dim(self) -> int:
        return self._initial.feature_dim

    @property
    def tensor_names(self) -> list[str]:
        return [n for i in range(self.num_exits - 1) for n in head_tensor_names(i)]

    @property
    def _checking_guard(self) -> AnchorGuard | None:
        """The guard if it checks the trained heads before they are published (check_every
        > 0), else None."""
        guard = self.guard
        return guard if guard is not None and guard.check_every else None

    @property
    def _checking(self) -> bool:
        return self._checking_guard is not None

    def settings(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "batch_size": self.batch_size,
                "min_confidence": self.min_confidence, "replay_size": self.replay_size,
                "guard": self.guard is not None, "seed": self.seed}

    def _new_optimizer(self) -> None:
        """Fresh (zero) momentum buffers."""
        self._momentum = [torch.zeros_like(p) for p in self._heads.parameters()]
        self._momentum_views = [m.numpy() for m in self._momentum]

    # -- training
    def _check_sample(self, exit_index: int, class_id: int, confidence: float,
                      features: Sequence[Any]) -> np.ndarray:
        """Validated features as one (exit_index, C) float32 array."""
        if not 0 <= int(exit_index) < self.num_exits:
            raise ValueError(f"exit_index {exit_index} out of range 0..{self.num_exits - 1}")
        if not 0 <= int(class_id) < self.num_classes:
            raise ValueError(f"class_id {class_id} out of range 0..{self.num_classes - 1}")
        if not 0.0 <= float(confidence) <= 1.0:
            raise ValueError(f"confidence {confidence} outside [0, 1]")
        if len(features) != exit_index:
            raise ValueError(f"exit {exit_index} answered, so the features of exits "
                             f"0..{exit_index - 1} ({exit_index} vectors) are needed; got "
                             f"{len(features)}")
        rows = [np.asarray(as_numpy(f), dtype=np.float32).reshape(-1) for f in features]
        for i, row in enumerate(rows):
            if row.size != self.feature_dim:
                raise ValueError(f"feature of exit {i} has {row.size} values, heads take "
                                 f"{self.feature_dim}")
        out = np.stack(rows) if rows else np.zeros((0, self.feature_dim), np.float32)
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).all(1))[0])
            raise ValueError(f"feature of exit {bad} holds NaN or infinite values")
        # The heads' LayerNorm sums squared deviations in float32: finite features of absurd
        # size (a broken sender) overflow it, and the step's NaN would roll the heads back.
        with np.errstate(over="ignore", invalid="ignore"):
            centred = out - out.mean(1, keepdims=True)
            spread = np.isfinite(centred).all(1) & np.isfinite((centred * centred).sum(1))
        if not spread.all():
            bad = int(np.flatnonzero(~spread)[0])
            raise ValueError(f"feature of exit {bad} is too large for the heads' LayerNorm "
                             f"(max |value| {float(np.abs(out[bad]).max()):.3g}: its sum of "
                             "squares overflows float32)")
        return out

    def add_sample(self, exit_index: int, class_id: int, confidence: float,
                   features: Sequence[np.ndarray | Tensor]) -> bool:
        """Queue one answered frame; returns True if an update step (or rollback) happened.

        ``features`` are the pooled head inputs of exits 0..exit_index-1. Frames answered by
        exit 0 have no earlier head to train; frames under ``min_confidence`` are skipped;
        both are counted."""
        feats = self._check_sample(exit_index, class_id, confidence, features)
        with self._lock:
            self.counters["samples"] += 1
            if exit_index == 0:
                self.counters["skipped_first_exit"] += 1
                return False
            if confidence < self.min_confidence:
                self.counters["skipped_low_confidence"] += 1
                return False
            self._pending.append((feats, int(class_id)))
            if len(self._pending) < self.batch_size:
                return False
            batch, self._pending = self._pending, []
            self._step(batch)
            return True

    def flush(self) -> bool:
        """Learn from what is still held back, at a stream's end or shutdown: one step on a
        partly filled batch (``batch_size`` > 1), then, with a checking guard, its check of
        the steps taken since the last check, so that what is exported and saved includes
        every sample received. Returns True if the published heads changed."""
        with self._lock:
            version = self.version
            if self._pending:
                batch, self._pending = self._pending, []
                self._step(batch)
            if self._published_heads() is not self._heads and not all(
                    torch.equal(a, b) for a, b in zip(self._heads.parameters(),
                                                      self._published.parameters(), strict=True)):
                self._check()
            return self.version != version

    def _replay_batch(self) -> list[tuple[np.ndarray, int]]:
        classes = [c for c, q in self._replay.items() if q]
        if not classes:
            return []
        out = []
        for c in self._rng.choice(classes, size=self.batch_size):
            q = self._replay[int(c)]
            feats, label, _ = q[int(self._rng.integers(len(q)))]
            out.append((feats, label))
        return out

    def _remember(self, samples: Sequence[tuple[np.ndarray, int]]) -> None:
        """Add learned samples to the replay buffer. Per-class shares are rounded up
        (ceil(replay_size / classes)), so when the total exceeds replay_size the oldest
        sample of the class holding the most goes (ties: the class whose oldest sample is
        oldest), which keeps the classes balanced and the total within replay_size."""
        for feats, label in samples:
            self._replay.setdefault(label, deque(maxlen=self._replay_per_class)).append(
                (feats, label, self._replay_count))
            self._replay_count += 1
            if sum(len(q) for q in self._replay.values()) > self.replay_size:
                victim = max((q for q in self._replay.values() if q),
                             key=lambda q: (len(q), -q[0][2]))
                victim.popleft()

    def _gradients(self, x: np.ndarray, weights: np.ndarray, targets: np.ndarray,
                   apply_weight_lr: float | None = None) -> list[np.ndarray | None]:
        """Gradients of sum_heads sum_samples weight * CE(target distribution) for heads
        0..h-1, in closed form (x (h, B, C), weights (h, B), targets (h, B, K)).

        With ``apply_weight_lr`` (plain SGD) the Linear weights are updated here, in place,
        ``w -= lr * d^T z`` in one BLAS call, and their gradient is returned as None: on a
        1000-class head, writing, scaling and subtracting a weight-sized gradient was most of
        the step (bench-update, RevCol-T/224, 1 thread: 2.75-3.09 -> 1.45-1.54 ms).

        The features are inputs (nothing upstream trains), so LayerNorm needs no backward
        through its normalisation. Elementwise work in numpy on views of the head tensors: for
        a step this small, autograd's and torch's per-op overheads cost more than the math."""
        ln_w, ln_b, w, b = self._views
        h, inv_c = x.shape[0], 1.0 / x.shape[2]
        centred = x - x.sum(-1, keepdims=True) * inv_c
        normed = centred / np.sqrt((centred * centred).sum(-1, keepdims=True) * inv_c
                                   + LAYER_NORM_EPS)
        z = normed * ln_w[:h, None, :] + ln_b[:h, None, :]
        # The products go through torch (zero-copy views): numpy's OpenBLAS threads spin
        # badly on a loaded machine (a 1000-class matvec took ms) and its stacked matmul
        # skips BLAS for transposed operands.
        wt, zt = self._heads.weight[:h], torch.from_numpy(z)
        logits = torch.bmm(zt, wt.transpose(1, 2)).numpy() + b[:h, None, :]
        logits -= logits.max(-1, keepdims=True)
        d = np.exp(logits)
        d /= d.sum(-1, keepdims=True)
        d -= targets  # dCE/dlogits = softmax - target
        d *= weights[..., None]
        dt = torch.from_numpy(d)
        dz = torch.bmm(dt, wt).numpy()
        if apply_weight_lr is None:
            grad_w = torch.bmm(dt.transpose(1, 2), zt).numpy()
        else:
            wt.baddbmm_(dt.transpose(1, 2), zt, alpha=-apply_weight_lr)
            grad_w = None
        return [(dz * normed).sum(1), dz.sum(1), grad_w, d.sum(1)]

    def _sgd(self, grads: list[np.ndarray | None], h: int) -> None:  # grads: owned, overwritten
        """torch.optim.SGD's rule (no dampening/nesterov) on heads 0..h-1 only; heads the batch
        did not reach are left alone, as separate per-head optimizers would. A None gradient
        was applied already (see ``_gradients``)."""
        for p, g, buf in zip(self._views, grads, self._momentum_views, strict=True):
            if g is None:
                continue
            if self.momentum:
                m = buf[:h]
                m *= self.momentum
                m += g
                np.multiply(m, self.lr, out=g)
            else:
                g *= self.lr  # in place: no temporary the size of a 1000-class weight
            p[:h] -= g

    def _step(self, batch: list[tuple[np.ndarray, int]]) -> None:
        samples = batch + (self._replay_batch() if self.replay_size else [])
        h = max(len(f) for f, _ in samples)
        rehearsal = None if self.guard is None else self.guard.rehearsal_batch(self.num_classes)
        r = 0 if rehearsal is None else rehearsal[0].shape[1]
        b = len(samples)
        x = np.zeros((h, b + r, self.feature_dim), np.float32)
        mask = np.zeros((h, b + r), np.float32)
        targets = np.zeros((h, b + r, self.num_classes), np.float32)
        for j, (feats, label) in enumerate(samples):
            x[: len(feats), j] = feats
            mask[: len(feats), j] = 1.0
            targets[:, j, label] = 1.0
        if rehearsal is not None:
            x[:, b:] = rehearsal[0][:h].numpy()
            mask[:, b:] = 1.0
            targets[:, b:] = rehearsal[1][:h].numpy()
        # per-head mean over the samples that reached it, summed over heads (heads are
        # independent, so this equals one step per head)
        weights = mask / np.maximum(mask.sum(1, keepdims=True), 1.0)
        self._sgd(self._gradients(x, weights, targets,
                                  apply_weight_lr=None if self.momentum else self.lr), h)
        if not within_magnitude([v[:h] for v in self._views]):
            # A step that overflowed or diverged is never kept (it could be exported or
            # saved): back to the last good heads, as a failed guard check does. Counted on
            # its own: the step size is too large (lr / (1 - momentum)), not a guard's verdict.
            self.counters["overflows"] += 1
            self._roll_back()
            return
        self.counters["steps"] += 1
        self._changes += 1
        if not self._checking:
            self.version = self._changes  # published = trained heads
        if self.replay_size:
            if self._checking:  # replayed only once the guard's check keeps this step
                self._replay_unchecked.extend(batch)
            else:
                self._remember(batch)
        guard = self._checking_guard
        if guard is not None and self.counters["steps"] % guard.check_every == 0:
            self._check()

    def _check(self) -> None:
        """The guard's check of the trained heads: publish them, or roll back."""
        assert self.guard is not None
        if self.guard.passes(self._heads):
            self._published = self._heads.clone()
            self.version = self._changes
            self._remember(self._replay_unchecked)
            self._replay_unchecked = []
        else:
            self._roll_back()

    def _roll_back(self) -> None:
        """Heads back to the last published (checked) state, or without a checking guard to
        the last loaded or reset ones, with fresh momentum."""
        unchecked = self._published_heads() is self._heads
        self._heads.copy_(self._published)
        self._new_optimizer()
        self._replay_unchecked.clear()  # the steps that learned them are undone
        self.counters["rollbacks"] += 1
        if unchecked:  # the exported heads changed: a new version, so classifiers take it
            self._changes += 1
            self.version = self._changes

    # -- outputs
    def _published_heads(self) -> StackedHeads:
        return self._published if self._checking else self._heads

    def export(self) -> ModelUpdatePayload:
        """The published early heads (every tensor specialization may change) and version.

        Without a guard these are the trained heads; with one, the last state that passed
        its check (steps since then are not published yet)."""
        with self._lock:
            return ModelUpdatePayload(self.model_id, self.version,
                                      self._published_heads().to_tensors())

    def heads(self) -> StackedHeads:
        """A detached copy of the published early heads (what a classifier would run)."""
        with self._lock:
            return self._published_heads().clone()

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "version": self.version, "pending": len(self._pending)}

    def reset(self) -> None:
        """Back to the original heads (a new version); pending samples and replay are dropped."""
        with self._lock:
            self._heads.copy_(self._initial)
            self._published = self._initial.clone()
            self._pending.clear()
            self._replay.clear()
            self._replay_unchecked.clear()
            self._new_optimizer()
            self.counters["resets"] += 1
            self._changes += 1
            self.version = self._changes

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        """{"tensors": name -> float32 array, "meta": JSON-able dict} of the published heads;
        replay buffer and pending samples are not kept."""
        with self._lock:
            tensors = {f"heads.{k}": v for k, v in self._published_heads().to_tensors().items()}
            tensors.update({f"initial.{k}": v for k, v in self._initial.to_tensors().items()})
            for name, buf in zip(("ln_weight", "ln_bias", "weight", "bias"), self._momentum,
                                 strict=True):
                if self.momentum:
                    tensors[f"momentum.{name}"] = buf.numpy().copy()
            bad = next((k for k, v in tensors.items() if not all_finite([v])), None)
            if bad is not None:
                # it could never be loaded again, and saving it would replace a good state
                raise ValueError(f"specializer state holds NaN or infinite values in {bad}; "
                                 "refusing to write it")
            meta = {"format": _STATE_FORMAT, "model_id": self.model_id,
                    "num_exits": self.num_exits, "version": self.version,
                    "counters": dict(self.counters), "settings": self.settings()}
            return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; it must come from the same model (same initial heads).

        Everything is checked before anything changes: a refused state (ValueError) leaves
        the specializer as it was."""
        tensors, meta = state.get("tensors"), state.get("meta")
        if not isinstance(tensors, Mapping) or not isinstance(meta, Mapping):
            raise ValueError("specializer state needs a 'tensors' and a 'meta' mapping, got "
                             f"{type(tensors).__name__} and {type(meta).__name__}")
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown specializer state format {meta.get('format')!r}")
        if meta.get("model_id") != self.model_id or meta.get("num_exits") != self.num_exits:
            raise ValueError(
                f"state is for model {meta.get('model_id')!r} with {meta.get('num_exits')} "
                f"exits; this specializer adapts {self.model_id!r} with {self.num_exits}"
            )
        version: Any = meta.get("version")  # JSON: checked next
        counters = meta.get("counters", {})
        if not _is_count(version) or version > MAX_SAVED_VERSION:
            raise ValueError(f"specializer state version must be an integer in 0..2**62, got "
                             f"{version!r}")
        if not isinstance(counters, Mapping) or \
                not all(_is_count(v) for k, v in counters.items() if k in self.counters):
            raise ValueError(f"specializer state counters must map names to integers >= 0, "
                             f"got {counters!r}")
        h = self.num_exits - 1
        initial = StackedHeads.from_tensors(
            {k[len("initial."):]: v for k, v in tensors.items() if k.startswith("initial.")}, h)
        heads = StackedHeads.from_tensors(  # also refuses non-finite heads
            {k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")}, h)
        if any(a.shape != b.shape or not torch.equal(a, b)
               for a, b in zip(initial.parameters(), self._initial.parameters(), strict=True)):
            raise ValueError("state was saved for different original heads (another model?)")
        for name, a, b in zip(("ln_weight", "ln_bias", "weight", "bias"), heads.parameters(),
                              self._initial.parameters(), strict=True):
            if a.shape != b.shape:  # copy_ would broadcast or stop half-way
                raise ValueError(f"state's heads.{name} have shape {tuple(a.shape)}, these "
                                 f"heads {tuple(b.shape)}")
        momentum: list[np.ndarray | None] = []  # None: the buffer starts at zero
        for name, p in zip(("ln_weight", "ln_bias", "weight", "bias"), heads.parameters(),
                           strict=True):
            # without momentum the buffers are unused, so a saved one is ignored
            saved = tensors.get(f"momentum.{name}") if self.momentum else None
            if saved is not None:
                saved = np.asarray(as_numpy(saved), np.float32)
                if saved.shape != tuple(p.shape):
                    raise ValueError(f"momentum.{name} has shape {saved.shape}, expected "
                                     f"{tuple(p.shape)}")
                if not all_finite([saved]):
                    # the next step would turn the heads into NaN
                    raise ValueError(f"momentum.{name} holds NaN or infinite values")
            momentum.append(saved)
        guard = self._checking_guard
        if guard is not None and not guard.passes(heads):
            # Loaded heads are published at once and become what a failed check rolls back
            # to, so heads this guard refuses would go out unchecked and stay.
            raise ValueError(
                "the saved heads fail this specializer's forgetting guard (saved without "
                "one, or with other anchors or tolerances); resume without the guard, or "
                "remove the state file to start from the original heads")
        with self._lock:
            self._heads.copy_(heads)
            self._published = heads.clone()
            self._pending.clear()
            self._replay_unchecked.clear()  # their unchecked steps are replaced by the state
            self._new_optimizer()
            for buf, saved in zip(self._momentum, momentum, strict=True):
                if saved is not None:
                    buf.copy_(torch.from_numpy(saved))
            self.counters.update({k: int(v) for k, v in counters.items() if k in self.counters})
            # Never go back in version: a classifier may already hold a newer one.
            self._changes = max(self._changes + 1, version)
            self.version = self._changes

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the state to ``directory/specializer.safetensors`` atomically (metadata = JSON)."""
        from safetensors.numpy import save

        state = self.state_dict()
        data = save(state["tensors"], metadata={"state": json.dumps(state["meta"])})
        return atomic_write_bytes(Path(directory) / STATE_FILE, data)

    def load(self, directory: str | os.PathLike) -> None:
        """Restore from ``save``; raises with the reason if the file is missing or wrong."""
        from safetensors import SafetensorError, safe_open

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no specializer state at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, TypeError, json.JSONDecodeError, SafetensorError) as e:
            # TypeError: numpy has no dtype for a tensor (bfloat16), or metadata is no string
            raise ValueError(f"{path}: not a specializer state file ({e})") from e
        self.load_state_dict({"tensors": tensors, "meta": meta})


__all__ = [
    "Specializer", "StackedHeads", "early_head_tensors", "head_tensor_names", "pack_features",
    "pooled_features", "unpack_features",
]
