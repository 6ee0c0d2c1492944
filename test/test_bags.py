"""Bags written from the dataset and read back (both storages), foreign bags, bad bags."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rosbags")

from ttspec_ros import bags  # noqa: E402
from ttspec_ros.cli import main as cli_main  # noqa: E402
from ttspec_ros.data import SUBSETS, load_fashion_mnist  # noqa: E402

FRAMES = 24


@pytest.fixture(scope="module")
def shift_bags(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bags")
    return {storage: Path(bags.make_scenario_bag(
        "shift", root / f"shift_{storage}", frames=FRAMES, seed=3, storage=storage)["bag"])
        for storage in bags.STORAGES}



@pytest.mark.parametrize(("storage", "mode"), [("mcap", "file"), ("sqlite3", "message")])
def test_zstd_compressed_bag_is_read_and_described(shift_bags, tmp_path, storage, mode):
    # what `ros2 bag record --compression-mode file|message --compression-format zstd` writes
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, Reader, StoragePlugin, Writer

    out = tmp_path / "zstd"
    writer = Writer(out, version=9, storage_plugin=StoragePlugin[storage.upper()])
    writer.set_compression(CompressionMode[mode.upper()], CompressionFormat.ZSTD)
    with Reader(shift_bags[storage]) as reader, writer:
        store = bags.typestore()
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store)
                 for c in reader.connections}
        for conn, time_ns, raw in reader.messages():
            writer.write(conns[conn.id], time_ns, raw)
    if mode == "file":
        assert {f.name.split(".", 1)[1] for f in out.iterdir() if f.name != "metadata.yaml"
                } == {"mcap.zstd"}
    stream = bags.open_image_stream(out)
    assert stream.describe()["storage"] == storage
    assert stream.describe()["compression"] == f"zstd ({mode})"
    plain = bags.open_image_stream(shift_bags[storage])
    assert plain.compression is None and stream.labels == plain.labels
    assert [f.raw for f in stream.frames()] == [f.raw for f in plain.frames()]

@pytest.mark.parametrize("storage", bags.STORAGES)
def test_scenario_bag_round_trip(shift_bags, storage):
    path = shift_bags[storage]
    meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 9 and meta["storage_identifier"] == storage
    topics = {t["topic_metadata"]["name"]: t for t in meta["topics_with_message_count"]}
    assert topics[bags.DEFAULT_IMAGE_TOPIC]["topic_metadata"]["type"] == bags.IMAGE_TYPE
    assert topics[bags.DEFAULT_LABEL_TOPIC]["topic_metadata"]["type"] == bags.LABEL_TYPE
    assert topics[bags.DEFAULT_IMAGE_TOPIC]["message_count"] == FRAMES

    stream = bags.open_image_stream(path)
    assert stream.storage == storage and stream.image_topic == bags.DEFAULT_IMAGE_TOPIC
    assert stream.image_count == FRAMES
    assert stream.label_topic == bags.DEFAULT_LABEL_TOPIC and len(stream.labels) == FRAMES
    frames = list(stream.frames())
    assert [f.index for f in frames] == list(range(FRAMES))
    assert stream.encodings == {"rgb8": FRAMES}
    # a second pass, stopped at 5 frames as replay --max-frames does: counts that pass only
    assert [f.index for f in stream.frames(limit=5)] == list(range(5))
    assert stream.encodings == {"rgb8": 5}
    # 30 Hz recording timing, header stamp = recording time
    assert set(np.diff([f.time_ns for f in frames]).tolist()) == {round(1e9 / 30)}
    assert all(f.stamp_ns == f.time_ns for f in frames)

    # pixels: the test image upscaled; label: its class, matched by stamp
    images, labels = load_fashion_mnist("test")
    indices = bags.scenario_indices("shift", FRAMES, 3)
    for f, idx in zip(frames[:3], indices[:3], strict=False):
        pixels = bags.decode_image(f.raw, stream.image_type)
        assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, bags.to_camera_image(images[idx], 96))
        assert stream.labels[f.stamp_ns] == labels[idx]
    assert stream.custom_data["ttspec.scenario"] == "shift"
    assert stream.custom_data["ttspec.switch_frame"] == str(FRAMES // 2)


def test_rihs01_hash_matches_the_built_message():
    """The hash recorded for LabelStamped equals the one rosidl generated (ros2 bag play and
    rclpy check it)."""
    candidates = [Path(d) / "LabelStamped.json" for d in bags._msg_dirs()]
    built = next((p for p in candidates if p.is_file()), None)
    if built is None:
        pytest.skip("messages not built (run make env)")
    expected = json.loads(built.read_text())["type_hashes"][0]["hash_string"]
    assert bags.typestore().hash_rihs01(bags.LABEL_TYPE) == expected


def test_scenario_mixes():
    _, labels = load_fashion_mnist("test")
    n = 200
    for name, group in (("footwear-heavy", "footwear"), ("tops-heavy", "tops")):
        idx = bags.scenario_indices(name, n, 0)
        assert np.isin(labels[idx], SUBSETS[group]).sum() == round(0.9 * n)
        assert len(set(idx.tolist())) == n  # no repeats while the pool lasts
    shift = labels[bags.scenario_indices("shift", n, 0)]
    assert np.isin(shift[: n // 2], SUBSETS["footwear"]).mean() == 0.9
    assert np.isin(shift[n // 2:], SUBSETS["tops"]).mean() == 0.9
    uniform = labels[bags.scenario_indices("uniform", 2000, 0)]
    assert np.bincount(uniform, minlength=10).min() > 150
    same = bags.scenario_indices("shift", 50, 7)
    assert np.array_equal(same, bags.scenario_indices("shift", 50, 7))
    assert not np.array_equal(bags.scenario_indices("shift", 50, 7),
                              bags.scenario_indices("shift", 50, 8))
    with pytest.raises(ValueError, match="unknown scenario"):
        bags.scenario_indices("rainy", 10, 0)


def test_make_bag_command(tmp_path, capsys):
    out = tmp_path / "bag"
    args = ["make-bag", "--scenario", "uniform", "--out", str(out), "--frames", "5",
            "--storage", "sqlite3", "--rate", "10", "--seed", "1"]
    assert cli_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["frames"] == 5 and printed["rate_hz"] == 10.0 and printed["storage"] == "sqlite3"
    assert sum(printed["class_counts"].values()) == 5
    assert (out / "metadata.yaml").is_file() and (out / "bag.db3").is_file()
    # no leftovers from the atomic write; refuses to overwrite without --force
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]
    assert cli_main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(args + ["--force"]) == 0


def test_overwrite_keeps_the_old_bag_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "bag"
    bags.make_scenario_bag("uniform", out, frames=3, seed=0, storage="sqlite3")
    old_files = {p.name: p.read_bytes() for p in out.iterdir()}

    real_replace = os.replace

    def failing_move_in(src, dst):  # the new bag's move into place fails (crash, full disk)
        if Path(dst) == out and Path(src).name == out.name:
            raise OSError("simulated failure while moving the new bag in")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_move_in)
    with pytest.raises(OSError, match="simulated failure"):
        bags.make_scenario_bag("uniform", out, frames=4, seed=1, storage="sqlite3",
                               overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_files
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]  # staging and old copy cleaned up

    monkeypatch.setattr(os, "replace", real_replace)
    bags.make_scenario_bag("uniform", out, frames=4, seed=1, storage="sqlite3", overwrite=True)
    assert bags.open_image_stream(out).image_count == 4
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]


def test_overwrite_refuses_a_regular_file_before_writing(tmp_path, monkeypatch):
    target = tmp_path / "bag"
    target.write_text("not a bag")

    def no_work(*args, **kwargs):
        raise AssertionError("the bag was being written before the target was checked")

    monkeypatch.setattr(bags, "scenario_indices", no_work)
    for overwrite in (True, False):
        with pytest.raises(FileExistsError, match="bag exists and is not a directory"):
            bags.make_scenario_bag("uniform", target, frames=3, overwrite=overwrite)
    assert target.read_text() == "not a bag"
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]


def test_force_replaces_only_a_bag_never_another_directory(tmp_path):
    # `--out data --force` by mistake must not delete the user's files.
    target = tmp_path / "data"
    target.mkdir()
    (target / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a bag"):
        bags.make_scenario_bag("uniform", target, frames=3, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["thesis.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    bags.make_scenario_bag("uniform", empty, frames=3, overwrite=True)
    assert (empty / "metadata.yaml").is_file()


@pytest.mark.parametrize("storage", bags.STORAGES)
def test_the_same_seed_writes_the_same_bytes(tmp_path, storage):
    # The bag's files are named after its directory, so both bags get the same name.
    written = []
    for parent, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / parent / "bag"
        out.parent.mkdir()
        bags.make_scenario_bag("uniform", out, frames=5, seed=seed, storage=storage)
        written.append({f.name: f.read_bytes() for f in out.iterdir()})
    assert written[0] == written[1]
    assert written[0] != written[2]


def test_a_negative_seed_is_refused_by_name():
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        bags.scenario_indices("uniform", 3, -1)


def test_an_image_size_the_camera_would_refuse_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="too large for an rgb8 frame"):
        bags.make_scenario_bag("uniform", tmp_path / "bag", frames=3, image_size=16385)
    assert not (tmp_path / "bag").exists()


@pytest.mark.parametrize("rate", [float("inf"), 2e9, 0.0, float("nan")])
def test_a_rate_that_would_give_frames_one_stamp_is_refused(tmp_path, rate):
    with pytest.raises(ValueError, match="distinct stamps"):
        bags.make_scenario_bag("uniform", tmp_path / "bag", frames=3, rate_hz=rate)
    assert not (tmp_path / "bag").exists()


def _foreign_bag(path: Path, storage: str, compressed: bool, topic: str,
                 one_stamp: bool = False, labels: Sequence[int] = (),
                 label_topic: str = bags.DEFAULT_LABEL_TOPIC) -> None:
    """A bag written by 'someone else': other topic name, no labels, maybe CompressedImage."""
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = bags.typestore()
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    images, _ = load_fashion_mnist("test")
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        msgtype = bags.COMPRESSED_TYPE if compressed else bags.IMAGE_TYPE
        conn = writer.add_connection(topic, msgtype, typestore=store)
        other = writer.add_connection("/tf_like", "std_msgs/msg/String", typestore=store)
        if labels:
            label_conn = writer.add_connection(label_topic, bags.LABEL_TYPE, typestore=store)
        for j, sec in enumerate(labels):
            label = store.types[bags.LABEL_TYPE](
                header=Header(stamp=Time(sec=sec, nanosec=0), frame_id="cam"), class_id=j,
                class_name=str(j))
            writer.write(label_conn, sec * 10**9, store.serialize_cdr(label, bags.LABEL_TYPE))
        for i in range(4):
            header = Header(stamp=Time(sec=100 + (0 if one_stamp else i), nanosec=0),
                            frame_id="cam")
            if compressed:
                ok, png = cv2.imencode(".png", images[i])
                msg = store.types[msgtype](header=header, format="png", data=png.reshape(-1))
            else:
                msg = store.types[msgtype](header=header, height=28, width=28, encoding="mono8",
                                           is_bigendian=0, step=28, data=images[i].reshape(-1))
            writer.write(conn, (100 + i) * 10**9 + 5, store.serialize_cdr(msg, msgtype))
            writer.write(other, (100 + i) * 10**9,
                         store.serialize_cdr(store.types["std_msgs/msg/String"](data="x"),
                                             "std_msgs/msg/String"))


@pytest.mark.parametrize(("storage", "compressed"), [("mcap", True), ("sqlite3", False)])
def test_foreign_bag_without_labels(tmp_path, storage, compressed):
    path = tmp_path / "foreign"
    _foreign_bag(path, storage, compressed, "/front/image")
    stream = bags.open_image_stream(path)  # the only image topic is found
    assert stream.image_topic == "/front/image" and stream.compressed == compressed
    assert stream.label_topic is None and stream.labels == {}
    frames = list(stream.frames())
    assert [f.stamp_ns for f in frames] == [(100 + i) * 10**9 for i in range(4)]
    assert frames[0].time_ns == 100 * 10**9 + 5
    images, _ = load_fashion_mnist("test")
    assert np.array_equal(bags.decode_image(frames[1].raw, stream.image_type), images[1])


def test_frames_or_labels_sharing_a_stamp_are_refused(tmp_path):
    # A driver that leaves header.stamp at 0: the last label labelled every frame, and after one
    # lost frame every prediction was matched to the frame before its own.
    _foreign_bag(tmp_path / "one_stamp", "sqlite3", False, "/front/image", one_stamp=True)
    stream = bags.open_image_stream(tmp_path / "one_stamp")
    with pytest.raises(bags.BagError, match=r"frames 0 and 1 of /front/image have the same "
                                            r"header stamp \(100000000000 ns\)"):
        list(stream.frames())
    _foreign_bag(tmp_path / "labels", "sqlite3", False, "/camera/image_raw", labels=[100, 100])
    with pytest.raises(bags.BagError, match="two labels on /camera/label have header stamp"):
        bags.open_image_stream(tmp_path / "labels")
    assert bags.open_image_stream(tmp_path / "labels", use_labels=False).labels == {}


def test_the_only_label_topic_is_found_like_the_only_image_topic(tmp_path):
    # /front/label beside /front/image was ignored: 0 labels and no word why
    _foreign_bag(tmp_path / "front", "mcap", False, "/front/image", labels=[100, 101],
                 label_topic="/front/label")
    stream = bags.open_image_stream(tmp_path / "front")
    assert stream.label_topic == "/front/label" and stream.labels == {100 * 10**9: 0,
                                                                      101 * 10**9: 1}


def test_bad_bags_give_clear_errors(tmp_path, shift_bags):
    good = shift_bags["mcap"]
    with pytest.raises(bags.BagError, match="has no topic '/camera/depth'.*image_raw"):
        bags.open_image_stream(good, image_topic="/camera/depth")
    with pytest.raises(bags.BagError, match="has type ttspec_ros/msg/LabelStamped.*cannot play"):
        bags.open_image_stream(good, image_topic="/camera/label")
    with pytest.raises(bags.BagError, match="no label topic '/labels'"):
        bags.open_image_stream(good, label_topic="/labels")
    with pytest.raises(bags.BagError, match="label topic /camera/image_raw has type"):
        bags.open_image_stream(good, label_topic="/camera/image_raw")
    assert bags.open_image_stream(good, use_labels=False).labels == {}
    with pytest.raises(bags.BagError, match="does not exist"):
        bags.open_image_stream(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(bags.BagError, match="no metadata.yaml"):
        bags.open_image_stream(tmp_path / "empty")

    # a bag without any image topic
    from rosbags.rosbag2 import Writer
    store = bags.typestore()
    with Writer(tmp_path / "strings", version=9) as writer:
        conn = writer.add_connection("/chatter", "std_msgs/msg/String", typestore=store)
        writer.write(conn, 1, store.serialize_cdr(store.types["std_msgs/msg/String"](data="x"),
                                                  "std_msgs/msg/String"))
    with pytest.raises(bags.BagError, match="no sensor_msgs/msg/Image or .*CompressedImage topic"):
        bags.open_image_stream(tmp_path / "strings")

    # truncated storage files, both plugins
    for storage, suffix in (("mcap", ".mcap"), ("sqlite3", ".db3")):
        damaged = tmp_path / f"truncated_{storage}"
        shutil.copytree(shift_bags[storage], damaged)
        data_file = next(damaged.glob(f"*{suffix}"))
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
        with pytest.raises(bags.BagError, match="truncated or corrupt"):
            stream = bags.open_image_stream(damaged)
            list(stream.frames())
    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"not a bag at all" * 10)
    with pytest.raises(bags.BagError, match="truncated or corrupt"):
        bags.open_image_stream(garbage)



def test_pip_wheel_carries_what_the_bag_tools_read(tmp_path):
    """The ROS-free install (pip, no colcon) has the bag tools: they read LabelStamped.msg from
    <prefix>/share/ttspec_ros/msg, which the wheel must install (it shipped only Python files
    and weights, and make-bag failed with 'LabelStamped.msg not found')."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "src"  # a copy: an in-tree build writes build/ and egg-info
    shutil.copytree(root / "ttspec_ros", source / "ttspec_ros",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "msg", source / "msg")
    shutil.copy(root / "setup.py", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    assert f"share/ttspec_ros/msg/{bags.LABEL_MSG_FILE}" in data
    assert "ttspec_ros/weights/demo.safetensors" in names


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_frames_the_storage_files_do_not_give_are_named(tmp_path, storage):
    """rosbags yields nothing from a storage file whose topic differs from metadata.yaml's (a
    hand-edited or merged metadata.yaml): such frames went missing from replay's results
    uncounted, and a bag that gave none ended in an IndexError. Here metadata.yaml counts two
    more messages than the storage holds."""
    _foreign_bag(tmp_path / "bag", storage, False, "/front/image")
    meta_path = tmp_path / "bag" / "metadata.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    info = meta["rosbag2_bagfile_information"]
    for entry in info["topics_with_message_count"]:
        if entry["topic_metadata"]["name"] == "/front/image":
            entry["message_count"] += 2
    info["message_count"] += 2
    meta_path.write_text(yaml.safe_dump(meta))
    stream = bags.open_image_stream(tmp_path / "bag")
    assert stream.image_count == 6
    with pytest.raises(bags.BagError, match="metadata.yaml counts 6 messages on /front/image, "
                                            "its storage files gave 4"):
        list(stream.frames())
    assert len(list(stream.frames(limit=3))) == 3  # a limit within what is there reads fine


def test_a_file_of_a_bag_directory_names_the_directory(tmp_path, shift_bags):
    """metadata.yaml or a zstd-compressed storage file passed alone was 'truncated or corrupt'."""
    bag = next(iter(shift_bags.values()))
    (tmp_path / "x_0.mcap.zstd").write_bytes(b"\x28\xb5\x2f\xfd")
    for part in (bag / "metadata.yaml", tmp_path / "x_0.mcap.zstd"):
        with pytest.raises(bags.BagError, match=f"part of a rosbag2 directory; pass the "
                                                f"directory {part.parent} instead"):
            bags.open_image_stream(part)
