"""Replay evaluation: metrics/report on synthetic outcomes, drop accounting, and one short real
replay of a small bag through the installed node graph (tiny model)."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from ttspec_ros import replay, replay_report
from ttspec_ros.data import CLASS_NAMES
from ttspec_ros.replay_runs import Outcome, RunResult, RunSettings

EXIT_COST = [0.25, 0.5, 0.75, 1.0]


def _run(adapt: bool, exits: list[int], labels: list[int | None], preds: list[int | None],
         threshold: float | None = None) -> RunResult:
    outcomes = []
    for i, (e, y, p) in enumerate(zip(exits, labels, preds, strict=True)):
        o = Outcome(index=i, stamp_ns=1000 + i, label=y)
        if p is not None:
            o.class_id, o.exit_index, o.latency_ms, o.e2e_ms = p, e, 1.0 + e, 3.0 + e
            o.model_version = i // 4
        else:
            o.dropped = "no prediction within 10 s"
        outcomes.append(o)
    return RunResult(settings=RunSettings(adapt=adapt, threshold=threshold, rate=None),
                     outcomes=outcomes, wall_s=2.0)


def test_run_metrics_by_hand():
    # 8 frames: exits 3,3,2,2,1,1,0,0; labels 5 (footwear) and 0 (tops); frame 7 lost
    exits = [3, 3, 2, 2, 1, 1, 0, 0]
    labels = [5, 5, 0, 0, 5, 5, 0, 0]
    preds = [5, 7, 0, 0, 5, 5, 0, None]
    r = replay_report.run_metrics(_run(True, exits, labels, preds), EXIT_COST, 4, window=4, tail=2,
                                  with_groups=True)
    assert r["frames"] == 8 and r["predictions"] == 7 and r["lost"] == 1
    assert r["dropped"] == {"no prediction within 10 s": 1}
    assert r["accuracy"] == pytest.approx(6 / 7, abs=1e-4)
    assert r["mean_exit"] == pytest.approx(12 / 7, abs=1e-4)
    assert r["mean_cost"] == pytest.approx((2 * 1.0 + 2 * 0.75 + 2 * 0.5 + 0.25) / 7, abs=1e-4)
    assert r["exit_histogram"] == [1, 2, 2, 2]
    assert r["final_model_version"] == 1
    assert r["mean_latency_ms"] == pytest.approx(1 + 12 / 7, abs=1e-3)
    assert [(w["start"], w["end"]) for w in r["windows"]] == [(0, 4), (4, 8)]
    assert r["windows"][0]["accuracy"] == 0.75 and r["windows"][0]["mean_cost"] == 0.875
    assert r["windows"][1]["mean_exit"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["tail"] == {"start": 6, "end": 8, "frames": 2, "answered": 1, "labelled": 1,
                         "accuracy": 1.0, "mean_exit": 0.0, "mean_cost": 0.25,
                         "groups": r["tail"]["groups"]}
    assert r["groups"]["footwear"]["accuracy"] == 0.75
    assert r["groups"]["tops"]["accuracy"] == 1.0 and r["groups"]["tops"]["answered"] == 3
    assert r["groups"]["other"]["answered"] == 0 and r["groups"]["other"]["accuracy"] is None


def test_report_keys_comparison_and_files(tmp_path):
    exits_on, exits_off = [3, 2, 1, 0, 0, 0], [3, 3, 2, 3, 2, 3]
    labels = [0, 2, 4, 6, 0, 1]
    on = _run(True, exits_on, labels, [0, 2, 4, 6, 0, 0])
    off = _run(False, exits_off, labels, [0, 2, 4, 6, 0, 1])
    bag = {"path": "/bags/x", "image_topic": "/camera/image_raw", "labels": 6,
           "custom_data": {"ttspec.scenario": "tops-heavy"}}
    model = {"model_id": "m", "exit_cost": EXIT_COST, "num_exits": 4}
    report = replay_report.build_report(bag, [on, off], exit_cost=EXIT_COST, num_exits=4,
                                        class_names=CLASS_NAMES, model=model, window=3, tail=3)
    assert {"bag", "frames", "predictions", "lost", "runs"} <= set(report)
    assert (report["bag"], report["frames"], report["predictions"], report["lost"]) == (
        "/bags/x", 6, 12, 0)
    issue_keys = {"adapt", "threshold", "accuracy", "mean_latency_ms", "p95_latency_ms",
                  "mean_exit", "mean_cost", "exit_histogram", "final_model_version", "windows"}
    for run in report["runs"]:
        assert issue_keys <= set(run)
        for w in run["windows"]:
            assert {"start", "end", "accuracy", "mean_exit", "mean_cost"} <= set(w)
    (c,) = report["comparison"]
    assert (c["answered_adapt"], c["answered_no_adapt"]) == (6, 6)
    assert c["tail_mean_cost_adapt"] == 0.25 and c["tail_mean_cost_no_adapt"] == pytest.approx(
        (1.0 + 0.75 + 1.0) / 3, abs=1e-4)
    assert c["tail_cost_ratio"] == pytest.approx(0.25 / ((2.75) / 3), abs=1e-3)
    assert c["accuracy_delta_points"] == pytest.approx(100 * (5 / 6 - 1.0), abs=1e-2)
    # last 3 frames: adaptation answered 2 of 3 right, no adaptation 3 of 3
    assert c["tail_accuracy_delta_points"] == pytest.approx(100 * (2 / 3 - 1.0), abs=1e-2)

    plots = replay_report.write_report(tmp_path, report, [on, off], EXIT_COST)
    names = {p.name for p in plots}
    assert {"accuracy.png", "exit_cost.png", "exit_histogram.png", "latency.png",
            "group_cost.png"} <= names
    assert all(p.stat().st_size > 1000 for p in plots)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["runs"][0]["exit_histogram"] == [3, 1, 1, 1]
    md = (tmp_path / "report.md").read_text()
    assert "| adapt |" in md and "ratio" in md and "![accuracy](accuracy.png)" in md
    assert "accuracy -33.33 points; whole run accuracy 83.33 % vs 100.00 % (-16.67 points)" in md
    per_frame = json.loads((tmp_path / "outcomes.json").read_text())
    assert len(per_frame["adapt"]) == 6 and per_frame["no-adapt"][0]["exit_index"] == 3



def test_comparison_pairs_the_frames_both_runs_answered():
    # at a real rate the runs lose different frames: here no-adapt lost frame 5, which
    # adaptation got wrong, so the whole-run accuracies differ by 16.67 points; on the five
    # frames both answered, both are right
    labels = [0, 2, 4, 6, 0, 1]
    on = _run(True, [3, 2, 1, 0, 0, 0], labels, [0, 2, 4, 6, 0, 0])
    off = _run(False, [3, 3, 2, 3, 2, 3], labels, [0, 2, 4, 6, 0, None])
    report = replay_report.build_report({"path": "b", "labels": 6}, [on, off], exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={}, window=3)
    (c,) = report["comparison"]
    assert (c["answered_adapt"], c["answered_no_adapt"], c["answered_both"]) == (6, 5, 5)
    assert c["accuracy_delta_points"] == pytest.approx(100 * (5 / 6 - 1.0), abs=1e-2)
    assert c["accuracy_delta_points_both"] == 0.0
    assert c["mean_cost_ratio_both"] == pytest.approx(0.55 / 0.9, abs=1e-3)
    assert "on the 5 frames both runs answered, accuracy +0.00 points, mean cost ratio 0.611" \
        in replay_report.markdown(report, [])

def test_rolling_mean_over_frames():
    from ttspec_ros.replay_plots import rolling_mean

    x, y = rolling_mean([0, 1, 2, 3], [1.0, 0.0, 1.0, 1.0], 2)
    assert y.tolist() == [1.0, 0.5, 0.5, 1.0]
    # sparse points: the window is in frames, not in points
    x, y = rolling_mean([0, 10, 11, 30], [1.0, 0.0, 1.0, 0.0], 5)
    assert x.tolist() == [0, 10, 11, 30] and y.tolist() == [1.0, 0.0, 0.5, 0.0]


def test_threshold_sweep_report_plots_the_curve(tmp_path):
    labels = [0, 2, 4, 6]
    runs = [_run(True, [0, 0, 1, 1], labels, [0, 2, 1, 1], threshold=0.5),
            _run(True, [1, 2, 2, 3], labels, [0, 2, 4, 1], threshold=0.9)]
    report = replay_report.build_report({"path": "b", "labels": 4}, runs, exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={})
    assert [(r["threshold"], r["accuracy"]) for r in report["runs"]] == [(0.5, 0.5), (0.9, 0.75)]
    assert [r["name"] for r in report["runs"]] == ["adapt_t0.5", "adapt_t0.9"]
    assert "comparison" not in report  # no adaptation-off runs
    plots = replay_report.write_report(tmp_path, report, runs, EXIT_COST)
    assert (tmp_path / "threshold_curve.png") in plots


def _drawn_lines(monkeypatch) -> dict[str, list]:
    """Capture, per saved plot file name, the (x, y) data of every line on its axes."""
    from ttspec_ros import replay_plots

    drawn: dict[str, list] = {}
    save = replay_plots._save

    def capture(fig, path):
        drawn[Path(path).name] = [[(list(line.get_xdata()), list(line.get_ydata()))
                                   for line in ax.lines] for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(replay_plots, "_save", capture)
    return drawn


def test_unlabelled_threshold_sweep_plots_cost_against_threshold(tmp_path, monkeypatch):
    # no labels, so no accuracy: the curve is mean latency and mean cost per threshold
    drawn = _drawn_lines(monkeypatch)
    runs = [_run(True, [0, 0, 1, 1], [None] * 4, [0, 2, 1, 1], threshold=0.5),
            _run(True, [1, 2, 2, 3], [None] * 4, [0, 2, 4, 1], threshold=0.9)]
    report = replay_report.build_report({"path": "b", "labels": 0}, runs, exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={})
    replay_report.write_report(tmp_path, report, runs, EXIT_COST)
    latency, cost = drawn["threshold_curve.png"]
    assert latency == [([0.5, 0.9], [1.5, 3.0])]
    assert cost == [([0.5, 0.9], [0.375, 0.75])]


def test_group_cost_plot_left_out_when_no_label_matches(tmp_path, monkeypatch):
    drawn = _drawn_lines(monkeypatch)
    labelled = _run(True, [0, 1, 2], [5, 0, 0], [5, 0, 0])
    report = replay_report.build_report({"path": "b", "labels": 3}, [labelled], exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={})
    replay_report.write_report(tmp_path, report, [labelled], EXIT_COST)
    assert len(drawn["group_cost.png"][0]) == 2  # footwear and tops
    drawn.clear()
    unmatched = _run(True, [0, 1, 2], [None] * 3, [1, 2, 3])
    report = replay_report.build_report({"path": "b", "labels": 6}, [unmatched],
                                        exit_cost=EXIT_COST, num_exits=4,
                                        class_names=CLASS_NAMES, model={})
    (tmp_path / "group_cost.png").unlink()
    plots = replay_report.write_report(tmp_path, report, [unmatched], EXIT_COST)
    assert "group_cost.png" not in drawn and "group_cost.png" not in {p.name for p in plots}


def test_unlabelled_bag_report_has_no_accuracy(tmp_path):
    run = _run(True, [0, 1, 2], [None] * 3, [1, 2, 3])
    report = replay_report.build_report({"path": "b", "labels": 0}, [run], exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={})
    (r,) = report["runs"]
    assert r["accuracy"] is None and r["mean_cost"] == 0.5 and "groups" not in r
    plots = replay_report.write_report(tmp_path, report, [run], EXIT_COST)
    assert "accuracy.png" not in {p.name for p in plots}


def test_rate_mode_caps_recorded_time_jumps_and_plays_steps_back_as_no_wait():
    """A bag whose first message was recorded at time 0 (rosbag2 --use-sim-time before the
    first /clock), the rest at 1.7e18 ns: the driver slept for decades at "ETA 00:02"."""
    from ttspec_ros.replay_runs import MAX_FRAME_WAIT_S, RatePacer, TimingGap

    t = 1_700_000_000 * 10**9
    pacer = RatePacer(rate=2.0)
    times = [0, t, t + 100_000_000, t + 50_000_000, t + 150_000_000, t + 150_000_000]
    due = [pacer.due(i, ns) for i, ns in enumerate(times)]
    assert due == pytest.approx([0.0, MAX_FRAME_WAIT_S, MAX_FRAME_WAIT_S + 0.05,
                                 MAX_FRAME_WAIT_S + 0.05, MAX_FRAME_WAIT_S + 0.1,
                                 MAX_FRAME_WAIT_S + 0.1])
    assert pacer.gaps == [TimingGap(frame=1, recorded_s=t / 1e9, played_s=MAX_FRAME_WAIT_S),
                          TimingGap(frame=3, recorded_s=pytest.approx(-0.05), played_s=0.0)]
    steady = RatePacer(rate=1.0)  # an ordinary recording plays as recorded
    assert [steady.due(i, t + i * 33_333_333) for i in range(4)] == pytest.approx(
        [0.0, 0.0333, 0.0667, 0.1], abs=1e-4)
    assert steady.gaps == []

    run = _run(True, [0] * 6, [None] * 6, [1] * 6)
    run.timing_gaps = pacer.gaps
    report = replay_report.build_report({"path": "b"}, [run], exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={})
    (r,) = report["runs"]
    assert r["timing_gaps"] == 2 and r["timing_gaps_first"][0] == {
        "frame": 1, "recorded_s": t / 1e9, "played_s": MAX_FRAME_WAIT_S}
    text = replay_report.markdown(report, [])
    assert "recorded timing not played as recorded** (adapt): 2 wait(s)" in text
    assert "before frame 3 -0.05 s recorded, 0 s played" in text


def test_frames_are_described_as_played_with_max_frames():
    """report.json called `frames` the bag's image frames, with --max-frames too."""
    run = _run(True, [0] * 4, [None] * 4, [1] * 4)
    kwargs = {"exit_cost": EXIT_COST, "num_exits": 4, "class_names": CLASS_NAMES, "model": {}}
    part = replay_report.build_report({"path": "b", "image_count": 10}, [run], **kwargs)
    assert part["frames"] == 4
    assert part["definitions"]["frames"] == (
        "image frames played per run: the first 4 of the bag's 10")
    assert "4 frames played (of 10 in the bag)" in replay_report.markdown(part, [])
    whole = replay_report.build_report({"path": "b", "image_count": 4}, [run], **kwargs)
    assert whole["definitions"]["frames"] == "image frames in the bag, each played once per run"


