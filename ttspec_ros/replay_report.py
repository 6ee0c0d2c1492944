"""The report of a replay: dropped-frame accounting, metrics, and the report files (report.json,
report.md, outcomes.json; the plots are drawn by ``ttspec_ros.replay_plots``).

ROS-free; works on the plain run data of ``ttspec_ros.replay_runs`` and is unit-tested directly.

Definitions used in the report:
- accuracy: correct / answered frames that have a label (lost frames are counted separately).
- latency_ms: the classifier's model time per frame (CascadePrediction.latency_ms);
  e2e_latency_ms: bag frame published -> its prediction received (what a robot waits).
- cost: the model card's ``exit_cost`` of the answering exit (cumulative share of the full
  forward compute; last exit = 1.0). mean_cost 0.5 = half the compute of running every frame
  through the whole model.
- windows: consecutive blocks of ``window`` played frames; tail: the last ``tail`` frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ttspec_ros import topics
from ttspec_ros.data import CLASS_NAMES, SUBSETS
from ttspec_ros.files import write_json, write_text
from ttspec_ros.replay_runs import MAX_FRAME_WAIT_S, Outcome, RunResult

# Class groups reported separately when the model uses the Fashion-MNIST classes.
GROUPS: dict[str, list[int]] = {
    "footwear": SUBSETS["footwear"],
    "tops": SUBSETS["tops"],
    "other": [c for c in range(len(CLASS_NAMES))
              if c not in SUBSETS["footwear"] + SUBSETS["tops"]],
}
DEFAULT_TAIL = 1000  # frames; the "last 1,000 frames"
DEFAULT_WINDOWS = 6
TIMING_GAPS_LISTED = 20  # report.json lists the first ones of a run, and counts all


# --- dropped frames ------------------------------------------------------------------------------


def int_counters(values: dict[str, str]) -> dict[str, int]:
    """The integer counters of a node's diagnostics key/values."""
    out = {}
    for key, value in values.items():
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            continue
    return out


def counter_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
                  ) -> dict[str, dict[str, int]]:
    return {node: {k: v - before.get(node, {}).get(k, 0) for k, v in values.items()}
            for node, values in after.items()}


def drop_reasons(delta: dict[str, dict[str, int]], sent: int, answered: int) -> dict[str, int]:
    """reason -> frames, for the ``sent - answered`` frames without a prediction, from the
    nodes' counters (``delta``: per node, counter changes over the same frames)."""
    cam = delta.get(topics.CAMERA_NODE, {})
    cls = delta.get(topics.CLASSIFIER_NODE, {})
    out: dict[str, int] = {}
    for node, counts in ((topics.CAMERA_NODE, cam), (topics.CLASSIFIER_NODE, cls)):
        for key, n in sorted(counts.items()):
            if key.startswith("rejected_"):
                out[f"rejected by {node}: {key.removeprefix('rejected_')}"] = n
    out["dropped by camera: max_rate_hz"] = cam.get("dropped_rate_limit", 0)
    out["not received by the camera"] = sent - cam.get("received", 0)
    out["replaced by a newer frame in the classifier's pending slot"] = cls.get("dropped", 0)
    out["classifier error"] = cls.get("errors", 0)
    out["lost between camera and classifier"] = cam.get("published", 0) - cls.get("received", 0)
    out["prediction published but not received"] = cls.get("classified", 0) - answered
    return {r: n for r, n in out.items() if n > 0}


def attribute_drops(outcomes: Sequence[Outcome], delta: dict[str, dict[str, int]],
                    timeout_s: float) -> None:
    """Give every unanswered frame without a reason one, from the nodes' counters over the run
    so far (``delta``), minus the reasons already given. Called after each lost frame in
    lockstep this is exact per frame; played at a rate, which frame met which fate is unknown
    and only the counts per reason are exact."""
    answered = sum(o.answered for o in outcomes)
    left = drop_reasons(delta, len(outcomes), answered)
    for o in outcomes:
        if o.dropped in left:
            left[o.dropped] -= 1
    pool = [r for r, n in left.items() for _ in range(max(0, n))]
    for o in outcomes:
        if not o.answered and o.dropped is None:
            o.dropped = pool.pop(0) if pool else f"no prediction within {timeout_s:g} s"


