"""Parameter specs (plain data), their validation, the descriptors built from them, and the
agreement of config/ttspec.yaml, CMakeLists.txt and the nodes' helpers with them."""

from __future__ import annotations

import math
import re

import pytest
import yaml
from conftest import REPO

from ttspec_ros import params, topics

CLASSIFIER_OK = {"model": "", "threshold": -1.0, "thresholds": [0.5, 0.6, 0.7], "max_exit": -1,
                 "publish_samples": True, "num_threads": 1, "backend": "torch",
                 "device": "cpu"}


def _config_params() -> dict:
    doc = yaml.safe_load((REPO / "config" / "ttspec.yaml").read_text())
    assert list(doc) == ["/**"], "one /** section (see the file's comment)"
    return doc["/**"]["ros__parameters"]


def test_every_default_is_valid_and_described():
    for node, specs in params.NODE_PARAMS.items():
        assert len({s.name for s in specs}) == len(specs), node
        for s in specs:
            assert s.description, (node, s.name)
            if s.default is not params.FROM_MODEL_CARD:
                assert params.check_value(s, s.default) is None, (node, s.name)


def test_config_yaml_equals_the_defaults():
    config = _config_params()
    for name, value in config.items():
        owners = [n for n, specs in params.NODE_PARAMS.items()
                  if any(s.name == name for s in specs)]
        assert owners, f"config sets {name!r}, which no node declares"
        for node in owners:
            assert value == params.spec(node, name).default, (node, name)
            assert type(value) is type(params.spec(node, name).default), (node, name)
    for node in params.NODE_PARAMS:
        missing = set(params.defaults(node)) - set(config)
        assert not missing, f"{node} parameters missing from config/ttspec.yaml: {missing}"


def test_the_shipped_params_file_passes_the_start_up_check():
    assert params.check_params_file((REPO / "config" / "ttspec.yaml").read_text()) is None


@pytest.mark.parametrize("text, words", [
    ("/**: [unclosed", "not valid YAML"),
    ("[1, 2]", "needs a mapping of node names"),
    ("/**:\n  learning_rate: 0.1\n", "section '/**' has no 'ros__parameters' mapping"),
    # rclpy refuses an integer for a double parameter at declare time
    ("/**:\n  ros__parameters:\n    learning_rate: 1\n", "learning_rate must be double"),
    ("/**/classifier:\n  ros__parameters:\n    num_threads: 0\n", "num_threads = 0 is outside"),
    ("/ttspec/adapter:\n  ros__parameters:\n    strategy: x\n", "strategy must be one of"),
])
def test_a_params_file_that_would_stop_a_node_is_refused(text, words):
    assert words in params.check_params_file(text)


def test_params_of_other_nodes_and_unknown_names_are_left_alone():
    # another node's section may use our names with its own types; undeclared names are
    # ignored by rclpy
    text = ("other_node:\n  ros__parameters:\n    num_threads: 0\n"
            "/**:\n  ros__parameters:\n    not_ours: [1, 2]\n")
    assert params.check_params_file(text) is None


def test_params_files_rcl_reads_are_read_the_same_way():
    # empty or comment-only: rcl starts the node with nothing from it
    assert params.check_params_file("") is None
    assert params.check_params_file("# nothing yet\n") is None
    # nested namespaces, and values rcl types differently from PyYAML (1e-3: a double to
    # rcl, a string to PyYAML; y: a bool to rcl)
    text = ("robot:\n  adapter:\n    ros__parameters:\n      learning_rate: 1e-3\n"
            "      enabled: y\n  planner:\n    ros__parameters:\n      speed: 2\n")
    assert params.check_params_file(text) is None
    assert params.check_params_file(text.replace("1e-3", "'1e-3'")) == (
        "section 'robot/adapter': learning_rate must be double, got str '1e-3'")
    # several documents, each read; !!str written is text to rcl
    two = "/**:\n  ros__parameters:\n    device: !!str 0\n---\n" + text
    assert params.check_params_file(two) is None
    assert "max_exit must be int" in params.check_params_file(
        two + "---\n/**:\n  ros__parameters:\n    max_exit: 2.0\n")


