"""Where a run lives: a run directory holding a Zarr v3 store, and durable, atomic writes to it.

zarr's LocalStore replaces every file atomically (temporary file + rename, zarr >= 3.1.3), which
covers process kills; it never fsyncs, so durability against power loss is done here: after a
batch of writes, :meth:`RunStore.sync` fsyncs the files and then their directories, and only then
is the commit marker written (atomically) and fsynced with its directory. Keys, not paths, are
what the rest of the package passes around (``W/c/0/0/0``, ``commit.json``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CrucibleError

STORE_NAME = "trajectory.zarr"
LOCK_FILE = ".lock"
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temporary files
DURABILITY = ("fsync", "none")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


class RunStore:
    """A run directory and the zarr store inside it."""

    def __init__(self, run_dir: str | Path, *, read_only: bool = True, durability: str = "fsync"):
        import zarr

        if durability not in DURABILITY:
            raise CrucibleError(f"durability must be one of {', '.join(DURABILITY)}, got {durability!r}")
        text = str(run_dir)
        if _URL.match(text):  # (pathlib turns "s3://b/run" into "s3:/b/run")
            raise CrucibleError(f"{text}: URLs are not supported yet; give a local directory")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / STORE_NAME
        self.durability = durability
        self.store = zarr.storage.LocalStore(self.root, read_only=read_only)

    # ----- keys ----------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_json(self, key: str) -> Any | None:
        """A small JSON document of the run, or None if absent. Never unpickled, never executed."""
        try:
            with open(self.path(key), "rb") as f:
                data = f.read(1 << 20)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CrucibleError(f"{self.run_dir}: {key} is not valid JSON ({e})") from None

    def write_json(self, key: str, value: Any) -> None:
        """Atomic replace (temporary file + rename), then fsync file and directory."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        data = (json.dumps(value, indent=2) + "\n").encode("utf-8")
        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))
        self.sync([key])

    # ----- durability ----------------------------------------------------------------------
    def sync(self, keys) -> None:
        """fsync the files of `keys`, then every directory from theirs up to the store root."""
        if self.durability == "none":
            return
        dirs: set[Path] = set()
        for key in keys:
            path = self.path(key)
            _fsync_path(path, os.O_RDONLY)
            parent = path.parent
            while parent != self.root.parent and parent not in dirs:
                dirs.add(parent)
                parent = parent.parent
        for directory in sorted(dirs, key=lambda p: -len(p.parts)):  # deepest first
            _fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)

    def sweep_partial_files(self) -> int:
        """Remove temporary files a killed writer left behind; returns how many."""
        removed = 0
        for path in self.root.rglob("*.partial"):
            if _PARTIAL.search(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def bytes_on_disk(self) -> int:
        """Bytes of the store's files, temporaries left by a kill not counted."""
        return sum(p.stat().st_size for p in self.root.rglob("*")
                   if p.is_file() and not _PARTIAL.search(p.name))


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def run_lock(run_dir: str | Path):
    """One writer per run: an OS file lock (released when the process dies, so never stale).

    The lock file is opened without following symlinks and must be a small regular file of ours
    with one link: a symlink or a foreign file put in its place is refused, never truncated.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CrucibleError(f"{path} is a symlink; refusing to use it as the run's lock (remove it)") from None
        raise CrucibleError(f"cannot open the lock file {path}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > 32 or info.st_uid != os.getuid():
            raise CrucibleError(f"{path} is not a lock file of this user's runs; refusing to use it (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CrucibleError(f"{run_dir} is being written by another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """A local file replaced atomically and durably: temporary file, fsync, rename, fsync dir."""
    import uuid

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
