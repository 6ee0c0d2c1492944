"""End to end on real processes: the three installed executables, started with the installed
config as the launch file starts them, fed Fashion-MNIST test images (56x56 rgb8) on
/ttspec/image_raw by this test process. A tiny random model keeps it cheap; its offline
answers (same Cascade, same preprocessing) are what the pipeline must reproduce.

The tests share one running pipeline and run in file order (module-scoped fixture).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from ttspec_ros import topics
from ttspec_ros.image_codec import encode_frame, encode_image

pytest.importorskip("rclpy")
probe_mod = pytest.importorskip("ttspec_ros.nodes.probe")
NodeProcess, Probe, wait_for = probe_mod.NodeProcess, probe_mod.Probe, probe_mod.wait_for
nodes = pytest.importorskip("ttspec_ros.nodes")

CAM, CLS, ADA = topics.CAMERA_NODE, topics.CLASSIFIER_NODE, topics.ADAPTER_NODE
RATE_HZ = 6.0  # keeps CPU modest on a shared 2-core machine
N_IMAGES = 36
STARTUP_S = 90.0


def _tiny_model(stem, with_decoders=False, seed=0, thresholds=(0.25, 0.25, 0.25)):
    from ttspec_ros.cascade import exit_costs
    from ttspec_ros.data import CLASS_NAMES
    from ttspec_ros.models.checkpoint import ModelCard, save_model
    from ttspec_ros.models.revcol import RevCol

    torch.manual_seed(seed)
    model = RevCol((8, 16, 16, 32), (1, 1, 1, 1), 4, 10, in_chans=1,
                   with_decoders=with_decoders).eval()
    card = ModelCard(model_id="", architecture=model.config.to_dict(),
                     class_names=list(CLASS_NAMES),
                     input={"channels": 1, "size": 32, "content_size": 28, "mean": [0.286],
                            "std": [0.353]},
                     thresholds=list(thresholds), exit_cost=exit_costs(model, 32))
    return save_model(model, card, stem)


def _rgb(image28: np.ndarray) -> np.ndarray:
    big = cv2.resize(image28, (56, 56), interpolation=cv2.INTER_LINEAR)
    return np.repeat(big[:, :, None], 3, axis=2)


@pytest.fixture(scope="module")
def data():
    from ttspec_ros.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return [_rgb(im) for im in images[:N_IMAGES]], labels[:N_IMAGES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    stem = tmp_path_factory.mktemp("model") / "tiny"
    return stem, _tiny_model(stem)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("e2e")
    stem, card = tiny
    state_dir = tmp / "adapter_state"
    procs = {
        CAM: NodeProcess(CAM, {"model": stem}, tmp),
        CLS: NodeProcess(CLS, {"model": stem}, tmp),
        # Disabled at first so predictions can be compared with the offline model.
        ADA: NodeProcess(ADA, {"model": stem, "state_dir": state_dir, "enabled": False,
                               "publish_period_s": 0.5, "learning_rate": 0.05}, tmp),
    }
    for p in procs.values():
        p.start()
    probe = Probe()
    try:
        up = probe.wait_until_up(procs, STARTUP_S) and wait_for(
            lambda: probe.count(CAM, nodes.MATCHED_FRAMES_READERS) > 0, STARTUP_S, 0.2)
        if not up:
            logs = "\n".join(f"--- {n}\n{p.log()[-2000:]}" for n, p in procs.items())
            pytest.fail(f"nodes did not come up in {STARTUP_S} s (diagnostics from "
                        f"{list(probe.diagnostics)}, spinning: {probe.spinning()})\n{logs}")
        yield {"procs": procs, "probe": probe, "stem": stem, "card": card,
               "state_dir": state_dir}
    finally:
        probe.close()
        for p in procs.values():
            p.stop(signal.SIGINT)


def _stream(probe, images, rate_hz=RATE_HZ, settle_s=3.0) -> list:
    """Publish ``images``; -> stamps in order. Waits until the last frame could be answered."""
    probe.clear()
    stamps = []
    for i, image in enumerate(images):
        stamp, _ = probe.publish_image(encode_image(image, "rgb8"), frame_id=str(i))
        stamps.append((stamp.sec, stamp.nanosec))
        time.sleep(1.0 / rate_hz)
    key = stamps[-1]
    wait_for(lambda: any((r.msg.header.stamp.sec, r.msg.header.stamp.nanosec) == key
                         for r in list(probe.predictions)), settle_s)
    time.sleep(0.3)
    return stamps


def _predictions(probe):
    with probe.lock:
        return [r.msg for r in probe.predictions]


def _offline(pipeline, images, threshold=None):
    from ttspec_ros.cascade import Cascade
    from ttspec_ros.models.checkpoint import load_model
    from ttspec_ros.preprocess import preprocess

    torch.set_num_threads(1)
    model, card = load_model(pipeline["stem"])
    cascade = Cascade(model, card.thresholds if threshold is None else threshold)
    return [cascade.run(torch.from_numpy(preprocess(im, card.input))) for im in images]


def test_predictions_match_the_offline_cascade(pipeline, data):
    probe = pipeline["probe"]
    images, labels = data
    stamps = _stream(probe, images)
    preds = _predictions(probe)
    index = {s: i for i, s in enumerate(stamps)}
    got = {index[(p.header.stamp.sec, p.header.stamp.nanosec)]: p for p in preds}
    assert len(got) == len(preds), "a prediction carries an unknown or repeated stamp"
    assert len(got) >= 0.7 * len(images), f"only {len(got)}/{len(images)} answered"
    assert all(p.header.frame_id == str(i) for i, p in got.items())
    offline = _offline(pipeline, images)
    agree = np.mean([got[i].class_id == offline[i].class_id
                     and got[i].exit_index == offline[i].exit_index for i in got])
    online_acc = np.mean([got[i].class_id == labels[i] for i in got])
    offline_acc = np.mean([offline[i].class_id == labels[i] for i in got])
    assert agree >= 0.95, f"only {agree:.2f} of the answers match the offline cascade"
    assert abs(online_acc - offline_acc) <= 0.05
    p = next(iter(got.values()))
    assert p.num_exits == 4 and len(p.exit_confidences) == p.exit_index + 1
    assert p.class_name == pipeline["card"].class_names[p.class_id] and p.latency_ms > 0
    # The counts on /diagnostics add up: every frame the classifier got was answered or dropped.
    wait_for(lambda: probe.count(CLS, "classified") >= len(preds), 3.0)
    d = probe.diag(CLS)
    assert int(d["classified"]) + int(d.get("dropped", 0)) + int(d.get("pending", 0)) == \
        int(d["received"])
    assert int(d["max_pending"]) <= 1


def _mean_exit(preds) -> float:
    return float(np.mean([p.exit_index for p in preds]))


def _diagnostics_after(probe, classified: int) -> dict[str, str]:
    """The classifier's /diagnostics once they count ``classified`` frames."""
    assert wait_for(lambda: probe.count(CLS, "classified") >= classified, 5.0)
    return probe.diag(CLS)


def test_threshold_set_live_changes_exit_depth(pipeline, data):
    probe = pipeline["probe"]
    images = data[0][:12]
    classified = probe.count(CLS, "classified")
    assert all(r.successful for r in probe.set_parameters(CLS, threshold=0.0))
    _stream(probe, images)
    low = _predictions(probe)
    assert low and all(p.exit_index == 0 for p in low)
    after_low = _diagnostics_after(probe, classified + len(low))
    assert all(r.successful for r in probe.set_parameters(CLS, threshold=1.0))
    _stream(probe, images)
    high = _predictions(probe)
    assert high and _mean_exit(high) > 2.5
    after_high = _diagnostics_after(probe, classified + len(low) + len(high))
    assert all(r.successful for r in probe.set_parameters(CLS, threshold=-1.0))
    # /diagnostics show the change in the means over the recent frames, where the means since
    # start dilute it.
    for key in ("exit", "cost"):
        recent, since_start = f"recent_mean_{key}", f"mean_{key}"
        assert float(after_high[recent]) > float(after_low[recent])
        assert (float(after_high[recent]) - float(after_low[recent])
                >= float(after_high[since_start]) - float(after_low[since_start]))
    assert float(after_high["recent_mean_cost"]) <= 1.0


@pytest.mark.parametrize(("values", "words"), [
    ({"threshold": 1.5}, ""),  # outside the descriptor's range: rclpy refuses
    ({"threshold": "high"}, ""),  # wrong type: rclpy refuses (statically typed)
    ({"threshold": -0.5}, "-1 or in [0, 1]"),
    ({"thresholds": [0.5, 0.5]}, "needs 3 values"),
    ({"max_exit": 9}, "at most 3"),
    ({"num_threads": 0}, ""),
    ({"model": "/nonexistent/model"}, "cannot load model"),
])
def test_invalid_parameters_are_refused_with_a_reason(pipeline, values, words):
    probe = pipeline["probe"]
    names = list(values)
    before = probe.get_parameters(CLS, *names)
    results = probe.set_parameters(CLS, **values)
    assert not results[0].successful and results[0].reason
    assert words in results[0].reason
    assert probe.get_parameters(CLS, *names) == before


