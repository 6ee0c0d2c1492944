"""Sample instances of every ttspec_ros message with every field set to a non-default value,
shared by the cross-process round-trip test and the publisher process it starts."""

from __future__ import annotations

import array
import sys

from builtin_interfaces.msg import Time
from std_msgs.msg import Header
from ttspec_ros.msg import (
    AdaptationSample,
    CascadePrediction,
    LabelStamped,
    ModelUpdate,
    NamedTensor,
)

TOPIC_PREFIX = "/ttspec_test_msgs/"


def _header() -> Header:
    return Header(stamp=Time(sec=1700000000, nanosec=123456789), frame_id="camera_optical")


def samples() -> dict[str, object]:
    tensors = [
        NamedTensor(name="cls_blocks.0.classifier.1.weight", shape=[2, 3],
                    data=[0.5, -1.25, 2.0, 3.5, -4.75, 1e-3]),
        NamedTensor(name="cls_blocks.0.classifier.1.bias", shape=[2], data=[0.25, -0.5]),
    ]
    return {
        "CascadePrediction": CascadePrediction(
            header=_header(), class_id=7, class_name="Sneaker", confidence=0.875,
            exit_index=2, num_exits=4, exit_confidences=[0.25, 0.5, 0.875], latency_ms=3.5,
            model_version=2**40 + 3,
        ),
        "AdaptationSample": AdaptationSample(
            header=_header(), model_id="demo-abc123", model_version=42, exit_index=2,
            class_id=4, confidence=0.96875, feature_sizes=[3, 3],
            features=[0.5, 1.5, -2.5, 3.0, -0.125, 8.0],
        ),
        "ModelUpdate": ModelUpdate(
            header=_header(), model_id="demo-abc123", version=9, tensors=tensors
        ),
        "NamedTensor": tensors[0],
        "LabelStamped": LabelStamped(header=_header(), class_id=5, class_name="Sandal"),
    }


def as_plain(value: object) -> object:
    """A message as nested plain Python values, so two messages compare field by field."""
    if hasattr(value, "get_fields_and_field_types"):
        return {f: as_plain(getattr(value, f)) for f in value.get_fields_and_field_types()}
    if isinstance(value, (list, tuple, array.array)) or type(value).__name__ == "ndarray":
        return [as_plain(v) for v in value]
    return value


def publish_forever(period_s: float = 0.1) -> None:
    """Publisher process: publish every sample until killed."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init()
    node = rclpy.create_node("ttspec_msg_sample_publisher")
    pubs = {name: (node.create_publisher(type(msg), TOPIC_PREFIX + name, 10), msg)
            for name, msg in samples().items()}
    try:
        while rclpy.ok():
            for pub, msg in pubs.values():
                pub.publish(msg)
            rclpy.spin_once(node, timeout_sec=period_s)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    publish_forever()
    sys.exit(0)
