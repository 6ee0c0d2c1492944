"""Loading and saving RevCol weights: official checkpoints and our safetensors + model card.

Two formats:
- **Ours**: ``<stem>.safetensors`` (tensors) + ``<stem>.json`` (a ModelCard: architecture,
  class names, input spec, default thresholds, exit costs, training provenance, metrics).
  Written atomically by ``save_model``; ``load_model(None)`` loads the bundled demo model.
- **Official** RevCol checkpoints (``.pth``): a raw state dict, or a training checkpoint dict
  holding ``model`` and usually ``state_dict_ema``. The architecture is read off the tensors.

Pickled files are never unpickled freely. ``torch.load(weights_only=True)`` is tried first; the
official training checkpoints also hold a yacs config node and other non-tensor objects, which
it refuses, so those go through a restricted unpickler: tensors and plain containers are
rebuilt, every other global (classes, functions) becomes an inert ``ForeignObject`` that
records what was pickled and never calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, SupportsFloat, TypedDict, cast

import torch
from torch import Tensor

from ttspec_ros.checks import is_real, real_numbers
from ttspec_ros.files import atomic_write_bytes, json_bytes
from ttspec_ros.models.paths import (
    DEMO_STEM,
    SAFETENSORS_SUFFIX,
    is_our_format,
    model_files,
)
from ttspec_ros.models.revcol import (
    INPUT_MULTIPLE,
    NUM_EXITS,
    STEM_PATCH,
    RevCol,
    RevColConfig,
    check_architecture,
)
from ttspec_ros.preprocess import check_input_spec

MODEL_ID_HEX = 12  # model ids are the first 12 hex digits of the weights file's sha256
DEFAULT_THRESHOLD = 0.9  # early-exit threshold for checkpoints that come without a card


class _InputSpec(TypedDict):
    """A model card's ``input`` (``preprocess.check_input_spec``)."""

    channels: int
    size: int
    content_size: int
    mean: list[float]
    std: list[float]


IMAGENET_INPUT: _InputSpec = {
    "channels": 3, "size": 224, "content_size": 224,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
}
DECODER_PREFIX = "decoder_blocks."


# -- model card ---------------------------------------------------------------------------
@dataclasses.dataclass
class ModelCard:
    """What a consumer needs besides the tensors (stored as ``<stem>.json``)."""

    model_id: str
    architecture: dict  # RevColConfig.to_dict()
    class_names: list[str]
    input: dict  # channels, size, content_size, mean, std
    thresholds: list[float]  # default early-exit thresholds, one per exit but the last
    exit_cost: list[float]  # cumulative share of the full forward's compute, last = 1.0
    training: dict = dataclasses.field(default_factory=dict)  # seed, data, splits, ...
    metrics: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "model card") -> ModelCard:
        fields = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        card = cls(**{k: d[k] for k in fields if k in d})
        card.validate(source)
        return card

    @property
    def config(self) -> RevColConfig:
        return RevColConfig.from_dict(self.architecture)

    def validate(self, source: str = "model card") -> None:
        """Internal consistency; raises ValueError saying which field is wrong and why."""
        try:
            self._validate(source)
        except (TypeError, AttributeError, OverflowError) as e:
            # e.g. "channels": null, a list for a dict, a 400-digit integer for a float
            raise ValueError(f"{source}: a field has the wrong type ({e})") from e

    def _validate(self, source: str) -> None:
        if not isinstance(self.model_id, str):
            raise ValueError(f"{source}: model_id must be a string, got {self.model_id!r}")
        for key in ("architecture", "input", "training", "metrics"):
            if not isinstance(getattr(self, key), Mapping):  # read with .get() by consumers
                raise ValueError(f"{source}: {key} must be an object, got "
                                 f"{getattr(self, key)!r:.80}")
        try:
            config = self.config
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: architecture is incomplete or malformed ({e})") from e
        try:  # what RevCol would refuse, before any tensor is made
            check_architecture(config.channels, config.layers, config.num_columns,
                               config.num_classes, config.kernel_size, config.in_chans,
                               config.drop_path, config.stem_kernel, config.stem_width)
        except ValueError as e:
            raise ValueError(f"{source}: architecture: {e}") from e
        # Published as each prediction's class_name (a string field): a string here would be
        # read one character per class, a number would fail every frame.
        if not isinstance(self.class_names, (list, tuple)) \
                or not all(isinstance(n, str) for n in self.class_names):
            raise ValueError(f"{source}: class_names has the wrong type: need a list of "
                             f"strings, got {self.class_names!r:.80}")
        if len(self.class_names) != config.num_classes:
            raise ValueError(
                f"{source}: {len(self.class_names)} class_names for a model with "
                f"{config.num_classes} classes"
            )
        try:
            check_input_spec(self.input)  # what every consumer's preprocessing will need
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        if self.input["size"] % INPUT_MULTIPLE:
            raise ValueError(f"{source}: input.size={self.input['size']} is not a multiple of "
                             f"{INPUT_MULTIPLE} (the stem and three 2x downsamplings)")
        if int(self.input["channels"]) != config.in_chans:
            raise ValueError(
                f"{source}: input.channels={self.input['channels']} but the architecture takes "
                f"{config.in_chans} input channels"
            )
        for key in ("mean", "std"):
            if len(real_numbers(self.input[key], f"{source}: input.{key}")) != config.in_chans:
                raise ValueError(f"{source}: input.{key} needs {config.in_chans} values")
        # One value per early exit from here on (a card may hold one number for all).
        self.thresholds = validate_thresholds(self.thresholds, NUM_EXITS,
                                              source=f"{source}: thresholds")
        costs = real_numbers(self.exit_cost, f"{source}: exit_cost")
        # Cumulative shares: every one in (0, 1], none smaller than the one before (NaN fails).
        if (len(costs) != NUM_EXITS or abs(costs[-1] - 1.0) > 1e-6
                or not all(0.0 < a <= b <= 1.0 + 1e-6 for a, b in pairwise(costs))):
            raise ValueError(
                f"{source}: exit_cost needs {NUM_EXITS} non-decreasing cumulative shares in "
                f"(0, 1] ending at 1.0, got {self.exit_cost}"
            )
        self.exit_cost = costs  # floats, as every consumer computes with them


