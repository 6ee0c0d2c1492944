"""Classifier node: ``frames`` -> early-exit cascade -> ``predictions`` (+ ``adaptation_samples``).

The subscription callback only stores the newest frame (``LatestSlot``: one pending frame at
most, a replaced one counts as dropped); a worker thread runs the cascade, so the executor
stays free for parameters, model updates and diagnostics. ``model_updates`` (reliable,
transient local) are validated and applied by ``Cascade.apply_update`` between two frames.

``model`` can change live: the new cascade gets the latest update received for its model id
(a switch back to an adapted model keeps its adaptation, although the adapter's latched update
arrived only once), and thresholds still at the old card's defaults become the new card's.
The new model loads in the parameter callback, so that a model that fails to load is refused
with its reason: the executor waits meanwhile (demo model ~0.1 s; an ONNX export or a TensorRT
engine build much longer), and so do frames, updates and diagnostics.
"""

from __future__ import annotations

import array
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Any

import numpy as np
import torch
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import Image

from ttspec_ros import params, topics
from ttspec_ros.image_codec import ImageDecodeError, decode_frame
from ttspec_ros.model_update import ModelUpdatePayload, from_msg
from ttspec_ros.msg import AdaptationSample, CascadePrediction, ModelUpdate
from ttspec_ros.nodes import (
    MATCHED_FRAMES_WRITERS,
    MATCHED_PREDICTIONS_READERS,
    MATCHED_SAMPLES_READERS,
    Diagnostics,
    LatestSlot,
    StartupError,
    Stats,
    Throttle,
    accept,
    changed_values,
    declare,
    matched_writers,
    plain_value,
    qos,
    refuse,
    run_node,
)
from ttspec_ros.preprocess import frame_bounds, frame_problem, input_shape
from ttspec_ros.specialize import pack_features

KEPT_UPDATES = 4  # latest updates of this many model ids, for a live switch back to one
# Updates for a model not running cannot be checked yet: the last few are kept, so one that
# fails on the switch does not cost the good one before it.
KEPT_PER_MODEL = 3


class LoadedModel:
    """A cascade with the card facts the node needs, swapped as one object on `model` change.
    The backbone runs on ``backend``/``device``; the heads stay in torch (updatable on every
    backend; backbone tensors only on torch)."""

    def __init__(self, model_path: str, num_threads: int | None, backend: str = "torch",
                 device: str = "cpu") -> None:
        from ttspec_ros.backends import BackendUnavailable, create_backbone
        from ttspec_ros.cascade import Cascade
        from ttspec_ros.models.checkpoint import load_model

        try:
            # Decoders serve test-time training only; inference and head updates need none.
            model, card = load_model(model_path or None, with_decoders=False)
        except Exception as e:  # whatever a bad file raises, a live change must not end the node
            raise StartupError(f"cannot load model {model_path or '(bundled demo)'!r}: "
                               f"{type(e).__name__}: {e}") from e
        self.input_shape = input_shape(card.input)
        self.frame_bounds = frame_bounds(card.input)
        try:
            backbone = create_backbone(backend, model, device=device, num_threads=num_threads,
                                       image_size=self.input_shape[1])
            self.cascade = Cascade(model, card.thresholds, num_threads, backbone=backbone,
                                   model_id=card.model_id)
        except BackendUnavailable as e:
            raise StartupError(f"backend {backend!r} is unavailable: {e}") from e
        except Exception as e:  # a bad device, an unwritable cache, ONNX Runtime's own errors
            raise StartupError(f"backend {backend!r} on device {device!r}: "
                               f"{type(e).__name__}: {e}") from e
        self.card = card
        self.path = model_path
        self.backend = backend
        self.num_exits = self.cascade.num_exits


