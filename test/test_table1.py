"""eval-exits (Table 1) on a tiny random model: well-formed JSON and consistent figures."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ttspec_ros import data
from ttspec_ros.cascade import exit_costs
from ttspec_ros.experiments import table1
from ttspec_ros.models.checkpoint import ModelCard, save_model
from ttspec_ros.models.revcol import RevCol


@pytest.fixture
def tiny_model(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = RevCol((8, 8, 8, 8), (1, 1, 1, 1), 4, 10, in_chans=1)
    card = ModelCard(
        model_id="", architecture=model.config.to_dict(), class_names=list(data.CLASS_NAMES),
        input={"channels": 1, "size": 32, "content_size": 28, "mean": [0.286], "std": [0.353]},
        thresholds=[0.9, 0.9, 0.9], exit_cost=exit_costs(model, 32),
    )
    stem = tmp_path / "tiny"
    save_model(model, card, stem)
    return stem


def test_eval_exits_writes_table1(tiny_model, tmp_path):
    parser = argparse.ArgumentParser()
    table1.add_arguments(parser)
    out = tmp_path / "t1"
    args = parser.parse_args(["--out", str(out), "--model", str(tiny_model), "--test-limit", "200",
                              "--latency-images", "3", "--warmup", "1"])
    assert table1.run(args) == 0
    result = json.loads((out / "table1.json").read_text())
    assert "| threshold 0.9 |" in (out / "table1.md").read_text()
    assert [r["exit"] for r in result["fixed_exits"]] == [0, 1, 2, 3]
    assert [r["threshold"] for r in result["thresholds"]] == [0.5, 0.6, 0.7, 0.8, 0.9]
    for row in result["fixed_exits"] + result["thresholds"]:
        assert {"latency_ms", "latency_std_ms", "accuracy"} <= set(row)
        assert row["latency_ms"] > 0 and 0 <= row["accuracy"] <= 1
    for row in result["thresholds"]:
        assert 0 <= row["mean_exit"] <= 3 and sum(row["exit_histogram"]) == 200
    # the oracle is at least as right as any exit (the baseline's accuracy is the last exit's
    # by construction: forward_last is the last exit, test_revcol checks it)
    assert result["oracle"]["accuracy"] >= max(r["accuracy"] for r in result["fixed_exits"])
    assert {"latency_ms", "accuracy"} <= set(result["baseline"])
    assert result["test_images"] == 200 and result["latency_images"] == 3


def test_threshold_rule_matches_the_cascade_frame_by_frame(tiny_model):
    from ttspec_ros.cascade import Cascade
    from ttspec_ros.models.checkpoint import load_model
    from ttspec_ros.preprocess import preprocess_batch

    model, card = load_model(str(tiny_model))
    images, labels = data.load_fashion_mnist("test")
    x = torch.from_numpy(preprocess_batch(images[:30], card.input))
    y = torch.from_numpy(labels[:30].copy())
    # Thresholds around this random model's confidences, so every exit answers sometimes.
    with torch.inference_mode():
        conf = torch.stack(model.forward_exits(x)).softmax(-1).amax(-1)
    quantiles = conf[:3].flatten().quantile(torch.tensor([0.3, 0.5, 0.7])).tolist()
    table1_thresholds = table1.THRESHOLDS
    try:
        table1.THRESHOLDS = tuple(quantiles)
        acc = table1.accuracy_table(model, x, y, card.exit_cost)
    finally:
        table1.THRESHOLDS = table1_thresholds
    assert any(0 < sum(r["exit_histogram"][:3]) < 30 for r in acc["thresholds"])
    cascade = Cascade(model, 0.9)
    for row in acc["thresholds"]:
        frames = [cascade.run(img, thresholds=row["threshold"]) for img in x]
        mean_exit = sum(f.exit_index for f in frames) / len(frames)
        accuracy = sum(int(f.class_id == int(t)) for f, t in zip(frames, y, strict=True)) / 30
        assert row["mean_exit"] == pytest.approx(mean_exit)
        assert row["accuracy"] == pytest.approx(accuracy)


def test_bad_arguments_are_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="latency-images"):
        table1.evaluate(str(tiny_model), 1, 0, 1, 10, 0)


def test_oracle_is_the_earliest_correct_exit_else_the_last(tiny_model):
    from ttspec_ros.models.checkpoint import load_model
    from ttspec_ros.preprocess import preprocess_batch

    model, card = load_model(str(tiny_model))
    images, labels = data.load_fashion_mnist("test")
    x = torch.from_numpy(preprocess_batch(images[:200], card.input))
    y = torch.from_numpy(labels[:200].copy())
    acc = table1.accuracy_table(model, x, y, card.exit_cost)
    with torch.inference_mode():
        preds = [lg.argmax(1).tolist() for lg in model.forward_exits(x)]
    exits = [next((i for i, p in enumerate(preds) if p[n] == int(y[n])), len(preds) - 1)
             for n in range(len(y))]
    right = [any(p[n] == int(y[n]) for p in preds) for n in range(len(y))]
    assert acc["oracle"]["mean_exit"] == pytest.approx(sum(exits) / len(exits))
    assert acc["oracle"]["accuracy"] == pytest.approx(sum(right) / len(right))
    assert acc["oracle"]["relative_cost"] == pytest.approx(
        sum(card.exit_cost[e] for e in exits) / len(exits))
    assert 0 < sum(right) < len(right) and len(set(exits)) > 1  # the test means something


def test_commands_refuse_bad_options_with_one_line(tiny_model, tmp_path, capsys):
    from ttspec_ros.cli import main

    assert main(["eval-exits", "--out", str(tmp_path), "--model", str(tiny_model),
                 "--latency-images", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ttspec eval-exits: need --latency-images >= 2") and err.count("\n") == 1
    assert main(["eval-exits", "--out", str(tmp_path), "--model", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("ttspec eval-exits: ")
    assert main(["bench-exits", "--size", "30", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ttspec bench-exits: need repeats >= 2") and err.count("\n") == 1
    assert not (tmp_path / "table1.json").exists() and not (tmp_path / "bench_exits.json").exists()