def test_camera_transport_and_rate_set_live(pipeline, data):
    probe = pipeline["probe"]
    assert not probe.set_parameters(CAM, transport="mjpeg")[0].successful
    camera = pipeline["procs"][CAM]  # a refusal is logged too, not only returned to the caller
    assert wait_for(lambda: "refused parameters {'transport': 'mjpeg'}" in camera.log(), 5.0,
                    0.1), camera.log()[-2000:]
    assert probe.set_parameters(CAM, transport="compressed")[0].successful
    try:
        probe.clear()
        ok, png = cv2.imencode(".png", data[0][0])
        # The camera's new subscription needs discovery before it hears the probe: send again
        # until one frame comes back (a frame sent before the match is lost, not a failure).
        stamps = []

        def answered() -> bool:
            stamps.append(probe.publish_compressed(png.tobytes(), "png"))
            return wait_for(lambda: any(p.header.stamp in stamps for p in _predictions(probe)),
                            0.5)

        assert wait_for(answered, 10.0, interval=0.0)
        # A float64 colour TIFF is refused by reason; the camera used to die of it (cv2.error).
        ok, tiff = cv2.imencode(".tiff", np.ones((28, 28, 3), np.float64))
        probe.publish_compressed(tiff.tobytes(), "tiff")
        assert wait_for(lambda: probe.count(CAM, "rejected_unsupported_encoding") >= 1, 5.0), \
            probe.diag(CAM)
        stamps.clear()
        assert wait_for(answered, 5.0, interval=0.0)  # and it still answers
    finally:  # later tests share this camera: never leave it on the compressed stream
        assert probe.set_parameters(CAM, transport="raw")[0].successful
    before = probe.count(CAM, "dropped_rate_limit")
    assert probe.set_parameters(CAM, max_rate_hz=2.0)[0].successful
    # A rejected image does not use up the period: the good one right after it passes.
    time.sleep(0.6)
    probe.clear()
    probe.publish_image(_bad_images()["truncated"])
    stamp, _ = probe.publish_image(encode_image(data[0][0], "rgb8"))
    assert wait_for(lambda: any(p.header.stamp == stamp for p in _predictions(probe)), 3.0), \
        probe.diag(CAM)
    stamps = _stream(probe, data[0][:8], rate_hz=8.0)  # 1 s at 8 Hz: about 2 pass
    # The limit is on the camera's clock, so the bound is on the span the frames really took
    # to send (a loaded machine stretches it): one frame per 0.5 s, +1 for delivery jitter.
    span_s = (stamps[-1][0] - stamps[0][0]) + (stamps[-1][1] - stamps[0][1]) / 1e9
    passed = len(_predictions(probe))
    assert 1 <= passed <= int(span_s * 2.0) + 2, (passed, span_s)
    assert wait_for(lambda: probe.count(CAM, "dropped_rate_limit") >= before + 8 - passed, 3.0)
    assert probe.set_parameters(CAM, max_rate_hz=0.0)[0].successful
    # QoS of image_raw is overridable the standard way (read-only parameters), and so is the
    # frames publisher (a classifier reading frames reliably needs a reliable writer).
    names = probe.list_parameters(CAM)
    assert "qos_overrides./ttspec/image_raw.subscription.reliability" in names
    assert "qos_overrides./ttspec/frames.publisher.reliability" in names


def test_yuv_and_bayer_camera_frames_are_answered(pipeline, data):
    """USB/CSI drivers publish YUV 4:2:2, raw sensors Bayer mosaics: decoded, not rejected."""
    probe = pipeline["probe"]
    rgb = data[0][1]
    h, w = rgb.shape[:2]
    bayer = rgb[:, :, 1].copy()  # a grey image: every Bayer site holds the same value
    frames = {"yuv422": cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY),
              "yuv422_yuy2": cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YUY2),
              "bayer_rggb8": bayer}
    for encoding, raw in frames.items():
        fields = {"height": h, "width": w, "encoding": encoding, "is_bigendian": 0,
                  "step": raw.strides[0], "data": raw.tobytes()}
        stamps: list = []

        def answered(fields=fields, stamps=stamps) -> bool:  # best effort: one may be lost
            stamps.append(probe.publish_image(fields)[0])
            return wait_for(lambda: any(p.header.stamp in stamps for p in _predictions(probe)),
                            1.0)

        assert wait_for(answered, 6.0, interval=0.0), (encoding, probe.diag(CAM))


def test_adapter_parameters_set_live(pipeline):
    probe = pipeline["probe"]
    assert probe.set_parameters(ADA, batch_size=2)[0].successful
    assert probe.set_parameters(ADA, batch_size=1)[0].successful
    assert not probe.set_parameters(ADA, learning_rate=0.0)[0].successful
    assert not probe.set_parameters(ADA, model="/elsewhere")[0].successful  # read-only
    assert not probe.set_parameters(ADA, state_dir="/elsewhere")[0].successful


def _bad_images() -> dict[str, dict]:
    good = encode_image(np.zeros((40, 40, 3), np.uint8), "rgb8")
    return {
        "unsupported_encoding": {**good, "encoding": "nv12"},
        "wrong_step": {**good, "step": 100},
        "truncated": {**good, "data": good["data"][:-7]},
        "zero_size": {**good, "height": 0, "data": b""},
        "absurd_size": {**good, "height": 1_000_000},
    }


def test_malformed_images_are_rejected_counted_and_survived(pipeline, data):
    probe = pipeline["probe"]
    for fields in _bad_images().values():
        probe.publish_image(fields)
        time.sleep(0.1)
    expected = {f"rejected_{reason}" for reason in _bad_images()}
    assert wait_for(lambda: all(probe.count(CAM, k) >= 1 for k in expected), 5.0), \
        probe.diag(CAM)
    assert wait_for(lambda: any("new: rejected" in m  # level WARN on /diagnostics
                                for m in probe.warnings.get(f"/ttspec/{CAM}", ())), 3.0)
    _stream(probe, data[0][:3])
    assert _predictions(probe), "no prediction after the malformed images"
    assert pipeline["procs"][CAM].alive()


def _send_until_counted(probe, tensor, node, key, timeout=10.0) -> bool:
    """Publish a frame straight on ``frames`` until ``node`` counts it under ``key``: the
    probe's new best-effort publisher may send before the subscriber has matched it, and a
    frame sent then is lost (not a failure of the node)."""
    before = probe.count(node, key)

    def counted() -> bool:
        probe.publish_frame(encode_frame(tensor))
        return wait_for(lambda: probe.count(node, key) > before, 1.5)

    return wait_for(counted, timeout, interval=0.0)


def _unnormalised_frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (1, 32, 32)).astype(np.float32)


def _nan_frame() -> np.ndarray:
    tensor = np.zeros((1, 32, 32), np.float32)
    tensor[0, 5, 5] = np.nan
    return tensor


def test_bad_frames_are_rejected_by_the_classifier(pipeline, data):
    """Frames straight on ``frames`` (another sender than our camera): NaN would be answered
    as class 0 at the last exit, another size would fail inside the model."""
    probe = pipeline["probe"]
    assert _send_until_counted(probe, _nan_frame(), CLS, "rejected_non_finite"), probe.diag(CLS)
    assert _send_until_counted(probe, np.zeros((1, 16, 16), np.float32), CLS,
                               "rejected_wrong_shape"), probe.diag(CLS)
    # Right size, finite, but not normalised (raw 0..255 pixels): answered confidently before.
    assert _send_until_counted(probe, _unnormalised_frame(), CLS, "rejected_out_of_range"), \
        probe.diag(CLS)
    _stream(probe, data[0][:3])
    assert _predictions(probe), "no prediction after the bad frames"


def test_mismatched_model_updates_are_rejected(pipeline):
    from ttspec_ros.model_update import ModelUpdatePayload, to_msg

    probe = pipeline["probe"]
    model_id = pipeline["card"].model_id
    w = "cls_blocks.0.classifier.1.weight"
    bad = [
        ModelUpdatePayload("another-model", 99, {w: np.zeros((10, 32), np.float32)}),
        ModelUpdatePayload(model_id, 99, {"no.such.tensor": np.zeros(3, np.float32)}),
        ModelUpdatePayload(model_id, 99, {w: np.zeros((10, 31), np.float32)}),
    ]
    before = probe.count(CLS, "updates_rejected")
    warned = pipeline["procs"][CLS].log().count("rejected model update")
    probe.publish_updates([to_msg(payload) for payload in bad])
    assert wait_for(lambda: probe.count(CLS, "updates_rejected") >= before + 3, 5.0)
    assert probe.diag(CLS)["model_version"] != "99"
    # Warnings are throttled by kind (another model's; refused), not by message: the two
    # refused ones name different problems, yet a flood of such must not give a line each.
    time.sleep(0.5)  # the log is written as the node runs
    new_warnings = pipeline["procs"][CLS].log().count("rejected model update") - warned
    assert new_warnings <= 2, pipeline["procs"][CLS].log()[-2000:]


def test_adaptation_loop_raises_the_model_version(pipeline, data):
    probe = pipeline["probe"]
    assert probe.set_parameters(ADA, enabled=True)[0].successful
    _stream(probe, data[0] + data[0][:12])
    versions = [p.model_version for p in _predictions(probe)]
    assert max(versions) > min(versions) >= 0, versions
    assert wait_for(lambda: probe.count(ADA, "samples_used") > 0, 3.0)
    assert int(probe.diag(CLS)["updates_applied"]) >= 1


def test_a_late_classifier_gets_the_latest_update(pipeline, tmp_path):
    """A classifier started (or restarted) later, elsewhere, fed by the same adapter: the
    transient-local update is waiting for it. One adapter, several classifiers."""
    probe = pipeline["probe"]
    published = int(probe.diag(ADA)["published_version"])
    assert published > 0
    late = NodeProcess(CLS, {"model": pipeline["stem"]}, tmp_path, namespace="ttspec_late",
                       extra_args=["-r", f"model_updates:=/ttspec/{topics.MODEL_UPDATES}",
                                   "-r", f"adaptation_samples:=/ttspec/"
                                         f"{topics.ADAPTATION_SAMPLES}"]).start()
    try:
        def late_version():
            with probe.lock:
                d = probe.diagnostics.get(f"/ttspec_late/{CLS}", {})
            return int(d.get("model_version", -1)) >= published
        assert wait_for(late_version, STARTUP_S, 0.2), late.log()[-2000:]
    finally:
        assert late.stop(signal.SIGINT) == 0


