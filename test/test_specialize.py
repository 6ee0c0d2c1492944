"""Specializer: only earlier heads learn, the paper's SGD rule, versions, persistence, threads,
the anchor guard, and the export -> apply_update round trip into another process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ttspec_ros.guard import AnchorGuard, AnchorSet, build_anchor_set
from ttspec_ros.model_update import load_payload, save_payload
from ttspec_ros.models.revcol import RevCol
from ttspec_ros.specialize import (
    Specializer,
    StackedHeads,
    early_head_tensors,
    head_tensor_names,
    pack_features,
    pooled_features,
    unpack_features,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 1, 1), num_columns=4, num_classes=5,
            in_chans=1, with_decoders=False)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> RevCol:
    torch.manual_seed(seed)
    return RevCol(**TINY).eval()


def features(n: int, dim: int = 32, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(dim).astype(np.float32) for _ in range(3)] for _ in range(n)]


def test_stacked_heads_match_model_heads() -> None:
    model = tiny_model()
    x = torch.randn(6, 1, 32, 32)
    feats = pooled_features(model, x, batch_size=4)
    expected = model.forward_exits(x)
    heads = StackedHeads.from_tensors(early_head_tensors(model), 3)
    stacked = heads.logits(torch.stack(feats[:3]))
    for i in range(3):
        torch.testing.assert_close(heads.logits_of(i, feats[i]), expected[i])
        torch.testing.assert_close(stacked[i], expected[i])


@pytest.mark.parametrize("momentum", [0.0, 0.9])  # 0: the weight update is fused into the BLAS
def test_step_equals_autograd_sgd(momentum: float) -> None:
    model = tiny_model()
    init = early_head_tensors(model)
    spec = Specializer(init, 4, lr=0.1, momentum=momentum, batch_size=2)
    mods = []
    for i in range(3):
        mod = torch.nn.Sequential(torch.nn.LayerNorm(32, eps=1e-6), torch.nn.Linear(32, 5))
        mod.load_state_dict({k.split("classifier.")[1]: v for k, v in init.items()
                             if k.startswith(f"cls_blocks.{i}.")})
        mods.append(mod)
    opt = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=0.1, momentum=momentum)
    samples = features(8)
    for step in range(4):
        pair, labels = samples[2 * step : 2 * step + 2], [step % 5, (step + 2) % 5]
        for f, label in zip(pair, labels, strict=True):
            spec.add_sample(3, label, 0.95, f)
        opt.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(
            mods[i](torch.stack([torch.from_numpy(f[i]) for f in pair])), torch.tensor(labels))
            for i in range(3))
        loss.backward()
        opt.step()
    exported = spec.export().tensors
    for i, mod in enumerate(mods):
        for k, v in mod.state_dict().items():
            torch.testing.assert_close(
                torch.from_numpy(exported[f"cls_blocks.{i}.classifier.{k}"]), v,
                rtol=1e-5, atol=1e-6)


def test_only_heads_before_the_answering_exit_change() -> None:
    model = tiny_model()
    init = {k: v.numpy() for k, v in early_head_tensors(model).items()}
    spec = Specializer(early_head_tensors(model), 4, model_id="tiny", lr=0.5)
    f = features(1)[0]
    assert spec.add_sample(2, 1, 0.99, f[:2]) is True
    payload = spec.export()
    assert payload.model_id == "tiny" and payload.version == 1
    assert set(payload.tensors) == set(spec.tensor_names)
    assert not any(name.startswith("cls_blocks.3.") for name in payload.tensors)
    for i in range(3):
        changed = [not np.array_equal(payload.tensors[n], init[n]) for n in head_tensor_names(i)]
        assert any(changed) == (i < 2), f"head {i}"
    # the pseudo-label became more likely at the trained heads
    heads_before = StackedHeads.from_tensors(init, 3)
    after = spec.heads()
    for i in range(2):
        x = torch.from_numpy(f[i])[None]
        p_after = after.logits_of(i, x).softmax(1)[0, 1]
        assert p_after > heads_before.logits_of(i, x).softmax(1)[0, 1]


def test_skips_first_exit_and_low_confidence_and_counts_them() -> None:
    spec = Specializer(early_head_tensors(tiny_model()), 4, min_confidence=0.8, batch_size=2)
    f = features(3)
    assert spec.add_sample(0, 1, 0.99, []) is False
    assert spec.add_sample(3, 1, 0.5, f[0]) is False
    assert spec.add_sample(3, 1, 0.9, f[1]) is False  # batch of 2 not full yet
    assert spec.version == 0
    assert spec.add_sample(1, 2, 0.9, f[2][:1]) is True
    stats = spec.stats()
    assert stats["skipped_first_exit"] == 1 and stats["skipped_low_confidence"] == 1
    assert stats["steps"] == 1 and stats["samples"] == 4 and spec.version == 1


def test_flush_steps_on_a_partly_filled_batch() -> None:
    init = early_head_tensors(tiny_model())
    f = features(3)
    spec = Specializer(init, 4, lr=0.1, batch_size=3)
    spec.add_sample(3, 1, 0.9, f[0])
    spec.add_sample(2, 4, 0.9, f[1][:2])
    assert spec.version == 0 and spec.stats()["pending"] == 2
    assert spec.flush() is True
    assert spec.stats()["pending"] == 0 and spec.stats()["steps"] == 1
    # the same step a batch of exactly those two samples takes
    pair = Specializer(init, 4, lr=0.1, batch_size=2)
    pair.add_sample(3, 1, 0.9, f[0])
    pair.add_sample(2, 4, 0.9, f[1][:2])
    for name, t in pair.export().tensors.items():
        np.testing.assert_array_equal(spec.export().tensors[name], t)
    assert spec.flush() is False and spec.stats()["steps"] == 1  # nothing held back


def guarded_after_three_steps(tolerance: float, check_every: int, **kwargs) -> Specializer:
    """A guarded Specializer after three lr-1 steps on one class: with tolerance 0 each check
    fails, with tolerance 1 each passes."""
    rng = np.random.default_rng(0)
    anchors = AnchorSet([rng.standard_normal((20, 32)).astype(np.float32) for _ in range(3)],
                        rng.integers(0, 5, 20))
    guard = AnchorGuard(anchors, threshold=0.3, rehearsal=0, check_every=check_every,
                        tolerance=tolerance, class_tolerance=tolerance)
    spec = Specializer(early_head_tensors(tiny_model()), 4, lr=1.0, guard=guard, **kwargs)
    for f in features(3, seed=4):
        spec.add_sample(3, 0, 0.99, f)
    return spec


def test_flush_runs_the_guard_check_of_unchecked_steps() -> None:
    init = early_head_tensors(tiny_model())

    def spec_after_three_steps(tolerance: float) -> Specializer:
        spec = guarded_after_three_steps(tolerance, check_every=10)
        assert spec.version == 0  # 3 steps, no check yet: nothing published
        return spec

    lenient = spec_after_three_steps(1.0)
    assert lenient.flush() is True and lenient.version == 3
    assert lenient.stats()["rollbacks"] == 0
    trained = lenient.export().tensors
    assert any(not np.array_equal(trained[n], v.numpy()) for n, v in init.items())
    assert lenient.flush() is False  # checked already
    strict = spec_after_three_steps(0.0)  # lr 1 on one class: the check fails
    assert strict.flush() is False and strict.stats()["rollbacks"] == 1
    for name, t in strict.export().tensors.items():
        np.testing.assert_array_equal(t, init[name].numpy())


def test_bad_samples_are_rejected_with_reasons() -> None:
    spec = Specializer(early_head_tensors(tiny_model()), 4)
    f = features(1)[0]
    with pytest.raises(ValueError, match="3 vectors"):
        spec.add_sample(3, 1, 0.9, f[:2])
    with pytest.raises(ValueError, match="out of range"):
        spec.add_sample(4, 1, 0.9, f)
    with pytest.raises(ValueError, match="class_id"):
        spec.add_sample(3, 5, 0.9, f)
    with pytest.raises(ValueError, match="heads take 32"):
        spec.add_sample(1, 1, 0.9, [np.zeros(31, np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        spec.add_sample(1, 1, 0.9, [np.full(32, np.nan, np.float32)])
    with pytest.raises(ValueError, match="exactly"):
        Specializer({"cls_blocks.0.classifier.0.weight": np.ones(32)}, 4)
    assert spec.version == 0


def test_reset_restores_original_heads_with_a_new_version() -> None:
    model = tiny_model()
    init = {k: v.numpy() for k, v in early_head_tensors(model).items()}
    spec = Specializer(early_head_tensors(model), 4, lr=0.5)
    for f in features(3):
        spec.add_sample(3, 4, 0.9, f)
    assert spec.version == 3
    spec.reset()
    payload = spec.export()
    assert payload.version == 4
    for name, t in init.items():
        np.testing.assert_array_equal(payload.tensors[name], t)


def test_save_load_round_trip_and_validation(tmp_path) -> None:
    model = tiny_model()
    spec = Specializer(early_head_tensors(model), 4, model_id="tiny", lr=0.2, momentum=0.5)
    samples = features(6)
    for f in samples[:3]:
        spec.add_sample(3, 2, 0.9, f)
    spec.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["specializer.safetensors"]
    restored = Specializer(early_head_tensors(model), 4, model_id="tiny", lr=0.2, momentum=0.5)
    restored.load(tmp_path)
    assert restored.version == spec.version
    for f in samples[3:]:  # momentum buffers came back too: the next steps agree
        spec.add_sample(3, 2, 0.9, f)
        restored.add_sample(3, 2, 0.9, f)
    for name, t in spec.export().tensors.items():
        np.testing.assert_allclose(restored.export().tensors[name], t, rtol=1e-6, atol=1e-7)
    other = Specializer(early_head_tensors(tiny_model(seed=1)), 4, model_id="tiny")
    with pytest.raises(ValueError, match="different original heads"):
        other.load(tmp_path)
    wrong_id = Specializer(early_head_tensors(model), 4, model_id="other")
    with pytest.raises(ValueError, match="model"):
        wrong_id.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        restored.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "specializer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a specializer state file"):
        restored.load(tmp_path / "bad")  # a clear ValueError, which the adapter reports


def _trained(momentum: float = 0.5) -> Specializer:
    spec = Specializer(early_head_tensors(tiny_model()), 4, model_id="tiny", lr=0.2,
                       momentum=momentum)
    for f in features(3):
        spec.add_sample(3, 2, 0.9, f)
    return spec


def _corrupt_momentum_shape(state: dict) -> None:
    state["tensors"]["momentum.bias"] = np.zeros((1, 1), np.float32)


def _corrupt_momentum_nan(state: dict) -> None:
    state["tensors"]["momentum.weight"] = np.full_like(state["tensors"]["momentum.weight"],
                                                       np.nan)


def _heads_with_classes(k: int):
    def corrupt(state: dict) -> None:
        t = state["tensors"]
        for i in range(3):
            name = f"heads.cls_blocks.{i}.classifier.1"
            t[f"{name}.weight"], t[f"{name}.bias"] = t[f"{name}.weight"][:k], t[f"{name}.bias"][:k]
    return corrupt


@pytest.mark.parametrize("corrupt, words", [
    (_corrupt_momentum_shape, "momentum.bias has shape"),
    # heads of another class count (a partial copy) or one that would broadcast
    (_heads_with_classes(3), "heads.*shape"),
    (_heads_with_classes(1), "heads.*shape"),
    (_corrupt_momentum_nan, "momentum.weight holds NaN"),
    (lambda s: s["meta"].pop("version"), "version must be an integer"),
    (lambda s: s["meta"].update(version="7"), "version must be an integer"),
    # taken up, 2**64 - 1 made every later export fail (a uint64 version), and saved it back
    (lambda s: s["meta"].update(version=2**64 - 1), r"version must be an integer in 0\.\.2\*\*62"),
    # integer weights were cast and published as truncated heads
    (lambda s: s["tensors"].update({k: v.astype(np.int32) for k, v in s["tensors"].items()
                                    if k.startswith("heads.")}), "not floating point"),
    (lambda s: s["meta"].update(counters={"steps": None}), "counters"),
    (lambda s: s.update(meta="not a dict"), "'meta' mapping"),
    # finite but absurd (a damaged file): loaded, they would have been published
    (lambda s: s["tensors"]["heads.cls_blocks.1.classifier.1.weight"].__setitem__(0, 1e30),
     r"weight holds values beyond \+-1e\+06"),
], ids=["momentum-shape", "heads-3-classes", "heads-1-class", "momentum-nan", "no-version",
        "str-version", "huge-version", "int-heads", "counters", "meta-type", "absurd-heads"])
def test_refused_state_changes_nothing(corrupt, words) -> None:
    state = _trained().state_dict()
    corrupt(state)
    target = _trained()
    target.add_sample(3, 0, 0.9, features(1, seed=9)[0])  # heads unlike the state's
    before, stats = target.export(), target.stats()
    with pytest.raises(ValueError, match=words):
        target.load_state_dict(state)
    after = target.export()
    assert after.version == before.version and target.stats() == stats
    for name, t in before.tensors.items():
        np.testing.assert_array_equal(after.tensors[name], t)


def test_features_that_would_overflow_the_layer_norm_are_refused_and_lose_nothing() -> None:
    """Finite features of absurd size (a broken sender) would overflow the heads' LayerNorm:
    refused with a ValueError, and the heads trained so far stay (before, the step's NaN
    rolled an unguarded specializer back to its original heads)."""
    spec = Specializer(early_head_tensors(tiny_model()), 4, lr=0.5)
    for f in features(5):
        spec.add_sample(3, 1, 0.9, f)
    trained = spec.export()
    assert trained.version == 5
    rng = np.random.default_rng(1)
    huge = [rng.standard_normal(32).astype(np.float32) * 1e19 for _ in range(3)]
    with pytest.raises(ValueError, match="feature of exit 0 is too large for the heads"):
        spec.add_sample(3, 1, 0.9, huge)
    after = spec.export()
    assert after.version == 5 and spec.stats()["samples"] == 5
    for name, t in trained.tensors.items():
        np.testing.assert_array_equal(after.tensors[name], t)
    # large but within float32's range: learnt from as usual
    assert spec.add_sample(3, 1, 0.9, [f / 100 for f in huge]) is True
    assert spec.export().version == 6 and spec.stats()["rollbacks"] == 0


def test_a_state_the_guard_refuses_is_not_resumed(tmp_path) -> None:
    """Heads trained without a guard, resumed by a specializer with one: publishing them would
    bypass the check (and make them the rollback target), so the state is refused."""
    model = tiny_model()
    images = torch.randn(40, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    anchors = build_anchor_set(model, images, model_id="m")
    init = early_head_tensors(model)
    plain = Specializer(init, 4, model_id="m", lr=0.5)
    rng = np.random.default_rng(0)
    for _ in range(50):  # everything is class 0: the early heads forget the rest
        plain.add_sample(3, 0, 0.9, [rng.standard_normal(32).astype(np.float32)
                                     for _ in range(3)])
    plain.save(tmp_path)
    guard = AnchorGuard(anchors, threshold=0.3)
    guarded = Specializer(init, 4, model_id="m", lr=0.5, guard=guard)
    assert not guard.passes(plain.heads())
    before = guarded.export()
    with pytest.raises(ValueError, match="saved heads fail this specializer's forgetting guard"):
        guarded.load(tmp_path)
    after = guarded.export()
    assert after.version == before.version
    for name, t in before.tensors.items():
        np.testing.assert_array_equal(after.tensors[name], t)
    # a state this guard accepts (here: the guarded specializer's own) resumes
    guarded.save(tmp_path)
    Specializer(init, 4, model_id="m", lr=0.5, guard=AnchorGuard(anchors, threshold=0.3)
                ).load(tmp_path)

@pytest.mark.parametrize("lr", [1e38, 1e8], ids=["overflow", "finite-divergence"])
@pytest.mark.parametrize("guarded", [False, True])
def test_a_step_that_overflows_the_heads_is_rolled_back(guarded: bool, lr: float) -> None:
    """lr 1e38 overflows to inf; lr 1e8 gives heads of ~1e8 that stay finite (a diverging
    step size: such heads were published) and are rolled back the same way."""
    rng = np.random.default_rng(0)
    anchors = AnchorSet([rng.standard_normal((20, 32)).astype(np.float32) for _ in range(3)],
                        rng.integers(0, 5, 20))
    # tolerances 1: only the finiteness check can fail; check_every=1 publishes every step
    guard = AnchorGuard(anchors, check_every=1, rehearsal=0, tolerance=1.0,
                        class_tolerance=1.0) if guarded else None
    init = early_head_tensors(tiny_model())
    spec = Specializer(init, 4, lr=lr, guard=guard)
    for f in features(6):
        last_good = spec.export()
        spec.add_sample(3, 1, 0.9, f)
        if spec.stats()["rollbacks"]:
            break
    else:
        pytest.fail(f"lr {lr} must overflow the heads to test this")
    assert spec.stats()["overflows"] == 1
    after = spec.export()  # raised ValueError (non-finite tensors) before the fix
    if guarded:  # back to the last checked state, which is still what is published
        assert after.version == last_good.version
        expected = last_good.tensors
    else:  # back to the original heads: published heads changed, so a new version
        assert after.version == last_good.version + 1
        expected = {k: v.numpy() for k, v in init.items()}
    for name, t in expected.items():
        np.testing.assert_array_equal(after.tensors[name], t)


def test_anchor_labels_outside_the_heads_classes_are_refused_at_bind() -> None:
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(3)]
    heads = StackedHeads.from_tensors(early_head_tensors(tiny_model()), 3)  # 5 classes
    for labels in ([0, 1, 2, 5], [0, 1, 2, -1]):
        guard = AnchorGuard(AnchorSet(feats, np.array(labels)), rehearsal_target="labels")
        with pytest.raises(ValueError, match="labels must lie in"):
            guard.bind(heads)


@pytest.mark.parametrize("settings", [
    dict(tolerance=float("nan")), dict(class_tolerance=float("nan")),
    dict(tolerance=-0.1), dict(cost_tolerance=float("nan"), exit_cost=[0.25, 0.5, 0.75, 1.0]),
    dict(threshold=float("nan")), dict(threshold=1.5),
    dict(threshold=["0.9", "0.9", "0.9"]), dict(threshold=[0.9, True, 0.9]),  # the card's rule
])
def test_guard_settings_that_would_disable_it_are_refused(settings) -> None:
    """NaN fails every comparison: a NaN tolerance would pass every check, so never roll back."""
    rng = np.random.default_rng(0)
    anchors = AnchorSet([rng.standard_normal((4, 32)).astype(np.float32) for _ in range(3)],
                        np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError):
        AnchorGuard(anchors, **settings)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0])
def test_specializer_refuses_a_learning_rate_that_is_not_finite_and_positive(lr) -> None:
    with pytest.raises(ValueError, match="lr"):
        Specializer(early_head_tensors(tiny_model()), 4, lr=lr)


def test_guard_fails_non_finite_heads() -> None:
    rng = np.random.default_rng(0)
    anchors = AnchorSet([rng.standard_normal((20, 32)).astype(np.float32) for _ in range(3)],
                        rng.integers(0, 5, 20))
    heads = StackedHeads.from_tensors(early_head_tensors(tiny_model()), 3)
    guard = AnchorGuard(anchors, threshold=0.9, tolerance=1.0, class_tolerance=1.0)
    guard.bind(heads)
    assert guard.passes(heads)
    broken = heads.clone()
    broken.weight[:] = float("nan")  # NaN confidences: every anchor at the last exit
    assert not guard.passes(broken)


def test_save_refuses_non_finite_heads_and_keeps_the_good_file(tmp_path) -> None:
    spec = _trained()
    path = spec.save(tmp_path)
    good = path.read_bytes()
    spec._heads.weight[0, 0, 0] = float("nan")  # no public way left to get there
    with pytest.raises(ValueError, match="NaN or infinite values in heads.cls_blocks.0"):
        spec.save(tmp_path)
    assert path.read_bytes() == good


def test_training_thread_and_exporting_thread() -> None:
    model = tiny_model()
    samples = features(200, seed=3)
    spec = Specializer(early_head_tensors(model), 4, lr=0.05)
    sequential = Specializer(early_head_tensors(model), 4, lr=0.05)
    for i, f in enumerate(samples):
        sequential.add_sample(3, i % 5, 0.9, f)

    def train() -> None:
        for i, f in enumerate(samples):
            spec.add_sample(3, i % 5, 0.9, f)

    worker = threading.Thread(target=train)
    worker.start()
    versions = []
    while worker.is_alive():
        versions.append(spec.export().version)
    worker.join()
    assert versions == sorted(versions)
    final = spec.export()
    assert final.version == 200
    for name, t in sequential.export().tensors.items():
        np.testing.assert_array_equal(final.tensors[name], t)


def test_replay_buffer_is_class_balanced_and_used() -> None:
    spec = Specializer(early_head_tensors(tiny_model()), 4, replay_size=10, lr=0.1)
    for i, f in enumerate(features(30)):
        spec.add_sample(3, 0 if i < 25 else 1, 0.9, f)
    assert {c: len(q) for c, q in spec._replay.items()} == {0: 2, 1: 2}
    plain = Specializer(early_head_tensors(tiny_model()), 4, lr=0.1)
    for i, f in enumerate(features(30)):
        plain.add_sample(3, 0 if i < 25 else 1, 0.9, f)
    a, b = spec.export().tensors, plain.export().tensors
    assert any(not np.array_equal(a[n], b[n]) for n in a)


def test_pack_unpack_features() -> None:
    f = features(1)[0]
    sizes, flat = pack_features(f)
    assert sizes == [32, 32, 32] and flat.dtype == np.float32
    for a, b in zip(unpack_features(sizes, flat), f, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="add up"):
        unpack_features([32, 31], flat)


def test_anchor_file_records_its_model_and_refuses_another(tmp_path) -> None:
    model = tiny_model()
    anchors = build_anchor_set(model, torch.randn(40, 1, 32, 32), model_id="m1")
    loaded = AnchorSet.load(anchors.save(tmp_path / "anchors.safetensors"))
    assert loaded.model_id == "m1" and np.array_equal(loaded.labels, anchors.labels)
    dim = loaded.features[0].shape[1]
    loaded.check_matches("m1", 3, dim)
    with pytest.raises(ValueError, match="come from model 'm1', not 'm2'"):
        loaded.check_matches("m2", 3, dim)
    with pytest.raises(ValueError, match="no images"):
        build_anchor_set(model, torch.zeros(0, 1, 32, 32))
    with pytest.raises(ValueError, match="do not fit 2 early heads"):
        loaded.check_matches("m1", 2, dim)
    with pytest.raises(ValueError, match=f"do not fit 3 early heads of {dim + 1} inputs"):
        loaded.check_matches("m1", 3, dim + 1)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors anchor file"):
        AnchorSet.load(tmp_path / "bad.safetensors")


def test_anchor_guard_limits_forgetting(tmp_path) -> None:
    model = tiny_model()
    torch.manual_seed(1)
    anchors = build_anchor_set(model, torch.randn(300, 1, 32, 32), per_class=20)
    anchors.save(tmp_path / "anchors.safetensors")
    anchors = AnchorSet.load(tmp_path / "anchors.safetensors")
    stream = features(150, seed=5)

    def run(guard: AnchorGuard | None) -> Specializer:
        spec = Specializer(early_head_tensors(model), 4, lr=1.0, guard=guard)
        for f in stream:  # a stream that shows only class 0, with a far too large lr
            spec.add_sample(3, 0, 0.99, f)
        return spec

    def guard() -> AnchorGuard:
        return AnchorGuard(anchors, threshold=0.3, rehearsal=0, tolerance=0.0,
                           class_tolerance=0.0)

    probe = guard()
    probe.bind(StackedHeads.from_tensors(early_head_tensors(model), 3))
    unguarded = run(None)
    assert not probe.passes(unguarded.heads()), "the stream must cause forgetting to test this"
    guarded = run(guard())
    assert probe.passes(guarded.heads())
    assert guarded.stats()["rollbacks"] > 0
    # only checked states are published
    spec = Specializer(early_head_tensors(model), 4, lr=1e-3,
                       guard=AnchorGuard(anchors, threshold=0.3, rehearsal=2, check_every=5,
                                         tolerance=1.0, class_tolerance=1.0))
    original = spec.export()
    for f in stream[:4]:
        spec.add_sample(3, 0, 0.99, f)
    assert spec.export().version == 0
    for name, t in spec.export().tensors.items():
        np.testing.assert_array_equal(t, original.tensors[name])
    spec.add_sample(3, 0, 0.99, stream[4])
    assert spec.export().version == 5 and spec.stats()["rollbacks"] == 0
    assert any(not np.array_equal(t, original.tensors[n])
               for n, t in spec.export().tensors.items())
    # check_every=0: rehearsal only, every step published (once silently never published)
    rehearsing = Specializer(early_head_tensors(model), 4, lr=1e-3,
                             guard=AnchorGuard(anchors, threshold=0.3, rehearsal=2,
                                               check_every=0))
    rehearsing.add_sample(3, 0, 0.99, stream[0])
    assert rehearsing.export().version == 1
    assert any(not np.array_equal(t, original.tensors[n])
               for n, t in rehearsing.export().tensors.items())
    with pytest.raises(ValueError, match="anchors are for"):
        Specializer(early_head_tensors(model, 3), 3, guard=guard())


ROUND_TRIP_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from ttspec_ros.cascade import Cascade
    from ttspec_ros.model_update import load_payload
    from ttspec_ros.models.revcol import RevCol
    torch.manual_seed(0)
    model = RevCol(**json.loads(sys.argv[1])).eval()
    cascade = Cascade(model, [0.5, 0.5, 0.5], num_threads=1)
    payload = load_payload(sys.argv[2])
    cascade.apply_update(payload.tensors, payload.version)
    x = torch.from_numpy(np.load(sys.argv[3]))
    out = {"version": int(cascade.version), "logits": [], "confidences": []}
    with torch.inference_mode():
        out["logits"] = [t.tolist() for t in model.forward_exits(x)]
    for img in x:
        r = cascade.run(img, force_exit=3)
        out["confidences"].append([float(c) for c in r.exit_confidences])
    print(json.dumps(out))
""")