def test_labels_that_match_no_frame_are_named_in_the_report():
    # stamped 1 ns off the images: "labels: 6" and an accuracy of '-', without a word why
    run = _run(True, [0, 1, 2], [None] * 3, [1, 2, 3])
    report = replay_report.build_report({"path": "b", "labels": 6}, [run], exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={})
    assert "no answered frame matched a label" in replay_report.markdown(report, [])
    matched = replay_report.build_report({"path": "b", "labels": 3},
                                         [_run(True, [0, 1, 2], [1, 2, 3], [1, 2, 3])],
                                         exit_cost=EXIT_COST, num_exits=4,
                                         class_names=CLASS_NAMES, model={})
    assert "matched a label" not in replay_report.markdown(matched, [])
    # every frame lost (a review's 1280x720 bag): that, not the stamps, is the reason
    lost = replay_report.build_report({"path": "b", "labels": 3},
                                      [_run(True, [0, 1, 2], [1, 2, 3], [None] * 3)],
                                      exit_cost=EXIT_COST, num_exits=4,
                                      class_names=CLASS_NAMES, model={})
    text = replay_report.markdown(lost, [])
    assert "no frame was answered" in text and "matched a label" not in text


def test_shift_analysis():
    # 8 frames, switch at 4: footwear before, tops after; tops cost falls 1.0 -> 0.25
    labels = [5, 7, 9, 5, 0, 2, 4, 6]
    exits = [1, 1, 1, 1, 3, 3, 0, 0]
    run = _run(True, exits, labels, labels)
    (s,) = replay_report.shift_analysis([run], 4, EXIT_COST, segment=2)
    assert s["tops_cost_after_switch"] == 1.0 and s["tops_cost_at_end"] == 0.25
    assert s["footwear_accuracy"] == 1.0 and s["footwear_frames_after_switch"] == 0


