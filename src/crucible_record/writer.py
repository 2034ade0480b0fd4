"""The recorder: stage each step off the device, write whole blocks from one thread, hand commits over.

``rec.record(step, **tensors)`` checks each tensor against its Field, copies this process's rows into
a free staging slot (pinned memory, non-blocking for CUDA: no host sync) and queues it; it returns
True at a commit point (a block full, the last step, or ``commit_interval`` seconds). The writer
thread puts rows into block buffers, writes a block whole when full (one shard per block: a partial
write would be a read-modify-write) and at each commit point writes the partial blocks whole, makes
the files durable and hands over to the commit strategy (commit.py). A crash loses at most the
steps after the last commit point. Several ranks run the same code; their arrays open at the first
``record()``, once the ranks agreed how fields are split (ranks.py). Memory is bounded by the
staging slots and one block per field, never by the number of steps.
"""

from __future__ import annotations

import importlib
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
from contextlib import ExitStack, suppress
from typing import Any

import numpy as np
import torch

from . import dtypes
from .blockread import read_selection
from .errors import CrucibleError, RecorderError, describe, missing_chunk_error
from .fields import Field, Shard, as_shard_tensor, as_tensor, local_part
from .format.blocks import WRITE_ALL, encode_block, missing_blocks
from .format.planner import Partition, show_partition
from .shardio import default_threads
from .storage import RunStore

POLL_S = 0.05  # how often a waiting producer checks that the writer is still alive
STAGING_BYTES = 256 * 2**20  # staging beyond 3 steps stays under this
# The writer's nice value on a CPU run: torch's intra-op threads busy-wait at barriers, so a writer
# taking a core from one stalls all; at a lower priority it compresses in the idle moments instead.
CPU_WRITER_NICE = 10
log = logging.getLogger("crucible_record")

# How each field is written: None = whole (one process, or a replicated field), else its Partition.
Plan = dict[str, Partition | None]


