"""Adapter node: ``adaptation_samples`` -> Specializer (background thread) -> ``model_updates``.

Samples are queued by the subscription callback and trained on by a worker thread, so the
executor never waits for an SGD step. A timer publishes the current heads at most every
``publish_period_s`` when they changed (reliable + transient local: a classifier that starts
later still gets the latest). With ``state_dir`` the state is saved atomically every
``save_period_s``, on ``~/save`` and at shutdown (after training on the samples still queued,
for at most ``DRAIN_S``, on a partly filled batch, and checking the last unchecked steps:
``Specializer.flush``), and resumed (and republished)
at start; a bound on the published versions is recorded there too (``PublishedRecord``), so
an adapter restarted after a crash numbers its updates above what the classifiers already hold.
One adapter at a time uses a state_dir (``DirectoryLock``).
Any number of classifiers running the same model may feed one adapter. A failing step,
publication or save is counted, logged and survived: the node keeps its last good state.

With ``anchors_file`` (from ``ttspec make-anchors``) the Specializer runs with the forgetting
guard (``ttspec_ros.guard.AnchorGuard``): anchors are rehearsed with every step, and heads
that lose agreement with the last exit on them are rolled back; only checked heads are
published.

``strategy`` picks what adapts: ``specialize`` (the early heads, from samples), ``ttt_online``
(test-time training of the backbone with masked reconstruction on ``frames``, one step per
frame, kept: ``ttspec_ros.ttt`` online mode, in its own thread; frames arriving while a step
runs replace the pending one and are counted as dropped) or ``both``. The published update then
holds the adapted backbone tensors too, versioned by the sum of both engines' versions (each
only grows). Only classifiers with backend ``torch`` apply backbone tensors; the others refuse
such updates and log why. With ``state_dir`` the test-time-trained tensors are saved and
resumed too (``ttt.safetensors`` beside ``specializer.safetensors``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import rclpy.logging
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from ttspec_ros import params, topics
from ttspec_ros.files import DirectoryLock, remove_temporaries
from ttspec_ros.guard import AnchorGuard, AnchorSet
from ttspec_ros.image_codec import ImageDecodeError, decode_frame
from ttspec_ros.model_update import PUBLISHED_FILE, ModelUpdatePayload, PublishedRecord, to_msg
from ttspec_ros.msg import AdaptationSample, ModelUpdate
from ttspec_ros.nodes import (
    Diagnostics,
    LatestSlot,
    StartupError,
    Stats,
    Throttle,
    accept,
    changed_values,
    declare,
    qos,
    refuse,
    run_node,
    steady_timer,
)
from ttspec_ros.preprocess import frame_bounds, frame_problem, input_shape
from ttspec_ros.specialize import (
    STATE_FILE,
    Specializer,
    early_head_tensors,
    unpack_features,
)
from ttspec_ros.ttt import STATE_FILE as TTT_STATE_FILE

SAMPLE_QUEUE = 256  # samples waiting for the trainer; older ones are dropped (and counted)
DRAIN_S = 2.0  # at most this long at shutdown for the samples still queued


class AdapterNode(Node):
    def __init__(self) -> None:
        super().__init__(topics.ADAPTER_NODE)
        values = declare(self, params.ADAPTER)
        reason = params.check_adapter(values)
        if reason:
            raise StartupError(f"adapter: {reason}")
        self._values = values
        self.stats = Stats()
        self._throttle = Throttle()
        self.strategy = values["strategy"]
        self._specializing = self.strategy in ("specialize", "both")
        self.specializer, self.ttt = self._build_engines(values)
        self._frames = LatestSlot()
        self._ttt_loss: float | None = None
        self._queue: deque[AdaptationSample] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._published_version: int | None = None
        self._version_offset = 0  # PublishedRecord.offset_for after a resume
        self._reserved: int | None = None  # versions up to this are in published.json
        self._state_lock: DirectoryLock | None = None
        self._saved_version: int | None = None
        self._save_failed = False  # the last save failed: the periodic save tries again
        self._save_lock = threading.Lock()
        resumed = self._resume(values["state_dir"])

        self._update_pub = self.create_publisher(ModelUpdate, topics.MODEL_UPDATES,
                                                 qos(topics.QOS_LATCHED))
        if self._specializing:
            self.create_subscription(AdaptationSample, topics.ADAPTATION_SAMPLES,
                                     self._on_sample, qos(topics.QOS_RELIABLE))
        if self.ttt is not None:
            self.create_subscription(
                Image, topics.FRAMES, self._on_frame, qos(topics.QOS_FRAMES),
                qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self.create_service(Trigger, topics.RESET_SERVICE, self._on_reset)
        self.create_service(Trigger, topics.SAVE_SERVICE, self._on_save)
        self._publish_timer = steady_timer(self, values["publish_period_s"],
                                           self._publish_on_timer)
        self._save_timer = steady_timer(self, values["save_period_s"], self._periodic_save)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diagnostics = Diagnostics(
            self, self._diagnostic_values,
            warn_on=("samples_rejected", "samples_dropped", "frames_rejected",
                     "specializer_overflows"),
            jobs={"sample_errors": "samples_used", "ttt_errors": "frames_adapted",
                  "publish_errors": "updates_published", "save_errors": "saves"})
        self._worker = threading.Thread(target=self._train, name="specializer", daemon=True)
        self._worker.start()
        self._ttt_worker = None
        if self.ttt is not None:
            self._ttt_worker = threading.Thread(target=self._adapt_frames, name="ttt",
                                                daemon=True)
            self._ttt_worker.start()
        if resumed:
            self._diagnostics.start_from_current()
            self._publish()  # classifiers get the resumed heads at once
        self.get_logger().info(
            f"adapter: model {self.specializer.model_id}, strategy {self.strategy}"
            + (f" (TTT updates {self.ttt.config.update}: {len(self.ttt.parameter_names)} "
               "backbone tensors; classifiers need backend torch)" if self.ttt else "")
            + (f", forgetting guard with {self._guard_anchors()} anchors from "
               f"{values['anchors_file']}" if self.specializer.guard else "")
            + f", version {self._version()}"
            + (f" (resumed from {values['state_dir']})" if resumed else ""))

    def _build_engines(self, values: dict[str, Any]):
        from ttspec_ros.models.checkpoint import load_model

        uses_ttt = params.strategy_uses_ttt(values["strategy"])
        try:
            # Decoders only when test-time training needs them (its loss is reconstruction).
            model, card = load_model(values["model"] or None, with_decoders=uses_ttt)
        except Exception as e:  # a one-line reason, whatever a bad file raises
            raise StartupError(f"adapter: cannot load model {values['model']!r}: "
                               f"{type(e).__name__}: {e}") from e
        self._input_shape = input_shape(card.input)  # what a frame must look like
        self._frame_bounds = frame_bounds(card.input)
        # the heads' input width: each exit's Classifier(channels[-1], num_classes)
        guard = self._guard(values, card, model.num_exits - 1, model.config.channels[-1])
        try:
            specializer = Specializer(
                early_head_tensors(model), model.num_exits, model_id=card.model_id,
                lr=values["learning_rate"], momentum=values["momentum"],
                batch_size=values["batch_size"], min_confidence=values["min_confidence"],
                guard=guard)
        except ValueError as e:  # the guard binds to the heads here (e.g. anchor labels)
            raise StartupError(f"adapter: anchors_file {values['anchors_file']}: {e}") from e
        if not uses_ttt:
            return specializer, None  # the network itself is dropped here
        from ttspec_ros.ttt import TestTimeTrainer, TTTConfig, card_norm_pix

        if model.decoder_blocks is None:
            raise StartupError(f"adapter: strategy {values['strategy']!r} needs a model with "
                               f"reconstruction decoders; {values['model'] or 'the demo model'}"
                               " has none")
        try:
            config = TTTConfig(mode="online", update=values["ttt_update"],
                               lr=values["ttt_learning_rate"], norm_pix=card_norm_pix(card))
            warning = params.ttt_learning_rate_warning(config.update, config.lr)
            if warning:
                self.get_logger().warning(warning)
            return specializer, TestTimeTrainer(model, config, model_id=card.model_id)
        except ValueError as e:
            raise StartupError(f"adapter: test-time training: {e}") from e

    def _guard_anchors(self) -> int:
        guard = self.specializer.guard
        return 0 if guard is None else int(guard.anchors.labels.size)

    @staticmethod
    def _guard(values: dict[str, Any], card, num_early: int, feature_dim: int):
        """The forgetting guard from ``anchors_file`` (None without one). It simulates the
        model card's thresholds: the adapter does not see the classifiers' live ones."""
        path = values["anchors_file"]
        if not path:
            return None
        try:
            anchors = AnchorSet.load(path)
            anchors.check_matches(card.model_id, num_early, feature_dim)
            return AnchorGuard(anchors, threshold=list(card.thresholds),
                               rehearsal=values["guard_rehearsal"],
                               tolerance=values["guard_tolerance"],
                               class_tolerance=values["guard_class_tolerance"],
                               exit_cost=card.exit_cost)
        except (OSError, ValueError) as e:
            raise StartupError(f"adapter: anchors_file {path}: {e}") from e

    def _resume(self, state_dir: str) -> bool:
        if not state_dir:
            return False
        try:
            self._state_lock = DirectoryLock(state_dir).acquire()
        except BlockingIOError as e:
            # Two pipelines on one directory resumed each other's heads (a review's second
            # camera pipeline took the first one's adaptation, and back after a restart).
            raise StartupError(f"adapter: state_dir {e.strerror}; give every adapter its "
                               "own state_dir") from e
        except OSError as e:
            raise StartupError(f"adapter: cannot use state_dir {state_dir}: {e}") from e
        removed = remove_temporaries(state_dir, [STATE_FILE, TTT_STATE_FILE, PUBLISHED_FILE])
        if removed:
            self.get_logger().info(f"removed {len(removed)} temporary file(s) a write cut off "
                                   f"(kill -9, power loss) left in {state_dir}")
        engines = [(STATE_FILE, self.specializer)]
        if self.ttt is not None:
            engines.append((TTT_STATE_FILE, self.ttt))
        resumed = False
        for file, engine in engines:
            if not (Path(state_dir) / file).is_file():
                continue
            try:
                engine.load(state_dir)
            except Exception as e:  # whatever a damaged file provokes
                # Never overwrite a state we cannot read: the user decides what to do with it.
                raise StartupError(f"adapter: cannot resume from {state_dir}: "
                                   f"{type(e).__name__}: {e}") from e
            resumed = True
        try:
            record = PublishedRecord.load(state_dir)
        except ValueError as e:
            raise StartupError(f"adapter: cannot resume from {state_dir}: {e}") from e
        if record is not None and record.model_id == self.specializer.model_id:
            self._version_offset = record.offset_for(self._version())
        if resumed:
            self._saved_version = self._version()
        return resumed

    # -- parameters
    def _on_set_parameters(self, changes: list[Parameter]):
        new = changed_values(topics.ADAPTER_NODE, changes)
        if not new:
            return accept()
        reason = params.check_adapter(new)
        if reason:
            return refuse(self, new, reason)
        spec = self.specializer
        # Plain attribute writes; the trainer reads them at its next step.
        for name, attr in (("learning_rate", "lr"), ("momentum", "momentum"),
                           ("batch_size", "batch_size"), ("min_confidence", "min_confidence")):
            if name in new:
                setattr(spec, attr, new[name])
        if "publish_period_s" in new:
            self.destroy_timer(self._publish_timer)
            self._publish_timer = steady_timer(self, new["publish_period_s"],
                                               self._publish_on_timer)
        if "save_period_s" in new:
            self.destroy_timer(self._save_timer)
            self._save_timer = steady_timer(self, new["save_period_s"], self._periodic_save)
        self._values = {**self._values, **new}
        self.get_logger().info(f"parameters set: {new}")
        return accept()

    # -- samples
    def _on_sample(self, msg: AdaptationSample) -> None:
        self.stats.count("samples_received")
        with self._cond:
            if len(self._queue) >= SAMPLE_QUEUE:
                self._queue.popleft()
                self.stats.count("samples_dropped")
            self._queue.append(msg)
            self._cond.notify()

    def _train(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return  # what is still queued: close() trains on it
                msg = self._queue.popleft()
            self._use_sample(msg)

    def _use_sample(self, msg: AdaptationSample) -> None:
        if not self._values["enabled"]:
            self.stats.count("samples_ignored_disabled")
            return
        reason = "model"  # what a ValueError is about: one warning per reason (throttled)
        try:
            if msg.model_id != self.specializer.model_id:
                raise ValueError(f"sample is from model {msg.model_id!r}, the adapter "
                                 f"adapts {self.specializer.model_id!r}")
            reason = "features"
            feats = unpack_features(msg.feature_sizes, msg.features)
            overflows = self.specializer.counters["overflows"]
            reason = "sample"
            self.specializer.add_sample(msg.exit_index, msg.class_id, msg.confidence, feats)
            if self.specializer.counters["overflows"] > overflows and self._throttle("overflow"):
                self.get_logger().warning(
                    "a specialization step overflowed and the heads went back to their last "
                    "good state (training so far is lost without a guard): learning_rate "
                    f"{self._values['learning_rate']} with momentum {self._values['momentum']} "
                    "diverges; lower them")
        except ValueError as e:
            self._reject("samples_rejected", "last_rejection", "rejected sample", e, reason)
            return
        except Exception as e:  # the thread must outlive any one sample
            self._failed("training on a sample", e, "sample_errors")
            return
        self.stats.count("samples_used")

    # -- frames (test-time training)
    def _on_frame(self, msg: Image) -> None:
        self.stats.count("frames_received")
        if self._frames.put(msg):
            self.stats.count("frames_dropped")

    def _adapt_frames(self) -> None:
        import torch

        torch.set_num_threads(1)  # one core at most: the classifier shares the machine
        while not self._stop:
            msg = self._frames.take(timeout=0.2)
            if msg is None:
                continue
            if not self._values["enabled"]:
                self.stats.count("frames_ignored_disabled")  # as samples are: counts add up
                continue
            try:
                x = decode_frame(msg.height, msg.width, msg.encoding, msg.is_bigendian,
                                 msg.step, msg.data)
                problem = frame_problem(x, self._input_shape, self._frame_bounds)
                if problem:
                    self._reject("frames_rejected", "last_frame_rejection",
                                 "test-time training skipped a frame", ValueError(problem[1]),
                                 reason=problem[0])
                    continue
                started = time.perf_counter()
                self._ttt_loss = self.ttt.adapt(torch.from_numpy(x))
                self.stats.add("ttt_step_ms", (time.perf_counter() - started) * 1000.0)
            except (ImageDecodeError, ValueError, FloatingPointError) as e:
                self._reject("frames_rejected", "last_frame_rejection",
                             "test-time training skipped a frame", e)
                continue
            except Exception as e:  # the thread must outlive any one frame
                self._failed("test-time training on a frame", e, "ttt_errors")
                continue
            self.stats.count("frames_adapted")

    def _reject(self, counter: str, note: str, what: str, error: Exception,
                reason: str | None = None) -> None:
        """Count a refused input, keep its message for diagnostics, warn (throttled per counter
        and reason). The key must not be the message: an out-of-range frame's message holds
        its values, so a review's 20,000 bad frames gave 17,057 warnings and as many keys."""
        self.stats.count(counter)
        self.stats.note(note, str(error))
        reason = reason or getattr(error, "reason", None) or type(error).__name__
        if self._throttle(f"{counter}:{reason}"):
            self.get_logger().warning(f"{what}: {error}")

    def _failed(self, what: str, error: Exception, job: str) -> None:
        """An unexpected error in a worker or timer: count it (``errors`` and the job's
        failure counter), say what failed, carry on with the last good state (an error
        escaping a timer would end the node)."""
        self.stats.count("errors")
        self.stats.count(job)
        self.stats.note("last_error", f"{what}: {type(error).__name__}: {error}")
        if self._throttle(f"{what}:{type(error).__name__}"):
            self.get_logger().error(f"{what} failed: {type(error).__name__}: {error}")

    # -- outputs
    def _version(self) -> int:
        """Both engines' versions only grow, so their sum (+ the resume offset) grows whenever
        either changes."""
        return (self.specializer.version + (self.ttt.version if self.ttt else 0)
                + self._version_offset)

    def _payload(self) -> ModelUpdatePayload:
        heads = self.specializer.export()
        version, tensors = heads.version, heads.tensors
        if self.ttt is not None:
            backbone = self.ttt.export_update()  # a consistent snapshot (the engine's lock)
            version += backbone.version
            tensors = {**(tensors if self._specializing else {}), **backbone.tensors}
        return ModelUpdatePayload(heads.model_id, version + self._version_offset, tensors)

    def _publish(self) -> bool:
        """Publish the current tensors if they changed; -> whether classifiers hold them now
        (a version read after this call may already be newer: training goes on meanwhile)."""
        try:
            payload = self._payload()
            if payload.version == self._published_version:
                return True
            self._record_published(payload)
            msg = to_msg(payload)
            msg.header.stamp = self.get_clock().now().to_msg()
            self._update_pub.publish(msg)
        except Exception as e:  # classifiers keep the last published update
            self._failed("publishing the model update", e, "publish_errors")
            return False
        self._published_version = payload.version
        self.stats.count("updates_published")
        return True

    def _publish_on_timer(self) -> None:
        """The publish timer's callback (only the reset service uses ``_publish``'s result)."""
        self._publish()

    def _record_published(self, payload: ModelUpdatePayload) -> None:
        """Written before the update goes out: after a crash the record may be ahead of what
        classifiers got (harmless), never behind. It reserves ``PublishedRecord.RESERVE``
        versions at a time, so it is written once per RESERVE updates instead of on each (a
        review counted 61 fsynced writes a minute at the default publish period)."""
        if not self._values["state_dir"] or (
                self._reserved is not None and payload.version <= self._reserved):
            return
        try:
            reserved = payload.version + PublishedRecord.RESERVE
            PublishedRecord(payload.model_id, reserved).save(self._values["state_dir"])
            self._reserved = reserved
        except Exception as e:  # publish anyway: classifiers need the update more
            self._failed("recording the published version (a restart after a crash may "
                         "reuse version numbers)", e, "save_errors")

    def _save(self) -> str:
        state_dir = self._values["state_dir"]
        if not state_dir:
            raise ValueError("state_dir is '' (state not persisted)")
        with self._save_lock:
            version = self._version()
            self._save_failed = True  # until this save completes (the periodic save retries)
            self.specializer.save(state_dir)
            if self.ttt is not None:
                self.ttt.save(state_dir)
            self._saved_version = version
            self._save_failed = False
        self.stats.count("saves")
        return f"saved version {version} to {state_dir}"

    def _periodic_save(self) -> None:
        # After a failed save, also with nothing new to save: until a save succeeds the
        # diagnostics say ERROR (failing save_errors), and an idle adapter never cleared it.
        if self._values["state_dir"] and (self._version() != self._saved_version
                                          or self._save_failed):
            try:
                self._save()
            except Exception as e:  # the last saved state stays; the next period tries again
                self._failed("saving the state", e, "save_errors")

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response):
        # Reset and publish as one step: between them the training threads took a frame or a
        # sample, so a review's resets at 20 Hz published a trained backbone (6 of 64) while
        # replying that it was the original.
        with contextlib.ExitStack() as held:
            for engine in (self.ttt, self.specializer):
                if engine is not None:
                    held.enter_context(engine.lock)
            if self.ttt is not None:
                self.ttt.reset()  # its version stays: the specializer's reset makes a new one
            self.specializer.reset()
            # Reset here either way; success says whether classifiers got it (see errors).
            response.success = self._publish()
        response.message = f"{'heads' if self.ttt is None else 'heads and backbone'} reset to " \
                           f"the original; " + (
                               f"published version {self._published_version}"
                               if response.success else "publishing it failed (see errors)")
        if self._values["state_dir"]:
            try:
                self._save()
            except Exception as e:
                self._failed("saving the state", e, "save_errors")
                response.message += f" (saving failed: {type(e).__name__}: {e})"
        self.get_logger().info(response.message)
        return response

    def _on_save(self, request: Trigger.Request, response: Trigger.Response):
        if not self._values["state_dir"]:  # a refused request, not a failing job: counted as
            # save_errors it left the node at ERROR for good (no save can ever succeed)
            response.success, response.message = False, "not saved: state_dir is '' (state " \
                "not persisted; set state_dir in the params file)"
            return response
        try:
            response.message = self._save()
            response.success = True
        except Exception as e:
            self._failed("saving the state", e, "save_errors")
            response.success, response.message = False, f"not saved: {type(e).__name__}: {e}"
        return response

    # -- diagnostics and shutdown
    def _diagnostic_values(self) -> tuple[str, dict[str, object]]:
        values: dict[str, object] = dict(self.stats.snapshot())
        values.update({f"specializer_{k}": v for k, v in self.specializer.stats().items()})
        values.update({"model_id": self.specializer.model_id,
                       "model_version": self._version(),
                       "strategy": self.strategy,
                       "guard_anchors": self._guard_anchors(),
                       "ttt_loss": self._ttt_loss,
                       "published_version": self._published_version,
                       "saved_version": self._saved_version,
                       "queued": len(self._queue), "enabled": self._values["enabled"]})
        return f"version {self._version()}, {values.get('samples_used', 0)} samples used, " \
               f"{values.get('frames_adapted', 0)} frames adapted", values

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._frames.close()
        self._worker.join(timeout=5.0)
        if self._ttt_worker is not None:
            self._ttt_worker.join(timeout=5.0)
        # The context may be shut down already: log without the node's /rosout publisher.
        log = rclpy.logging.get_logger(f"{self.get_logger().name}.shutdown")
        # Samples received but not yet trained on (the trainer lagged), within a bound: a
        # launch escalates to SIGTERM 5 s after SIGINT.
        deadline = time.monotonic() + DRAIN_S
        while not self._worker.is_alive() and self._queue and time.monotonic() < deadline:
            self._use_sample(self._queue.popleft())
        if self._queue:
            log.warning(f"{len(self._queue)} received samples not trained on at shutdown")
        try:  # what is saved includes a partly filled batch and the steps since the last check
            self.specializer.flush()
        except Exception as e:  # the trained heads stay as they were
            log.error(f"learning from the last samples failed: {type(e).__name__}: {e}")
        if self._values["state_dir"] and self._version() != self._saved_version:
            try:
                log.info(self._save())
            except Exception as e:  # the last saved state stays
                log.error(f"saving state at shutdown failed: {type(e).__name__}: {e}")
        if self._state_lock is not None:
            self._state_lock.release()


def main(args: list[str] | None = None) -> int:
    return run_node(AdapterNode, args)
