"""Every node parameter as plain data (name, type, default, range, description) + validation.

ROS-free: the nodes turn each ``ParamSpec`` into a ``ParameterDescriptor`` and call
``check_value`` / the node's ``check_*`` function from their on-set-parameters callback, so a
refused value comes back with the reason. ``config/ttspec.yaml`` repeats these defaults (a test
keeps them equal). Types are ROS parameter types: bool, int, double, string, double_array.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ttspec_ros import topics
from ttspec_ros.backends import BACKENDS  # light: no backend is imported by this

STRATEGIES = ("specialize", "ttt_online", "both")  # adapter strategies
FROM_MODEL_CARD = None  # default of parameters whose value comes from the model card


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # bool | int | double | string | double_array
    default: Any  # FROM_MODEL_CARD (None) = taken from the loaded model card at start-up
    description: str
    min: float | None = None  # inclusive bounds (each element for arrays)
    max: float | None = None
    read_only: bool = False  # settable at start-up (params file, -p) but not at run time
    choices: tuple[str, ...] = ()
    constraints: str = ""  # what the range cannot say (ROS additional_constraints)


_TYPES: dict[str, tuple[type[Any], ...]] = {
    "bool": (bool,), "int": (int,), "double": (float,), "string": (str,),
    "double_array": (list, tuple),
}

MODEL = ParamSpec(
    "model", "string", "",
    "model path stem: <stem>.safetensors (weights) + <stem>.json (model card), or an official "
    "RevCol .pth (classes named class_0, class_1, ...; `ttspec import-checkpoint` names "
    "them); '' = the bundled demo model")

CAMERA: tuple[ParamSpec, ...] = (
    MODEL,
    ParamSpec("transport", "string", "raw",
              "'raw': sensor_msgs/Image on image_raw; 'compressed': sensor_msgs/CompressedImage "
              "on <image_raw as remapped>/compressed, as image_transport names it",
              choices=("raw", "compressed")),
    ParamSpec("image_reliability", "string", "best_effort",
              "QoS reliability of the image subscription: best_effort (sensor data; reads "
              "reliable and best-effort publishers) or reliable (no large images lost by DDS; "
              "reads reliable publishers only); a qos_overrides parameter still wins",
              read_only=True, choices=("best_effort", "reliable")),
    ParamSpec("max_rate_hz", "double", 0.0,
              "most frames per second passed on to the classifier (0 = no limit), timed by "
              "the node's clock (with use_sim_time: the bag's /clock): one frame per period on "
              "average, passed frames at least 0.4 periods apart (30 % slack on each due "
              "time); frames arriving sooner are dropped and counted", min=0.0, max=1000.0),
)

CLASSIFIER: tuple[ParamSpec, ...] = (
    MODEL,
    ParamSpec("threshold", "double", -1.0,
              "confidence every early exit needs to answer (1 = none answers early); "
              "-1 = use 'thresholds'",
              min=-1.0, max=1.0, constraints="-1, or a value in [0, 1]"),
    ParamSpec("thresholds", "double_array", FROM_MODEL_CARD,
              "per-early-exit confidence thresholds (one per exit except the last), each in "
              "[0, 1], 1 = that exit never answers; default: the model card's, and while "
              "they equal the card's they follow a live model change; used while threshold "
              "is -1",
              min=0.0, max=1.0, constraints="length = number of exits - 1"),
    ParamSpec("max_exit", "int", -1,
              "deepest exit to run: frames no earlier exit answered are answered there; "
              "-1 = no limit (the last exit)",
              min=-1, max=255, constraints="-1 or at most number of exits - 1"),
    ParamSpec("publish_samples", "bool", True,
              "publish adaptation_samples for frames answered after exit 0"),
    ParamSpec("num_threads", "int", 1,
              "CPU threads for the model: torch intra-op; with backend onnxruntime also the "
              "ONNX Runtime sessions', fixed at start (a live change is refused there)",
              min=1, max=64),
    ParamSpec("backend", "string", "torch",
              "inference backend of the backbone, chosen at start: torch | onnxruntime (CPU) | "
              "tensorrt (CUDA); heads stay in torch on every backend. Adapter strategies that "
              "change backbone parameters (ttt_online, both) need torch",
              read_only=True, choices=BACKENDS),
    ParamSpec("device", "string", "cpu",
              "device of the backbone: cpu, cuda or cuda:N (onnxruntime: cpu only; "
              "tensorrt: cuda only)", read_only=True),
)

ADAPTER: tuple[ParamSpec, ...] = (
    ParamSpec(MODEL.name, MODEL.type, MODEL.default,
              MODEL.description + "; must be the classifiers' model", read_only=True),
    ParamSpec("enabled", "bool", True,
              "train on incoming samples and frames (false: count and ignore them)"),
    ParamSpec("learning_rate", "double", 1e-4, "SGD learning rate of the early heads",
              min=0.0, max=1.0, constraints="> 0"),
    ParamSpec("momentum", "double", 0.0, "SGD momentum", min=0.0, max=0.99),
    ParamSpec("batch_size", "int", 1, "samples per SGD step", min=1, max=1024),
    ParamSpec("min_confidence", "double", 0.0,
              "samples whose answering exit is less confident are skipped", min=0.0, max=1.0),
    # The guard's defaults are AnchorGuard's (ttspec_ros.guard; a test checks they agree).
    ParamSpec("anchors_file", "string", "",
              "forgetting guard: anchor set of this model from `ttspec make-anchors` (every "
              "step rehearses anchors; heads that lose agreement with the last exit on them "
              "are rolled back, and only checked heads are published); '' = no guard; "
              "strategy specialize only",
              read_only=True),
    ParamSpec("guard_rehearsal", "int", 2, "forgetting guard: anchors rehearsed per step",
              min=0, max=64, read_only=True),
    ParamSpec("guard_tolerance", "double", 0.005,
              "forgetting guard: loss of mean anchor agreement that triggers a rollback",
              min=0.0, max=1.0, read_only=True),
    ParamSpec("guard_class_tolerance", "double", 0.03,
              "forgetting guard: loss of one class's anchor agreement that triggers a rollback",
              min=0.0, max=1.0, read_only=True),
    ParamSpec("publish_period_s", "double", 1.0,
              "model_updates are published at most this often (seconds, steady clock even "
              "with use_sim_time), when changed",
              min=0.01, max=3600.0),
    ParamSpec("state_dir", "string", "",
              "directory for the adapter's state (saved atomically, resumed at start); "
              "'' = not persisted", read_only=True),
    ParamSpec("save_period_s", "double", 10.0,
              "save the state this often (seconds, steady clock) when changed",
              min=0.1, max=86400.0),
    ParamSpec("strategy", "string", "specialize",
              "specialize: train the early heads on adaptation_samples; ttt_online: test-time "
              "training (masked reconstruction, online) of the backbone on frames; both. "
              "ttt_online/both publish backbone tensors, which only classifiers with backend "
              "torch apply (others refuse the update and log why)",
              read_only=True, choices=STRATEGIES),
    ParamSpec("ttt_update", "string", "norm",
              "what test-time training changes: norm (LayerNorm affine of the encoder), "
              "columns (stem + first column), encoder (stem + every column the loss reaches)",
              read_only=True, choices=("norm", "columns", "encoder")),
    ParamSpec("ttt_learning_rate", "double", 3e-2,
              "SGD (momentum 0.9) learning rate of test-time training, one step per frame; "
              "the default is tuned for ttt_update norm, columns and encoder want about 0.003",
              min=0.0, max=1.0, read_only=True, constraints="> 0"),
)

# Measured on the demo model, 300 gaussian-noise severity-5 frames, online (a review):
# no TTT 26.7 %, norm at 0.03 36.0 %; columns / encoder at 0.03 11.3 / 11.0 % (chance, while
# the reconstruction loss looked healthy), at 0.003 49.7 / 49.3 %.
TTT_WHOLE_LAYER_MAX_LR = 0.01


def ttt_learning_rate_warning(update: str, lr: float) -> str | None:
    """Why ``lr`` is likely to wreck test-time training of ``update``, or None."""
    if update != "norm" and lr > TTT_WHOLE_LAYER_MAX_LR:
        return (f"ttt_learning_rate {lr:g} with ttt_update {update!r}: rates above "
                f"{TTT_WHOLE_LAYER_MAX_LR:g} took the demo model to chance on a noisy stream "
                "(the default 0.03 is tuned for norm); about 0.003 is the measured setting")
    return None

def strategy_uses_ttt(strategy: str) -> bool:
    """Strategies that train the backbone on frames (needs decoders, and classifiers on torch)."""
    return strategy in ("ttt_online", "both")


NODE_PARAMS: dict[str, tuple[ParamSpec, ...]] = {
    topics.CAMERA_NODE: CAMERA,
    topics.CLASSIFIER_NODE: CLASSIFIER,
    topics.ADAPTER_NODE: ADAPTER,
}


def spec(node: str, name: str) -> ParamSpec:
    for s in NODE_PARAMS[node]:
        if s.name == name:
            return s
    raise KeyError(f"node {node!r} has no parameter {name!r}")


def defaults(node: str) -> dict[str, Any]:
    """name -> default of every parameter of ``node`` (FROM_MODEL_CARD ones left out)."""
    return {s.name: s.default for s in NODE_PARAMS[node] if s.default is not FROM_MODEL_CARD}


def check_value(s: ParamSpec, value: Any) -> str | None:
    """Reason ``value`` is not acceptable for ``s`` on its own, or None."""
    if not isinstance(value, _TYPES[s.type]) or (s.type == "int" and isinstance(value, bool)):
        return f"{s.name} must be {s.type}, got {type(value).__name__} {value!r}"
    items = list(value) if s.type == "double_array" else [value]
    if s.type == "double_array" and not all(isinstance(v, float) for v in items):
        return f"{s.name} must be a list of doubles, got {value!r}"
    for v in items if s.type in ("int", "double", "double_array") else []:
        if isinstance(v, float) and not math.isfinite(v):
            return f"{s.name} must be finite, got {v}"
        if (s.min is not None and v < s.min) or (s.max is not None and v > s.max):
            return f"{s.name} = {v} is outside [{s.min}, {s.max}]"
    if s.choices and value not in s.choices:
        return f"{s.name} must be one of {list(s.choices)}, got {value!r}"
    return None


def check_params(node: str, values: Mapping[str, Any]) -> str | None:
    """Reason the given values (each on its own) are not acceptable, or None."""
    names = {s.name: s for s in NODE_PARAMS[node]}
    for name, value in values.items():
        if name not in names:
            return f"{node} has no parameter {name!r}"
        reason = check_value(names[name], value)
        if reason:
            return reason
    return None


_RCL_TRUE = {"Y", "y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
_RCL_FALSE = {"N", "n", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"}
_RCL_SPECIAL = {".nan": math.nan, ".NaN": math.nan, ".NAN": math.nan,
                **{f"{sign}{inf}": (-math.inf if sign == "-" else math.inf)
                   for sign in ("", "+", "-") for inf in (".inf", ".Inf", ".INF")}}
_RCL_INT = re.compile(r"\s*[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_RCL_FLOAT = re.compile(r"\s*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
                        r"|inf(inity)?|nan)", re.IGNORECASE)
_RCL_HEX_FLOAT = re.compile(r"\s*[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
                            r"([pP][+-]?[0-9]+)?")
_YAML_STR = "tag:yaml.org,2002:str"


def rcl_scalar(text: str, quoted: bool = False) -> Any:
    """A YAML scalar typed the way rcl's parameter parser types it (not the way PyYAML does:
    to rcl ``1e-3`` is a double and ``y`` a bool, a date is text): quoted -> string; its
    bool words; a whole ``strtol(base 0)``; a whole ``strtod`` (or .inf/.nan); else string."""
    if quoted:
        return text
    if text in _RCL_TRUE or text in _RCL_FALSE:
        return text in _RCL_TRUE
    if _RCL_INT.fullmatch(text):
        body = text.strip()
        digits = body.lstrip("+-")
        value = int(body, 8) if digits.startswith("0") and digits[1:2].isdigit() else int(body, 0)
        if -2**63 <= value < 2**63:  # strtol's range; beyond it rcl tries a double
            return value
    if text in _RCL_SPECIAL:
        return _RCL_SPECIAL[text]
    decimal = _RCL_FLOAT.fullmatch(text)
    if decimal or _RCL_HEX_FLOAT.fullmatch(text):
        body = text.strip()
        number = float(body) if decimal else float.fromhex(body)
        if re.search("inf|nan", body, re.IGNORECASE):
            return number
        mantissa = re.split("[ep]", body.lower().replace("0x", "", 1), maxsplit=1)[0]
        written_zero = not any(c in "123456789abcdef" for c in mantissa)
        if math.isfinite(number) and (abs(number) >= sys.float_info.min or written_zero):
            return number
        # beyond strtod's range (1e400, or 1e-400 and other subnormals): ERANGE, so rcl
        # keeps the text
    return text


def _rcl_documents(text: str) -> list[Any]:
    """Each YAML document of ``text`` as rcl reads parameter values: mappings and sequences
    as usual, scalars by ``rcl_scalar`` (quoted or tagged ``!!str``: text; other tags are
    ignored, as rcl does). Raises yaml.YAMLError for text that is not YAML."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_scalar_node(self, anchor: Any) -> Any:
            tag = self.peek_event().tag  # the tag written, not the one PyYAML resolves
            node = super().compose_scalar_node(anchor)
            node.written_str = tag == _YAML_STR
            return node

    def convert(node: Any) -> Any:
        if isinstance(node, yaml.MappingNode):
            return {convert(k): convert(v) for k, v in node.value}
        if isinstance(node, yaml.SequenceNode):
            return [convert(v) for v in node.value]
        return rcl_scalar(node.value, quoted=node.style in ("'", '"') or node.written_str)

    return [convert(node) for node in yaml.compose_all(text, Loader=Loader)]


