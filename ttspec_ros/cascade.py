"""Early-exit cascade over a RevCol: run column groups in order, stop at the first exit whose
max softmax probability reaches that exit's threshold (the last exit always answers).

The backbone is a ``StagedBackbone`` (torch here; ONNX Runtime / TensorRT in
``ttspec_ros.backends``). The exit heads (LayerNorm + Linear, ``cls_blocks.i.classifier``)
always run in torch inside the cascade, on the pooled features each stage returns, so head
updates apply identically on every backend. Updates are copied under the lock each frame
holds, so a frame sees the model entirely before or entirely after an update.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ttspec_ros.checks import is_integer
from ttspec_ros.model_update import MAX_MAGNITUDE, within_magnitude
from ttspec_ros.models.checkpoint import validate_thresholds
from ttspec_ros.models.revcol import ColumnState, RevCol

HEAD_PREFIX = "cls_blocks."


def reaches_threshold(confidence: Any, threshold: float) -> Any:
    """The exit rule: an early exit answers when its max softmax reaches the threshold, and
    threshold 1.0 means never. float32 softmax rounds to exactly 1.0 once the top logit leads
    by ~17, so with plain ``>=`` a user disabling early exits with 1.0 would still get some.
    Works elementwise on floats, numpy arrays and tensors.

    Tensors and numpy values compare in float64, as Python floats do: torch and numpy round
    a Python-float threshold to a float32 operand's dtype, so a probability of float32(0.9)
    (0.89999998) "reached" 0.9 in the batched curves and the guard but not in ``Cascade.run``.
    float64 holds every float32 exactly, so this keeps the rule "max prob >= threshold" on the
    probability's true value; rounding the threshold instead would let values below it exit."""
    if isinstance(confidence, Tensor):
        confidence = confidence.double()
    elif isinstance(confidence, np.ndarray | np.generic):
        confidence = np.asarray(confidence, dtype=np.float64)
    return (confidence >= threshold) & (threshold < 1.0)


class NonFiniteOutput(RuntimeError):
    """An exit's logits held NaN or inf: the frame has no answer."""


@runtime_checkable
class StagedBackbone(Protocol):
    """A backbone run one exit at a time. Stage 0 takes the image tensor (1, C, H, W); later
    stages take the carry the previous stage returned (its content is the backend's business).
    Every stage returns (carry, pooled head input of that exit, a (1, C3) float32 tensor); the
    last stage's carry is None, since nothing follows it (exported graphs do not output it)."""

    num_exits: int

    def run_stage(self, i: int, carry: Any) -> tuple[Any, Tensor]: ...


class TorchBackbone:
    """The torch implementation: the carry is (stem output, column state c0..c3)."""

    def __init__(self, model: RevCol) -> None:
        self.model = model
        self.num_exits = model.num_exits

    def run_stage(self, i: int, carry: Any) -> tuple[Any, Tensor]:
        if i == 0:
            x = self.model.stem(carry.to(self.model.stem[0].weight.device))
            state: ColumnState = (0.0, 0.0, 0.0, 0.0)
        else:
            x, state = carry
        state = self.model.run_exit(i, x, state)
        carry = None if i == self.num_exits - 1 else (x, state)
        return carry, self.model.pool(state[3])


@dataclass
class CascadeResult:
    class_id: int
    confidence: float  # max softmax probability of the answering exit
    exit_index: int
    exit_confidences: list[float]  # max softmax of every evaluated exit, in order
    features: list[Tensor] = field(repr=False)  # pooled head input (C3,) of each evaluated exit
    latency_ms: float  # from the first stage to the answer (lock wait excluded)
    logits: Tensor = field(repr=False)  # (num_classes,) of the answering exit
    model_version: int = 0  # update version the frame ran with


