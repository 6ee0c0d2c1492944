"""Replay evaluation: a bag played through the node graph once per run setting, then reported.

ROS-free. ``replay_bag`` plays a bag once per run setting (adaptation on/off, threshold) through
freshly started node processes; the rclpy part lives in ``ttspec_ros.nodes.replay_driver`` and is
imported only when a replay actually runs. Here: the node graph (paths, arguments, ``--param``),
the progress bar and the orchestration. A run's data is ``ttspec_ros.replay_runs``; its report
(metrics, drops, report.json/report.md) is ``ttspec_ros.replay_report``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ttspec_ros import params as param_specs  # `params` names (node, name, value) here
from ttspec_ros import topics
from ttspec_ros.replay_report import build_report, check_frame_counts, write_report
from ttspec_ros.replay_runs import RunResult, RunSettings

# DDS domains 60..101: on Linux, domains above 101 put DDS ports in the ephemeral port range
# (ROS 2 docs, 'The ROS_DOMAIN_ID'); the tests use 1..59 and robots mostly 0.
REPLAY_DOMAIN_BASE, REPLAY_DOMAIN_SPAN = 60, 42
MAX_DOMAIN_ID = 232  # above it DDS port numbers overflow (Fast DDS exits the process)


def read_model_card(model: str = "") -> Any:
    """The card of ``model`` ('' = bundled demo model); official checkpoints have none, so
    ``load_model`` makes one up (slow, but only for those)."""
    from ttspec_ros.models import checkpoint
    from ttspec_ros.models.paths import is_our_format

    path = Path(model) if model else checkpoint.DEMO_STEM
    if is_our_format(path):
        return checkpoint.read_card(checkpoint.existing_model_files(path)[1])
    return checkpoint.load_model(path)[1]


def model_summary(card: Any) -> dict:
    """What the report needs from a model card (ttspec_ros.models.checkpoint.ModelCard)."""
    return {
        "model_id": card.model_id,
        "class_names": list(card.class_names),
        "num_exits": len(card.exit_cost),
        "exit_cost": [float(c) for c in card.exit_cost],
        "card_thresholds": [float(t) for t in card.thresholds],
    }


# --- the node graph (paths and arguments; the processes are started by the driver) -------------


@dataclass(frozen=True)
class GraphSpec:
    """Where the installed node executables and params file are, and how to start them."""

    prefix: Path  # install prefix holding lib/ttspec_ros and share/ttspec_ros
    params_file: Path
    # The model every node is given ('' = the bundled demo model) and the report reads;
    # find_graph resolves it (--model, else the params file's classifier model).
    model: str = ""
    params: tuple[tuple[str, str, object], ...] = ()  # (node, name, value) set on every run

    def executable(self, name: str) -> Path:
        return self.prefix / "lib" / topics.PACKAGE / name

    def ros_args(self, overlay: Path | None = None) -> list[str]:
        """The launch file's arguments, plus an overlay params file with this run's values.

        An overlay file, not ``-p``: rclpy gives ``-p`` values the ``/**`` scope, which the
        params file's ``/**/<node>`` sections shadow, so ``-p threshold:=0.7`` would be
        ignored. A second file keyed by the full node name (``/ttspec/classifier``) wins."""
        files = [self.params_file] + ([overlay] if overlay else [])
        args = ["--ros-args"]
        for f in files:
            args += ["--params-file", str(f)]
        return args + ["-r", f"__ns:=/{topics.NAMESPACE}"]

    @staticmethod
    def overlay_yaml(overrides: dict[str, dict[str, object]]) -> str:
        """Params file text setting ``overrides`` (node -> name -> value) on /ttspec/<node>."""
        import yaml

        return yaml.safe_dump({
            f"/{topics.NAMESPACE}/{node}": {"ros__parameters": dict(values)}
            for node, values in overrides.items() if values
        }, sort_keys=True)

    def overrides(self, settings: RunSettings, compressed: bool) -> dict[str, dict[str, object]]:
        """Parameter values per node for one run (the overlay params file)."""
        out: dict[str, dict[str, object]] = {
            topics.CAMERA_NODE: {"transport": "compressed" if compressed else "raw",
                                 # The camera reads images best effort (sensor data), and Fast
                                 # DDS loses large best-effort messages (fragments): a review
                                 # lost 24 of 40 640x480 rgb8 frames and all of 1280x720 ones.
                                 # Replay measures the nodes, not that loss, so its player's
                                 # frames arrive reliably (a --param of the same name wins).
                                 "image_reliability": "reliable"},
            topics.CLASSIFIER_NODE: {},
            # A state_dir in the params file would let the adapter resume the state an
            # earlier run (or replay, or robot) saved there and publish it at start: the
            # no-adapt run would classify with adapted heads from frame 0. '' rather than a
            # fresh directory per run: nothing is resumed, and no directory is left for the
            # next replay into the same --out (or another adapter's lock) to trip on.
            topics.ADAPTER_NODE: {"enabled": settings.adapt, "state_dir": ""},
        }
        if settings.threshold is not None:
            out[topics.CLASSIFIER_NODE]["threshold"] = float(settings.threshold)
        for node in out:  # explicitly, '' too: a node-specific model in the params file
            out[node]["model"] = self.model  # would otherwise differ from the report's
        for node, name, value in self.params:
            out[node][name] = value
        return out

    def environment(self, domain_id: int, log_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "ROS_DOMAIN_ID": str(domain_id),
            **topics.localhost_discovery(),
            "ROS_LOG_DIR": str(log_dir / "ros"),
            "PYTHONUNBUFFERED": "1",
        })
        env.setdefault("HOME", tempfile.gettempdir())
        return env


# Parameters that GraphSpec.overrides sets for every run, and why a --param may not: the
# replay option that owns it ("use ..."), or the reason no option sets it.
RUN_OWNED_PARAMS = {
    (topics.CLASSIFIER_NODE, "threshold"): "use --threshold or --sweep-thresholds",
    (topics.ADAPTER_NODE, "enabled"): "use --adapt / --no-adapt or --compare",
    (topics.CAMERA_NODE, "transport"): "use a bag of CompressedImage (the bag's image type "
                                       "decides)",
    # The report names the model it ran; a per-node model would also split the graph's models.
    **{(node, "model"): "use --model" for node in topics.EXECUTABLES},
    (topics.ADAPTER_NODE, "state_dir"): "every run's adapter starts without saved state "
                                        "(state_dir ''), so that adaptation never carries over "
                                        "into another run",
}


def parse_param(text: str) -> tuple[str, str, object]:
    """``NODE.NAME=VALUE`` (value in YAML: 0.01, true, 3, text) -> (node, name, value)."""
    import yaml

    key, sep, value = text.partition("=")
    node, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ValueError(f"parameter {text!r} is not NODE.NAME=VALUE (e.g. "
                         "adapter.learning_rate=0.01)")
    if node not in topics.EXECUTABLES:
        raise ValueError(f"parameter {text!r}: unknown node {node!r}; nodes are "
                         f"{', '.join(topics.EXECUTABLES)}")
    owner = RUN_OWNED_PARAMS.get((node, name))
    if owner:  # each run sets it, so a --param would silently change what the run is named
        raise ValueError(f"parameter {text!r}: set by each run; {owner}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"parameter {text!r}: the value is not valid YAML "
                         f"({str(err).splitlines()[0]})") from None
    if name == "use_sim_time" or name.startswith("qos_overrides."):
        return node, name, parsed  # declared by rclpy, not by our nodes
    # Checked here: a node ignores an undeclared name in its params file, and a YAML integer
    # for a double parameter would stop it at start.
    try:
        spec = param_specs.spec(node, name)
    except KeyError:
        names = ", ".join(s.name for s in param_specs.NODE_PARAMS[node])
        raise ValueError(f"parameter {text!r}: {node} has no parameter {name!r}; its "
                         f"parameters are {names}") from None
    if spec.type in ("double", "double_array"):
        parsed = _as_double(parsed)
    reason = param_specs.check_value(spec, parsed)
    if reason:
        raise ValueError(f"parameter {text!r}: {reason}")
    return node, name, parsed


def _as_double(value: object) -> object:
    """YAML integers (and lists of them) as floats; anything else as it is."""
    if isinstance(value, list):
        return [_as_double(v) for v in value]
    # checks.is_integer's test, spelled out: mypy narrows ``value`` only by an isinstance here
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return float(value)
    return value


def find_graph(model: str = "", params_file: str | os.PathLike | None = None,
               params: Sequence[tuple[str, str, object]] = ()) -> GraphSpec:
    """The install prefix of this package's executables (``topics.installed_prefix``), its
    installed params file (or ``params_file``), and the model the nodes run: ``model``, else
    the params file's classifier ``model``."""
    prefix = topics.installed_prefix()
    params_path = Path(params_file) if params_file else topics.installed_params_file(prefix)
    if not params_path.is_file():
        raise FileNotFoundError(f"params file {params_path} not found")
    text = ""
    try:
        text = params_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        reason: str | None = "not UTF-8 text"
    else:
        reason = param_specs.check_params_file(text)
    if reason:  # else every node would stop at start-up, each saying so only in its log
        raise ValueError(f"params file {params_path}: {reason}")
    # Resolved once here: every node is given it (GraphSpec.overrides) and the report reads its
    # card, so the report cannot describe another model than the one the nodes ran.
    return GraphSpec(prefix=prefix, params_file=params_path,
                     model=model or str(param_specs.params_file_value(
                         text, topics.CLASSIFIER_NODE, "model") or ""),
                     params=tuple(params))


