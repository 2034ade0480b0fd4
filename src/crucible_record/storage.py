"""Where a run lives: a local directory or a URL (``s3://``, ``file://``, ``memory://``), as a zarr store.

Keys, not paths, are what the rest of the package passes around (``W/c/0/0/0``, ``commit.json``).

* :class:`LocalRunStore`: every write into the run, zarr's own included, is a durable replace (temporary
  file, fsync, rename, fsync of the directory) beneath the run, never through a symlink: zarr's
  LocalStore renames without fsync, so power loss could tear a committed block. ``durability="none"``
  keeps the atomic rename without fsyncs. One writer per run: an OS file lock.
* :class:`ObjectRunStore`: zarr's ObjectStore over obstore; a PUT is atomic and durable once it returns.
  S3 has no locks, so every PUT is conditional (If-None-Match to create, If-Match on the ETag last
  written or listed): a writer fenced off by a newer one fails at its next PUT and overwrites nothing.
  Credentials and endpoint come from the standard AWS_* environment; no listing cache hides new steps.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import math
import os
import re
import shutil
import stat
import threading
import uuid
from contextlib import contextmanager, nullcontext, suppress
from itertools import takewhile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import CrucibleError

STORE_NAME = "trajectory.zarr"
LOCK_FILE = ".lock"
MARKER = "commit.json"
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temporary files
DURABILITY = ("fsync", "none")
DEFAULT_COMMIT_INTERVAL = 10.0  # seconds of training a crash may lose at most
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # (pathlib folds "s3://b/run" into "s3:/b/run")
URL_SCHEMES = ("s3", "file", "memory")
MAX_METADATA_BYTES = 16 << 20  # a run's JSON documents (zarr.json, commit.json, .ranks/*.json)
MAX_FILE_BYTES = 1 << 30  # a store file whose size its array's metadata cannot bound
_MEMORY: dict[str, Any] = {}  # memory:// stores of this process, by URL
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # a folder, as named
_NOFOLLOW_DIR = _DIR | os.O_NOFOLLOW


def is_url(location: str | Path) -> bool:
    return bool(_URL.match(str(location)))  # (a one-letter scheme is a Windows drive: the regex needs two)


def open_store(location: str | Path, *, read_only: bool = True, durability: str = "fsync") -> "RunStore":
    """The run store at `location`: a local directory, ``file://``, ``s3://`` or ``memory://`` URL."""
    if durability not in DURABILITY:
        raise CrucibleError(f"durability must be one of {', '.join(DURABILITY)}, got {durability!r}")
    text = str(location)
    if not is_url(text):
        return LocalRunStore(Path(location), read_only=read_only, durability=durability)
    scheme = text.split(":", 1)[0].lower()
    if scheme not in URL_SCHEMES:
        raise CrucibleError(f"{text}: unsupported URL scheme {scheme!r}; use a local path or one of "
                            f"{', '.join(s + '://' for s in URL_SCHEMES)}")
    if scheme == "file":
        return LocalRunStore(Path(urlparse(text).path), read_only=read_only, durability=durability)
    if "://" not in text or not urlparse(text).netloc:
        raise CrucibleError(f"{text}: a URL needs a bucket (or name) and a path, e.g. {scheme}://bucket/runs/x")
    return ObjectRunStore(text.rstrip("/"), read_only=read_only)


def _marker_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