def rcl_yaml(text: str) -> Any:
    """One YAML value (a ``-p`` value) as rcl reads it (``_rcl_documents``); None if empty."""
    docs = _rcl_documents(text)
    return docs[0] if docs else None


def _parameter_sections(doc: Mapping, path: tuple[str, ...] = ()):
    """(node path, parameters) of each ``ros__parameters`` section, nested namespaces too
    (``ns: {node: {ros__parameters: ...}}``), or (path, None) for a section rcl cannot read."""
    for key, body in doc.items():
        here = (*path, str(key))
        if not isinstance(body, Mapping):  # a value where a node section should be
            yield path or here, None
        elif "ros__parameters" in body:
            values = body["ros__parameters"]
            yield here, values if isinstance(values, Mapping) else None
        else:
            yield from _parameter_sections(body, here)


def _section_node(path: tuple[str, ...]) -> str:
    """The node name a section applies to: its last name part (``*``/``**``: a wildcard)."""
    return path[-1].rstrip("/").rsplit("/", 1)[-1]


def params_file_value(text: str, node: str, name: str) -> Any | None:
    """The value a params file (text ``check_params_file`` accepted) gives ``node``'s
    parameter ``name``, or None. Sections match as ``check_params_file`` matches them; one
    naming the node wins over a wildcard one (it shadows ``/**`` for the node), and of
    equals the later one."""
    best: tuple[int, Any] | None = None
    for doc in _rcl_documents(text):
        for path, values in (_parameter_sections(doc) if isinstance(doc, Mapping) else ()):
            section_node = _section_node(path)
            rank = 1 if section_node == node else 0 if "*" in section_node else None
            if rank is not None and values and name in values and (
                    best is None or rank >= best[0]):
                best = (rank, values[name])
    return best[1] if best else None


