"""Drive the pipeline from outside, as a user's process would: start the installed node
executables, publish images, watch predictions/frames/diagnostics, call parameter services.

Used by the end-to-end tests and ``ttspec bench-ros``; not a node users run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.srv import GetParameters, ListParameters, SetParameters
from rclpy.client import Client
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from ttspec_ros import topics
from ttspec_ros.msg import CascadePrediction, ModelUpdate
from ttspec_ros.nodes import SpinThread, die_with_parent, qos


class NodeProcess:
    """One installed node executable started the way the launch file starts it."""

    def __init__(self, node: str, overrides: dict[str, Any], log_dir: Path,
                 namespace: str = topics.NAMESPACE, extra_args: Sequence[str] = ()) -> None:
        self.node = node
        self.overrides = dict(overrides)
        self.namespace = namespace
        self.extra_args = list(extra_args)
        self.log_path = log_dir / f"{node}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        prefix = topics.installed_prefix()
        exe = prefix / "lib" / topics.PACKAGE / topics.EXECUTABLES[self.node]
        args = [str(exe), "--ros-args", "--params-file",
                str(topics.installed_params_file(prefix)),
                "-r", f"__ns:=/{self.namespace}", "-r", f"__node:={self.node}"]
        for name, value in self.overrides.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args += ["-p", f"{name}:={text}"]
        return args + self.extra_args

    def start(self) -> NodeProcess:
        self.starts += 1
        log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (kept by Popen)
        log.write(f"--- start {self.starts}: {' '.join(self.command())}\n")
        log.flush()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=os.environ.copy(), preexec_fn=die_with_parent())
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        """Send ``sig``, wait; kill if it does not exit in time. -> return code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Ask for the stacks (run_node's SIGUSR1 handler) so the log says where it hung.
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_mb(self) -> float:
        """Resident memory of the node process (its interpreter, after the wheels' re-exec)."""
        return rss_mb(self.pid)


class RelayProcess(NodeProcess):
    """A ``ttspec_ros.nodes.relay`` process (bench-ros transport floor), started like a node."""

    def __init__(self, role: str, log_dir: Path, namespace: str, model: str = "") -> None:
        super().__init__(f"{role}_relay", {}, log_dir, namespace)
        self.role, self.model = role, model

    def command(self) -> list[str]:
        import sys

        return [sys.executable, "-m", "ttspec_ros.nodes.relay", "--role", self.role,
                *(["--model", self.model] if self.model else []),
                "--ros-args", "-r", f"__ns:=/{self.namespace}"]


def rss_mb(pid: int) -> float:
    # The executable's interpreter may re-exec once (ros-wheels bootstrapper): same pid.
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


@dataclass
class Received:
    msg: Any
    t: float  # time.perf_counter() at arrival


class Probe:
    """A test/bench node in its own rclpy context, spinning in a background thread."""

    def __init__(self, namespace: str = topics.NAMESPACE, watch_frames: bool = False,
                 name: str = "ttspec_probe") -> None:
        self.ns = f"/{namespace}"
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context)
        self.lock = threading.Lock()
        self.predictions: list[Received] = []
        self.frames: list[Received] = []
        self.updates: list[Received] = []
        self.diagnostics: dict[str, dict[str, str]] = {}
        self.diagnostics_stamps: dict[str, float] = {}  # the node's clock, in seconds
        # node -> the last (level, message) it reported, and its latest non-OK messages
        self.statuses: dict[str, tuple[int, str]] = {}
        self.warnings: dict[str, deque[str]] = {}
        self.image_pub = self.node.create_publisher(
            Image, f"{self.ns}/{topics.IMAGE_RAW}", qos(topics.QOS_SENSOR))
        self.node.create_subscription(
            CascadePrediction, f"{self.ns}/{topics.PREDICTIONS}",
            self._keep(self.predictions), qos(topics.QOS_RELIABLE))
        self.node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, self._on_diagnostics,
                                      qos(topics.QOS_RELIABLE))
        self._frames_sub: Subscription[Image] | None = None
        self.watch_frames(watch_frames)
        self._update_sub: Subscription[ModelUpdate] | None = None
        self._sensor_pubs: dict[str, Any] = {}
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = SpinThread(self.executor, "probe-spin")

    def spinning(self) -> bool:
        return self._spinner.is_alive()

    def _keep(self, into: list[Received]) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            t = time.perf_counter()
            with self.lock:
                into.append(Received(msg, t))
        return callback

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self.lock:
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            for s in msg.status:
                self.diagnostics[s.name] = {kv.key: kv.value for kv in s.values}
                self.diagnostics_stamps[s.name] = stamp
                level = s.level[0]  # a byte field: bytes of length 1
                self.statuses[s.name] = (level, s.message)
                if level != DiagnosticStatus.OK[0]:
                    self.warnings.setdefault(s.name, deque(maxlen=20)).append(s.message)

    def watch_frames(self, on: bool) -> None:
        """Subscribe to (or leave) the camera's ``frames``. Watching makes the camera deliver
        every frame twice (measured: its publish call ~0.2 -> ~1 ms), so latency figures meant
        for the deployed pipeline (only the classifier reads frames) are taken without it."""
        if on and self._frames_sub is None:
            self._frames_sub = self.node.create_subscription(
                Image, f"{self.ns}/{topics.FRAMES}", self._keep(self.frames),
                qos(topics.QOS_FRAMES))
        elif not on and self._frames_sub is not None:
            self.node.destroy_subscription(self._frames_sub)
            self._frames_sub = None

    def watch_updates(self) -> None:
        """(Re)subscribe to model_updates; transient local delivers the latest one at once."""
        if self._update_sub is not None:
            self.node.destroy_subscription(self._update_sub)
        with self.lock:
            self.updates.clear()
        self._update_sub = self.node.create_subscription(
            ModelUpdate, f"{self.ns}/{topics.MODEL_UPDATES}", self._keep(self.updates),
            qos(topics.QOS_LATCHED))

    # -- queries
    def diag(self, node: str) -> dict[str, str]:
        with self.lock:
            return dict(self.diagnostics.get(f"{self.ns}/{node}", {}))

    def node_time(self, node: str) -> float:
        """``node``'s clock (s) when it last published diagnostics: with use_sim_time, how far
        its /clock has got; -inf before its first."""
        with self.lock:
            return self.diagnostics_stamps.get(f"{self.ns}/{node}", -float("inf"))

    def seen(self, node: str) -> bool:
        """True once ``node`` has published on /diagnostics."""
        with self.lock:
            return f"{self.ns}/{node}" in self.diagnostics

    def count(self, node: str, key: str) -> int:
        return int(self.diag(node).get(key, 0))

    def wait_until_up(self, procs: Mapping[str, NodeProcess], timeout: float) -> bool:
        """Wait until every node of ``procs`` publishes diagnostics and one subscribes to our
        images; -> False at the timeout or as soon as one of them has died."""
        def up_or_dead() -> bool:
            return (all(self.seen(n) for n in procs)
                    and self.image_pub.get_subscription_count() > 0
                    or not all(p.alive() for p in procs.values()))

        return bool(wait_for(up_or_dead, timeout, 0.2)) and all(p.alive() for p in procs.values())

    def not_up_reason(self, procs: Mapping[str, NodeProcess]) -> str:
        """Why ``wait_until_up`` gave False: the nodes that exited (code, log), else the ones
        not yet on /diagnostics, else the missing subscriber of our images."""
        dead = [f"{n} exited with code {p.proc.returncode} (log {p.log_path})"
                for n, p in procs.items() if p.proc is not None and not p.alive()]
        if dead:
            return "; ".join(dead)
        silent = [n for n in procs if not self.seen(n)]
        if silent:
            return f"no diagnostics yet from {', '.join(silent)}"
        return f"nothing subscribes to {self.ns}/{topics.IMAGE_RAW}"

    def clear(self) -> None:
        with self.lock:
            self.predictions.clear()
            self.frames.clear()

    def stamp(self) -> Any:
        return self.node.get_clock().now().to_msg()

    def publish_image(self, fields: dict[str, Any], frame_id: str = "") -> tuple[Any, float]:
        msg = Image(**fields)
        msg.header.stamp = self.stamp()
        msg.header.frame_id = frame_id
        t = time.perf_counter()
        self.image_pub.publish(msg)
        return msg.header.stamp, t

    def publish_updates(self, messages: Sequence[ModelUpdate], timeout: float = 5.0) -> None:
        """Publish ModelUpdates as an adapter would (transient local), one at a time, from a
        publisher that is destroyed afterwards so nothing stays latched."""
        pub = self.node.create_publisher(ModelUpdate, f"{self.ns}/{topics.MODEL_UPDATES}",
                                         qos(topics.QOS_LATCHED))
        try:
            if not wait_for(lambda: pub.get_subscription_count() > 0, timeout):
                raise TimeoutError("nobody subscribes to model_updates")
            for msg in messages:
                pub.publish(msg)
                time.sleep(0.5)  # the classifier keeps only the latest update
        finally:
            self.node.destroy_publisher(pub)

    def _sensor_publisher(self, msg_type: Any, topic: str) -> Any:
        """A publisher on ``topic`` with the QoS its table entry gives a camera driver or the
        camera node (made on first use, once it has a match)."""
        if topic not in self._sensor_pubs:
            profile = next(t.qos for t in topics.TOPICS if t.name == topic)
            pub = self.node.create_publisher(msg_type, f"{self.ns}/{topic}", qos(profile))
            wait_for(lambda: pub.get_subscription_count() > 0, 5.0)
            self._sensor_pubs[topic] = pub
        return self._sensor_pubs[topic]

    def publish_compressed(self, data: bytes, format_: str) -> Any:
        """One CompressedImage on image_raw/compressed."""
        msg = CompressedImage(format=format_, data=data)
        msg.header.stamp = self.stamp()
        self._sensor_publisher(CompressedImage, topics.IMAGE_RAW_COMPRESSED).publish(msg)
        return msg.header.stamp

    def publish_frame(self, fields: dict[str, Any]) -> Any:
        """One Image straight on ``frames``, as if the camera node had sent it."""
        msg = Image(**fields)
        msg.header.stamp = self.stamp()
        self._sensor_publisher(Image, topics.FRAMES).publish(msg)
        return msg.header.stamp

    # -- services
    def _call(self, srv_type: Any, name: str, request: Any, timeout: float = 15.0) -> Any:
        client: Client[Any, Any] = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available")
            future = client.call_async(request)
            end = time.monotonic() + timeout
            while not future.done():
                if time.monotonic() > end:
                    raise TimeoutError(f"service {name} did not answer")
                time.sleep(0.01)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def set_parameters(self, node: str, **values: Any) -> list[Any]:
        """-> SetParametersResult per value (successful, reason)."""
        request = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        return list(self._call(SetParameters, f"{self.ns}/{node}/set_parameters",
                               request).results)

    def list_parameters(self, node: str) -> list[str]:
        response = self._call(ListParameters, f"{self.ns}/{node}/list_parameters",
                              ListParameters.Request())
        return list(response.result.names)

    def get_parameters(self, node: str, *names: str) -> dict[str, Any]:
        response = self._call(GetParameters, f"{self.ns}/{node}/get_parameters",
                              GetParameters.Request(names=list(names)))
        return {n: Parameter.from_parameter_msg(ParameterMsg(name=n, value=v)).value
                for n, v in zip(names, response.values, strict=True)}

    def trigger(self, node: str, service: str) -> Any:
        return self._call(Trigger, f"{self.ns}/{node}/{service}", Trigger.Request())

    def close(self) -> None:
        self._spinner.stop()  # before anything it spins is destroyed (see SpinThread)
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)


@contextlib.contextmanager
def started(procs: Mapping[str, NodeProcess], namespace: str, name: str
            ) -> Iterator[tuple[Probe, dict[str, int]]]:
    """Start ``procs`` and a Probe in ``namespace``. On the way out, also when a start or the
    probe fails, close the probe and stop every process; the dict then holds their exit codes."""
    codes: dict[str, int] = {}
    probe = None
    try:
        for p in procs.values():
            p.start()
        probe = Probe(namespace, name=name)
        yield probe, codes
    finally:
        try:
            if probe is not None:
                probe.close()
        finally:
            codes.update({n: p.stop() for n, p in procs.items()})


def process_problems(alive: Mapping[str, bool], codes: Mapping[str, int]) -> list[str]:
    """Why the node processes of a measurement did not run through, or []: not running when it
    ended (``alive``), or stopped with an exit code other than 0 (``codes``; SIGINT ends a
    healthy node with 0). ttt-ros and bench-ros reported a run whose adapter had died as a
    normal result, exit status 0."""
    out = [f"{node} was not running at the end" for node, up in alive.items() if not up]
    out += [f"{node} exited with {code}" for node, code in codes.items()
            if code != 0 and alive.get(node, True)]
    return out
