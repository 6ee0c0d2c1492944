"""Static checks that run as tests: ruff on all Python, package.xml validated as catkin does,
and the ROS-free core never imports rclpy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_xml_valid() -> None:
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    pkg = catkin_pkg.parse_package(str(REPO / "package.xml"))  # raises on any violation
    pkg.validate()
    assert pkg.name == "ttspec_ros"
    assert pkg.package_format == 3
    assert pkg.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [g.name for g in pkg.member_of_groups]


def test_importing_the_core_does_not_load_rclpy() -> None:
    """Every module outside ttspec_ros.nodes imports on a machine without ROS."""
    core = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "ttspec_ros").rglob("*.py")
        if "nodes" not in path.relative_to(REPO / "ttspec_ros").parts
    )
    assert "ttspec_ros.cascade" in core
    # pkgutil.walk_packages would import ttspec_ros.nodes itself to recurse: list files instead.
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'rclpy' not in sys.modules, f'{name} imported rclpy'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
