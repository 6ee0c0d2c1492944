"""Test-time training (TTT) of a RevCol's encoder with masked reconstruction (or Tent entropy).

Two modes, as in TTT-MAE (Gandelsman et al. 2022) and online TTT (Wang et al. 2023):

- ``episodic`` (standard TTT): for each image, ``steps`` optimizer steps on a batch of ``batch``
  differently masked copies of it, predict, then reset to the starting parameters.
- ``online``: ``steps`` (normally one) step(s) per image, parameters kept from image to image.

The self-supervised loss is the model's own reconstruction branch: random patch masking and the
masked-patch loss of ``ttspec_ros.masking`` (the functions the demo model's decoders were
trained with), averaged over the decoders after exits 0..2. ``objective="entropy"`` instead
minimises the mean prediction entropy of the exits (Tent, Wang et al. 2021) for comparison.

What is updated (``update``): ``norm`` = LayerNorm affine parameters of the encoder, ``columns``
= every parameter of the stem and the first ``columns`` columns, ``encoder`` = stem and all
columns. Only columns the loss reaches are included (the reconstruction decoders read the
columns up to exit 2, so the last exit's column(s) get no gradient from it). Heads and
decoders never change.

Thread safety: every method that reads or writes the adapted parameters holds one lock, so a
node can adapt in a background thread while another thread calls ``export_update`` and gets a
consistent snapshot (a ``ModelUpdatePayload`` named with the model's state-dict names).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ttspec_ros.checks import MAX_SEED, is_integer, is_real
from ttspec_ros.masking import DEFAULT_MASK_RATIO, masked_reconstruction_loss, random_patch_mask
from ttspec_ros.model_update import (
    MAX_SAVED_VERSION,
    ModelUpdatePayload,
    all_finite,
    load_payload,
    save_payload,
)
from ttspec_ros.models.checkpoint import ModelCard
from ttspec_ros.models.revcol import INPUT_MULTIPLE, ChannelsFirstLayerNorm, ColumnState, RevCol

MODES = ("episodic", "online")
UPDATES = ("norm", "columns", "encoder")
OPTIMIZERS = ("sgd", "adamw")
OBJECTIVES = ("mae", "entropy")
_IMAGE_FAULT = "the image's own loss is not finite"
STATE_FILE = "ttt.safetensors"  # in a node's state_dir, beside the specializer's state


@dataclass(frozen=True)
class TTTConfig:
    mode: str = "online"
    update: str = "norm"
    columns: int = 1  # used by update="columns"
    optimizer: str = "sgd"
    lr: float = 3e-2  # online; chosen on deployment-pool streams (ttt_experiment.Options)
    steps: int = 1  # optimizer steps per image
    batch: int = 8  # masked copies of the image per step (mae objective)
    mask_ratio: float = DEFAULT_MASK_RATIO
    momentum: float = 0.9  # SGD
    weight_decay: float = 0.0
    anchor: float = 0.0  # adds anchor * sum((p - p_start)^2): keeps online drift bounded
    objective: str = "mae"
    seed: int = 0  # masks
    # Reconstruction target normalised per patch (MAE's norm_pix_loss). The decoders answer
    # the target they were trained for, so take it from the model card: ``card_norm_pix``.
    norm_pix: bool = False

    def __post_init__(self) -> None:
        for key, allowed in (("mode", MODES), ("update", UPDATES), ("optimizer", OPTIMIZERS),
                             ("objective", OBJECTIVES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"TTT {key} must be one of {allowed}, got {getattr(self, key)!r}")
        # From params files and JSON: true would pass as 1 and 1.5 as steps until range() fails.
        for key in ("columns", "steps", "batch", "seed"):
            value = getattr(self, key)
            if not is_integer(value):
                raise ValueError(f"TTT {key} must be an integer, got {value!r}")
        for key in ("lr", "mask_ratio", "momentum", "weight_decay", "anchor"):
            value = getattr(self, key)
            if not is_real(value):
                raise ValueError(f"TTT {key} must be a number, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TTT lr must be positive and finite, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"TTT seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.steps < 1 or self.batch < 1 or self.columns < 1:
            raise ValueError(
                f"TTT steps, batch and columns must be >= 1, got {self.steps}, {self.batch}, "
                f"{self.columns}"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"TTT mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not (0 <= self.weight_decay < math.inf and 0 <= self.anchor < math.inf
                and 0 <= self.momentum < 1):  # NaN fails every comparison
            raise ValueError("TTT weight_decay and anchor must be finite and >= 0, momentum in "
                             f"[0, 1), got {self.weight_decay}, {self.anchor}, {self.momentum}")

    def to_dict(self) -> dict:
        return asdict(self)


def card_norm_pix(card: ModelCard) -> bool:
    """Whether the model's decoders were trained on per-patch normalised targets (the card's
    training config; cards without it mean plain pixels)."""
    config = (card.training or {}).get("config") or {}
    value = config.get("norm_pix", False) if isinstance(config, Mapping) else False
    if not isinstance(value, bool):  # bool("false") is True: the wrong target, silently
        raise ValueError(f"model card {card.model_id}: training.config.norm_pix must be true or "
                         f"false, got {value!r}")
    return value


def reachable_columns(model: RevCol, objective: str) -> range:
    """Columns whose parameters the objective's gradient reaches."""
    if objective == "mae":
        if model.decoder_blocks is None:
            raise ValueError("masked-reconstruction TTT needs a model with decoders")
        return range(len(model.decoder_blocks) * model.interval)
    return range(model.num_columns)


