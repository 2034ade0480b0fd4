"""Record any training loop: stage each step off the device, write whole blocks from one thread.

Call order (training thread unless marked):

1. ``cr.record(path, fields)`` creates the run (or, with ``resume=True``, reopens it at its
   committed step), takes the run's lock and starts the writer thread.
2. ``rec.record(step, **tensors)`` checks every tensor against its Field (exact shape and dtype),
   copies it into a free staging slot (pinned memory and a non-blocking copy for CUDA tensors: no
   host sync) and queues the slot. It returns True when this step is a *commit point*: a block of
   some field is full, or ``commit_interval`` seconds passed since the last commit point.
3. Writer thread: waits for the copy (a CUDA event), puts each row into its field's block buffer,
   writes a block when it is full (one shard per block: a partial-chunk write would be a
   read-modify-write) and, at each commit point, writes every field's partial block whole, fsyncs
   the files and their directories, then moves the commit marker. A crash loses at most the steps
   after the last commit point.
4. ``rec.after_commit(step, fn)`` runs ``fn`` on the writer thread once ``step`` is committed
   (checkpoints: never ahead of the data).
5. ``rec.close()`` (or leaving the ``with`` block) commits what is staged, stops the writer and
   raises the writer's error, if any, with its cause chained. A recorder never closed (an
   exception escaped a loop without ``with``) is closed at interpreter exit, with a warning on the
   ``crucible_record`` logger: its staged steps are committed, not lost.

Memory is bounded by the staging slots and one block per field, never by the number of steps.

Several ranks of a torch.distributed job (an initialised default process group of world size > 1)
record one run together: see crucible_record/ranks.py for the protocol. One process, or world size 1,
is the path above, unchanged.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)
import logging
import math
import os
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codecs import Layout
from .errors import CrucibleError, RecorderError
from .fields import Field, Shard, as_tensor
from . import dtypes
from .format.blocks import WRITE_ALL, encode_block, missing_blocks
from .format.schema import create_run, open_group, read_commit, write_commit
from .shardio import default_threads
from .storage import RunStore, open_store

DEFAULT_COMMIT_INTERVAL = 10.0  # seconds of training a crash may lose at most
DEFAULT_RANK_TIMEOUT = 60.0  # multi-rank: how long a closing rank waits for the others
_POLL_S = 0.05  # how often a waiting producer checks that the writer is still alive
log = logging.getLogger("crucible_record")


def record(path: str | Path, fields: Mapping[str, Field], steps: int | None = None,
           attributes: Mapping[str, Any] | None = None, *, constants: Mapping[str, Any] | None = None,
           resume: bool = False, layout: Layout | None = None,
           commit_interval: float = DEFAULT_COMMIT_INTERVAL, durability: str = "fsync",
           slots: int | None = None, rank_timeout: float = DEFAULT_RANK_TIMEOUT,
           distributed: bool | None = None, writer_threads: int | None = None) -> "Recorder":
    """Create a run at `path` (refusing an existing one) and return its Recorder.

    steps: None = open-ended (arrays grow as the run goes); N = steps 0..N-1, arrays sized up front.
    constants: tensors stored once beside the fields (e.g. a token mask): name -> tensor, or
        name -> (tensor, dims) to name its axes.
    resume=True: reopen an existing run with the same fields; recording continues at
    ``rec.next_step``, its committed step count. `steps`, `attributes`, `constants` and `layout`
    are then the run's own and must not be given.

    Under torch.distributed (an initialised default process group of world size > 1) call it on
    every rank with the same arguments; pass each rank's rows of a field split among the ranks as
    ``cr.Shard(rows, offset=first_row)``, and a replicated field as the tensor itself (rank 0 writes
    it). rank_timeout: seconds a closing rank waits for the others to reach the last step (rank 0;
    the others wait up to twice that for rank 0's final commit) before raising a RecorderError.
    Like torch.distributed.checkpoint.save, cr.record and the first rec.record are collective:
    a rank that does not call them leaves the others waiting (up to the process group's timeout).
    distributed=False: this process records alone, as without torch.distributed (e.g. full
    tensors from rank 0 only: ``if rank == 0: cr.record(..., distributed=False)``).
    slots: steps staged for the writer before record() waits; None: staging_slots() (one block's
    steps within STAGING_BYTES, at least 3), so the writer's pause to encode a full block never
    holds training up (3 under torch.distributed).
    writer_threads: threads that compress a block's inner chunks in parallel. None: chosen at the
    first step (see default_writer_threads): 1 when the tensors are on the CPU, where training
    already uses every core; all cores but one when they are on a GPU, where the host is idle.
    Once close() is called, what is left is compressed by every core (training is over).
    """
    from .ranks import Ranks, record_ranks  # several ranks: crucible_record/ranks.py

    if distributed not in (None, True, False):
        raise CrucibleError(f"distributed must be None (automatic), True or False, got {distributed!r}")
    ranks = Ranks.current() if distributed is not False else None
    if distributed is True and ranks is None and not Ranks.initialised():
        raise CrucibleError("distributed=True needs an initialised torch.distributed process group "
                            "(dist.init_process_group) on every rank")
    if ranks is not None:
        return record_ranks(ranks, path, fields, steps, attributes, constants=constants, resume=resume,
                             layout=layout, commit_interval=commit_interval, durability=durability, slots=slots,
                             rank_timeout=rank_timeout, writer_threads=writer_threads)
    _check_arguments(commit_interval, slots, rank_timeout, writer_threads)
    store = open_store(path, read_only=False, durability=durability)
    with ExitStack() as stack:
        if not resume:
            store.prepare_new()
            stack.enter_context(store.writer_lock())
            create_run(store, fields, steps=steps, layout=layout or Layout(time_chunk=None),
                       attributes=attributes, constants=constants)
        else:
            if steps is not None or attributes is not None or constants is not None or layout is not None:
                raise CrucibleError("resume=True continues a run with its own steps, attributes, constants and layout; drop them")
            open_group(store)  # a clear error if this is not a run, before taking the lock
            stack.enter_context(store.writer_lock())
        group, info = open_group(store, mode="r+")
        if info.version < 2:
            raise CrucibleError(f"{store.location} is a format-{info.version} run: it can be read, not continued")
        if resume:
            _check_same_fields(store.location, fields, info.fields)
            _check_world_size(store.location, info.world_size, 1)
            store.claim_existing()
            store.sweep_partial_files()
        recorder = Recorder(store, group, info.fields, info.steps, read_commit(store, group)["steps"],
                            commit_interval=float(commit_interval), slots=slots, release=stack.pop_all(),
                            writer_threads=writer_threads)
    return recorder


# The writer's nice value when training runs on the CPU: torch's intra-op threads busy-wait at their
# barriers, so a writer that takes a core from one of them stalls all of them; at a lower priority
# it compresses in the cores' idle moments instead (and the bounded slots still stop training if it
# falls behind). On a GPU the host cores are idle and the writer keeps the normal priority.
CPU_WRITER_NICE = 10


def lower_this_threads_priority(nice: int) -> None:
    """Raise this thread's nice value by `nice` (Linux: per thread; elsewhere: nothing)."""
    if nice > 0 and hasattr(os, "setpriority") and sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:  # not permitted (a sandbox): the normal priority is still correct
            pass


def default_writer_threads(on_gpu: bool, processes: int = 1) -> int:
    """Writer threads when none are asked for. On the CPU, torch's intra-op threads already use every
    core: one writer thread, which compresses a block in the gaps (benchmarks/bench_overhead.py
    measures what it costs). On a GPU the host cores only launch kernels: all but the training
    thread's one compress (benchmarks/bench_speed.py measures the scaling). `processes`: recording
    processes sharing this machine's cores (one per GPU under torchrun)."""
    return max(1, default_threads() // max(1, processes) - 1) if on_gpu else 1


STAGING_BYTES = 256 * 2**20  # staging beyond 3 steps stays under this


def staging_slots(fields: Mapping[str, Field], block_steps: int) -> int:
    """Steps to stage: the writer pauses to encode full blocks (the longest pause of its loop);
    training goes on into the staging meanwhile. One block's steps cover any pause shorter than
    filling a block takes; a writer slower than that on average makes training wait whatever
    the depth. Bounded by STAGING_BYTES, at least 3."""
    step_bytes = sum(math.prod(spec.stored_shape) * spec.dtype.itemsize for spec in fields.values())
    return max(3, min(block_steps + 1, STAGING_BYTES // max(1, step_bytes)))


def _check_arguments(commit_interval, slots, rank_timeout, writer_threads=None) -> None:
    if isinstance(commit_interval, bool) or not isinstance(commit_interval, (int, float)) or not commit_interval > 0:
        raise CrucibleError(f"commit_interval must be a positive number of seconds, got {commit_interval!r}")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise CrucibleError(f"slots must be an integer >= 1 or None (automatic), got {slots!r}")
    if isinstance(rank_timeout, bool) or not isinstance(rank_timeout, (int, float)) or not rank_timeout > 0:
        raise CrucibleError(f"rank_timeout must be a positive number of seconds, got {rank_timeout!r}")
    if writer_threads is not None and (isinstance(writer_threads, bool) or not isinstance(writer_threads, int)
                                       or writer_threads < 1):
        raise CrucibleError(f"writer_threads must be an integer >= 1 or None (automatic), got {writer_threads!r}")


def _check_world_size(location: str, stored: int, given: int) -> None:
    if stored != given:
        def ranks(n: int) -> str:
            return "one process" if n == 1 else f"{n} ranks (torch.distributed world size {n})"
        raise CrucibleError(f"{location} was recorded by {ranks(stored)}; it can only be continued by "
                            f"{ranks(stored)}, not by {ranks(given)}")


def _check_same_fields(run_dir: str, given: Mapping[str, Field], stored: Mapping[str, Field]) -> None:
    if set(given) != set(stored):
        raise CrucibleError(f"{run_dir} records fields {sorted(stored)}, not {sorted(given)}")
    for name, spec in given.items():
        if not isinstance(spec, Field) or not spec.same_as(stored[name]):
            raise CrucibleError(f"field {name!r} of {run_dir} was recorded as {stored[name]}, not {spec}")


class _Block:
    """The rows of one field's current block of steps; written to its array as one region.

    Multi-rank runs: `part` = (zarr shard index along the first axis, first row, rows) of the rows
    this rank writes, and ``resize=False``: rank 0 alone sizes open-ended arrays, at its commits.
    """

    def __init__(self, store: RunStore, array, key: str, spec: Field, sized: bool, committed_rows: int,
                 part: tuple[int, int, int] | None = None, resize: bool = True):
        self.store = store
        self.array = array.with_config(WRITE_ALL)
        self.key = key
        self.sized = sized
        self.resize = resize
        self.rows = self.array.chunks[0]
        self.fill = dtypes.fill_value(spec.dtype)
        self.shard, first, count = part if part is not None else (0, 0, None)
        region = tuple(self.array.shape[1:]) if count is None else (count,) + tuple(self.array.shape[2:])
        select = (slice(None),) if count is None else (slice(None), slice(first, first + count))
        self.buf = np.full((self.rows,) + region, self.fill, dtype=self.array.dtype)
        self.start = committed_rows - committed_rows % self.rows
        self.filled = committed_rows - self.start
        self.dirty = False
        if self.filled:  # resuming inside a block: keep its committed rows (never fill read as data)
            if missing_blocks(store, self.array, key, range(self.start, committed_rows)):
                raise CrucibleError(f"{key} is damaged: the chunk holding its committed rows {self.start}-"
                                    f"{committed_rows - 1} is missing (run `crucible-record verify --repair`)")
            self.buf[: self.filled] = self.array[(slice(self.start, committed_rows),) + select[1:]]
        if resize and not sized and self.array.shape[0] != committed_rows:
            self.array.resize((committed_rows,) + tuple(self.array.shape[1:]))  # drop uncommitted rows

    @property
    def full(self) -> bool:
        return self.filled == self.rows

    def put(self, value: np.ndarray) -> None:
        self.buf[self.filled] = value
        self.filled += 1
        self.dirty = True

    def write(self, threads: int = 1) -> list[str]:
        """Write the block's rows whole (fill after the last row), its inner chunks compressed by
        `threads` threads; return the keys written."""
        keys = []
        stop = self.start + self.filled
        if self.resize and not self.sized and self.array.shape[0] != stop:
            self.array.resize((stop,) + tuple(self.array.shape[1:]))
            keys.append(f"{self.key}/zarr.json")
        end = min(self.start + self.rows, self.array.shape[0]) if self.sized else stop
        if end > stop:  # a sized array's partial block: fill after the last row, never an old block's rows
            self.buf[stop - self.start: end - self.start] = self.fill
        block = self.buf[: end - self.start]
        for key, data in encode_block(self.array, self.start // self.rows, block, self.shard, threads).items():
            self.store.set(key, data)
            keys.append(key)
        self.dirty = False
        if self.full:  # the next block's rows overwrite this one's (no refill: a 231 MB memset at GPT-2 size)
            self.start, self.filled = stop, 0
        return keys


class _Slot:
    """One step's staging buffers, one per field, allocated on first use (pinned for CUDA)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.events: list = []

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.is_pinned() != pin or tuple(buf.shape) != tuple(shape):
            buf = torch.empty(shape, dtype=dtype, pin_memory=pin)
            self.buffers[name] = buf
        return buf

    def stage(self, name: str, source: torch.Tensor) -> torch.device | None:
        """Copy `source` into this slot's buffer for `name`; the CUDA device to wait for, if any."""
        on_cuda = source.is_cuda
        self.buffer(name, tuple(source.shape), source.dtype, on_cuda).copy_(source, non_blocking=on_cuda)
        return source.device if on_cuda else None

    def mark(self, names: list[str], devices: set) -> None:
        """The fields staged for this step; CUDA events the writer waits on before reading them."""
        self.names = names
        self.events = [torch.cuda.Event() for _ in devices]
        for event, device in zip(self.events, devices):
            event.record(torch.cuda.current_stream(device))


class Recorder:
    """Records the fields of one run; see the module docstring for the call order."""

    def __init__(self, store: RunStore, group, fields: dict[str, Field], steps: int | None, committed: int, *,
                 commit_interval: float, slots: int | None, release: ExitStack, writer_threads: int | None = None):
        self.store, self.fields, self.steps = store, fields, steps
        self.location = store.location
        self.commit_interval = commit_interval
        self.writer_threads = writer_threads  # None until the first step shows the tensors' device
        self._on_gpu: bool | None = None  # likewise
        self._processes = 1  # recording processes sharing this machine's cores (likewise)
        self._niced = False  # the writer thread has set its priority
        self._release = release  # the run lock, released at close
        self._blocks = {name: _Block(store, group[name], name, spec, steps is not None, spec.rows_at(committed))
                        for name, spec in fields.items()}
        self._rows_on: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.slots = slots or staging_slots(fields, max(block.rows for block in self._blocks.values()))
        self._slots = [_Slot() for _ in range(self.slots)]
        # Last freed, first reused: the slots beyond the few in use get buffers only when a backlog needs them.
        self._free: queue.LifoQueue[int] = queue.LifoQueue()
        for i in reversed(range(self.slots)):
            self._free.put(i)
        self._work: queue.Queue[tuple] = queue.Queue()  # items hold slots: bounded by them
        self._error: BaseException | None = None
        self._closed = False
        self._latest: dict[str, float] = {}
        self._written: list[str] = []  # keys written since the last commit: fsynced before it
        self.committed = committed  # steps 0 .. committed-1 are durable (writer thread updates it)
        self.next_step = committed
        self._last_commit_point = time.monotonic()
        self._queued_commit = committed  # steps of the last commit point handed to the writer
        self.writer_seconds = 0.0  # wall seconds the writer spent placing rows, writing and committing
        self.stall_seconds = 0.0  # wall seconds record() waited for a free staging slot (writer behind)
        self.stalls = 0  # record() calls that had to wait
        self._thread = threading.Thread(target=self._run_writer, name="crucible-record-writer", daemon=True)
        self._thread.start()
        _unclosed.add(self)

    # ----- training thread -------------------------------------------------------------------
    def record(self, step: int, **tensors) -> bool:
        """Stage one step's tensors; True when this step is a commit point (a place to checkpoint)."""
        self._raise_if_failed()
        if self._closed:
            raise RecorderError("record() after close()")
        self._check_step(step)
        due = self._due(step, tensors)
        checked = {name: as_tensor(name, _whole(name, tensors[name], self.fields[name]), self.fields[name])
                   for name in due}
        index = self._take_slot()
        slot = self._slots[index]
        devices = set()
        for name, tensor in checked.items():
            source = tensor if self.fields[name].row_indices is None else tensor.index_select(0, self._rows(name, tensor.device))
            devices.add(slot.stage(name, source))
        slot.mark(due, devices - {None})
        if self._on_gpu is None:
            warn_if_tied(checked)
        self._note_device(devices)
        commit = self._is_commit_point(step)
        self._work.put(("step", step, index, commit))
        self.next_step = step + 1
        return commit

    def _note_device(self, devices: set, processes: int = 1) -> None:
        """At the first step: whether the tensors are on a GPU, and so the writer's default threads
        (`processes`: recording processes sharing this machine's cores). The writer reads both only
        after the queue hands it that step."""
        if self._on_gpu is None:
            self._on_gpu = bool(devices - {None})
            self._processes = processes
            if self.writer_threads is None:
                self.writer_threads = default_writer_threads(on_gpu=self._on_gpu, processes=processes)

    def after_commit(self, step: int, fn: Callable[[], Any]) -> None:
        """Run `fn()` on the writer thread once `step` is committed (e.g. save a checkpoint)."""
        self._raise_if_failed()
        self._work.put(("after_commit", step, fn))

    @property
    def backlog(self) -> int:
        """Steps staged and not yet taken by the writer (at most the slots; more means nothing)."""
        return self._work.qsize()

    def latest(self, name: str) -> float | None:
        """The last value of a scalar field the writer has seen (no device sync), or None."""
        return self._latest.get(name)

    def close(self) -> None:
        """Commit what is staged, stop the writer, release the run. Raises the writer's error."""
        if not self._closed:
            self._closed = True
            _unclosed.discard(self)
            if self._thread.is_alive():
                self._work.put(("close",))
            self._thread.join()
            self._release.close()
        self._raise_if_failed()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _due(self, step: int, tensors: Mapping[str, Any]) -> list[str]:
        """The fields due at `step`; refuses unknown, missing and early ones."""
        due = [name for name, spec in self.fields.items() if spec.due(step)]
        unknown = sorted(set(tensors) - set(self.fields))
        if unknown:
            raise CrucibleError(f"step {step}: {', '.join(map(repr, unknown))} is not a field of this run "
                                f"(fields: {', '.join(self.fields)})")
        missing = [name for name in due if name not in tensors]
        if missing:
            raise CrucibleError(f"step {step}: field(s) {', '.join(map(repr, missing))} are due and were not given")
        early = sorted(set(tensors) - set(due))
        if early:
            everies = ", ".join(f"{n!r} every {self.fields[n].every}" for n in early)
            raise CrucibleError(f"step {step}: {everies} is not due at this step; pass it only at its steps")
        return due

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise CrucibleError(f"step must be an int, got {step!r}")
        if step != self.next_step:
            if step < self.committed:
                raise CrucibleError(f"step {step} is already committed; this run continues at step {self.next_step}")
            raise CrucibleError(f"steps go in order: expected step {self.next_step}, got {step}")
        if self.steps is not None and step >= self.steps:
            raise CrucibleError(f"step {step} is past the run's {self.steps} steps (0..{self.steps - 1})")

    def _rows(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._rows_on:
            self._rows_on[key] = torch.from_numpy(self.fields[name].row_indices).to(device)
        return self._rows_on[key]

    def _is_commit_point(self, step: int) -> bool:
        """A block fills, the run's last step, or commit_interval seconds since the last point
        (the timed kind only once the writer has finished the previous commit: a slow writer must
        not turn every late step into another re-encoding of the partial blocks)."""
        done = step + 1
        block_full = any(spec.due(step) and spec.rows_at(done) % self._blocks[name].rows == 0
                         for name, spec in self.fields.items())
        now = time.monotonic()
        timed = now - self._last_commit_point >= self.commit_interval and self.committed >= self._queued_commit
        if block_full or done == self.steps or timed:
            self._last_commit_point, self._queued_commit = now, done
            return True
        return False

    def _take_slot(self) -> int:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        began = time.perf_counter()  # every slot is in use: the writer is behind, training waits
        self.stalls += 1
        try:
            while True:
                try:
                    return self._free.get(timeout=_POLL_S)
                except queue.Empty:
                    self._raise_if_failed()
                    if not self._thread.is_alive():
                        raise RecorderError("the writer thread stopped")
        finally:
            self.stall_seconds += time.perf_counter() - began

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecorderError(f"writing {self.location} failed: {_describe(self._error)}") from self._error

    # ----- writer thread ---------------------------------------------------------------------
    def _run_writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as e:  # surfaced in the training thread, which polls for it
            self._error = e

    def _write_loop(self) -> None:
        pending: list[tuple[int, Callable]] = []
        received = self.committed
        while True:
            item = self._work.get()
            if item[0] == "close":
                if received > self.committed:
                    began = time.perf_counter()
                    self._commit(received)
                    self.writer_seconds += time.perf_counter() - began
                self._run_after_commit(pending)
                return
            received = self._handle(item, pending) or received

    def _handle(self, item: tuple, pending: list) -> int | None:
        """One queued item: a step (placed, written when its block fills, committed at a commit
        point; returns the steps received) or a callback to run after a commit."""
        if item[0] == "after_commit":
            pending.append(item[1:])
            self._run_after_commit(pending)
            return None
        _, step, index, commit = item
        if not self._niced:  # the first step: its device is known now
            self._niced = True
            lower_this_threads_priority(0 if self._on_gpu else CPU_WRITER_NICE)
        began = time.perf_counter()
        self._place(self._slots[index])
        self._free.put(index)
        if commit:
            self._commit(step + 1)
        self.writer_seconds += time.perf_counter() - began
        if commit:
            self._run_after_commit(pending)
        return step + 1

    def _encode_threads(self) -> int:
        """Threads for the block about to be written: writer_threads while training runs; once
        close() is called, training is over and waits for the writer, so the cores it used compress
        what is left (a CPU run's writer is then often a block or more behind)."""
        threads = self.writer_threads or 1
        if self._closed:
            return max(threads, default_threads() // self._processes)
        return threads

    def _place(self, slot: _Slot) -> None:
        for event in slot.events:
            event.synchronize()
        for name in slot.names:
            buf = slot.buffers[name]
            value = dtypes.stored_numpy(buf)
            block = self._blocks[name]
            block.put(value)
            if buf.dim() == 0 and buf.dtype.is_floating_point:
                self._latest[name] = float(value)
            if block.full:  # the buffer is needed for the next rows: write it now, commit soon
                self.store.check_writer()  # (object stores: never overwrite a newer writer's shards)
                self._written.extend(block.write(self._encode_threads()))

    def _commit(self, steps: int) -> None:
        """Write every partial block whole, make the files durable, then move the marker."""
        self.store.check_writer()
        for name, block in self._blocks.items():
            if block.dirty:
                self._written.extend(block.write(self._encode_threads()))
        for key in ["zarr.json"] + [f"{name}/zarr.json" for name in self.fields]:
            # zarr would silently recreate a deleted store's folders; refuse to commit into nothing.
            if not self.store.exists(key):
                raise FileNotFoundError(f"the run {self.location} disappeared during the run ({key} is gone)")
        self.store.sync(dict.fromkeys(self._written))
        self._written.clear()
        write_commit(self.store, steps)
        self.committed = steps

    def _run_after_commit(self, pending: list) -> None:
        while pending and pending[0][0] < self.committed:
            pending.pop(0)[1]()



_unclosed: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


def _close_unclosed_at_exit() -> None:
    """Interpreter exit: commit the recorders the program never closed (their steps would be lost).

    Registered with threading's exit hooks, not atexit: those run before concurrent.futures
    refuses new work at exit, and zarr's file I/O still needs its executor to commit.
    """
    for rec in list(_unclosed):
        log.warning("crucible-record: %s was not closed; committing its %d recorded steps at interpreter exit",
                    rec.location, rec.next_step)
        try:
            rec.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("crucible-record: committing %s at exit failed: %s", rec.location, _describe(e))


# These hooks run last-registered first; concurrent.futures registered its own when imported above.
threading._register_atexit(_close_unclosed_at_exit)


def warn_if_tied(tensors: Mapping[str, torch.Tensor]) -> None:
    """First step: one warning for fields given the same storage (a tied lm_head is wte)."""
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.stride()))
        if key in seen:
            warnings.warn(f"fields {seen[key]!r} and {name!r} are the same tensor (a tied parameter?): it is "
                          f"recorded twice", stacklevel=3)
        else:
            seen[key] = name


# ===== several ranks of a torch.distributed job =================================================

def _whole(name: str, value: Any, spec: Field) -> Any:
    """One process: a Shard must hold every row, and is then the tensor itself."""
    if not isinstance(value, Shard):
        return value
    rows = spec.shape[0] if spec.shape else 0
    if value.offset != 0 or value.rows != rows:
        raise CrucibleError(f"field {name!r}: this run is recorded by one process (no torch.distributed process "
                            f"group of more than one rank), so a Shard must hold every row (offset 0, {rows} rows); "
                            f"got {value!r}")
    return value.tensor


def _describe(error: BaseException) -> str:
    if isinstance(error, CrucibleError):
        return str(error)
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