class RunStore:
    """A run: its zarr store (``RUN/trajectory.zarr``) and a few run-level files beside it (put_file,
    get_file: e.g. a checkpoint, replaced atomically). prepare_new: before creating a run, refuse an
    existing one and make the place."""

    location: str
    name: str
    store: Any  # the zarr store of RUN/trajectory.zarr
    conditional_put: bool = False  # a set() is conditional (If-None-Match / If-Match): fencing by the store

    # ----- keys of the zarr store ---------------------------------------------------------------
    def get_buffer(self, key: str):
        """A key's bytes as the store hands them over (a zarr Buffer, no copy), or None if absent."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        return sync(self.store.get(key, default_buffer_prototype()))

    def get(self, key: str) -> bytes | None:
        buf = self.get_buffer(key)
        return None if buf is None else buf.to_bytes()

    def set(self, key: str, data: bytes) -> None:
        """One atomic write (a PUT; a temporary file + rename on disk)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def exists(self, key: str) -> bool:
        from zarr.core.sync import sync

        return bool(sync(self.store.exists(key)))

    def read_json(self, key: str) -> Any | None:
        """A small JSON document of the run, or None if absent. Never unpickled, never executed."""
        data = self.get(key)
        if data is None:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CrucibleError(f"{self.location}: {key} is not valid JSON ({e})") from None

    # ----- what differs between disks and object stores -------------------------------------
    def claim_new(self) -> None:
        """The first write of a new run: it must not exist yet (atomic on object stores)."""

    def claim_existing(self) -> None:
        """Before continuing a run: become its only writer (object stores: fence the last one)."""

    def check_writer(self) -> None:
        """Raise if another writer took the run over (object stores; a no-op under a file lock)."""

    def write_marker(self, doc: dict[str, Any]) -> None:
        self.set(MARKER, _marker_bytes(doc))

    def sync(self, keys) -> None:
        """Make `keys` durable before a commit (no-op where a write is durable when it returns)."""

    def sync_all(self) -> None:
        """Make every file of the store durable (once, after creating a run)."""

    def sweep_partial_files(self) -> int:
        return 0

    def writer_lock(self):
        return nullcontext()


