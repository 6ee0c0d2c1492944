"""rclpy glue shared by the three nodes: parameter descriptors from ``ttspec_ros.params``, QoS
profiles by name, the /diagnostics publisher, the one-frame pending slot and ``run_node``
(Humble-compatible spin with clean SIGINT/SIGTERM shutdown).

Only this package imports rclpy; everything the nodes compute lives in the ROS-free core.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)

from ttspec_ros import topics
from ttspec_ros.params import ParamSpec, rcl_yaml

_PARAM_TYPES = {
    "bool": ParameterType.PARAMETER_BOOL,
    "int": ParameterType.PARAMETER_INTEGER,
    "double": ParameterType.PARAMETER_DOUBLE,
    "string": ParameterType.PARAMETER_STRING,
    "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
}


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """ParameterDescriptor (type, description, range, read-only) of one ParamSpec."""
    description = spec.description
    if spec.choices:
        description += f" (one of: {', '.join(spec.choices)})"
    constraints = spec.constraints
    d = ParameterDescriptor(name=spec.name, type=_PARAM_TYPES[spec.type], description=description,
                            read_only=spec.read_only)
    # rclpy checks ranges on scalars only, so arrays state theirs in additional_constraints.
    if spec.type == "int" and spec.min is not None and spec.max is not None:
        d.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max), step=1)]
    elif spec.type == "double" and spec.min is not None and spec.max is not None:
        d.floating_point_range = [FloatingPointRange(
            from_value=float(spec.min), to_value=float(spec.max), step=0.0)]
    elif spec.type == "double_array" and spec.min is not None:
        constraints = f"each in [{spec.min}, {spec.max}]; {constraints}".rstrip("; ")
    d.additional_constraints = constraints
    return d


# run_node's command line, whose parameter overrides declare() checks (None: not run_node's).
_COMMAND_LINE: list[str] | None = None


def unapplied_override(node_names: Sequence[str], values: Mapping[str, Any],
                       argv: Sequence[str]) -> str | None:
    """Reason a ``-p name:=value`` on the command line for one of ``values`` (name -> the
    declared value) did not take effect, or None.

    rcl merges every source of a parameter into one value with a field per type, and rclpy
    reads the first of bool, int, double, string: over the shipped params file,
    ``-p max_exit:=2.0`` or ``-p enabled:=0`` was dropped without a word and the node ran on
    the file's value. The override is typed as rcl types it (``params.rcl_yaml``) and
    compared with what the node got; the last one given counts. ``node:name:=value`` counts
    for a node named so (``node_names``: the names rcl matches it by); params files are
    rcl's to match and are not looked at here."""
    import yaml

    given: dict[str, tuple[str, Any]] = {}
    args, ros = list(argv), False
    for i, arg in enumerate(args):
        if arg == "--ros-args":
            ros = True
        elif arg == "--":
            ros = False
        elif ros and i + 1 < len(args) and arg in ("-p", "--param"):
            name, sep, text = args[i + 1].partition(":=")
            target, colon, name = name.rpartition(":")
            if sep and name in values and (not colon or target in node_names):
                try:
                    given[name] = (args[i + 1], rcl_yaml(text))
                except yaml.YAMLError:
                    pass  # rcl refuses it itself, naming it
    kinds = {bool: "a bool", int: "an integer", float: "a double", str: "a string",
             list: "a list"}
    for name, (arg, wanted) in given.items():
        got = plain_value(values[name])
        nan = isinstance(got, float) and math.isnan(got) and math.isnan(wanted)
        if type(got) is not type(wanted) or (got != wanted and not nan):
            kind = kinds.get(type(got), type(got).__name__)
            return (f"-p {arg} did not take effect: the node got {got!r} ({kind}); rcl keeps "
                    "a value of another type from a params file and rclpy reads that one, so "
                    f"give {name} as {kind}")
    return None


