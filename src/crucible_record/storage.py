"""Where a run lives: a local directory or a URL (``s3://``, ``file://``, ``memory://``), as a zarr store.

Keys, not paths, are what the rest of the package passes around (``W/c/0/0/0``, ``commit.json``).
Two kinds of run store share one interface:

* :class:`LocalRunStore`: every write into the run, ours and zarr's own (zarr.json on resize), is a
  durable replace: a temporary file in the same directory, fsynced, renamed over the old file, then
  the directory fsynced (and a parent of each directory created). zarr's LocalStore renames without
  any fsync, so power loss could leave a torn block in place of rows committed before. With
  ``durability="none"`` the rename stays atomic, without fsyncs. One writer per run: an OS file lock.
* :class:`ObjectRunStore`: zarr's ObjectStore over obstore. A PUT is atomic and durable once it
  returns, one PUT per shard. S3 has no locks, so every PUT is conditional: If-None-Match for an
  object the writer creates, If-Match on the ETag it last wrote or listed for a rewrite. The run is
  claimed by creating (or, to resume, rewriting) its commit marker; a writer fenced off by a newer
  one gets a failed precondition at its next PUT, and stops without overwriting anything. Credentials
  and endpoint come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP); no listing caches stand between a live reader and
  new steps.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import stat
import threading
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import CrucibleError

STORE_NAME = "trajectory.zarr"
LOCK_FILE = ".lock"
MARKER = "commit.json"
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temporary files
DURABILITY = ("fsync", "none")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # (pathlib folds "s3://b/run" into "s3:/b/run")
URL_SCHEMES = ("s3", "file", "memory")
_MEMORY: dict[str, Any] = {}  # memory:// stores of this process, by URL


def is_url(location: str | Path) -> bool:
    return bool(_URL.match(str(location))) and len(str(location).split(":", 1)[0]) > 1


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


class RunStore:
    """A run: its zarr store (``RUN/trajectory.zarr``) and a few run-level files beside it."""

    location: str
    name: str
    store: Any  # the zarr store of RUN/trajectory.zarr
    # Capabilities: callers ask these, never the store's class.
    durable_replace: bool = False  # a set() replaces a file durably (temporary, fsync, rename, fsync dir)
    conditional_put: bool = False  # a set() is conditional (If-None-Match / If-Match): fencing by the store
    file_lock: bool = False  # one writer is ensured by an OS file lock

    # ----- keys of the zarr store ---------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buf = sync(self.store.get(key, default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def get_buffer(self, key: str):
        """A key's bytes as the store hands them over (a zarr Buffer, no copy), or None if absent."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        return sync(self.store.get(key, default_buffer_prototype()))

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
    def run_exists(self) -> bool:
        raise NotImplementedError

    def prepare_new(self) -> None:
        """Before creating a run here: refuse an existing one, make the place."""
        raise NotImplementedError

    def claim_new(self) -> None:
        """The first write of a new run: it must not exist yet (atomic on object stores)."""

    def claim_existing(self) -> None:
        """Before continuing a run: become its only writer (object stores: fence the last one)."""

    def check_writer(self) -> None:
        """Raise if another writer took the run over (object stores; a no-op under a file lock)."""

    def write_marker(self, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def sync(self, keys) -> None:
        """Make `keys` durable before a commit (no-op where a write is durable when it returns)."""

    def sync_all(self) -> None:
        """Make every file of the store durable (once, after creating a run)."""

    def sweep_partial_files(self) -> int:
        return 0

    def bytes_on_disk(self) -> int:
        raise NotImplementedError

    def writer_lock(self):
        return nullcontext()

    def put_file(self, name: str, data: bytes) -> None:
        """A run-level file beside the store (e.g. a checkpoint), replaced atomically."""
        raise NotImplementedError

    def get_file(self, name: str) -> bytes | None:
        raise NotImplementedError


class LocalRunStore(RunStore):
    durable_replace = True
    file_lock = True

    def __init__(self, run_dir: Path, *, read_only: bool = True, durability: str = "fsync"):
        self.run_dir = Path(run_dir)
        self.location = str(self.run_dir)
        self.name = self.run_dir.name
        self.root = self.run_dir / STORE_NAME
        self.durability = durability
        self.files = DurableFiles(durability == "fsync")
        self.store = _guarded_local_store()(self.root, read_only=read_only, files=self.files)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

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

    def write_marker(self, doc: dict[str, Any]) -> None:
        """A durable replace, like every write into the run (see DurableFiles.replace)."""
        self.set(MARKER, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

    def sync(self, keys) -> None:
        """fsync what of `keys` was not written durably through this store (and its directories up
        to the store root); what was (every set(), zarr's writes included) is durable already."""
        if self.durability == "none":
            return
        dirs: set[Path] = set()
        for key in keys:
            path = self.path(key)
            if self.files.take_durable(path):
                continue
            _fsync_path(path, os.O_RDONLY)
            parent = path.parent
            while parent != self.root.parent and parent not in dirs:
                dirs.add(parent)
                parent = parent.parent
        for directory in sorted(dirs, key=lambda p: -len(p.parts)):  # deepest first
            _fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)

    def sync_all(self) -> None:
        self.sync([p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()])

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

    def writer_lock(self):
        return run_lock(self.run_dir)

    def put_file(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.run_dir / name, data)

    def get_file(self, name: str) -> bytes | None:
        path = self.run_dir / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise CrucibleError(f"{path} is not a regular file; refusing to read it")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None


class DurableFiles:
    """Durable replaces of the files of one local run (fsync=False: atomic renames, no fsync).

    Remembers which files it made durable since a caller last asked (take_durable), so that
    RunStore.sync does not fsync them again.
    """

    def __init__(self, fsync: bool):
        self.fsync = fsync
        self._lock = threading.Lock()  # zarr writes from its worker threads; sync() runs in the writer's
        self._durable: set[Path] = set()

    def make_dirs(self, directory: Path) -> None:
        """mkdir -p; with fsync, each created directory's entry is made durable in its parent."""
        missing = []
        parent = directory
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for created in reversed(missing):  # outermost first: each entry durable before the next
                _fsync_path(created.parent, os.O_RDONLY | os.O_DIRECTORY)

    def replace(self, path: Path, data, *, exclusive: bool = False) -> None:
        """Write `data` to a temporary file beside `path` (O_EXCL, O_NOFOLLOW), fsync it, rename it
        over `path` (exclusive: link it, FileExistsError if `path` exists), fsync the directory.
        The temporary name is zarr's (``<name>.<32 hex>.partial``), which sweep_partial_files removes."""
        if exclusive and os.path.lexists(path):  # (zarr asks this for every parent group, at each array)
            raise FileExistsError(errno.EEXIST, "file exists", str(path))
        self.make_dirs(path.parent)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:  # (rename would replace an existing file; link refuses to)
                os.link(tmp, path)
            else:
                os.replace(tmp, path)
        finally:  # (after a rename there is nothing left to remove; after a link or a failure there is)
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync_path(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            with self._lock:
                self._durable.add(path)

    def take_durable(self, path: Path) -> bool:
        """Whether `path` was replaced durably since the last call for it (and forget it)."""
        with self._lock:
            if path in self._durable:
                self._durable.discard(path)
                return True
            return False


@functools.cache
def _guarded_local_store():
    """zarr's LocalStore, except that every write is a durable replace (DurableFiles) and that it
    refuses to write into a run whose root metadata is gone (LocalStore would silently recreate the
    deleted folders of a run being written)."""
    import asyncio

    import zarr

    class GuardedLocalStore(zarr.storage.LocalStore):
        def __init__(self, root, *, read_only: bool = False, files: DurableFiles | None = None):
            super().__init__(root, read_only=read_only)
            self.files = files if files is not None else DurableFiles(True)

        def with_read_only(self, read_only: bool = False):
            return type(self)(self.root, read_only=read_only, files=self.files)

        async def _open(self, *, mode=None) -> None:
            if not self.read_only:  # (LocalStore's own mkdir would not fsync the parent)
                await asyncio.to_thread(self.files.make_dirs, self.root)
            await super()._open(mode=mode)

        def _checked(self, key: str, value) -> Path:
            self._check_writable()
            if key != "zarr.json" and not (self.root / "zarr.json").is_file():
                raise FileNotFoundError(f"the run at {self.root} disappeared ({STORE_NAME}/zarr.json is gone)")
            return self.root / key

        async def set(self, key, value) -> None:
            if not self._is_open:
                await self._open()
            await asyncio.to_thread(self.files.replace, self._checked(key, value), value.as_buffer_like())

        async def set_if_not_exists(self, key, value) -> None:
            if not self._is_open:
                await self._open()
            try:
                await asyncio.to_thread(self.files.replace, self._checked(key, value), value.as_buffer_like(),
                                        exclusive=True)
            except FileExistsError:
                pass

        def set_sync(self, key, value) -> None:
            self._ensure_open_sync()
            self.files.replace(self._checked(key, value), value.as_buffer_like())

    return GuardedLocalStore


class ObjectRunStore(RunStore):
    """A run under an object-store URL; see the module docstring for the writer protocol.

    Every PUT is conditional on what this writer knows of the object: its ETag from this writer's
    last PUT of it, or from one LIST when the writer takes the run (claim_existing; lazily at the
    first write of a writer that never claims, e.g. a rank > 0), never from a HEAD just before it.
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

    @property
    def _etag(self) -> str | None:
        """The marker's ETag as this writer last wrote (or read) it."""
        return self._etags[id(self._zarr_objects)].get(MARKER)

    def run_exists(self) -> bool:
        if self.exists("zarr.json"):
            return True
        if self.exists(MARKER):
            raise CrucibleError(f"no run was ever created at {self.location}: a writer claimed it (commit.json) but "
                                f"stopped before creating the run's arrays; create it anew (without resume), which "
                                f"takes that claim over")
        return False

    def prepare_new(self) -> None:
        if self.exists("zarr.json"):
            raise CrucibleError(f"{self.location} already holds a run; choose a new path (or resume it)")
        found = self._get_with_etag(self._zarr_objects, MARKER)
        if found is None:
            return
        data, etag = found
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not (isinstance(doc, dict) and doc.get("steps") == 0):
            raise CrucibleError(f"{self.location} holds a commit marker but no run (zarr.json is gone): a damaged run; "
                                f"choose a new path (or delete it)")
        self._orphan = etag  # a claim whose run was never created: claim_new takes it over

    def claim_new(self) -> None:
        """Create the marker (If-None-Match), or take an orphan claim over (If-Match on its ETag):
        of two creators racing, one wins."""
        import obstore

        mode = {"e_tag": self._orphan} if self._orphan else "create"
        try:
            result = obstore.put(self._zarr_objects, MARKER, _marker_bytes({"steps": 0, "writer": self.token}), mode=mode)
        except Exception as e:
            if _refused(e, if_match=bool(self._orphan)):
                raise CrucibleError(f"{self.location} already holds a run (created by another writer just now)") from None
            raise
        self._etags[id(self._zarr_objects)][MARKER] = result["e_tag"]
        self._claimed = True
        if self._orphan:
            self._learn_etags()  # what the stopped writer left (e.g. .ranks/0.json) is rewritten If-Match
        else:
            self._listed = True  # a new run: nothing there (a stray object is handled like a stale writer's)

    def claim_existing(self) -> None:
        """Take the run over: rewrite the marker If-Match on the ETag just read, then one LIST."""
        import obstore

        found = self._get_with_etag(self._zarr_objects, MARKER)
        doc = {}
        if found is not None:
            try:
                doc = json.loads(found[0])
            except ValueError:
                pass
        try:
            result = obstore.put(self._zarr_objects, MARKER, _marker_bytes({**doc, "writer": self.token}),
                                 mode={"e_tag": found[1]} if found else "create")
        except Exception as e:
            if _refused(e, if_match=found is not None):
                raise CrucibleError(f"{self.location} is being taken over by another writer right now "
                                    f"(its commit marker changed under this one); try again") from None
            raise
        self._etags[id(self._zarr_objects)][MARKER] = result["e_tag"]
        self._claimed = True
        self._listed = False
        self._learn_etags()  # after the claim: a fenced writer's later PUTs show up as refusals

    def check_writer(self) -> None:
        """Raise once a PUT found the run taken over (the PUTs themselves are the fence: no request)."""
        if self._fenced:
            raise self._fenced_error()

    def write_marker(self, doc: dict[str, Any]) -> None:
        self._put(self._zarr_objects, MARKER, _marker_bytes({**doc, "writer": self.token}))

    def bytes_on_disk(self) -> int:
        import obstore

        return sum(meta["size"] for batch in obstore.list(self._zarr_objects) for meta in batch)

    def put_file(self, name: str, data: bytes) -> None:
        self._put(self._objects, name, data)

    def get_file(self, name: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self._objects, name).bytes())
        except FileNotFoundError:
            return None

    # ----- conditional PUTs -----------------------------------------------------------------------
    def put_key(self, key: str, data, *, only_new: bool = False) -> bool:
        """A key of the zarr store, PUT conditionally (the zarr store's set); only_new: zarr's
        set_if_not_exists, False if the key exists."""
        return self._put(self._zarr_objects, key, data, only_new=only_new)

    def forget_key(self, key: str) -> None:
        """A key of the zarr store was deleted: its next PUT creates it."""
        self._etags[id(self._zarr_objects)].pop(key, None)

    def forget_prefix(self, prefix: str) -> None:
        etags = self._etags[id(self._zarr_objects)]
        for key in [k for k in etags if k.startswith(prefix.rstrip("/") + "/")]:
            etags.pop(key, None)

    def _put(self, objects, key: str, data, *, only_new: bool = False) -> bool:
        """PUT If-Match on the ETag this writer knows, If-None-Match where it knows none."""
        import obstore

        if self._fenced:
            raise self._fenced_error()
        if not self._listed:
            self._learn_etags()
        etags = self._etags[id(objects)]
        etag = etags.get(key)
        if only_new and etag is not None:
            return False
        try:
            result = obstore.put(objects, key, data, mode={"e_tag": etag} if etag else "create")
        except Exception as e:
            if not _refused(e, if_match=etag is not None):
                raise
            if only_new and etag is None:
                return False
            result = self._put_over_a_stale_writer(objects, key, data)
        etags[key] = result["e_tag"]
        return True

    def _put_over_a_stale_writer(self, objects, key: str, data):
        """A PUT was refused: someone wrote `key` since this writer learnt its ETag. If this writer
        still holds the marker, that was a writer it fenced off (or a stray object): read the ETag,
        check the marker is still this writer's, and PUT on that ETag, so that a writer taking over
        in between makes this PUT fail. Otherwise this writer was fenced off: stop."""
        import obstore

        if not self._claimed or key == MARKER:  # a rank > 0 cannot tell the two apart: stop
            self._fence()
        try:
            etag = obstore.head(objects, key)["e_tag"]
        except Exception as e:
            if not _missing(e):
                raise
            etag = None
        if obstore.head(self._zarr_objects, MARKER)["e_tag"] != self._etag:
            self._fence()
        try:
            return obstore.put(objects, key, data, mode={"e_tag": etag} if etag else "create")
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
            for objects, metas in ((self._zarr_objects, (m for batch in obstore.list(self._zarr_objects) for m in batch)),
                                   (self._objects, obstore.list_with_delimiter(self._objects)["objects"])):
                etags = self._etags[id(objects)]
                for meta in metas:
                    etags.setdefault(meta["path"], meta["e_tag"])  # (what this writer wrote itself is as new)
            self._listed = True

    def _get_with_etag(self, objects, key: str) -> tuple[bytes, str | None] | None:
        import obstore

        try:
            result = obstore.get(objects, key)
        except Exception as e:
            if _missing(e):
                return None
            raise
        return bytes(result.bytes()), result.meta["e_tag"]

    def _fence(self):
        self._fenced = True
        raise self._fenced_error()

    def _fenced_error(self) -> CrucibleError:
        return CrucibleError(f"another writer took over {self.location}; this writer stops: nothing of the other's "
                             f"was overwritten (what this one committed before is kept)")


@functools.cache
def _conditional_object_store():
    """zarr's ObjectStore whose writes are the run's conditional PUTs (zarr writes zarr.json itself,
    on resize): a writer fenced off can never overwrite a newer writer's objects."""
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

        async def delete(self, key) -> None:
            await super().delete(key)
            self.run.forget_key(key)

        async def delete_dir(self, prefix) -> None:
            await super().delete_dir(prefix)
            self.run.forget_prefix(prefix)

    return ConditionalObjectStore


def _refused(e: Exception, *, if_match: bool) -> bool:
    """A failed precondition: If-None-Match on an object that exists, If-Match on another ETag (or,
    if_match, on an object deleted since: S3 answers 404 there)."""
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    return isinstance(e, (AlreadyExistsError, PreconditionError)) or (if_match and _missing(e))


def _missing(e: Exception) -> bool:
    from obstore.exceptions import NotFoundError

    return isinstance(e, (NotFoundError, FileNotFoundError))


def _marker_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


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