def test_demo_summary_table():
    from ttspec_ros.experiments import demo

    labels = [0, 2, 4, 6, 0, 1]
    on = _run(True, [3, 2, 1, 0, 0, 0], labels, [0, 2, 4, 6, 0, 0])
    off = _run(False, [3, 3, 2, 3, 2, 3], labels, [0, 2, 4, 6, 0, 1])
    report = replay_report.build_report({"path": "b", "labels": 6}, [on, off], exit_cost=EXIT_COST,
                                        num_exits=4, class_names=CLASS_NAMES, model={}, window=3)
    text = demo.summary(report)
    rows = {line[:28].strip(): line[28:].split() for line in text.splitlines()[1:9]}
    assert rows["accuracy %"] == ["83.33", "100.00"]
    assert rows["mean exit"] == ["1.000", "2.667"]
    assert rows["accuracy %, last window"] == ["66.67", "100.00", "frames", "3-6"]
    assert rows["mean cost, first window"] == ["0.750", "0.917", "frames", "0-3"]
    assert rows["mean cost, last window"][:2] == ["0.250", "0.917"]
    # the accuracy difference of those same 2 frames (1 of 2 vs 2 of 2 right), then the run's
    assert ("last 2 frames: cost with adaptation = 0.286 x without, accuracy -50.00 points; "
            "whole run: accuracy -16.67 points") in text


