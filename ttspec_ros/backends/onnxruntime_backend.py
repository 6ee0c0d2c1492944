"""Staged backbone on ONNX Runtime (CPU execution provider), one session per cascade stage.

Column features stay in ONNX Runtime values between stages (no copy through numpy); only the
pooled head input of each exit comes back to torch, where the heads run. Every session's
inputs and outputs are bound once (IO binding) to buffers allocated at start, and each stage
reads the previous stage's output buffers in place: a stage run then allocates nothing and
binds nothing (on the demo model this halves the fixed cost of a stage run, 0.40 -> 0.24 ms,
which is most of the stage-boundary overhead). The carry returned by ``run_stage(i)`` is
therefore valid until the next ``run_stage(i)`` call, as with the TensorRT backend.

Carries cross stage boundaries in ONNX Runtime's blocked NCHWc layout (see
``_keep_carries_blocked``): the exported graphs carry NCHW, and ONNX Runtime's optimiser puts a
reorder out of its blocked layout at every carry output and one back in at every carry input.
Those reorders were most of the overhead that remained after IO binding; a carry is opaque to
the caller.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor

from ttspec_ros.backends import check_num_threads, release
from ttspec_ros.backends.onnx_export import (
    MANIFEST,
    STATE_NAMES,
    load_manifest,
    read_graph,
    shape_problem,
)

if TYPE_CHECKING:  # onnx is imported where graphs are edited (an optional dependency)
    from onnx import NodeProto

# Bounded spinning, the default: an intra-op worker that has no work spins this long for the
# next op before it sleeps, so the gaps between the ops of one run cost no wake-ups, and a
# worker sleeps again within SPIN_US once a run ends. RevCol-T at 224, 2 threads, 2 cores,
# unsplit graph, paired medians against sleeping workers:
# - quiet machine: 58.7 vs 65.0 and 54.5 vs 58.9 ms (-7 to -10 %), the gain of unbounded
#   spinning (59.7, 55.0 ms); 10, 25 and 100 us gave the same within noise;
# - cores oversubscribed (3 busy processes on 2 cores): 192 / 178 vs 186 / 185 ms, where
#   unbounded spinning took 253 / 243 ms;
# - 10 Hz stream: 134 vs 124 ms of CPU per frame (+8 %) for 58.1 vs 67.5 ms latency; CPU in
#   the 0.5 s after a run 0.1 ms either way.
# ONNX Runtime reads the setting from 1.26 on; older releases would ignore it and spin without
# bound during runs, so there workers sleep at once as before.
SPIN_US = 50
_SPIN_US_SINCE = (1, 26)


def bounded_spin_us(ort_version: str) -> int:
    """SPIN_US where this ONNX Runtime release bounds the spin, else 0 (sleep at once)."""
    version = release(ort_version)
    return SPIN_US if version is not None and version >= _SPIN_US_SINCE else 0


Carry = dict  # name -> onnxruntime.OrtValue; the next stage's inputs
# A blocked carry must have the size of its NCHW form (the bound buffers are allocated from the
# manifest's NCHW shapes): true when its channels are a multiple of the block size, which is
# 16 with AVX-512 and 8 on other x86-64 CPUs in ONNX Runtime's kernels; others keep their
# reorders.
_BLOCK_MULTIPLE = 16


class _BoundSession:
    """A session whose outputs go to buffers allocated once and whose inputs stay bound
    between runs (rebound only when a run is given other values)."""

    def __init__(self, ort, session, inputs: dict, outputs: list[dict]) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.outputs = {
            o["name"]: ort.OrtValue.ortvalue_from_shape_and_type(o["shape"], np.float32, "cpu")
            for o in outputs
        }
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.inputs: dict = {}
        self.bind(inputs)

    def bind(self, inputs: dict) -> None:
        for name, value in inputs.items():
            if self.inputs.get(name) is not value:
                self.binding.bind_ortvalue_input(name, value)
                self.inputs[name] = value

    def run(self) -> dict:
        self.session.run_with_iobinding(self.binding)
        return self.outputs


def check_image(image: Tensor, expected_shape: list[int]) -> Tensor:
    """(C,H,W) or (1,C,H,W) float image -> (1,C,H,W); the graphs have static shapes."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if list(image.shape) != list(expected_shape):
        raise ValueError(
            f"image shape {tuple(image.shape)} does not match the exported graphs "
            f"{tuple(expected_shape)} (static shapes, batch 1)"
        )
    return image


