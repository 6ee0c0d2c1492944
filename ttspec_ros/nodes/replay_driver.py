"""Replay driver: starts the installed node graph as processes, plays a bag's images into it and
collects every prediction (the rclpy half of ``ttspec replay``; metrics live in
ttspec_ros.replay_report).

Each run gets fresh camera/classifier/adapter processes (same ``--ros-args --params-file`` and
namespace as the launch file, plus an overlay params file of the run's values, among them an
empty adapter ``state_dir``), so adaptation never carries over between runs. The raw CDR
bytes from the bag are published unchanged (header stamps preserved); predictions are matched
to frames by header stamp. ``main()`` is ``ttspec replay``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.srv import GetParameters
from rclpy.client import Client
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from ttspec_ros import replay, replay_report, replay_runs, topics
from ttspec_ros.bags import ImageStream
from ttspec_ros.files import write_text
from ttspec_ros.msg import CascadePrediction
from ttspec_ros.nodes import (
    MATCHED_FRAMES_READERS,
    MATCHED_FRAMES_WRITERS,
    MATCHED_IMAGES_WRITERS,
    MATCHED_PREDICTIONS_READERS,
    MATCHED_SAMPLES_READERS,
    SpinThread,
    die_with_parent,
    qos,
)

STARTUP_TIMEOUT_S = 120.0  # three processes importing torch on a busy 2-core machine
SETTLE_S = 0.5  # after matching: Humble cannot tell a best-effort reader's side (see below)
DIAGNOSTICS_WAIT_S = 2.5  # diagnostics come about once a second
QUIET_S = 3.0  # rate mode: no prediction for this long after the last frame = the end


class GraphError(RuntimeError):
    """The node graph did not start or died; the message names the node and its log."""


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class NodeGraph:
    """The three node processes of one run."""

    def __init__(self, graph: replay.GraphSpec, overrides: dict[str, dict[str, object]],
                 env: dict[str, str], log_dir: Path) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        log_dir.mkdir(parents=True, exist_ok=True)
        overlay = log_dir / "overrides.yaml"
        write_text(overlay, graph.overlay_yaml(overrides))
        try:
            for node, executable in topics.EXECUTABLES.items():
                cmd = [str(graph.executable(executable)), *graph.ros_args(overlay)]
                log = log_dir / f"{node}.log"
                self.logs[node] = log
                with open(log, "wb") as f:
                    f.write((" ".join(cmd) + "\n").encode())
                    f.flush()
                    self.procs[node] = subprocess.Popen(
                        cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        env=env, preexec_fn=die_with_parent())
        except BaseException:  # the ones already started are not left running
            self.stop()
            raise

    def check_alive(self) -> None:
        for node, proc in self.procs.items():
            if proc.poll() is not None:
                raise GraphError(f"node {node} exited with code {proc.returncode}; "
                                 f"log {self.logs[node]}:\n{_log_tail(self.logs[node])}")

    def stop(self, timeout_s: float = 10.0) -> dict[str, int | None]:
        """SIGINT every node, then SIGKILL what is still running; -> exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for node, proc in self.procs.items():
            try:
                codes[node] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[node] = proc.wait()
        return codes


class Collector(Node):
    """Publishes frames on the camera topic, collects predictions and node diagnostics."""

    def __init__(self, context: Context, compressed: bool) -> None:
        super().__init__("replay", namespace="/" + topics.NAMESPACE, context=context)
        msg_type = CompressedImage if compressed else Image
        topic = topics.IMAGE_RAW_COMPRESSED if compressed else topics.IMAGE_RAW
        self.image_pub = self.create_publisher(
            msg_type, topic,
            QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                       reliability=ReliabilityPolicy.RELIABLE))
        deep_reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10000,
                                   reliability=ReliabilityPolicy.RELIABLE)
        self.pred_sub = self.create_subscription(
            CascadePrediction, topics.PREDICTIONS, self._on_prediction, deep_reliable)
        self.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, self._on_diagnostics,
                                 qos(topics.QOS_RELIABLE))
        self.cond = threading.Condition()
        self.predictions: deque[tuple[CascadePrediction, float]] = deque()
        self.diagnostics: dict[str, dict[str, str]] = {}
        self.diagnostics_at: dict[str, float] = {}

    def _on_prediction(self, msg: CascadePrediction) -> None:
        with self.cond:
            self.predictions.append((msg, time.perf_counter()))
            self.cond.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self.cond:
            for status in msg.status:
                name = status.name.rsplit("/", 1)[-1]
                self.diagnostics[name] = {kv.key: kv.value for kv in status.values}
                self.diagnostics_at[name] = time.monotonic()
            self.cond.notify_all()

    def counters(self) -> dict[str, dict[str, int]]:
        with self.cond:
            return {node: replay_report.int_counters(values)
                    for node, values in self.diagnostics.items()}

    def wait_fresh_diagnostics(self, nodes: list[str], after: float, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while any(self.diagnostics_at.get(n, -1.0) <= after for n in nodes):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)


