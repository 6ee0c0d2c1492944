"""Export a RevCol backbone to one ONNX graph per cascade stage (plus one unsplit graph).

Stage graphs stop at each exit's pooled head input; the heads (LayerNorm + Linear) are not in
any graph, so the adapter can change them while engines and sessions stay as they are.

Graph interface (static shapes, batch 1):
- stage 0: ``image`` (1, in_chans, H, W) -> ``x`` (stem output), ``c0``..``c3``, ``pooled``;
  the first column's all-zero state is folded into this graph.
- stage i > 0: ``x``, ``c0_in``..``c3_in`` -> ``c0``..``c3``, ``pooled``.
- ``x`` is (1, C0, H/4, W/4); the column features ``c0``..``c3`` cross stage boundaries
  channels-last, (1, H_l, W_l, C_l): they are only ever passed to the next stage, and in this
  layout ONNX Runtime's transpose optimizer cancels the boundary transposes against the
  blocks' own (RevCol-T at 224: 71 -> 20 Transpose nodes over the four stage graphs, fewer
  than the 36 of the unsplit graph).
- unsplit: ``image`` -> ``pooled`` of the last exit (for measuring stage-boundary overhead).
``manifest.json`` beside the graphs records names, shapes, hashes and versions.

The graphs are traced from an export form of the model (``export_form``) that computes the
same function with fewer nodes after ONNX Runtime's fusions; see there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttspec_ros.models.checkpoint import file_sha256
from ttspec_ros.models.revcol import ChannelsFirstLayerNorm, ConvNextBlock, RevCol

OPSET = 17
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Version of the traced graph layout (export_form). Cached graphs of another version are
# exported again, so robots pick up a faster layout without clearing their cache.
EXPORT_VERSION = 2
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


class _FoldedBlock(nn.Module):
    """Inference form of a ConvNextBlock: the layer scale ``gamma`` is folded into ``pwconv2``
    (one Mul node less per block) and drop path, an identity in eval mode, is left out."""

    def __init__(self, block: ConvNextBlock) -> None:
        super().__init__()
        self.dwconv, self.norm, self.pwconv1, self.act = (
            block.dwconv, block.norm, block.pwconv1, block.act
        )
        gamma = block.gamma.detach()
        self.pwconv2 = nn.Linear(block.pwconv2.in_features, block.pwconv2.out_features)
        self.pwconv2.to(block.pwconv2.weight.device)
        with torch.no_grad():
            self.pwconv2.weight.copy_(block.pwconv2.weight * gamma[:, None])
            self.pwconv2.bias.copy_(block.pwconv2.bias * gamma)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class _TransposedLayerNorm(nn.Module):
    """ChannelsFirstLayerNorm as one LayerNormalization node between two transposes.

    Traced literally, the channels-first LN is 9 reduce/elementwise nodes that ONNX Runtime
    does not fuse; in this form it becomes its fused LayerNormalization kernel and the
    transpose optimizer cancels most transposes against the blocks' own (RevCol-T at 224:
    817 -> 651 nodes after optimisation, 58 -> 36 Transpose; about 5 % less CPU time at one
    thread). Same arithmetic up to float rounding (~1e-6 relative on RevCol-T).
    """

    def __init__(self, norm: ChannelsFirstLayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def export_form(model: RevCol) -> RevCol:
    """A copy of ``model`` in eval mode whose blocks and channels-first LayerNorms are replaced
    by the equivalent export forms above; ``model`` itself is not touched."""
    twin = copy.deepcopy(model).eval()
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvNextBlock):
                setattr(module, name, _FoldedBlock(child))
            elif isinstance(child, ChannelsFirstLayerNorm):
                setattr(module, name, _TransposedLayerNorm(child))
    return twin


def stage_input_names(stage: int) -> list[str]:
    return ["image"] if stage == 0 else ["x", *(f"{n}_in" for n in STATE_NAMES)]


def stage_output_names(stage: int) -> list[str]:
    return (["x"] if stage == 0 else []) + [*STATE_NAMES, "pooled"]


CARRY_LAYOUT = "NHWC"  # of c0..c3 between stages (x stays NCHW)


def _to_carry(state) -> tuple[Tensor, ...]:
    return tuple(c.permute(0, 2, 3, 1) for c in state)


def _from_carry(carry) -> tuple[Tensor, ...]:
    return tuple(c.permute(0, 3, 1, 2) for c in carry)


class _FirstStage(nn.Module):
    def __init__(self, model: RevCol) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        x = self.model.stem(image)
        state = self.model.run_exit(0, x, (0.0, 0.0, 0.0, 0.0))
        return (x, *_to_carry(state), self.model.pool(state[3]))


class _LaterStage(nn.Module):
    def __init__(self, model: RevCol, stage: int) -> None:
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, x: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor):
        state = self.model.run_exit(self.stage, x, _from_carry((c0, c1, c2, c3)))
        return (*_to_carry(state), self.model.pool(state[3]))


class UnsplitForward(nn.Module):
    """Image -> last exit's pooled features in one call (no stage boundaries)."""

    def __init__(self, model: RevCol) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        x = self.model.stem(image)
        state = (0.0, 0.0, 0.0, 0.0)
        for k in range(self.model.num_columns):
            state = self.model.run_column(k, x, state)
        return self.model.pool(state[3])


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs, outputs) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript (not a dependency); this exporter yields the same static graphs.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            module, args, str(tmp), dynamo=False, opset_version=OPSET,
            input_names=list(inputs), output_names=list(outputs), do_constant_folding=True,
        )
    os.replace(tmp, path)


