"""Every ROS name the package uses (topics, services, nodes, executables), ROS-free.

Names are relative so a namespace (the launch file's ``ttspec``) or a remap moves them; only
``/diagnostics`` is absolute, as the ROS diagnostics tools expect. ``TOPICS`` describes each
topic's type, publisher, subscribers and QoS for the README and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "ttspec"
PACKAGE = "ttspec_ros"

# Node names and the executables (lib/ttspec_ros/<executable>) that run them.
CAMERA_NODE = "camera"
CLASSIFIER_NODE = "classifier"
ADAPTER_NODE = "adapter"
EXECUTABLES: dict[str, str] = {
    CAMERA_NODE: "camera_node",
    CLASSIFIER_NODE: "classifier_node",
    ADAPTER_NODE: "adapter_node",
}

# Topics
IMAGE_RAW = "image_raw"
IMAGE_RAW_COMPRESSED = "image_raw/compressed"  # image_transport's name for the compressed stream
FRAMES = "frames"
PREDICTIONS = "predictions"
ADAPTATION_SAMPLES = "adaptation_samples"
MODEL_UPDATES = "model_updates"
DIAGNOSTICS = "/diagnostics"

# Services (private: resolved under the node's name, e.g. /ttspec/adapter/reset)
RESET_SERVICE = "~/reset"
SAVE_SERVICE = "~/save"

# QoS profiles by name; ttspec_ros.nodes turns these into rclpy QoSProfiles.
QOS_SENSOR = "sensor_data"  # best effort, keep last 5 (rclpy qos_profile_sensor_data)
QOS_LATCHED = "reliable_transient_local"  # reliable, transient local, keep last 1
QOS_RELIABLE = "reliable"  # reliable, volatile, keep last 10


@dataclass(frozen=True)
class TopicInfo:
    name: str
    type: str
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    qos: str
    description: str


TOPICS: tuple[TopicInfo, ...] = (
    TopicInfo(IMAGE_RAW, "sensor_msgs/Image", ("(camera driver)",), (CAMERA_NODE,), QOS_SENSOR,
              "camera frames: rgb8, bgr8, rgba8, bgra8, mono8 or mono16 (QoS overridable)"),
    TopicInfo(IMAGE_RAW_COMPRESSED, "sensor_msgs/CompressedImage", ("(camera driver)",),
              (CAMERA_NODE,), QOS_SENSOR, "JPEG/PNG frames, used with transport: compressed"),
    TopicInfo(FRAMES, "sensor_msgs/Image", (CAMERA_NODE,), (CLASSIFIER_NODE,), QOS_SENSOR,
              "preprocessed model input, encoding 32FC1/32FC3 (height x width x channels), "
              "source header kept"),
    TopicInfo(PREDICTIONS, "ttspec_ros/CascadePrediction", (CLASSIFIER_NODE,), ("(users)",),
              QOS_RELIABLE, "one per classified frame, source header kept"),
    TopicInfo(ADAPTATION_SAMPLES, "ttspec_ros/AdaptationSample", (CLASSIFIER_NODE,),
              (ADAPTER_NODE,), QOS_RELIABLE,
              "pooled features + pseudo-label of frames answered after exit 0"),
    TopicInfo(MODEL_UPDATES, "ttspec_ros/ModelUpdate", (ADAPTER_NODE,), (CLASSIFIER_NODE,),
              QOS_LATCHED, "adapted early heads; late joiners get the latest"),
    TopicInfo(DIAGNOSTICS, "diagnostic_msgs/DiagnosticArray",
              (CAMERA_NODE, CLASSIFIER_NODE, ADAPTER_NODE), ("(diagnostics tools)",),
              QOS_RELIABLE, "counters of every node, about 1 Hz"),
)