# --- metrics -------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def block_metrics(outcomes: Sequence[Outcome], exit_cost: Sequence[float] | None) -> dict:
    """accuracy, mean_exit, mean_cost (and counts) of a block of frames."""
    answered = [o for o in outcomes if o.answered]
    labelled = [o for o in answered if o.label is not None]
    correct = sum(o.class_id == o.label for o in labelled)
    # every answered frame's: replay_driver sets exit_index together with class_id
    exits = [o.exit_index for o in answered if o.exit_index is not None]
    return {
        "frames": len(outcomes),
        "answered": len(answered),
        "labelled": len(labelled),
        "accuracy": _round(correct / len(labelled)) if labelled else None,
        "mean_exit": _round(_mean(exits)),
        "mean_cost": _round(_mean([exit_cost[e] for e in exits])) if exit_cost else None,
    }


def group_metrics(outcomes: Sequence[Outcome], exit_cost: Sequence[float] | None) -> dict:
    """block_metrics per class group (by ground-truth label)."""
    return {
        name: block_metrics([o for o in outcomes if o.label in classes], exit_cost)
        for name, classes in GROUPS.items()
    }


def window_bounds(frames: int, window: int) -> list[tuple[int, int]]:
    return [(s, min(s + window, frames)) for s in range(0, frames, window)]


