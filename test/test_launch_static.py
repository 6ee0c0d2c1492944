"""The launch file without `ros2 launch` (not installable here): it is installed, imports only
what a ROS install has, and — run against minimal stand-ins for launch/launch_ros — starts the
three installed executables in /ttspec with the installed config and the launch arguments."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest
from conftest import REPO, VENV_PREFIX, installed_executable

from ttspec_ros import params, topics

LAUNCH = REPO / "launch" / "ttspec.launch.py"
CONFIG = REPO / "config" / "ttspec.yaml"
SHARE = VENV_PREFIX / "share" / topics.PACKAGE


def test_launch_and_config_are_installed_unchanged():
    for src, rel in ((LAUNCH, "launch/ttspec.launch.py"), (CONFIG, "config/ttspec.yaml")):
        installed = SHARE / rel
        assert installed.is_file(), f"{installed} missing: run `make env`"
        assert installed.read_bytes() == src.read_bytes(), f"{installed} is stale: `make env`"


def test_launch_file_imports_only_ros_launch_modules():
    tree = ast.parse(LAUNCH.read_text())
    modules = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    assert modules <= {"__future__", "os", "launch", "launch_ros", "ament_index_python",
                       "ttspec_ros"}


# -- minimal stand-ins recording what the launch file asks for -------------------------------
class _Action:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name, default=None):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


class _ParameterValue:
    def __init__(self, value, *, value_type=None):
        self.value, self.value_type = value, value_type

    def __eq__(self, other):  # compares as the string it is declared to be
        return self.value_type is str and isinstance(other, str) and self.value == other


def _plain(overrides: dict) -> dict:
    return {k: v.value if isinstance(v, _ParameterValue) else v for k, v in overrides.items()}


def _load_launch_file(monkeypatch) -> types.ModuleType:
    launch = types.ModuleType("launch")
    launch.LaunchDescription = lambda entities: list(entities)
    actions = types.ModuleType("launch.actions")
    actions.DeclareLaunchArgument = type("DeclareLaunchArgument", (_Action,), {})
    actions.OpaqueFunction = type("OpaqueFunction", (_Action,), {})
    substitutions = types.ModuleType("launch.substitutions")
    substitutions.LaunchConfiguration = _LaunchConfiguration
    launch_ros = types.ModuleType("launch_ros")
    ros_actions = types.ModuleType("launch_ros.actions")
    ros_actions.Node = type("Node", (_Action,), {})
    descriptions = types.ModuleType("launch_ros.parameter_descriptions")
    descriptions.ParameterValue = _ParameterValue
    for name, mod in {"launch": launch, "launch.actions": actions,
                      "launch.substitutions": substitutions, "launch_ros": launch_ros,
                      "launch_ros.actions": ros_actions,
                      "launch_ros.parameter_descriptions": descriptions}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(VENV_PREFIX))
    spec = importlib.util.spec_from_file_location("ttspec_launch", SHARE / "launch" /
                                                  "ttspec.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(monkeypatch, **arguments) -> tuple[list, dict]:
    entities = _load_launch_file(monkeypatch).generate_launch_description()
    declared = {e.args[0] if e.args else e.kwargs["name"]: e.kwargs["default_value"]
                for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    unknown = set(arguments) - set(declared)
    assert not unknown, f"not launch arguments: {unknown}"
    context = types.SimpleNamespace(launch_configurations={**declared, **arguments})
    opaque = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    nodes = [n for o in opaque for n in o.kwargs["function"](context)]
    return nodes, declared


def test_launch_arguments_for_camera_topic_model_threshold(monkeypatch):
    _, declared = _launch(monkeypatch)
    assert {"camera_topic", "model", "threshold"} <= set(declared)


def test_default_launch_starts_installed_nodes_with_installed_config(monkeypatch):
    nodes, _ = _launch(monkeypatch)
    assert [n.kwargs["name"] for n in nodes] == [topics.CAMERA_NODE, topics.CLASSIFIER_NODE,
                                                  topics.ADAPTER_NODE]
    for node in nodes:
        kw = node.kwargs
        assert kw["package"] == topics.PACKAGE and kw["namespace"] == topics.NAMESPACE
        assert installed_executable(kw["executable"]).is_file()
        assert kw["executable"] == topics.EXECUTABLES[kw["name"]]
        [params_file] = kw["parameters"]  # nothing given: the config alone decides
        assert Path(params_file) == SHARE / "config" / "ttspec.yaml"
        assert Path(params_file).is_file()


def test_launch_arguments_become_overrides_and_remaps(monkeypatch):
    nodes, _ = _launch(monkeypatch, camera_topic="/cam/color/image_raw", model="/m/demo",
                       threshold="0.75", state_dir="/var/lib/ttspec")
    by_name = {n.kwargs["name"]: n.kwargs for n in nodes}
    camera = by_name[topics.CAMERA_NODE]
    # one remap: the camera subscribes to <image_raw as remapped>/compressed itself
    assert dict(camera["remappings"]) == {topics.IMAGE_RAW: "/cam/color/image_raw"}
    assert by_name[topics.CLASSIFIER_NODE]["parameters"][1] == {"model": "/m/demo",
                                                                "threshold": 0.75}
    assert by_name[topics.ADAPTER_NODE]["parameters"][1] == {"model": "/m/demo",
                                                             "state_dir": "/var/lib/ttspec"}
    for name, kw in by_name.items():
        overrides = _plain(kw["parameters"][1])
        assert params.check_params(name, overrides) is None


def test_path_arguments_stay_strings_and_expand_home(monkeypatch):
    # launch_ros reads plain strings as YAML: 2024-01-15 would be a date, 0755 an int.
    monkeypatch.setenv("HOME", "/home/robot")
    nodes, _ = _launch(monkeypatch, model="2024-01-15", state_dir="~/0755")
    by_name = {n.kwargs["name"]: n.kwargs["parameters"][1] for n in nodes}
    for value in (by_name[topics.CAMERA_NODE]["model"], by_name[topics.ADAPTER_NODE]["state_dir"]):
        assert isinstance(value, _ParameterValue) and value.value_type is str
    assert by_name[topics.ADAPTER_NODE]["state_dir"].value == "/home/robot/0755"
    assert by_name[topics.CLASSIFIER_NODE]["model"].value == "2024-01-15"


def test_namespace_argument_moves_every_node(monkeypatch):
    nodes, _ = _launch(monkeypatch, namespace="ttspec_left")
    assert [n.kwargs["namespace"] for n in nodes] == ["ttspec_left"] * 3


def test_bad_threshold_argument_fails_loudly(monkeypatch):
    with pytest.raises(ValueError):
        _launch(monkeypatch, threshold="high")


def test_use_sim_time_argument_reaches_every_node(monkeypatch):
    """Bag replay with /clock: `use_sim_time:=true` must reach all three nodes (an undeclared
    launch argument would be ignored without a word)."""
    nodes, declared = _launch(monkeypatch)
    assert declared["use_sim_time"] == ""
    assert all(len(n.kwargs["parameters"]) == 1 for n in nodes)  # '' = the params file's
    for text, value in (("true", True), ("False", False)):
        nodes, _ = _launch(monkeypatch, use_sim_time=text)
        assert [n.kwargs["parameters"][1] for n in nodes] == [{"use_sim_time": value}] * 3
    with pytest.raises(ValueError, match="use_sim_time"):
        _launch(monkeypatch, use_sim_time="yes")


def test_image_reliability_argument_reaches_the_camera(monkeypatch):
    nodes, declared = _launch(monkeypatch)
    assert declared["image_reliability"] == ""
    nodes, _ = _launch(monkeypatch, image_reliability="reliable", namespace="left")
    by_name = {n.kwargs["name"]: n.kwargs["parameters"] for n in nodes}
    assert by_name[topics.CAMERA_NODE][1] == {"image_reliability": "reliable"}
    assert params.check_params(topics.CAMERA_NODE, by_name[topics.CAMERA_NODE][1]) is None
    assert len(by_name[topics.CLASSIFIER_NODE]) == 1  # the camera's reader only
    with pytest.raises(ValueError, match="image_reliability"):
        _launch(monkeypatch, image_reliability="RELIABLE")
