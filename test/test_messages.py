"""Every custom message crosses a process boundary over real DDS with every field intact."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
msg_samples = pytest.importorskip("msg_samples")


def test_every_message_arrives_with_every_field() -> None:
    expected = msg_samples.samples()
    rclpy.init()
    node = rclpy.create_node("ttspec_msg_roundtrip_test")
    received: dict[str, object] = {}
    for name, msg in expected.items():
        node.create_subscription(
            type(msg), msg_samples.TOPIC_PREFIX + name,
            lambda m, name=name: received.setdefault(name, m), 10,
        )
    publisher = subprocess.Popen(
        [sys.executable, str(Path(msg_samples.__file__))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30.0
        while len(received) < len(expected) and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
            assert publisher.poll() is None, publisher.stdout.read().decode()
    finally:
        publisher.send_signal(signal.SIGINT)
        out, _ = publisher.communicate(timeout=10)
        node.destroy_node()
        rclpy.shutdown()
    assert set(received) == set(expected), f"missing: {set(expected) - set(received)}"
    for name, msg in expected.items():
        assert msg_samples.as_plain(received[name]) == msg_samples.as_plain(msg), name
    assert publisher.returncode == 0, out.decode()
    assert b"Traceback" not in out, out.decode()
