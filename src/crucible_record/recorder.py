"""Recorder: stage each step off the device, write it from one background thread.

The training thread only copies W, h_mean and the loss into a free staging slot (pinned memory
and a non-blocking copy on CUDA, so it never waits for the GPU) and queues the slot. One writer
thread waits for the copy, gathers whole blocks of steps in RAM and writes each chunk once
(a partial-chunk write in zarr is a read-modify-write, and two writers of one chunk lose data).
After the data it moves the commit marker. Memory is bounded by the slots and one block per
array, never by the number of steps. A writer failure is raised in the training thread at the
next call, with its cause chained.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import RecorderError
from .heap import limit_heap_growth
from .store import WRITE_ALL, committed_steps, group_path, write_commit

_POLL_S = 0.05  # how often a waiting producer checks that the writer is still alive


class _Slot:
    """One step's staging buffers; reused round-robin."""

    def __init__(self, vocab: int, hidden: int, device: torch.device):
        pin = device.type == "cuda"
        self.W = torch.empty((vocab, hidden), dtype=torch.bfloat16, pin_memory=pin)
        self.h_mean = torch.empty((hidden,), dtype=torch.float32, pin_memory=pin)
        self.loss = torch.empty((), dtype=torch.float32, pin_memory=pin)
        self.event: torch.cuda.Event | None = None


class _Block:
    """The rows of one array's current chunk block; written to zarr as one region."""

    def __init__(self, array):
        self.array = array.with_config(WRITE_ALL)
        self.rows = array.chunks[0]
        self.buf = np.empty((self.rows,) + tuple(array.shape[1:]), dtype=array.dtype)
        self.start: int | None = None
        self.filled = 0

    def put(self, index: int, value: np.ndarray) -> bool:
        """Place row `index`; True when the block is complete (or holds the array's last row)."""
        if self.start is None:
            self.start = index - index % self.rows
            self.filled = index - self.start
            if self.filled:  # resuming inside a block: keep the rows already on disk
                self.buf[: self.filled] = self.array[self.start:index]
        if self.filled == self.rows:  # complete but not yet written (it does not drive commits)
            self.flush()
        if index != self.start + self.filled:
            raise RecorderError(f"rows out of order: got {index}, expected {self.start + self.filled}")
        self.buf[index - self.start] = value
        self.filled = index - self.start + 1
        return self.filled == self.rows or self.start + self.filled == self.array.shape[0]

    def flush(self) -> None:
        """Write the rows held so far; move to the next block once this one is complete."""
        if self.start is None or self.filled == 0:
            return
        self.array[self.start:self.start + self.filled] = self.buf[: self.filled]
        if self.filled == self.rows:
            self.start += self.rows
            self.filled = 0