def select_parameters(model: RevCol, update: str, columns: int, objective: str) -> list[str]:
    """State-dict names of the parameters TTT changes (see the module docstring)."""
    reachable = reachable_columns(model, objective)
    if update == "columns":
        if columns > len(reachable):
            raise ValueError(
                f"update='columns' with columns={columns}, but the {objective} loss reaches only "
                f"the first {len(reachable)} of {model.num_columns} columns"
            )
        reachable = range(columns)
    prefixes = ["stem"] + [f"subnet{k}" for k in reachable]
    names = []
    for prefix in prefixes:
        module = model.get_submodule(prefix)
        if update == "norm":
            for mod_name, mod in module.named_modules():
                if isinstance(mod, (nn.LayerNorm, ChannelsFirstLayerNorm)):
                    full = f"{prefix}.{mod_name}" if mod_name else prefix
                    names += [f"{full}.{p}" for p, _ in mod.named_parameters(recurse=False)]
        else:
            names += [f"{prefix}.{p}" for p, _ in module.named_parameters()]
    return names


def entropy_loss(logits: list[Tensor]) -> Tensor:
    """Mean softmax entropy over the exits and the batch (Tent's objective)."""
    entropies = []
    for lg in logits:
        logp = lg.log_softmax(dim=1)
        entropies.append(-(logp.exp() * logp).sum(dim=1).mean())
    # The first entropy as sum's start: the same sum as from 0.0 (0.0 + e is e), and a Tensor
    # to the type checker (from 0.0 it could be the float of an empty list).
    return sum(entropies[1:], entropies[0]) / len(logits)


