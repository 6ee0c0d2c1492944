"""The installed command scripts (bin/ttspec, lib/ttspec_ros/*_node) run main() only as
__main__: multiprocessing's spawn start method re-runs the main script in every worker as
__mp_main__ (the ttt-experiment worker pool once restarted the whole command there)."""

from __future__ import annotations

import importlib
import re
import runpy

import pytest
from conftest import VENV_PREFIX, installed_executable

from ttspec_ros import topics

SCRIPTS = [VENV_PREFIX / "bin" / "ttspec"] + [
    installed_executable(name) for name in topics.EXECUTABLES.values()
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_main_only_as_main(script, monkeypatch):
    module_name = re.search(r"^from (\S+) import main$", script.read_text(), re.M).group(1)
    calls = []
    monkeypatch.setattr(importlib.import_module(module_name), "main",
                        lambda: calls.append(1) or 0)
    runpy.run_path(str(script), run_name="__mp_main__")  # what a spawned worker does
    assert calls == []
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert calls == [1] and exited.value.code == 0
