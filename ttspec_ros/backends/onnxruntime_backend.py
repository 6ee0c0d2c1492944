"""Staged backbone on ONNX Runtime (CPU execution provider), one session per cascade stage.

Column features stay in ONNX Runtime values between stages (no copy through numpy); only the
pooled head input of each exit comes back to torch, where the heads run. Every session's
inputs and outputs are bound once (IO binding) to buffers allocated at start, and each stage
reads the previous stage's output buffers in place: a stage run then allocates nothing and
binds nothing (on the demo model this halves the fixed cost of a stage run, 0.40 -> 0.24 ms,
which is most of the stage-boundary overhead). The carry returned by ``run_stage(i)`` is
therefore valid until the next ``run_stage(i)`` call, as with the TensorRT backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ttspec_ros.backends.onnx_export import STATE_NAMES, load_manifest

Carry = dict  # name -> onnxruntime.OrtValue; the next stage's inputs


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

        self._ort = ort
        self.graph_dir = Path(graph_dir)
        self.manifest = load_manifest(self.graph_dir)
        self.num_exits = int(self.manifest["num_stages"])
        self.image_shape = list(self.manifest["image_shape"])
        self.model_hash = self.manifest["model_hash"]
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self.allow_spinning = allow_spinning
        # The image is copied into this array; the bound OrtValue shares its memory.
        self._image = np.zeros(self.image_shape, dtype=np.float32)
        self._image_value = ort.OrtValue.ortvalue_from_numpy(self._image)
        self._stages: list[_BoundSession] = []
        for entry in self.manifest["stages"]:
            if entry["index"] == 0:
                inputs = {"image": self._image_value}
            else:
                previous = self._stages[-1].outputs
                inputs = {"x": self._stages[0].outputs["x"]}
                inputs.update({f"{n}_in": previous[n] for n in STATE_NAMES})
            self._stages.append(
                _BoundSession(ort, self._session(entry["file"]), inputs, entry["outputs"])
            )
        self._unsplit: _BoundSession | None = None

    def _session(self, file: str):
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        # Spinning (allow_spinning): intra-op workers wait busily for the next op instead of
        # sleeping. Measured on RevCol-T at 224, 2 threads, 2 cores:
        # - gain on a quiet machine: unsplit 102 ms spinning vs 115 ms sleeping (-11 %);
        # - plain ORT spinning does not stop when Run returns: the idle stage sessions' pools
        #   spun against the running one (staged 270 ms) and a process burnt ~40 ms CPU in
        #   the 200 ms after each frame, i.e. while a robot waits for the next camera frame.
        #   "force_spinning_stop" (always set here with spinning) ends the spin when each
        #   Run returns: idle CPU after a run 0.08 ms per 200 ms, and only the running
        #   stage's pool spins;
        # - during a run, spinning workers still take cores from other processes; with the
        #   cores oversubscribed (load 5-7 on 2 cores) staged forwards took 477 ms spinning
        #   vs 226 ms sleeping. A robot shares its cores with the camera, adapter and the
        #   rest of its stack, so sleeping is the default; spinning is for dedicated cores.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        if self.allow_spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        if self.num_threads is not None:
            options.intra_op_num_threads = int(self.num_threads)
        return ort.InferenceSession(
            str(self.graph_dir / file), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def _set_image(self, image: Tensor) -> None:
        image = check_image(image, self.image_shape)
        np.copyto(self._image, image.detach().cpu().numpy(), casting="same_kind")

    def run_stage(self, i: int, carry: Tensor | Carry) -> tuple[Carry | None, Tensor]:
        if not 0 <= i < self.num_exits:
            raise IndexError(f"stage {i} out of range 0..{self.num_exits - 1}")
        stage = self._stages[i]
        if i == 0:
            self._set_image(carry)
        else:
            stage.bind(carry)  # no-op for the carry of this backbone's previous stage
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
            self._unsplit = _BoundSession(
                self._ort, self._session(entry["file"]), {"image": self._image_value},
                entry["outputs"],
            )
        self._set_image(image)
        return torch.tensor(self._unsplit.run()["pooled"].numpy())
