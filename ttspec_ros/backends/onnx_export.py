"""Export a RevCol backbone to one ONNX graph per cascade stage (plus one unsplit graph).

Stage graphs stop at each exit's pooled head input; the heads (LayerNorm + Linear) are not in
any graph, so the adapter can change them while engines and sessions stay as they are.

Graph interface (static shapes, batch 1):
- stage 0: ``image`` (1, in_chans, H, W) -> ``x`` (stem output), ``c0``..``c3``, ``pooled``;
  the first column's all-zero state is folded into this graph.
- stage i > 0: ``x``, ``c0_in``..``c3_in`` -> ``c0``..``c3``, ``pooled``.
- ``x`` is (1, C0, H/4, W/4) and the column features ``c0``..``c3`` are (1, C_l, H_l, W_l):
  everything crosses stage boundaries NCHW (``CARRY_LAYOUT``). Inside the graphs ONNX
  Runtime keeps them in its blocked NCHWc layout (see ``export_form``), so each boundary tensor
  costs one ReorderOutput in the stage that makes it and one ReorderInput in the next
  (RevCol-T at 224: about 0.7 ms per boundary at 1 thread; NHWC carries measured the same).
  The ONNX Runtime backend removes those pairs from its optimised graphs
  (``onnxruntime_backend._keep_carries_blocked``); TensorRT builds from these graphs as they are.
- unsplit: ``image`` -> ``pooled`` of the last exit (for measuring stage-boundary overhead).
``manifest.json`` beside the graphs records names, shapes, hashes and versions.

The graphs are traced from an export form of the model (``export_form``) that computes the
same function in the form ONNX Runtime's CPU kernels run fastest; see there.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
import os
import warnings
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttspec_ros.backends import check_image_size
from ttspec_ros.checks import is_integer
from ttspec_ros.files import atomic_write_bytes, write_json
from ttspec_ros.models.checkpoint import file_sha256
from ttspec_ros.models.revcol import (
    INPUT_MULTIPLE,
    ChannelsFirstLayerNorm,
    ConvNextBlock,
    RevCol,
    SubNet,
    UpSampleConvnext,
)

OPSET = 17
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Version of the traced graph layout (export_form). Cached graphs of another version are
# exported again, so robots pick up a faster layout without clearing their cache.
EXPORT_VERSION = 4  # 4: the last stage outputs only its pooled features
STATE_NAMES = ("c0", "c1", "c2", "c3")
# Tensors that are not part of any graph: the exit heads (updated at run time) and the
# reconstruction decoders (training only). The model hash ignores them on purpose, so head
# updates never invalidate exported graphs or engines.
_NOT_IN_GRAPHS = ("cls_blocks.", "decoder_blocks.")


def backbone_hash(model: RevCol) -> str:
    """sha256 over name, dtype, shape and bytes of every state-dict tensor the graphs contain."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(_NOT_IN_GRAPHS):
            continue
        array = tensor.detach().to("cpu").contiguous().numpy()
        digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _pointwise_conv(linear: nn.Linear, scale: Tensor | None = None) -> nn.Conv2d:
    """``linear`` on the channels of an NCHW tensor, as a 1x1 Conv (rows scaled by ``scale``)."""
    weight, bias = linear.weight.detach(), linear.bias.detach()
    if scale is not None:
        weight, bias = weight * scale[:, None], bias * scale
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1).to(weight.device)
    assert conv.bias is not None, "nn.Conv2d has a bias by default"
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
    return conv


def _channel_affine_conv(weight: Tensor, bias: Tensor) -> nn.Conv2d:
    """``weight[c] * x + bias[c]`` on an NCHW tensor, as a depthwise 1x1 Conv."""
    c = weight.numel()
    conv = nn.Conv2d(c, c, 1, groups=c).to(weight.device)
    assert conv.bias is not None, "nn.Conv2d has a bias by default"
    with torch.no_grad():
        conv.weight.copy_(weight.detach().reshape(c, 1, 1, 1))
        conv.bias.copy_(bias.detach().reshape(c))
    return conv