def image_shape_for(model: RevCol, image_size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    # stem /4, then three /2 downsamplings: every level needs whole pixels.
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive multiples of 32, got {h}x{w}")
    return (1, model.config.in_chans, h, w)


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
    import onnxruntime

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
            path = out / f"stage{i}.onnx"
            _export(module, args, path, stage_input_names(i), stage_output_names(i))
            stages.append(_graph_entry(path, i, shape, carry_shapes, pooled_shape))
        unsplit = None
        if include_unsplit:
            path = out / "unsplit.onnx"
            _export(UnsplitForward(traced), (image,), path, ["image"], ["pooled"])
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
        "carry_layout": {"x": "NCHW", **{n: CARRY_LAYOUT for n in STATE_NAMES}},
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
            "onnxruntime": onnxruntime.__version__,
        },
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _graph_entry(path: Path, stage: int, image_shape, carry_shapes: dict, pooled_shape) -> dict:
    inputs = (
        [{"name": "image", "shape": list(image_shape)}]
        if stage == 0
        else [{"name": "x", "shape": carry_shapes["x"]}]
        + [{"name": f"{n}_in", "shape": carry_shapes[n]} for n in STATE_NAMES]
    )
    outputs = [
        {"name": n, "shape": carry_shapes[n]} for n in stage_output_names(stage) if n != "pooled"
    ] + [{"name": "pooled", "shape": pooled_shape}]
    return {
        "index": stage, "file": path.name, "sha256": file_sha256(path),
        "inputs": inputs, "outputs": outputs,
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the graphs beside it are readable
    os.replace(tmp, path)


def load_manifest(graph_dir: str | os.PathLike, *, verify_files: bool = True) -> dict:
    """Read ``manifest.json``; with ``verify_files`` check every graph's sha256 against it."""
    graph_dir = Path(graph_dir)
    path = graph_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {graph_dir}; run `ttspec export-onnx` first")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: manifest format {manifest.get('format')!r}, this code reads "
            f"{MANIFEST_FORMAT}; export the graphs again"
        )
    if verify_files:
        unsplit = [manifest["unsplit"]] if manifest.get("unsplit") else []
        for entry in [*manifest["stages"], *unsplit]:
            graph = graph_dir / entry["file"]
            if not graph.is_file() or file_sha256(graph) != entry["sha256"]:
                raise ValueError(f"{graph} is missing or does not match its manifest hash")
    return manifest


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
