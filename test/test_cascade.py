"""Cascade executor: exit rule, forced/max exits, outputs equal the whole-model forwards,
validated atomic updates (also under concurrent frames), other backbones, compute shares."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from ttspec_ros.cascade import (
    Cascade,
    NonFiniteOutput,
    TorchBackbone,
    exit_costs,
    reaches_threshold,
)
from ttspec_ros.guard import cascade_answers
from ttspec_ros.models.revcol import RevCol

torch.set_num_threads(1)

TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1), num_columns=4, num_classes=5)


def make_model(seed: int = 0, **kwargs) -> RevCol:
    torch.manual_seed(seed)
    model = RevCol(**{**TINY, **kwargs}).eval()
    with torch.no_grad():  # larger head weights: confidences spread over (0, 1)
        for block in model.cls_blocks:
            block.classifier[1].weight.mul_(100)
    return model


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


class WrappedBackbone:
    """Another backend: same numbers as torch, but not the torch backbone itself."""

    def __init__(self, model: RevCol) -> None:
        self.inner = TorchBackbone(model)
        self.num_exits = model.num_exits

    def run_stage(self, i, carry):
        return self.inner.run_stage(i, carry)


def test_forced_exits_equal_whole_model_forwards():
    model = make_model()
    cascade = Cascade(model, 0.5)
    x = image()
    with torch.inference_mode():
        exits = model.forward_exits(x[None])
        with_recon, _ = model.forward_with_reconstruction(x[None])
    for i in range(4):
        result = cascade.run(x, force_exit=i)
        assert result.exit_index == i
        assert torch.equal(result.logits, exits[i][0])
        assert torch.equal(result.logits, with_recon[i][0])
        probs = torch.softmax(exits[i][0], 0)
        assert result.class_id == int(probs.argmax())
        assert result.confidence == pytest.approx(float(probs.max()))
        assert len(result.exit_confidences) == len(result.features) == i + 1
        assert [f.shape for f in result.features] == [(32,)] * (i + 1)
    last = cascade.run(x, force_exit=3)
    for i in range(4):  # every evaluated exit's confidence, not only the answering one
        assert last.exit_confidences[i] == pytest.approx(float(exits[i][0].softmax(0).max()))


def test_first_exit_reaching_its_threshold_answers():
    cascade = Cascade(make_model(), [1.0, 1.0, 1.0])
    x = image()
    conf = cascade.run(x, force_exit=3).exit_confidences
    assert 0.2 < min(conf) and max(conf) < 1.0  # the rule below is exercised, not trivial
    assert cascade.run(x).exit_index == 3  # nothing reaches 1.0: the last exit answers
    assert cascade.run(x, thresholds=[0.0, 0.0, 0.0]).exit_index == 0
    r = cascade.run(x, thresholds=[conf[0] + 1e-6, conf[1], 1.0])  # >= reaches
    assert (r.exit_index, r.confidence) == (1, conf[1])
    assert r.exit_confidences == conf[:2] and len(r.features) == 2
    r = cascade.run(x, thresholds=[conf[0] + 1e-6, conf[1] + 1e-6, conf[2]])
    assert r.exit_index == 2
    r = cascade.run(x, max_exit=1)  # thresholds 1.0: answers at max_exit anyway
    assert r.exit_index == 1 and r.exit_confidences == conf[:2]
    assert cascade.run(x, thresholds=0.0, force_exit=2).exit_index == 2  # force ignores them


def test_threshold_one_never_answers_even_on_a_saturated_softmax():
    model = make_model()
    with torch.no_grad():  # exit 0's softmax rounds to exactly 1.0 in float32
        model.cls_blocks[0].classifier[1].bias[2] = 1e3
    cascade = Cascade(model, 1.0)
    x = image()
    assert cascade.run(x, force_exit=0).exit_confidences == [1.0]
    assert cascade.run(x).exit_index == 3
    assert cascade.run(x, thresholds=[0.999, 1.0, 1.0]).exit_index == 0


@pytest.mark.parametrize("value, threshold, expected", [
    (np.float32(0.9), 0.9, False),  # 0.89999998: below 0.9, though float32(0.9) equals it
    (np.nextafter(np.float32(0.9), np.float32(1)), 0.9, True),
    (np.float32(0.5), 0.5, True),  # exactly the threshold reaches it
    (np.float32(1.0), 1.0, False),  # 1.0 means never
])
def test_threshold_precision_is_the_same_for_floats_arrays_and_tensors(value, threshold,
                                                                       expected):
    """torch and numpy rounded a Python-float threshold to float32: float32(0.9) exited in
    the batched curves and the guard but not in Cascade.run (Python floats)."""
    inputs = (float(value), value, np.array([value]), torch.tensor([float(value)]),
              torch.tensor(float(value)))
    assert [bool(reaches_threshold(c, threshold)) for c in inputs] == [expected] * 5


def test_batched_rule_and_cascade_agree_on_a_threshold_float32_cannot_hold():
    model = make_model()
    cascade = Cascade(model, 1.0)
    x = image()
    result = cascade.run(x, force_exit=0)
    c = result.exit_confidences[0]
    t = c + float(np.spacing(np.float32(c))) / 4  # above c, but float32(t) == c
    assert t > c and np.float32(t) == np.float32(c)
    assert cascade.run(x, thresholds=[t, 1.0, 1.0]).exit_index > 0
    probs = torch.softmax(result.logits, dim=0)[None]  # what the cascade compared
    exit_index, _ = cascade_answers([probs], torch.zeros(1, dtype=torch.long), [t])
    assert exit_index.tolist() == [1]  # the last exit of this one-head rule, not head 0


def test_non_finite_logits_give_no_answer():
    model = make_model()
    cascade = Cascade(model, 0.0)
    with torch.no_grad():  # as an overflowing fp16 engine would (updates refuse this)
        model.cls_blocks[1].classifier[1].weight[0, 0] = float("inf")
    assert cascade.run(image()).exit_index == 0  # exit 0 answers before the bad exit
    with pytest.raises(NonFiniteOutput, match="exit 1"):
        cascade.run(image(), force_exit=1)


def test_features_are_the_pooled_head_inputs_and_usable_for_training():
    model = make_model()
    result = Cascade(model, 1.0).run(image(), force_exit=3)
    for i, feature in enumerate(result.features):
        assert torch.equal(model.head(i, feature[None]).detach()[0],
                           Cascade(model, 1.0).run(image(), force_exit=i).logits)
    head = torch.nn.Linear(32, 5)
    head(torch.stack(result.features)).sum().backward()  # not inference tensors
    assert head.weight.grad is not None


def test_bad_arguments_are_refused():
    model = make_model()
    for bad in ([0.5, 0.5], [0.5, 0.5, 1.5], [0.5, float("nan"), 0.5], -0.1):
        with pytest.raises(ValueError, match="threshold"):
            Cascade(model, bad)
    cascade = Cascade(model, 0.5)
    with pytest.raises(ValueError, match="force_exit must be in 0..3"):
        cascade.run(image(), force_exit=4)
    with pytest.raises(ValueError, match="max_exit"):
        cascade.run(image(), max_exit=-1)
    with pytest.raises(ValueError, match="not both"):
        cascade.run(image(), max_exit=1, force_exit=2)
    with pytest.raises(ValueError, match="1 channels, the model takes 3"):
        cascade.run(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        cascade.run(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        cascade.run(torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_apply_update_validates_everything_before_changing_anything():
    model = make_model()
    cascade = Cascade(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"cls_blocks.0.classifier.1.bias": np.ones(5, np.float32)}
    cases = [
        ({**good, "cls_blocks.9.classifier.1.bias": np.ones(5)}, "unknown tensor"),
        ({**good, "cls_blocks.1.classifier.1.weight": np.ones((5, 31))}, r"shape \(5, 31\)"),
        ({**good, "stem.1.bias": np.full(8, np.nan)}, "'stem.1.bias' has non-finite"),
        ({**good, "stem.1.bias": np.full(8, np.inf)}, "non-finite"),
        ({**good, "stem.1.bias": np.full(8, -1e30)}, r"beyond \+-1e\+06"),  # finite, diverged
    ]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            cascade.apply_update(tensors, version=1)
    with pytest.raises(ValueError, match="version"):
        cascade.apply_update(good, version=-1)
    assert cascade.version == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    x = image()
    old = cascade.run(x, force_exit=0).logits
    cascade.apply_update(good, version=7)
    assert cascade.version == 7
    assert torch.equal(model.cls_blocks[0].classifier[1].bias, torch.ones(5))
    result = cascade.run(x, force_exit=0)
    assert result.model_version == 7
    assert torch.allclose(result.logits, old - before["cls_blocks.0.classifier.1.bias"] + 1)


def test_an_update_leaving_out_tensors_an_earlier_one_changed_puts_them_back():
    """Each update is the adapter's whole state: after a backbone update (test-time
    training), a heads-only update (an adapter restarted as specialize, or its reset) must not
    leave the adapted backbone in place."""
    model = make_model()
    cascade = Cascade(model, 0.5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    head = {"cls_blocks.0.classifier.1.bias": np.ones(5, np.float32)}
    backbone = {"stem.1.bias": np.full(8, 0.5, np.float32)}
    x = image()
    assert cascade.apply_update({**head, **backbone}, version=1) == []
    adapted = cascade.run(x, force_exit=0).logits
    assert cascade.apply_update(head, version=2) == ["stem.1.bias"]
    assert torch.equal(model.stem[1].bias, original["stem.1.bias"])
    assert torch.equal(model.cls_blocks[0].classifier[1].bias, torch.ones(5))
    expected = make_model()  # the same seed: the model's own values, then the head update
    expected.load_state_dict({**original, "cls_blocks.0.classifier.1.bias": torch.ones(5)})
    result = cascade.run(x, force_exit=0).logits
    assert torch.equal(result, Cascade(expected, 0.5).run(x, force_exit=0).logits)
    assert not torch.equal(result, adapted)
    assert cascade.apply_update({}, version=3) == ["cls_blocks.0.classifier.1.bias"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_backbone_tensors_update_on_torch_only():
    model = make_model()
    assert "stem.1.weight" in Cascade(model, 0.5).updatable_tensor_names()
    cascade = Cascade(model, 0.5, backbone=WrappedBackbone(model))
    heads = cascade.head_tensor_names()
    assert len(heads) == 16 and all(n.startswith("cls_blocks.") for n in heads)
    assert cascade.updatable_tensor_names() == heads
    with pytest.raises(ValueError, match="only head tensors"):
        cascade.apply_update({"stem.1.weight": np.ones(8)}, version=1)
    x = image()
    before = cascade.run(x, force_exit=3).logits
    cascade.apply_update({"cls_blocks.3.classifier.0.weight": np.full(32, 2.0)}, version=1)
    after = cascade.run(x, force_exit=3)
    assert after.model_version == 1 and not torch.equal(after.logits, before)
    assert torch.equal(after.logits, Cascade(model, 0.5).run(x, force_exit=3).logits)


def test_updates_are_atomic_between_frames():
    model = make_model()
    cascade = Cascade(model, 0.5)
    x = image()
    g = torch.Generator().manual_seed(3)
    # Two states differing in the backbone (stem) and in every head: a frame that saw part
    # of an update would match neither.
    names = ["stem.1.weight", *cascade.head_tensor_names()]
    state_a = {n: model.state_dict()[n].clone() for n in names}
    state_b = {n: v + 0.5 * torch.randn(v.shape, generator=g) for n, v in state_a.items()}
    expected = {}
    for version, state in ((2, state_b), (1, state_a)):
        cascade.apply_update(state, version)
        r = cascade.run(x, force_exit=3)
        expected[version] = (r.logits, r.exit_confidences)
    assert not torch.equal(expected[1][0], expected[2][0])

    results, stop = [], threading.Event()

    def frames():
        try:
            for _ in range(60):
                results.append(cascade.run(x, force_exit=3))
        finally:
            stop.set()

    def updates():
        version = 1
        while not stop.is_set():
            version = 3 - version
            cascade.apply_update(state_b if version == 2 else state_a, version)

    threads = [threading.Thread(target=frames), threading.Thread(target=updates)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 60
    seen = set()
    for r in results:
        logits, confidences = expected[r.model_version]
        assert torch.equal(r.logits, logits) and r.exit_confidences == confidences
        seen.add(r.model_version)
    assert seen == {1, 2}  # both states were really exercised


def test_exit_costs_are_cumulative_shares():
    model = make_model()
    costs = exit_costs(model, 32)
    assert costs[-1] == 1.0 and (np.diff(costs) > 0).all()
    # Columns 1..3 have the same structure, so they add the same compute; column 0 has no
    # upsampling paths but the stem.
    steps = np.diff([0.0, *costs])
    assert steps[1] == pytest.approx(steps[2]) and steps[2] == pytest.approx(steps[3])
    assert steps[0] != pytest.approx(steps[1])
    assert exit_costs(make_model(num_columns=8), 32)[1] == pytest.approx(0.5, abs=0.05)



def test_bench_exits_writes_well_formed_json(tmp_path):
    from ttspec_ros.cli import main

    assert main(["bench-exits", "--arch", "revcol_tiny", "--size", "32", "--out",
                 str(tmp_path), "--repeats", "2", "--warmup", "0", "--threads", "1",
                 "--num-classes", "10"]) == 0
    result = json.loads((tmp_path / "bench_exits.json").read_text())
    assert result["settings"]["size"] == 32 and result["settings"]["seed"] == 0
    assert [e["exit"] for e in result["forced_exits"]] == [0, 1, 2, 3]
    assert all(e["latency_ms"] > 0 for e in result["forced_exits"])
    assert result["plain_forward"]["latency_ms"] > 0 and result["official_forward"]["min_ms"] > 0
    assert result["overhead_ratio"] == pytest.approx(
        result["forced_exits"][3]["latency_ms"] / result["plain_forward"]["latency_ms"])
    assert result["exit_cost"][-1] == 1.0