def lower_this_threads_priority(nice: int) -> None:
    """Raise this thread's nice value by `nice` (Linux: per thread; elsewhere: nothing)."""
    if nice > 0 and sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        with suppress(OSError):  # not permitted (a sandbox): the normal priority is still correct
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def default_writer_threads(on_gpu: bool, processes: int = 1) -> int:
    """On the CPU torch's threads use every core: one writer thread. On a GPU the host cores only
    launch kernels: all but the training thread's, shared among `processes` on this machine."""
    return max(1, default_threads() // max(1, processes) - 1) if on_gpu else 1


def staging_slots(fields: Mapping[str, Field], block_steps: int) -> int:
    """Steps to stage: one block's steps cover the writer's longest pause (encoding full blocks);
    deeper would not help a writer slower on average. Bounded by STAGING_BYTES, at least 3."""
    step_bytes = sum(math.prod(spec.stored_shape) * spec.dtype.itemsize for spec in fields.values())
    return max(3, min(block_steps + 1, STAGING_BYTES // max(1, step_bytes)))


class BlockBuffer:
    """One field's current block of steps as this process writes it: whole, or `part` = (shard index
    on the first axis, first row, rows) of a field split among ranks. Never resizes the array."""

    def __init__(self, store: RunStore, array, key: str, spec: Field, sized: bool, committed_rows: int,
                 part: tuple[int, int, int] | None = None):
        self.store = store
        self.array = array.with_config(WRITE_ALL)
        self.key = key
        self.sized = sized
        self.rows = self.array.chunks[0]
        self.fill = dtypes.fill_value(spec.dtype)
        self.shard, first, count = part if part is not None else (0, 0, None)
        region = [slice(0, n, 1) for n in self.array.shape[1:]]  # of one step, this process's
        if count is not None:
            region[0] = slice(first, first + count, 1)
        self.buf = np.full((self.rows,) + tuple(r.stop - r.start for r in region), self.fill, dtype=self.array.dtype)
        self.start = committed_rows - committed_rows % self.rows
        self.filled = committed_rows - self.start
        self.dirty = False
        if self.filled:  # resuming inside a block: read back its committed rows (never fill read as data)
            if missing_blocks(store, self.array, key, range(self.start, committed_rows)):
                raise missing_chunk_error(key, self.start, committed_rows - 1, "crucible-record verify --repair")
            selection = (slice(self.start, committed_rows, 1), *region)
            try:
                data = read_selection(store, self.array, selection, key)
                data = np.asarray(self.array[selection]) if data is None else data
            except Exception as e:
                raise CrucibleError(f"cannot resume {store.location}: {describe(e)} "
                                    f"(run `crucible-record verify --repair`)") from e
            self.buf[: self.filled] = data

    @property
    def full(self) -> bool:
        return self.filled == self.rows

    def put(self, value: np.ndarray) -> None:
        self.buf[self.filled] = value
        self.filled += 1
        self.dirty = True

    def write(self, threads: int = 1) -> list[str]:
        """Write the block whole (fill after the last row); return the keys written."""
        stop = self.start + self.filled
        end = min(self.start + self.rows, self.array.shape[0]) if self.sized else stop
        if end > stop:  # a sized array's partial block: fill after the last row, never an old block's rows
            self.buf[stop - self.start: end - self.start] = self.fill
        encoded = encode_block(self.array, self.start // self.rows, self.buf[: end - self.start], self.shard, threads)
        for key, data in encoded.items():
            self.store.set(key, data)
        self.dirty = False
        if self.full:  # the next block's rows overwrite this one's (no refill: a 231 MB memset at GPT-2 size)
            self.start, self.filled = stop, 0
        return list(encoded)


class Slot:
    """One step's staging buffers, one per field, allocated on first use (pinned for CUDA)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.events: list = []

    def stage(self, name: str, source: torch.Tensor) -> torch.device | None:
        """Copy `source` into this slot's buffer for `name`; the CUDA device to wait for, if any."""
        on_cuda, buf = source.is_cuda, self.buffers.get(name)
        if buf is None or buf.is_pinned() != on_cuda or buf.shape != source.shape:
            buf = self.buffers[name] = torch.empty(source.shape, dtype=source.dtype, pin_memory=on_cuda)
        buf.copy_(source, non_blocking=on_cuda)
        return source.device if on_cuda else None

    def mark(self, names: list[str], devices: set) -> None:
        """The fields staged for this step; CUDA events the writer waits on before reading them."""
        self.names = names
        self.events = [torch.cuda.Event() for _ in devices]
        for event, device in zip(self.events, devices):
            event.record(torch.cuda.current_stream(device))


class Recorder:
    """Records the fields of one run (or this rank's part); see the module docstring.

    committer: commit.LocalCommit or commit.RankCommit. group: the run's zarr group (one process).
    agree (several ranks): ``agree(step, tensors, due)``, the first step's collective, which calls open().
    """

    def __init__(self, store: RunStore, fields: dict[str, Field], steps: int | None, committer, *, group=None,
                 rank: int = 0, commit_interval: float, slots: int | None, release: ExitStack,
                 writer_threads: int | None = None, agree: Callable[..., Plan] | None = None):
        self.store, self.fields, self.steps = store, fields, steps
        self.location = store.location
        self.rank, self.world_size = rank, committer.world_size
        self.commit_interval = commit_interval
        self.writer_threads = writer_threads  # None until the first step shows the tensors' device
        self._committer = committer
        self._agree = agree
        self._asked_slots = slots
        self._release = release  # the run lock (one process, or rank 0), released at close
        self._on_gpu: bool | None = None  # set at the first step
        self._processes = 1  # recording processes sharing this machine's cores (set at the first step)
        self._niced = False  # the writer thread has set its priority
        self._rows_on: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._plan: Plan | None = None
        self._blocks: dict[str, BlockBuffer] = {}
        self._time_chunk: dict[str, int] = {}
        self._broken: str | None = None  # several ranks: why the first step failed
        self._work: queue.Queue[tuple] = queue.Queue()  # items hold slots: bounded by them
        self._error: BaseException | None = None
        self._closed = False
        self._written: list[str] = []  # keys written since the last commit: made durable before it
        self._latest: dict[str, float] = {}
        self._durable = committer.committed  # this process's rows of steps 0.._durable-1 are durable
        self.next_step = committer.committed
        self._last_commit_point = time.monotonic()
        self._queued_commit = self.next_step  # steps of the last commit point handed to the writer
        self.writer_seconds = 0.0  # wall seconds the writer spent placing rows, writing and committing
        self.stall_seconds = 0.0  # wall seconds record() waited for a free staging slot (writer behind)
        self.stalls = 0  # record() calls that had to wait
        self.slots = slots or 3  # (one process: sized by the blocks in open(); ranks: at the first step)
        self._slots: list[Slot] = []
        self._free: queue.LifoQueue[int] = queue.LifoQueue()
        self._thread: threading.Thread | None = None
        if agree is None:
            self.open({name: None for name in fields}, group)
        _unclosed.add(self)

    @property
    def committed(self) -> int:
        """Steps 0 .. committed-1 are durable in the run (the marker; a rank > 0: as last read)."""
        return self._committer.committed

    def open(self, plan: Plan, group) -> None:
        """Block buffers for what this process writes, staging slots sized by them; start the writer."""
        sized, arrays = self.steps is not None, {}
        for name, spec in self.fields.items():
            array = arrays[name] = group[name]
            self._time_chunk[name] = array.chunks[0]
            partition, rows = plan[name], spec.rows_at(self.committed)
            if partition is None:
                if self.rank == 0:
                    self._blocks[name] = BlockBuffer(self.store, array, name, spec, sized, rows)
                continue
            mine = partition.of_rank(self.rank)
            if mine is not None and partition.writer_of(mine[0]) == self.rank:
                self._blocks[name] = BlockBuffer(self.store, array, name, spec, sized, rows, part=mine)
        self._committer.attach(arrays)
        self.slots = self._asked_slots or staging_slots(self.fields, max(self._time_chunk.values()))
        self._slots = [Slot() for _ in range(self.slots)]
        # Last freed, first reused: the slots beyond the few in use get buffers only when a backlog needs them.
        for i in reversed(range(self.slots)):
            self._free.put(i)
        self._plan = plan
        suffix = f"-rank{self.rank}" if self.world_size > 1 else ""
        self._thread = threading.Thread(target=self._run_writer, name=f"crucible-record-writer{suffix}", daemon=True)
        self._thread.start()

    # ----- training thread -------------------------------------------------------------------
    def record(self, step: int, **tensors) -> bool:
        """Stage one step's tensors (this rank's part of them); True when this step is a commit point
        (a place to checkpoint; several ranks: only the points every rank agrees on)."""
        self._raise_if_failed()
        if self._closed:
            raise RecorderError("record() after close()")
        if self._broken is not None:
            raise RecorderError(f"this run did not start: {self._broken}")
        if self._plan is None:
            try:
                self._agree(step, tensors, lambda: (self._check_step(step), self._due(step, tensors))[1])
            except CrucibleError as e:
                self._broken = str(e)
                raise
        self._check_step(step)
        due = self._due(step, tensors)
        sources = {name: source for name in due if (source := self._source(name, tensors[name])) is not None}
        index = self._take_slot()
        try:  # (a failed copy, e.g. out of memory, gives the slot back)
            slot = self._slots[index]
            devices = set()
            for name, tensor in sources.items():
                if self.fields[name].row_indices is not None:
                    tensor = tensor.index_select(0, self._rows(name, tensor.device))
                devices.add(slot.stage(name, tensor))
            slot.mark(list(sources), devices - {None})
        except BaseException:
            self._free.put(index)
            raise
        if self._on_gpu is None:  # the first step: the device sets the writer's default threads
            warn_if_tied(sources)
            self._on_gpu = bool(devices - {None})
            # the ranks on this machine (torchrun's LOCAL_WORLD_SIZE) share its cores
            self._processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if self.world_size > 1 else 1
            if self.writer_threads is None:
                self.writer_threads = default_writer_threads(on_gpu=self._on_gpu, processes=self._processes)
        agreed, commit = self._commit_points(step)
        self._work.put(("step", step, index, commit))
        self.next_step = step + 1
        return commit if self.world_size == 1 else agreed

    def after_commit(self, step: int, fn: Callable[[], Any]) -> None:
        """Run `fn()` on the writer thread once `step` is committed (e.g. save a checkpoint)."""
        self._raise_if_failed()
        self._work.put(("after_commit", step, fn))

    def latest(self, name: str) -> float | None:
        """The last value of a scalar field the writer has seen (no device sync), or None."""
        return self._latest.get(name)

    @property
    def backlog(self) -> int:
        """Steps staged and not yet taken by the writer (at most the slots; more means nothing)."""
        return self._work.qsize()

    def close(self) -> None:
        """Commit what is staged, stop the writer, release the run; raise the writer's error."""
        self._close(None)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; an exception on the way out goes on, the writer's error only a note on it."""
        try:
            self._close(exc)
        except Exception as error:
            if exc is None or isinstance(exc, RecorderError):  # (the recorder's own error: its final word)
                raise
            exc.add_note(f"crucible-record: closing the recorder of {self.location} also failed: {describe(error)}")

    def _close(self, failure: BaseException | None) -> None:
        if not self._closed:
            self._closed = True
            _unclosed.discard(self)
            try:
                if self._thread is not None and self._thread.is_alive():
                    self._work.put(("close", None if failure is None else describe(failure)))
                    self._thread.join()
                if self._thread is not None and self._error is not None:
                    self._committer.report_failure(describe(self._error))  # the other ranks stop waiting
            finally:
                self._release.close()
        self._raise_if_failed()

    def _source(self, name: str, value: Any) -> torch.Tensor | None:
        """Check one field's value against the run's plan; the tensor to stage if this process writes it."""
        spec, partition, value = self.fields[name], self._plan[name], local_part(name, value)
        if self.world_size == 1 and isinstance(value, Shard):  # then a Shard must hold every row: the tensor
            rows = spec.shape[0] if spec.shape else 0
            if value.offset != 0 or value.rows != rows:
                raise CrucibleError(f"field {name!r}: this run is recorded by one process (no process group of "
                                    f"several ranks, or distributed=False), so a Shard must hold every row "
                                    f"(offset 0, {rows} rows); got {value!r}")
            value = value.tensor
        if partition is None:
            if isinstance(value, Shard):
                raise CrucibleError(f"field {name!r} is replicated in this run (a plain tensor on every rank at its "
                                    f"first step): pass the tensor itself, not a Shard")
            tensor = as_tensor(name, value, spec)  # validated on every rank, written by rank 0 only
            return tensor if name in self._blocks else None
        if not isinstance(value, Shard):
            raise CrucibleError(f"field {name!r} is {show_partition(partition)} in this run: pass this rank's "
                                f"rows as cr.Shard(rows, offset=first_row)")
        tensor = as_shard_tensor(name, value, spec)
        mine = partition.of_rank(self.rank)
        if (mine is None and value.rows) or (mine is not None and (value.offset, value.rows) != mine[1:]):
            holds = "no rows" if mine is None else f"rows {mine[1]}..{mine[1] + mine[2] - 1}"
            raise CrucibleError(f"field {name!r}: rank {self.rank} gave {value!r}, but holds {holds} in this run "
                                f"({show_partition(partition)})")
        return tensor if name in self._blocks else None

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

    def _commit_points(self, step: int) -> tuple[bool, bool]:
        """(a commit point every rank agrees on: a block fills or the last step; one of this process:
        also commit_interval after the last, once the writer finished it, so a slow writer does
        not re-encode the partial blocks at every late step)."""
        done = step + 1
        agreed = done == self.steps or any(spec.due(step) and spec.rows_at(done) % self._time_chunk[name] == 0
                                           for name, spec in self.fields.items())
        now = time.monotonic()
        timed = now - self._last_commit_point >= self.commit_interval and self._durable >= self._queued_commit
        commit = agreed or timed
        if commit:
            self._last_commit_point, self._queued_commit = now, done
        return agreed, commit

    def _take_slot(self) -> int:
        with suppress(queue.Empty):
            return self._free.get_nowait()
        began = time.perf_counter()  # every slot is in use: the writer is behind, training waits
        self.stalls += 1
        try:
            while True:
                try:
                    return self._free.get(timeout=POLL_S)
                except queue.Empty:
                    self._raise_if_failed()
                    if not self._thread.is_alive():
                        raise RecorderError("the writer thread stopped")
        finally:
            self.stall_seconds += time.perf_counter() - began

    def _raise_if_failed(self) -> None:
        error = self._error or self._committer.failure
        if error is not None:
            raise RecorderError(f"writing {self.location} failed: {describe(error)}") from error

    # ----- writer thread ---------------------------------------------------------------------
    def _run_writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as e:  # surfaced in the training thread, which polls for it
            self._error = e

    def _write_loop(self) -> None:
        pending: list[tuple[int, Callable]] = []
        received = self._durable
        while True:
            try:
                item = self._work.get(timeout=self._committer.poll_seconds(bool(pending)))
            except queue.Empty:  # idle: rank 0 moves the marker as the others catch up; others read it
                self._committer.idle()
                self._run_after_commit(pending)
                continue
            if item[0] == "close":
                began = time.perf_counter()
                self._write_durable(received)
                self._committer.finish(received, item[1])
                self.writer_seconds += time.perf_counter() - began
                self._run_after_commit(pending)
                return
            if item[0] == "after_commit":
                pending.append(item[1:])
                self._run_after_commit(pending)
                continue
            _, step, index, commit = item
            if not self._niced:  # the first step: its device is known now
                self._niced = True
                lower_this_threads_priority(0 if self._on_gpu else CPU_WRITER_NICE)
            began = time.perf_counter()
            self._place(self._slots[index])
            self._free.put(index)
            received = step + 1
            if commit:
                self.store.check_writer()
                self._write_durable(received)
                self._committer.durable(received)
            self.writer_seconds += time.perf_counter() - began
            if commit:
                self._run_after_commit(pending)

    def _encode_threads(self) -> int:
        """writer_threads while training runs; after close() training waits, so its cores help too."""
        threads = self.writer_threads or 1
        return max(threads, default_threads() // self._processes) if self._closed else threads

    def _place(self, slot: Slot) -> None:
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

    def _write_durable(self, steps: int) -> None:
        """Write every partial block whole, then make this process's files durable."""
        for block in self._blocks.values():
            if block.dirty:
                self._written.extend(block.write(self._encode_threads()))
        for key in ["zarr.json"] + [f"{name}/zarr.json" for name in self.fields]:
            # zarr would silently recreate a deleted store's folders; refuse to commit into nothing.
            if not self.store.exists(key):
                raise FileNotFoundError(f"the run {self.location} disappeared during the run ({key} is gone)")
        self.store.sync(dict.fromkeys(self._written))
        self._written.clear()
        self._durable = max(self._durable, steps)

    def _run_after_commit(self, pending: list) -> None:
        while pending and pending[0][0] < self.committed:
            pending.pop(0)[1]()


_unclosed: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


def _close_unclosed_at_exit() -> None:
    """Interpreter exit: commit the recorders never closed. A threading exit hook, not atexit: it runs
    before concurrent.futures refuses new work, which zarr's file I/O still needs."""
    for rec in list(_unclosed):
        log.warning("crucible-record: %s was not closed; committing its %d recorded steps at interpreter exit",
                    rec.location, rec.next_step)
        try:
            rec.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("crucible-record: committing %s at exit failed: %s", rec.location, describe(e))


# These hooks run last-registered first: concurrent.futures registers its own when imported.
importlib.import_module("concurrent.futures.thread")
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

