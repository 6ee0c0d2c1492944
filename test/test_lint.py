"""Static checks that run as tests: ruff on all Python, mypy on the package, package.xml
validated as catkin does and declaring what the package imports, and the ROS-free core never
imports rclpy."""

from __future__ import annotations

import ast
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


def test_mypy_clean() -> None:
    # pyproject.toml's [tool.mypy] says what is checked, for which Python, and which imports
    # come without type information.
    result = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_xml_valid() -> None:
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    pkg = catkin_pkg.parse_package(str(REPO / "package.xml"))  # raises on any violation
    pkg.validate()
    assert pkg.name == "ttspec_ros"
    assert pkg.package_format == 3
    assert pkg.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [g.name for g in pkg.member_of_groups]


def test_one_release_number() -> None:
    # package.xml (ROS), setup.py (pip) and ttspec_ros.__version__ (provenance.json, --version)
    # each state it, as ament_python packages do; they must say the same.
    import re

    from ttspec_ros import __version__

    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    setup = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text(encoding="utf-8"))
    assert setup is not None
    assert catkin_pkg.parse_package(str(REPO / "package.xml")).version == setup[1] == __version__


# Imports whose rosdep key is not the module's name.
ROSDEP_KEYS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "yaml": "python3-yaml",
               "matplotlib": "python3-matplotlib"}
# Installed with pip (README), or optional backends that fail at start naming what is missing.
NOT_ROSDEP = {"torch", "safetensors", "rosbags", "onnx", "onnxruntime", "tensorrt"}


def _third_party_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names
            if name not in sys.stdlib_module_names and name != "ttspec_ros"}


def test_package_xml_declares_every_import() -> None:
    """rosdep installs what package.xml names: an import it misses fails only on a robot."""
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    pkg = catkin_pkg.parse_package(str(REPO / "package.xml"))
    declared = {dep.name for dep in pkg.exec_depends}  # <depend> entries are in it too
    sources = [*(REPO / "ttspec_ros").rglob("*.py"), *(REPO / "launch").glob("*.py")]
    used: dict[str, str] = {}
    for path in sources:
        for name in _third_party_imports(path) - NOT_ROSDEP:
            used.setdefault(ROSDEP_KEYS.get(name, name), str(path.relative_to(REPO)))
    assert "rclpy" in used and "python3-numpy" in used  # the scan sees the nodes and the core
    missing = {key: path for key, path in used.items() if key not in declared}
    assert not missing, f"imported but not in package.xml (key: first file): {missing}"


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