def test_export_applies_in_another_process(tmp_path) -> None:
    pytest.importorskip("ttspec_ros.cascade")
    model = tiny_model(seed=0)
    spec = Specializer(early_head_tensors(model), 4, model_id="tiny", lr=0.5)
    for i, f in enumerate(features(20, seed=7)):
        spec.add_sample(1 + i % 3, i % 5, 0.9, f[: 1 + i % 3])
    payload = spec.export()
    update = save_payload(payload, tmp_path / "update.safetensors")
    images = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    config = {**TINY, "channels": list(TINY["channels"]), "layers": list(TINY["layers"])}
    proc = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, json.dumps(config), str(update),
         str(tmp_path / "images.npy")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    assert other["version"] == payload.version == load_payload(update).version
    x = torch.from_numpy(images)
    feats = pooled_features(model, x)
    heads = spec.heads()
    changed = False
    for i in range(3):
        expected = heads.logits_of(i, feats[i])
        torch.testing.assert_close(torch.tensor(other["logits"][i]), expected,
                                   rtol=1e-4, atol=1e-5)
        with torch.inference_mode():
            original = model.head(i, feats[i])
        changed |= not torch.allclose(expected, original, atol=1e-3)
        conf = expected.softmax(1).max(1).values
        torch.testing.assert_close(torch.tensor([c[i] for c in other["confidences"]]), conf,
                                   rtol=1e-4, atol=1e-5)
    assert changed, "the update must change the early exits for this test to mean anything"
    # the last exit is the original model's in both processes
    with torch.inference_mode():
        torch.testing.assert_close(torch.tensor(other["logits"][3]), model.forward_exits(x)[3],
                                   rtol=1e-4, atol=1e-5)