class _Matcher:
    """Frames waiting for their prediction, by header stamp (duplicates answered in order)."""

    def __init__(self, outcomes: list[replay_runs.Outcome]) -> None:
        self.outcomes = outcomes
        self.waiting: dict[int, deque[int]] = {}
        self.sent_at: dict[int, float] = {}
        self.unmatched = 0

    def sent(self, index: int, at: float) -> None:
        self.waiting.setdefault(self.outcomes[index].stamp_ns, deque()).append(index)
        self.sent_at[index] = at

    def answer(self, msg: CascadePrediction, at: float) -> int | None:
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        queue = self.waiting.get(stamp)
        if not queue:
            self.unmatched += 1
            return None
        index = queue.popleft()
        o = self.outcomes[index]
        o.class_id, o.exit_index = int(msg.class_id), int(msg.exit_index)
        o.confidence, o.latency_ms = float(msg.confidence), float(msg.latency_ms)
        o.model_version = int(msg.model_version)
        o.e2e_ms = (at - self.sent_at[index]) * 1000.0
        o.dropped = None  # a late answer (after a lockstep timeout) still counts as answered
        return index


def _matched(values: dict[str, str], key: str) -> bool | None:
    """Whether a node's diagnostics say DDS matched the endpoint (None: it does not say)."""
    return None if key not in values else int(values[key]) >= 1


