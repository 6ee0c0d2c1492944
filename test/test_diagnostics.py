"""The /diagnostics levels, on a real rclpy node: ERROR while a job of the node is failing."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

pytest.importorskip("rclpy")


def reporter(node, counts: dict[str, int], resumed: bool = False,
             **options) -> Callable[..., tuple[int, str]]:
    """report(**grown) -> (level, message) of the status published after adding ``grown``
    (``resumed``: ``counts`` are a node's restored ones, as a resumed adapter's)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from ttspec_ros import topics
    from ttspec_ros.nodes import Diagnostics, qos

    diagnostics = Diagnostics(node, lambda: ("frames", dict(counts)), period_s=3600.0,
                              **options)  # published by hand below
    if resumed:
        diagnostics.start_from_current()
    received: list[DiagnosticArray] = []
    node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, received.append,
                             qos(topics.QOS_RELIABLE))
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    deadline = time.monotonic() + 10.0
    while node.count_subscribers(topics.DIAGNOSTICS) == 0 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)

    def report(**grown: int) -> tuple[int, str]:
        for name, n in grown.items():
            counts[name] = counts.get(name, 0) + n
        before = len(received)
        diagnostics.publish()
        end = time.monotonic() + 10.0
        while len(received) == before and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        assert len(received) == before + 1, "no /diagnostics message arrived"
        status = received[-1].status[0]
        return status.level[0], status.message

    return report


def test_a_failing_job_is_an_error_until_it_succeeds_again(ros_node) -> None:
    from ttspec_ros.nodes import ERROR, OK, WARN

    report = reporter(ros_node, {}, warn_on=("rejected",), jobs={"errors": "classified"})
    assert report() == (OK, "frames")
    level, message = report(errors=2)  # every frame of the period failed
    assert level == ERROR and "errors, no classified since" in message
    assert report()[0] == ERROR  # no frame since: still failing
    assert report(classified=1) == (OK, "frames")
    assert report(errors=1, classified=5) == (WARN, "frames (new: errors)")  # between successes
    assert report(rejected=1) == (WARN, "frames (new: rejected)")  # bad input only
    assert report(classified=3) == (OK, "frames")


def test_one_failing_job_is_not_hidden_by_another_that_works(ros_node) -> None:
    from ttspec_ros.nodes import ERROR, OK

    report = reporter(ros_node, {}, jobs={"sample_errors": "samples_used",
                                      "publish_errors": "updates_published"})
    level, message = report(publish_errors=1, samples_used=20)
    assert level == ERROR and "publish_errors, no updates_published since" in message
    assert report(samples_used=20)[0] == ERROR
    assert report(updates_published=1, samples_used=20) == (OK, "frames")


def test_an_input_that_stops_arriving_is_a_warning(ros_node, monkeypatch) -> None:
    from ttspec_ros.nodes import OK, WARN, Diagnostics

    monkeypatch.setattr(Diagnostics, "IDLE_S", 0.5)
    report = reporter(ros_node, {}, expect=("received", "images"))
    assert report(received=3) == (OK, "frames")
    time.sleep(0.6)
    level, message = report()
    assert level == WARN and "no images for" in message  # a dead or mis-remapped topic
    assert report(received=1) == (OK, "frames")


def test_stats_report_means_since_start_and_over_the_recent_values() -> None:
    from ttspec_ros.nodes import Stats

    stats = Stats(recent=3)
    stats.count("classified", 4)
    for value in (10.0, 0.0, 1.0, 2.0):
        stats.add("exit", value)
    assert stats.snapshot() == {"classified": "4", "mean_exit": "3.250",
                                "recent_mean_exit": "1.000"}


@pytest.mark.parametrize("resumed", [False, True])
def test_counters_restored_from_saved_state_are_not_news(ros_node, resumed) -> None:
    """A resumed adapter's first report warned of an overflow from before its restart."""
    from ttspec_ros.nodes import OK, WARN

    report = reporter(ros_node, {"overflows": 1}, resumed=resumed, warn_on=("overflows",))
    assert report() == ((OK, "frames") if resumed else (WARN, "frames (new: overflows)"))
    assert report(overflows=1) == (WARN, "frames (new: overflows)")  # one in this run is
