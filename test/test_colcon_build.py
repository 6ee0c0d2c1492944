"""`colcon build` of a workspace holding this repository works as it will on a robot, and the
install space has the messages, the Python package, the executables, launch/ and config/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_colcon_build_workspace(tmp_path: Path) -> None:
    colcon = shutil.which("colcon") or str(Path(sys.executable).with_name("colcon"))
    if not Path(colcon).exists():
        pytest.skip("colcon is not installed (requirements.txt installs it)")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ttspec_ros").symlink_to(REPO)
    prefix = sys.prefix
    env = {**os.environ, "AMENT_PREFIX_PATH": prefix, "CMAKE_PREFIX_PATH": prefix,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the install space alone must be enough
    build = subprocess.run(
        [colcon, "build", "--base-paths", "src", "--cmake-args",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    install = tmp_path / "install" / "ttspec_ros"
    for exe in ("camera_node", "classifier_node", "adapter_node"):
        assert os.access(install / "lib" / "ttspec_ros" / exe, os.X_OK), exe
    assert (install / "share" / "ttspec_ros" / "launch" / "ttspec.launch.py").exists()
    assert (install / "share" / "ttspec_ros" / "config" / "ttspec.yaml").exists()
    site = next((install / "lib").glob("python3*/site-packages"))
    check = subprocess.run(
        [sys.executable, "-c",
         "import ttspec_ros, ttspec_ros.msg as m, ttspec_ros.cli; "
         "print(ttspec_ros.__path__[0]); print(m.CascadePrediction.__module__)"],
        env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path, capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[0].startswith(str(site)), check.stdout
