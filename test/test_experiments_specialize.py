"""Specialization experiments: the precomputed-feature rule equals the cascade, curve maths,
and the three commands on tiny settings write well-formed JSON."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch

from ttspec_ros.experiments.exit_curves import (
    THRESHOLDS,
    ExitFeatures,
    answers,
    curve,
    empty_groups,
    iso_accuracy_cost_ratio,
    simulate_stream,
)
from ttspec_ros.models.revcol import RevCol
from ttspec_ros.specialize import Specializer, StackedHeads, early_head_tensors

TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 1, 1), num_columns=4, num_classes=10,
            in_chans=1, with_decoders=False)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> RevCol:
    torch.manual_seed(seed)
    model = RevCol(**TINY).eval()
    with torch.no_grad():  # spread the heads' confidences so that exits differ
        for i in range(3):
            model.cls_blocks[i].classifier[1].weight.mul_(40.0 * (i + 1))
    return model


def test_thresholds_are_the_issue_grid() -> None:
    assert len(THRESHOLDS) == 50 and THRESHOLDS[0] == 0.5 and THRESHOLDS[-1] == 0.99


def test_precomputed_rule_matches_the_cascade() -> None:
    from ttspec_ros import cascade as cascade_mod

    model = tiny_model()
    x = torch.randn(40, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    data = ExitFeatures.compute(model, x, batch_size=16)
    heads = StackedHeads.from_tensors(early_head_tensors(model), 3)
    for t in (0.3, 0.6):
        exit_index, pred = answers(heads, data, t)
        cascade = cascade_mod.Cascade(model, [t] * 3, num_threads=1)
        runs = [cascade.run(img) for img in x]
        assert [r.exit_index for r in runs] == exit_index.tolist()
        assert [r.class_id for r in runs] == pred.tolist()
    assert len(set(exit_index.tolist())) > 1, "exits must differ for this test to mean much"


def test_curve_rows_and_monotone_cost() -> None:
    model = tiny_model()
    x = torch.randn(60, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    data = ExitFeatures.compute(model, x)
    heads = StackedHeads.from_tensors(early_head_tensors(model), 3)
    labels = data.last_pred.numpy().copy()
    labels[:10] = (labels[:10] + 1) % 10  # the last exit is wrong on 10 images
    groups = {"subset": np.arange(60) < 30, "others": np.arange(60) >= 30}
    c = curve(heads, data, labels, groups, [0.25, 0.5, 0.75, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert set(c) == {"subset", "others"}
    for rows in c.values():
        assert [r["threshold"] for r in rows] == list(THRESHOLDS)
        assert set(rows[0]) == {"threshold", "latency_ms", "accuracy", "mean_exit", "mean_cost"}
        costs = [r["mean_cost"] for r in rows]
        assert costs == sorted(costs)  # a higher threshold never exits earlier
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.25 <= r["mean_cost"] <= 1.0
            assert r["latency_ms"] == pytest.approx(4.0 * r["mean_cost"], abs=1e-3)
    # above 1 nothing exits early: accuracy is the last exit's
    top = curve(heads, data, labels, groups, [0.25, 0.5, 0.75, 1.0], None, thresholds=[1.01])
    assert top["subset"][0]["accuracy"] == pytest.approx(20 / 30, abs=1e-6)
    assert top["others"][0]["mean_cost"] == 1.0


def test_curve_refuses_an_empty_group() -> None:
    # the mean over no image was NaN in every row of that group, written into the JSON
    model = tiny_model()
    data = ExitFeatures.compute(model, torch.randn(6, 1, 32, 32))
    heads = StackedHeads.from_tensors(early_head_tensors(model), 3)
    groups = {"subset": np.zeros(6, bool), "others": np.ones(6, bool)}
    assert empty_groups(groups) == ["subset"]
    with pytest.raises(ValueError, match=r"\['subset'\] hold no image"):
        curve(heads, data, np.zeros(6, int), groups, [0.25, 0.5, 0.75, 1.0], None)


def test_iso_accuracy_cost_ratio() -> None:
    before = [{"threshold": 0.8, "accuracy": 0.90, "mean_cost": 0.6},
              {"threshold": 0.9, "accuracy": 0.92, "mean_cost": 0.8}]
    after = [{"threshold": 0.8, "accuracy": 0.9195, "mean_cost": 0.5},
             {"threshold": 0.9, "accuracy": 0.93, "mean_cost": 0.7}]
    assert iso_accuracy_cost_ratio(before, after, 0.9) == pytest.approx(0.5 / 0.8)
    assert iso_accuracy_cost_ratio(before, before, 0.9) == pytest.approx(1.0)
    worse = [{"threshold": 0.9, "accuracy": 0.5, "mean_cost": 0.1}]
    assert iso_accuracy_cost_ratio(before, worse, 0.9) is None


def test_simulated_stream_feeds_every_frame() -> None:
    model = tiny_model()
    x = torch.randn(30, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    data = ExitFeatures.compute(model, x)
    spec = Specializer(early_head_tensors(model), 4, lr=0.05)
    seen = []
    simulate_stream(spec, data, list(range(30)) * 2, 0.6, seen.append)
    stats = spec.stats()
    assert seen == list(range(1, 61)) and stats["samples"] == 60
    assert stats["steps"] + stats["skipped_first_exit"] == 60


def test_simulated_stream_learns_the_last_partial_batch_before_the_last_frame_report() -> None:
    """Batches of 4: the frames after the last full batch are learned at the stream's end
    (flush), and the last on_frame already sees those heads (experiments evaluate there)."""
    model = tiny_model()
    x = torch.randn(30, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    data = ExitFeatures.compute(model, x)
    spec = Specializer(early_head_tensors(model), 4, lr=0.05, batch_size=4)
    seen: dict[int, dict] = {}

    def on_frame(n: int) -> None:
        seen[n] = {**spec.stats(), "heads": spec.heads().to_tensors()}

    simulate_stream(spec, data, list(range(30)), 0.6, on_frame)
    learned = seen[30]["samples"] - seen[30]["skipped_first_exit"]
    assert learned % 4, "a partial batch must be left for this test to mean much"
    assert seen[30]["pending"] == 0 and seen[30]["steps"] == -(-learned // 4)
    before_end = seen[29]
    assert before_end["steps"] == learned // 4
    assert any(not np.array_equal(seen[30]["heads"][k], v)
               for k, v in before_end["heads"].items())
    assert spec.export().version == seen[30]["version"] == seen[30]["steps"]


# -- the commands, on a tiny checkpoint ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from ttspec_ros.models import checkpoint

    return _save_tiny(checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny")


def _save_tiny(checkpoint, stem):
    from ttspec_ros import data

    model = tiny_model()
    card = checkpoint.ModelCard(
        model_id="tiny-test", architecture=model.config.to_dict(),
        class_names=list(data.CLASS_NAMES),
        input={"channels": 1, "size": 32, "content_size": 28, "mean": [0.286], "std": [0.353]},
        thresholds=[0.9, 0.9, 0.9], exit_cost=[0.25, 0.5, 0.75, 1.0],
        training={"seed": 0, "splits": {"seed": 0}}, metrics={},
    )
    checkpoint.save_model(model, card, str(stem))
    return str(stem)


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_specialize_experiment_writes_figure4(tiny_checkpoint, tmp_path) -> None:
    from ttspec_ros.experiments import specialize_experiment as mod

    args = _args(mod, ["--subset", "bags", "--out", str(tmp_path), "--model", tiny_checkpoint,
                       "--preset", "tuned", "--per-class", "4", "--latency-frames", "2",
                       "--test-limit", "300", "--threads", "1", "--anchors-per-class", "3"])
    assert mod.run(args) == 0
    result = json.loads((tmp_path / "figure4.json").read_text())
    assert list(result) == ["subset", "classes", "seed", "settings", "before", "after",
                            "fixed_threshold", "per_threshold", "iso_accuracy",
                            "last_exit_unchanged"]
    assert result["classes"] == [8] and result["seed"] == 0
    for state in ("before", "after"):
        assert set(result[state]) == {"subset", "others"}
        assert len(result[state]["subset"]) == 50
    assert set(result["fixed_threshold"]) == {
        "threshold", "subset_cost_ratio", "subset_accuracy_delta", "others_cost_ratio",
        "others_accuracy_delta"}
    per = result["per_threshold"]
    assert [r["threshold"] for r in per] == [r["threshold"] for r in result["before"]["subset"]]
    at_fixed = next(r for r in per if r["threshold"] == result["fixed_threshold"]["threshold"])
    assert at_fixed == result["fixed_threshold"]
    b, a = result["before"]["others"][0], result["after"]["others"][0]
    assert per[0]["others_cost_ratio"] == round(a["mean_cost"] / b["mean_cost"], 6)
    assert set(result["iso_accuracy"]) == {
        "subset_cost_ratio", "control_subset_cost_ratio", "others_cost_ratio",
        "control_others_cost_ratio"}
    assert result["last_exit_unchanged"] is True
    assert result["settings"]["stream_size"] == 4
    assert result["settings"]["specializer_stats"]["samples"] == 4 * 3  # 3 passes
    guard = result["settings"]["guard_settings"]
    assert guard["anchors_per_class"] == 3 and 0 < guard["anchors"] <= 3 * 10
    assert guard["check_every"] == 10 and guard["class_tolerance"] == 0.10
    assert (tmp_path / "figure4.png").stat().st_size > 1000


def test_specialize_experiment_learns_from_a_last_partial_batch(tiny_checkpoint, tmp_path
                                                              ) -> None:
    """4 stream images and batches of 5: the one partial batch is learned at the stream's end
    (as the adapter does at shutdown), not left pending, and the 'after' heads include it."""
    from ttspec_ros.experiments import specialize_experiment as mod

    args = _args(mod, ["--subset", "bags", "--out", str(tmp_path), "--model", tiny_checkpoint,
                       "--batch-size", "5", "--per-class", "4", "--latency-frames", "2",
                       "--test-limit", "100", "--threads", "1", "--min-confidence", "0",
                       "--threshold", "0.99"])  # so that frames reach later exits
    assert mod.run(args) == 0
    settings = json.loads((tmp_path / "figure4.json").read_text())["settings"]
    stats = settings["specializer_stats"]
    assert stats["samples"] == 4 and stats["samples"] - stats["skipped_first_exit"] > 0
    assert stats["pending"] == 0 and stats["steps"] == 1
    assert settings["final_version"] == 1


def test_specialize_experiment_can_evaluate_on_unused_pool_images(tiny_checkpoint, tmp_path
                                                                 ) -> None:
    from ttspec_ros import data
    from ttspec_ros.experiments import specialize_experiment as mod

    args = _args(mod, ["--subset", "bags", "--out", str(tmp_path), "--model", tiny_checkpoint,
                       "--preset", "tuned", "--per-class", "4", "--latency-frames", "2",
                       "--threads", "1", "--anchors-per-class", "3", "--evaluate-on", "pool"])
    assert mod.run(args) == 0
    settings = json.loads((tmp_path / "figure4.json").read_text())["settings"]
    assert settings["evaluated_on"] == "pool"
    # the whole pool minus the 4 streamed images and the 2 x 3 x 10 anchor candidates
    assert settings["test_images"] == data.DEFAULT_POOL_SIZE - 4 - 60


def test_forgetting_experiment_writes_json(tiny_checkpoint, tmp_path) -> None:
    from ttspec_ros.experiments import forgetting_experiment as mod

    args = _args(mod, ["--out", str(tmp_path), "--model", tiny_checkpoint, "--subset-frames",
                       "30", "--mixed-frames", "20", "--eval-every", "25", "--test-limit", "200",
                       "--threads", "1", "--anchors-per-class", "3"])
    assert mod.run(args) == 0
    result = json.loads((tmp_path / "forgetting.json").read_text())
    assert set(result["runs"]) == {"no_guard", "guard"}
    for r in result["runs"].values():
        assert r["frames"] == [0, 25, 50]
        assert len(r["others_accuracy"]) == 3 and r["stats"]["samples"] == 50
    assert isinstance(result["target"]["met_with_guard"], bool)
    guard = result["runs"]["guard"]["guard_settings"]
    assert guard["anchors_per_class"] == 3 and 0 < guard["anchors"] <= 3 * 10
    assert guard["check_every"] == 10 and "guard_settings" not in result["runs"]["no_guard"]
    assert (tmp_path / "forgetting.png").stat().st_size > 1000


def test_forgetting_experiment_learns_the_last_partial_batch(tiny_checkpoint, tmp_path) -> None:
    """13 frames in batches of 8: the last 5 used to stay pending, left out of the last trace
    point and ``final``; the stream's end is flushed, so every learned frame is in them."""
    from ttspec_ros.experiments import forgetting_experiment as mod

    args = _args(mod, ["--out", str(tmp_path), "--model", tiny_checkpoint, "--subset-frames",
                       "13", "--mixed-frames", "0", "--eval-every", "5", "--batch-size", "8",
                       "--test-limit", "200", "--threads", "1", "--anchors-per-class", "3",
                       "--min-confidence", "0", "--threshold", "0.99"])  # frames reach exit > 0
    assert mod.run(args) == 0
    result = json.loads((tmp_path / "forgetting.json").read_text())
    for name, r in result["runs"].items():
        stats = r["stats"]
        learned = stats["samples"] - stats["skipped_first_exit"] - stats["skipped_low_confidence"]
        assert r["frames"] == [0, 5, 10, 13] and stats["pending"] == 0, name
        assert learned % 8 and stats["steps"] + stats["overflows"] == -(-learned // 8), name
    no_guard = result["runs"]["no_guard"]
    assert no_guard["stats"]["version"] == no_guard["stats"]["steps"] >= 1  # published
    assert result["final"]["no_guard"]["others_accuracy_delta"] == round(
        no_guard["others_accuracy"][-1] - result["before"]["others"]["accuracy"], 6)


def test_bench_update_writes_json(tiny_checkpoint, tmp_path) -> None:
    from ttspec_ros.experiments import bench_update as mod

    args = _args(mod, ["--out", str(tmp_path), "--models", "demo", "--demo-model",
                       tiny_checkpoint, "--repeats", "3", "--warmup", "1", "--threads", "1",
                       "--anchors-per-class", "2", "--seed", "3"])
    assert mod.run(args) == 0
    result = json.loads((tmp_path / "bench_update.json").read_text())
    # the settings the times depend on (anchors per class: 0.50 -> 2.26 ms guarded, unrecorded)
    assert {k: result[k] for k in ("threads", "repeats", "warmup", "anchors_per_class", "seed",
                                   "demo_model")} == {
        "threads": 1, "repeats": 3, "warmup": 1, "anchors_per_class": 2, "seed": 3,
        "demo_model": tiny_checkpoint}
    demo = result["models"]["demo"]
    assert demo["guard"]["anchors"] == 2 * 10 and demo["guard"]["anchors_per_class"] == 2
    assert demo["guard"]["check_every"] == 10 and demo["guard"]["rehearsal"] == 2
    assert set(demo["median_ms"]) == {"inference", "update_step", "update_step_guarded",
                                      "export", "apply_update"}
    assert demo["update_over_inference"] > 0 and demo["early_heads"] == 3


def test_make_anchors_writes_a_loadable_set(tiny_checkpoint, tmp_path) -> None:
    from ttspec_ros.experiments import make_anchors as mod
    from ttspec_ros.guard import AnchorSet

    images = np.random.default_rng(0).integers(0, 255, (40, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", images)
    out = tmp_path / "anchors.safetensors"
    args = _args(mod, ["--out", str(out), "--model", tiny_checkpoint, "--images",
                       str(tmp_path / "frames.npy"), "--per-class", "2"])
    assert mod.run(args) == 0
    anchors = AnchorSet.load(out)
    assert len(anchors.features) == 3 and anchors.features[0].shape[1] == 32
    assert np.bincount(anchors.labels).max() <= 2


def test_make_anchors_from_a_bag_of_camera_frames(tiny_checkpoint, tmp_path, capsys) -> None:
    """A robot's recorded camera bag (224-px rgb8 frames) is a source too; a missing bag is
    one clear line and exit 2."""
    from ttspec_ros import bags
    from ttspec_ros.experiments import make_anchors as mod
    from ttspec_ros.guard import AnchorSet

    bag = bags.make_scenario_bag("uniform", tmp_path / "bag", frames=30, seed=1)["bag"]
    out = tmp_path / "anchors.safetensors"
    args = _args(mod, ["--out", str(out), "--model", tiny_checkpoint, "--bag", str(bag),
                       "--candidates", "20"])
    assert mod.run(args) == 0
    assert "topic /camera/image_raw" in json.loads(capsys.readouterr().out)["source"]
    anchors = AnchorSet.load(out)
    assert anchors.labels.size == 20 and len(anchors.features) == 3
    args = _args(mod, ["--out", str(out), "--model", tiny_checkpoint, "--bag",
                       str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="missing does not exist"):  # one line via cli.main
        mod.run(args)


def test_pool_is_the_cards_recorded_split(tiny_checkpoint) -> None:
    """The pool follows the card's recorded size and hash: with the default size a model
    trained on another pool would be streamed images it was trained on."""
    from types import SimpleNamespace

    from ttspec_ros import data
    from ttspec_ros.experiments.specialize_experiment import pool_images

    split = data.splits(0, 5000)
    card = SimpleNamespace(training={"seed": 0, "splits": data.splits_card(0, 5000)})
    pool, images, labels = pool_images(card)
    assert np.array_equal(pool, split.pool) and images.shape == (5000, 28, 28)
    assert np.intersect1d(pool, split.train).size == 0
    wrong = SimpleNamespace(training={"splits": {"seed": 0, "pool": {
        "size": 6000, "sha256": data.index_hash(split.pool)}}})
    with pytest.raises(ValueError, match="deployment pool"):
        pool_images(wrong)


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "0.905"], "not on the reported grid"),
    (["--latency-frames", "0"], "--latency-frames must be >= 1"),
    (["--test-limit", "-3"], "--test-limit must be >= 0"),
    (["--per-class", "601"], "exceeds the 600 deployment-pool images"),
    # the anchor candidates took every pool image the stream left: a LayerNorm RuntimeError
    (["--evaluate-on", "pool", "--anchors-per-class", "300"],
     "--evaluate-on pool has no image left: the 100 streamed images and the 5900 anchor "
     "candidates (2 x --anchors-per-class 300"),
    # the first test image is no bag: the subset's 50 curve rows were NaN in figure4.json
    (["--test-limit", "1"], "--test-limit 1 keeps 1 test images: none of the bags classes; "
                            "raise --test-limit"),
])
def test_specialize_experiment_refuses_bad_options_up_front(tiny_checkpoint, tmp_path, extra,
                                                            message) -> None:
    from ttspec_ros.experiments import specialize_experiment as mod

    args = _args(mod, ["--subset", "bags", "--out", str(tmp_path / "o"), "--model",
                       tiny_checkpoint, *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        mod.run(args)
    assert not (tmp_path / "o" / "figure4.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--threshold", "1.5"], "--threshold must be in"),
    (["--subset-frames", "-1"], "--subset-frames must be >= 0"),
    (["--anchors-per-class", "600"], "nothing is left to stream"),
    # the first test image is no bag: the subset's accuracy and cost were NaN in the JSON
    (["--test-limit", "1"], "--test-limit 1 keeps 1 test image(s): none of the bags classes"),
])
def test_forgetting_experiment_refuses_bad_options(tiny_checkpoint, tmp_path, extra, message
                                                   ) -> None:
    from ttspec_ros.experiments import forgetting_experiment as mod

    args = _args(mod, ["--out", str(tmp_path), "--model", tiny_checkpoint, "--test-limit", "20",
                       *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        mod.run(args)
    assert not (tmp_path / "forgetting.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    # ran the model twice, the second run overwriting the first
    (["--models", "demo,demo"], "--models names ['demo'] more than once"),
])
def test_bench_update_refuses_bad_options(tiny_checkpoint, tmp_path, extra, message) -> None:
    from ttspec_ros.experiments import bench_update as mod

    args = _args(mod, ["--out", str(tmp_path / "o"), "--models", "demo", "--demo-model",
                       tiny_checkpoint, "--repeats", "1", "--warmup", "0", *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        mod.run(args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--candidates", "--per-class"])
def test_make_anchors_refuses_non_positive_counts(tiny_checkpoint, tmp_path, capsys, option
                                                  ) -> None:
    from ttspec_ros.experiments import make_anchors as mod

    out = tmp_path / "anchors.safetensors"
    args = _args(mod, ["--out", str(out), "--model", tiny_checkpoint, option, "-5"])
    with pytest.raises(ValueError, match=f"{option} must be >= 1"):
        mod.run(args)
    assert not out.exists()


@pytest.mark.parametrize("images", [False, True])
def test_make_anchors_refuses_a_bag_option_without_a_bag(tiny_checkpoint, tmp_path, images
                                                         ) -> None:
    # --image-topic was ignored: anchors from the pool (or the .npy), exit 0
    from ttspec_ros.experiments import make_anchors as mod

    np.save(tmp_path / "frames.npy", np.zeros((5, 28, 28), np.uint8))
    source = ["--images", str(tmp_path / "frames.npy")] if images else []
    out = tmp_path / "anchors.safetensors"
    args = _args(mod, ["--out", str(out), "--model", tiny_checkpoint, "--candidates", "5",
                       "--image-topic", "/no/such/topic", *source])
    with pytest.raises(ValueError, match="--image-topic needs --bag"):
        mod.run(args)
    assert not out.exists()


def _without_timing(obj):
    """The experiment JSON minus wall-clock fields (the only ones a seed does not fix)."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items()
                if k not in ("runtime_s", "latency_ms", "exit_latency_ms")}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def test_same_seed_same_results(tiny_checkpoint, tmp_path) -> None:
    from ttspec_ros.experiments import forgetting_experiment, specialize_experiment

    runs = {}
    for mod, name, argv in (
        (specialize_experiment, "figure4.json",
         ["--subset", "tops", "--preset", "tuned", "--per-class", "3", "--latency-frames", "1",
          "--test-limit", "100", "--anchors-per-class", "2", "--seed", "5"]),
        (forgetting_experiment, "forgetting.json",
         ["--subset-frames", "20", "--mixed-frames", "10", "--eval-every", "10",
          "--test-limit", "100", "--anchors-per-class", "2", "--seed", "5"]),
    ):
        for k in range(2):
            out = tmp_path / f"{name}.{k}"
            assert mod.run(_args(mod, ["--out", str(out), "--model", tiny_checkpoint, *argv])) == 0
            runs.setdefault(name, []).append(json.loads((out / name).read_text()))
    for first, second in runs.values():
        assert first["seed"] == 5
        assert _without_timing(first) == _without_timing(second)
