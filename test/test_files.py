"""Atomic writes: the new content or the old file, never a partial file or a stray temp."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from ttspec_ros import files


def test_write_json_creates_parents_and_is_readable_by_others(tmp_path):
    path = files.write_json(tmp_path / "a" / "b" / "result.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # rw-r--r--, as open() would make it
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_replaces_existing_file(tmp_path):
    path = tmp_path / "state.bin"
    files.atomic_write_bytes(path, b"old")
    files.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = files.write_text(tmp_path / "report.md", "old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_save_figure_writes_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = files.save_figure(fig, tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_rename_is_made_durable_by_syncing_the_directory(tmp_path, monkeypatch):
    """fsync of the file makes its bytes durable; only fsync of the directory makes the rename
    durable, so after a power cut the state file is the new one or the old one."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.atomic_write_bytes(tmp_path / "state.bin", b"new")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_directories_it_creates_are_synced_into_their_parents(tmp_path, monkeypatch):
    """A new directory's entry is in its parent: unsynced, a power cut can lose the directory
    and the file in it, though the file itself was synced."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(st.st_ino)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.atomic_write_bytes(tmp_path / "a" / "b" / "state.bin", b"new")
    inodes = {p.stat().st_ino: p for p in (tmp_path, tmp_path / "a", tmp_path / "a" / "b")}
    assert [inodes[i] for i in synced] == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]


def test_a_name_at_the_file_system_limit_is_written_and_one_past_it_refused_first(tmp_path):
    """A 250-character name is legal, but its temporary name was not: `ttspec train` failed
    after the whole training run. One past the limit is refused before any work."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    legal = tmp_path / ("m" * (limit - 5) + ".json")
    assert files.check_writable(legal, directory=False) == legal
    assert files.write_text(legal, "x").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == [legal.name]
    wide = tmp_path / ("\N{GRINNING FACE}" * ((limit - 5) // 4) + ".json")  # 4 bytes a char
    assert files.write_text(wide, "y").read_text() == "y"
    with pytest.raises(OSError, match="longer than the file system allows"):
        files.check_writable(tmp_path / "new" / ("m" * (limit + 1)))


@pytest.mark.parametrize("answer", [-1, OSError(22, "Invalid argument")])
def test_a_file_system_without_a_name_limit_leaves_the_name_to_the_write(tmp_path, monkeypatch,
                                                                         answer):
    """pathconf answers -1 where there is no limit (POSIX) or fails where it cannot tell:
    neither refuses a name; a long one is written if the file system takes it."""
    def pathconf(path, name):
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(files.os, "pathconf", pathconf)
    target = tmp_path / "new" / ("m" * 200 + ".json")
    assert files.check_writable(target, directory=False) == target
    assert files.write_text(target, "x").read_text() == "x"


def test_a_locked_directory_is_refused_to_another_process_until_its_holder_ends(tmp_path):
    import subprocess
    import sys

    code = ("import sys, time; from ttspec_ros.files import DirectoryLock\n"
            "try:\n    DirectoryLock(sys.argv[1]).acquire()\nexcept BlockingIOError as e:\n"
            "    print('refused', e.strerror); sys.exit(3)\n"
            "print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BlockingIOError, match=f"in use by another process .pid {holder.pid}"):
            files.DirectoryLock(tmp_path).acquire()
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path), "0"],
                               capture_output=True, text=True)
        assert other.returncode == 3 and "refused" in other.stdout
    finally:
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait()
    lock = files.DirectoryLock(tmp_path).acquire()
    lock.release()
    files.DirectoryLock(tmp_path).acquire().release()


def test_temporaries_a_killed_writer_left_are_removed_by_name(tmp_path):
    for name in (".published.json.k3j2.tmp", ".specializer.safetensors.x9.tmp",
                 ".other.json.k3j2.tmp", "published.json"):
        (tmp_path / name).write_text("x")
    removed = files.remove_temporaries(tmp_path, ["published.json", "specializer.safetensors",
                                                  "ttt.safetensors"])
    assert sorted(p.name for p in removed) == [".published.json.k3j2.tmp",
                                               ".specializer.safetensors.x9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.k3j2.tmp",
                                                          "published.json"]


def test_safetensors_bytes_depend_on_the_content_only(tmp_path):
    """safetensors writes metadata in its hash map's order, which changes per process: two
    make-anchors runs with one seed gave files of different sha256."""
    from safetensors import safe_open

    script = ("import hashlib, numpy as np; from ttspec_ros.files import safetensors_bytes; "
              "print(hashlib.sha256(safetensors_bytes({'w': np.arange(6, dtype=np.float32)}, "
              "{'format': 'f', 'model_id': 'm', 'made_with': '{}', 'version': '3'}))"
              ".hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                              text=True, cwd=REPO).stdout for _ in range(4)}
    assert len(digests) == 1, digests
    tensors = {"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.int64)}
    path = files.atomic_write_bytes(tmp_path / "t.safetensors",
                                    files.safetensors_bytes(tensors, {"z": "1", "a": "2"}))
    with safe_open(str(path), framework="numpy") as f:  # still a valid file, all kept
        assert f.metadata() == {"z": "1", "a": "2"}
        for name, value in tensors.items():
            read = f.get_tensor(name)
            assert np.array_equal(read, value) and read.dtype == value.dtype