def test_live_model_change_takes_the_new_card_and_keeps_each_models_adaptation(pipeline,
                                                                               tmp_path):
    probe = pipeline["probe"]

    def thresholds():
        return list(probe.get_parameters(CLS, "thresholds")["thresholds"])

    def serving(model_id):
        return wait_for(lambda: probe.diag(CLS)["model_id"] == model_id, 5.0)

    adapted = int(probe.diag(CLS)["model_version"])
    assert adapted > 0, "the adaptation tests before this one should have adapted the model"
    assert thresholds() == [0.25] * 3  # the card's
    other = _tiny_model(tmp_path / "other", seed=1, thresholds=(0.4, 0.4, 0.4))
    assert probe.set_parameters(CLS, model=str(tmp_path / "other"))[0].successful
    assert serving(other.model_id), probe.diag(CLS)
    assert probe.diag(CLS)["model_version"] == "0"
    # An update for the model not running now cannot be checked yet: a bad one (kept, and
    # tried first at the switch back) must not cost the good one before it.
    from ttspec_ros.model_update import ModelUpdatePayload, to_msg

    rejected = probe.count(CLS, "updates_rejected")
    probe.publish_updates([to_msg(ModelUpdatePayload(
        pipeline["card"].model_id, 10**6, {"cls_blocks.0.bogus": np.zeros(3, np.float32)}))])
    assert wait_for(lambda: probe.count(CLS, "updates_rejected") > rejected, 5.0)
    # Thresholds still at the old card's defaults follow the new card.
    assert wait_for(lambda: thresholds() == [0.4] * 3, 5.0), thresholds()
    # Model and thresholds in one request (applied one after the other): the thresholds
    # given win over the card's.
    results = probe.set_parameters(CLS, model=str(pipeline["stem"]), thresholds=[0.5] * 3)
    assert all(r.successful for r in results), results
    assert serving(pipeline["card"].model_id), probe.diag(CLS)
    # Back on the adapted model: its latest good update applies again (it was latched once).
    assert wait_for(lambda: int(probe.diag(CLS)["model_version"]) >= adapted, 5.0), \
        probe.diag(CLS)
    assert int(probe.diag(CLS)["model_version"]) < 10**6
    time.sleep(0.5)
    assert thresholds() == [0.5] * 3
    # Thresholds set by hand stay across a model change.
    assert probe.set_parameters(CLS, model=str(tmp_path / "other"))[0].successful
    assert serving(other.model_id), probe.diag(CLS)
    time.sleep(0.5)
    assert thresholds() == [0.5] * 3
    results = probe.set_parameters(CLS, model=str(pipeline["stem"]), thresholds=[0.25] * 3)
    assert all(r.successful for r in results), results
    assert serving(pipeline["card"].model_id), probe.diag(CLS)


def test_onnxruntime_classifier_classifies_and_applies_head_updates(pipeline, data, tmp_path):
    """backend onnxruntime, fed by the pipeline's camera: answers as the torch cascade does,
    takes a head update (heads stay in torch) and refuses a backbone tensor (fixed graphs)."""
    from ttspec_ros.model_update import ModelUpdatePayload, to_msg

    probe = pipeline["probe"]
    ort = NodeProcess(CLS, {"model": pipeline["stem"], "backend": "onnxruntime"}, tmp_path,
                      namespace="ttspec_ort",
                      extra_args=["-r", f"frames:=/ttspec/{topics.FRAMES}"]).start()
    ort_probe = probe_mod.Probe(namespace="ttspec_ort", name="ttspec_probe_ort")
    try:
        assert wait_for(lambda: ort_probe.seen(CLS), STARTUP_S, 0.2), ort.log()[-2000:]
        assert ort_probe.diag(CLS)["backend"] == "onnxruntime"
        # The sessions' thread count is fixed: a live change is refused, saying why.
        (refused,) = ort_probe.set_parameters(CLS, num_threads=2)
        assert not refused.successful and "onnxruntime" in refused.reason, refused
        images = data[0][:12]
        stamps = _stream(probe, images)
        time.sleep(0.5)
        index = {s: i for i, s in enumerate(stamps)}
        got = {index[(p.header.stamp.sec, p.header.stamp.nanosec)]: p
               for p in _predictions(ort_probe)}
        assert len(got) >= 8, f"only {len(got)}/{len(images)} answered"
        offline = _offline(pipeline, images)
        agree = np.mean([got[i].class_id == offline[i].class_id
                         and got[i].exit_index == offline[i].exit_index for i in got])
        assert agree >= 0.9, agree
        # Heads that answer class 3 at exit 0 whatever the image.
        heads = {}
        for i in range(4):
            name = f"cls_blocks.{i}.classifier.1"
            bias = np.zeros(10, np.float32)
            bias[3] = 50.0
            heads[f"{name}.weight"] = np.zeros((10, 32), np.float32)
            heads[f"{name}.bias"] = bias
        model_id = pipeline["card"].model_id
        backbone = {"stem.0.weight": np.zeros((8, 1, 4, 4), np.float32)}
        ort_probe.publish_updates([to_msg(ModelUpdatePayload(model_id, 7, heads)),
                                   to_msg(ModelUpdatePayload(model_id, 8, backbone))])
        assert wait_for(lambda: ort_probe.count(CLS, "updates_rejected") >= 1, 5.0)
        d = ort_probe.diag(CLS)
        assert d["updates_applied"] == "1" and d["model_version"] == "7", d
        assert "fixed graph" in d["last_update_rejection"]
        ort_probe.clear()
        _stream(probe, images[:6])
        time.sleep(0.5)
        after = _predictions(ort_probe)
        assert len(after) >= 3
        assert all(p.class_id == 3 and p.exit_index == 0 and p.model_version == 7
                   for p in after)
        assert ort.stop(signal.SIGINT) == 0
        assert "Traceback" not in ort.log()
    finally:
        ort_probe.close()
        ort.stop(signal.SIGKILL)


def test_sigusr1_prints_the_stacks_and_the_node_runs_on(pipeline, data):
    cls = pipeline["procs"][CLS]
    cls.proc.send_signal(signal.SIGUSR1)
    # Every thread's stack, the main thread's spinning in rclpy (the dump is written a thread
    # at a time, so wait for both).
    assert wait_for(lambda: "most recent call first" in (log := cls.log()) and "rclpy" in log,
                    10.0, 0.1), cls.log()[-2000:]
    assert cls.alive()
    probe = pipeline["probe"]
    probe.clear()
    assert _stream(probe, data[0][:5]) and _predictions(probe), "no predictions after SIGUSR1"


def test_diagnostics_count_the_dds_matched_endpoints(pipeline):
    """What the replay driver waits on before its first frame (the graph lists a reader
    before the writer has matched it): each writer's matched readers, the best-effort
    readers' matched writers, and they follow a reader that joins and leaves."""
    from rclpy.subscription import Subscription

    probe = pipeline["probe"]
    frames_readers = lambda: probe.count(CAM, nodes.MATCHED_FRAMES_READERS)  # noqa: E731
    assert wait_for(lambda: frames_readers() >= 1, 5.0)  # the classifier
    base = frames_readers()
    for key in (nodes.MATCHED_PREDICTIONS_READERS, nodes.MATCHED_SAMPLES_READERS):
        assert probe.count(CLS, key) >= 1, (key, probe.diag(CLS))  # the probe, the adapter
    if hasattr(Subscription, "get_publisher_count"):  # Iron and later
        assert probe.count(CAM, nodes.MATCHED_IMAGES_WRITERS) >= 1  # the probe
        assert probe.count(CLS, nodes.MATCHED_FRAMES_WRITERS) >= 1  # the camera
    probe.watch_frames(True)
    try:
        assert wait_for(lambda: frames_readers() == base + 1, 5.0), probe.diag(CAM)
    finally:
        probe.watch_frames(False)
    assert wait_for(lambda: frames_readers() == base, 5.0), probe.diag(CAM)


def test_unavailable_backend_exits_with_one_clear_line(tmp_path, tiny):
    """No tensorrt package and no GPU here: the classifier says so and exits 1."""
    trt = NodeProcess(CLS, {"model": tiny[0], "backend": "tensorrt", "device": "cuda:0"},
                      tmp_path, namespace="ttspec_trt").start()
    trt.proc.wait(60)
    log = trt.log()
    assert trt.proc.returncode == 1, log
    assert "Traceback" not in log and "backend 'tensorrt' is unavailable" in log, log
    assert "tensorrt" in log.splitlines()[-1] or "CUDA" in log, log


