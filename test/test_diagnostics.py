"""The /diagnostics levels, on a real rclpy node: ERROR only while the node fails at its job."""

from __future__ import annotations

import time

import pytest

rclpy = pytest.importorskip("rclpy")


def test_levels_say_whether_the_node_is_failing_at_its_job() -> None:
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from ttspec_ros import topics
    from ttspec_ros.nodes import ERROR, OK, WARN, Diagnostics, qos

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("ttspec_diagnostics_test", context=context)
        counts = {"classified": 0, "errors": 0, "rejected": 0}
        diagnostics = Diagnostics(node, lambda: ("frames", dict(counts)), warn_on=("rejected",),
                                  error_on=("errors",), progress=("classified",),
                                  period_s=3600.0)  # published by hand below
        received: list[DiagnosticArray] = []
        node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, received.append,
                                 qos(topics.QOS_RELIABLE))
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 10.0
        while node.count_subscribers(topics.DIAGNOSTICS) == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)

        def report(**grown: int) -> tuple[int, str]:
            for name, n in grown.items():
                counts[name] += n
            before = len(received)
            diagnostics.publish()
            end = time.monotonic() + 10.0
            while len(received) == before and time.monotonic() < end:
                executor.spin_once(timeout_sec=0.05)
            assert len(received) == before + 1, "no /diagnostics message arrived"
            status = received[-1].status[0]
            return status.level[0], status.message

        assert report() == (OK, "frames")
        level, message = report(errors=2)  # every frame of the period failed
        assert level == ERROR and "errors" in message and "classified" in message
        assert report(errors=1, classified=5)[0] == WARN  # failures between successes
        assert report(rejected=1) == (WARN, "frames (new: rejected)")  # bad input only
        assert report(classified=3) == (OK, "frames")
        assert report(errors=1)[0] == ERROR
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
