"""SpinThread on a real rclpy node: it runs callbacks until stop(), and after stop() nothing of
the node runs any more, so the node and its context can be destroyed (see SpinThread)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("rclpy")


@pytest.fixture
def spun(ros_node):
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=ros_node.context)
    executor.add_node(ros_node)
    try:
        yield ros_node, executor
    finally:
        executor.shutdown(timeout_sec=2.0)


def test_callbacks_run_until_stop_and_never_after(spun):
    from ttspec_ros.nodes import SpinThread
    from ttspec_ros.nodes.probe import wait_for

    node, executor = spun
    ticks: list[str] = []
    node.create_timer(0.01, lambda: ticks.append(threading.current_thread().name))
    spinner = SpinThread(executor, "test-spin")
    assert wait_for(lambda: len(ticks) >= 3, 10.0, 0.01)
    assert set(ticks) == {"test-spin"}  # on the spin thread, not the caller's
    assert spinner.stop() and not spinner.is_alive()
    stopped_at = len(ticks)
    time.sleep(0.2)  # 20 timer periods
    assert len(ticks) == stopped_at
    assert spinner.error is None


def test_stop_ends_a_thread_waiting_for_work(spun):
    from ttspec_ros.nodes import SpinThread

    _, executor = spun
    spinner = SpinThread(executor, "idle-spin")  # nothing to do: it sits in the executor's wait
    time.sleep(0.1)
    assert spinner.is_alive()
    assert spinner.stop() and not spinner.is_alive()


def test_a_failing_callback_ends_spinning_and_is_kept(spun):
    from ttspec_ros.nodes import SpinThread
    from ttspec_ros.nodes.probe import wait_for

    node, executor = spun

    def fail() -> None:
        raise RuntimeError("callback failed")

    node.create_timer(0.01, fail)
    # the thread re-raises, so threading's excepthook reports it; keep the test output quiet
    hook, threading.excepthook = threading.excepthook, lambda args: None
    try:
        spinner = SpinThread(executor, "failing-spin")
        assert wait_for(lambda: not spinner.is_alive(), 10.0, 0.01)
    finally:
        threading.excepthook = hook
    assert isinstance(spinner.error, RuntimeError) and "callback failed" in str(spinner.error)
    assert spinner.stop()
