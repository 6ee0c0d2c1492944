"""Start the ttspec_ros pipeline: camera -> classifier -> adapter in namespace /ttspec.

    ros2 launch ttspec_ros ttspec.launch.py camera_topic:=/camera/color/image_raw \
        model:=/path/to/model threshold:=0.8 state_dir:=/var/lib/ttspec
    ros2 launch ttspec_ros ttspec.launch.py use_sim_time:=true  # with ros2 bag play --clock
    ros2 launch ttspec_ros ttspec.launch.py image_reliability:=reliable  # large images
    ros2 launch ttspec_ros ttspec.launch.py namespace:=ttspec_left \
        camera_topic:=/left/image_raw  # a second pipeline beside the first

Every node reads config/ttspec.yaml (or params_file:=...); the launch arguments below override
it when given. Topics, nodes and executables come from ttspec_ros.topics.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from ttspec_ros import topics

ARGUMENTS = {
    "namespace": (topics.NAMESPACE,
                  "namespace of the three nodes and their topics (one per camera pipeline)"),
    "camera_topic": (topics.IMAGE_RAW,
                     "image topic the camera node reads (remaps image_raw; the compressed "
                     "stream is <camera_topic>/compressed)"),
    "image_reliability": ("", "QoS reliability of the camera node's image subscription: "
                              "best_effort (sensor data, the default; reads any publisher) or "
                              "reliable (no frames lost by DDS, e.g. large images from a "
                              "reliable driver; cannot read a best-effort publisher); "
                              "'' = params_file's value"),
    "model": ("", "model path stem (<stem>.safetensors + <stem>.json); '' = params_file's value"),
    "threshold": ("", "early-exit confidence threshold in [0, 1] for every early exit; "
                      "'' = params_file's value"),
    "state_dir": ("", "adapter state directory; '' = params_file's value"),
    "use_sim_time": ("", "true: every node runs on /clock (a bag played with "
                         "`ros2 bag play --clock`); '' = params_file's value"),
    "params_file": (os.path.join(get_package_share_directory(topics.PACKAGE), "config",
                                 topics.PARAMS_FILE), "parameters of all three nodes"),
}


def _path(text: str) -> ParameterValue:
    """A path parameter as a string: launch_ros reads plain strings as YAML, so a path like
    ``2024-01-15`` or ``0755`` would reach the node as a date or an int (launch_ros#384/#410).
    ``~`` is expanded here: the shell leaves it alone after ``model:=``."""
    return ParameterValue(os.path.expanduser(text), value_type=str)


def _nodes(context) -> list[Node]:
    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    shared = {"model": _path(arg["model"])} if arg["model"] else {}
    extra = {
        topics.CAMERA_NODE: dict(shared),
        topics.CLASSIFIER_NODE: dict(shared),
        topics.ADAPTER_NODE: dict(shared),
    }
    if arg["threshold"]:
        extra[topics.CLASSIFIER_NODE]["threshold"] = float(arg["threshold"])
    if arg["state_dir"]:
        extra[topics.ADAPTER_NODE]["state_dir"] = _path(arg["state_dir"])
    if arg["use_sim_time"]:
        sim = {"true": True, "false": False}.get(arg["use_sim_time"].lower())
        if sim is None:
            raise ValueError(f"use_sim_time must be true or false, got {arg['use_sim_time']!r}")
        for overrides in extra.values():
            overrides["use_sim_time"] = sim
    if arg["image_reliability"]:
        if arg["image_reliability"] not in ("best_effort", "reliable"):
            raise ValueError(f"image_reliability must be best_effort or reliable, "
                             f"got {arg['image_reliability']!r}")
        extra[topics.CAMERA_NODE]["image_reliability"] = arg["image_reliability"]
    # The camera subscribes to <image_raw as remapped>/compressed for compressed transport.
    remap = {topics.CAMERA_NODE: [(topics.IMAGE_RAW, arg["camera_topic"])]}
    return [
        Node(package=topics.PACKAGE, executable=topics.EXECUTABLES[name], name=name,
             namespace=arg["namespace"],
             # An empty override dict would reach rcl as an empty ros__parameters mapping:
             # leave it out, so nothing given means exactly the params file.
             parameters=[arg["params_file"]] + ([extra[name]] if extra[name] else []),
             remappings=remap.get(name, []), output="screen")
        for name in (topics.CAMERA_NODE, topics.CLASSIFIER_NODE, topics.ADAPTER_NODE)
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)]
    )