def pick_domain_id() -> int:
    """A DDS domain of its own, away from a robot's usual 0 and from the tests' 1..59."""
    return REPLAY_DOMAIN_BASE + os.getpid() % REPLAY_DOMAIN_SPAN


# --- progress ------------------------------------------------------------------------------------


def _clock_text(seconds: float) -> str:
    """MM:SS, or H:MM:SS from an hour on (strftime's %M:%S wraps at an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes:02}:{secs:02}"


class Progress:
    """One-line progress bar with rate and ETA on stderr (plain text; a line per 10 % if the
    stream is not a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label = max(1, total), label
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = -1.0
        self._last_decile = -1

    def line(self, done: int, note: str = "") -> str:
        elapsed = self.clock() - self.start
        frac = min(1.0, done / self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_text = "--:--" if math.isnan(eta) else _clock_text(eta)
        return (f"{self.label} [{bar}] {done}/{self.total} {100 * frac:3.0f}% "
                f"{rate:5.1f} fps ETA {eta_text}{'  ' + note if note else ''}")

    def update(self, done: int, note: str = "") -> None:
        """Show ``done`` frames; ``done == 0`` (re)starts the clock (e.g. once the graph is up)."""
        now = self.clock()
        if done == 0:
            self.start = now
        if self.tty:
            if now - self._last_draw >= 0.2 or done >= self.total:
                self.stream.write("\r" + self.line(done, note) + "\033[K")
                self.stream.flush()
                self._last_draw = now
        else:
            decile = int(10 * done / self.total)
            if decile > self._last_decile:
                self.stream.write(self.line(done, note) + "\n")
                self.stream.flush()
                self._last_decile = decile

    def finish(self, done: int, note: str = "") -> None:
        self._last_draw = -1.0
        self.update(done, note)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit while replaying (Python's default would skip clean-up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- orchestration -------------------------------------------------------------------------------


def replay_bag(
    bag: str | os.PathLike, out_dir: str | os.PathLike, runs: Sequence[RunSettings], *,
    image_topic: str | None = None, label_topic: str | None = None, use_labels: bool = True,
    graph: GraphSpec | None = None, model: str = "", params_file: str | os.PathLike | None = None,
    params: Sequence[tuple[str, str, object]] = (),
    domain_id: int | None = None, max_frames: int | None = None, window: int | None = None,
    tail: int | None = None, stream_out: TextIO | None = None,
) -> tuple[dict, list[Path]]:
    """Play ``bag`` once per run setting through fresh node processes; write the report.

    Returns (report dict, plot paths). Raises bags.BagError for an unusable bag."""
    from ttspec_ros import bags

    # Before the bag is read and the first run starts, not in build_report after all runs.
    check_frame_counts(max_frames=max_frames, window=window, tail=tail)
    if domain_id is not None and not 0 <= domain_id <= MAX_DOMAIN_ID:
        raise ValueError(f"domain id must be in 0..{MAX_DOMAIN_ID} (DDS derives its ports "
                         f"from it), got {domain_id}")
    if not runs:
        raise ValueError("no run settings given; nothing to replay")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # they would share a log directory and a report entry
        raise ValueError(f"runs {names} repeat a setting (e.g. a threshold given twice)")
    stream = bags.open_image_stream(bag, image_topic, label_topic, use_labels=use_labels)
    graph = graph or find_graph(model=model, params_file=params_file, params=params)
    model_info = model_summary(read_model_card(graph.model))
    try:  # rclpy and the built messages: imported only when a replay runs
        from ttspec_ros.nodes import replay_driver
    except ImportError as err:
        raise RuntimeError(f"replay needs ROS 2 (rclpy) and this package's built messages "
                           f"({err}); run `make env`") from err
    domain_id = pick_domain_id() if domain_id is None else domain_id
    out_dir = Path(out_dir).resolve()  # node processes get absolute paths
    out_dir.mkdir(parents=True, exist_ok=True)
    from ttspec_ros.replay_plots import PLOT_FILES

    # A failed first run must not leave the last replay's report, nor this one its plots (a
    # plot is drawn only when there is something to draw: an old accuracy.png would stay).
    for stale in ("report.json", "report.md", "outcomes.json", *PLOT_FILES):
        (out_dir / stale).unlink(missing_ok=True)
    total = min(stream.image_count, max_frames) if max_frames else stream.image_count

    def report_of(results: list[RunResult]) -> dict:
        bag_info = {**stream.describe(), "encodings": dict(stream.encodings)}
        return build_report(
            bag_info, results, exit_cost=model_info.get("exit_cost"),
            num_exits=model_info["num_exits"], class_names=model_info["class_names"],
            model=model_info, window=window, tail=tail,
            settings={"runs": [asdict(r) for r in runs], "domain_id": domain_id,
                      "params_file": str(graph.params_file), "max_frames": max_frames,
                      "params": [f"{n}.{k}={v}" for n, k, v in graph.params],
                      "model": graph.model or "(bundled demo model)"},
        )

    results: list[RunResult] = []
    with _sigterm_as_exit():  # so the driver's clean-up stops the node processes
        for k, settings in enumerate(runs, 1):
            bar = Progress(total, f"[{k}/{len(runs)}] {settings.name}", stream=stream_out)
            try:
                result = replay_driver.play(
                    stream, settings, graph, domain_id=domain_id, max_frames=max_frames,
                    log_dir=out_dir / "logs" / settings.name, progress=bar.update)
            except BaseException as err:  # the runs already finished are still reported
                if results:
                    _write_partial(out_dir, report_of(results), results, model_info, settings,
                                   err)
                raise
            lost = sum(not o.answered for o in result.outcomes)
            bar.finish(len(result.outcomes), f"{lost} lost")
            results.append(result)
    report = report_of(results)
    plots = write_report(out_dir, report, results, model_info.get("exit_cost"))
    return report, plots


def _write_partial(out_dir: Path, report: dict, results: list[RunResult], model: dict,
                   failed: RunSettings, err: BaseException) -> None:
    report["incomplete"] = (f"run {failed.name} failed ({type(err).__name__}: {err}); this "
                            f"report holds the {len(results)} run(s) finished before it")
    try:
        write_report(out_dir, report, results, model.get("exit_cost"))
    except Exception as write_err:  # the run's own error is what the caller must see
        print(f"ttspec replay: the partial report could not be written: {write_err}",
              file=sys.stderr)