def validate_thresholds(thresholds: float | Sequence[float], num_exits: int,
                        source: str = "thresholds") -> list[float]:
    """A number (same for every early exit) or one value in [0, 1] per exit but the last."""
    # cast: is_real says it is a numbers.Real, and every Real has __float__
    values = ([float(cast(SupportsFloat, thresholds))] * (num_exits - 1) if is_real(thresholds)
              else real_numbers(thresholds, source))
    if len(values) != num_exits - 1:
        raise ValueError(
            f"{source}: need {num_exits - 1} values (one per exit but the last, which always "
            f"answers), got {len(values)}"
        )
    bad = [t for t in values if not 0.0 <= t <= 1.0]  # also refuses NaN
    if bad:
        raise ValueError(f"{source}: every threshold must lie in [0, 1], got {values}")
    return values


# -- restricted unpickling ----------------------------------------------------------------
class ForeignObject(dict):
    """Stands in for any pickled global outside the allow-list; calling or building it only
    records its arguments. A dict so that pickled dict subclasses (yacs CfgNode) keep their
    items readable."""

    pickled_global: str  # "module.name", a class attribute of each subclass (_inert_global)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:  # pickled list subclasses
        self.setdefault("<items>", []).append(item)

    def extend(self, items: Any) -> None:
        self.setdefault("<items>", []).extend(items)

    def __call__(self, *args: Any, **kwargs: Any) -> ForeignObject:
        # Pickles call what they built (e.g. getattr(cls, "method")(...)): stay inert.
        return _inert_global(self.pickled_global, "<call>")(*args)

    def __repr__(self) -> str:
        return f"<ForeignObject {self.pickled_global}>"