def test_demo_fails_when_the_pipeline_did_not_work():
    """The demo exited 0 with a classifier that answered nothing or an adapter that died."""
    from ttspec_ros.experiments import demo

    def report(on: RunResult, off: RunResult) -> dict:
        return replay_report.build_report({"path": "b", "labels": 6}, [on, off],
                                          exit_cost=EXIT_COST, num_exits=4,
                                          class_names=CLASS_NAMES, model={}, window=3)

    labels = [0, 2, 4, 6, 0, 1]
    on = _run(True, [3, 2, 1, 0, 0, 0], labels, labels)  # model version 1 from frame 4
    off = _run(False, [3] * 6, labels, labels)
    assert demo.failures(report(on, off)) == []
    silent = _run(True, [3] * 6, labels, [None] * 6)
    on.node_exit_codes = {"camera": 0, "classifier": 0, "adapter": -9}
    never_updated = _run(True, [3] * 3, labels[:3], labels[:3])  # model version 0 throughout
    half_lost = _run(False, [3] * 6, labels, labels[:2] + [None] * 4)
    assert demo.failures(report(silent, off)) == ["run adapt: no frame was answered"]
    assert demo.failures(report(on, half_lost)) == [
        "run adapt: nodes exited with {'adapter': -9}", "run no-adapt: 4 of 6 frames lost"]
    assert demo.failures(report(never_updated, off)) == [
        "run adapt: no model update of the adapter reached the classifier"]


def test_drop_attribution_uses_node_counters():
    outcomes = [Outcome(index=i, stamp_ns=i) for i in range(6)]
    for o in outcomes[:3]:
        o.class_id, o.exit_index = 1, 0
    delta = {"camera": {"received": 5, "published": 4, "rejected": 1, "rejected_wrong_step": 1},
             "classifier": {"received": 4, "dropped": 1, "classified": 3}}
    replay_report.attribute_drops(outcomes, delta, 5.0)
    reasons = sorted(o.dropped for o in outcomes[3:])
    assert reasons == ["not received by the camera", "rejected by camera: wrong_step",
                       "replaced by a newer frame in the classifier's pending slot"]
    # lockstep: called again after another lost frame, earlier reasons are kept
    outcomes.append(Outcome(index=6, stamp_ns=6))
    delta["camera"]["received"] += 1
    delta["camera"]["published"] += 1
    delta["classifier"]["received"] += 1
    delta["classifier"]["errors"] = 1
    replay_report.attribute_drops(outcomes, delta, 5.0)
    assert outcomes[6].dropped == "classifier error"
    assert sorted(o.dropped for o in outcomes[3:6]) == reasons
    # no counters at all: nothing reached the camera as far as anyone can tell
    outcomes.append(Outcome(index=7, stamp_ns=7))
    replay_report.attribute_drops(outcomes, {}, 5.0)
    assert outcomes[7].dropped == "not received by the camera"
    # counters that account for every frame (the classifier still had one): a timeout
    pending = [Outcome(index=i, stamp_ns=i) for i in range(3)]
    for o in pending[:2]:
        o.class_id, o.exit_index = 1, 0
    replay_report.attribute_drops(pending, {"camera": {"received": 3, "published": 3},
                                            "classifier": {"received": 3, "classified": 2}}, 5.0)
    assert pending[2].dropped == "no prediction within 5 s"


