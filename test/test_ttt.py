"""Test-time training engine on a tiny random RevCol (+ the experiment on tiny settings)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from ttspec_ros.model_update import ModelUpdatePayload
from ttspec_ros.models.revcol import RevCol
from ttspec_ros.ttt import TestTimeTrainer, TTTConfig, card_norm_pix, select_parameters

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> RevCol:
    torch.manual_seed(seed)
    model = RevCol((8, 16, 24, 32), (1, 1, 1, 1), 4, 10, in_chans=1)
    # Random init has gamma = 1e-6 (blocks ~ identity) and near-zero decoder outputs; larger
    # values let the encoder's changes show in the predictions and the reconstruction.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
            elif name.startswith("decoder_blocks") and p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(seed))


def state(model: RevCol) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_parameter_selection():
    m = tiny_model()
    norm = select_parameters(m, "norm", 1, "mae")
    assert norm and all(".norm." in n or "stem.1" in n or "down.1" in n
                        or "channel_reschedule.1" in n for n in norm)
    # the decoders read columns 0..2 only; heads and decoders never adapt
    assert not any(n.startswith(("subnet3", "cls_blocks", "decoder_blocks")) for n in norm)
    cols = select_parameters(m, "columns", 2, "mae")
    assert {n.split(".")[0] for n in cols} == {"stem", "subnet0", "subnet1"}
    enc = select_parameters(m, "encoder", 1, "mae")
    assert {n.split(".")[0] for n in enc} == {"stem", "subnet0", "subnet1", "subnet2"}
    assert "subnet3.alpha0" in select_parameters(m, "encoder", 1, "entropy")
    with pytest.raises(ValueError, match="reaches only"):
        select_parameters(m, "columns", 4, "mae")
    assert set(enc) <= set(m.state_dict())


def test_config_rejects_bad_values():
    nan, inf = float("nan"), float("inf")
    for bad in (dict(mode="sometimes"), dict(update="heads"), dict(lr=0.0), dict(batch=0),
                dict(mask_ratio=1.0), dict(optimizer="lbfgs"), dict(lr=inf), dict(lr=nan),
                dict(anchor=nan), dict(anchor=inf), dict(weight_decay=nan),
                dict(momentum=nan)):
        with pytest.raises(ValueError):
            TTTConfig(**bad)
    # Types from a params file or JSON: true is not 1 step, 1.5 is no step count.
    for bad, words in ((dict(steps=1.5), "steps must be an integer"),
                       (dict(batch=True), "batch must be an integer"),
                       (dict(lr=True), "lr must be a number"),
                       (dict(momentum="0.9"), "momentum must be a number"),
                       (dict(seed=2**64), "seed must be in 0..")):
        with pytest.raises(ValueError, match=words):
            TTTConfig(**bad)
    assert TTTConfig(steps=np.int64(2), lr=np.float32(0.01)).steps == 2


def test_norm_pix_target_follows_the_model_card():
    """The loss reconstructs what the decoders were trained on: per-patch normalised pixels
    when the card's training config says norm_pix (same masks: same seed)."""
    from ttspec_ros.masking import masked_reconstruction_loss, random_patch_mask
    from ttspec_ros.models.checkpoint import ModelCard

    m, x = tiny_model(), image()
    cfg = TTTConfig(batch=4, seed=3)
    plain = TestTimeTrainer(copy.deepcopy(m), cfg).loss(x)
    normed = TestTimeTrainer(copy.deepcopy(m), replace(cfg, norm_pix=True)).loss(x)
    target = x[None].expand(4, -1, -1, -1)
    masked, mask = random_patch_mask(target, cfg.mask_ratio,
                                     generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h, st, ref = m.stem(masked), (0.0, 0.0, 0.0, 0.0), []
        for i, decoder in enumerate(m.decoder_blocks):
            st = m.run_exit(i, h, st)
            ref.append(masked_reconstruction_loss(decoder(st[3]), target, mask, norm_pix=True))
    assert torch.allclose(normed.detach(), torch.stack(ref).mean(), rtol=1e-5)
    assert not torch.allclose(normed, plain)
    card = ModelCard(model_id="", architecture={}, class_names=[], input={}, thresholds=[],
                     exit_cost=[], training={"config": {"norm_pix": True}})
    assert card_norm_pix(card) and not card_norm_pix(replace(card, training={}))
    with pytest.raises(ValueError, match="norm_pix must be true or false, got 'false'"):
        card_norm_pix(replace(card, training={"config": {"norm_pix": "false"}}))


def test_online_changes_only_selected_and_keeps_them():
    m = tiny_model()
    before = state(m)
    t = TestTimeTrainer(m, TTTConfig(mode="online", update="norm", lr=0.05, batch=4))
    t.adapt_and_predict(image())
    t.adapt_and_predict(image(2))
    after = state(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(t.parameter_names)
    assert t.version == 2


def test_a_non_finite_image_is_refused_and_keeps_the_last_update():
    m = tiny_model()
    t = TestTimeTrainer(m, TTTConfig(mode="online", update="norm", lr=0.05, batch=2))
    t.adapt(image())
    adapted, version = state(m), t.version
    bad = image(2)
    bad[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        t.adapt(bad)
    assert t.version == version
    assert all(torch.equal(v, state(m)[k]) for k, v in adapted.items())


def test_episodic_resets_and_differs_from_baseline():
    m = tiny_model()
    before = state(m)
    baseline = copy.deepcopy(m).forward_exits(image()[None])
    t = TestTimeTrainer(m, TTTConfig(mode="episodic", update="encoder", optimizer="adamw",
                                     lr=1e-2, steps=3, batch=4))
    adapted = t.adapt_and_predict(image())
    assert not torch.allclose(adapted[-1], baseline[-1])
    after = state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adaptation_lowers_the_reconstruction_loss():
    m = tiny_model()
    cfg = TTTConfig(mode="online", update="encoder", optimizer="adamw", lr=1e-2, batch=8, seed=5)
    t = TestTimeTrainer(m, cfg)
    x = image()

    def fixed_mask_loss() -> float:
        t._generator.manual_seed(123)  # same masks before and after
        with torch.no_grad():
            return float(t.loss(x))

    start = fixed_mask_loss()
    for _ in range(15):
        t.adapt(x)
    assert fixed_mask_loss() < 0.9 * start


def test_anchor_limits_drift():
    drift = []
    for anchor in (0.0, 2.0):
        m = tiny_model()
        t = TestTimeTrainer(m, TTTConfig(update="norm", lr=0.05, batch=2, anchor=anchor))
        start = {k: v.clone() for k, v in t.export_tensors().items()}
        for i in range(5):
            t.adapt(image(i))
        now = t.export_tensors()
        drift.append(sum(float((now[k] - start[k]).pow(2).sum()) for k in now))
    assert 0 < drift[1] < 0.5 * drift[0]


def test_tent_lowers_entropy():
    m = tiny_model()
    x = image()
    t = TestTimeTrainer(m, TTTConfig(mode="online", objective="entropy", batch=1, lr=0.05))
    with torch.no_grad():
        start = float(t.loss(x))
    for _ in range(10):
        t.adapt(x)
    with torch.no_grad():
        assert float(t.loss(x)) < start


def test_export_update_names_and_values():
    m = tiny_model()
    t = TestTimeTrainer(m, TTTConfig(update="columns", columns=1, lr=0.05), model_id="tiny")
    assert t.export_tensors(changed_only=True) == {}
    t.adapt(image())
    payload = t.export_update()
    assert isinstance(payload, ModelUpdatePayload)
    assert payload.model_id == "tiny" and payload.version == 1
    sd = m.state_dict()
    assert set(payload.tensors) == set(t.parameter_names)
    for name, value in payload.tensors.items():
        np.testing.assert_array_equal(value, sd[name].numpy())
    t.reset()
    assert t.export_tensors(changed_only=True) == {}


def test_save_and_load_resume_the_adapted_tensors_and_version(tmp_path):
    cfg = TTTConfig(mode="online", update="norm", lr=0.05, batch=4)
    t = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    for i in range(3):
        t.adapt(image(i))
    t.save(tmp_path)
    resumed = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    resumed.load(tmp_path)
    assert resumed.version == 3
    saved = t.export_tensors()
    assert all(torch.equal(saved[k], v) for k, v in resumed.export_tensors().items())
    original, adapted = state(resumed.model), state(t.model)
    assert all(torch.equal(original[k], adapted[k]) for k in adapted)


@pytest.mark.parametrize("other, words", [
    (dict(model_id="m2"), "model 'm1'"),
    (dict(config=TTTConfig(mode="online", update="columns", columns=1)), "other tensors"),
])
def test_load_refuses_another_model_or_tensor_set_and_changes_nothing(tmp_path, other, words):
    cfg = TTTConfig(mode="online", update="norm", lr=0.05, batch=4)
    t = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    t.adapt(image())
    t.save(tmp_path)
    kwargs = {"config": cfg, "model_id": "m1", **other}
    fresh = TestTimeTrainer(tiny_model(), kwargs["config"], model_id=kwargs["model_id"])
    before = state(fresh.model)
    with pytest.raises(ValueError, match=words):
        fresh.load(tmp_path)
    after = state(fresh.model)
    assert all(torch.equal(before[k], after[k]) for k in before) and fresh.version == 0


def test_load_refuses_a_corrupt_file_with_a_value_error(tmp_path):
    (tmp_path / "ttt.safetensors").write_bytes(b"garbage" * 20)
    t = TestTimeTrainer(tiny_model(), TTTConfig(mode="online"), model_id="m1")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        t.load(tmp_path)


def test_an_update_that_breaks_the_model_is_undone():
    # lr 1e8: a step leaves finite but huge parameters whose next forward is NaN
    cfg = TTTConfig(update="columns", columns=1, lr=1e8, momentum=0.0, batch=2, steps=3)
    t = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    before = state(t.model)
    # Three steps: the second step's loss sees it; this image's update is undone.
    with pytest.raises(FloatingPointError, match="restored to the last ones with a finite "
                                                 "loss, version 0"):
        t.adapt(image())
    assert all(torch.equal(before[k], v) for k, v in state(t.model).items())
    # One step: only the next image's loss sees it, and undoing the earlier image's update
    # is a change, so a new version.
    t = TestTimeTrainer(tiny_model(), replace(cfg, steps=1), model_id="m1")
    t.adapt(image())
    assert t.version == 1
    with pytest.raises(FloatingPointError, match="version 2"):
        t.adapt(image(2))
    assert all(torch.equal(before[k], v) for k, v in state(t.model).items())
    assert all(torch.isfinite(o).all() for o in t.predict(image(3)))
    assert t.export_update().version == 2



def test_a_frame_whose_own_loss_is_not_finite_undoes_only_itself():
    """A finite frame of absurd size gives a NaN loss at the first step: the image is at
    fault, so the previous frames' adaptation stays and the version does not move (before,
    it undid the last good frame and counted a new version on every such frame)."""
    cfg = TTTConfig(mode="online", update="norm", lr=0.05, momentum=0.9, batch=2)
    t = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    for i in range(3):
        t.adapt(image(i))
    adapted, version = state(t.model), t.version
    masks = t._generator.get_state()
    huge = image(9) * 1e30
    assert torch.isfinite(huge).all()
    for _ in range(2):
        with pytest.raises(FloatingPointError, match="the image's own loss is not finite.*"
                                                     f"version {version}$"):
            t.adapt(huge)
        assert t.version == version
        assert all(torch.equal(adapted[k], v) for k, v in state(t.model).items())
    # and it goes on learning as if those frames had not come: momentum kept (with the masks
    # they drew put back, to compare with a trainer that never saw them)
    t._generator.set_state(masks)
    t.adapt(image(5))
    assert t.version == version + 1
    never = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    for i in (0, 1, 2, 5):
        never.adapt(image(i))
    assert all(torch.equal(state(never.model)[k], v) for k, v in state(t.model).items())


def test_an_image_of_the_wrong_shape_is_refused_with_a_value_error():
    t = TestTimeTrainer(tiny_model(), TTTConfig(mode="online"), model_id="m1")
    with pytest.raises(ValueError, match="image has 3 channels, the model takes 1"):
        t.adapt(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="image size 8x8 is not a multiple of 32"):
        t.adapt(torch.randn(1, 8, 8))
    assert t.version == 0

def test_load_after_adapting_is_a_new_version(tmp_path):
    cfg = TTTConfig(mode="online", update="norm", lr=0.05, batch=2)
    saved = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    saved.adapt(image())
    saved.save(tmp_path)
    t = TestTimeTrainer(tiny_model(), cfg, model_id="m1")
    for i in range(3):
        t.adapt(image(i + 2))
    t.load(tmp_path)  # other tensors than version 3 had: a classifier must see a change
    assert t.version == 4
    assert all(torch.equal(v, saved.export_tensors()[k]) for k, v in t.export_tensors().items())


def test_export_is_a_consistent_snapshot_while_adapting():
    m = tiny_model()
    t = TestTimeTrainer(m, TTTConfig(update="encoder", lr=0.01, batch=2))
    snapshots = [t.export_tensors()]
    done = threading.Event()

    def adapter() -> None:
        for i in range(15):
            t.adapt(image(i))
            snapshots.append(t.export_tensors())  # only this thread changes the parameters
        done.set()

    thread = threading.Thread(target=adapter)
    thread.start()
    exported = []
    while not done.is_set():
        exported.append(t.export_tensors())
    thread.join()
    assert len(exported) > 1
    for e in exported:
        assert any(all(torch.equal(e[k], s[k]) for k in e) for s in snapshots)


def test_experiment_tiny_run(tmp_path):
    from ttspec_ros.experiments.ttt_experiment import Options, run_experiment

    spec = {"channels": 1, "size": 32, "content_size": 28, "mean": [0.29], "std": [0.35]}
    opts = Options(images=4, episodic_images=3, clean_images=5, stream=4, eval_every=2,
                   batches=(2,),
                   corruptions=("gaussian_noise", "zoom_blur"), severity_corruptions=("contrast",),
                   episodic=TTTConfig(mode="episodic", lr=0.1, steps=1, batch=2),
                   online=TTTConfig(mode="online", lr=0.01, batch=2),
                   tent_episodic=TTTConfig(mode="episodic", lr=0.01, batch=1, objective="entropy"),
                   cost_images=2)
    run_experiment(tiny_model(), spec, opts, tmp_path, {"model_id": "tiny"})
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["severity"] == 5 and table["images_per_corruption"] == 4 and table["seed"] == 0
    assert [r["corruption"] for r in table["rows"]] == list(opts.corruptions)
    for row in table["rows"]:
        for key in ("baseline", "baseline_episodic", "standard_b2", "online", "tent_online",
                    "tent_episodic"):
            assert 0.0 <= row[key] <= 1.0
    assert table["episodic_images"] == 3
    assert table["rows"][0]["cascade"]["standard_b2"]["mean_exit"] <= 3
    assert 0.0 <= table["clean"]["baseline"] <= 1.0 and 0.0 <= table["clean"]["online"] <= 1.0
    online = json.loads((tmp_path / "online.json").read_text())
    curve = online["single"]["gaussian_noise"]["curves"]["gaussian_noise"]
    assert [p["images"] for p in curve] == [0, 2, 4]
    assert set(online["blur_consecutive"]["final"]) == {"motion_blur", "zoom_blur"}
    assert set(online["severity"]["contrast"]) == {"gradual", "shuffled"}
    harm = json.loads((tmp_path / "harm.json").read_text())
    assert harm["images"] == 5
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["modes"]["episodic_b2"]["seconds_per_image"] > 0
    for png in ("table.png", "online_curves.png", "blur_order.png", "severity_order.png",
                "harm.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # every run was saved as it finished; a rerun with the same options loads the saved runs
    saved_path = tmp_path / "runs" / "episodic_b2__zoom_blur.json"
    saved = json.loads(saved_path.read_text())
    saved["result"]["last_exit"] = 0.125  # marker: only a loaded result carries it
    saved_path.write_text(json.dumps(saved))
    again = run_experiment(tiny_model(), spec, replace(opts, parts=("a",)), tmp_path)
    zoom = again["table"]["rows"][1]
    assert zoom["standard_b2"] == 0.125
    assert again["table"]["rows"][0] == table["rows"][0]
    # the JSON says which runs it did not make itself
    assert table["runs_from_cache"] == [] and "episodic_b2/zoom_blur" in again["table"][
        "runs_from_cache"]
    changed = replace(opts, parts=("a",), episodic=replace(opts.episodic, lr=0.2))
    rerun = run_experiment(tiny_model(), spec, changed, tmp_path)
    assert rerun["table"]["rows"][1]["standard_b2"] != 0.125


# A parent that starts a child (which calls exit_with_parent) and then waits; the test kills
# the parent with SIGKILL, so no clean-up of its own can end the child.
ORPHAN_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", (
    "import time\\n"
    "from ttspec_ros.experiments.ttt_experiment import exit_with_parent\\n"
    "exit_with_parent(0.05)\\n"
    "print('ready', flush=True)\\n"
    "time.sleep(120)\\n")], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_pool_workers_end_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the orphaned child kept running"
    finally:
        parent.kill()


def test_episodic_result_of_an_image_does_not_depend_on_the_images_before_it():
    """Image 2 of an episodic run is adapted exactly as by a fresh trainer: the reset restores
    the parameters, drops the optimizer's moments/momentum and restarts the masks."""
    for optimizer in ("sgd", "adamw"):
        cfg = TTTConfig(mode="episodic", update="norm", optimizer=optimizer, lr=0.05, steps=2,
                        batch=2, seed=4)
        t = TestTimeTrainer(tiny_model(), cfg)
        t.adapt_and_predict(image(1))
        second = t.adapt_and_predict(image(2))
        expected = TestTimeTrainer(tiny_model(), cfg).adapt_and_predict(image(2))
        assert all(torch.equal(a, b) for a, b in zip(second, expected, strict=True)), optimizer


def test_loss_holds_the_lock():
    """loss() reads the parameters and draws masks: it waits while another thread adapts."""
    t = TestTimeTrainer(tiny_model(), TTTConfig(batch=2))
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with t._lock:
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    finished = threading.Event()
    worker = threading.Thread(target=lambda: (t.loss(image()), finished.set()))
    worker.start()
    try:
        assert not finished.wait(0.3), "loss() ran while another thread held the lock"
    finally:
        release.set()
        thread.join()
        worker.join()
    assert finished.is_set()


def test_run_cache_fingerprint_covers_corruptions_and_preprocessing(monkeypatch):
    """A cached run is reused only for the same corruption ladder and input preprocessing."""
    from ttspec_ros import corruptions
    from ttspec_ros.experiments import ttt_experiment as te

    opts = te.Options()
    task = te.plan_tasks(opts)[0]
    weights = state(tiny_model())
    spec = {"channels": 1, "size": 32, "content_size": 28, "mean": [0.29], "std": [0.35]}
    base = te._task_fingerprint(task, opts, weights, spec)
    assert te._task_fingerprint(task, opts, weights, spec) == base
    assert te._task_fingerprint(task, opts, weights, {**spec, "std": [0.3]}) != base
    assert te._task_fingerprint(task, replace(opts, pool_size=1000), weights, spec) != base
    # threads per run change float sums: a run made with 1 is not reported under 2
    assert te._task_fingerprint(task, opts, weights, spec, 1) != te._task_fingerprint(
        task, opts, weights, spec, 2)
    ladder = {**corruptions.SEVERITY_PARAMS, "contrast": [0.5, 0.4, 0.3, 0.2, 0.1]}
    monkeypatch.setattr(corruptions, "SEVERITY_PARAMS", ladder)
    assert te._task_fingerprint(task, opts, weights, spec) != base
    monkeypatch.undo()
    assert te._task_fingerprint(task, opts, weights, spec) == base
    # and the code: a run cached by an older ttt.py is redone
    monkeypatch.setattr(te, "RUN_CODE", (*te.RUN_CODE, "files.py"))
    assert te._task_fingerprint(task, opts, weights, spec) != base


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "1.5"], "--threshold must be in [0, 1], got 1.5"),
    (["--threshold", "nan"], "--threshold must be in [0, 1]"),
    (["--batches", "8", "0"], "--batches: TTT steps, batch and columns must be >= 1"),
    (["--online-lr", "0"], "--online-*: TTT lr must be positive"),
    (["--online-update", "columns", "--online-columns", "99"], "--online-*: update='columns'"),
    (["--images", "10", "--episodic-images", "20"], "--episodic-images (20) must be at most"),
    (["--stream", "6001"], "--stream 6001 exceeds the deployment pool's 6000 images"),
    (["--corruptions", "contrast", "gaussian_noise", "contrast"],
     "--corruptions lists a value more than once: contrast gaussian_noise contrast"),
    (["--batches", "8", "8"], "--batches lists a value more than once"),
])
def test_ttt_experiment_refuses_bad_options_with_one_line(tmp_path, capsys, flags, message):
    from ttspec_ros.cli import main

    out = tmp_path / "exp"
    assert main(["ttt-experiment", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything ran or was written


@pytest.mark.parametrize("flags", [["--severity", "7"], ["--corruption", "fog"],
                                   ["--ttt-update", "heads"], ["--seed", "-1"],
                                   ["--windows", "0"], ["--frames", "10001"]])
def test_ttt_ros_refuses_bad_options_before_starting_anything(tmp_path, flags):
    from ttspec_ros.cli import main

    out = tmp_path / "ros"
    try:
        code = main(["ttt-ros", "--out", str(out), *flags])
    except SystemExit as exc:  # argparse's own refusals (choices, types)
        code = exc.code
    assert code == 2
    assert not out.exists()