def declare(node: Node, specs: Iterable[ParamSpec], defaults: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
    """Declare every spec (``defaults`` fills FROM_MODEL_CARD ones); -> name -> value.

    An override of the wrong type or out of the descriptor's range raises StartupError:
    rclpy refuses it in declare_parameter (and ``unapplied_override`` finds a ``-p`` that
    rcl's merging with a params file hid from rclpy), and the user should read why, not a
    traceback."""
    values = {}
    for spec in specs:
        default = spec.default if spec.default is not None else (defaults or {})[spec.name]
        try:
            values[spec.name] = node.declare_parameter(spec.name, default,
                                                       descriptor(spec)).value
        except ParameterException as e:
            raise StartupError(f"{node.get_name()}: parameter {spec.name!r} refused: {e}"
                               ) from e
        if values[spec.name] is None and spec.type == "double_array":
            # rcl reads `-p thresholds:=[]` as no value at all
            raise StartupError(f"{node.get_name()}: parameter {spec.name!r} is an empty list; "
                               "give its values (or leave it out for the default)")
    if _COMMAND_LINE is not None:
        # a node-qualified -p names the node as rcl matches it: fully qualified, or bare in
        # the root namespace
        full = node.get_fully_qualified_name()
        names = (full, node.get_name()) if full == f"/{node.get_name()}" else (full,)
        reason = unapplied_override(names, values, _COMMAND_LINE)
        if reason:
            raise StartupError(f"{node.get_name()}: parameter refused: {reason}")
    return values


def plain_value(value: Any) -> Any:
    """A parameter value with arrays as lists (rclpy gives array.array for double arrays)."""
    import array

    return list(value) if isinstance(value, array.array) else value


def changed_values(node: str, changes: Iterable[Any]) -> dict[str, Any]:
    """name -> value (``plain_value``) of the changed parameters that ``node`` declares from
    ttspec_ros.params. Others (use_sim_time, qos_overrides.*, declared by rclpy while the
    node subscribes) are not ours to judge."""
    from ttspec_ros.params import NODE_PARAMS

    names = {s.name for s in NODE_PARAMS[node]}
    return {p.name: plain_value(p.value) for p in changes if p.name in names}


def refuse(node: Node, new: Mapping[str, Any], reason: str) -> SetParametersResult:
    """Refuse a parameter change; the log says it too (a caller may not show the reason)."""
    node.get_logger().warning(f"refused parameters {new}: {reason}")
    return SetParametersResult(successful=False, reason=reason)


def accept() -> SetParametersResult:
    return SetParametersResult(successful=True)


def qos(name: str) -> QoSProfile:
    """A new QoS profile for a ``topics.QOS_*`` name. Never a shared one: rclpy writes
    qos_overrides.* into the profile it is handed, so sharing rclpy's qos_profile_sensor_data
    would carry one topic's override to every later endpoint of the process."""
    if name == topics.QOS_SENSOR:  # = rmw's sensor-data profile
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                          reliability=ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.VOLATILE)
    if name == topics.QOS_LATCHED:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
    if name == topics.QOS_RELIABLE:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    raise ValueError(f"unknown QoS name {name!r}")


# Diagnostics keys: how many endpoints DDS has matched with a node's writers and best-effort
# readers. The graph (count_subscribers) lists an endpoint before the other side has matched
# it, and a message published then is lost; the replay driver waits on these.
MATCHED_IMAGES_WRITERS = "images_matched_writers"
MATCHED_FRAMES_READERS = "frames_matched_readers"
MATCHED_FRAMES_WRITERS = "frames_matched_writers"
MATCHED_PREDICTIONS_READERS = "predictions_matched_readers"
MATCHED_SAMPLES_READERS = "samples_matched_readers"


def matched_writers(subscription: Any) -> int | None:
    """DDS-matched publishers of ``subscription``; None where rclpy cannot tell (Humble:
    ``Subscription.get_publisher_count`` is Iron and later)."""
    count = getattr(subscription, "get_publisher_count", None)
    return None if count is None else int(count())


# Values behind each ``recent_mean_*`` on /diagnostics. The ``mean_*`` since start barely move
# after an hour, so they cannot show what a live threshold change or the adapter's updates do.
RECENT_VALUES = 100


class Stats:
    """Thread-safe counters and means a node reports on /diagnostics: ``mean_<key>`` since
    start and ``recent_mean_<key>`` over the last ``recent`` values."""

    def __init__(self, recent: int = RECENT_VALUES) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._sums: dict[str, tuple[float, int]] = {}
        self._recent: dict[str, deque[float]] = {}
        self._recent_size = recent
        self.notes: dict[str, str] = {}

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def add(self, key: str, value: float) -> None:
        with self._lock:
            total, n = self._sums.get(key, (0.0, 0))
            self._sums[key] = (total + value, n + 1)
            self._recent.setdefault(key, deque(maxlen=self._recent_size)).append(value)

    def note(self, key: str, text: str) -> None:
        with self._lock:
            self.notes[key] = text

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            out = {k: str(v) for k, v in sorted(self.counts.items())}
            out.update({f"mean_{k}": f"{t / n:.3f}" for k, (t, n) in sorted(self._sums.items())
                        if n})
            out.update({f"recent_mean_{k}": f"{sum(v) / len(v):.3f}"
                        for k, v in sorted(self._recent.items())})
            out.update(self.notes)
            return out