def test_graph_arguments(tmp_path):
    graph = replay.GraphSpec(prefix=tmp_path, params_file=tmp_path / "p.yaml", model="/m/x",
                             params=(replay.parse_param("adapter.learning_rate=0.01"),))
    o = graph.overrides(RunSettings(adapt=False, threshold=0.7), compressed=True)
    assert o["camera"] == {"transport": "compressed", "model": "/m/x",
                           "image_reliability": "reliable"}
    # a user's own setting of the camera's reader wins over replay's
    mine = replay.GraphSpec(prefix=tmp_path, params_file=tmp_path / "p.yaml", params=(
        replay.parse_param("camera.image_reliability=best_effort"),))
    assert mine.overrides(RunSettings(adapt=False), compressed=False)["camera"][
        "image_reliability"] == "best_effort"
    assert o["classifier"] == {"threshold": 0.7, "model": "/m/x"}
    assert o["adapter"] == {"enabled": False, "model": "/m/x", "learning_rate": 0.01,
                            "state_dir": ""}
    assert replay.parse_param("classifier.publish_samples=false") == (
        "classifier", "publish_samples", False)
    for bad in ("adapter.learning_rate", "learning_rate=1.0", "planner.x=1"):
        with pytest.raises(ValueError, match="NODE.NAME=VALUE|unknown node"):
            replay.parse_param(bad)
    # A name the node does not declare would be ignored by it, a wrong value would stop it.
    with pytest.raises(ValueError, match="classifier has no parameter 'treshold'.*threshold"):
        replay.parse_param("classifier.treshold=0.7")
    with pytest.raises(ValueError, match=r"thresholds = 1.5 is outside \[0.0, 1.0\]"):
        replay.parse_param("classifier.thresholds=[1.5, 0, 0]")
    # What each run sets is not overridden behind the run's name (a "t0.5" run at 0.9).
    for owned, option in (("classifier.threshold=0.9", "--sweep-thresholds"),
                          ("adapter.enabled=true", "--compare"),
                          ("camera.transport=raw", "image type"),
                          ("classifier.model=/tmp/other", "--model"),
                          ("adapter.model=/tmp/other", "--model")):
        with pytest.raises(ValueError, match=f"set by each run; use .*{option}"):
            replay.parse_param(owned)
    with pytest.raises(ValueError, match="not valid YAML"):
        replay.parse_param("adapter.learning_rate=[1")
    with pytest.raises(ValueError, match="publish_samples must be bool"):
        replay.parse_param("classifier.publish_samples=maybe")
    # Parameters rclpy declares itself pass as they are.
    assert replay.parse_param("camera.use_sim_time=true") == ("camera", "use_sim_time", True)
    assert replay.parse_param(
        "camera.qos_overrides./ttspec/image_raw.subscription.reliability=reliable") == (
        "camera", "qos_overrides./ttspec/image_raw.subscription.reliability", "reliable")
    # YAML integers for double parameters become doubles (rclpy refuses an integer there).
    assert replay.parse_param("camera.max_rate_hz=10") == ("camera", "max_rate_hz", 10.0)
    assert isinstance(replay.parse_param("camera.max_rate_hz=10")[2], float)
    assert replay.parse_param("classifier.thresholds=[1, 0.5, 0]")[2] == [1.0, 0.5, 0.0]
    args = graph.ros_args(tmp_path / "o.yaml")
    assert args == ["--ros-args", "--params-file", str(tmp_path / "p.yaml"), "--params-file",
                    str(tmp_path / "o.yaml"), "-r", "__ns:=/ttspec"]
    overlay = yaml.safe_load(graph.overlay_yaml(o))
    assert overlay["/ttspec/classifier"]["ros__parameters"] == {"threshold": 0.7, "model": "/m/x"}
    assert overlay["/ttspec/adapter"]["ros__parameters"]["enabled"] is False
    assert graph.executable("camera_node") == tmp_path / "lib" / "ttspec_ros" / "camera_node"
    env = graph.environment(170, tmp_path)
    assert env["ROS_DOMAIN_ID"] == "170" and env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"


def test_a_state_dir_never_carries_adaptation_into_another_run(tmp_path):
    """A params file's adapter state_dir let the no-adapt run resume (and publish at start)
    what the adapt run had saved there: it classified with adapted heads from frame 0."""
    (tmp_path / "p.yaml").write_text("/**:\n  ros__parameters:\n    state_dir: /x\n")
    graph = replay.GraphSpec(prefix=tmp_path, params_file=tmp_path / "p.yaml")
    for settings in (RunSettings(adapt=True), RunSettings(adapt=False)):
        # keyed by the adapter's full name, the overlay wins over the params file's /**
        overlay = yaml.safe_load(graph.overlay_yaml(graph.overrides(settings, compressed=False)))
        assert overlay["/ttspec/adapter"]["ros__parameters"]["state_dir"] == ""
    with pytest.raises(ValueError, match="adapter.state_dir=/x'?: set by each run; every "
                                         "run's adapter starts without saved state"):
        replay.parse_param("adapter.state_dir=/x")


def test_the_nodes_and_the_report_use_the_params_files_model(monkeypatch, tmp_path):
    """With --params-file naming another model the nodes ran it, but the report read the
    bundled demo card (its exit_cost, class names, "(bundled demo model)")."""
    _installed_graph()  # rclpy and the built messages, else a skip
    from ttspec_ros import bags
    from ttspec_ros.nodes import replay_driver

    stem = _tiny_model(tmp_path / "tiny")
    params_file = tmp_path / "robot.yaml"
    params_file.write_text(f"/**:\n  ros__parameters:\n    model: {stem}\n")
    assert replay.find_graph(params_file=params_file).model == stem
    assert replay.find_graph(model="/m/x", params_file=params_file).model == "/m/x"
    bag = bags.make_scenario_bag("uniform", tmp_path / "bag", frames=6, seed=0,
                                 storage="sqlite3")["bag"]
    given: list[dict] = []

    def play(stream, settings, graph, **kwargs):
        given.append(graph.overrides(settings, compressed=stream.compressed))
        result = _run(settings.adapt, [0] * 6, [None] * 6, [1] * 6)
        result.settings = settings
        return result

    monkeypatch.setattr(replay_driver, "play", play)
    report, _ = replay.replay_bag(bag, tmp_path / "report", [RunSettings(adapt=False)],
                                  params_file=params_file, domain_id=0,
                                  stream_out=io.StringIO())
    # every node is given the model explicitly, and the report reads that model's card
    assert {node: o["model"] for node, o in given[0].items()} == dict.fromkeys(
        ("camera", "classifier", "adapter"), stem)
    assert report["model"]["model_id"] == "tiny-replay-test"
    assert report["model"]["exit_cost"] == EXIT_COST
    assert report["settings"]["model"] == stem


