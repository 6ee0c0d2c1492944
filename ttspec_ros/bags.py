"""rosbag2 bags (sqlite3 or mcap) for replay evaluation, written and read with rosbags (no ROS).

Writing: ``make_scenario_bag`` turns a class-mix scenario over the Fashion-MNIST 10k *test*
split into a bag with ``/camera/image_raw`` (sensor_msgs/Image, rgb8, upscaled past the model
input so the camera node's preprocessing runs for real) and ground truth on ``/camera/label``
(ttspec_ros/LabelStamped, same header stamp as its image). rosbags writes format version 9 with
metadata.yaml, newer than Humble's format (the README says how to play it with Humble's tools).

Reading: ``open_image_stream`` accepts any bag holding a sensor_msgs/Image or CompressedImage
topic, with or without a LabelStamped label topic, and yields each frame's raw CDR bytes (a
publisher can send them unchanged) with its header stamp and recording time. Problems with a bag
raise ``BagError`` naming the bag and what is wrong.
"""

from __future__ import annotations

import functools
import os
import shutil
import site
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ttspec_ros.data import CLASS_NAMES, SUBSETS, load_fashion_mnist

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
LABEL_TYPE = "ttspec_ros/msg/LabelStamped"
LABEL_MSG_FILE = "LabelStamped.msg"

DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
DEFAULT_LABEL_TOPIC = "/camera/label"
DEFAULT_FRAME_ID = "camera"
DEFAULT_IMAGE_SIZE = 96  # px; 28 px digits upscaled so the camera node has to resize
DEFAULT_RATE_HZ = 30.0
MAX_RATE_HZ = 1e6  # a 1 us period: stamps stay distinct and far from rounding
DEFAULT_FRAMES = 3000
STORAGES = ("mcap", "sqlite3")
# Fixed recording start keeps bags byte-reproducible for a given seed.
START_TIME_NS = 1_700_000_000 * 10**9
SUBSET_SHARE = 0.9  # share of frames from the scenario's class group

SCENARIOS: dict[str, str] = {
    "uniform": "every test image equally likely",
    "footwear-heavy": f"{SUBSET_SHARE:.0%} footwear {SUBSETS['footwear']}, rest other classes",
    "tops-heavy": f"{SUBSET_SHARE:.0%} tops {SUBSETS['tops']}, rest other classes",
    "shift": "footwear-heavy first half, tops-heavy second half",
}


class BagError(ValueError):
    """A bag that cannot be used, with the reason."""


# --- message types -------------------------------------------------------------------------------


def _msg_dirs() -> list[Path]:
    """Where LabelStamped.msg may be: the source tree, then installed share/ttspec_ros/msg
    (colcon's prefixes; pip's: the environment, or the user base of ``pip install --user``)."""
    dirs = [Path(__file__).resolve().parent.parent / "msg"]
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes += [sys.prefix, site.getuserbase()]
    dirs += [Path(p) / "share" / "ttspec_ros" / "msg" for p in prefixes]
    return dirs


def label_msg_text() -> str:
    for directory in _msg_dirs():
        path = directory / LABEL_MSG_FILE
        if path.is_file():
            return path.read_text(encoding="utf-8")
    searched = ", ".join(str(d) for d in _msg_dirs())
    raise FileNotFoundError(f"{LABEL_MSG_FILE} not found (searched {searched})")


@functools.cache
def typestore():
    """rosbags type store: ROS 2 Kilted standard types plus ttspec_ros/msg/LabelStamped."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg(label_msg_text(), LABEL_TYPE))
    return store


# --- scenarios -----------------------------------------------------------------------------------


class _Pool:
    """Draws test-split indices without replacement, reshuffling when a pool runs out."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator) -> None:
        if indices.size == 0:
            raise ValueError("empty image pool")
        self.indices, self.rng = indices, rng
        self.order: list[int] = []

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if not self.order:
                self.order = self.rng.permutation(self.indices).tolist()
            k = min(n - len(out), len(self.order))
            out += self.order[:k]
            del self.order[:k]
        return out