def check_params_file(text: str) -> str | None:
    """Reason the text of a ROS 2 params file would stop one of our nodes at start-up, or None:
    not YAML, not rcl's layout (node name -> ``ros__parameters`` -> name -> value), or a value
    of one of our parameters that ``check_value`` refuses (a YAML ``1`` for a double too, as
    rclpy does). Sections are matched to our nodes by their last name part (a wildcard:
    every node), which is looser than rcl's namespace matching. Sections of other nodes and
    parameters no node of ours declares are left to whoever reads them."""
    import yaml

    try:
        docs = [d for d in _rcl_documents(text) if d is not None]
    except yaml.YAMLError as e:
        return f"not valid YAML ({' '.join(str(e).split())})"
    # empty, or comments only: rcl starts the node with nothing from it
    if not all(isinstance(d, Mapping) for d in docs):
        return "needs a mapping of node names to 'ros__parameters' sections"
    known = NODE_PARAMS
    for path, values in (section for d in docs for section in _parameter_sections(d)):
        section = "/".join(path)
        if values is None:
            return f"section {section!r} has no 'ros__parameters' mapping"
        node = _section_node(path)
        matched = [node] if node in known else list(known) if "*" in node else []
        for name, value in values.items():
            for s in (spec for n in matched for spec in known[n] if spec.name == name):
                reason = check_value(s, value)
                if reason:
                    return f"section {section!r}: {reason}"
    return None


