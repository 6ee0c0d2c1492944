"""Camera node: image_raw (or image_raw/compressed) -> preprocessed model input on ``frames``.

Decodes with ``image_codec`` (no cv_bridge), preprocesses with the model card's input spec
(``preprocess``), and publishes a 32FC1/32FC3 Image carrying the source header. Malformed
images are rejected with a throttled warning and counted per reason; ``max_rate_hz`` drops
frames that come sooner than the rate allows.
"""

from __future__ import annotations

import time
from typing import Any

from rclpy.clock import ROSClock
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image

from ttspec_ros import params, topics
from ttspec_ros.image_codec import ImageDecodeError, decode_compressed, decode_image, encode_frame
from ttspec_ros.nodes import (
    MATCHED_FRAMES_READERS,
    MATCHED_IMAGES_WRITERS,
    Diagnostics,
    RateLimit,
    StartupError,
    Stats,
    Throttle,
    accept,
    changed_values,
    declare,
    load_input_spec,
    matched_writers,
    qos,
    refuse,
    run_node,
)
from ttspec_ros.preprocess import preprocess


class CameraNode(Node):
    def __init__(self) -> None:
        super().__init__(topics.CAMERA_NODE)
        values = declare(self, params.CAMERA)
        reason = params.check_params(topics.CAMERA_NODE, values)
        if reason:
            raise StartupError(f"camera: {reason}")
        self.stats = Stats()
        self._throttle = Throttle()
        self._input_spec = self._load_input_spec(values["model"])
        self._rate = RateLimit(params.min_period_s(values["max_rate_hz"]))
        # Overridable like the readers of frames (a reliable reader needs a reliable writer).
        self._frames_pub = self.create_publisher(
            Image, topics.FRAMES, qos(topics.QOS_FRAMES),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._sub: Subscription[Image] | Subscription[CompressedImage] | None = None
        self._qos: dict[str, Any] = {}
        self._image_reliability = values["image_reliability"]
        sub = self._subscribe(values["transport"])
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diagnostics = Diagnostics(self, self._diagnostic_values, warn_on=("rejected",),
                                        jobs={"errors": "published"},
                                        expect=("received", "images"))
        self.get_logger().info(
            f"camera: {sub.topic_name} ({values['transport']}) -> "
            f"{self._frames_pub.topic_name}, input {dict(self._input_spec)}")

    @staticmethod
    def _load_input_spec(model: str) -> dict[str, Any]:
        try:
            return load_input_spec(model)
        except Exception as e:  # whatever a bad file raises, a live change must not end the node
            raise StartupError(f"camera: cannot read the model card of model {model!r}: "
                               f"{type(e).__name__}: {e}") from e

    def _subscribe(self, transport: str) -> Subscription[Image] | Subscription[CompressedImage]:
        """Subscribe for ``transport``; the old subscription goes once the new one exists.
        -> the new subscription (also ``self._sub``)."""
        old = self._sub
        msg_type, topic, callback = (
            (CompressedImage, self._compressed_topic(), self._on_compressed)
            if transport == "compressed" else (Image, topics.IMAGE_RAW, self._on_image))
        if topic in self._qos:
            # Re-subscribing after a transport switch: the QoS overrides were read the first
            # time (their parameters are read-only and already declared).
            self._sub = self.create_subscription(msg_type, topic, callback, self._qos[topic])
        else:
            # Sensor-data QoS by default, overridable the standard way under the resolved
            # (remapped) topic name, e.g. with the launch file's default camera_topic
            # -p qos_overrides./ttspec/image_raw.subscription.reliability:=reliable
            profile = qos(topics.QOS_SENSOR)
            if self._image_reliability == "reliable":
                profile.reliability = ReliabilityPolicy.RELIABLE
            self._sub = self.create_subscription(
                msg_type, topic, callback, profile,
                qos_overriding_options=QoSOverridingOptions.with_default_policies())
            self._qos[topic] = self._sub.qos_profile
        if old is not None:
            self.destroy_subscription(old)
        return self._sub

    def _compressed_topic(self) -> str:
        """<image_raw as remapped>/compressed, as image_transport names it, so that
        ``-r image_raw:=/cam/image`` moves both (the literal image_raw/compressed stayed in the
        node's namespace: a review's camera read an empty topic). A remap of
        image_raw/compressed itself still wins, as launch files written for the literal name
        give it."""
        remapped = self.resolve_topic_name(topics.IMAGE_RAW_COMPRESSED)
        if remapped != self.resolve_topic_name(topics.IMAGE_RAW_COMPRESSED, only_expand=True):
            return remapped
        return self.resolve_topic_name(topics.IMAGE_RAW) + "/compressed"

    # -- parameters
    def _on_set_parameters(self, changes: list[Parameter]):
        new = changed_values(topics.CAMERA_NODE, changes)
        if not new:
            return accept()
        reason = params.check_params(topics.CAMERA_NODE, new)
        if reason:
            return refuse(self, new, reason)
        # What can fail comes first, so a refused change leaves everything as it was.
        spec = self._input_spec
        if "model" in new:
            try:
                spec = self._load_input_spec(new["model"])
            except StartupError as e:
                return refuse(self, new, str(e))
        if "transport" in new and new["transport"] != self.get_parameter("transport").value:
            try:
                self._subscribe(new["transport"])
            except Exception as e:  # rclpy refused the subscription; the node keeps running
                return refuse(self, new,
                              f"cannot subscribe with transport {new['transport']!r}: {e}")
        self._input_spec = spec
        if "max_rate_hz" in new:
            self._rate.set_period(params.min_period_s(new["max_rate_hz"]))
        self.get_logger().info(f"parameters set: {new}")
        return accept()

    # -- frames
    def _now_s(self) -> float:
        """The rate limit's time: the node's clock while it runs on ROS time (use_sim_time: a
        replayed bag's /clock, so ``ros2 bag play -r 4`` passes what the robot passed), else
        the monotonic clock (system time can jump)."""
        clock = self.get_clock()  # annotated Clock; a Node's clock is a ROSClock
        if isinstance(clock, ROSClock) and clock.ros_time_is_active:
            return clock.now().nanoseconds * 1e-9
        return time.monotonic()

    def _on_image(self, msg: Image) -> None:
        self._convert(msg.header, lambda: decode_image(
            msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step, msg.data,
            frames=False))

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._convert(msg.header, lambda: decode_compressed(msg.format, msg.data))

    def _convert(self, header: Any, decode: Any) -> None:
        self.stats.count("received")
        arrived = self._now_s()
        if not self._rate.allows(arrived):
            self.stats.count("dropped_rate_limit")
            return  # checked before decoding: a dropped frame costs nothing
        start = time.perf_counter()
        try:
            tensor = preprocess(decode(), self._input_spec)
        except ImageDecodeError as e:
            self._reject(e.reason, str(e))
            return
        except ValueError as e:  # preprocess refused the decoded image
            self._reject("preprocess", str(e))
            return
        except Exception as e:  # escaping, it would end the spin and the node: count, go on
            self.stats.count("errors")
            self.stats.note("last_error", f"{type(e).__name__}: {e}")
            if self._throttle(f"error:{type(e).__name__}"):
                self.get_logger().error(f"image failed: {type(e).__name__}: {e}")
            return
        out = Image(header=header, **encode_frame(tensor))
        # Only a frame passed on starts the next period: a rejected one must not make the
        # rate limit drop the good frame after it.
        self._rate.passed(arrived)
        self._frames_pub.publish(out)
        self.stats.count("published")
        self.stats.add("convert_ms", (time.perf_counter() - start) * 1000.0)

    def _reject(self, reason: str, message: str) -> None:
        self.stats.count(f"rejected_{reason}")
        self.stats.count("rejected")
        self.stats.note("last_rejection", message)
        if self._throttle(reason):
            self.get_logger().warning(f"rejected image ({reason}): {message}")

    def _diagnostic_values(self) -> tuple[str, dict[str, str | int]]:
        values: dict[str, str | int] = dict(self.stats.snapshot())
        values[MATCHED_FRAMES_READERS] = self._frames_pub.get_subscription_count()
        writers = matched_writers(self._sub)
        if writers is not None:
            values[MATCHED_IMAGES_WRITERS] = writers
        return (f"{values.get('published', 0)} frames, {values.get('rejected', 0)} rejected",
                values)


def main(args: list[str] | None = None) -> int:
    return run_node(CameraNode, args)