def _inert_global(module: str, name: str) -> type:
    return type("ForeignObject", (ForeignObject,), {"pickled_global": f"{module}.{name}"})


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any,
                    *_ignored: Any) -> Tensor:
    # Stands in for torch._utils._rebuild_tensor_v2; drops backward hooks and metadata.
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("tensor record without a tensor storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Tensor:
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("parameter record without tensor data")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; everything else becomes an inert ForeignObject.
    (torch.load's wrapper resolves storage types itself before asking us.)"""

    def find_class(self, module: str, name: str) -> Any:
        return _ALLOWED_GLOBALS.get((module, name)) or _inert_global(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a pickle *module*; this one only has the restricted pieces.
restricted_pickle = types.ModuleType("ttspec_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.__name__ = "ttspec_restricted_pickle"


def read_pickled_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickle a torch checkpoint without executing pickled code (see module docstring)."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # only looks for the end-of-archive record
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt zip "
                             f"archive: {e})") from e
        if any(n.endswith("/constants.pkl") for n in names):
            raise ValueError(f"{path}: a TorchScript archive, not a checkpoint of weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # non-tensor objects inside: take the restricted path below
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=restricted_pickle)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e


# -- state dicts ----------------------------------------------------------------------------
def _describe(obj: Any) -> str:
    if isinstance(obj, ForeignObject):
        return f"a pickled {obj.pickled_global} (not loaded)"
    return f"a {type(obj).__name__}" + (" (empty)" if isinstance(obj, Mapping) else "")


def extract_state_dict(obj: Any, use_ema: bool = False, source: str = "checkpoint", *,
                       require_ema: bool = False) -> tuple[dict[str, Tensor], str | None]:
    """The state dict inside a loaded checkpoint and the entry it came from: the object itself
    (entry None) if it maps names to tensors, else its ``model`` entry (default) or, with
    ``use_ema``, its ``state_dict_ema`` entry when present. When only one of the two is there,
    that one is used, with a warning if it is not the one asked for; ``require_ema`` (implies
    ``use_ema``) refuses instead a checkpoint without ``state_dict_ema``."""
    if not isinstance(obj, Mapping) or isinstance(obj, ForeignObject):
        raise ValueError(f"{source}: holds {_describe(obj)}, not a state dict")
    use_ema = use_ema or require_ema
    key: str | None = None  # obj itself
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        if require_ema:
            raise ValueError(f"{source}: holds no state_dict_ema weights (a plain state dict)")
        state = obj
    else:
        key = "model"
        if use_ema:
            if "state_dict_ema" in obj:
                key = "state_dict_ema"
            elif require_ema:
                raise ValueError(f"{source}: holds no state_dict_ema weights (top-level keys: "
                                 f"{', '.join(map(str, list(obj)[:8]))})")
            else:
                warnings.warn(f"{source}: no state_dict_ema entry; using 'model'", stacklevel=2)
        elif "model" not in obj and "state_dict_ema" in obj:  # a release of the EMA weights only
            key = "state_dict_ema"
            warnings.warn(f"{source}: no 'model' entry; using state_dict_ema", stacklevel=2)
        if key not in obj:
            raise ValueError(
                f"{source}: neither a state dict nor a checkpoint with a {key!r} state dict "
                f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})"
            )
        state = obj[key]
        if not isinstance(state, Mapping) or isinstance(state, ForeignObject) or not state:
            raise ValueError(f"{source}: {key!r} holds {_describe(state)}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: state dict entry {not_tensors[0]!r} is not a tensor")
    not_names = [k for k in state if not isinstance(k, str)]
    if not_names:
        raise ValueError(f"{source}: state dict key {not_names[0]!r} is not a tensor name")
    for k, v in state.items():
        _check_plain_tensor(k, v, source)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state), key


def _tensor_kind(t: Tensor) -> str | None:
    """What makes ``t`` other than a dense CPU tensor of plain values, or None."""
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.device.type != "cpu":  # map_location="cpu" moves all but meta tensors (no data)
        return f"a {t.device.type} tensor"
    if t.is_quantized:
        return f"a quantized {t.dtype} tensor"
    return None


def _check_plain_tensor(key: str, t: Tensor, source: str) -> None:
    """Refuse what the checks and load_state_dict cannot take as data: other layouts and
    devices, quantized values (all failed with raw torch errors, or were cast), and views
    whose storage is smaller than their shape (stride 0, ``expand``: a 4-byte storage
    claiming a million values would be allocated in full by the model)."""
    kind = _tensor_kind(t)
    if kind is not None:
        raise ValueError(f"{source}: tensor {key} is {kind}; only dense (strided), "
                         "non-quantized CPU tensors can be loaded")
    claimed, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if held < claimed:
        raise ValueError(f"{source}: tensor {key} of shape {_shape(t)} claims {claimed} bytes "
                         f"but its storage holds {held} (overlapping strides, e.g. expand())")