def test_graphs_stay_on_this_host_on_humble_too(monkeypatch, tmp_path):
    """Humble reads only ROS_LOCALHOST_ONLY; later distributions the discovery range."""
    graph = replay.GraphSpec(prefix=tmp_path, params_file=tmp_path / "p.yaml")
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)
    monkeypatch.setenv("ROS_DISTRO", "humble")
    assert graph.environment(170, tmp_path)["ROS_LOCALHOST_ONLY"] == "1"
    for distro in ("jazzy", "kilted"):
        monkeypatch.setenv("ROS_DISTRO", distro)
        env = graph.environment(170, tmp_path)
        assert "ROS_LOCALHOST_ONLY" not in env
        assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"


def test_installed_nodes_are_found_in_a_sourced_workspace(monkeypatch, tmp_path):
    """A colcon workspace's install prefix (on AMENT_PREFIX_PATH) comes before the
    interpreter's: the nodes and params file the tools start are that workspace's."""
    workspace = tmp_path / "install" / "ttspec_ros"
    (workspace / "lib" / "ttspec_ros").mkdir(parents=True)
    (workspace / "lib" / "ttspec_ros" / "camera_node").write_text("")
    (workspace / "share" / "ttspec_ros" / "config").mkdir(parents=True)
    (workspace / "share" / "ttspec_ros" / "config" / "ttspec.yaml").write_text(
        "/**:\n  ros__parameters:\n    model: ''\n")
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.pathsep.join([str(tmp_path / "other"),
                                                             str(workspace), "/opt/ros/humble"]))
    assert replay.find_graph().prefix == workspace
    assert replay.find_graph().params_file == workspace / "share/ttspec_ros/config/ttspec.yaml"
    pytest.importorskip("rclpy")
    from ttspec_ros.nodes.probe import NodeProcess

    command = NodeProcess("classifier", {}, tmp_path).command()
    assert command[0] == str(workspace / "lib" / "ttspec_ros" / "classifier_node")
    assert command[command.index("--params-file") + 1] == str(
        workspace / "share/ttspec_ros/config/ttspec.yaml")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path / "other"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    with pytest.raises(FileNotFoundError, match="colcon build"):
        replay.find_graph()