def test_adapter_runs_the_forgetting_guard_from_an_anchors_file(tmp_path, tiny):
    """anchors_file turns the guard on (logged, in diagnostics); anchors of another model are
    refused at start with one clear line. The guard's behaviour is tested in test_specialize."""
    from ttspec_ros.guard import build_anchor_set
    from ttspec_ros.models.checkpoint import load_model

    stem, card = tiny
    model, _ = load_model(stem)
    images = torch.randn(60, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    good = build_anchor_set(model, images, model_id=card.model_id).save(tmp_path / "good.st")
    other = build_anchor_set(model, images, model_id="another").save(tmp_path / "other.st")

    from ttspec_ros.guard import AnchorSet

    anchors = AnchorSet.load(good)
    # Labels beyond the heads' classes are found when the guard binds to the heads.
    beyond = AnchorSet(anchors.features, np.full(anchors.labels.shape, 99),
                       model_id=card.model_id).save(tmp_path / "beyond.st")
    for path, reason in ((other, "anchors come from model 'another'"),
                         (beyond, "anchor labels must lie in [0, 9]")):
        refused = NodeProcess(ADA, {"model": stem, "anchors_file": path}, tmp_path,
                              namespace="ttspec_guard_bad").start()
        refused.proc.wait(60)
        log = refused.log()
        assert refused.proc.returncode == 1 and "Traceback" not in log, log
        assert f"anchors_file {path}: {reason}" in log, log

    ns = "ttspec_guard"
    adapter = NodeProcess(ADA, {"model": stem, "anchors_file": good}, tmp_path,
                          namespace=ns).start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_guard")
    try:
        assert wait_for(lambda: probe.seen(ADA), STARTUP_S, 0.2), adapter.log()[-2000:]
        assert f"forgetting guard with 60 anchors from {good}" in adapter.log()
        assert probe.diag(ADA)["guard_anchors"] == "60"
        assert adapter.stop(signal.SIGINT) == 0
    finally:
        probe.close()
        adapter.stop(signal.SIGKILL)


def test_adapter_learns_from_a_partly_filled_batch_before_its_shutdown_save(tmp_path, tiny):
    """batch_size 3, two samples received, then SIGINT: the saved state holds the step on
    those two (before, they were dropped and version 0 was saved)."""
    from ttspec_ros.msg import AdaptationSample

    from ttspec_ros.nodes import qos

    stem, card = tiny
    ns, state = "ttspec_flush", tmp_path / "state"
    adapter = NodeProcess(ADA, {"model": stem, "state_dir": state, "batch_size": 3}, tmp_path,
                          namespace=ns).start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_flush")
    try:
        assert wait_for(lambda: probe.seen(ADA), STARTUP_S, 0.2), adapter.log()[-2000:]
        pub = probe.node.create_publisher(
            AdaptationSample, f"{probe.ns}/{topics.ADAPTATION_SAMPLES}", qos(topics.QOS_RELIABLE))
        assert wait_for(lambda: pub.get_subscription_count() > 0, 10.0)
        dim = card.architecture["channels"][-1]
        for class_id in (2, 5):
            pub.publish(AdaptationSample(model_id=card.model_id, exit_index=2,
                                         class_id=class_id, confidence=0.99,
                                         feature_sizes=[dim, dim],
                                         features=[0.5] * dim + [-0.25] * dim))
        assert wait_for(lambda: probe.count(ADA, "samples_used") == 2, 10.0), probe.diag(ADA)
        assert probe.diag(ADA)["specializer_pending"] == "2"
        assert adapter.stop(signal.SIGINT) == 0
        with safe_open(str(state / "specializer.safetensors"), framework="numpy") as f:
            meta = json.loads(f.metadata()["state"])
        assert meta["version"] == 1 and meta["counters"]["steps"] == 1, meta
    finally:
        probe.close()
        adapter.stop(signal.SIGKILL)


DRAIN_SCRIPT = """
import sys, rclpy
from ttspec_ros.msg import AdaptationSample
from ttspec_ros.nodes import adapter as adapter_mod
stem, state, dim, model_id, drain_s = sys.argv[1:6]
adapter_mod.DRAIN_S = float(drain_s)
rclpy.init(args=["--ros-args", "-r", "__ns:=/ttspec_drain", "-p", f"model:={stem}",
                 "-p", f"state_dir:={state}"])
node = adapter_mod.AdapterNode()
with node._cond:  # the trainer stops as if it had lagged: what arrives next stays queued
    node._stop = True
    node._cond.notify_all()
node._worker.join()
dim = int(dim)
for class_id in (1, 2, 3):
    node._on_sample(AdaptationSample(model_id=model_id, exit_index=2, class_id=class_id,
                                     confidence=0.99, feature_sizes=[dim, dim],
                                     features=[0.5] * dim + [-0.25] * dim))
print("queued", len(node._queue), flush=True)
node.close()
print("left", len(node._queue), "steps", node.specializer.counters["steps"], flush=True)
node.destroy_node()
rclpy.shutdown()
"""


DIVERGE_SCRIPT = """
import sys, time, rclpy
from ttspec_ros.msg import AdaptationSample
from ttspec_ros.nodes import adapter as adapter_mod
stem, dim, model_id = sys.argv[1:4]
rclpy.init(args=["--ros-args", "-r", "__ns:=/ttspec_diverge", "-p", f"model:={stem}"])
node = adapter_mod.AdapterNode()
# Beyond learning_rate's range, so that one step diverges (lr 0.05 with momentum 0.9 took
# thousands of steps to the same state on the demo model).
node.specializer.lr = 1e8
dim = int(dim)
node._on_sample(AdaptationSample(model_id=model_id, exit_index=2, class_id=3, confidence=0.99,
                                 feature_sizes=[dim, dim], features=[0.5] * dim + [-0.25] * dim))
deadline = time.monotonic() + 20
while node.specializer.counters["overflows"] == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
_, values = node._diagnostic_values()
print("overflows", values["specializer_overflows"], flush=True)
sent = []
node._diagnostics._pub.publish = sent.append  # the report /diagnostics would get
node._diagnostics.publish()
print("level", sent[0].status[0].level[0], sent[0].status[0].message, flush=True)
node.close()
node.destroy_node()
rclpy.shutdown()
"""


RESET_SCRIPT = """
import sys, threading, numpy as np, rclpy, torch
from std_srvs.srv import Trigger
from ttspec_ros.model_update import from_msg
from ttspec_ros.models.checkpoint import load_model
from ttspec_ros.nodes import adapter as adapter_mod
stem = sys.argv[1]
rclpy.init(args=["--ros-args", "-r", "__ns:=/ttspec_reset", "-p", f"model:={stem}",
                 "-p", "strategy:=ttt_online", "-p", "ttt_update:=columns"])
node = adapter_mod.AdapterNode()
original = load_model(stem)[0].state_dict()
sent = []
node._update_pub.publish = sent.append
stop = threading.Event()
def train():  # the frames thread, adapting as fast as it can
    while not stop.is_set():
        node.ttt.adapt(torch.rand(1, 32, 32))
worker = threading.Thread(target=train)
worker.start()
bad = 0
for _ in range(20):
    node._on_reset(Trigger.Request(), Trigger.Response())
    payload = from_msg(sent[-1])
    bad += any(not np.array_equal(v, original[k].numpy()) for k, v in payload.tensors.items()
               if not k.startswith("cls_blocks."))
stop.set()
worker.join()
print("resets 20 not original", bad, "tensors", len(payload.tensors), flush=True)
node.close()
node.destroy_node()
rclpy.shutdown()
"""


def test_a_reset_publishes_the_original_backbone_while_frames_train(tmp_path):
    """Reset and publish are one step: frames trained between them made a reset publish a
    trained backbone while replying that it was the original (a review: 6 of 64 at 20 Hz)."""
    stem = tmp_path / "tiny_y"
    _tiny_model(stem, with_decoders=True)
    out = subprocess.run([sys.executable, "-c", RESET_SCRIPT, str(stem)], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"resets 20 not original 0 tensors [1-9]", out.stdout), out.stdout


SAVE_SCRIPT = """
import sys, rclpy
from pathlib import Path
from std_srvs.srv import Trigger
from ttspec_ros.nodes import adapter as adapter_mod
stem, state = sys.argv[1:3]
rclpy.init(args=["--ros-args", "-r", "__ns:=/ttspec_save", "-p", f"model:={stem}",
                 "-p", "save_period_s:=3600.0"]
                + (["-p", f"state_dir:={state}"] if state else []))  # `:=` alone does not parse
node = adapter_mod.AdapterNode()
sent = []
node._diagnostics._pub.publish = sent.append  # the reports /diagnostics would get
def report(what):
    node._diagnostics.publish()
    print(what, "level", sent[-1].status[0].level[0], sent[-1].status[0].message, flush=True)
if state:  # saved once; then the state file's path taken by a directory: renames fail
    assert node._on_save(Trigger.Request(), Trigger.Response()).success
    blocker = Path(state) / "specializer.safetensors"
    blocker.unlink()
    blocker.mkdir()
reply = node._on_save(Trigger.Request(), Trigger.Response())
print("save", reply.success, reply.message, flush=True)
report("after")
if state:
    blocker.rmdir()
    node._periodic_save()  # nothing new to save, but the last save failed: it tries again
    print("saves", node.stats.snapshot().get("saves"), flush=True)
    report("retried")
node.close()
node.destroy_node()
rclpy.shutdown()
"""


@pytest.mark.parametrize("with_state_dir", [False, True])
def test_a_refused_or_failed_save_does_not_leave_the_adapter_at_error(tiny, tmp_path,
                                                                      with_state_dir):
    """~/save without a state_dir is a refused request: counted as a failing save job it kept
    the adapter at ERROR for good. A failed save is retried by the periodic save even with
    nothing new to save (an idle adapter stayed at ERROR until its state changed)."""
    stem, _ = tiny
    state = str(tmp_path / "state") if with_state_dir else ""
    out = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(stem), state],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    if not with_state_dir:
        assert "save False not saved: state_dir is ''" in out.stdout, out.stdout
        assert re.search(r"after level 0 ", out.stdout), out.stdout  # OK, not ERROR
    else:
        assert "save False not saved:" in out.stdout, out.stdout
        assert re.search(r"after level [12] .*save_errors", out.stdout), out.stdout
        assert "saves 2" in out.stdout and re.search(r"retried level 0 ", out.stdout), \
            out.stdout