def test_rehearsal_targets_are_original_softmax_or_last_exit_labels() -> None:
    model = tiny_model()
    torch.manual_seed(2)
    anchors = build_anchor_set(model, torch.randn(60, 1, 32, 32))
    heads = StackedHeads.from_tensors(early_head_tensors(model), 3)
    for target in ("original", "labels"):
        guard = AnchorGuard(anchors, rehearsal=5, rehearsal_target=target)
        guard.bind(heads)
        x, t = guard.rehearsal_batch(5)
        assert x.shape == (3, 5, 32) and t.shape == (3, 5, 5)
        torch.testing.assert_close(t.sum(-1), torch.ones(3, 5))
        if target == "original":
            torch.testing.assert_close(t, heads.logits(x).softmax(-1))
        else:
            assert set(t.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="rehearsal_target"):
        AnchorGuard(anchors, rehearsal_target="soft")


def test_anchor_labels_must_be_integers() -> None:
    feats = [np.zeros((2, 4), np.float32)]
    with pytest.raises(ValueError, match="anchor labels must be integers, got float64"):
        AnchorSet(feats, np.array([2.7, 1.0]))  # was read as classes 2 and 1
    assert AnchorSet(feats, np.array([2, 1], np.uint8)).labels.dtype == np.int64


@pytest.mark.parametrize("replay_size", [3, 7])
def test_replay_buffer_holds_at_most_replay_size_and_stays_balanced(replay_size: int) -> None:
    """Per-class shares are rounded up (ceil(size / 5 classes): 1 and 2), so 5 classes used
    to fill 5 and 10 places; the total must stay within replay_size, balanced over the
    classes, keeping the newest samples."""
    spec = Specializer(early_head_tensors(tiny_model()), 4, replay_size=replay_size, lr=0.1)
    for i, f in enumerate(features(40)):
        spec.add_sample(3, i % 5, 0.9, f)
        held = {c: len(q) for c, q in spec._replay.items() if q}
        assert sum(held.values()) <= replay_size
    assert sum(held.values()) == replay_size and max(held.values()) - min(held.values()) <= 1
    if replay_size == 3:  # one place each for the three classes seen last (i = 37, 38, 39)
        assert held == {2: 1, 3: 1, 4: 1}


def test_replay_buffer_keeps_no_sample_of_a_rolled_back_batch() -> None:
    """A batch the guard's check refuses is undone, so it must not come back as replay."""
    def spec_after_three_steps(tolerance: float) -> Specializer:
        return guarded_after_three_steps(tolerance, check_every=1, replay_size=10)

    strict = spec_after_three_steps(0.0)  # lr 1 on one class: every check fails
    assert strict.stats()["rollbacks"] == 3 and strict.version == 0
    assert sum(len(q) for q in strict._replay.values()) == 0
    lenient = spec_after_three_steps(1.0)  # every check passes: all three are kept
    assert lenient.stats()["rollbacks"] == 0 and lenient.version == 3
    assert {c: len(q) for c, q in lenient._replay.items()} == {0: 2}  # ceil(10 / 5) per class