def check_frame_counts(**counts: int | None) -> None:
    """Refuse a frame count (window, tail, max_frames) below 1; None means the default.

    A window < 1 yields no report windows (the summary table then fails) and a negative tail a
    block that starts after it ends, so they are refused before any work."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a number of frames >= 1, got {value}")


def default_window(frames: int) -> int:
    return max(1, math.ceil(frames / DEFAULT_WINDOWS))


def default_tail(frames: int) -> int:
    """The issue's last 1,000 frames of a 3,000-frame bag; a third of shorter bags."""
    return max(1, min(DEFAULT_TAIL, frames // 3))


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run_metrics(
    result: RunResult, exit_cost: Sequence[float] | None, num_exits: int, *,
    window: int, tail: int, with_groups: bool,
) -> dict:
    """One run's entry of report.json."""
    outcomes = result.outcomes
    answered = [o for o in outcomes if o.answered]
    latencies = [o.latency_ms for o in answered if o.latency_ms is not None]
    e2e = [o.e2e_ms for o in answered if o.e2e_ms is not None]
    histogram = [0] * num_exits
    for o in answered:
        if o.exit_index is not None and 0 <= o.exit_index < num_exits:
            histogram[o.exit_index] += 1
    dropped: dict[str, int] = {}
    for o in outcomes:
        if not o.answered:
            reason = o.dropped or "no prediction"
            dropped[reason] = dropped.get(reason, 0) + 1
    versions = [o.model_version for o in answered if o.model_version is not None]
    whole = block_metrics(outcomes, exit_cost)
    windows = []
    for start, end in window_bounds(len(outcomes), window):
        block = outcomes[start:end]
        entry = {"start": start, "end": end, **block_metrics(block, exit_cost)}
        if with_groups:
            entry["groups"] = group_metrics(block, exit_cost)
        windows.append(entry)
    tail = min(tail, len(outcomes))
    tail_block = outcomes[len(outcomes) - tail:]
    s = result.settings
    run = {
        "name": s.name,
        "adapt": s.adapt,
        "threshold": s.threshold,
        "thresholds_used": result.thresholds,
        "mode": "lockstep" if s.lockstep else f"rate x{s.rate:g}",
        "frames": len(outcomes),
        "predictions": len(answered),
        "lost": len(outcomes) - len(answered),
        "dropped": dropped,
        "unmatched_predictions": result.unmatched_predictions,
        "accuracy": whole["accuracy"],
        "labelled": whole["labelled"],
        "mean_latency_ms": _round(_mean(latencies), 3),
        "p50_latency_ms": _round(percentile(latencies, 50), 3),
        "p95_latency_ms": _round(percentile(latencies, 95), 3),
        "mean_e2e_latency_ms": _round(_mean(e2e), 3),
        "p95_e2e_latency_ms": _round(percentile(e2e, 95), 3),
        "mean_exit": whole["mean_exit"],
        "mean_cost": whole["mean_cost"],
        "exit_histogram": histogram,
        "final_model_version": max(versions) if versions else None,
        "model_versions_seen": len(set(versions)),
        "wall_s": round(result.wall_s, 2),
        "startup_s": round(result.startup_s, 2),
        "frames_per_s": _round(len(outcomes) / result.wall_s, 2) if result.wall_s > 0 else None,
        "windows": windows,
        "tail": {"start": len(outcomes) - tail, "end": len(outcomes),
                 **block_metrics(tail_block, exit_cost)},
        "node_counters": result.node_counters,
        "node_exit_codes": result.node_exit_codes,
        # rate mode: steps of the recorded timing not played as recorded (replay_runs.RatePacer)
        "timing_gaps": len(result.timing_gaps),
        "timing_gaps_first": [asdict(g) for g in result.timing_gaps[:TIMING_GAPS_LISTED]],
    }
    if with_groups:
        run["groups"] = group_metrics(outcomes, exit_cost)
        run["tail"]["groups"] = group_metrics(tail_block, exit_cost)
    return run


def _ratio(a: float | None, b: float | None) -> float | None:
    return _round(a / b) if a is not None and b else None


def _points(a: float | None, b: float | None) -> float | None:
    return _round(100.0 * (a - b), 3) if a is not None and b is not None else None


def comparison(runs: Sequence[dict], results: Sequence[RunResult],
               exit_cost: Sequence[float] | None) -> list[dict]:
    """Adaptation on vs off at each threshold: tail cost ratio, accuracy difference (points).

    The run-level figures are over each run's answered frames, the same frames in lockstep;
    at a real rate the two runs may lose different frames, so the ``*_both`` figures compare
    them on the frames both answered (paired)."""
    out = []
    for i, on in enumerate(runs):
        if not on["adapt"]:
            continue
        j = next((j for j, r in enumerate(runs)
                  if not r["adapt"] and r["threshold"] == on["threshold"]), None)
        if j is None:
            continue
        off = runs[j]
        answered = [{o.index for o in results[k].outcomes if o.answered} for k in (i, j)]
        both = answered[0] & answered[1]
        on_both, off_both = (block_metrics([o for o in results[k].outcomes if o.index in both],
                                           exit_cost) for k in (i, j))
        entry = {
            "threshold": on["threshold"],
            "answered_adapt": on["predictions"], "answered_no_adapt": off["predictions"],
            "answered_both": len(both),
            "accuracy_delta_points_both": _points(on_both["accuracy"], off_both["accuracy"]),
            "mean_cost_ratio_both": _ratio(on_both["mean_cost"], off_both["mean_cost"]),
            "tail_frames": on["tail"]["frames"],
            "tail_mean_cost_adapt": on["tail"]["mean_cost"],
            "tail_mean_cost_no_adapt": off["tail"]["mean_cost"],
            "tail_cost_ratio": _ratio(on["tail"]["mean_cost"], off["tail"]["mean_cost"]),
            "mean_cost_ratio": _ratio(on["mean_cost"], off["mean_cost"]),
            "accuracy_adapt": on["accuracy"],
            "accuracy_no_adapt": off["accuracy"],
            "accuracy_delta_points": _points(on["accuracy"], off["accuracy"]),
            "tail_accuracy_delta_points": _points(on["tail"]["accuracy"], off["tail"]["accuracy"]),
        }
        if "groups" in on and "groups" in off:
            entry["group_accuracy_delta_points"] = {
                g: _points(on["groups"][g]["accuracy"], off["groups"][g]["accuracy"])
                for g in GROUPS
            }
        out.append(entry)
    return out


def shift_analysis(
    results: Sequence[RunResult], switch: int, exit_cost: Sequence[float] | None,
    old_group: str = "footwear", new_group: str = "tops", segment: int | None = None,
) -> list[dict]:
    """After a class-mix switch at frame ``switch``: the new group's cost just after the switch
    vs at the end (it should fall again with adaptation), and the old group's accuracy."""
    out = []
    for result in results:
        outcomes = result.outcomes
        after = outcomes[switch:]
        seg = segment or max(1, len(after) // 4)
        new = GROUPS[new_group]
        early = block_metrics([o for o in after[:seg] if o.label in new], exit_cost)
        late = block_metrics([o for o in after[-seg:] if o.label in new], exit_cost)
        old = block_metrics([o for o in outcomes if o.label in GROUPS[old_group]], exit_cost)
        old_after = block_metrics([o for o in after if o.label in GROUPS[old_group]], exit_cost)
        out.append({
            "name": result.settings.name,
            "adapt": result.settings.adapt,
            "threshold": result.settings.threshold,
            "switch_frame": switch,
            "segment_frames": seg,
            f"{new_group}_cost_after_switch": early["mean_cost"],
            f"{new_group}_cost_at_end": late["mean_cost"],
            f"{new_group}_accuracy_after_switch": early["accuracy"],
            f"{new_group}_accuracy_at_end": late["accuracy"],
            f"{old_group}_accuracy": old["accuracy"],
            f"{old_group}_accuracy_after_switch": old_after["accuracy"],
            f"{old_group}_frames_after_switch": old_after["labelled"],
        })
    return out


def build_report(
    bag: dict, results: Sequence[RunResult], *, exit_cost: Sequence[float] | None,
    num_exits: int, class_names: Sequence[str], model: dict, window: int | None = None,
    tail: int | None = None, settings: dict | None = None,
) -> dict:
    """report.json: the issue's keys (bag, frames, predictions, lost, runs[...]) and more."""
    check_frame_counts(window=window, tail=tail)
    frames = max((len(r.outcomes) for r in results), default=0)
    window = default_window(frames) if window is None else window
    tail = default_tail(frames) if tail is None else tail
    with_groups = list(class_names) == list(CLASS_NAMES) and bool(bag.get("labels"))
    runs = [run_metrics(r, exit_cost, num_exits, window=window, tail=tail,
                        with_groups=with_groups) for r in results]
    in_bag = bag.get("image_count")
    if in_bag is None or frames == in_bag:
        frames_text = "image frames in the bag, each played once per run"
    else:  # --max-frames (or a run cut short): not the bag's count
        frames_text = (f"image frames played per run: the first {frames} of the bag's "
                       f"{in_bag}")
    report = {
        "bag": bag.get("path"),
        "frames": frames,
        "predictions": sum(r["predictions"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "runs": runs,
        "bag_info": bag,
        "model": model,
        "window": window,
        "tail": tail,
        "settings": settings or {},
        "definitions": {
            "frames": frames_text,
            "predictions/lost": "totals over all runs (per run: runs[i].predictions/lost)",
            "accuracy": "correct / answered labelled frames",
            "latency_ms": "classifier model time per frame (CascadePrediction.latency_ms)",
            "e2e_latency_ms": "bag frame published -> prediction received",
            "mean_cost": "mean model-card exit_cost of the answering exit (full model = 1.0)",
        },
    }
    compared = comparison(runs, results, exit_cost)
    if compared:
        report["comparison"] = compared
    switch = bag.get("custom_data", {}).get("ttspec.switch_frame")
    if with_groups and switch not in (None, ""):
        report["shift"] = shift_analysis(results, int(switch), exit_cost)
    return report


# --- report files --------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def signed_points(x: float | None) -> str:
    """An accuracy difference in points, with its sign: '+0.07 points', '-' without labels."""
    return "-" if x is None else f"{x:+.2f} points"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def summary_table(report: dict) -> str:
    """Markdown table, one row per run: the demo's printed summary."""
    rows = ["| run | accuracy (answered) | mean latency ms | mean exit | mean cost "
            "| first window cost | last window cost | lost | model version |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        first, last = r["windows"][0], r["windows"][-1]
        rows.append(
            f"| {r['name']} | {_pct(r['accuracy'])} | {_fmt(r['mean_latency_ms'], 2)} "
            f"| {_fmt(r['mean_exit'])} | {_fmt(r['mean_cost'])} | {_fmt(first['mean_cost'])} "
            f"| {_fmt(last['mean_cost'])} | {r['lost']} | {_fmt(r['final_model_version'])} |"
        )
    return "\n".join(rows)


def markdown(report: dict, plots: Sequence[str]) -> str:
    bag, model = report["bag_info"], report["model"]
    in_bag = bag.get("image_count")
    lines = [
        f"# Replay of `{report['bag']}`",
        "",
        *([f"**Incomplete:** {report['incomplete']}", ""] if report.get("incomplete") else []),
        f"- image topic `{bag.get('image_topic')}` ({bag.get('image_type')}), "
        f"{report['frames']} frames"
        + ("" if in_bag in (None, report["frames"]) else f" played (of {in_bag} in the bag)")
        + f", labels in the bag: {bag.get('labels') or 'none'}; storage {bag.get('storage')}"
        + (f", compressed {bag['compression']}" if bag.get("compression") else ""),
    ]
    for r in report["runs"]:
        if r.get("timing_gaps"):
            listed = r.get("timing_gaps_first", [])[:3]
            lines.append(
                f"- **recorded timing not played as recorded** ({r['name']}): "
                f"{r['timing_gaps']} wait(s) between frames capped at {MAX_FRAME_WAIT_S:g} s or "
                "step(s) back in time played as no wait: " + ", ".join(
                    f"before frame {g['frame']} {g['recorded_s']:+.6g} s recorded, "
                    f"{g['played_s']:g} s played" for g in listed)
                + (" and more (report.json)" if r["timing_gaps"] > len(listed) else ""))
    if report["runs"] and not any(r.get("predictions") for r in report["runs"]):
        lines.append("- **no frame was answered**: every frame was lost (see each run's `lost` "
                     "and `dropped`)")
    elif bag.get("labels") and not any(r.get("labelled") for r in report["runs"]):
        lines.append("- **no answered frame matched a label**: labels are matched to frames by "
                     "exact header stamp, so the label topic's stamps differ from the images'")
    lines += [
        f"- model `{model.get('model_id')}`, exit_cost {model.get('exit_cost')}",
        f"- scenario: {bag.get('custom_data', {}).get('ttspec.scenario', 'unknown')}; window "
        f"{report['window']} frames; tail = last {report['tail']} frames",
        "",
        summary_table(report),
        "",
        "| run | p95 latency ms | mean e2e ms | p95 e2e ms | exit histogram | tail accuracy "
        "| tail cost | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['name']} | {_fmt(r['p95_latency_ms'], 2)} | {_fmt(r['mean_e2e_latency_ms'], 2)} "
            f"| {_fmt(r['p95_e2e_latency_ms'], 2)} | {r['exit_histogram']} "
            f"| {_pct(r['tail']['accuracy'])} | {_fmt(r['tail']['mean_cost'])} "
            f"| {r['dropped'] or 'none'} |"
        )
    for c in report.get("comparison", []):
        lines += [
            "",
            f"**Adaptation on vs off** (threshold {_fmt(c['threshold'])}): "
            f"last {c['tail_frames']} frames mean cost {_fmt(c['tail_mean_cost_adapt'])} vs "
            f"{_fmt(c['tail_mean_cost_no_adapt'])} (ratio {_fmt(c['tail_cost_ratio'])}), "
            f"accuracy {signed_points(c['tail_accuracy_delta_points'])}; whole run accuracy "
            f"{_pct(c['accuracy_adapt'])} vs {_pct(c['accuracy_no_adapt'])} "
            f"({signed_points(c['accuracy_delta_points'])})"
            + ("." if c["answered_adapt"] == c["answered_no_adapt"] == c["answered_both"] else
               f"; on the {c['answered_both']} frames both runs answered, accuracy "
               f"{signed_points(c['accuracy_delta_points_both'])}, mean cost ratio "
               f"{_fmt(c['mean_cost_ratio_both'])}."),
        ]
    for s in report.get("shift", []):
        lines += ["", f"**Shift at frame {s['switch_frame']}** ({s['name']}): " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in s.items()
            if k not in ("name", "adapt", "threshold", "switch_frame"))]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict, results: Sequence[RunResult],
                 exit_cost: Sequence[float] | None) -> list[Path]:
    """report.json, report.md, outcomes.json (per frame) and the plots; returns the plot paths."""
    from ttspec_ros import replay_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    window = report["window"]
    switch = report["bag_info"].get("custom_data", {}).get("ttspec.switch_frame")
    plots = replay_plots.stream_plots(
        out_dir, results, exit_cost, num_exits=len(report["runs"][0]["exit_histogram"]),
        window=window, switch=int(switch) if switch else None,
        groups=GROUPS if "groups" in report["runs"][0] else None,
    )
    if len({r.settings.threshold for r in results} - {None}) > 1:  # a threshold sweep
        plots.append(replay_plots.threshold_curve(out_dir, report["runs"]))
    report["plots"] = [p.name for p in plots]
    write_json(out_dir / "report.json", report)
    write_json(out_dir / "outcomes.json", {
        r.settings.name: [asdict(o) for o in r.outcomes] for r in results
    })
    text = markdown(report, [str(p) for p in plots])
    write_text(out_dir / "report.md", text)
    return plots