def _dim(state: Mapping[str, Tensor], key: str, ndim: int, dim: int, source: str) -> int:
    """Size ``dim`` of ``state[key]``, which must have ``ndim`` dimensions."""
    t = state[key]
    if t.ndim != ndim:
        raise ValueError(f"{source}: tensor {key} has shape {_shape(t)}, but RevCol's has "
                         f"{ndim} dimensions")
    return int(t.shape[dim])


def infer_config(state: Mapping[str, Tensor], source: str = "state dict") -> RevColConfig:
    """The RevCol architecture a state dict was saved from (drop_path is not recorded)."""
    try:
        channels = tuple(_dim(state, f"subnet0.alpha{i}", 4, 1, source) for i in range(4))
        # One tensor decides each level's width, and the model built from it can be GBs:
        # a second tensor of the level must agree before anything is built.
        for i, c in enumerate(channels):
            block = f"subnet0.level{i}.blocks.0.dwconv.weight"
            if block in state and (b := _dim(state, block, 4, 0, source)) != c:
                raise ValueError(
                    f"{source}: the tensors disagree on level {i}'s channel count: "
                    f"subnet0.alpha{i} {_shape(state[f'subnet0.alpha{i}'])} says {c}, {block} "
                    f"{_shape(state[block])} says {b}")
        layers = tuple(
            len({m.group(1) for k in state
                 if (m := re.match(rf"subnet0\.level{lv}\.blocks\.(\d+)\.", k))})
            for lv in range(4)
        )
        num_columns = len({m.group(1) for k in state if (m := re.match(r"subnet(\d+)\.", k))})
        num_classes = _dim(state, "cls_blocks.0.classifier.1.weight", 2, 0, source)
        kernel_size = _dim(state, "subnet0.level0.blocks.0.dwconv.weight", 4, 3, source)
        in_chans = _dim(state, "stem.0.weight", 4, 1, source)
        # The conv stem (stem_width > 0) has a second conv at stem.3; the official one not.
        conv_stem = "stem.3.weight" in state
        stem_width = _dim(state, "stem.0.weight", 4, 0, source) if conv_stem else 0
        stem_kernel = STEM_PATCH if conv_stem else _dim(state, "stem.0.weight", 4, 2, source)
    except KeyError as e:
        raise ValueError(
            f"{source}: not a RevCol state dict with intermediate heads (no tensor {e})"
        ) from e
    return RevColConfig(
        channels=channels, layers=layers, num_columns=num_columns, num_classes=num_classes,
        kernel_size=kernel_size, in_chans=in_chans, stem_kernel=stem_kernel,
        stem_width=stem_width, with_decoders=any(k.startswith(DECODER_PREFIX) for k in state),
    )


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _as_model_dtype(value: Tensor, expected: Tensor) -> Tensor:
    return value.to(expected.dtype) if expected.is_floating_point() else value


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor],
                     source: str = "state dict", show: int = 5) -> None:
    """Raise ValueError naming the first missing, unexpected, wrongly shaped, wrongly typed
    (integer where the model holds floats) and non-finite keys (in the model's dtype).
    ``model`` may be on the meta device: only its tensors' shapes and dtypes are read."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    common = [k for k in expected if k in state]
    wrong = [f"{k} {_shape(state[k])} (model: {_shape(expected[k])})"
             for k in common if state[k].shape != expected[k].shape]
    # load_state_dict would silently cast an integer tensor into a float parameter.
    wrong_type = [f"{k} {state[k].dtype}" for k in common
                  if expected[k].is_floating_point() and not state[k].is_floating_point()]
    # Checked as load_state_dict will store them: float64 1e300 is finite, float32 inf.
    non_finite = [k if state[k].dtype == expected[k].dtype
                  else f"{k} (once cast from {state[k].dtype} to {expected[k].dtype})"
                  for k in common if state[k].is_floating_point()
                  and not bool(torch.isfinite(_as_model_dtype(state[k], expected[k])).all())]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", wrong), ("not floating point", wrong_type),
                        ("NaN or infinite values", non_finite)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            problems.append(f"{label}: {', '.join(keys[:show])}{more}")
    if problems:
        raise ValueError(f"{source} does not match the model; " + "; ".join(problems))


def build_from_state_dict(state: Mapping[str, Tensor], config: RevColConfig | None = None,
                          with_decoders: bool | None = None, source: str = "state dict"
                          ) -> RevCol:
    """A RevCol in eval mode holding ``state`` (strict; checked by ``check_state_dict`` before
    the model is allocated). ``with_decoders=False`` drops decoder tensors; ``None`` keeps
    whatever the state dict has."""
    has_decoders = any(k.startswith(DECODER_PREFIX) for k in state)
    if with_decoders is None:
        with_decoders = has_decoders
    if with_decoders and not has_decoders:
        raise ValueError(f"{source}: decoders requested but the file holds no decoder tensors")
    if not with_decoders:
        state = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIX)}
    config = config or infer_config(state, source)
    kwargs = config.to_dict()
    kwargs["with_decoders"] = with_decoders
    # Built without storage and checked first: a wrong config (one bad tensor, or a card)
    # would otherwise allocate a model of any size before being refused. Storage comes after
    # (uninitialised: the strict load fills every tensor; RevCol holds no other state), which
    # also skips the random initialisation the load would overwrite.
    with torch.device("meta"):
        model = RevCol(**kwargs)
    check_state_dict(model, state, source)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


# -- our format -----------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """Model id of a weights file: first 12 hex digits of its sha256."""
    return file_sha256(path)[:MODEL_ID_HEX]


def _is_hash_id(model_id: str) -> bool:
    """Whether a model id has the form save_model gives it (a weights hash)."""
    return re.fullmatch(rf"[0-9a-f]{{{MODEL_ID_HEX}}}", model_id) is not None


def save_model(model: RevCol, card: ModelCard, path_stem: str | os.PathLike) -> ModelCard:
    """Write ``<stem>.safetensors`` and ``<stem>.json``; returns the card as written
    (architecture from the model; model_id = hash of the weights file unless the card names
    a model id of its own; a hash-like id, e.g. of the weights this model was loaded from, is
    recomputed).

    The card is validated and serialised before anything is written, then the weights go
    through ``atomic_write_bytes`` (temporary file, fsync, rename) before the card, so readers
    never see a partial file, a refused card (or one that is not JSON-serialisable) leaves the
    old pair untouched, and a crash between the two renames leaves new weights beside an old
    card, which ``load_model`` refuses because the card's id is not the weights' hash (for
    hash ids only: a card naming a model id of its own cannot tell, and only a different
    architecture is refused)."""
    from safetensors.torch import save

    weights, card_path = model_files(path_stem)
    card = dataclasses.replace(card, architecture=model.config.to_dict())
    card.validate(f"model card for {weights}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    if not card.model_id or _is_hash_id(card.model_id):
        card = dataclasses.replace(card, model_id=hashlib.sha256(blob).hexdigest()[:MODEL_ID_HEX])
    try:
        # NaN stays allowed: read_card's json.loads reads it, and a diverged run's losses in
        # training.history are NaN.
        card_bytes = json_bytes(card.to_dict())
    except (TypeError, ValueError) as e:  # e.g. numpy scalars in metrics
        raise ValueError(f"model card for {weights}: not JSON-serialisable ({e})") from e
    atomic_write_bytes(weights, blob)
    atomic_write_bytes(card_path, card_bytes)
    return card


def existing_model_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """``model_files(path)``, or FileNotFoundError unless both are files."""
    weights, card_path = model_files(path)
    for p in (weights, card_path):
        if not p.is_file():  # a directory of that name too: it read as IsADirectoryError
            raise FileNotFoundError(f"{p} not found as a file (our format needs "
                                    f"{weights.name} and {card_path.name} side by side)")
    return weights, card_path


def read_card(path: str | os.PathLike) -> ModelCard:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: model card is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: model card must be a JSON object")
    return ModelCard.from_dict(data, source=str(path))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """The tensors of a safetensors file and the model id (``file_hash``) of the same bytes:
    read once, so the id names what was loaded even if the file is replaced meanwhile."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = Path(path).read_bytes()  # FileNotFoundError as it is
    try:
        state = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from e
    return state, hashlib.sha256(data).hexdigest()[:MODEL_ID_HEX]