def scenario_indices(scenario: str, frames: int, seed: int) -> np.ndarray:
    """Test-split indices of the bag's frames, in play order (exact 90/10 mixes, shuffled)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if seed < 0:  # numpy's message would not say which number
        raise ValueError(f"seed must be >= 0, got {seed}")
    _, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    if scenario == "uniform":
        return np.asarray(_Pool(np.arange(labels.size), rng).take(frames), dtype=np.int64)

    pools: dict[str, tuple[_Pool, _Pool]] = {}
    for group in ("footwear", "tops"):
        inside = np.isin(labels, SUBSETS[group])
        pools[group] = (_Pool(np.flatnonzero(inside), rng), _Pool(np.flatnonzero(~inside), rng))

    def mix(group: str, n: int) -> list[int]:
        heavy = round(SUBSET_SHARE * n)
        chosen = pools[group][0].take(heavy) + pools[group][1].take(n - heavy)
        return rng.permutation(chosen).tolist()

    if scenario == "shift":
        first = frames // 2
        return np.asarray(mix("footwear", first) + mix("tops", frames - first), dtype=np.int64)
    return np.asarray(mix(scenario.removesuffix("-heavy"), frames), dtype=np.int64)


def to_camera_image(gray28: np.ndarray, size: int) -> np.ndarray:
    """(28,28) uint8 -> (size,size,3) uint8 RGB, bilinear upscale (what a camera would see)."""
    big = cv2.resize(gray28, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(np.repeat(big[:, :, None], 3, axis=2))


# --- writing -------------------------------------------------------------------------------------


def make_scenario_bag(
    scenario: str,
    out: str | os.PathLike,
    *,
    frames: int = DEFAULT_FRAMES,
    rate_hz: float = DEFAULT_RATE_HZ,
    seed: int = 0,
    storage: str = "mcap",
    image_size: int = DEFAULT_IMAGE_SIZE,
    overwrite: bool = False,
) -> dict:
    """Write a scenario bag to directory ``out`` atomically; returns its description."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; choose from {list(STORAGES)}")
    # Labels are matched to frames by stamp: a period that rounds to 0 ns would give every
    # frame the same stamp.
    if not 0 < rate_hz <= MAX_RATE_HZ:
        raise ValueError(f"rate must be in (0, {MAX_RATE_HZ:g}] Hz so that frames get distinct "
                         f"stamps, got {rate_hz}")
    from ttspec_ros import image_codec

    if image_size < 28:
        raise ValueError(f"image size must be >= 28 px (the source images), got {image_size}")
    try:  # a frame the camera node would refuse (absurd_size) makes a bag of nothing but those
        image_codec.check_size(image_size, image_size, 3)
    except image_codec.ImageDecodeError as e:
        raise ValueError(f"image size {image_size} px is too large for an rgb8 frame: {e}") from e
    out = Path(out)
    # Checked before the (long) write: only a directory is ever replaced by a bag.
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; a bag is a directory, so "
                              "it is not replaced (remove it or choose another --out)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it or pass --force to replace it")
    if out.exists() and any(out.iterdir()) and not (out / "metadata.yaml").is_file():
        raise FileExistsError(f"{out} is not empty and holds no metadata.yaml, so it is not a "
                              "bag; --force only replaces a bag (choose another --out)")

    indices = scenario_indices(scenario, frames, seed)
    images, labels = load_fashion_mnist("test")
    store = typestore()
    Image = store.types[IMAGE_TYPE]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    Label = store.types[LABEL_TYPE]
    period_ns = round(1e9 / rate_hz)
    description = {
        "scenario": scenario,
        "scenario_description": SCENARIOS[scenario],
        "frames": int(frames),
        "rate_hz": float(rate_hz),
        "seed": int(seed),
        "storage": storage,
        "image_size": int(image_size),
        "image_topic": DEFAULT_IMAGE_TOPIC,
        "label_topic": DEFAULT_LABEL_TOPIC,
        "source": "fashion-mnist test split",
        "switch_frame": int(frames // 2) if scenario == "shift" else None,
    }

    # Write into a private sibling directory, then move it into place: a bag is all or nothing.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp_bag = staging / out.name  # rosbags names the storage file after the directory
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        with Writer(tmp_bag, version=9, storage_plugin=plugin) as writer:
            for key, value in description.items():
                writer.set_custom_data(f"ttspec.{key}", "" if value is None else str(value))
            image_conn = writer.add_connection(DEFAULT_IMAGE_TOPIC, IMAGE_TYPE, typestore=store)
            label_conn = writer.add_connection(DEFAULT_LABEL_TOPIC, LABEL_TYPE, typestore=store)
            for i, idx in enumerate(indices):
                t_ns = START_TIME_NS + i * period_ns
                header = Header(
                    stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id=DEFAULT_FRAME_ID
                )
                pixels = to_camera_image(images[idx], image_size)
                image = Image(
                    header=header, height=image_size, width=image_size, encoding="rgb8",
                    is_bigendian=0, step=3 * image_size, data=pixels.reshape(-1),
                )
                class_id = int(labels[idx])
                label = Label(header=header, class_id=class_id, class_name=CLASS_NAMES[class_id])
                writer.write(image_conn, t_ns, store.serialize_cdr(image, IMAGE_TYPE))
                writer.write(label_conn, t_ns, store.serialize_cdr(label, LABEL_TYPE))
        # Move an old bag aside (same file system: a rename) instead of deleting it first, so
        # it survives until the new one is in place; restored on failure, else deleted with
        # the staging directory.
        replaced = staging / "replaced" if out.exists() else None
        if replaced is not None:
            os.replace(out, replaced)
        try:
            os.replace(tmp_bag, out)
        except BaseException:
            if replaced is not None:
                os.replace(replaced, out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = np.bincount(labels[indices], minlength=len(CLASS_NAMES))
    description["class_counts"] = {CLASS_NAMES[c]: int(n) for c, n in enumerate(counts)}
    description["bag"] = str(out)
    return description


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One image message of a bag."""

    index: int  # position in the image topic, 0-based
    stamp_ns: int  # header stamp (what predictions and labels are matched by)
    time_ns: int  # recording time (what playback timing follows)
    raw: bytes  # CDR, publishable as is


@dataclass
class ImageStream:
    """What a bag offers for replay. ``frames()`` reads the image messages lazily."""

    path: Path
    storage: str
    image_topic: str
    image_type: str
    image_count: int
    label_topic: str | None
    compression: str | None = None  # e.g. "zstd (file)"; rosbags decompresses while reading
    labels: dict[int, int] = field(default_factory=dict)  # header stamp ns -> class id
    custom_data: dict[str, str] = field(default_factory=dict)
    # Image encodings of the frames of the last frames() pass (every run plays the same ones).
    encodings: dict[str, int] = field(default_factory=dict)

    @property
    def compressed(self) -> bool:
        return self.image_type == COMPRESSED_TYPE

    def frames(self, limit: int | None = None) -> Iterator[Frame]:
        """The image frames in order, the first ``limit`` of them if given."""
        self.encodings.clear()
        yield from _read_frames(self, limit)

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "storage": self.storage,
            "compression": self.compression,
            "image_topic": self.image_topic,
            "image_type": self.image_type,
            "image_count": self.image_count,
            "label_topic": self.label_topic,
            "labels": len(self.labels),
            "custom_data": dict(self.custom_data),
        }


def _stamp_ns(header) -> int:
    return int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)


def _corrupt(path: Path, err: BaseException) -> BagError:
    return BagError(
        f"bag {path} is truncated or corrupt and cannot be read: {type(err).__name__}: {err}"
    )


_READ_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.DatabaseError, EOFError, ValueError, KeyError, IndexError, AssertionError,
    OSError, UnicodeDecodeError, AttributeError, TypeError,
)


def _open_reader(path: Path):
    from rosbags.rosbag2 import Reader, ReaderError

    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(
            f"{path} is not a rosbag2 directory: it has no metadata.yaml (if the recording was "
            "interrupted, pass its .db3 file itself; an interrupted .mcap lacks its summary "
            "and needs `mcap recover` (the mcap CLI) first)"
        )
    if path.is_file() and (path.name == "metadata.yaml" or path.name.endswith(".zstd")):
        # a file of a bag directory that cannot be read alone: rosbags says "corrupt"
        raise BagError(f"{path} is part of a rosbag2 directory; pass the directory "
                       f"{path.parent} instead")
    # a named tuple: mypy rejects a starred tuple written inside the except clause
    read_errors: tuple[type[BaseException], ...] = (ReaderError, *_READ_ERRORS)
    try:
        reader = Reader(path)
        reader.open()
    except read_errors as err:
        raise _corrupt(path, err) from err
    return reader


def _storage_of(path: Path) -> str:
    files = [path] if path.is_file() else sorted(path.iterdir())
    for f in files:
        # `ros2 bag record --compression-mode file` names its files x_0.mcap.zstd
        name = f.name.removesuffix(".zstd")
        if name.endswith(".mcap"):
            return "mcap"
        if name.endswith(".db3"):
            return "sqlite3"
    return "unknown"


def _compression_of(reader) -> str | None:
    """'zstd (file)' or 'zstd (message)' for a compressed rosbag2, None otherwise."""
    fmt, mode = getattr(reader, "compression_format", None), getattr(reader, "compression_mode",
                                                                       None)
    return f"{fmt} ({mode})" if fmt and mode else None


def _pick_topic(path: Path, topics: dict[str, str], wanted: str | None) -> str:
    images = sorted(t for t, typ in topics.items() if typ in IMAGE_TYPES)
    listing = ", ".join(f"{t} ({typ})" for t, typ in sorted(topics.items())) or "no topics"
    if wanted is not None:
        if wanted not in topics:
            raise BagError(f"bag {path} has no topic {wanted!r}; it has: {listing}")
        if topics[wanted] not in IMAGE_TYPES:
            raise BagError(
                f"bag {path}: topic {wanted} has type {topics[wanted]}, which replay cannot "
                f"play; it needs {IMAGE_TYPE} or {COMPRESSED_TYPE}"
            )
        return wanted
    if not images:
        raise BagError(f"bag {path} has no {IMAGE_TYPE} or {COMPRESSED_TYPE} topic; it has: "
                       f"{listing}")
    if DEFAULT_IMAGE_TOPIC in images:
        return DEFAULT_IMAGE_TOPIC
    if len(images) > 1:
        raise BagError(f"bag {path} has several image topics ({', '.join(images)}); "
                       "choose one with --image-topic")
    return images[0]


def open_image_stream(
    path: str | os.PathLike, image_topic: str | None = None, label_topic: str | None = None,
    *, use_labels: bool = True,
) -> ImageStream:
    """Inspect a bag, choose the image topic and read the labels (if any).

    ``image_topic`` None: ``/camera/image_raw`` if present, else the bag's only image topic.
    ``label_topic`` None: ``/camera/label`` if present, else the bag's only LabelStamped topic,
    else no labels; a named label topic must exist and be ttspec_ros/msg/LabelStamped.
    """
    path = Path(path)
    reader = _open_reader(path)
    try:
        connections = reader.connections
        topics: dict[str, str] = {}
        for conn in connections:
            if conn.topic in topics and topics[conn.topic] != conn.msgtype:
                raise BagError(f"bag {path}: topic {conn.topic} is recorded with two types, "
                               f"{topics[conn.topic]} and {conn.msgtype}")
            topics[conn.topic] = conn.msgtype
        chosen = _pick_topic(path, topics, image_topic)
        count = sum(c.msgcount for c in connections if c.topic == chosen)
        if label_topic is None and use_labels:
            found = sorted(t for t, kind in topics.items() if kind == LABEL_TYPE)
            if DEFAULT_LABEL_TOPIC in found:
                label_topic = DEFAULT_LABEL_TOPIC
            elif len(found) == 1:  # e.g. /front/label beside /front/image
                label_topic = found[0]
            elif found:
                raise BagError(f"bag {path} has {len(found)} label topics ({', '.join(found)}); "
                               "choose one with --label-topic (or --no-labels)")
        if not use_labels:
            label_topic = None
        if label_topic is not None:
            if label_topic not in topics:
                raise BagError(f"bag {path} has no label topic {label_topic!r}; it has: "
                               + ", ".join(sorted(topics)))
            if topics[label_topic] != LABEL_TYPE:
                raise BagError(f"bag {path}: label topic {label_topic} has type "
                               f"{topics[label_topic]}; labels must be {LABEL_TYPE}")
        metadata = getattr(reader.storage, "metadata", None)
        meta = (getattr(metadata, "custom", None) or {}) if metadata is not None else {}
        stream = ImageStream(
            path=path, storage=_storage_of(path), image_topic=chosen,
            image_type=topics[chosen], image_count=int(count), label_topic=label_topic,
            compression=_compression_of(reader),
            custom_data={str(k): str(v) for k, v in dict(meta).items()},
        )
        if label_topic is not None:
            stream.labels = _read_labels(reader, path, label_topic)
    finally:
        reader.close()
    if stream.image_count == 0:
        raise BagError(f"bag {path}: image topic {stream.image_topic} has no messages")
    return stream


def _read_labels(reader, path: Path, topic: str) -> dict[int, int]:
    store = typestore()
    conns = [c for c in reader.connections if c.topic == topic]
    labels: dict[int, int] = {}
    try:
        for _, _, raw in reader.messages(connections=conns):
            msg = store.deserialize_cdr(raw, LABEL_TYPE)
            stamp = _stamp_ns(msg.header)
            if stamp in labels:  # the last one would label every frame of that stamp
                raise BagError(f"bag {path}: two labels on {topic} have header stamp {stamp} "
                               "ns; labels are matched to frames by stamp (replay with "
                               "--no-labels to ignore them)")
            labels[stamp] = int(msg.class_id)
    except BagError:
        raise
    except Exception as err:  # rosbags/mcap raise many kinds on damaged data
        raise _corrupt(path, err) from err
    return labels


def _read_frames(stream: ImageStream, limit: int | None) -> Iterator[Frame]:
    store = typestore()
    reader = _open_reader(stream.path)
    try:
        conns = [c for c in reader.connections if c.topic == stream.image_topic]
        index = 0
        first_of: dict[int, int] = {}  # header stamp -> index of the frame that has it
        messages = reader.messages(connections=conns)
        while limit is None or index < limit:
            try:
                item = next(messages, None)
                if item is None:
                    break
                _, time_ns, raw = item
                msg = store.deserialize_cdr(raw, stream.image_type)
            except Exception as err:  # a damaged chunk surfaces while iterating
                raise _corrupt(stream.path, err) from err
            kind = msg.format if stream.compressed else msg.encoding
            stream.encodings[kind] = stream.encodings.get(kind, 0) + 1
            stamp = _stamp_ns(msg.header)
            if stamp in first_of:  # its prediction and label could not be told apart
                raise BagError(
                    f"bag {stream.path}: frames {first_of[stamp]} and {index} of "
                    f"{stream.image_topic} have the same header stamp ({stamp} ns); predictions "
                    "and labels are matched to frames by stamp, so each frame needs its own "
                    "(a camera driver that leaves header.stamp unset records 0 for all)")
            first_of[stamp] = index
            yield Frame(index, stamp, int(time_ns), bytes(raw))
            index += 1
        expected = stream.image_count if limit is None else min(limit, stream.image_count)
        if index < expected:
            # rosbags yields nothing from a storage file whose topic (name, type, QoS) differs
            # from metadata.yaml's, e.g. a hand-edited or merged one: frames would go missing
            # from the results without a count.
            raise BagError(
                f"bag {stream.path}: metadata.yaml counts {stream.image_count} messages on "
                f"{stream.image_topic}, its storage files gave {index}; does a file's topic "
                "(type or QoS) differ from metadata.yaml's?")
    finally:
        reader.close()


def decode_image(raw: bytes, msgtype: str) -> np.ndarray:
    """A frame's pixels (image_codec layout: mono (H,W), colour RGB(A)), for inspection/tests."""
    from ttspec_ros import image_codec

    msg = typestore().deserialize_cdr(raw, msgtype)
    if msgtype == COMPRESSED_TYPE:
        return image_codec.decode_compressed(msg.format, msg.data)
    return image_codec.decode_image(
        msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step, msg.data, frames=False
    )  # camera images, as the camera node takes them
