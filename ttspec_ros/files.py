"""Atomic file writes: a temp file in the target's directory, fsynced, ``os.replace``, then an
fsync of the directory.

A reader (a node loading state, a test reading a result, a user tailing an experiment) sees the
old file or the new one, never half of one, and a crash mid-write leaves the old file intact.
Every file this package writes (state, updates, engines, manifests, results, plots) goes
through here.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# mkstemp creates owner-only files; results, graphs and engines are meant to be shared.
FILE_MODE = 0o644


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parent directories created, and synced into theirs);
    returns the path."""
    path = Path(path)
    created: list[Path] = []  # missing ancestors, innermost first
    ancestor = path.parent
    while not ancestor.exists():
        created.append(ancestor)
        ancestor = ancestor.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    for directory in reversed(created):  # a new directory's entry lives in its parent
        _sync_directory(directory.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
    return path


def tree_sha256(root: str | os.PathLike, relative_paths: Iterable[str]) -> str:
    """sha256 over each file's relative path and bytes, in the order given."""
    root = Path(root)
    digest = hashlib.sha256()
    for rel in relative_paths:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return digest.hexdigest()


def _temp_prefix(name: str) -> str:
    # The temporary name is cut short: a name near the file system's limit is legal for the
    # file itself, but the limit plus a prefix and a suffix is not.
    return "." + os.fsencode(name)[:64].decode("utf-8", "ignore") + "."  # bytes, not chars


def remove_temporaries(directory: str | os.PathLike, names: list[str]) -> list[Path]:
    """Delete the temporaries ``atomic_write_bytes`` left in ``directory`` for files named
    ``names`` (a process killed mid-write never removes its own; a review's 40 kill -9s of an
    adapter left two, one a full copy of its state). Only for a directory no other process
    writes these files in (see ``DirectoryLock``). -> the removed paths."""
    removed = []
    for name in names:
        for tmp in Path(directory).glob(glob.escape(_temp_prefix(name)) + "*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class DirectoryLock:
    """An exclusive lock on ``directory`` for this process's life (``flock`` on a lock file
    in it; the kernel drops it when the process ends, also by kill -9). ``acquire`` raises
    BlockingIOError naming the holder's pid while another process holds it."""

    FILE = ".lock"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BlockingIOError(errno.EWOULDBLOCK, f"{self.path.parent} is in use by "
                                  f"another process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def check_writable(path: str | os.PathLike, *, directory: bool = True) -> Path:
    """Refuse, before any work, an output that could not be written at the end: ``path`` (a
    directory, or with ``directory=False`` a file) must not be the other kind, and its nearest
    existing ancestor must be a directory this process may create entries in. Creates nothing,
    so a refused run leaves no empty directory behind. Raises OSError naming the path."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise (NotADirectoryError if directory else IsADirectoryError)(
            f"output {path} exists and is not a {'directory' if directory else 'file'}")
    ancestor = path if directory and path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"output {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"output {path}: {ancestor} is not writable")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")  # -1: no limit (POSIX)
    except (OSError, ValueError):  # a file system that does not say: the write will tell
        name_max = -1
    if path != ancestor and name_max > 0:
        for part in path.relative_to(ancestor).parts:
            if len(os.fsencode(part)) > name_max:
                raise OSError(errno.ENAMETOOLONG, f"output {path}: the name {part[:40]}... is "
                              "longer than the file system allows")
    return path


def _sync_directory(directory: Path) -> None:
    """fsync ``directory`` so the rename itself survives a power cut (the file's fsync covers
    only its bytes)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any, indent: int = 2) -> bytes:
    """``obj`` as the JSON text ``write_json`` writes (TypeError/ValueError if it is not
    serialisable: a caller can find that out before it writes anything)."""
    return (json.dumps(obj, indent=indent) + "\n").encode("utf-8")


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """numpy arrays + metadata as a safetensors file whose bytes depend on the content only.

    safetensors writes the metadata in its hash map's order, which changes from process to
    process: two runs with the same seed gave anchor files of different sha256. The header
    is rewritten with the metadata's keys sorted (tensor entries and data are unchanged; the
    header is padded with spaces to 8 bytes, as safetensors pads it)."""
    from safetensors.numpy import save

    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = dict(sorted(metadata.items()))  # what save wrote, in order
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_bytes(path, json_bytes(obj, indent))


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """A matplotlib figure as a PNG (``savefig`` options passed on)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    return atomic_write_bytes(path, buf.getvalue())