def test_issue_defaults_of_the_adapter():
    assert params.defaults(topics.ADAPTER_NODE) == {
        "model": "", "enabled": True, "learning_rate": 1e-4, "momentum": 0.0, "batch_size": 1,
        "min_confidence": 0.0, "anchors_file": "", "guard_rehearsal": 2,
        "guard_tolerance": 0.005, "guard_class_tolerance": 0.03,
        "publish_period_s": 1.0, "state_dir": "", "save_period_s": 10.0,
        "strategy": "specialize", "ttt_update": "norm", "ttt_learning_rate": 3e-2}


@pytest.mark.parametrize(("node", "name", "value", "words"), [
    ("classifier", "threshold", 1.5, "outside"),
    ("classifier", "threshold", "0.5", "must be double"),
    ("classifier", "threshold", 1, "must be double"),
    ("classifier", "threshold", math.nan, "finite"),
    ("classifier", "thresholds", [0.5, 2.0, 0.5], "outside"),
    ("classifier", "thresholds", [0.5, 1, 0.5], "list of doubles"),
    ("classifier", "max_exit", -2, "outside"),
    ("classifier", "max_exit", True, "must be int"),
    ("classifier", "num_threads", 0, "outside"),
    ("classifier", "publish_samples", 1, "must be bool"),
    ("camera", "transport", "theora", "one of"),
    ("camera", "max_rate_hz", -1.0, "outside"),
    ("adapter", "batch_size", 0, "outside"),
    ("adapter", "momentum", 1.0, "outside"),
])
def test_bad_values_are_refused_with_a_reason(node, name, value, words):
    reason = params.check_value(params.spec(node, name), value)
    assert reason is not None and words in reason and name in reason


def test_unknown_parameter_is_refused():
    assert "no parameter" in params.check_params("camera", {"threshold": 0.5})


def test_classifier_consistency():
    ok = dict(CLASSIFIER_OK)
    assert params.check_classifier(ok, 4) is None
    assert "needs 3 values" in params.check_classifier({**ok, "thresholds": [0.5]}, 4)
    assert "at most 3" in params.check_classifier({**ok, "max_exit": 4}, 4)
    assert params.check_classifier({**ok, "max_exit": 3}, 4) is None
    assert "-1 or in [0, 1]" in params.check_classifier({**ok, "threshold": -0.5}, 4)
    both = {**ok, "threshold": 0.8}
    # ros2 param set/load apply one value at a time: "in the same call" cannot be followed.
    reason = params.check_classifier(both, 4, changed=["thresholds"])
    assert "no effect" in reason and "threshold to -1 first" in reason
    assert params.check_classifier({**ok, "threshold": -1.0}, 4,
                                   changed=["thresholds", "threshold"]) is None
    # ONNX Runtime sessions fix their thread count at start; torch's follows live.
    ort = {**ok, "backend": "onnxruntime", "num_threads": 2}
    assert "restart the node" in params.check_classifier(ort, 4, changed=["num_threads"])
    assert params.check_classifier(ort, 4, changed=["threshold"]) is None
    assert params.check_classifier({**ok, "num_threads": 2}, 4, changed=["num_threads"]) is None


def test_adapter_learning_rate_must_be_positive():
    assert "> 0" in params.check_adapter({"learning_rate": 0.0})
    assert params.check_adapter({"learning_rate": 0.01}) is None
    assert "needs strategy specialize" in params.check_adapter(
        {"anchors_file": "/a.safetensors", "strategy": "both"})
    assert params.check_adapter({"anchors_file": "/a.safetensors", "strategy": "specialize"}) \
        is None


def test_effective_thresholds_and_rate():
    assert params.effective_thresholds(-1.0, [0.2, 0.3]) == [0.2, 0.3]
    assert params.effective_thresholds(0.9, [0.2, 0.3]) == [0.9, 0.9]
    assert params.min_period_s(0.0) == 0.0 and params.min_period_s(20.0) == pytest.approx(0.05)