def test_run_settings_from_command_line():
    import argparse

    from ttspec_ros.experiments import replay_cmd

    parser = argparse.ArgumentParser()
    replay_cmd.add_arguments(parser)
    runs = replay_cmd.run_settings(parser.parse_args(
        ["b", "--out", "o", "--compare", "--lockstep", "--sweep-thresholds", "0.5,0.9"]))
    assert [(r.adapt, r.threshold, r.lockstep) for r in runs] == [
        (True, 0.5, True), (False, 0.5, True), (True, 0.9, True), (False, 0.9, True)]
    (r,) = replay_cmd.run_settings(parser.parse_args(["b", "--out", "o", "--no-adapt",
                                                      "--rate", "2"]))
    assert (r.adapt, r.rate, r.threshold) == (False, 2.0, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["b", "--out", "o", "--lockstep", "--rate", "2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["b", "--out", "o", "--sweep-thresholds", "0.5,1.5"])


@pytest.mark.parametrize("argv, message", [
    # each conflict was resolved silently: the sweep won over --threshold, --compare over
    # --no-adapt, and an empty item was dropped
    (["--sweep-thresholds", "0.5,0.7", "--threshold", "0.9"],
     "argument --threshold: not allowed with argument --sweep-thresholds"),
    (["--sweep-thresholds", "0.5,,0.7"], "not a comma-separated list of numbers: 0.5,,0.7"),
])
def test_replay_command_refuses_conflicting_options_while_parsing(argv, message, capsys):
    from ttspec_ros.cli import main as cli_main

    with pytest.raises(SystemExit) as exited:
        cli_main(["replay", "bag", "--out", "o", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("adapt", ["--adapt", "--no-adapt"])
def test_replay_compare_refuses_an_adapt_choice(adapt, tmp_path, capsys):
    from ttspec_ros.cli import main as cli_main

    assert cli_main(["replay", str(tmp_path / "bag"), "--out", str(tmp_path / "o"),
                     "--compare", adapt]) == 2
    assert f"--compare runs with the adapter on and off; drop {adapt}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_params_file_that_would_stop_the_nodes_is_refused_before_they_start(monkeypatch,
                                                                             tmp_path):
    workspace = tmp_path / "install"
    (workspace / "lib" / "ttspec_ros").mkdir(parents=True)
    (workspace / "lib" / "ttspec_ros" / "camera_node").write_text("")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(workspace))
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    num_threads: 1.5\n")
    with pytest.raises(ValueError) as refused:
        replay.find_graph(params_file=bad)
    assert str(refused.value) == (f"params file {bad}: section '/**': num_threads must be int, "
                                  "got float 1.5")
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        replay.find_graph(params_file=bad)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--window", "-5", "--window: must be a number of frames >= 1, got -5"),
    ("--window", "0", "--window: must be a number of frames >= 1"),
    ("--tail", "-5", "--tail: must be a number of frames >= 1"),
    ("--max-frames", "0", "--max-frames: must be a number of frames >= 1"),
    ("--window", "1.5", "--window: not a whole number of frames"),
    ("--timeout", "0", "--timeout: must be a finite number of seconds > 0"),
    ("--timeout", "-1", "--timeout: must be a finite number of seconds > 0"),
    ("--timeout", "inf", "--timeout: must be a finite number of seconds > 0"),
    ("--threshold", "1.5", r"--threshold: must be in \[0, 1\]"),
    ("--threshold", "-0.1", r"--threshold: must be in \[0, 1\]"),
    ("--threshold", "nan", r"--threshold: must be in \[0, 1\]"),
    ("--domain-id", "233", "--domain-id: must be in 0..232"),
    ("--domain-id", "-1", "--domain-id: must be in 0..232"),
])
def test_replay_command_refuses_bad_numbers_while_parsing(tmp_path, capsys, option, value,
                                                          message):
    from ttspec_ros.cli import main as cli_main

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:
        cli_main(["replay", str(tmp_path / "bag"), "--out", str(out), f"{option}={value}"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # refused before any replay work


def test_replay_command_accepts_good_numbers():
    import argparse

    from ttspec_ros.experiments import replay_cmd

    parser = argparse.ArgumentParser()
    replay_cmd.add_arguments(parser)
    args = parser.parse_args(["b", "--out", "o", "--window", "1", "--tail", "7", "--max-frames",
                              "30", "--timeout", "0.5", "--threshold", "1"])
    assert (args.window, args.tail, args.max_frames, args.timeout, args.threshold) == (
        1, 7, 30, 0.5, 1.0)


def test_run_settings_refuse_bad_values():
    for kwargs, message in (({"threshold": 1.5}, "threshold must be in"),
                            ({"threshold": float("nan")}, "threshold must be in"),
                            ({"timeout_s": 0.0}, "timeout must be"),
                            ({"timeout_s": float("inf")}, "timeout must be"),
                            ({"rate": 0.0}, "rate must be")):
        with pytest.raises(ValueError, match=message):
            RunSettings(adapt=True, **kwargs)
    assert RunSettings(adapt=True, threshold=0.0, rate=None).lockstep


@pytest.mark.parametrize(("window", "tail", "bad"), [(-5, None, "window"), (0, None, "window"),
                                                      (None, -5, "tail"), (None, 0, "tail")])
def test_build_report_refuses_bad_window_and_tail(window, tail, bad):
    run = _run(True, [0, 1, 2], [0, 2, 4], [0, 2, 4])
    with pytest.raises(ValueError, match=f"{bad} must be a number of frames >= 1"):
        replay_report.build_report({"path": "b"}, [run], exit_cost=EXIT_COST, num_exits=4,
                                   class_names=CLASS_NAMES, model={}, window=window, tail=tail)


def test_replay_bag_refuses_bad_counts_before_any_work(tmp_path):
    out = tmp_path / "report"
    for kwargs in ({"window": -5}, {"tail": -5}, {"max_frames": 0}):
        # the bag does not exist either: the count is checked first, before the bag is read
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a number of frames"):
            replay.replay_bag(tmp_path / "no-bag", out, [RunSettings(adapt=True)], **kwargs)
    with pytest.raises(ValueError, match="domain id must be in 0..232"):
        replay.replay_bag(tmp_path / "no-bag", out, [RunSettings(adapt=True)], domain_id=233)
    with pytest.raises(ValueError, match="no run settings"):
        replay.replay_bag(tmp_path / "no-bag", out, [])
    assert not out.exists()


def test_progress_bar_reports_eta():
    now = [0.0]
    out = io.StringIO()
    bar = replay.Progress(100, "run", stream=out, clock=lambda: now[0])
    now[0] = 10.0
    bar.update(50)
    line = out.getvalue()
    assert "50/100" in line and "5.0 fps" in line and "ETA 00:10" in line
    bar.update(55)  # not a new tenth: no new line when not a terminal
    assert out.getvalue().count("\n") == 1
    bar.finish(100)
    assert "100/100" in out.getvalue().splitlines()[-1]
    long = replay.Progress(10000, "run", stream=out, clock=lambda: now[0])
    now[0] += 10.0
    assert "ETA 2:46:30" in long.line(10)  # 1 fps, 9990 s to go (strftime gave 46:30)
    assert "ETA 01:30" in long.line(1000)


def test_replay_command_bad_bag(tmp_path, capsys):
    from ttspec_ros.cli import main as cli_main

    (tmp_path / "notabag").mkdir()
    assert cli_main(["replay", str(tmp_path / "notabag"), "--out", str(tmp_path / "r")]) == 2
    assert "no metadata.yaml" in capsys.readouterr().err


# -- one short real replay through the installed node graph ------------------------------------


def _tiny_model(stem: Path) -> str:
    import torch

    from ttspec_ros import data
    from ttspec_ros.models import checkpoint
    from ttspec_ros.models.revcol import RevCol

    torch.manual_seed(0)
    model = RevCol(channels=(8, 16, 24, 32), layers=(1, 1, 1, 1), num_columns=4,
                   num_classes=10, in_chans=1, with_decoders=False).eval()
    with torch.no_grad():  # spread the heads' confidences so that exits differ
        for i in range(3):
            model.cls_blocks[i].classifier[1].weight.mul_(40.0 * (i + 1))
    card = checkpoint.ModelCard(
        model_id="tiny-replay-test", architecture=model.config.to_dict(),
        class_names=list(data.CLASS_NAMES),
        input={"channels": 1, "size": 32, "content_size": 28, "mean": [0.286], "std": [0.353]},
        thresholds=[0.9, 0.9, 0.9], exit_cost=EXIT_COST, training={"seed": 0}, metrics={})
    checkpoint.save_model(model, card, str(stem))
    return str(stem)


def test_real_replay_through_the_node_graph(tmp_path):
    pytest.importorskip("rclpy")
    pytest.importorskip("ttspec_ros.msg")
    for module in ("camera", "classifier", "adapter"):
        if not (Path(replay.__file__).parent / "nodes" / f"{module}.py").is_file():
            pytest.skip(f"node {module} not written yet")
    try:
        graph = replay.find_graph()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from ttspec_ros import bags

    frames = 30
    bag = bags.make_scenario_bag("tops-heavy", tmp_path / "bag", frames=frames, seed=0,
                                 storage="sqlite3")["bag"]
    graph = replay.GraphSpec(prefix=graph.prefix, params_file=graph.params_file,
                             model=_tiny_model(tmp_path / "tiny"))
    # One run keeps this under a minute on a busy 2-core machine (three processes import torch).
    settings = RunSettings(adapt=True, threshold=0.8, rate=None, timeout_s=10.0)
    err = io.StringIO()
    report, plots = replay.replay_bag(
        bag, tmp_path / "report", [settings], graph=graph,
        domain_id=int(os.environ.get("ROS_DOMAIN_ID", "0")), stream_out=err)
    (run,) = report["runs"]
    assert report["frames"] == frames and run["mode"] == "lockstep"
    # every played frame answered (lockstep waits for each), stamps preserved end to end
    assert run["predictions"] == frames and run["lost"] == 0, run["dropped"]
    labels = bags.open_image_stream(bag).labels
    outcomes = json.loads((tmp_path / "report" / "outcomes.json").read_text())[run["name"]]
    assert [o["stamp_ns"] for o in outcomes] == sorted(labels)
    assert all(o["label"] == labels[o["stamp_ns"]] and o["dropped"] is None for o in outcomes)
    assert sum(run["exit_histogram"]) == frames
    assert run["mean_latency_ms"] > 0 and run["mean_e2e_latency_ms"] >= run["mean_latency_ms"]
    # the run's settings reached the nodes: threshold override, adapter trained on samples
    assert run["thresholds_used"] == [0.8, 0.8, 0.8]
    counters = run["node_counters"]
    assert counters["adapter"]["enabled"] == "True"
    assert counters["adapter"].get("samples_received") == counters["classifier"].get(
        "samples_published") == str(frames - run["exit_histogram"][0])
    assert {p.name for p in plots} >= {"accuracy.png", "exit_cost.png", "latency.png"}
    assert "[1/1] adapt" in err.getvalue() and "30/30" in err.getvalue()
    assert all(code == 0 for code in run["node_exit_codes"].values())


def _installed_graph() -> replay.GraphSpec:
    """The installed node graph, or a skip naming what is missing."""
    pytest.importorskip("rclpy")
    pytest.importorskip("ttspec_ros.msg")
    try:
        return replay.find_graph()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_repeated_run_settings_are_refused_before_anything_runs(tmp_path):
    # --sweep-thresholds 0.5,0.50: two runs of one name shared a log directory and report entry
    twice = [RunSettings(adapt=True, threshold=0.5, rate=None)] * 2
    with pytest.raises(ValueError, match="repeat a setting"):
        replay.replay_bag(tmp_path / "no-bag", tmp_path / "out", twice)


def test_a_failed_run_leaves_a_report_of_the_finished_ones(tmp_path, monkeypatch):
    """A sweep or --compare whose second run failed lost the first one's figures, and an old
    report.md in --out stayed beside the new logs."""
    graph = _installed_graph()
    from ttspec_ros import bags
    from ttspec_ros.nodes import replay_driver

    bag = bags.make_scenario_bag("uniform", tmp_path / "bag", frames=6, seed=0,
                                 storage="sqlite3")["bag"]
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("a report of another replay")
    for old in ("accuracy.png", "threshold_curve.png"):  # plots this replay does not draw
        (out / old).write_bytes(b"an old plot")

    def play(stream, settings, graph, **kwargs):
        if not settings.adapt:
            raise replay_driver.GraphError("node classifier exited with code -9")
        result = _run(True, [0] * 6, [None] * 6, [1] * 6)
        result.settings = settings
        return result

    monkeypatch.setattr(replay_driver, "play", play)
    runs = [RunSettings(adapt=True, rate=None), RunSettings(adapt=False, rate=None)]
    with pytest.raises(replay_driver.GraphError):
        replay.replay_bag(bag, out, runs, graph=graph, domain_id=0, stream_out=io.StringIO())
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == [runs[0].name]
    assert "run no-adapt failed (GraphError: node classifier exited" in report["incomplete"]
    assert (out / "report.md").read_text().count("**Incomplete:**") == 1
    assert not (out / "accuracy.png").exists() and not (out / "threshold_curve.png").exists()
    assert set(report["plots"]) == {p.name for p in out.glob("*.png")}


def test_a_node_dying_mid_run_ends_a_rate_mode_replay_with_its_name(tmp_path):
    """Rate mode never looked at the nodes: after a classifier crash the rest of the bag was
    played into nothing and the replay reported lost frames, exit status 0."""
    import signal
    import subprocess

    graph = _installed_graph()
    from ttspec_ros import bags
    from ttspec_ros.nodes import replay_driver

    bag = bags.make_scenario_bag("uniform", tmp_path / "bag", frames=200, rate_hz=10.0,
                                 seed=0, storage="sqlite3")["bag"]
    graph = replay.GraphSpec(prefix=graph.prefix, params_file=graph.params_file,
                             model=_tiny_model(tmp_path / "tiny"))
    log_dir = tmp_path / "logs"

    def kill_classifier(sent: int, _: str) -> None:
        if sent == 5:  # the graph is up and answering: the classifier dies (SIGKILL)
            pids = subprocess.run(["pgrep", "-f", f"classifier_node .*{log_dir}"],
                                  capture_output=True, text=True).stdout.split()
            assert len(pids) == 1, pids
            os.kill(int(pids[0]), signal.SIGKILL)

    with pytest.raises(replay_driver.GraphError, match="node classifier exited with code -9"):
        replay_driver.play(bags.open_image_stream(bag), RunSettings(adapt=False, rate=1.0),
                           graph, domain_id=int(os.environ.get("ROS_DOMAIN_ID", "0")),
                           log_dir=log_dir, progress=kill_classifier)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