def _compare_configs(card: RevColConfig, found: RevColConfig, source: str) -> None:
    diffs = [
        f"{f}: card {getattr(card, f)!r}, tensors {getattr(found, f)!r}"
        for f in ("channels", "layers", "num_columns", "num_classes", "kernel_size", "in_chans",
                  "stem_kernel", "stem_width")
        if tuple_or(getattr(card, f)) != tuple_or(getattr(found, f))
    ]
    if diffs:
        raise ValueError(
            f"{source}: the model card's architecture does not match the tensors ("
            + "; ".join(diffs) + ")"
        )


def tuple_or(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _default_card(model: RevCol, model_id: str, ema: bool) -> ModelCard:
    from ttspec_ros.cascade import exit_costs

    config = model.config
    return ModelCard(
        model_id=model_id,
        training={"ema": ema},  # which of a checkpoint's weight sets these are
        architecture=config.to_dict(),
        class_names=[f"class_{i}" for i in range(config.num_classes)],
        input=dict(IMAGENET_INPUT, channels=config.in_chans,
                   mean=IMAGENET_INPUT["mean"][: config.in_chans],
                   std=IMAGENET_INPUT["std"][: config.in_chans]),
        thresholds=[DEFAULT_THRESHOLD] * (NUM_EXITS - 1),
        exit_cost=exit_costs(model, IMAGENET_INPUT["size"]),
    )


def load_model(path: str | os.PathLike | None = None, *, use_ema: bool = False,
               with_decoders: bool | None = None, require_ema: bool = False
               ) -> tuple[RevCol, ModelCard]:
    """A RevCol in eval mode and its card.

    ``path``: None = the bundled demo model; ``X.safetensors`` / ``X.json`` / ``X`` = our format
    (both files needed); anything else = an official pickled checkpoint (raw state dict or a
    training checkpoint; ``use_ema`` picks ``state_dict_ema`` over ``model`` when present),
    for which a card is made up (architecture from the tensors, generic class names,
    ImageNet input spec, threshold 0.9, model_id = hash of the file, + "-ema" for the EMA
    weights of a file that holds both sets).
    ``with_decoders``: None keeps what the file has; False drops the decoders.
    ``require_ema``: an official checkpoint must hold ``state_dict_ema`` (ValueError, not the
    warning and the other weights of ``use_ema``).
    """
    if path is None:
        if not DEMO_STEM.with_suffix(SAFETENSORS_SUFFIX).exists():
            raise FileNotFoundError(
                f"bundled demo model not found: {DEMO_STEM.with_suffix(SAFETENSORS_SUFFIX)} "
                "(it is produced by `ttspec train`)"
            )
        path = DEMO_STEM
    path = Path(path)
    if is_our_format(path):
        weights, card_path = existing_model_files(path)
        card = read_card(card_path)
        state, weights_id = read_safetensors(weights)
        if _is_hash_id(card.model_id) and card.model_id != weights_id:
            raise ValueError(
                f"{card_path}: model_id {card.model_id} is not the hash of {weights.name} "
                f"({weights_id}): the weights and the card are from different saves"
            )
        _compare_configs(card.config, infer_config(state, str(weights)), str(card_path))
        model = build_from_state_dict(state, card.config, with_decoders, str(weights))
        card = dataclasses.replace(card, architecture=model.config.to_dict(),
                                   model_id=card.model_id or weights_id)
        return model, card
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found as a file")
    checkpoint = read_pickled_checkpoint(path)
    use_ema = use_ema or require_ema
    state, entry = extract_state_dict(checkpoint, use_ema, str(path), require_ema=require_ema)
    model = build_from_state_dict(state, None, with_decoders, str(path))
    ema = entry == "state_dict_ema"
    # The id decides which anchors and updates a model takes: one file's two weight sets
    # need two ids.
    both = entry is not None and {"model", "state_dict_ema"} <= checkpoint.keys()
    return model, _default_card(model, file_hash(path) + ("-ema" if both and ema else ""), ema)


__all__ = [
    "ModelCard", "ForeignObject", "load_model", "save_model", "read_card", "file_hash",
    "existing_model_files",
    "file_sha256",
    "read_pickled_checkpoint", "extract_state_dict", "infer_config", "check_state_dict",
    "build_from_state_dict", "validate_thresholds", "DEMO_STEM",
]