def check_classifier(values: Mapping[str, Any], num_exits: int, changed: Sequence[str] = ()
                     ) -> str | None:
    """Reason the classifier's complete parameter set is inconsistent for a model with
    ``num_exits`` exits, or None. ``values`` holds every classifier parameter (new values
    merged in); ``changed`` names the ones being set now."""
    reason = check_params(topics.CLASSIFIER_NODE, values)
    if reason:
        return reason
    threshold, thresholds = values["threshold"], list(values["thresholds"])
    if threshold != -1.0 and not 0.0 <= threshold <= 1.0:
        return f"threshold must be -1 or in [0, 1], got {threshold}"
    if len(thresholds) != num_exits - 1:
        return (f"thresholds needs {num_exits - 1} values (one per early exit of this "
                f"{num_exits}-exit model), got {len(thresholds)}")
    if "thresholds" in changed and "threshold" not in changed and threshold >= 0.0:
        # The set_parameters service (ros2 param set/load) applies one value at a time, so
        # "in the same call" works only with set_parameters_atomically.
        return (f"thresholds has no effect while threshold is {threshold}; set threshold to -1 "
                "first (or both in one set_parameters_atomically call)")
    if values["max_exit"] > num_exits - 1:
        return f"max_exit must be -1 or at most {num_exits - 1}, got {values['max_exit']}"
    if "num_threads" in changed and values["backend"] == "onnxruntime":
        return ("num_threads cannot change while the node runs with backend onnxruntime: its "
                "sessions fix their thread count when they start; set it in the parameters "
                "file and restart the node")
    return None


def check_adapter(values: Mapping[str, Any]) -> str | None:
    reason = check_params(topics.ADAPTER_NODE, values)
    if reason:
        return reason
    for name in ("learning_rate", "ttt_learning_rate"):
        if name in values and not values[name] > 0.0:
            return f"{name} must be > 0, got {values[name]}"
    if values.get("anchors_file") and strategy_uses_ttt(values.get("strategy", "")):
        return (f"anchors_file needs strategy specialize, not {values['strategy']}: test-time "
                "training changes the backbone, and the anchors' features come from the "
                "original one, so the guard would check a model no classifier runs")
    return None


def effective_thresholds(threshold: float, thresholds: Sequence[float]) -> list[float]:
    """Per-early-exit thresholds the cascade uses: ``threshold`` for all if set, else
    ``thresholds``."""
    if threshold >= 0.0:
        return [float(threshold)] * len(thresholds)
    return [float(t) for t in thresholds]


def min_period_s(max_rate_hz: float) -> float:
    """Shortest time between two passed frames (0 = no limit)."""
    return 1.0 / max_rate_hz if max_rate_hz > 0.0 else 0.0