def _wait_for_graph(node: Collector, graph: NodeGraph, adapt: bool, timeout_s: float) -> None:
    """Until every node is up (diagnostics seen) and every hop of the graph is matched.

    The graph's counts list an endpoint once it is announced, before the other side's DDS
    entity has matched it, and a message sent in between is lost; so each hop is checked by
    the matched counts of its writer and, for best-effort hops (the camera subscribes with
    sensor-data QoS), of its reader too where rclpy tells (Iron and later). A reliable hop
    needs only the writer's match: the writer resends what the reader has not acknowledged.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        graph.check_alive()
        with node.cond:
            seen = {name: dict(values) for name, values in node.diagnostics.items()}
        camera = seen.get(topics.CAMERA_NODE, {})
        classifier = seen.get(topics.CLASSIFIER_NODE, {})
        ready = {
            "all nodes reporting": set(topics.EXECUTABLES) <= set(seen),
            "our images matched by the camera": node.image_pub.get_subscription_count() >= 1,
            "camera matched our images": _matched(camera, MATCHED_IMAGES_WRITERS) is not False,
            "camera's frames matched by a reader": bool(
                _matched(camera, MATCHED_FRAMES_READERS)),
            "classifier matched the camera's frames": _matched(
                classifier, MATCHED_FRAMES_WRITERS) is not False,
            "classifier's predictions matched by a reader": bool(
                _matched(classifier, MATCHED_PREDICTIONS_READERS)),
        }
        if adapt:
            ready["adapter subscribed to samples"] = bool(
                _matched(classifier, MATCHED_SAMPLES_READERS))
        if all(ready.values()):
            return
        if time.monotonic() > deadline:
            missing = [k for k, v in ready.items() if not v]
            raise GraphError(f"node graph not ready after {timeout_s:.0f} s: {missing}")
        time.sleep(0.1)


def _classifier_thresholds(node: Collector, timeout_s: float = 10.0) -> list[float] | None:
    from ttspec_ros import params

    # A plain service client: rclpy's AsyncParameterClient is Iron and later.
    client: Client[GetParameters.Request, GetParameters.Response] = node.create_client(
        GetParameters, f"{topics.CLASSIFIER_NODE}/get_parameters")
    try:
        if not client.wait_for_service(timeout_sec=timeout_s):
            return None
        future = client.call_async(GetParameters.Request(names=["threshold", "thresholds"]))
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)  # the executor thread spinning this node completes the future
        response = future.result() if future.done() else None
        if response is None:
            return None
        threshold, thresholds = response.values
    finally:
        node.destroy_client(client)
    return params.effective_thresholds(threshold.double_value, list(thresholds.double_array_value))


def play(
    stream: ImageStream, settings: replay_runs.RunSettings, graph: replay.GraphSpec, *,
    domain_id: int, log_dir: Path, max_frames: int | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> replay_runs.RunResult:
    """One run: start the graph, play the frames, collect predictions, stop the graph."""
    env = graph.environment(domain_id, log_dir)
    overrides = graph.overrides(settings, compressed=stream.compressed)
    os.environ.update(topics.localhost_discovery())  # this process joins the graph too
    os.environ.setdefault("ROS_LOG_DIR", env["ROS_LOG_DIR"])
    total = min(stream.image_count, max_frames) if max_frames else stream.image_count

    # The driver's own node comes up first, so a failure there leaves no node process behind.
    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    node: Collector | None = None
    executor = SingleThreadedExecutor(context=context)
    procs: NodeGraph | None = None
    spinner: SpinThread | None = None
    outcomes: list[replay_runs.Outcome] = []
    matcher = _Matcher(outcomes)
    codes: dict[str, int | None] = {}
    try:
        node = Collector(context, stream.compressed)
        executor.add_node(node)
        spinner = SpinThread(executor, "replay-spin")
        procs = NodeGraph(graph, overrides, env, log_dir)
        launched = time.perf_counter()
        _wait_for_graph(node, procs, settings.adapt, STARTUP_TIMEOUT_S)
        used_thresholds = _classifier_thresholds(node)
        time.sleep(SETTLE_S)
        startup = time.perf_counter() - launched
        if progress:
            progress(0, "graph ready")
        before = node.counters()
        started = time.perf_counter()
        pacer = replay_runs.RatePacer(settings.rate) if settings.rate is not None else None

        # Last frame sent or answer received: the end of the run's wall time (waits for answers
        # that never come do not count; with a lost frame they added QUIET_S or a timeout).
        last_event = [started]

        def drain() -> None:
            # caller holds node.cond
            while node.predictions:
                msg, at = node.predictions.popleft()
                matcher.answer(msg, at)
                last_event[0] = max(last_event[0], at)

        def check_running() -> None:
            # A node or our spin thread that died mid-run would otherwise turn the rest of the
            # bag into lost frames of a report that reads like a slow graph.
            procs.check_alive()
            if not spinner.is_alive():
                raise GraphError(f"the replay's spin thread stopped: {spinner.error!r}")

        for frame in stream.frames(limit=total):
            outcomes.append(replay_runs.Outcome(index=frame.index, stamp_ns=frame.stamp_ns,
                                                label=stream.labels.get(frame.stamp_ns)))
            if pacer is not None:  # not lockstep: the recorded timing over the rate, capped
                delay = started + pacer.due(frame.index, frame.time_ns) - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            check_running()
            sent = time.perf_counter()
            last_event[0] = max(last_event[0], sent)
            with node.cond:
                matcher.sent(frame.index, sent)
            node.image_pub.publish(frame.raw)
            if settings.lockstep:
                deadline = sent + settings.timeout_s
                with node.cond:
                    drain()
                    while outcomes[-1].class_id is None and time.perf_counter() < deadline:
                        node.cond.wait(deadline - time.perf_counter())
                        drain()
                if outcomes[-1].class_id is None:
                    procs.check_alive()
                    node.wait_fresh_diagnostics(["camera", "classifier"], time.monotonic(),
                                                DIAGNOSTICS_WAIT_S)
                    replay_report.attribute_drops(
                        outcomes, replay_report.counter_delta(before, node.counters()),
                        settings.timeout_s)
            else:
                with node.cond:
                    drain()
            if progress:
                progress(len(outcomes), f"v{outcomes[-1].model_version or 0}")
        # Late answers (rate mode): the classifier holds at most one pending frame, so once no
        # prediction has come for QUIET_S the rest are not coming (the counters say why).
        deadline = time.perf_counter() + settings.timeout_s
        last_answer = time.perf_counter()
        with node.cond:
            drain()
            while any(o.class_id is None for o in outcomes) and time.perf_counter() < min(
                    deadline, last_answer + QUIET_S):
                node.cond.wait(0.1)
                if node.predictions:
                    last_answer = time.perf_counter()
                drain()
                check_running()
        wall = last_event[0] - started
        node.wait_fresh_diagnostics(list(topics.EXECUTABLES), time.monotonic(),
                                    DIAGNOSTICS_WAIT_S)
        after = node.counters()
        replay_report.attribute_drops(outcomes, replay_report.counter_delta(before, after),
                                      settings.timeout_s)
        with node.cond:
            final_counters = {k: dict(v) for k, v in node.diagnostics.items()}
    finally:
        if spinner is not None:
            spinner.stop()  # before the node and context go (see SpinThread)
        executor.shutdown(timeout_sec=2.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        if procs is not None:
            codes = procs.stop()
    return replay_runs.RunResult(
        settings=settings, outcomes=outcomes, wall_s=wall, startup_s=startup,
        thresholds=used_thresholds,
        unmatched_predictions=matcher.unmatched, node_counters=final_counters,
        node_exit_codes=codes, timing_gaps=list(pacer.gaps) if pacer is not None else [],
    )


def main(args: list[str] | None = None) -> int:
    """``ttspec replay`` (this module is its rclpy half)."""
    from ttspec_ros import cli

    return cli.main(["replay", *(args if args is not None else sys.argv[1:])])
