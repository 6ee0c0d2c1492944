"""Every ROS name the package uses (topics, services, nodes, executables), ROS-free.

Names are relative so a namespace (the launch file's ``ttspec``) or a remap moves them; only
``/diagnostics`` is absolute, as the ROS diagnostics tools expect. ``TOPICS`` describes each
topic's type, publisher, subscribers and QoS for the README and the tests. Also here: where the
executables and the params file are installed, and the environment that keeps the graphs our
tools start on this host.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

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

PARAMS_FILE = "ttspec.yaml"  # share/ttspec_ros/config/<this>, the file the launch file loads


_NAME_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def relative_namespace(text: str) -> str:
    """``text`` as the relative namespace our tools start nodes in (a leading / dropped), or
    ValueError: rcl refuses any other name only when the node starts, in its log."""
    ns = text[1:] if text.startswith("/") else text
    if not all(_NAME_TOKEN.fullmatch(token) for token in ns.split("/")):
        raise ValueError(f"namespace {text!r} is not a ROS namespace: names of letters, digits "
                         "and _ (not starting with a digit) separated by single /")
    return ns


def installed_prefix() -> Path:
    """The install prefix holding lib/ttspec_ros/<executables>: the first of AMENT_PREFIX_PATH
    (a sourced colcon workspace or ROS install) that has them, else the running interpreter's
    prefix (a venv with the package installed)."""
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes.append(Path(sys.prefix))
    exe = EXECUTABLES[CAMERA_NODE]
    for prefix in prefixes:
        if (prefix / "lib" / PACKAGE / exe).is_file():
            return prefix
    raise FileNotFoundError(
        f"the node executables (lib/{PACKAGE}/{exe}) are not installed under "
        f"{', '.join(map(str, prefixes))}; build the package (colcon build, then source "
        "install/setup.bash) or run `make env` (tools/setup_env.sh)")


def installed_params_file(prefix: Path) -> Path:
    return prefix / "share" / PACKAGE / "config" / PARAMS_FILE


def localhost_discovery() -> dict[str, str]:
    """Environment that keeps DDS discovery on this host, for the node graphs our tools start.
    Iron and later read ROS_AUTOMATIC_DISCOVERY_RANGE; Humble reads only ROS_LOCALHOST_ONLY,
    which Jazzy deprecates and Kilted ignores, so that one is set on Humble only."""
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    if os.environ.get("ROS_DISTRO") == "humble":
        env["ROS_LOCALHOST_ONLY"] = "1"
    return env


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
SERVICES = {  # name -> what it does (the README's table)
    RESET_SERVICE: "puts the heads (and a test-time-trained backbone) back to the model file's, "
                   "publishes that at once, and saves it when state_dir is set",
    SAVE_SERVICE: "saves the state to state_dir now (fails when state_dir is '')",
}

# QoS profiles by name; ttspec_ros.nodes turns these into rclpy QoSProfiles.
QOS_SENSOR = "sensor_data"  # best effort, keep last 5 (rclpy qos_profile_sensor_data)
QOS_LATCHED = "reliable_transient_local"  # reliable, transient local, keep last 1
QOS_RELIABLE = "reliable"  # reliable, volatile, keep last 10
# frames (camera -> classifier, adapter): reliable. Best effort lost most large frames: DDS
# drops a fragmented sample when one fragment is lost (3x224x224 float32 = 602 KB: 41 of 150
# at 30 Hz, 6 of 40 at 10 Hz; 150 of 150 reliable). KEEP_LAST never blocks the camera, and
# the classifier keeps only the newest frame anyway (best-effort readers still match).
QOS_FRAMES = QOS_RELIABLE


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
              "camera frames: rgb8, bgr8, rgba8, bgra8, mono8, mono16, YUV 4:2:2 (yuv422/uyvy, "
              "yuv422_yuy2/yuyv) or 8-bit Bayer (bayer_rggb8, _bggr8, _gbrg8, _grbg8), "
              "converted as cv_bridge does (reliability: the camera's image_reliability; "
              "qos_overrides apply too)"),
    TopicInfo(IMAGE_RAW_COMPRESSED, "sensor_msgs/CompressedImage", ("(camera driver)",),
              (CAMERA_NODE,), QOS_SENSOR, "JPEG/PNG frames, used with transport: compressed; "
              "moves with a remap of image_raw, as image_transport's"),
    TopicInfo(FRAMES, "sensor_msgs/Image", (CAMERA_NODE,),
              (CLASSIFIER_NODE, f"{ADAPTER_NODE} (strategy ttt_online or both)"), QOS_FRAMES,
              "preprocessed model input, encoding 32FC1/32FC3 (height x width x channels), "
              "source header kept (QoS overridable: camera's publisher, classifier's and "
              "adapter's readers)"),
    TopicInfo(PREDICTIONS, "ttspec_ros/CascadePrediction", (CLASSIFIER_NODE,), ("(users)",),
              QOS_RELIABLE, "one per classified frame, source header kept"),
    TopicInfo(ADAPTATION_SAMPLES, "ttspec_ros/AdaptationSample", (CLASSIFIER_NODE,),
              (ADAPTER_NODE,), QOS_RELIABLE,
              "pooled features + pseudo-label of frames answered after exit 0"),
    TopicInfo(MODEL_UPDATES, "ttspec_ros/ModelUpdate", (ADAPTER_NODE,), (CLASSIFIER_NODE,),
              QOS_LATCHED, "adapted tensors, all of them in each update (the last one to "
              "arrive is applied; tensors an earlier one changed that it leaves out go back to "
              "the model file's); late joiners get the latest"),
    TopicInfo(DIAGNOSTICS, "diagnostic_msgs/DiagnosticArray",
              (CAMERA_NODE, CLASSIFIER_NODE, ADAPTER_NODE), ("(diagnostics tools)",),
              QOS_RELIABLE, "counters of every node, about 1 Hz"),
)