class Recorder:
    """Records steps of a training run into a store created by `store.create_store`.

    Usage from any training loop::

        rec = Recorder(group)
        rec.record(0, W=model.embedding.weight)                 # initial state
        for step in range(1, n + 1):
            ...
            rec.record(step, W=model.embedding.weight, h_mean=h.mean((0, 1)), loss=loss)
        rec.close()                                            # flush + commit; raises writer errors
    """

    def __init__(self, group, *, slots: int = 4, device: str | torch.device = "cpu"):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        limit_heap_growth()  # the writer's per-block encode buffers must not fragment the heap
        self.group = group
        self.steps = group["h_mean"].shape[0]
        vocab, hidden = group["W"].shape[1:]
        self.device = torch.device(device)
        self._slots = [_Slot(vocab, hidden, self.device) for _ in range(slots)]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self._free.put(i)
        self._work: queue.Queue[tuple] = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self.committed = committed_steps(group)
        self._next_step = self.committed + 1
        self.latest_loss = float("nan")
        self.epoch = int(group.attrs.get("commit", {}).get("epoch", 0))
        self._thread = threading.Thread(target=self._run_writer, name="crucible-writer", daemon=True)
        self._thread.start()

    # ----- training thread -------------------------------------------------------------------
    def record(self, step: int, W, h_mean=None, loss=None, *, epoch: int | None = None) -> None:
        """Stage one step. Step 0 is the initial W (no h_mean, loss NaN)."""
        self._raise_if_failed()
        if self._closed:
            raise RecorderError("record() after close()")
        if step != self._next_step:
            raise RecorderError(f"expected step {self._next_step}, got {step}")
        if step > self.steps:
            raise RecorderError(f"step {step} is past the store's {self.steps} steps")
        if step > 0 and h_mean is None:
            raise RecorderError(f"step {step} needs h_mean")
        index = self._take_slot()
        slot = self._slots[index]
        cuda = self.device.type == "cuda"
        slot.W.copy_(_as_tensor(W).detach(), non_blocking=cuda)
        if h_mean is not None:
            slot.h_mean.copy_(_as_tensor(h_mean).detach(), non_blocking=cuda)
        if loss is None or step == 0:
            slot.loss.fill_(float("nan"))
        else:
            slot.loss.copy_(_as_tensor(loss).detach(), non_blocking=cuda)
        if cuda:
            slot.event = torch.cuda.Event()
            slot.event.record()
        self._put(("step", step, index, epoch))
        self._next_step = step + 1

    def checkpoint(self, step: int, save: Callable[[], Any]) -> None:
        """Run `save()` on the writer thread once step `step` is committed.

        A checkpoint on disk therefore never gets ahead of the recorded trajectory.
        """
        self._raise_if_failed()
        self._put(("checkpoint", step, save))

    def close(self) -> None:
        """Write what is buffered, commit it, stop the writer. Raises the writer's error, if any."""
        if not self._closed:
            self._closed = True
            if self._thread.is_alive():
                self._put(("close",))
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_slot(self) -> int:
        while True:
            try:
                return self._free.get(timeout=_POLL_S)
            except queue.Empty:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RecorderError("the writer thread stopped")

    def _put(self, item: tuple) -> None:
        self._work.put(item)  # unbounded only in items; memory is bounded by the slots

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecorderError(f"writing the trajectory failed: {_describe(self._error)}") from self._error

    # ----- writer thread ---------------------------------------------------------------------
    def _run_writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as e:  # surfaced in the training thread, which polls for it
            self._error = e

    def _write_loop(self) -> None:
        g = self.group
        w, h, l = _Block(g["W"]), _Block(g["h_mean"]), _Block(g["loss"])
        pending: list[tuple[int, Callable]] = []
        last = self.committed
        while True:
            item = self._work.get()
            kind = item[0]
            if kind == "close":
                if last > self.committed:
                    self._commit(last, (w, h, l))
                self._run_checkpoints(pending)
                return
            if kind == "checkpoint":
                pending.append((item[1], item[2]))
                self._run_checkpoints(pending)
                continue
            _, step, index, epoch = item
            slot = self._slots[index]
            if slot.event is not None:
                slot.event.synchronize()
            full = w.put(step, slot.W.view(torch.uint16).numpy())
            l.put(step, slot.loss.numpy())
            if step > 0:
                h.put(step - 1, slot.h_mean.numpy())
            self.latest_loss = float(slot.loss)
            if epoch is not None:
                self.epoch = epoch
            self._free.put(index)
            last = step
            if full:
                self._commit(last, (w, h, l))
                self._run_checkpoints(pending)

    def _commit(self, step: int, blocks: tuple[_Block, ...]) -> None:
        # zarr would silently recreate a deleted store's folders; refuse to write into nothing.
        root = group_path(self.group)
        if not (root / "zarr.json").is_file() or not (root / "W" / "zarr.json").is_file():
            raise FileNotFoundError(f"the store {root} disappeared during the run")
        for block in blocks:
            block.flush()
        write_commit(self.group, step, self.epoch)
        self.committed = step

    def _run_checkpoints(self, pending: list) -> None:
        while pending and pending[0][0] <= self.committed:
            pending.pop(0)[1]()


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value))


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0]}" if not isinstance(error, RecorderError) else text