class OnnxRuntimeBackbone:
    """``run_stage(i, carry) -> (carry, pooled (1, C3))``; stage 0 takes the image tensor.

    One frame at a time (the Cascade runs frames under its lock): the stages share bound
    buffers, so concurrent frames on one backbone would overwrite each other's carries.
    """

    backend = "onnxruntime"
    device = "cpu"

    def __init__(
        self,
        graph_dir: str | os.PathLike,
        *,
        num_threads: int | None = None,
        allow_spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        # Before the sessions (and their graph optimisation) are made; benchmarks and tests
        # construct this directly, not through create_backbone.
        num_threads = check_num_threads(num_threads)
        self._ort = ort
        self.graph_dir = Path(graph_dir)
        # Each graph is hash-checked as it is read (read_graph), on the bytes the session gets.
        self.manifest = load_manifest(self.graph_dir, verify_files=False)
        self.num_exits = int(self.manifest["num_stages"])
        self.image_shape = list(self.manifest["image_shape"])
        self.model_hash = self.manifest["model_hash"]
        self.num_threads = num_threads
        self.allow_spinning = allow_spinning
        self.spin_us = bounded_spin_us(ort.__version__)
        # The image is copied into this array; the bound OrtValue shares its memory.
        self._image = np.zeros(self.image_shape, dtype=np.float32)
        self._image_value = ort.OrtValue.ortvalue_from_numpy(self._image)
        graphs = [self._optimized_graph(read_graph(self.graph_dir, entry))
                  for entry in self.manifest["stages"]]
        self.blocked_carries = _keep_carries_blocked(graphs)
        sessions = [self._session(graph.SerializeToString(), optimize=False) for graph in graphs]
        self._stages: list[_BoundSession] = []
        for entry in self.manifest["stages"]:
            self._check_shapes(entry, sessions[entry["index"]])
            if entry["index"] == 0:
                inputs = {"image": self._image_value}
            else:
                previous = self._stages[-1].outputs
                inputs = {"x": self._stages[0].outputs["x"]}
                inputs.update({f"{n}_in": previous[n] for n in STATE_NAMES})
            self._stages.append(_BoundSession(ort, sessions[entry["index"]], inputs,
                                              entry["outputs"]))
        self._unsplit: _BoundSession | None = None

    def _check_shapes(self, entry: dict, session) -> None:
        """The graphs are hash-checked, the shapes the manifest gives them are not: buffers
        are allocated by those, so an edited shape failed inside ONNX Runtime at a frame."""
        declared = {side: {m.name: list(m.shape) for m in metas}
                    for side, metas in (("inputs", session.get_inputs()),
                                        ("outputs", session.get_outputs()))}
        problem = shape_problem(entry, declared)
        if problem:
            raise ValueError(f"{self.graph_dir / MANIFEST} does not match {entry['file']}: "
                             f"{problem}; export the graphs again")

    def _optimized_graph(self, model: bytes):
        """The graph as ONNX Runtime optimises it for this machine (NCHWc nodes included)."""
        import onnx

        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        # ONNX Runtime warns that a saved NCHWc graph fits only the machine that made it; this
        # one is used in this process only.
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="ttspec-ort-") as tmp:
            options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            ort.InferenceSession(model, sess_options=options,
                                 providers=["CPUExecutionProvider"])
            return onnx.load(options.optimized_model_filepath)

    def _session(self, model: bytes, *, optimize: bool = True):
        """A session on a serialized graph, or (``optimize=False``) an already optimised one."""
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        # Spinning: intra-op workers wait busily for the next op instead of sleeping.
        # Measured on RevCol-T at 224, 2 threads, 2 cores:
        # - gain on a quiet machine: unsplit 102 ms spinning vs 115 ms sleeping (-11 %);
        # - plain ORT spinning does not stop when Run returns: the idle stage sessions' pools
        #   spun against the running one (staged 270 ms) and a process burnt ~40 ms CPU in
        #   the 200 ms after each frame, i.e. while a robot waits for the next camera frame.
        #   "force_spinning_stop" (set here with allow_spinning) ends the spin when each Run
        #   returns: idle CPU after a run 0.08 ms per 200 ms;
        # - during a run, unbounded spinning still takes cores from other processes; with the
        #   cores oversubscribed (load 5-7 on 2 cores) staged forwards took 477 ms spinning
        #   vs 226 ms sleeping. A robot shares its cores with the camera, adapter and the
        #   rest of its stack, so unbounded spinning (allow_spinning) is for dedicated cores.
        # The default spins for at most SPIN_US between ops (see there).
        spin_us = self.spin_us
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning or spin_us else "0"
        )
        if self.allow_spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        elif spin_us:
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        if self.num_threads is not None:
            options.intra_op_num_threads = self.num_threads  # an int (check_num_threads)
        return ort.InferenceSession(model, sess_options=options,
                                    providers=["CPUExecutionProvider"])

    def _set_image(self, image: Tensor) -> None:
        image = check_image(image, self.image_shape)
        np.copyto(self._image, image.detach().cpu().numpy(), casting="same_kind")

    def run_stage(self, i: int, carry: Tensor | Carry) -> tuple[Carry | None, Tensor]:
        if not 0 <= i < self.num_exits:
            raise IndexError(f"stage {i} out of range 0..{self.num_exits - 1}")
        stage = self._stages[i]
        # casts: stage 0's carry is the image, a later stage's the carry the one before it
        # returned (the StagedBackbone contract the Cascade keeps)
        if i == 0:
            self._set_image(cast(Tensor, carry))
        else:
            stage.bind(cast(Carry, carry))  # no-op for the carry of this backbone's previous stage
        out = stage.run()
        pooled = torch.tensor(out["pooled"].numpy())  # copy: tiny, owns its memory
        if i == self.num_exits - 1:
            return None, pooled  # the last graph outputs no carry (nothing follows it)
        next_carry = {"x": self._stages[0].outputs["x"]}
        next_carry.update({f"{n}_in": out[n] for n in STATE_NAMES})
        return next_carry, pooled

    def run_unsplit(self, image: Tensor) -> Tensor:
        """Last exit's pooled features from the one-graph export (overhead reference), run
        the same way as the stages."""
        if self._unsplit is None:
            entry = self.manifest.get("unsplit")
            if not entry:
                raise ValueError(f"{self.graph_dir} has no unsplit graph (export it with the CLI)")
            session = self._session(read_graph(self.graph_dir, entry))
            self._check_shapes(entry, session)
            self._unsplit = _BoundSession(self._ort, session, {"image": self._image_value},
                                          entry["outputs"])
        self._set_image(image)
        return torch.tensor(self._unsplit.run()["pooled"].numpy())


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _reorder_outputs(graph) -> dict[str, NodeProto]:
    """Graph output name -> the ReorderOutput (blocked -> NCHW) that makes it, where the blocked
    tensor has the output's size and no node of the graph reads the NCHW output (ONNX Runtime
    shares one ReorderOutput between a graph output and the graph's NCHW readers)."""
    producers = {name: node for node in graph.node for name in node.output}
    read = {name for node in graph.node for name in node.input}
    found = {}
    for output in graph.output:
        node = producers.get(output.name)
        if node is None or node.op_type != "ReorderOutput" or output.name in read:
            continue
        attrs = _attributes(node)
        if not attrs.get("channels_last", 0) and attrs.get("channels", 1) % _BLOCK_MULTIPLE == 0:
            found[output.name] = node
    return found