class Throttle:
    """Allows one event per key every ``period_s`` (rclpy throttles per call site only, which
    would hide every rejection reason but the first)."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -float("inf")) < self.period_s:
                return False
            self._last[key] = now
            return True


def steady_timer(node: Node, period_s: float, callback: Callable[[], None]) -> Any:
    """A timer on the steady clock. The node's default clock is ROS time, which under
    use_sim_time stops with /clock: when a bag ends or is paused, the adapter held back its
    trained heads and stopped saving, and /diagnostics went silent (a review reproduced all
    three); at ``ros2 bag play -r 0.1`` a 10 s save period took 100 s."""
    return node.create_timer(period_s, callback, clock=Clock(clock_type=ClockType.STEADY_TIME))


class RateLimit:
    """At most one frame per ``period_s`` on average (``period_s`` 0: no limit), kept as a
    schedule of due times with slack: a frame passes when it comes at most ``SLACK`` of a
    period before its due time. Requiring a full period since the last passed frame (the rule
    before) made any early arrival wait for the next frame: a review measured 11.8 Hz passed
    of a 15 Hz limit under +-2 ms of jitter, and 10 Hz under use_sim_time, whose clock moves
    in 25 ms steps (``ros2 bag play --clock`` publishes /clock at 40 Hz). The due time advances
    by at least one period per passed frame and lies at least 1 - SLACK periods after it, so
    passed frames k apart are at least k - 2 * SLACK periods apart."""

    SLACK = 0.3  # > 25 ms / 66.7 ms: one /clock step at a 15 Hz limit

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last = -math.inf  # time of the last passed frame
        self._due = -math.inf

    def set_period(self, period_s: float) -> None:
        self.period_s = period_s
        self._due = self._last + period_s

    def allows(self, now: float) -> bool:
        # A clock that went back (a looped bag, a switch of use_sim_time) starts anew.
        return (self.period_s <= 0.0 or now < self._last
                or now >= self._due - self.SLACK * self.period_s)

    def passed(self, now: float) -> None:
        """Record a frame passed on at ``now`` (only passed frames use up a period)."""
        behind = now - self._due
        # After a pause (or a clock that went back) the schedule restarts at this frame
        # rather than letting the frames after it catch up on the missed periods.
        if now < self._last or not behind < self.period_s:
            self._due = now + self.period_s
        else:  # a late frame delays the next by what it used of the slack
            self._due = max(self._due, now - self.SLACK * self.period_s) + self.period_s
        self._last = now


class Diagnostics:
    """Publishes one DiagnosticStatus for the node on /diagnostics every ``period_s``:

    - ERROR while a job is failing: ``jobs`` maps a job's failure counter to its success
      counter; the job fails from a report period in which failures grew and successes did
      not, until its successes grow again (a dead update publisher stays ERROR while samples
      still train);
    - WARN while any ``warn_on`` or failure counter grew since the previous report (bad input,
      or failures between successes), or while the ``expect`` counter (what the node lives on,
      e.g. images received) has not grown for ``IDLE_S``: a dead or mis-remapped input topic
      is not OK (as diagnostic_updater's frequency status reports a topic without messages);
    - else OK."""

    IDLE_S = 5.0

    def __init__(self, node: Node, values: Callable[[], tuple[str, Mapping[str, Any]]],
                 warn_on: Iterable[str] = (), jobs: Mapping[str, str] | None = None,
                 expect: tuple[str, str] | None = None, period_s: float = 1.0) -> None:
        self._node = node
        self._expect = expect  # (counter, what it counts, as the message names it)
        self._expect_grew = time.monotonic()  # since start, or the counter's last growth
        self._values = values
        self._warn_on = tuple(warn_on)
        self._jobs = dict(jobs or {})
        self._previous: dict[str, int] = {}
        self._failing: dict[str, None] = {}  # failure counters of failing jobs, in order
        self._pub = node.create_publisher(DiagnosticArray, topics.DIAGNOSTICS,
                                          qos(topics.QOS_RELIABLE))
        self._timer = steady_timer(node, period_s, self.publish)

    def _counts(self, values: Mapping[str, Any]) -> dict[str, int]:
        expected = () if self._expect is None else (self._expect[0],)
        names = dict.fromkeys((*self._warn_on, *self._jobs, *self._jobs.values(), *expected))
        return {k: int(values.get(k, 0)) for k in names}

    def start_from_current(self) -> None:
        """Take the counters as they are now as the previous report's: counters a node
        restored from saved state did not grow in this run (a resumed adapter's first report
        warned of an overflow from before its restart)."""
        self._previous = self._counts(self._values()[1])

    def publish(self) -> None:
        message, values = self._values()
        counts = self._counts(values)
        grew = {k for k, n in counts.items() if n > self._previous.get(k, 0)}
        self._previous = counts
        now = time.monotonic()
        idle = ""  # the message's note while the expected counter has not grown
        if self._expect is not None:
            counter, what = self._expect
            if counter in grew:
                self._expect_grew = now
            if now - self._expect_grew >= self.IDLE_S:
                idle = f" (no {what} for {now - self._expect_grew:.0f} s)"
        for failure, success in self._jobs.items():
            if success in grew:
                self._failing.pop(failure, None)
            elif failure in grew:
                self._failing[failure] = None
        new = [k for k in dict.fromkeys((*self._warn_on, *self._jobs)) if k in grew]
        if self._failing:
            message += " (failing: " + ", ".join(
                f"{f}, no {self._jobs[f]} since" for f in self._failing) + ")"
        if new:
            message += f" (new: {', '.join(new)})"
        message += idle
        level = ERROR if self._failing else WARN if new or idle else OK
        status = DiagnosticStatus(
            level=bytes([level]), name=self._node.get_fully_qualified_name(),
            message=message, hardware_id=topics.PACKAGE,
            values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._pub.publish(array)


# DiagnosticStatus levels (the message's constants are bytes; these are their values)
OK, WARN, ERROR = 0, 1, 2


class LatestSlot:
    """At most one pending item: ``put`` replaces an unprocessed older one (a drop), ``take``
    waits for one. Keeps a slow consumer on the newest frame and its memory flat."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item: Any) -> bool:
        """Store ``item``; True if it replaced one that was never taken."""
        with self._cond:
            dropped = self._item is not None
            self._item = item
            self._cond.notify()
            return dropped

    def take(self, timeout: float) -> Any:
        """The pending item (removing it), or None after ``timeout`` s or once closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def pending(self) -> int:
        with self._cond:
            return int(self._item is not None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def load_input_spec(model: str) -> dict[str, Any]:
    """The ``input`` spec of ``model``'s card ('' = bundled demo model). Our format's card is
    read as JSON so the camera never imports torch; official checkpoints have no card, so
    ``checkpoint.load_model`` makes one up."""
    import json

    from ttspec_ros.models.paths import DEMO_STEM, is_our_format, model_files
    from ttspec_ros.preprocess import check_input_spec

    path = Path(model) if model else DEMO_STEM
    if is_our_format(path):
        card_path = model_files(path)[1]
        try:
            spec = json.loads(card_path.read_text(encoding="utf-8"))["input"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{card_path}: not a model card with an input spec ({e})") from e
    else:
        from ttspec_ros.models.checkpoint import load_model

        spec = load_model(path)[1].input
    check_input_spec(spec)  # raises ValueError saying what is wrong
    return dict(spec)


# The longest a spinning node waits for work before it looks at the context (and Python at its
# pending signals) again.
SPIN_WAKE_S = 0.5


def _spin(node: Node) -> None:
    """rclpy.spin with a bounded wait. A SIGINT must wake rclpy's unbounded wait through its
    signal guard condition; twice in about ten full test-suite runs (2026-12-03) bench-ros
    relays sat in that wait 20 s after SIGINT until killed (stacks from SIGUSR1), never
    reproduced alone. Waking every SPIN_WAKE_S lets Python raise its pending
    KeyboardInterrupt and the loop see a shut-down context, so a lost wake-up costs at most
    that long."""
    executor = rclpy.get_global_executor()
    executor.add_node(node)
    try:
        while executor.context.ok():
            executor.spin_once(timeout_sec=SPIN_WAKE_S)
    finally:
        executor.remove_node(node)


class SpinThread:
    """Spins ``executor`` in a daemon thread until :meth:`stop`, for a node of our own tools
    (probe, replay driver) beside their main thread.

    Why not ``Thread(target=executor.spin)`` and ``executor.shutdown()`` before destroying the
    node: ``shutdown(timeout_sec)`` can return with the thread still inside the executor's
    wait, and destroying the node or its context under it is a known rclpy race
    (ros2/rclpy#968). Here a replay hung that way once (2026-12-06): the spin thread at 100 %
    CPU in the executor's wait, the main thread never finishing its wait for the node
    processes. :meth:`stop` ends and joins the thread first; callers destroy the node after."""

    def __init__(self, executor: Any, name: str) -> None:
        self.executor = executor
        self.error: Exception | None = None  # what ended spinning, if not stop() or shutdown
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        context = self.executor.context
        try:
            while not self._stop.is_set() and context.ok():
                self.executor.spin_once(timeout_sec=SPIN_WAKE_S)
        except Exception as e:
            if context.ok() and not self._stop.is_set():  # say why spinning stopped
                self.error = e
                raise

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """End spinning (its current callback finishes first); True if the thread ended."""
        self._stop.set()
        self.executor.wake()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc_function(name: str) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return getattr(ctypes.CDLL(None), name)


# Looked up here: a forked child of a threaded process must not dlopen.
_PRCTL, _FFLUSH = _libc_function("prctl"), _libc_function("fflush")


def die_with_parent() -> Callable[[], None] | None:
    """``preexec_fn`` for a node process started by a tool (replay, bench-ros, ttt-ros): the
    child gets SIGTERM when this process dies, even by SIGKILL, so no node outlives the tool
    (a stray classifier would answer the next run's frames too). The child only calls prctl
    (no imports or allocation between fork and exec) and exits if the parent is already gone.
    The signal follows the thread that forked: start such processes from the main thread."""
    if _PRCTL is None:
        return None
    parent, prctl = os.getpid(), _PRCTL

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died between fork and prctl: no signal would come
            os._exit(1)

    return preexec


def exit_process(code: int) -> NoReturn:
    """End a node executable with ``code`` after :func:`run_node` has returned, skipping the
    interpreter's own teardown.

    Why: by then the node is destroyed, its ``close()`` has saved what it keeps and rclpy is
    shut down (its log files closed); what is left is native teardown (DDS, torch, modules
    in no set order), which can crash a process whose work is done. A fresh-clone test run
    (2026-12-07) saw an adapter log its FATAL refusal, then die of SIGSEGV instead of exiting
    with 1: once in a whole test run, and not in 300 runs of the same refusal since (with and
    without peers, load, a killed node). rclcpp nodes hit the same at exit and skip it with
    quick_exit (ros2/rmw_fastrtps#761). A crash before this point still shows: run_node
    enables faulthandler, which writes every thread's stack to the node's log. Python's and
    C's output buffers are flushed first (rcutils can log to a buffered stdout)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    if _FFLUSH is not None:
        _FFLUSH(None)
    os._exit(code)


def run_node(node_factory: Callable[[], Node], args: list[str] | None = None) -> int:
    """Init rclpy, build the node, spin until SIGINT/SIGTERM, shut down without a traceback.

    Nodes may define ``close()`` (stop threads, save state); it runs before destroy_node.
    Once shutting down, further SIGINT/SIGTERM are ignored (a second Ctrl-C, launch's SIGTERM
    after its timeout): they would cut ``close()`` short with a KeyboardInterrupt traceback, or
    kill the process, and lose the adapter's final save; ``close()`` is bounded and SIGKILL
    still works.
    SIGUSR1 prints every thread's stack to stderr: where a node is stuck, without stopping it
    (``kill -USR1 <pid>``; the test harness does so before it kills a node that hangs); so does
    a crash (SIGSEGV, SIGABRT...) before the process ends: which thread, in which call."""
    global _COMMAND_LINE
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _COMMAND_LINE = list(sys.argv if args is None else args)
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = node_factory()
        _spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except StartupError as e:
        # A configuration problem: one clear line, not a traceback.
        rclpy.logging.get_logger("ttspec").fatal(str(e))
        code = 1
    except Exception:
        if rclpy.ok():
            raise
        # SIGINT/SIGTERM arrived while the node was being built: rcl calls then fail with
        # "context is invalid"; that is a shutdown, not an error.
    finally:
        _ignore_shutdown_signals()
        if node is not None:
            close = getattr(node, "close", None)
            if close is not None:
                close()
            node.destroy_node()
        rclpy.try_shutdown()
        _ignore_shutdown_signals()  # try_shutdown put back the handlers rclpy had replaced
    return code


def _ignore_shutdown_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: nothing to protect there
            return


class StartupError(RuntimeError):
    """Raised by a node constructor for bad configuration (message says what and why)."""