def test_descriptors_carry_type_range_and_description():
    from rcl_interfaces.msg import ParameterType

    from ttspec_ros.nodes import descriptor

    d = descriptor(params.spec("classifier", "threshold"))
    assert d.type == ParameterType.PARAMETER_DOUBLE and d.description
    assert (d.floating_point_range[0].from_value, d.floating_point_range[0].to_value) == (-1, 1)
    d = descriptor(params.spec("classifier", "num_threads"))
    assert (d.integer_range[0].from_value, d.integer_range[0].to_value) == (1, 64)
    d = descriptor(params.spec("classifier", "thresholds"))
    assert d.type == ParameterType.PARAMETER_DOUBLE_ARRAY and "each in [0.0, 1.0]" in \
        d.additional_constraints
    assert descriptor(params.spec("adapter", "model")).read_only
    assert "compressed" in descriptor(params.spec("camera", "transport")).description


def test_names_agree_with_cmake():
    cmake = (REPO / "CMakeLists.txt").read_text()
    pairs = dict(re.findall(r"(\w+_node):(\w+)", cmake))
    assert pairs == {exe: node for node, exe in topics.EXECUTABLES.items()}
    names = [t.name for t in topics.TOPICS]
    assert len(names) == len(set(names))


def test_adapter_ttt_defaults_are_the_engines():
    """The adapter's TTT parameters default to the TTT engine's tuned online settings."""
    from ttspec_ros.ttt import UPDATES, TTTConfig

    assert params.spec("adapter", "ttt_learning_rate").default == TTTConfig().lr
    assert params.spec("adapter", "ttt_update").default == TTTConfig().update
    assert params.spec("adapter", "ttt_update").choices == UPDATES
    assert params.strategy_uses_ttt("both") and not params.strategy_uses_ttt("specialize")


def test_adapter_guard_defaults_are_the_guards():
    """The adapter's forgetting-guard parameters default to AnchorGuard's own defaults."""
    import inspect

    from ttspec_ros.guard import AnchorGuard

    signature = inspect.signature(AnchorGuard).parameters
    for param, arg in (("guard_rehearsal", "rehearsal"), ("guard_tolerance", "tolerance"),
                       ("guard_class_tolerance", "class_tolerance")):
        assert params.spec("adapter", param).default == signature[arg].default, param


def test_whole_layer_test_time_training_at_the_norm_rate_is_warned_about():
    assert params.ttt_learning_rate_warning("norm", 0.03) is None
    assert params.ttt_learning_rate_warning("encoder", 0.003) is None
    warning = params.ttt_learning_rate_warning("columns", 0.03)
    assert "columns" in warning and "0.003" in warning


def test_a_params_files_value_for_a_node_is_found_as_rcl_applies_sections():
    """replay gives every node, and reads the card of, the classifier model a params file
    names (the report used to read the bundled demo card)."""
    def rank(text: str) -> object:
        return params.params_file_value(text, "classifier", "model")

    assert rank("/**:\n  ros__parameters:\n    model: /m/a\n") == "/m/a"
    assert rank("/**:\n  ros__parameters:\n    threshold: 0.5\n") is None
    # the classifier's own section wins over a wildcard, whichever comes first; other nodes'
    # sections are not the classifier's
    assert rank("/**/classifier:\n  ros__parameters:\n    model: /m/c\n"
                "/**:\n  ros__parameters:\n    model: /m/a\n"
                "/ttspec/camera:\n  ros__parameters:\n    model: /m/cam\n") == "/m/c"
    assert rank("ttspec:\n  classifier:\n    ros__parameters:\n      model: /m/n\n") == "/m/n"
    assert rank("/**:\n  ros__parameters:\n    model: /m/a\n---\n"
                "/**:\n  ros__parameters:\n    model: /m/b\n") == "/m/b"

