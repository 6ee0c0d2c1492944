"""One run of a replay as plain data: its settings (RunSettings), what happened to each played
frame (Outcome) and what the run gave (RunResult).

ROS-free. The orchestration (``ttspec_ros.replay``) makes the settings, the rclpy driver
(``ttspec_ros.nodes.replay_driver``) fills the outcomes and results, and the report
(``ttspec_ros.replay_report``) reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_TIMEOUT_S = 10.0
# Rate mode: the longest wait between two frames (seconds, after the rate), see RatePacer.
MAX_FRAME_WAIT_S = 5.0


@dataclass
class Outcome:
    """What happened to one played frame: a prediction, or ``dropped`` with the reason."""

    index: int
    stamp_ns: int
    label: int | None = None
    class_id: int | None = None
    exit_index: int | None = None
    confidence: float | None = None
    latency_ms: float | None = None  # model time reported by the classifier
    e2e_ms: float | None = None  # published -> prediction received
    model_version: int | None = None
    dropped: str | None = None

    @property
    def answered(self) -> bool:
        return self.class_id is not None


@dataclass(frozen=True)
class RunSettings:
    adapt: bool
    threshold: float | None = None  # None: the params file's / model card's thresholds
    rate: float | None = 1.0  # playback speed factor of the recorded timing; None = lockstep
    timeout_s: float = DEFAULT_TIMEOUT_S  # lockstep: a frame without answer by then is lost

    def __post_init__(self) -> None:
        # Refused here so that a bad setting fails before any node process is started.
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (a confidence), got {self.threshold}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got "
                             f"{self.timeout_s}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a finite speed factor > 0, got {self.rate}")

    @property
    def lockstep(self) -> bool:
        return self.rate is None

    @property
    def name(self) -> str:
        parts = ["adapt" if self.adapt else "no-adapt"]
        if self.threshold is not None:
            parts.append(f"t{self.threshold:g}")
        return "_".join(parts)


@dataclass(frozen=True)
class TimingGap:
    """A step of the recorded timing that rate mode did not play as recorded."""

    frame: int  # index of the frame after the step
    recorded_s: float  # recording time since the previous frame (< 0: time went backwards)
    played_s: float  # the wait played instead (after the rate)


class RatePacer:
    """When each frame of a rate-mode run is due: seconds after the first frame, following the
    recorded times over the rate, except that a wait between two frames is capped at
    ``max_wait_s`` and a step back in time is played as no wait; each such step is kept in
    ``gaps`` (the report lists them).

    Capped rather than refused: a bag recorded with --use-sim-time before the first /clock
    (first message at time 0, the rest at 1.7e18 ns), or one joined from several recordings,
    still holds good frames in a good order; uncapped, the driver slept for decades while the
    progress bar showed a two-second ETA. Refusing would need a pass over the whole bag before
    the first run and make such a bag usable only in lockstep, for a timing artefact that says
    nothing about the nodes. The cap is far above any camera's frame interval, so an ordinary
    recording plays exactly as before (due times add up the recorded steps, so a slow publish
    is caught up as before, not carried over)."""

    def __init__(self, rate: float, max_wait_s: float = MAX_FRAME_WAIT_S) -> None:
        self.rate, self.max_wait_s = rate, max_wait_s
        self.gaps: list[TimingGap] = []
        self._due_s = 0.0
        self._last_ns: int | None = None

    def due(self, index: int, time_ns: int) -> float:
        """Seconds after the first frame at which frame ``index`` (recorded at ``time_ns``) is
        published; call once per frame, in playing order."""
        if self._last_ns is not None:
            recorded_s = (time_ns - self._last_ns) / 1e9
            wait_s = recorded_s / self.rate
            if not 0.0 <= wait_s <= self.max_wait_s:
                wait_s = min(max(wait_s, 0.0), self.max_wait_s)
                self.gaps.append(TimingGap(frame=index, recorded_s=recorded_s, played_s=wait_s))
            self._due_s += wait_s
        self._last_ns = time_ns
        return self._due_s


@dataclass
class RunResult:
    settings: RunSettings
    outcomes: list[Outcome]
    wall_s: float = 0.0  # first frame published -> last frame published or answer received
    startup_s: float = 0.0  # processes started -> graph ready
    thresholds: list[float] | None = None  # what the classifier actually used
    unmatched_predictions: int = 0  # predictions whose stamp matched no outstanding frame
    node_counters: dict[str, dict[str, str]] = field(default_factory=dict)  # last diagnostics
    node_exit_codes: dict[str, int | None] = field(default_factory=dict)
    timing_gaps: list[TimingGap] = field(default_factory=list)  # rate mode: RatePacer.gaps
