"""The installed command scripts (bin/ttspec, lib/ttspec_ros/*_node) run main() only as
__main__: multiprocessing's spawn start method re-runs the main script in every worker as
__mp_main__ (the ttt-experiment worker pool once restarted the whole command there). Node
scripts end through ``exit_process`` with main()'s code and lose none of their output."""

from __future__ import annotations

import importlib
import os
import re
import runpy
import subprocess
import sys

import pytest
from conftest import VENV_PREFIX, installed_executable

import ttspec_ros.nodes
from ttspec_ros import topics

SCRIPTS = [VENV_PREFIX / "bin" / "ttspec"] + [
    installed_executable(name) for name in topics.EXECUTABLES.values()
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_main_only_as_main(script, monkeypatch):
    module_name = re.search(r"^\s*from (\S+) import main$", script.read_text(), re.M).group(1)
    calls = []
    monkeypatch.setattr(importlib.import_module(module_name), "main",
                        lambda: calls.append(1) or 3)

    def exit_process(code):  # the real one would end pytest
        raise SystemExit(("exit_process", code))

    monkeypatch.setattr(ttspec_ros.nodes, "exit_process", exit_process)
    runpy.run_path(str(script), run_name="__mp_main__")  # what a spawned worker does
    assert calls == []
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    node = script.name != "ttspec"
    assert calls == [1] and exited.value.code == (("exit_process", 3) if node else 3)


def test_exit_process_keeps_buffered_output_and_the_code():
    """Output still in Python's and C's buffers (a pipe makes both block-buffered) is written
    before the process ends; the exit code is the one given. PYTHONUNBUFFERED (set on some
    machines) would unbuffer C's stdout too and hide a missing flush."""
    program = ("import ctypes, sys\n"
               "from ttspec_ros.nodes import exit_process\n"
               "ctypes.CDLL(None).printf(b'from C\\n')\n"
               "print('from Python')\n"
               "sys.stderr.write('to stderr')\n"
               "exit_process(7)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 7, done.stderr
    assert sorted(done.stdout.splitlines()) == ["from C", "from Python"], done.stdout
    assert done.stderr == "to stderr"


def test_ctrl_c_while_a_node_starts_ends_it_quietly():
    """SIGINT while the node script still imports rclpy and torch (about 2 s here), before
    run_node's handling exists, printed a KeyboardInterrupt traceback and ended with -2."""
    import signal
    import time

    def default_sigint() -> None:
        # A job started with & by a non-interactive shell (e.g. `make test &`) inherits SIGINT
        # ignored, and Python then never raises KeyboardInterrupt: what is tested here is the
        # usual disposition, as under a terminal or launch.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    script = installed_executable(topics.EXECUTABLES[topics.ADAPTER_NODE])
    proc = subprocess.Popen([str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # no-op once it ended
        proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