def _reorder_inputs(graph) -> dict[str, NodeProto]:
    """Graph input name -> the ReorderInput (NCHW -> blocked) that is its only reader."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = {}
    for graph_input in graph.input:
        nodes = readers.get(graph_input.name, [])
        if (len(nodes) == 1 and nodes[0].op_type == "ReorderInput"
                and not _attributes(nodes[0]).get("channels_last", 0)):
            found[graph_input.name] = nodes[0]
    return found


def _keep_carries_blocked(graphs: list) -> list[list[str]]:
    """Removes, in the optimised stage graphs, the reorders of every carry whose producing and
    reading stages all convert it between NCHW and the same blocked layout, so the carry's bytes
    pass between them as they are. Returns each stage's carry outputs now blocked.

    ``ttspec bench-backends --repeats 80`` (2 threads, sleeping workers), stage-boundary
    overhead as the paired median against the unsplit graph: RevCol-T at 224 3.2 -> 1.3 %
    (the median of 7 runs, which ranged 0.2-2.8 %), the demo model 19 -> 9.5 %. The pooled
    features came out bit-identical to those of NCHW carries. The price is at start: each
    stage is optimised twice over (RevCol-T at 224: 1.4 instead of 0.44 s for the four
    sessions).
    """
    num_stages = len(graphs)
    # (producing stage, output) -> [(reading stage, input)]: x comes from stage 0 to all others
    links: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for stage in range(1, num_stages):
        links.setdefault((0, "x"), []).append((stage, "x"))
        links.update({(stage - 1, n): [(stage, f"{n}_in")] for n in STATE_NAMES})
    outs = [_reorder_outputs(g.graph) for g in graphs]
    ins = [_reorder_inputs(g.graph) for g in graphs]
    removed: list[dict[str, str]] = [{} for _ in graphs]  # stage -> {tensor: name it takes}
    blocked: list[list[str]] = [[] for _ in graphs]
    for (producer, output), readers in links.items():
        if output not in outs[producer] or any(name not in ins[r] for r, name in readers):
            continue  # one side keeps NCHW, so both do
        node = outs[producer][output]
        graphs[producer].graph.node.remove(node)
        removed[producer][node.input[0]] = output
        for reader, name in readers:
            node = ins[reader][name]
            graphs[reader].graph.node.remove(node)
            removed[reader][node.output[0]] = name
        blocked[producer].append(output)
    for graph, renames in zip(graphs, removed, strict=True):
        kept = [v for v in graph.graph.value_info if v.name not in renames]
        del graph.graph.value_info[:]
        graph.graph.value_info.extend(kept)  # the tensors renamed away no longer exist
        for node in graph.graph.node:
            for field in (node.input, node.output):
                for k, name in enumerate(field):
                    field[k] = renames.get(name, name)
    return blocked