def test_adapter_warns_when_specialization_diverges(tiny):
    """A step whose heads overflow or diverge is rolled back (test_specialize); the adapter says
    so in its log, naming the settings to lower, and counts it as a WARN on /diagnostics."""
    stem, card = tiny
    out = subprocess.run(
        [sys.executable, "-c", DIVERGE_SCRIPT, str(stem), str(card.architecture["channels"][-1]),
         card.model_id], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "overflows 1" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "a specialization step overflowed" in out.stderr and "lower them" in out.stderr, \
        out.stderr[-2000:]
    assert re.search(r"level 1 .*new: specializer_overflows", out.stdout), out.stdout  # WARN


@pytest.mark.parametrize("drain_s", [2.0, 0.0])
def test_adapter_trains_on_queued_samples_at_shutdown_within_its_bound(tmp_path, tiny, drain_s):
    """Samples received but not yet trained on when the node stops (the trainer lagged) are
    trained on before the shutdown save, for at most DRAIN_S; past it they are named in a
    warning and not saved as if learnt."""
    stem, card = tiny
    state = tmp_path / "state"
    out = subprocess.run(
        [sys.executable, "-c", DRAIN_SCRIPT, str(stem), str(state),
         str(card.architecture["channels"][-1]), card.model_id, str(drain_s)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "queued 3" in out.stdout
    with safe_open(str(state / "specializer.safetensors"), framework="numpy") as f:
        saved_steps = json.loads(f.metadata()["state"])["counters"]["steps"]
    if drain_s:
        assert "left 0 steps 3" in out.stdout and saved_steps == 3, out.stdout
    else:
        assert "left 3 steps 0" in out.stdout and saved_steps == 0, out.stdout
        assert "3 received samples not trained on at shutdown" in out.stderr

def test_adapter_save_and_reset_services(pipeline):
    probe = pipeline["probe"]
    saved = probe.trigger(ADA, "save")
    assert saved.success and "saved version" in saved.message
    version = int(probe.diag(ADA)["model_version"])
    probe.watch_updates()
    reset = probe.trigger(ADA, "reset")
    assert reset.success and "reset" in reset.message
    # The reset heads go out as a newer version, so classifiers take them.
    assert wait_for(lambda: any(u.msg.version > version for u in list(probe.updates)), 5.0)


def test_a_second_adapter_on_the_same_state_dir_is_refused(pipeline, tmp_path):
    """Two pipelines on one state_dir resumed each other's heads; the second one now stops at
    start naming the directory and its holder. And published.json reserves versions ahead
    (it was rewritten and fsynced at every publication)."""
    from ttspec_ros.model_update import PUBLISHED_FILE, PublishedRecord

    probe = pipeline["probe"]
    other = NodeProcess(ADA, {"model": pipeline["stem"], "state_dir": pipeline["state_dir"]},
                        tmp_path, namespace="ttspec_left").start()
    other.proc.wait(STARTUP_S)
    log = other.log()
    assert other.proc.returncode == 1, log[-2000:]
    assert "is in use by another process (pid" in log and "Traceback" not in log, log[-2000:]
    published = _int(probe.diag(ADA), "published_version")
    record = json.loads((pipeline["state_dir"] / PUBLISHED_FILE).read_text())
    assert published < record["version"] <= published + PublishedRecord.RESERVE, \
        (published, record)


def test_a_failing_save_is_reported_and_survived(pipeline):
    """A directory where the state file goes makes the save's rename fail: the service says
    so, /diagnostics counts it, and the next save, once the path is free, works."""
    probe = pipeline["probe"]
    target = pipeline["state_dir"] / "specializer.safetensors"
    kept = target.with_name("kept.safetensors")
    target.rename(kept)
    target.mkdir()
    try:
        errors = probe.count(ADA, "errors")
        failed = probe.trigger(ADA, "save")
        assert not failed.success and "not saved" in failed.message, failed
        assert wait_for(lambda: probe.count(ADA, "errors") > errors, 5.0), probe.diag(ADA)
        assert "saving the state" in probe.diag(ADA)["last_error"]
    finally:
        target.rmdir()
        kept.rename(target)
    assert probe.trigger(ADA, "save").success
    assert pipeline["procs"][ADA].alive()


def test_adapter_restart_resumes_and_the_classifier_keeps_running(pipeline, data):
    probe, adapter = pipeline["probe"], pipeline["procs"][ADA]
    assert adapter.stop(signal.SIGTERM) == 0
    saved = pipeline["state_dir"] / "specializer.safetensors"
    assert saved.is_file(), "adapter did not save its state on SIGTERM"
    with safe_open(str(saved), framework="numpy") as f:
        saved_version = json.loads(f.metadata()["state"])["version"]
    assert saved_version > 0
    # The classifier keeps answering with the adapter gone.
    _stream(probe, data[0][:8])
    answered = _predictions(probe)
    assert len(answered) >= 5
    assert max(p.model_version for p in answered) <= saved_version
    adapter.start()
    probe.watch_updates()  # a late joiner: transient local hands over the latest update
    first = wait_for(lambda: list(probe.updates), STARTUP_S, 0.2)
    assert first, adapter.log()[-2000:]
    assert first[0].msg.model_id == pipeline["card"].model_id
    assert first[0].msg.version >= saved_version
    assert wait_for(lambda: "resumed" in adapter.log(), 10.0), adapter.log()[-2000:]


def _int(d: dict, key: str) -> int:
    return int(d[key]) if d.get(key, "None") != "None" else -1


def test_a_killed_adapter_numbers_its_updates_above_the_last_published(pipeline, data):
    """Killed after publishing more than it saved: the resumed (older) heads must not come
    back under a number the classifiers already hold with other heads."""
    probe, adapter = pipeline["probe"], pipeline["procs"][ADA]
    # enabled: the restarted adapter came up with the pipeline's enabled:=false
    assert all(r.successful for r in probe.set_parameters(ADA, enabled=True, save_period_s=3600.0))
    _stream(probe, data[0][:16])
    assert wait_for(lambda: _int(probe.diag(ADA), "published_version")
                    > _int(probe.diag(ADA), "saved_version"), 5.0), probe.diag(ADA)
    time.sleep(1.0)  # the last change is published (publish_period_s 0.5)
    probe.watch_updates()
    latched = wait_for(lambda: list(probe.updates), 5.0)
    assert latched
    published = latched[-1].msg.version
    assert adapter.stop(signal.SIGKILL) != 0  # no shutdown save
    adapter.start()
    probe.watch_updates()
    first = wait_for(lambda: list(probe.updates), STARTUP_S, 0.2)
    assert first, adapter.log()[-2000:]
    assert first[0].msg.version > published, (first[0].msg.version, published)
    assert wait_for(lambda: int(probe.diag(CLS)["model_version"]) == first[0].msg.version,
                    5.0), probe.diag(CLS)


def test_an_update_numbered_below_the_applied_one_is_applied_and_reported(pipeline):
    """An adapter restarted without state_dir starts again at version 0: the classifier takes
    its heads (they are the adapter's state now) but says that the numbers went back, so
    model_version no longer names one set of tensors."""
    from ttspec_ros.model_update import ModelUpdatePayload, from_msg, to_msg

    probe = pipeline["probe"]
    probe.watch_updates()
    assert wait_for(lambda: list(probe.updates), 5.0)
    latest = from_msg(probe.updates[-1].msg)
    assert latest.version > 0
    before = probe.count(CLS, "updates_applied")
    probe.publish_updates([to_msg(ModelUpdatePayload(latest.model_id, 0, latest.tensors))])
    assert wait_for(lambda: probe.count(CLS, "updates_version_went_back") == 1, 5.0), \
        probe.diag(CLS)
    assert probe.count(CLS, "updates_applied") >= before + 1  # applied, not refused
    assert wait_for(lambda: any("new: updates_version_went_back" in m for m in
                                probe.warnings.get(f"/ttspec/{CLS}", ())), 3.0)
    assert "is older than the v" in pipeline["procs"][CLS].log()


def test_sigint_and_sigterm_shut_down_cleanly(pipeline):
    procs = pipeline["procs"]
    codes = {CAM: procs[CAM].stop(signal.SIGINT), CLS: procs[CLS].stop(signal.SIGTERM),
             ADA: procs[ADA].stop(signal.SIGINT)}
    assert codes == {CAM: 0, CLS: 0, ADA: 0}
    for name, p in procs.items():
        assert "Traceback" not in p.log(), f"{name}:\n{p.log()[-3000:]}"


def test_shutdown_under_load_and_a_second_sigint_stay_clean(tmp_path, tiny):
    """Ctrl-C while frames stream in, pressed twice: the frame in flight when the context
    goes is not logged as a failed frame, and the second SIGINT neither interrupts close()
    with a KeyboardInterrupt nor kills the process (exit 0)."""
    ns = "ttspec_stop"
    cls = NodeProcess(CLS, {"model": tiny[0]}, tmp_path, namespace=ns).start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_stop")
    try:
        assert wait_for(lambda: probe.seen(CLS), STARTUP_S, 0.2), cls.log()[-2000:]
        frame = encode_frame(np.random.default_rng(0).random((1, 32, 32), np.float32))

        def flood(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                probe.publish_frame(frame)
                time.sleep(0.001)

        flood(1.5)
        assert probe.count(CLS, "classified") > 0, probe.diag(CLS)
        cls.proc.send_signal(signal.SIGINT)
        flood(0.05)
        code = cls.stop(signal.SIGINT)  # the second one
        log = cls.log()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log and "frame failed" not in log, log[-3000:]
    finally:
        probe.close()
        cls.stop(signal.SIGKILL)


def test_compressed_transport_follows_an_image_raw_remap_and_idle_input_warns(tmp_path, tiny,
                                                                               data):
    """As image_transport: with ``-r image_raw:=/elsewhere/image`` the compressed stream is
    /elsewhere/image/compressed (the literal image_raw/compressed stayed in the node's
    namespace: a review's camera read an empty topic). And a camera that receives nothing
    is not OK on /diagnostics: it reported OK forever."""
    from rclpy.qos import ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    ns, elsewhere = "ttspec_remap", "/ttspec_remap_cam/image"
    cam = NodeProcess(CAM, {"model": tiny[0], "transport": "compressed",
                            "image_reliability": "reliable"}, tmp_path,
                      namespace=ns, extra_args=["-r", f"{topics.IMAGE_RAW}:={elsewhere}"]).start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_remap")
    name = f"/{ns}/{CAM}"
    try:
        # a reliable driver's publisher, read reliably (image_reliability)
        pub = probe.node.create_publisher(CompressedImage, f"{elsewhere}/compressed",
                                          nodes.qos(topics.QOS_RELIABLE))
        assert wait_for(lambda: pub.get_subscription_count() > 0, STARTUP_S), cam.log()[-2000:]
        [reader] = probe.node.get_subscriptions_info_by_topic(f"{elsewhere}/compressed")
        assert reader.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        assert wait_for(lambda: any("no images for" in m for m in probe.warnings.get(name, ())),
                        nodes.Diagnostics.IDLE_S + 10.0), (probe.statuses.get(name), cam.log())
        probe.watch_frames(True)
        ok, png = cv2.imencode(".png", data[0][0])

        def passed() -> bool:
            pub.publish(CompressedImage(format="png", data=png.tobytes()))
            return wait_for(lambda: len(probe.frames) >= 1, 0.5)

        assert wait_for(passed, 10.0, 0.0), probe.diag(CAM)
        assert wait_for(lambda: probe.statuses.get(name, (None,))[0] == nodes.OK, 5.0), \
            probe.statuses.get(name)
    finally:
        probe.close()
        cam.stop(signal.SIGKILL)


def test_with_use_sim_time_and_no_clock_updates_and_diagnostics_still_go_out(tmp_path, tiny):
    """The adapter's publish timer and /diagnostics run on the steady clock: on ROS time a
    paused or ended bag (/clock silent; here none at all) held back trained heads and silenced
    /diagnostics."""
    from ttspec_ros.msg import AdaptationSample

    stem, card = tiny
    ns = "ttspec_noclock"
    ada = NodeProcess(ADA, {"model": stem, "use_sim_time": True}, tmp_path, namespace=ns).start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_noclock")
    try:
        assert wait_for(lambda: probe.seen(ADA), STARTUP_S), ada.log()[-2000:]
        probe.watch_updates()
        pub = probe.node.create_publisher(AdaptationSample, f"/{ns}/{topics.ADAPTATION_SAMPLES}",
                                          nodes.qos(topics.QOS_RELIABLE))
        assert wait_for(lambda: pub.get_subscription_count() > 0, 10.0)
        dim = card.architecture["channels"][-1]
        pub.publish(AdaptationSample(model_id=card.model_id, exit_index=2, class_id=3,
                                     confidence=0.99, feature_sizes=[dim, dim],
                                     features=[0.5] * dim + [-0.25] * dim))
        assert wait_for(lambda: probe.count(ADA, "updates_published") >= 1, 20.0), \
            probe.diag(ADA)
        assert wait_for(lambda: len(probe.updates) >= 1, 5.0)
    finally:
        probe.close()
        ada.stop(signal.SIGKILL)


def test_max_rate_hz_follows_the_bag_clock_with_use_sim_time(tmp_path, tiny, data):
    """use_sim_time: the rate limit is timed by /clock, so a bag played faster or slower
    passes the frames the robot's camera passed (wall time would drop all but one here)."""
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock

    ns = "ttspec_sim"
    cam = NodeProcess(CAM, {"model": tiny[0], "use_sim_time": True, "max_rate_hz": 1.0},
                      tmp_path, namespace=ns).start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_sim")
    clock_pub = probe.node.create_publisher(Clock, "/clock", 10)
    now = [1000.0]

    def tick(dt: float) -> None:
        now[0] += dt
        sec = int(now[0])
        for _ in range(2):  # the camera reads /clock best effort: a lost one would stall it
            clock_pub.publish(Clock(clock=Time(sec=sec, nanosec=int((now[0] - sec) * 1e9))))
            time.sleep(0.05)

    def diag_after_tick(key: str, at_least: int) -> bool:
        tick(1.0)
        return probe.count(CAM, key) >= at_least

    def camera_clock_reached() -> bool:
        # diagnostics are stamped by the camera's clock (/clock), so a stamp says how far it got
        if probe.node_time(CAM) >= now[0] - 1e-6:
            return True
        tick(0.0)  # both /clock messages lost: send the time again
        return False

    try:
        assert wait_for(lambda: diag_after_tick(nodes.MATCHED_IMAGES_WRITERS, 1), STARTUP_S,
                        0.0), cam.log()[-2000:]
        probe.watch_frames(True)
        image = encode_image(data[0][0], "rgb8")
        for k in range(1, 7):  # 2 s apart on the bag clock, a fraction of that on the wall
            # In lockstep, so no frame meets a clock that is late (a loaded machine): the
            # camera has the new time before the image, and has passed the image before the
            # next time.
            tick(2.0)
            assert wait_for(camera_clock_reached, 10.0, 0.0), (probe.node_time(CAM), now)
            probe.publish_image(image)
            wait_for(lambda k=k: len(probe.frames) >= k, 10.0)  # a lost image shows below
        assert wait_for(lambda: diag_after_tick("published", len(probe.frames)), 10.0, 0.0)
        # On wall time 1 of the 6 would pass; on the bag clock every image that arrived does
        # (best effort may lose one on the way).
        d = probe.diag(CAM)
        assert int(d["published"]) == int(d["received"]) >= 5, d
        for _ in range(4):  # the bag clock stands still: within one period, so dropped
            probe.publish_image(image)
            time.sleep(0.1)
        assert wait_for(lambda: diag_after_tick("dropped_rate_limit", 3), 10.0, 0.0), \
            probe.diag(CAM)
        assert cam.stop(signal.SIGINT) == 0 and "Traceback" not in cam.log()
    finally:
        probe.close()
        cam.stop(signal.SIGKILL)


def test_ttt_online_adapter_updates_the_backbone_of_a_running_classifier(tmp_path):
    """strategy ttt_online on a corrupted stream: the adapter trains the backbone on frames
    and publishes backbone tensors; the (torch) classifier applies them and keeps answering;
    a restarted adapter resumes the adapted backbone from state_dir.
    A tiny random model cannot show an accuracy gain; the measured gain on the demo model
    comes from a longer run (see the report), not from this test."""
    from safetensors.numpy import load_file

    from ttspec_ros.corruptions import corrupt, image_rng
    from ttspec_ros.data import load_fashion_mnist
    from ttspec_ros.model_update import load_payload

    stem = tmp_path / "tiny_y"
    _tiny_model(stem, with_decoders=True)
    ns = "ttspec_ttt"
    procs = [NodeProcess(CAM, {"model": stem}, tmp_path, namespace=ns),
             NodeProcess(CLS, {"model": stem}, tmp_path, namespace=ns),
             NodeProcess(ADA, {"model": stem, "strategy": "ttt_online", "ttt_update": "columns",
                               "publish_period_s": 0.5, "state_dir": tmp_path / "state"},
                         tmp_path, namespace=ns)]
    for p in procs:
        p.start()
    probe = probe_mod.Probe(namespace=ns, name="ttspec_probe_ttt")
    try:
        assert wait_for(lambda: all(probe.seen(p.node) for p in procs)
                        and probe.image_pub.get_subscription_count() > 0, STARTUP_S, 0.2), \
            "\n".join(p.log()[-1500:] for p in procs)
        assert "strategy ttt_online" in procs[2].log()
        # columns at the default rate (tuned for norm): said at start
        assert "ttt_learning_rate 0.03 with ttt_update 'columns'" in procs[2].log()
        images, _ = load_fashion_mnist("test")
        noisy = [_rgb(corrupt(im, "gaussian_noise", 5, image_rng(0, "test", "gaussian_noise",
                                                                  5, i)))
                 for i, im in enumerate(images[:30])]
        _stream(probe, noisy)
        preds = _predictions(probe)
        assert len(preds) >= 20, f"only {len(preds)}/30 answered"
        versions = [p.model_version for p in preds]
        assert versions[-1] > versions[0], versions
        assert wait_for(lambda: probe.count(ADA, "frames_adapted") >= 5, 5.0), probe.diag(ADA)
        # Frames of another shape, with NaN or not normalised (finite losses that wrecked the
        # backbone) are skipped; the training thread carries on.
        for tensor in (np.zeros((3, 32, 32), np.float32), _nan_frame(), _unnormalised_frame()):
            assert _send_until_counted(probe, tensor, ADA, "frames_rejected"), probe.diag(ADA)
        assert wait_for(lambda: "outside" in probe.diag(ADA).get("last_frame_rejection", ""),
                        3.0), probe.diag(ADA)
        # Warnings are throttled per reason, not per message (which holds the frame's values:
        # every bad frame of a stream was a warning and a throttle key of its own).
        for k in range(4):
            assert _send_until_counted(probe, _unnormalised_frame() * (1.1 + 0.1 * k), ADA,
                                       "frames_rejected"), probe.diag(ADA)
        warned = [line for line in procs[2].log().splitlines()
                  if "skipped a frame" in line and "outside" in line]
        assert 1 <= len(warned) <= 3, warned  # 5 before, one per frame
        adapted = probe.count(ADA, "frames_adapted")
        _stream(probe, noisy[:6])
        assert wait_for(lambda: probe.count(ADA, "frames_adapted") > adapted, 5.0), \
            probe.diag(ADA)
        # Disabled, frames are counted as ignored, not adapted.
        assert probe.set_parameters(ADA, enabled=False)[0].successful

        def settled() -> bool:  # a frame taken before the switch is done and reported (1 Hz)
            before = probe.count(ADA, "frames_adapted")
            time.sleep(1.2)
            return probe.count(ADA, "frames_adapted") == before

        assert wait_for(settled, 10.0, 0.0), probe.diag(ADA)
        adapted = probe.count(ADA, "frames_adapted")
        ignored = probe.count(ADA, "frames_ignored_disabled")
        _stream(probe, noisy[:4])
        assert wait_for(lambda: probe.count(ADA, "frames_ignored_disabled") > ignored, 5.0), \
            probe.diag(ADA)
        assert probe.count(ADA, "frames_adapted") == adapted, probe.diag(ADA)
        assert probe.set_parameters(ADA, enabled=True)[0].successful
        assert probe.count(CLS, "updates_applied") >= 1 and \
            probe.count(CLS, "updates_rejected") == 0, probe.diag(CLS)
        probe.watch_updates()
        latest = wait_for(lambda: list(probe.updates), 5.0)
        assert latest, "no model update latched"
        tensors = {t.name: np.asarray(t.data, np.float32).reshape(t.shape)
                   for t in latest[-1].msg.tensors}
        assert tensors and not any(n.startswith("cls_blocks.") for n in tensors)
        assert "stem.0.weight" in tensors and any(n.startswith("subnet0.") for n in tensors)
        original = load_file(f"{stem}.safetensors")
        changed = [n for n, t in tensors.items() if not np.allclose(t, original[n])]
        assert changed, "the published backbone tensors equal the original ones"
        assert latest[-1].msg.version > 0
        assert wait_for(lambda: int(probe.diag(CLS)["model_version"]) >= latest[-1].msg.version,
                        5.0), probe.diag(CLS)
        # Restart: the adapter saved the adapted backbone at shutdown and publishes it again.
        assert procs[2].stop(signal.SIGINT) == 0
        saved = load_payload(tmp_path / "state" / "ttt.safetensors")
        assert saved.version >= latest[-1].msg.version
        procs[2].start()
        probe.watch_updates()
        resumed = wait_for(lambda: list(probe.updates), STARTUP_S, 0.2)
        assert resumed, procs[2].log()[-2000:]
        assert resumed[0].msg.version >= saved.version
        tensors = {t.name: np.asarray(t.data, np.float32).reshape(t.shape)
                   for t in resumed[0].msg.tensors}
        assert all(np.array_equal(tensors[n], t) for n, t in saved.tensors.items())
        assert "resumed" in procs[2].log()
        codes = [p.stop(signal.SIGINT) for p in procs]
        assert codes == [0, 0, 0] and all("Traceback" not in p.log() for p in procs)
    finally:
        probe.close()
        for p in procs:
            p.stop(signal.SIGKILL)


def test_bench_ros_writes_its_json(tmp_path, tiny):
    """bench-ros on tiny settings (its figures come from real runs, not from this test)."""
    import argparse

    from ttspec_ros.experiments import bench_ros

    parser = argparse.ArgumentParser()
    bench_ros.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--model", str(tiny[0]), "--seconds", "1.5",
                              "--rate", "10", "--size", "64", "--max-rate", "30",
                              "--adapt-seconds", "2", "--adapt-windows", "2",
                              "--floor-seconds", "1.5"])
    assert bench_ros.run(args) == 0
    result = json.loads((tmp_path / "bench_ros.json").read_text())
    assert result["settings"]["seed"] == 0 and result["classifier_capacity_hz"] > 0
    for phase in ("nominal", "overload"):
        p = result[phase]
        assert p["published"] > 0 and 0 < p["predictions"] <= p["published"]
        assert p["latency_ms"]["ros_overhead"]["n"] == p["predictions"]
        assert set(p["rss"]) == {CAM, CLS, ADA}
        assert all(r["max_mb"] > 10 for r in p["rss"].values())
    assert result["overload"]["classifier_max_pending"] in (0, 1)
    adaptation = result["adaptation"]
    assert adaptation["reset"]["success"] and adaptation["predictions"] > 0
    assert 1 <= len(adaptation["windows"]) <= 2
    assert result["exit_codes"] == {CAM: 0, CLS: 0, ADA: 0}
    assert set(result["targets"]) == {"ros_overhead_p50_ms", "overload_max_pending",
                                      "overload_rss_growth_mb"}
    floor = result["transport_floor"]  # the relays pass frames on: every one that arrives counts
    assert floor["exit_codes"] == {CAM: 0, CLS: 0}
    assert 0 < floor["predictions"] <= floor["published"]
    assert floor["latency_ms"]["end_to_end"]["n"] == floor["predictions"]
    assert (result["targets"]["ros_overhead_p50_ms"]["transport_floor_p50_ms"]
            == floor["latency_ms"]["end_to_end"]["p50"] > 0)


@pytest.mark.parametrize("node, overrides, words", [
    (CAM, {"model": "no/such/model"}, "model.json"),
    (CAM, {"transport": "compresed"}, "transport"),
    # rclpy refuses these in declare_parameter (descriptor type and range)
    (CAM, {"max_rate_hz": 5}, "max_rate_hz"),
    (CAM, {"max_rate_hz": -1.0}, "max_rate_hz"),
    (CLS, {"num_threads": 0}, "num_threads"),
    # over the shipped params file rcl kept both values and rclpy read the file's: these
    # were dropped without a word and the node ran on the defaults
    (CLS, {"max_exit": 2.0}, "-p max_exit:=2.0 did not take effect: the node got -1"),
    (CAM, {"max_rate_hz": "fast"}, "-p max_rate_hz:=fast did not take effect"),
    (ADA, {"enabled": 0}, "-p enabled:=0 did not take effect: the node got True"),
    (CLS, {"thresholds": "[]"}, "parameter 'thresholds' is an empty list"),
])
def test_bad_configuration_exits_with_one_clear_line(tmp_path, tiny, node, overrides, words):
    proc = NodeProcess(node, {"model": tiny[0], **overrides}, tmp_path).start()
    proc.proc.wait(60)
    assert proc.proc.returncode == 1
    log = proc.log()
    assert "Traceback" not in log and words in log, log


# -- the nodes' small helpers, without processes ----------------------------------------------
def test_the_camera_reads_a_dotted_stems_card_without_torch(tmp_path, tiny):
    """``run.v1`` names run.v1.safetensors + run.v1.json (checkpoint.load_model's rule); the
    camera reads that card as JSON and never imports torch for it."""
    stem = tmp_path / "run.v1"
    for suffix in (".safetensors", ".json"):
        shutil.copy(f"{tiny[0]}{suffix}", f"{stem}{suffix}")
    code = ("import sys; from ttspec_ros.nodes import load_input_spec; "
            f"spec = load_input_spec({str(stem)!r}); "
            "assert 'torch' not in sys.modules, 'imported torch'; print(spec['size'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "32"), out.stderr


def test_a_qos_override_on_one_topic_leaves_the_sensor_default_alone():
    """rclpy writes qos_overrides.* into the profile it is handed. If ``nodes.qos`` shared one
    profile object, an override on image_raw would change every later sensor-data endpoint of
    the process (the camera's re-subscription after a transport switch, say)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.qos import ReliabilityPolicy
    from rclpy.qos_overriding_options import QoSOverridingOptions
    from sensor_msgs.msg import Image

    context = Context()
    rclpy.init(context=context, args=[
        "--ros-args", "-p", "qos_overrides./a.subscription.reliability:=reliable",
        "-p", "qos_overrides./a.subscription.depth:=1"])
    try:
        node = rclpy.create_node("qos_override_check", context=context)
        a = node.create_subscription(
            Image, "/a", lambda _: None, nodes.qos(topics.QOS_SENSOR),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        b = node.create_subscription(Image, "/b", lambda _: None, nodes.qos(topics.QOS_SENSOR))
        assert (a.qos_profile.reliability, a.qos_profile.depth) == (
            ReliabilityPolicy.RELIABLE, 1)
        assert (b.qos_profile.reliability, b.qos_profile.depth) == (
            ReliabilityPolicy.BEST_EFFORT, 5)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


RCL_TEXTS = ["1e-3", "1e3", "-2.5E+2", "1.", ".5", "y", "N", "on", "OFF", "yes", "True", "5",
             "+5", "-0", "0x1A", "010", "08", "9223372036854775808", "2024-01-15", "1_000",
             ".inf", "-.inf", "inf", "nan", "abc", "'1'", '"true"', "[1e-3, 0.5]", "[y, n]",
             "[1, 2]", "0x1p3", "1e400", "-1e400", "1e-400", "1e-310", "0.0", "0e5", "-0.0",
             "!!str 5", "!!float 1", "!!str y", "+.inf", ".NaN", "0o17", "0b1"]


def test_rcl_yaml_types_values_as_rcl_does():
    """What rcl's own parser makes of each -p value (a node in its own context), against
    params.rcl_yaml: the command-line check must not refuse what rcl accepts."""
    import math

    import rclpy

    from ttspec_ros.nodes import plain_value
    from ttspec_ros.params import rcl_yaml

    context = rclpy.Context()
    args = ["--ros-args"]
    for i, text in enumerate(RCL_TEXTS):
        args += ["-p", f"p{i}:={text}"]
    rclpy.init(context=context, args=args)
    try:
        node = rclpy.create_node("rcl_typing_check", context=context,
                                 automatically_declare_parameters_from_overrides=True,
                                 start_parameter_services=False)
        for i, text in enumerate(RCL_TEXTS):
            rcl, ours = plain_value(node.get_parameter(f"p{i}").value), rcl_yaml(text)
            same = (type(rcl) is type(ours) and (rcl == ours or (
                isinstance(rcl, float) and math.isnan(rcl) and math.isnan(ours))))
            assert same, (text, rcl, ours)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)

def test_a_command_line_override_that_did_not_take_effect_is_named():
    from ttspec_ros.nodes import unapplied_override

    names = (CLS, f"/ttspec/{CLS}")
    got = {"max_exit": -1, "threshold": 0.001, "publish_samples": True, "model": "2024-01-15",
           "thresholds": [0.5, 0.5, 0.5]}

    def problem(*extra):
        return unapplied_override(names, got, ["exe", "--ros-args", *extra])

    assert problem() is None
    # applied, typed as rcl types them (1e-3 a double, y a bool, a date as text)
    assert problem("-p", "threshold:=1e-3", "-p", "publish_samples:=y",
                   "-p", "model:=2024-01-15", "-p", "thresholds:=[0.5, 0.5, 0.5]") is None
    assert problem("-p", "threshold:=0.5", "--param", "threshold:=1e-3") is None  # the last
    assert unapplied_override(names, {"threshold": float("nan")},
                              ["exe", "--ros-args", "-p", "threshold:=.nan"]) is None
    # rcl kept the params file's int -1 beside the double, and rclpy read the int
    assert problem("-p", "max_exit:=2.0") == (
        "-p max_exit:=2.0 did not take effect: the node got -1 (an integer); rcl keeps a "
        "value of another type from a params file and rclpy reads that one, so give max_exit "
        "as an integer")
    assert "publish_samples:=0 did not take effect" in problem("-p", "publish_samples:=0")
    # node-qualified: this node's name or full name; another node's is not ours
    assert "did not take effect" in problem("-p", f"/ttspec/{CLS}:max_exit:=2.0")
    assert problem("-p", "planner:max_exit:=2.0") is None
    assert problem("-p", "not_ours:=x", "--", "-p", "max_exit:=2.0") is None


def test_a_backend_that_cannot_write_its_cache_is_a_startup_error(monkeypatch):
    """An OSError while building a backbone (TensorRT's engine cache in a read-only home)
    is refused like any other bad setting: StartupError at start, the old model kept on a
    live change."""
    import ttspec_ros.backends
    from ttspec_ros.nodes import StartupError
    from ttspec_ros.nodes.classifier import LoadedModel

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/home/robot/.cache/ttspec_ros")

    monkeypatch.setattr(ttspec_ros.backends, "create_backbone", unwritable)
    with pytest.raises(StartupError, match="backend 'onnxruntime'.*Permission denied"):
        LoadedModel("", None, backend="onnxruntime")


def test_the_compressed_topic_follows_image_raw_unless_remapped_itself():
    """image_transport's rule (<image_raw>/compressed), and an explicit remap of
    image_raw/compressed (launch files written for the literal name) still wins."""
    import rclpy
    from rclpy.context import Context

    from ttspec_ros.nodes.camera import CameraNode

    for remaps, expected in (([], "/ns/image_raw/compressed"),
                             (["image_raw:=/cam/image"], "/cam/image/compressed"),
                             (["image_raw:=/cam/image", "image_raw/compressed:=/cam/c"],
                              "/cam/c")):
        context = Context()
        args = ["--ros-args", "-r", "__ns:=/ns"] + [a for r in remaps for a in ("-r", r)]
        rclpy.init(context=context, args=args)
        try:
            node = rclpy.create_node("compressed_topic_check", context=context)
            assert CameraNode._compressed_topic(node) == expected, remaps
            node.destroy_node()
        finally:
            rclpy.shutdown(context=context)


def test_throttle_is_per_key():
    from ttspec_ros.nodes import Throttle

    throttle = Throttle(period_s=60.0)
    assert throttle("truncated") and throttle("wrong_step")
    assert not throttle("truncated")


def _passed(limit, arrivals) -> list[float]:
    out = []
    for t in arrivals:
        if limit.allows(t):
            limit.passed(t)
            out.append(t)
    return out


def test_rate_limit_passes_its_rate_under_jitter_and_a_stepping_clock():
    """15 Hz of a 30 Hz camera. The rule before (a full period since the last passed frame)
    passed 11.6 Hz of these arrivals with +-2 ms of jitter and 12.0 Hz of those on a /clock that
    moves in 25 ms steps (a review's processes: 11.8 Hz, and 10 Hz under use_sim_time)."""
    import random

    from ttspec_ros.nodes import RateLimit

    period, rng = 1 / 15, random.Random(0)
    jittered = [k / 30 + rng.uniform(-0.002, 0.002) for k in range(300)]  # 10 s
    stepped = [int(k / 30 / 0.025) * 0.025 for k in range(300)]  # bag clock at 40 Hz
    for arrivals in (jittered, stepped):
        passed = _passed(RateLimit(period), arrivals)
        assert 148 <= len(passed) <= 151, len(passed)
        # never faster than the limit: passed frames k apart are >= k - 2 * SLACK periods apart
        for k in (1, 10, 100):
            gaps = [b - a for a, b in zip(passed, passed[k:], strict=False)]
            assert min(gaps) >= (k - 2 * RateLimit.SLACK) * period - 1e-9, (k, min(gaps))


def test_rate_limit_restarts_after_a_pause_or_a_clock_that_went_back():
    from ttspec_ros.nodes import RateLimit

    limit = RateLimit(1.0)
    assert _passed(limit, [0.0, 0.5, 1.0, 1.2]) == [0.0, 1.0]
    # after a pause no burst makes up for the missed periods
    assert _passed(limit, [10.0, 10.3, 10.6, 11.0]) == [10.0, 11.0]
    assert _passed(limit, [3.0, 3.5, 4.0]) == [3.0, 4.0]  # a looped bag
    limit.set_period(0.0)  # no limit
    assert _passed(limit, [4.1, 4.2]) == [4.1, 4.2]
    limit.set_period(2.0)  # a new period counts from the last passed frame
    assert _passed(limit, [5.0, 6.5]) == [6.5]


def test_ttt_ros_writes_its_json(tmp_path):
    """ttt-ros on tiny settings (its figures come from real runs on the demo model)."""
    import argparse

    from ttspec_ros.experiments import ttt_ros

    stem = tmp_path / "tiny_y"
    _tiny_model(stem, with_decoders=True)
    parser = argparse.ArgumentParser()
    ttt_ros.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--model", str(stem),
                              "--strategies", "ttt_online", "--frames", "16", "--rate", "8",
                              "--windows", "2"])
    assert ttt_ros.run(args) == 0
    result = json.loads((tmp_path / "out" / "ttt_ros.json").read_text())
    assert result["settings"]["seed"] == 0
    (r,) = result["runs"]
    assert r["strategy"] == "ttt_online" and 0 < r["answered"] <= r["published"] == 16
    assert len(r["windows"]) == 2 and 0.0 <= r["accuracy"] <= 1.0
    assert int(r["adapter"]["frames_adapted"]) > 0
    assert r["exit_codes"] == {CAM: 0, CLS: 0, ADA: 0}



def test_wait_until_up_ends_as_soon_as_a_node_dies(tmp_path):
    """What bench-ros and ttt-ros wait on: a node that dies while starting (here a classifier
    given a model that does not exist) ends the wait with False at once, not at the timeout."""
    dead = NodeProcess(CLS, {"model": str(tmp_path / "missing")}, tmp_path,
                       namespace="ttspec_dead").start()
    probe = Probe("ttspec_dead", name="ttspec_dead_probe")
    try:
        start = time.monotonic()
        assert not probe.wait_until_up({CLS: dead}, STARTUP_S)
        assert not dead.alive() and time.monotonic() - start < STARTUP_S, dead.log()[-2000:]
        assert "missing" in dead.log()
        # what bench-ros and ttt-ros then say
        assert probe.not_up_reason({CLS: dead}) == \
            f"{CLS} exited with code 1 (log {dead.log_path})"
        unstarted = NodeProcess(ADA, {}, tmp_path, namespace="ttspec_dead")
        assert probe.not_up_reason({ADA: unstarted}) == f"no diagnostics yet from {ADA}"
    finally:
        probe.close()
        dead.stop(signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tools_node_processes_end_when_the_tool_is_killed(tmp_path):
    """bench-ros and ttt-ros start nodes with NodeProcess: killed by SIGKILL (a cancelled CI job),
    the tool ran no clean-up, and its nodes kept running and answering the next run's frames."""
    code = (f"import time; from pathlib import Path; from ttspec_ros.nodes.probe import "
            f"RelayProcess; print(RelayProcess({CAM!r}, Path({str(tmp_path)!r}), "
            f"'ttspec_orphan').start().pid, flush=True); time.sleep(600)")
    tool = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(tool.stdout.readline())
        assert wait_for(lambda: _running(pid), 5.0)
        tool.kill()
        tool.wait()
        assert wait_for(lambda: not _running(pid), 20.0), f"node {pid} outlived its tool"
    finally:
        tool.kill()
        tool.wait()