class LocalRunStore(RunStore):
    def __init__(self, run_dir: Path, *, read_only: bool = True, durability: str = "fsync"):
        self.run_dir = Path(run_dir)
        self.location = str(self.run_dir)
        self.name = self.run_dir.name
        self.root = self.run_dir / STORE_NAME
        if self.root.is_symlink():  # (the run directory itself may be a symlink: the user named it)
            raise CrucibleError(f"{self.root} is a symlink; a run's store must be a directory inside the run, "
                                f"never read or written through a link (replace it by the store itself)")
        self.files = DurableFiles(durability == "fsync", self.run_dir)
        self.store = _guarded_local_store()(self.root, read_only=read_only, files=self.files)

    def exists(self, key: str) -> bool:
        """A file is there (a FIFO, a device or a symlink too: reading it says what is wrong)."""
        try:
            return not stat.S_ISDIR(os.lstat(self.root / key).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def run_exists(self) -> bool:
        if not self.run_dir.exists():
            raise CrucibleError(f"run directory not found: {self.run_dir}")
        return self.exists("zarr.json")

    def prepare_new(self) -> None:
        if self.root.exists():
            raise CrucibleError(f"{self.run_dir} already holds a run; choose a new path (or resume it)")
        try:
            self.files.make_dirs(self.run_dir)
        except OSError as e:
            raise CrucibleError(f"cannot create {self.run_dir}: {e.strerror or e}") from None

    def sync(self, keys) -> None:
        """fsync what of `keys` this store did not write durably itself, and its folders up to the root."""
        if not self.files.fsync:
            return
        dirs: set[Path] = set()
        for key in keys:
            path = self.root / key
            if self.files.take_durable(path):
                continue
            fsync_path(path, os.O_RDONLY | os.O_NOFOLLOW)
            dirs.update(takewhile(lambda folder: folder != self.root.parent, path.parents))
        for directory in sorted(dirs, key=lambda p: -len(p.parts)):  # deepest first
            fsync_path(directory, _NOFOLLOW_DIR)

    def sync_all(self) -> None:
        self.sync([p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()])

    def sweep_partial_files(self) -> int:
        """Remove temporary files a killed writer left behind; returns how many."""
        partial = [p for p in self.root.rglob("*.partial")
                   if _PARTIAL.search(p.name) and p.is_file() and not p.is_symlink()]
        for path in partial:
            path.unlink(missing_ok=True)
        return len(partial)

    def bytes_on_disk(self) -> int:
        """Bytes of the store's files, temporaries left by a kill not counted."""
        return sum(p.stat().st_size for p in self.root.rglob("*")
                   if p.is_file() and not _PARTIAL.search(p.name))

    def writer_lock(self):
        return run_lock(self.run_dir)

    def put_file(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.run_dir / name, data)

    def get_file(self, name: str, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
        """A run-level file: a regular file (never through a symlink) of at most `max_bytes`."""
        data = read_file_beneath(self.run_dir, name, max_bytes)
        return None if data is None else bytes(data)


class DurableFiles:
    """Durable replaces of the files of one local run (fsync=False: atomic renames, no fsync).

    Files are reached through folders opened one component at a time without following a symlink
    below `run_dir`, so no write lands outside the run. It remembers the files it made durable
    (take_durable), so that LocalRunStore.sync does not fsync them again.
    """

    def __init__(self, fsync: bool, run_dir: Path):
        self.fsync = fsync
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()  # zarr writes from its worker threads; sync() runs in the writer's
        self._durable: set[Path] = set()

    def make_dirs(self, directory: Path) -> None:
        """mkdir -p; with fsync, each created folder's entry is made durable in its parent."""
        directory = Path(directory)
        missing = list(takewhile(lambda folder: not os.path.isdir(folder), (self.run_dir, *self.run_dir.parents)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for created in reversed(missing):  # outermost first: each entry durable before the next
                fsync_path(created.parent, _DIR)
        if directory != self.run_dir:
            os.close(open_dir_beneath(self.run_dir, self._parts(directory), make=True, fsync=self.fsync))

    def _parts(self, path: Path) -> tuple[str, ...]:
        """`path`'s components below the run (pathlib has dropped any '' or '.')."""
        try:
            parts = Path(path).relative_to(self.run_dir).parts
        except ValueError:
            raise CrucibleError(f"{path} is outside the run {self.run_dir}; refusing to touch it") from None
        if ".." in parts:
            raise CrucibleError(f"{path}: a path inside a run has no '.' or '..' component")
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is the run directory", str(path))
        return parts

    def replace(self, path: Path, data, *, exclusive: bool = False) -> None:
        """A durable replace of `path` (exclusive: FileExistsError if it exists) through a temporary
        named like zarr's (``<name>.<32 hex>.partial``), which sweep_partial_files removes."""
        *dirs, name = self._parts(path)
        if not os.path.isdir(self.run_dir):
            self.make_dirs(self.run_dir)
        dir_fd = open_dir_beneath(self.run_dir, dirs, make=True, fsync=self.fsync)
        try:
            if exclusive and lexists_at(name, dir_fd):  # (zarr asks this for every parent group, at each array)
                raise FileExistsError(errno.EEXIST, "file exists", str(path))
            _replace_at(dir_fd, name, data, f"{name}.{uuid.uuid4().hex}.partial", exclusive=exclusive,
                        fsync=self.fsync)
        finally:
            os.close(dir_fd)
        if self.fsync:
            with self._lock:
                self._durable.add(path)

    def delete(self, path: Path) -> None:
        """Remove a file (or a folder, whole) beneath the run, never through a symlinked folder."""
        *dirs, name = self._parts(path)
        try:
            dir_fd = open_dir_beneath(self.run_dir, dirs)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                shutil.rmtree(name, dir_fd=dir_fd)  # (fd-based: never follows a symlink inside)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dir_fd)

    def take_durable(self, path: Path) -> bool:
        """Whether `path` was replaced durably since the last call for it (and forget it)."""
        with self._lock:
            found = path in self._durable
            self._durable.discard(path)
            return found


# ----- file primitives: no-follow folders, durable replaces, bounded reads -----------------------
def fsync_path(path, flags: int) -> None:
    """fsync what `path` opens to with `flags` (O_NOFOLLOW to refuse a symlink)."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dir_beneath(base: str | Path, parts, *, make: bool = False, fsync: bool = False) -> int:
    """A descriptor of the folder `base`/parts..., opened one component at a time without following a
    symlink (`base` itself is opened as named); make: create what is missing (fsync: durably). A
    symlinked component is a CrucibleError, a missing one FileNotFoundError, a file in the way
    NotADirectoryError. The caller closes the descriptor."""
    fd = os.open(base, _DIR)
    try:
        for i, part in enumerate(parts):
            try:
                try:
                    child = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not make:
                        raise
                    with suppress(FileExistsError):  # (another writer thread made it just now)
                        os.mkdir(part, dir_fd=fd)
                        if fsync:
                            os.fsync(fd)
                    child = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            except OSError as e:
                where = Path(base, *parts[:i + 1])
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise CrucibleError(f"{where} is a symlink inside the run; refusing to read or write through it "
                                        f"(a damaged run: replace the link by what it should hold)") from None
                if e.errno == errno.ENOTDIR:
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(where)) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_output_dir(out: str | Path, run_dir: str | Path | None = None) -> int:
    """A descriptor of the folder a command writes its files into (export, analysis), created if
    missing: inside `run_dir` no component below the run may be a symlink, elsewhere the folder itself
    may not be one. So a link planted in the run, or given as --out, never sends files outside."""
    out = Path(out)
    where, run = Path(os.path.abspath(out)), run_dir and os.path.abspath(run_dir)
    parts = where.relative_to(run).parts if run and where.is_relative_to(run) else ()
    symlink = f"output folder {out} is a symlink; refusing to write through it (give the folder itself)"
    try:
        if parts:
            return open_dir_beneath(run_dir, parts, make=True)
        if out.is_symlink():
            raise CrucibleError(symlink)
        out.mkdir(parents=True, exist_ok=True)
        return os.open(out, _NOFOLLOW_DIR)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno == errno.ENOTDIR:
            raise CrucibleError(f"output folder {out} exists and is not a directory") from None
        if e.errno == errno.ELOOP:
            raise CrucibleError(symlink) from None
        raise CrucibleError(f"cannot create {out}: {e.strerror or e}") from None


def lexists_at(name: str, dir_fd: int) -> bool:
    """Whether `name` exists in the folder `dir_fd` (a symlink counts, dangling or not)."""
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _replace_at(dir_fd: int, name: str, data, tmp: str, *, exclusive: bool = False, fsync: bool = True,
                mode: int = 0o666) -> None:
    """The one durable replace: temporary file `tmp` in the folder `dir_fd` (O_EXCL, O_NOFOLLOW), fsync,
    rename over `name` (a symlink there is replaced, never followed; exclusive: link, so an existing
    `name` is FileExistsError), fsync the folder. `data`: bytes, or a function writing to the descriptor."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            data(fd) if callable(data) else write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:  # (after a rename there is nothing left to remove; after a link or a failure there is)
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
    if fsync:
        os.fsync(dir_fd)


def atomic_write_bytes(path: str | Path, data, *, dir_fd: int | None = None, mode: int = 0o666) -> None:
    """A local file replaced atomically and durably (a symlink at `path` is replaced, never written
    through), in `path`'s parent as named or in `dir_fd` (a folder the caller opened). `data`: bytes,
    or a function writing the contents to the descriptor it is given."""
    path = Path(path)
    if dir_fd is not None:
        return _replace_at(dir_fd, path.name, data, f".{path.name}.{uuid.uuid4().hex}.tmp", mode=mode)
    dir_fd = os.open(path.parent, _DIR)  # (an OSError names the folder)
    try:
        atomic_write_bytes(path, data, dir_fd=dir_fd, mode=mode)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str, *, dir_fd: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), dir_fd=dir_fd)


def write_json(path: str | Path, value: Any, *, dir_fd: int | None = None) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n", dir_fd=dir_fd)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | Path, max_bytes: int, *, dir_fd: int | None = None, name: str | None = None,
                 follow: bool = False, what: str = "") -> tuple[int, int]:
    """(descriptor, size) of a regular file of at most `max_bytes`, opened without blocking (a FIFO
    never hangs) and, unless `follow`, without following a symlink. Anything else is a one-line
    CrucibleError naming the file; a missing file FileNotFoundError. The caller closes it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    label = f"{what}{path}"
    try:
        fd = os.open(name if dir_fd is not None else path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise CrucibleError(f"{label} is a symlink; refusing to read through it "
                                f"(replace it by the file itself)") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(e.errno, e.strerror, str(path)) from None
        raise CrucibleError(f"cannot open {label}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            kind = next((kind for test, kind in _KINDS if test(info.st_mode)), "not a regular file")
            raise CrucibleError(f"{label} is {kind}, not a regular file; refusing to read it "
                                f"(replace it by the file itself)")
        if info.st_size > max_bytes:
            raise CrucibleError(f"{label} holds {info.st_size} bytes, more than the {max_bytes} it may; "
                                f"refusing to read it (a damaged or foreign file: replace it)")
        return fd, info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_fd(fd: int, start: int, stop: int) -> bytearray:
    """Bytes [start, stop) of an open file, by pread (stops early at the end of the file)."""
    out = bytearray(max(stop - start, 0))
    done = 0
    while done < len(out):
        n = os.preadv(fd, [memoryview(out)[done:]], start + done)  # (the view is gone before a resize)
        if n == 0:
            del out[done:]
            break
        done += n
    return out


def open_file_beneath(base: Path, key: str, max_bytes: int) -> tuple[int, int] | None:
    """(descriptor, size) of the file `base`/key: regular, at most `max_bytes`, no symlink anywhere
    beneath `base`; None if absent. The caller closes it."""
    *dirs, name = parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CrucibleError(f"{base}/{key}: a path inside a run has no empty, '.' or '..' component")
    try:
        dir_fd = open_dir_beneath(base, dirs)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return open_regular(f"{base}/{key}", max_bytes, dir_fd=dir_fd, name=name)
    except (FileNotFoundError, IsADirectoryError):
        return None
    finally:
        os.close(dir_fd)


def read_file_beneath(base: Path, key: str, max_bytes: int, byte_range=None) -> bytearray | None:
    """The one bounded read: a file `base`/key (see open_file_beneath), or None if absent;
    byte_range is zarr's ByteRequest."""
    opened = open_file_beneath(base, key, max_bytes)
    if opened is None:
        return None
    fd, size = opened
    try:
        return read_fd(fd, *_range(byte_range, size))
    except OSError as e:
        raise CrucibleError(f"cannot read {base}/{key}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _range(byte_range, size: int) -> tuple[int, int]:
    """zarr's ByteRequest -> [start, stop) within a file of `size` bytes."""
    if byte_range is None:
        return 0, size
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"Unexpected byte_range, got {byte_range}.")


@contextmanager
def run_lock(run_dir: str | Path):
    """One writer per run: an OS file lock (released when the process dies, so never stale). The lock
    file, opened without following a symlink, must be a small regular file of ours with one link."""
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


def chunk_file_cap(zarr_json: bytes | None) -> int | None:
    """The most bytes one chunk (or shard) file of an array may hold, from its zarr.json: the raw
    bytes of a chunk, plus what lossless codecs may add (well under 1/8), an index and checksums per
    inner chunk. None if the metadata (None: absent) does not say."""
    import numpy as np

    try:
        meta = json.loads(zarr_json)
        shape = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        name = meta["data_type"] if isinstance(meta["data_type"], str) else meta["data_type"]["name"]
        itemsize = 2 if name == "bfloat16" else np.dtype(name).itemsize
        inner = 1
        for codec in meta.get("codecs") or []:
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                inner_shape = codec["configuration"]["chunk_shape"]
                inner = math.prod(-(-s // max(int(c), 1)) for s, c in zip(shape, inner_shape))
        raw = math.prod(shape) * max(itemsize, 1)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return raw + raw // 8 + inner * 4096 + (1 << 20)


@functools.cache
def _guarded_local_store():
    """zarr's LocalStore whose writes are durable replaces beneath the run (DurableFiles), which
    refuses to write into a run whose root zarr.json is gone (LocalStore would silently recreate it),
    and whose reads are bounded (read_file_beneath: at most chunk_file_cap, or MAX_METADATA_BYTES
    for a JSON document)."""
    import asyncio

    import zarr
    from zarr.core.buffer import default_buffer_prototype

    class GuardedLocalStore(zarr.storage.LocalStore):
        def __init__(self, root, *, read_only: bool = False, files: DurableFiles):
            super().__init__(root, read_only=read_only)
            self.files = files
            self._caps: dict[str, int] = {}  # array path -> the most bytes one of its chunk files may hold

        def with_read_only(self, read_only: bool = False):
            return type(self)(self.root, read_only=read_only, files=self.files)

        async def _open(self, *, mode=None) -> None:
            if not self.read_only:  # (LocalStore's own mkdir would not fsync the parent)
                await asyncio.to_thread(self.files.make_dirs, self.root)
            await super()._open(mode=mode)

        def cap(self, key: str) -> int:
            """The most bytes the file of `key` may hold (a chunk's: from its array's zarr.json)."""
            array, is_chunk, _ = f"/{key}".partition("/c/")  # "W/c/0/0/0" -> "/W", "c/0" -> ""
            if not is_chunk:
                return MAX_METADATA_BYTES if key.endswith(".json") else MAX_FILE_BYTES
            array = array[1:]
            if array not in self._caps:
                meta = self.read(f"{array}/zarr.json" if array else "zarr.json", None)
                self._caps[array] = chunk_file_cap(meta) or MAX_FILE_BYTES
            return self._caps[array]

        def read(self, key: str, byte_range) -> bytearray | None:
            return read_file_beneath(self.files.run_dir, f"{STORE_NAME}/{key}", self.cap(key), byte_range)

        def get_sync(self, key, *, prototype=None, byte_range=None):
            self._ensure_open_sync()
            data = self.read(key, byte_range)
            return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

        async def get(self, key, prototype=None, byte_range=None):
            await self._ensure_open()
            return await asyncio.to_thread(self.get_sync, key, prototype=prototype, byte_range=byte_range)

        async def get_partial_values(self, prototype, key_ranges):
            return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

        def set_sync(self, key, value, *, exclusive: bool = False) -> None:
            self._ensure_open_sync()
            self._check_writable()
            if key != "zarr.json" and not (self.root / "zarr.json").is_file():
                raise FileNotFoundError(f"the run at {self.root} disappeared ({STORE_NAME}/zarr.json is gone)")
            self.files.replace(self.root / key, value.as_buffer_like(), exclusive=exclusive)

        async def set(self, key, value) -> None:
            await self._ensure_open()
            await asyncio.to_thread(self.set_sync, key, value)

        async def set_if_not_exists(self, key, value) -> None:
            await self._ensure_open()
            with suppress(FileExistsError):
                await asyncio.to_thread(self.set_sync, key, value, exclusive=True)

        def delete_sync(self, key) -> None:
            self._ensure_open_sync()
            self._check_writable()
            self.files.delete(self.root / key)

        async def delete(self, key) -> None:
            self._check_writable()
            await asyncio.to_thread(self.files.delete, self.root / key)

        async def delete_dir(self, prefix) -> None:
            self._check_writable()
            if (self.root / prefix).is_file() and not (self.root / prefix).is_symlink():
                raise ValueError(f"delete_dir was passed a {prefix=!r} that is a file")
            await asyncio.to_thread(self.files.delete, self.root / prefix.rstrip("/"))

    return GuardedLocalStore


class ObjectRunStore(RunStore):
    """A run under an object-store URL; see the module docstring for the writer protocol.

    A PUT is conditional on the object's ETag as this writer last PUT it, or as one LIST saw it when
    the writer took the run (lazily, at the first write of a writer that never claims, e.g. a rank > 0);
    never on a HEAD just before it.
    """

    conditional_put = True

    def __init__(self, url: str, *, read_only: bool = True):
        self.location = url
        self.name = url.rsplit("/", 1)[-1]
        self.run_dir = None
        self._objects = _object_store(url)  # run-level files (checkpoints)
        self._zarr_objects = _object_store(f"{url}/{STORE_NAME}")
        self.store = _conditional_object_store()(self._zarr_objects, read_only=read_only, run=self)
        self.token = uuid.uuid4().hex  # this writer, named in the marker
        self._etags: dict[Any, dict[str, str | None]] = {id(self._objects): {}, id(self._zarr_objects): {}}
        self._listed = False  # the ETags of the objects already there are known
        self._list_lock = threading.Lock()
        self._claimed = False  # this writer created or took the run: it holds the marker
        self._orphan: str | None = None  # ETag of a marker without a run, which claim_new takes over
        self._fenced = False

    def run_exists(self) -> bool:
        if self.exists("zarr.json"):
            return True
        if self.exists(MARKER):
            raise CrucibleError(f"no run was ever created at {self.location}: a writer claimed it (commit.json) but "
                                f"stopped before creating the run's arrays; create it anew (without resume), which "
                                f"takes that claim over")
        return False

    def _read_marker(self) -> tuple[Any, str | None] | None:
        """(the marker's JSON, None if it is not JSON; its ETag), or None if there is no marker."""
        result = _get(self._zarr_objects, MARKER)
        if result is None:
            return None
        try:
            return json.loads(bytes(result.bytes())), result.meta["e_tag"]
        except ValueError:
            return None, result.meta["e_tag"]

    def prepare_new(self) -> None:
        if self.exists("zarr.json"):
            raise CrucibleError(f"{self.location} already holds a run; choose a new path (or resume it)")
        found = self._read_marker()
        if found is None:
            return
        doc, etag = found
        if not (isinstance(doc, dict) and doc.get("steps") == 0):
            raise CrucibleError(f"{self.location} holds a commit marker but no run (zarr.json is gone): a damaged run; "
                                f"choose a new path (or delete it)")
        self._orphan = etag  # a claim whose run was never created: claim_new takes it over

    def _claim(self, doc: dict[str, Any], etag: str | None, refused: str) -> None:
        """PUT the marker naming this writer, If-Match `etag` (If-None-Match without one): of two
        writers racing, one wins; the other gets `refused`."""
        try:
            result = _put_if(self._zarr_objects, MARKER, _marker_bytes({**doc, "writer": self.token}), etag)
        except Exception as e:
            if _refused(e, if_match=etag is not None):
                raise CrucibleError(f"{self.location} {refused}") from None
            raise
        self._etags[id(self._zarr_objects)][MARKER] = result["e_tag"]
        self._claimed = True

    def claim_new(self) -> None:
        """Create the marker, or take an orphan claim over."""
        self._claim({"steps": 0}, self._orphan, "already holds a run (created by another writer just now)")
        if self._orphan:
            self._learn_etags()  # what the stopped writer left (e.g. .ranks/0.json) is rewritten If-Match
        else:
            self._listed = True  # a new run: nothing there (a stray object is handled like a stale writer's)

    def claim_existing(self) -> None:
        """Take the run over: rewrite the marker If-Match on the ETag just read, then one LIST."""
        doc, etag = self._read_marker() or ({}, None)
        self._claim(doc or {}, etag, "is being taken over by another writer right now "
                                     "(its commit marker changed under this one); try again")
        self._listed = False
        self._learn_etags()  # after the claim: a fenced writer's later PUTs show up as refusals

    def check_writer(self) -> None:
        """Raise once a PUT found the run taken over (the PUTs themselves are the fence: no request)."""
        if self._fenced:
            self._fence()

    def write_marker(self, doc: dict[str, Any]) -> None:
        self.put_key(MARKER, _marker_bytes({**doc, "writer": self.token}))

    def bytes_on_disk(self) -> int:
        return sum(meta["size"] for meta in _listing(self._zarr_objects))

    def put_file(self, name: str, data: bytes) -> None:
        self.put_key(name, data, objects=self._objects)

    def get_file(self, name: str, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
        result = _get(self._objects, name)
        if result is None:
            return None
        if result.meta["size"] > max_bytes:
            raise CrucibleError(f"{self.location}/{name} holds {result.meta['size']} bytes, more than the "
                                f"{max_bytes} it may; refusing to read it (a damaged run: remove it)")
        return bytes(result.bytes())

    # ----- conditional PUTs -----------------------------------------------------------------------
    def forget_key(self, key: str) -> None:
        """A key of the zarr store was deleted: its next PUT creates it."""
        self._etags[id(self._zarr_objects)].pop(key, None)

    def put_key(self, key: str, data, *, only_new: bool = False, objects=None) -> None:
        """PUT a key of the zarr store (of `objects`: the run-level files) If-Match on the ETag this
        writer knows, If-None-Match where it knows none; only_new (zarr's set_if_not_exists): not if it exists."""
        objects = self._zarr_objects if objects is None else objects
        self.check_writer()
        if not self._listed:
            self._learn_etags()
        etags = self._etags[id(objects)]
        etag = etags.get(key)
        if only_new and etag is not None:
            return
        try:
            result = _put_if(objects, key, data, etag)
        except Exception as e:
            if not _refused(e, if_match=etag is not None):
                raise
            if only_new and etag is None:
                return
            result = self._put_over_a_stale_writer(objects, key, data)
        etags[key] = result["e_tag"]

    def _put_over_a_stale_writer(self, objects, key: str, data):
        """A PUT was refused: `key` changed since this writer learnt its ETag. If this writer still holds
        the marker, a writer it fenced off (or a stray object) wrote it: PUT on the current ETag once the
        marker is checked to be still ours, so that a writer taking over in between fails this PUT.
        Otherwise this writer was fenced off: stop."""
        import obstore

        if not self._claimed or key == MARKER:  # a rank > 0 cannot tell the two apart: stop
            self._fence()
        try:
            etag = obstore.head(objects, key)["e_tag"]
        except _not_found():
            etag = None
        if obstore.head(self._zarr_objects, MARKER)["e_tag"] != self._etags[id(self._zarr_objects)].get(MARKER):
            self._fence()
        try:
            return _put_if(objects, key, data, etag)
        except Exception as e:
            if _refused(e, if_match=etag is not None):
                self._fence()
            raise

    def _learn_etags(self) -> None:
        """One LIST (of the zarr store, and of the run-level files): the ETags later PUTs are conditional on."""
        import obstore

        with self._list_lock:
            if self._listed:
                return
            for objects, metas in ((self._zarr_objects, _listing(self._zarr_objects)),
                                   (self._objects, obstore.list_with_delimiter(self._objects)["objects"])):
                etags = self._etags[id(objects)]
                for meta in metas:
                    etags.setdefault(meta["path"], meta["e_tag"])  # (what this writer wrote itself is as new)
            self._listed = True

    def _fence(self):
        self._fenced = True
        raise CrucibleError(f"another writer took over {self.location}; this writer stops: nothing of the other's "
                            f"was overwritten (what this one committed before is kept)")


@functools.cache
def _conditional_object_store():
    """zarr's ObjectStore whose writes (zarr.json on resize too) are the run's conditional PUTs: a
    writer fenced off never overwrites a newer writer's objects."""
    import asyncio

    import zarr

    class ConditionalObjectStore(zarr.storage.ObjectStore):
        def __init__(self, store, *, read_only: bool = False, run: ObjectRunStore):
            super().__init__(store, read_only=read_only)
            self.run = run

        def with_read_only(self, read_only: bool = False):
            return type(self)(self.store, read_only=read_only, run=self.run)

        def __getstate__(self):  # (a pickled copy, e.g. for a dask task, only reads: no writer in it)
            return {**super().__getstate__(), "run": None, "_read_only": True}

        async def set(self, key, value) -> None:
            self._check_writable()
            await asyncio.to_thread(self.run.put_key, key, value.as_buffer_like())

        async def set_if_not_exists(self, key, value) -> None:
            self._check_writable()
            await asyncio.to_thread(self.run.put_key, key, value.as_buffer_like(), only_new=True)

        async def delete(self, key) -> None:  # (zarr's delete_dir deletes what it lists here, key by key)
            await super().delete(key)
            self.run.forget_key(key)

    return ConditionalObjectStore


def _put_if(objects, key: str, data, etag: str | None):
    """PUT If-Match `etag`, or If-None-Match where there is none."""
    import obstore

    return obstore.put(objects, key, data, mode={"e_tag": etag} if etag else "create")


def _get(objects, key: str):
    """obstore's GET result, or None if the object is absent."""
    import obstore

    try:
        return obstore.get(objects, key)
    except _not_found():
        return None


def _listing(objects):
    import obstore

    return (meta for batch in obstore.list(objects) for meta in batch)


def _refused(e: Exception, *, if_match: bool) -> bool:
    """A failed precondition: If-None-Match on an object that exists, If-Match on another ETag (or,
    if_match, on an object deleted since: S3 answers 404 there)."""
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    return isinstance(e, (AlreadyExistsError, PreconditionError)) or (if_match and isinstance(e, _not_found()))


def _not_found() -> tuple[type[Exception], ...]:
    """What obstore raises for an absent object."""
    from obstore.exceptions import NotFoundError

    return NotFoundError, FileNotFoundError


def _object_store(url: str):
    """An obstore store for `url`; credentials and endpoint from the environment (never from the URL)."""
    try:
        from obstore.store import MemoryStore, from_url
    except ImportError:
        raise CrucibleError(f"{url}: runs on object storage need obstore: pip install 'crucible-record[s3]'") from None

    if url.startswith("memory://"):
        return _MEMORY.setdefault(url, MemoryStore())
    try:
        return from_url(url)
    except Exception as e:
        raise CrucibleError(f"{url}: cannot open object store: {type(e).__name__}: {str(e).splitlines()[0]}") from None