class TestTimeTrainer:
    """Adapts ``model`` in place (pass a copy if the original must stay untouched)."""

    __test__ = False  # not a pytest class

    def __init__(self, model: RevCol, config: TTTConfig, model_id: str = "") -> None:
        self.model = model
        self.config = config
        self.model_id = model_id
        self._lock = threading.RLock()
        model.eval()  # no drop-path during adaptation or prediction
        self.parameter_names = select_parameters(model, config.update, config.columns,
                                                 config.objective)
        all_params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        self._params = [all_params[n] for n in self.parameter_names]
        for p in self._params:
            p.requires_grad_(True)
        self._initial = [p.detach().clone() for p in self._params]
        self._verified = self._initial  # the last parameters known to give a finite loss
        self._generator = torch.Generator().manual_seed(config.seed)
        self._optimizer = self._new_optimizer()
        self._version = 0

    # -- internals -------------------------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(self._params, lr=c.lr, momentum=c.momentum,
                                   weight_decay=c.weight_decay)
        return torch.optim.AdamW(self._params, lr=c.lr, weight_decay=c.weight_decay)

    def _as_batch(self, image: Tensor) -> Tensor:
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected one image (C,H,W) or (1,C,H,W), got {tuple(image.shape)}")
        c, h, w = image.shape[1:]
        if c != self.model.config.in_chans:
            raise ValueError(f"image has {c} channels, the model takes "
                             f"{self.model.config.in_chans}")
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            # the decoders rebuild the input from the 1/32-scale features
            raise ValueError(f"image size {h}x{w} is not a multiple of {INPUT_MULTIPLE}, "
                             "which reconstruction needs")
        image = image.float()
        if not torch.isfinite(image).all():  # its loss would be NaN and undo good updates
            raise ValueError("image holds NaN or infinite values")
        return image

    def _mae_loss(self, image: Tensor) -> Tensor:
        target = image.expand(self.config.batch, -1, -1, -1)
        masked, mask = random_patch_mask(target, self.config.mask_ratio,
                                         generator=self._generator)
        m = self.model
        x = m.stem(masked)
        state: ColumnState = (0.0, 0.0, 0.0, 0.0)
        losses = []
        # present: the mae objective's reachable_columns refused a model without decoders
        for i, decoder in enumerate(m.require_decoders()):
            state = m.run_exit(i, x, state)
            losses.append(masked_reconstruction_loss(decoder(state[3]), target, mask,
                                                     norm_pix=self.config.norm_pix))
        return torch.stack(losses).mean()

    def loss(self, image: Tensor) -> Tensor:
        """The self-supervised loss of one image (a fresh random mask batch each call)."""
        image = self._as_batch(image)
        with self._lock:  # reads the parameters and draws masks from the shared generator
            if self.config.objective == "entropy":
                loss = entropy_loss(self.model.forward_exits(image))
            else:
                loss = self._mae_loss(image)
            if self.config.anchor > 0:
                drift = sum((p - p0).pow(2).sum() for p, p0 in zip(self._params, self._initial,
                                                                    strict=True))
                loss = loss + self.config.anchor * drift
            return loss

    # -- public API ------------------------------------------------------------------------
    @property
    def lock(self) -> threading.RLock:
        """Held by every method; hold it to make several calls one atomic step."""
        return self._lock

    @property
    def version(self) -> int:
        """Number of images adapted on since construction (online) — the export version."""
        return self._version

    def adapt(self, image: Tensor) -> float:
        """``steps`` optimizer steps on one image (normalised (C,H,W)); returns the last loss.

        A loss or a parameter that turns NaN or infinite raises FloatingPointError, and the
        parameters go back to the last ones that gave a finite loss, with a fresh optimizer:
        those from before this image, or from before an earlier image whose step left finite
        parameters too large for the next forward. Which of the two is told apart on the first
        step's loss: if this image's loss is not finite with the earlier parameters either,
        the image is at fault and only this image is undone (no step was taken, so the
        optimizer is kept). Undoing an earlier image is a change, so it is a new version;
        undoing only this image keeps the version."""
        image = self._as_batch(image)
        with self._lock:
            before = [p.detach().clone() for p in self._params]
            try:
                loss = self._steps(image, before)
            except FloatingPointError as e:
                restored, cause = self._last_good(image, before)
                # the image's own fault: no step was taken, so the optimizer state is good
                self._restore(restored, fresh_optimizer=cause != _IMAGE_FAULT)
                if restored is not before:
                    self._version += 1
                raise FloatingPointError(
                    f"{e} ({cause}); parameters restored to the last ones with a finite "
                    f"loss, version {self._version}") from None
            except BaseException:
                self._restore(before)
                raise
            self._version += 1
            return loss

    def _steps(self, image: Tensor, before: list[Tensor]) -> float:
        with torch.enable_grad():
            for step in range(self.config.steps):
                loss = self.loss(image)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"TTT loss is {loss.item()}")
                if step == 0:
                    self._verified = before  # these parameters gave a finite loss
                self._optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._optimizer.step()
        if not all_finite(self._params):
            raise FloatingPointError("a TTT step made parameters NaN or infinite")
        return float(loss.detach())

    def _last_good(self, image: Tensor, before: list[Tensor]) -> tuple[list[Tensor], str]:
        """After a non-finite loss or step on ``image``: the parameters to go back to, and why.

        A failure after the first step undoes this image (``_verified is before``). A first
        step that failed ran on parameters no image has checked yet (the last image's step
        made them): they are to blame unless the image fails with the checked ones too."""
        if self._verified is before:
            return before, f"lr {self.config.lr} too high?"
        if all(torch.equal(a, b) for a, b in zip(self._verified, before, strict=True)):
            return before, _IMAGE_FAULT
        self._restore(self._verified, fresh_optimizer=False)
        with torch.no_grad():
            if not torch.isfinite(self.loss(image)):
                return before, _IMAGE_FAULT
        return self._verified, f"the last image's step made them too large (lr {self.config.lr})"

    def _restore(self, params: list[Tensor], fresh_optimizer: bool = True) -> None:
        with torch.no_grad():
            for p, p0 in zip(self._params, params, strict=True):
                p.copy_(p0)
        if fresh_optimizer:
            self._optimizer = self._new_optimizer()  # its momentum holds what broke them

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[Tensor]:
        """Logits of every exit for a batch (N,C,H,W) or one image, with the current params."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        with self._lock:
            return self.model.forward_exits(images.float())

    def reset(self) -> None:
        """Back to the starting parameters, with a fresh optimizer state and the mask generator
        at its seed again: an episodic image's result then depends on that image and the
        config alone, not on which images came before it."""
        with self._lock:
            self._restore(self._initial)
            self._verified = self._initial
            self._generator.manual_seed(self.config.seed)

    def adapt_and_predict(self, image: Tensor) -> list[Tensor]:
        """Per the mode: episodic = adapt, predict, reset; online = adapt (kept), predict."""
        with self._lock:
            if self.config.mode == "episodic":
                self.reset()
            self.adapt(image)
            logits = self.predict(image)
            if self.config.mode == "episodic":
                self.reset()
            return logits

    def export_tensors(self, changed_only: bool = False) -> dict[str, Tensor]:
        """Copies of the adapted parameters by state-dict name (a consistent snapshot).

        ``changed_only`` leaves out tensors still equal to their starting value."""
        with self._lock:
            out = {}
            for name, p, p0 in zip(self.parameter_names, self._params, self._initial, strict=True):
                if changed_only and torch.equal(p.detach(), p0):
                    continue
                out[name] = p.detach().clone()
            return out

    def export_update(self, version: int | None = None) -> ModelUpdatePayload:
        """The adapted tensors as a ``ModelUpdatePayload`` (version: default ``self.version``)."""
        with self._lock:  # the payload copies the parameters: a snapshot under the lock
            tensors = {n: p.detach() for n, p in zip(self.parameter_names, self._params,
                                                     strict=True)}
            return ModelUpdatePayload(
                model_id=self.model_id,
                version=self._version if version is None else version,
                tensors=tensors,
            )

    # -- persistence (online mode: what a restarted node resumes from) ------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the adapted tensors and the version to ``directory/ttt.safetensors``
        atomically. The optimizer's momentum is not kept: a resumed run starts it afresh."""
        return save_payload(self.export_update(), Path(directory) / STATE_FILE)

    def load(self, directory: str | os.PathLike) -> None:
        """Restore what ``save`` wrote. Refuses (ValueError, nothing changed) a state of another
        model or of another set of tensors (a different ``update`` or ``columns``)."""
        path = Path(directory) / STATE_FILE
        payload = load_payload(path)
        if payload.model_id != self.model_id:
            raise ValueError(f"{path} is for model {payload.model_id!r}; this trainer adapts "
                             f"{self.model_id!r}")
        missing = sorted(set(self.parameter_names) - set(payload.tensors))
        extra = sorted(set(payload.tensors) - set(self.parameter_names))
        if missing or extra:
            raise ValueError(f"{path} holds other tensors than update={self.config.update!r} "
                             f"adapts (missing {missing[:3]}, unexpected {extra[:3]})")
        if payload.version > MAX_SAVED_VERSION:
            raise ValueError(f"{path}: version {payload.version} is above 2**62 (corrupt)")
        for name, p in zip(self.parameter_names, self._params, strict=True):
            if tuple(payload.tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"{path}: {name} has shape {payload.tensors[name].shape}, "
                                 f"the model's is {tuple(p.shape)}")
        with self._lock:
            loaded = [torch.from_numpy(payload.tensors[n]) for n in self.parameter_names]
            self._restore(loaded)
            self._verified = loaded
            # Never back in version, and a change is a new version (as in Specializer.load).
            self._version = max(self._version + 1, payload.version)


__all__ = [
    "TTTConfig", "TestTimeTrainer", "select_parameters", "reachable_columns", "entropy_loss",
    "MODES", "UPDATES", "OPTIMIZERS", "OBJECTIVES",
]