class Cascade:
    """Batch-1 early-exit classifier. ``thresholds``: one value in [0, 1] per exit but the
    last (or one float for all). ``backbone`` defaults to ``TorchBackbone(model)``; the heads
    always come from ``model``."""

    def __init__(self, model: RevCol, thresholds: float | Sequence[float],
                 num_threads: int | None = None, *,
                 backbone: StagedBackbone | None = None, model_id: str = "") -> None:
        self.model = model.eval()
        self.num_exits = model.num_exits
        self.thresholds = validate_thresholds(thresholds, self.num_exits)
        self.backbone = backbone if backbone is not None else TorchBackbone(model)
        if self.backbone.num_exits != self.num_exits:
            raise ValueError(f"backbone has {self.backbone.num_exits} exits, the model's heads "
                             f"{self.num_exits}")
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)  # process-wide: torch has no per-model setting
        self.model_id = model_id
        self.version = 0
        self._lock = threading.Lock()
        # Tensors an update may replace, by state-dict name (parameters and buffers).
        self._targets: dict[str, Tensor] = dict(model.named_parameters())
        self._targets.update(model.named_buffers())
        # The model's own values of the tensors updates replaced: an update is the adapter's
        # whole adapted state, so what a later one leaves out goes back to these.
        self._originals: dict[str, Tensor] = {}

    @property
    def torch_backbone(self) -> bool:
        return isinstance(self.backbone, TorchBackbone) and self.backbone.model is self.model

    def head_tensor_names(self) -> list[str]:
        return [n for n in self._targets if n.startswith(HEAD_PREFIX)]

    def updatable_tensor_names(self) -> list[str]:
        """Every tensor on the torch backend; only the heads on backends running fixed graphs."""
        return list(self._targets) if self.torch_backbone else self.head_tensor_names()

    # -- inference ------------------------------------------------------------------------
    def _image(self, image: Tensor | np.ndarray) -> Tensor:
        x = torch.as_tensor(image)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"image must be (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
        in_chans = self.model.config.in_chans
        if x.shape[1] != in_chans:
            raise ValueError(f"image has {x.shape[1]} channels, the model takes {in_chans}")
        if not x.is_floating_point():
            raise ValueError(f"image must be a float tensor (preprocessed), got {x.dtype}")
        return x.to(torch.float32)

    def _last_exit(self, max_exit: int | None, force_exit: int | None) -> int:
        for name, value in (("max_exit", max_exit), ("force_exit", force_exit)):
            if value is not None and not 0 <= value < self.num_exits:
                raise ValueError(f"{name} must be in 0..{self.num_exits - 1}, got {value}")
        if max_exit is not None and force_exit is not None:
            raise ValueError("give max_exit or force_exit, not both")
        if force_exit is not None:
            return force_exit
        return self.num_exits - 1 if max_exit is None else max_exit

    def run(self, image: Tensor | np.ndarray, *,
            thresholds: float | Sequence[float] | None = None, max_exit: int | None = None,
            force_exit: int | None = None) -> CascadeResult:
        """Classify one preprocessed image. ``thresholds`` overrides the defaults for this
        frame; ``max_exit`` answers there at the latest; ``force_exit`` ignores thresholds and
        answers at that exit (benchmarks)."""
        th = self.thresholds if thresholds is None else validate_thresholds(
            thresholds, self.num_exits)
        last = self._last_exit(max_exit, force_exit)
        x = self._image(image)
        confidences: list[float] = []
        features: list[Tensor] = []
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            carry: Any = x
            for i in range(last + 1):
                carry, pooled = self.backbone.run_stage(i, carry)
                # Heads run where the model's parameters are, whatever the backbone's device.
                pooled = pooled.to(self.model.head_device(i))
                logits = self.model.head(i, pooled)[0]
                if not torch.isfinite(logits).all():
                    # NaN never reaches a threshold and its argmax is class 0: no answer at
                    # all is better than a made-up one (an fp16 engine can overflow).
                    raise NonFiniteOutput(f"exit {i} produced non-finite logits")
                confidence, class_id = torch.softmax(logits, dim=0).max(dim=0)
                confidences.append(float(confidence))
                features.append(pooled[0])
                if force_exit is None and i < last and reaches_threshold(confidences[-1], th[i]):
                    break
            latency_ms = (time.perf_counter() - start) * 1e3
            version = self.version
        # Inference tensors cannot enter autograd later (adaptation trains on features):
        # clone outside inference mode into ordinary tensors.
        return CascadeResult(
            class_id=int(class_id), confidence=confidences[-1], exit_index=len(confidences) - 1,
            exit_confidences=confidences, features=[f.clone() for f in features],
            latency_ms=latency_ms, logits=logits.clone(), model_version=version,
        )

    # -- updates ----------------------------------------------------------------------------
    def apply_update(self, tensors: Mapping[str, np.ndarray | Tensor], version: int
                     ) -> list[str]:
        """Replace the named tensors (state-dict names) between two frames. Every name must
        exist and be updatable on this backend, shapes must match and values be finite and
        within +-MAX_MAGNITUDE; otherwise ValueError naming the tensor, and nothing changes.

        An update is the whole adapted state: tensors an earlier update replaced that this
        one leaves out go back to the model's own values (an adapter restarted with strategy
        ``specialize`` after ``ttt_online`` sends heads only; its classifier used to keep the
        adapted backbone, also through the adapter's reset). -> the names put back."""
        if not is_integer(version) or version < 0:
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        updatable = set(self.updatable_tensor_names())
        prepared: list[tuple[str, Tensor]] = []
        for name, value in tensors.items():
            if name not in self._targets:
                raise ValueError(f"update names unknown tensor {name!r}")
            if name not in updatable:
                raise ValueError(
                    f"update names {name!r}, but this cascade's backbone runs a fixed graph: "
                    "only head tensors (cls_blocks.*) can change"
                )
            target = self._targets[name]
            src = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
            src = src.detach().to(dtype=target.dtype, device=target.device)
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(f"update tensor {name!r} has shape {tuple(src.shape)}, "
                                 f"the model's is {tuple(target.shape)}")
            # numpy's min/max: torch.isfinite took half of an update's time (1.9 M values)
            if not within_magnitude([src]):
                raise ValueError(f"update tensor {name!r} has non-finite values or values "
                                 f"beyond +-{MAX_MAGNITUDE:g}")
            prepared.append((name, src.clone()))
        restored = [n for n in self._originals if n not in tensors]
        with self._lock, torch.no_grad():
            for name, src in prepared:
                target = self._targets[name]
                if name not in self._originals:
                    self._originals[name] = target.detach().clone()
                target.copy_(src)
            for name in restored:
                self._targets[name].copy_(self._originals.pop(name))
            self.version = int(version)
        return restored


def exit_costs(model: RevCol, image_size: int | tuple[int, int]) -> list[float]:
    """Each exit's cumulative share of the compute of running the cascade to the last exit
    (stem, columns and heads evaluated so far), counted as multiply-accumulates of every
    convolution and linear layer (deterministic, unlike timing; elementwise work is left
    out, as FLOP counters do). Last = 1.0."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(model.parameters())
    x = torch.zeros(1, model.config.in_chans, h, w, dtype=param.dtype, device=param.device)
    macs = [0]

    def count(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            macs[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.Linear):  # the only other kind hooked below
            macs[0] += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    backbone = TorchBackbone(model)
    per_exit: list[int] = []
    carry: Any = x
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(model.num_exits):
                macs[0] = 0
                carry, pooled = backbone.run_stage(i, carry)
                model.head(i, pooled)
                per_exit.append(macs[0])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    cumulative = np.cumsum(per_exit) / sum(per_exit)
    return [float(c) for c in cumulative[:-1]] + [1.0]


__all__ = ["Cascade", "CascadeResult", "StagedBackbone", "TorchBackbone", "exit_costs"]
