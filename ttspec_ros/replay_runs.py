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
