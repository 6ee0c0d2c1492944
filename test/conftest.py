"""Test isolation for real ROS 2 processes: every test run gets its own DDS domain, stays on
localhost, logs into a temp dir, and finds this package's installed executables."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from ttspec_ros.topics import localhost_discovery

REPO = Path(__file__).resolve().parent.parent
VENV_PREFIX = Path(sys.prefix)

# Set before any test imports rclpy, and inherited by every node process a test starts.
# Unique per run, and below replay's 60..101 (replay.REPLAY_DOMAIN_BASE).
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 59))
os.environ.update(localhost_discovery())  # ROS_LOCALHOST_ONLY too on Humble
if "ROS_LOG_DIR" not in os.environ:
    _log_dir = tempfile.mkdtemp(prefix="ttspec-roslog-")
    atexit.register(shutil.rmtree, _log_dir, ignore_errors=True)
    os.environ["ROS_LOG_DIR"] = _log_dir
# The venv first: a sourced workspace with another build of this package must not supply the
# executables the tests start (topics.installed_prefix takes the first prefix that has them).
os.environ["AMENT_PREFIX_PATH"] = os.pathsep.join(
    p for p in (str(VENV_PREFIX), os.environ.get("AMENT_PREFIX_PATH", "")) if p
)
os.environ.setdefault("HOME", tempfile.gettempdir())
# Node processes import the installed package; make them see the same sources as the tests.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)


def installed_executable(name: str) -> Path:
    """Path of an executable this package installs into lib/ttspec_ros."""
    path = VENV_PREFIX / "lib" / "ttspec_ros" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is not installed: run `make env` (tools/setup_env.sh)")
    return path


@pytest.fixture
def ros_node():
    """A real rclpy node in its own context, destroyed (context shut down) after the test."""
    rclpy = pytest.importorskip("rclpy")
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("ttspec_test_node", context=context)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