def _channel_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """LayerNorm over C of an NCHW tensor as one LayerNormalization node on an NHWC view."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 3, 1, 2)


class _ConvBlock(nn.Module):
    """Inference form of a ConvNextBlock, all NCHW: dwconv -> LN over C -> 1x1 Conv -> GELU ->
    1x1 Conv -> residual. The Linear layers become 1x1 Convs (same weights), the layer scale
    ``gamma`` is folded into the second, and drop path (identity in eval mode) is left out."""

    def __init__(self, block: ConvNextBlock) -> None:
        super().__init__()
        self.dwconv, self.act = block.dwconv, block.act
        self.norm_weight, self.norm_bias, self.eps = (
            block.norm.weight, block.norm.bias, block.norm.eps
        )
        self.pwconv1 = _pointwise_conv(block.pwconv1)
        self.pwconv2 = _pointwise_conv(block.pwconv2, block.gamma.detach())

    def forward(self, x: Tensor) -> Tensor:
        y = _channel_layer_norm(self.dwconv(x), self.norm_weight, self.norm_bias, self.eps)
        return x + self.pwconv2(self.act(self.pwconv1(y)))


class _ChannelsFirstNorm(nn.Module):
    """ChannelsFirstLayerNorm as one LayerNormalization (without its affine part) on an NHWC
    view, then the per-channel affine part as a depthwise 1x1 Conv. The tensor this makes
    feeds the blocks' depthwise convs and residual adds: as a Conv output it stays in ONNX
    Runtime's NCHWc layout for both, instead of going through transposes."""

    def __init__(self, weight: Tensor, bias: Tensor, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.affine = _channel_affine_conv(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(_channel_layer_norm(x, None, None, self.eps))


class _ConvUpSample(nn.Module):
    """UpSampleConvnext in NCHW: 1x1 Conv, LN over C (as ``_ChannelsFirstNorm``), nearest x2."""

    def __init__(self, up: UpSampleConvnext) -> None:
        super().__init__()
        linear, norm = up.channel_reschedule
        # UpSampleConvnext builds channel_reschedule as Sequential(Linear, LayerNorm)
        assert isinstance(linear, nn.Linear) and isinstance(norm, nn.LayerNorm), \
            "UpSampleConvnext.channel_reschedule is (Linear, LayerNorm)"
        self.pwconv = _pointwise_conv(linear)
        self.norm = _ChannelsFirstNorm(norm.weight, norm.bias, norm.eps)
        self.up = up.up

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.norm(self.pwconv(x)))


class _SubNet(nn.Module):
    """A SubNet (column) whose alphas are clamped once, as SubNet.forward does on every call.
    In the first column the previous state is 0.0: ``alpha * 0.0 + new`` is just ``new`` here,
    with no Add of a zero constant (such an Add is not an NCHWc op and took the first column
    and the ``alpha * c`` of the next one out of the NCHWc layout)."""

    def __init__(self, subnet: SubNet) -> None:
        super().__init__()
        self.subnet = subnet
        subnet.clamp_alphas()
        self.scale = nn.ModuleList()
        for i in range(4):
            alpha = getattr(subnet, f"alpha{i}").detach().flatten()
            self.scale.append(_channel_affine_conv(alpha, torch.zeros_like(alpha)))

    def _mix(self, i: int, previous, new: Tensor) -> Tensor:
        if not torch.is_tensor(previous):
            return new  # the first column's alpha * 0.0 + new
        return self.scale[i](previous) + new

    def forward(self, x: Tensor, c0, c1, c2, c3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s, up = self.subnet, (lambda c: c if torch.is_tensor(c) else None)
        c0 = self._mix(0, c0, s.level0(x, up(c1)))
        c1 = self._mix(1, c1, s.level1(c0, up(c2)))
        c2 = self._mix(2, c2, s.level2(c1, up(c3)))
        c3 = self._mix(3, c3, s.level3(c2, None))
        return c0, c1, c2, c3


def export_form(model: RevCol) -> RevCol:
    """A copy of ``model`` in eval mode that computes the same function in the form ONNX
    Runtime runs fastest on CPU; ``model`` itself is not touched.

    The official model applies its Linear layers to NHWC views and its channels-first
    LayerNorms as a chain of reductions; traced literally (or with the Linears as MatMul on
    NHWC), ONNX Runtime's x86 NCHWc layout transformer reorders tensors in and out of its
    blocked layout around every Conv and runs the Linears as Gemm between transposes. In this
    form every Linear is a 1x1 Conv (blocks, up-sampling paths), LN affine parts that feed
    convs and residuals are depthwise 1x1 Convs, and each LayerNorm is one LayerNormalization
    on an NHWC view. After optimisation (RevCol-T at 224, unsplit graph) the whole column
    network stays in NCHWc apart from the 62 LayerNorms, each between one ReorderOutput and
    one ReorderInput: no Transpose, Reshape or Gemm nodes (before: 36 Transpose, 178 Reshape,
    89 Gemm, 65 Add), and the pointwise layers run as NCHWc Convs (with the residual add
    fused) instead of Gemm, which ONNX Runtime runs faster at every level (op profiles,
    RevCol-T at 224, 2 threads: pointwise layers 72.6 ms as Gemm, 58.6 ms as Conv). Against
    the previous form (Linear on NHWC, EXPORT_VERSION 2), paired runs: unsplit graph -16 %,
    staged forced-last-exit -15 %, at 1 and at 2 threads.
    Same arithmetic up to float rounding (~1e-6 relative on RevCol-T).
    """
    twin = copy.deepcopy(model).eval()
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvNextBlock):
                setattr(module, name, _ConvBlock(child))
            elif isinstance(child, ChannelsFirstLayerNorm):
                setattr(module, name, _ChannelsFirstNorm(child.weight, child.bias, child.eps))
            elif isinstance(child, UpSampleConvnext):
                setattr(module, name, _ConvUpSample(child))
    for k in range(twin.num_columns):
        setattr(twin, f"subnet{k}", _SubNet(getattr(twin, f"subnet{k}")))
    return twin


def stage_input_names(stage: int) -> list[str]:
    return ["image"] if stage == 0 else ["x", *(f"{n}_in" for n in STATE_NAMES)]


def stage_output_names(stage: int, num_stages: int) -> list[str]:
    """The last stage outputs only ``pooled``: no stage reads its carry, and each carry output
    costs ONNX Runtime a reorder out of its blocked layout. On RevCol-T at 224, 2 threads, the
    last stage alone ran 14.7 instead of 15.1 ms (outputs returned as new arrays); the staged
    forward with bound buffers ~0.2 ms faster, which is within this machine's noise."""
    if stage == num_stages - 1:
        return ["pooled"]
    return (["x"] if stage == 0 else []) + [*STATE_NAMES, "pooled"]


CARRY_LAYOUT = "NCHW"  # of x and c0..c3 between stages


class _FirstStage(nn.Module):
    def __init__(self, model: RevCol) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        x = self.model.stem(image)
        state = self.model.run_exit(0, x, (0.0, 0.0, 0.0, 0.0))
        return (x, *state, self.model.pool(state[3]))


class _LaterStage(nn.Module):
    """Stage i > 0. ``x`` first goes through an identity depthwise 1x1 Conv (exact: weight 1,
    bias 0): as a Conv output it enters ONNX Runtime's NCHWc layout, and so do the level-0
    residual adds that read it, which otherwise ran in NCHW between reorders."""

    def __init__(self, model: RevCol, stage: int) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.last = stage == model.num_exits - 1
        ones = torch.ones(model.config.channels[0], device=next(model.parameters()).device)
        self.enter = _channel_affine_conv(ones, torch.zeros_like(ones))

    def forward(self, x: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor):
        """The next stage's carry (c0..c3) and pooled features; the last stage only pooled."""
        state = self.model.run_exit(self.stage, self.enter(x), (c0, c1, c2, c3))
        pooled = self.model.pool(state[3])
        return pooled if self.last else (*state, pooled)


class UnsplitForward(nn.Module):
    """Image -> last exit's pooled features in one call (no stage boundaries)."""

    def __init__(self, model: RevCol) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        x = self.model.stem(image)
        state = self.model.run_columns(range(self.model.num_columns), x, (0.0, 0.0, 0.0, 0.0))
        return self.model.pool(state[3])


class _ExportOptions(TypedDict, total=False):
    dynamo: bool  # torch.onnx.export's, from torch 2.5 on


def export_graph(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs, outputs
                 ) -> None:
    """Trace ``module`` on ``args`` to an ONNX file (opset OPSET, constant folding)."""
    # Exported in memory, then written atomically: a failed export leaves no file behind, and
    # two processes exporting into one cache directory never see each other's partial files.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript (not a dependency); this exporter yields the same static graphs.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # `dynamo` came with torch 2.5 (JetPack 6.0 ships 2.3); newer releases default it to True.
        legacy: _ExportOptions = (
            {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters
            else {})
        torch.onnx.export(
            # ignore: the TorchScript exporter (dynamo=False) writes to file-like objects too
            # (torch's source: "Normally f can be a file-like object"); the annotation names
            # only paths
            module, args, buffer,  # type: ignore[arg-type]
            opset_version=OPSET, input_names=list(inputs),
            output_names=list(outputs), do_constant_folding=True, **legacy,
        )
    atomic_write_bytes(path, buffer.getvalue())


MAX_IMAGE_SIDE = 1024  # px; the model's input size (frames are resized to it), not the camera's


def image_shape_for(model: RevCol, image_size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = check_image_size(image_size)  # export_stages is called directly too
    # stem /4, then three /2 downsamplings: every level needs whole pixels.
    if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:  # positive: check_image_size
        raise ValueError(f"image size must be positive multiples of {INPUT_MULTIPLE}, "
                         f"got {h}x{w}")
    if max(h, w) > MAX_IMAGE_SIDE:  # tracing ran out of memory far into the export instead
        raise ValueError(f"image size must be at most {MAX_IMAGE_SIDE} px a side, got {h}x{w}")
    return (1, model.config.in_chans, h, w)


def graph_file(stage: int | None) -> str:
    """The file name the exporter gives stage ``stage``'s graph (None: the unsplit graph)."""
    return "unsplit.onnx" if stage is None else f"stage{stage}.onnx"


def export_stages(
    model: RevCol,
    image_size: int | tuple[int, int],
    out_dir: str | os.PathLike,
    *,
    include_unsplit: bool = True,
) -> dict:
    """Write ``stage{i}.onnx`` for every exit, ``unsplit.onnx`` (when ``include_unsplit``;
    only benchmarks use it) and ``manifest.json``.

    Returns the manifest. An eval-mode ``export_form`` copy of the model is traced on the
    model's device; the model itself is left as it is.
    """
    import onnx

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # a TensorRT-only machine (e.g. a Jetson) exports without it
        ort_version = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = image_shape_for(model, image_size)
    traced = export_form(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        image = torch.zeros(shape, device=device)
        x, *state, _ = _FirstStage(traced)(image)
        carry_shapes = {"x": list(x.shape)}
        carry_shapes.update({n: list(t.shape) for n, t in zip(STATE_NAMES, state, strict=True)})
        pooled_shape = [1, model.config.channels[-1]]

        stages = []
        for i in range(model.num_exits):
            module = _FirstStage(traced) if i == 0 else _LaterStage(traced, i)
            args = (image,) if i == 0 else (x, *state)
            path = out / graph_file(i)
            names = stage_output_names(i, model.num_exits)
            export_graph(module, args, path, stage_input_names(i), names)
            stages.append(_graph_entry(path, i, names, shape, carry_shapes, pooled_shape))
        unsplit = None
        if include_unsplit:
            path = out / graph_file(None)
            export_graph(UnsplitForward(traced), (image,), path, ["image"], ["pooled"])
            unsplit = {
                "file": path.name, "sha256": file_sha256(path),
                "inputs": [{"name": "image", "shape": list(shape)}],
                "outputs": [{"name": "pooled", "shape": pooled_shape}],
            }
    del traced

    for entry in [*stages, *([unsplit] if unsplit else [])]:
        onnx.checker.check_model(str(out / entry["file"]), full_check=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "export_version": EXPORT_VERSION,
        "carry_layout": {n: CARRY_LAYOUT for n in ("x", *STATE_NAMES)},
        "opset": OPSET,
        "model_hash": backbone_hash(model),
        "model_hash_covers": "state-dict tensors except cls_blocks.* and decoder_blocks.*",
        "architecture": model.config.to_dict(),
        "image_shape": list(shape),
        "num_stages": model.num_exits,
        "stages": stages,
        "unsplit": unsplit,
        "versions": {
            "torch": torch.__version__, "onnx": onnx.__version__,
            **({"onnxruntime": ort_version} if ort_version else {}),
        },
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _graph_entry(path: Path, stage: int, output_names: list[str], image_shape,
                 carry_shapes: dict, pooled_shape) -> dict:
    inputs = (
        [{"name": "image", "shape": list(image_shape)}]
        if stage == 0
        else [{"name": "x", "shape": carry_shapes["x"]}]
        + [{"name": f"{n}_in", "shape": carry_shapes[n]} for n in STATE_NAMES]
    )
    outputs = [
        {"name": n, "shape": carry_shapes[n]} for n in output_names if n != "pooled"
    ] + [{"name": "pooled", "shape": pooled_shape}]
    return {
        "index": stage, "file": path.name, "sha256": file_sha256(path),
        "inputs": inputs, "outputs": outputs,
    }


def _is_int_list(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(is_integer(v) for v in value))


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the fields the backends read, or None (a manifest is derived data,
    but a malformed one must be refused by name rather than fail later as a KeyError)."""
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        return "'stages' is not a non-empty list"
    if manifest.get("num_stages") != len(stages):
        return f"num_stages is {manifest.get('num_stages')!r} but it lists {len(stages)} stages"
    if not _is_int_list(manifest.get("image_shape"), 4):
        return f"image_shape {manifest.get('image_shape')!r} is not 4 integers"
    if not isinstance(manifest.get("model_hash"), str):
        return "model_hash is not a string"
    unsplit = manifest.get("unsplit")
    for label, entry in [*((f"stage {i}", e) for i, e in enumerate(stages)),
                         *((("unsplit", unsplit),) if unsplit is not None else ())]:
        if not isinstance(entry, dict):
            return f"{label} is not an object"
        if label.startswith("stage") and entry.get("index") != int(label.split()[1]):
            return f"{label} has index {entry.get('index')!r}"
        index = entry["index"] if label != "unsplit" else None
        # The file name is what ties an entry to its graph: stages 1.. have the same tensor
        # names and shapes, so an entry naming another stage's file (with that file's hash)
        # passed every check and ran that stage's column in its place. One fixed name per
        # entry also means no two entries share a file.
        if entry.get("file") != graph_file(index):
            return (f"{label} names file {entry.get('file')!r}, the exporter writes it to "
                    f"{graph_file(index)!r}")
        if not isinstance(entry.get("sha256"), str):
            return f"{label} has no sha256"
        for side in ("inputs", "outputs"):
            tensors = entry.get(side)
            if not isinstance(tensors, list) or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str)
                and _is_int_list(t.get("shape")) for t in tensors
            ):
                return f"{label} {side} are not a list of {{name, shape}}"
        # The backends bind and read tensors by these names: a graph entry naming others
        # (edited, or from another exporter) failed as a KeyError at the first frame.
        expected = {
            "inputs": ["image"] if index is None else stage_input_names(index),
            "outputs": ["pooled"] if index is None else stage_output_names(index, len(stages)),
        }
        for side, names in expected.items():
            found = [t["name"] for t in entry[side]]
            if found != names:
                return f"{label} {side} are named {found}, the exporter writes {names}"
        # The backends check images against image_shape and bind them as the graph's input.
        if index in (0, None) and entry["inputs"][0]["shape"] != manifest["image_shape"]:
            return (f"{label} takes an image of shape {entry['inputs'][0]['shape']}, "
                    f"image_shape is {manifest['image_shape']}")
    return None


def load_manifest(graph_dir: str | os.PathLike, *, verify_files: bool = True) -> dict:
    """Read ``manifest.json``; with ``verify_files`` check every graph's sha256 against it
    (a caller that then runs the graphs reads them with ``read_graph`` instead)."""
    graph_dir = Path(graph_dir)
    path = graph_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {graph_dir}; run `ttspec export-onnx` first")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}); export the graphs again") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest "
                         "object; export the graphs again")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: manifest format {manifest.get('format')!r}, this code reads "
            f"{MANIFEST_FORMAT}; export the graphs again"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(f"{path} is malformed: {problem}; export the graphs again")
    if verify_files:
        unsplit = [manifest["unsplit"]] if manifest.get("unsplit") else []
        for entry in [*manifest["stages"], *unsplit]:
            read_graph(graph_dir, entry)
    return manifest


def read_graph(graph_dir: str | os.PathLike, entry: dict) -> bytes:
    """The bytes of a manifest entry's graph file, checked against the entry's sha256.

    The backends hand these very bytes to their runtime: a graph checked by path and opened
    again by path could have been replaced in between, and run unchecked.
    """
    graph = Path(graph_dir) / entry["file"]
    data = graph.read_bytes() if graph.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{graph} is missing or does not match its manifest hash; "
                         "export the graphs again")
    return data


def shape_problem(entry: dict, declared: dict[str, dict[str, list[int]]]) -> str | None:
    """How a manifest entry's tensor shapes differ from ``declared`` ({"inputs"|"outputs":
    {name: shape}}, as a runtime reads them from the graph), or None."""
    for side in ("inputs", "outputs"):
        for tensor in entry[side]:
            found = declared[side].get(tensor["name"])
            if found != tensor["shape"]:
                return (f"{side[:-1]} {tensor['name']!r} has shape {tensor['shape']} in the "
                        f"manifest, {found} in the graph")
    return None


def ensure_exported(
    model: RevCol, image_size: int | tuple[int, int], cache_dir: str | os.PathLike
) -> Path:
    """Graph directory for this backbone and image size under ``cache_dir``, exporting once.

    The directory name holds the model hash and image shape, so a changed backbone gets
    fresh graphs and an existing directory is reused only when its manifest agrees (graphs
    of an older ``EXPORT_VERSION`` are exported again in place).
    """
    shape = image_shape_for(model, image_size)
    model_hash = backbone_hash(model)
    graph_dir = Path(cache_dir) / f"onnx-{model_hash[:16]}-{shape[2]}x{shape[3]}"
    try:
        manifest = load_manifest(graph_dir)
        if (
            manifest["model_hash"] == model_hash
            and manifest["image_shape"] == list(shape)
            # A stage per exit: the cascade's heads need one (a manifest of another stage
            # count was refused on every start, and never exported again).
            and manifest["num_stages"] == model.num_exits
            and manifest.get("export_version") == EXPORT_VERSION
        ):
            return graph_dir
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        pass  # missing or unusable: export below (graphs are derived data)
    export_stages(model, image_size, graph_dir, include_unsplit=False)
    return graph_dir


def relative_difference(actual: np.ndarray | Tensor, expected: np.ndarray | Tensor) -> float:
    """max |actual - expected| / max |expected| (elementwise ratios blow up near zero)."""
    a = np.asarray(actual.detach().cpu() if isinstance(actual, Tensor) else actual, np.float64)
    e = np.asarray(
        expected.detach().cpu() if isinstance(expected, Tensor) else expected, np.float64
    )
    scale = float(np.abs(e).max())
    return float(np.abs(a - e).max() / scale) if scale > 0 else float(np.abs(a - e).max())