class ClassifierNode(Node):
    def __init__(self) -> None:
        super().__init__(topics.CLASSIFIER_NODE)
        # model and num_threads first: the cascade needs them, and `thresholds` defaults to
        # the loaded card's values.
        first = [params.spec(topics.CLASSIFIER_NODE, n)
                 for n in ("model", "num_threads", "backend", "device")]
        values = declare(self, first)
        reason = params.check_params(topics.CLASSIFIER_NODE, values)
        if reason:
            raise StartupError(f"classifier: {reason}")
        loaded = LoadedModel(values["model"], values["num_threads"], values["backend"],
                             values["device"])
        rest = [s for s in params.CLASSIFIER if s not in first]
        values.update(declare(self, rest, {"thresholds": _card_thresholds(loaded)}))
        reason = params.check_classifier(values, loaded.num_exits)
        if reason:
            raise StartupError(f"classifier: {reason}")
        self._values = values
        # The model and the settings the worker uses, swapped as one tuple: a frame never
        # sees a new model with the old model's thresholds.
        self._active = (loaded, self._settings_from(values))
        self._threads_wanted = values["num_threads"]
        self.stats = Stats()
        self._throttle = Throttle()
        self.exit_histogram: Counter[int] = Counter()
        self.max_pending = 0
        self._slot = LatestSlot()
        self._stop = threading.Event()
        self._updates: OrderedDict[str, deque[ModelUpdatePayload]] = OrderedDict()

        self._pred_pub = self.create_publisher(CascadePrediction, topics.PREDICTIONS,
                                               qos(topics.QOS_RELIABLE))
        self._sample_pub = self.create_publisher(AdaptationSample, topics.ADAPTATION_SAMPLES,
                                                 qos(topics.QOS_RELIABLE))
        self._frames_sub = self.create_subscription(
            Image, topics.FRAMES, self._on_frame, qos(topics.QOS_FRAMES),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self.create_subscription(ModelUpdate, topics.MODEL_UPDATES, self._on_update,
                                 qos(topics.QOS_LATCHED))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diagnostics = Diagnostics(self, self._diagnostic_values,
                                        warn_on=("rejected", "updates_rejected",
                                                 "updates_version_went_back"),
                                        jobs={"errors": "classified"},
                                        expect=("received", "frames"))
        self._worker = threading.Thread(target=self._work, name="cascade", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"classifier: model {self.loaded.cascade.model_id} ({self.loaded.num_exits} exits, "
            f"input {self.loaded.input_shape}), backend {values['backend']} on "
            f"{values['device']}, thresholds {self.settings['thresholds']}")

    @property
    def loaded(self) -> LoadedModel:
        return self._active[0]

    @property
    def settings(self) -> dict[str, Any]:
        return self._active[1]

    @staticmethod
    def _settings_from(values: dict[str, Any]) -> dict[str, Any]:
        return {
            "thresholds": params.effective_thresholds(values["threshold"], values["thresholds"]),
            "max_exit": None if values["max_exit"] < 0 else values["max_exit"],
            "publish_samples": values["publish_samples"],
        }

    # -- parameters (applied live; refused with the reason, nothing changed)
    def _on_set_parameters(self, changes: list[Parameter]):
        # Values equal to the current ones change nothing (and a re-sent value is no new intent).
        new = {k: v for k, v in changed_values(topics.CLASSIFIER_NODE, changes).items()
               if plain_value(self._values.get(k)) != v}
        if not new:
            return accept()
        merged = {**self._values, **new}
        reason = params.check_params(topics.CLASSIFIER_NODE, new)
        loaded = self.loaded
        if not reason and "model" in new and new["model"] != loaded.path:
            try:
                # The worker thread sets torch's thread count itself, between frames; ONNX
                # Runtime sessions take theirs when they are created, here.
                threads = None if merged["backend"] == "torch" else merged["num_threads"]
                loaded = LoadedModel(new["model"], threads, merged["backend"], merged["device"])
            except StartupError as e:
                reason = str(e)
        follow = (loaded is not self.loaded and "thresholds" not in new
                  and list(self._values["thresholds"]) == _card_thresholds(self.loaded))
        if follow:
            merged["thresholds"] = _card_thresholds(loaded)
        if not reason:
            reason = params.check_classifier(merged, loaded.num_exits, list(new))
        if reason:
            return refuse(self, new, reason)
        if loaded is not self.loaded:
            self._reapply_update(loaded)
        self._values = merged
        self._threads_wanted = merged["num_threads"]
        self._active = (loaded, self._settings_from(merged))
        if follow:
            self._publish_parameter("thresholds", merged["thresholds"])
        self.get_logger().info(f"parameters set: {new}"
                               + (f", thresholds {merged['thresholds']} from the new model's "
                                  "card" if follow else ""))
        return accept()

    def _publish_parameter(self, name: str, value: Any) -> None:
        """Make the parameter show ``value``, which the node already uses. A callback cannot
        set parameters itself, so a one-shot timer does it once this change is done; the
        callback then sees an unchanged value and accepts. Skipped if the value changed
        meanwhile (the parameter service applies a request's values one at a time, so
        ``model`` and ``thresholds`` set together arrive as two changes before the timer)."""
        def set_once() -> None:
            self.destroy_timer(timer)
            if plain_value(self._values.get(name)) == value:
                self.set_parameters([Parameter(name, value=value)])

        timer = self.create_timer(0.0, set_once)

    def _reapply_update(self, loaded: LoadedModel) -> None:
        """After a switch to ``loaded``: its newest kept update that applies (others dropped)."""
        kept = self._updates.get(loaded.cascade.model_id)
        while kept:
            payload = kept[-1]
            try:
                self._check_and_apply(loaded, payload)
            except ValueError as e:
                self._update_rejected(payload.version, e, "refused")
                kept.pop()
                continue
            self.get_logger().info(f"model {loaded.cascade.model_id}: applied its latest "
                                   f"update v{payload.version} again")
            return

    # -- frames
    def _on_frame(self, msg: Image) -> None:
        self.stats.count("received")
        if self._slot.put((msg, time.perf_counter())):
            self.stats.count("dropped")
        self.max_pending = max(self.max_pending, self._slot.pending())

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._slot.take(timeout=0.2)
            if item is None:
                continue
            if self._threads_wanted != torch.get_num_threads():
                torch.set_num_threads(self._threads_wanted)
            try:
                self._classify(*item)
            except Exception as e:  # keep serving frames; the log says what went wrong
                if self._stop.is_set() or not self.context.ok():
                    return  # shut down under this frame (publish fails): not a frame error
                self.stats.count("errors")
                self.get_logger().error(f"frame failed: {type(e).__name__}: {e}",
                                        throttle_duration_sec=5.0)

    def _classify(self, msg: Image, received: float) -> None:
        started = time.perf_counter()
        loaded, settings = self._active
        try:
            x = decode_frame(msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step,
                             msg.data)
        except ImageDecodeError as e:
            self._reject(e.reason, str(e))
            return
        problem = frame_problem(x, loaded.input_shape, loaded.frame_bounds)
        if problem:
            self._reject(*problem)
            return
        self.stats.add("queue_wait_ms", (time.perf_counter() - received) * 1000.0)
        r = loaded.cascade.run(torch.from_numpy(x), thresholds=settings["thresholds"],
                               max_exit=settings["max_exit"])
        pred = CascadePrediction(
            header=msg.header, class_id=r.class_id, class_name=loaded.card.class_names[r.class_id],
            confidence=float(r.confidence), exit_index=r.exit_index,
            num_exits=loaded.num_exits, exit_confidences=[float(c) for c in r.exit_confidences],
            latency_ms=float(r.latency_ms), model_version=r.model_version)
        self._pred_pub.publish(pred)
        self.stats.count("classified")
        self.stats.add("model_ms", r.latency_ms)
        # What a live threshold change or specialization moves (recent_mean_* on /diagnostics).
        self.stats.add("exit", r.exit_index)
        self.stats.add("cost", loaded.card.exit_cost[r.exit_index])
        self.exit_histogram[r.exit_index] += 1
        if settings["publish_samples"] and r.exit_index > 0:
            sizes, flat = pack_features(r.features[: r.exit_index])
            self._sample_pub.publish(AdaptationSample(
                header=msg.header, model_id=loaded.cascade.model_id,
                model_version=r.model_version, exit_index=r.exit_index, class_id=r.class_id,
                confidence=float(r.confidence), feature_sizes=sizes,
                features=array.array("f", flat.astype(np.float32).tobytes())))
            self.stats.count("samples_published")
        # Frame handling besides the model (decode, messages, publishing): the node's share.
        self.stats.add("handling_ms", (time.perf_counter() - started) * 1000.0 - r.latency_ms)

    def _reject(self, reason: str, message: str) -> None:
        self.stats.count(f"rejected_{reason}")
        self.stats.count("rejected")
        self.stats.note("last_rejection", message)
        if self._throttle(reason):
            self.get_logger().warning(f"rejected frame ({reason}): {message}")

    # -- model updates
    def _on_update(self, msg: ModelUpdate) -> None:
        self.stats.count("updates_received")
        loaded = self.loaded
        try:
            payload = from_msg(msg)
        except ValueError as e:
            self._update_rejected(msg.version, e, "malformed")
            return
        other_model = payload.model_id != loaded.cascade.model_id
        try:
            if other_model:
                self._keep_update(payload)  # for a switch to that model
            self._check_and_apply(loaded, payload)
        except ValueError as e:
            self._update_rejected(msg.version, e, "other_model" if other_model else "refused")
            return
        self._keep_update(payload)
        self.get_logger().debug(f"applied model update v{payload.version}")

    def _keep_update(self, payload: ModelUpdatePayload) -> None:
        kept = self._updates.setdefault(payload.model_id, deque(maxlen=KEPT_PER_MODEL))
        if payload.model_id == self.loaded.cascade.model_id:
            kept.clear()  # it applied: older ones are no use any more
        kept.append(payload)
        self._updates.move_to_end(payload.model_id)
        running = self.loaded.cascade.model_id
        while len(self._updates) > KEPT_UPDATES:  # the oldest other model's goes first
            oldest = next(k for k in self._updates if k != running)
            del self._updates[oldest]

    def _check_and_apply(self, loaded: LoadedModel, payload: ModelUpdatePayload) -> None:
        cascade = loaded.cascade
        if payload.model_id != cascade.model_id:
            raise ValueError(f"update is for model {payload.model_id!r}, this classifier "
                             f"runs {cascade.model_id!r}")
        # (only on fixed graphs: the state-dict names cost ~3 ms per update to gather)
        backbone = set() if cascade.torch_backbone else (
            (set(payload.tensors) & set(cascade.model.state_dict()))
            - set(cascade.updatable_tensor_names()))
        if backbone:
            # Test-time training (adapter strategy ttt_online/both) changes the backbone;
            # exported graphs/engines cannot take it, and half an update is no update.
            raise ValueError(
                f"update changes {len(backbone)} backbone tensors (e.g. "
                f"{sorted(backbone)[0]!r}); backend {loaded.backend!r} runs a fixed "
                "graph, only head tensors (cls_blocks.*) can change: adapter strategies "
                "that train the backbone need classifier backend 'torch'")
        previous = cascade.version
        restored = cascade.apply_update(payload.tensors, payload.version)
        self.stats.count("updates_applied")
        if restored:
            self.get_logger().info(
                f"model update v{payload.version} leaves out {len(restored)} tensors an "
                f"earlier update changed (e.g. {restored[0]!r}): back to the model file's")
        if payload.version < previous:
            # Applied all the same (the adapter's state is what counts), but version numbers
            # now name other tensors than before: say so.
            self.stats.count("updates_version_went_back")
            if self._throttle("version_went_back"):
                self.get_logger().warning(
                    f"model update v{payload.version} is older than the v{previous} "
                    "applied before: the adapter restarted without state_dir (its adaptation "
                    "starts over) or another adapter publishes for this model")

    def _update_rejected(self, version: int, error: ValueError, reason: str) -> None:
        """Count, keep the message for diagnostics, warn throttled per ``reason``: the
        message names sizes and tensors, so as the key it gave every bad update a warning
        (a review: 40 varied bad updates in 2 s, 40 warnings) and the throttle a new entry."""
        self.stats.count("updates_rejected")
        self.stats.note("last_update_rejection", str(error))
        if self._throttle(f"update:{reason}"):
            self.get_logger().warning(f"rejected model update v{version}: {error}")

    # -- diagnostics
    def _diagnostic_values(self) -> tuple[str, dict[str, str | int]]:
        pending = self._slot.pending()
        values: dict[str, str | int] = dict(self.stats.snapshot())
        loaded, settings = self._active
        values.update({
            "model_id": loaded.cascade.model_id,
            "model_version": loaded.cascade.version,
            "backend": loaded.backend,
            "pending": pending,
            "max_pending": self.max_pending,
            "thresholds": " ".join(f"{t:.3f}" for t in settings["thresholds"]),
            MATCHED_PREDICTIONS_READERS: self._pred_pub.get_subscription_count(),
            MATCHED_SAMPLES_READERS: self._sample_pub.get_subscription_count(),
        })
        writers = matched_writers(self._frames_sub)
        if writers is not None:
            values[MATCHED_FRAMES_WRITERS] = writers
        for i in range(loaded.num_exits):
            values[f"exit_{i}"] = self.exit_histogram[i]
        msg = (f"{values.get('classified', 0)} classified, {values.get('dropped', 0)} dropped, "
               f"model v{values['model_version']}")
        return msg, values

    def close(self) -> None:
        self._stop.set()
        self._slot.close()
        self._worker.join(timeout=5.0)


def _card_thresholds(loaded: LoadedModel) -> list[float]:
    return [float(t) for t in loaded.card.thresholds]


# The executor thread hands each frame to the worker, which then waits for the GIL until the
# executor blocks in rcl_wait again or the switch interval (5 ms by default) forces a switch.
SWITCH_INTERVAL_S = 2e-4


def main(args: list[str] | None = None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return run_node(ClassifierNode, args)
