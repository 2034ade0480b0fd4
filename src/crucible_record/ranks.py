"""Several ranks of a torch.distributed job record one run together (see RankRecorder for the protocol).

Collectives run on the training thread only, at cr.record and at the first rec.record (like
torch.distributed.checkpoint.save: one plan exchanged, the coordinator creates, everyone writes its
own files); never on a writer thread, never per step. Each rank writes whole shards of its own rows;
rank 0 moves the commit marker to the minimum of every rank's durable progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import torch

from .codecs import Layout
from .errors import CrucibleError, RecorderError
from .fields import Field, Shard, as_shard_tensor, as_tensor, check_fields
from .format.planner import Partition, read_partition, tile
from .format.schema import COMMIT_KEY, check_run_arguments, create_run, open_group, rank_key, read_commit, write_commit
from .recorder import Recorder, _Block, _check_arguments, _check_same_fields, _check_world_size, _describe, _Slot
from .storage import RunStore, open_store

_RANK_POLL_S = 0.1  # how often a closing rank reads the others' progress


class Ranks:
    """This process's place in the torch.distributed job, and the few collectives the recorder runs:
    on the training thread, at ``cr.record`` and at the first step only; never on the writer thread,
    never per step."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    @staticmethod
    def initialised() -> bool:
        try:
            import torch.distributed as dist
        except ImportError:
            return False
        return dist.is_available() and dist.is_initialized()

    @staticmethod
    def current() -> "Ranks | None":
        """The default process group's rank and size; None without one or with a single rank."""
        try:
            import torch.distributed as dist
        except ImportError:  # a torch built without distributed support
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        size = dist.get_world_size()
        return Ranks(dist.get_rank(), size) if size > 1 else None

    def all_gather(self, obj: Any) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _digest(tensor: torch.Tensor) -> str:
    """The bytes of a replicated value, to compare across ranks at the first step (copied to the
    host once: the first step is collective anyway)."""
    return hashlib.blake2b(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


def _check_replicated_agree(step: int, digests: list[dict[str, str]]) -> None:
    """A plain tensor is replicated (rank 0 writes it): a rank-local value would silently keep rank 0's."""
    for name, first in digests[0].items():
        differ = [rank for rank, d in enumerate(digests) if d.get(name) != first]
        if differ:
            raise CrucibleError(
                f"field {name!r} is a plain tensor (replicated: rank 0 writes it) but rank(s) "
                f"{', '.join(map(str, differ))} gave other values than rank 0 at step {step}: a rank-local value? "
                f"make it equal on every rank first (dist.all_reduce), or record each rank's rows as cr.Shard")


def _first_error(errors: list) -> str | None:
    """The error of the lowest rank that has one, named by its rank (every rank raises this one)."""
    for rank, error in enumerate(errors):
        if error:
            return error if rank == 0 else f"rank {rank}: {error}"
    return None


def _fingerprint(path: Any, fields: Any, steps: Any, resume: bool, layout: Any, durability: Any) -> dict:
    """What must be the same on every rank's cr.record call."""
    try:
        described = {str(n): s.describe() if isinstance(s, Field) else repr(s) for n, s in dict(fields).items()}
    except Exception:
        described = repr(fields)
    return {"path": str(path), "fields": described, "steps": repr(steps), "resume": bool(resume),
            "durability": repr(durability), "layout": layout.to_dict() if isinstance(layout, Layout) else repr(layout)}


def record_ranks(ranks: Ranks, path, fields, steps, attributes, *, constants, resume, layout, commit_interval,
                  durability, slots, rank_timeout, writer_threads=None) -> "RankRecorder":
    """cr.record on one rank of several: rank 0 checks and claims the path (or reopens the run), every
    rank checks its arguments, then one all_gather so that every rank raises the same error or none."""
    stack = ExitStack()
    error, info, store, checked = None, None, None, None
    try:
        _check_arguments(commit_interval, slots, rank_timeout, writer_threads)
        if resume:
            if steps is not None or attributes is not None or constants is not None or layout is not None:
                raise CrucibleError("resume=True continues a run with its own steps, attributes, constants and layout; drop them")
            checked = check_fields(fields)
        else:
            checked, _ = check_run_arguments(fields, steps, layout or Layout(time_chunk=None), constants)
        if str(path).lower().startswith("memory:"):
            raise CrucibleError(f"{path}: a memory:// run lives in one process; a run recorded by several ranks "
                                f"needs a shared directory or an object store")
        store = open_store(path, read_only=False, durability=durability)
        if ranks.rank == 0:
            info = _claim_run(store, stack, checked, resume, ranks.size)
    except Exception as e:  # every rank raises the lowest rank's error, after the gather
        error = _describe(e)
    gathered = ranks.all_gather((error, _fingerprint(path, fields, steps, resume, layout, durability), info))
    message = _first_error([g[0] for g in gathered])
    if message is None:
        for rank, (_, fingerprint, _) in enumerate(gathered):
            if fingerprint != gathered[0][1]:
                differ = [k for k in fingerprint if fingerprint[k] != gathered[0][1][k]]
                message = (f"cr.record was called on rank {rank} with other {', '.join(differ)} than on rank 0; "
                           f"call it on every rank with the same arguments")
                break
    if message is not None:
        stack.close()
        raise CrucibleError(message)
    info = gathered[0][2]
    create = None if resume else {"steps": steps, "layout": layout or Layout(time_chunk=None),
                                  "attributes": attributes, "constants": constants}
    return RankRecorder(ranks, store, checked, info, create=create, commit_interval=float(commit_interval),
                         slots=slots, rank_timeout=float(rank_timeout), release=stack.pop_all(),
                         writer_threads=writer_threads)


def _claim_run(store: RunStore, stack: ExitStack, fields: Mapping[str, Field], resume: bool, size: int) -> dict:
    """Rank 0 at cr.record: a new path is claimed (the run itself is created at the first step, when
    the ranks' shards are known); a run to resume is reopened, checked and cut back to its commit."""
    session = uuid.uuid4().hex  # names this recording in the ranks' progress documents
    if not resume:
        store.prepare_new()
        stack.enter_context(store.writer_lock())
        store.claim_new()
        return {"session": session, "committed": 0, "steps": None}
    open_group(store)  # a clear error if this is not a run, before taking the lock
    stack.enter_context(store.writer_lock())
    group, info = open_group(store, mode="r+")
    if info.version < 2:
        raise CrucibleError(f"{store.location} is a format-{info.version} run: it can be read, not continued")
    _check_same_fields(store.location, fields, info.fields)
    _check_world_size(store.location, info.world_size, size)
    store.claim_existing()
    store.sweep_partial_files()
    committed = read_commit(store, group)["steps"]
    if info.steps is None:  # drop uncommitted rows before any rank writes again
        for name, spec in info.fields.items():
            array = group[name]
            if array.shape[0] != spec.rows_at(committed):
                array.resize((spec.rows_at(committed),) + tuple(array.shape[1:]))
    return {"session": session, "committed": committed, "steps": info.steps}


def _show_partition(partition: Partition | None) -> str:
    if partition is None:
        return "replicated (a plain tensor on every rank)"
    return "split " + ", ".join(f"rows {o}..{o + n - 1} to rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                                for o, n, r in partition.shards)


class RankRecorder(Recorder):
    """One rank's recorder of a run written by every rank of a torch.distributed job.

    The protocol follows PyTorch DCP's save (rank 0 gathers every rank's plan, validates the global
    plan — no overlap, full coverage — and replicated items are written once, by one rank; each
    rank writes its own files; the metadata last) and Orbax's multi-host commit (the primary host
    finalises once every host's data is durable), without any collective after the first step:

    * ``cr.record``: rank 0 claims the path (or reopens the run to resume); one all_gather.
    * first ``record()``: one all_gather of every rank's (field -> (offset, rows) of its Shard, or
      None for a plain tensor); every rank derives the same Partition of each split field
      (format.tile) or raises the same error; rank 0 creates the arrays (a split field: one zarr
      shard per rank's rows and block of steps); one broadcast (rank 0's result) and one all_gather
      (every rank's setup) so that no rank goes on alone.
    * each step: a rank stages only the rows it writes (its Shard; replicated fields: rank 0).
    * each rank's writer writes its whole shards (``<field>/c/<block>/<shard>/0...``, never a shard
      another rank writes), makes them durable, then: a rank r > 0 writes its progress
      ``.ranks/<r>.json`` {"session", "rank", "steps"} (atomically, fsynced); rank 0 moves
      ``commit.json`` to the smallest of its own and every rank's progress of this session, after
      growing open-ended arrays to it (rank 0 alone writes metadata).
    * close: rank 0 waits (polling, up to ``rank_timeout`` s) until every rank reports the last step,
      commits, and writes its verdict in ``.ranks/0.json`` {"session", "steps", "closed", "error"?};
      a rank that never gets there is named in a RecorderError (the marker stays at the steps every
      rank wrote). A rank r > 0 reports ``closed`` and waits for that verdict (up to
      2 x rank_timeout without the marker moving) and raises if the run was not committed to its
      last step. A rank leaving its ``with`` block on an exception reports it and does not wait.

    ``record()`` returns True only at commit points every rank agrees on (a block fills, the last
    step of a sized run); time-bounded commits still happen, unreported, so that a collective
    triggered by the return value (a checkpoint) cannot hang.
    """

    def __init__(self, ranks: Ranks, store: RunStore, fields: dict[str, Field], info: dict, *,
                 create: dict | None, commit_interval: float, slots: int | None, rank_timeout: float, release: ExitStack,
                 writer_threads: int | None = None):
        self.store, self.fields, self.steps = store, fields, (info["steps"] if create is None else None)
        self.location = store.location
        self.commit_interval = commit_interval
        self.writer_threads = writer_threads  # None until the first step shows the tensors' device
        self._on_gpu: bool | None = None  # likewise
        self._processes = 1  # this machine's recording processes (likewise)
        self._niced = False  # the writer thread has set its priority
        self.rank_timeout = rank_timeout
        self._ranks = ranks
        self.rank, self.world_size = ranks.rank, ranks.size
        self._session = info["session"]
        self._create = create  # a new run: what rank 0 creates at the first step
        self._release = release  # rank 0: the run lock
        self._rows_on: dict[tuple[str, torch.device], torch.Tensor] = {}
        # (the blocks are laid out at the first step: no block size yet to size the staging by)
        self.slots = slots or 3
        self._slots = [_Slot() for _ in range(self.slots)]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(self.slots):
            self._free.put(i)
        self._work: queue.Queue[tuple] = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._latest: dict[str, float] = {}
        self._written: list[str] = []
        self.committed = info["committed"]  # rank 0: the marker it wrote; others: the marker last read
        self._start = self.committed  # every rank holds at least this (committed when this session began)
        self._durable = self.committed  # this rank's own rows are durable for steps 0 .. _durable-1
        self.next_step = self.committed
        self._last_commit_point = time.monotonic()
        self.writer_seconds = 0.0
        self.stall_seconds, self.stalls = 0.0, 0  # record() waiting for a free slot (as Recorder)
        self._plan: dict[str, Partition | None] | None = None  # set at the first step
        self._group = None
        self._stored: dict[str, Partition | None] = {}
        self._arrays: dict[str, Any] = {}
        self._time_chunk: dict[str, int] = {}
        self._blocks: dict[str, _Block] = {}
        self._broken: str | None = None
        self._rank_failure: tuple[int, str] | None = None  # rank 0: the first rank that reported an error
        self._reported = False
        self._thread: threading.Thread | None = None
        if create is not None:
            self.steps = create.get("steps")

    # ----- training thread -------------------------------------------------------------------
    def record(self, step: int, **tensors) -> bool:
        """Stage this rank's part of one step; True at a commit point every rank agrees on."""
        self._raise_if_failed()
        if self._closed:
            raise RecorderError("record() after close()")
        if self._broken is not None:
            raise RecorderError(f"this run did not start: {self._broken}")
        if self._plan is None:
            self._start_run(step, tensors)
        self._check_step(step)
        due = self._due(step, tensors)
        sources = {}
        for name in due:
            source = self._check_value(name, tensors[name])
            if source is not None:
                sources[name] = source
        index = self._take_slot()
        slot = self._slots[index]
        devices = {slot.stage(name, tensor) for name, tensor in sources.items()}
        slot.mark(list(sources), devices - {None})
        # the ranks on this machine (torchrun's LOCAL_WORLD_SIZE) share its cores
        self._note_device(devices, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        agreed, commit = self._commit_points(step)
        self._work.put(("step", step, index, commit))
        self.next_step = step + 1
        return agreed

    def close(self) -> None:
        """Commit this rank's rows; rank 0 waits for every rank and commits the run; the others wait
        for rank 0's verdict. Raises the writer's error (a rank that did not finish, rank 0 gone)."""
        self._close(None)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(exc if exc_type is not None else None)

    def _close(self, failure: BaseException | None) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._thread is not None and self._thread.is_alive():
                    self._work.put(("close", None if failure is None else _describe(failure)))
                    self._thread.join()
                if self._thread is not None and self._error is not None and not self._reported:
                    self._report_failure(_describe(self._error))  # so that the other ranks stop waiting
            finally:
                self._release.close()
        self._raise_if_failed()

    def _check_value(self, name: str, value: Any) -> torch.Tensor | None:
        """Check one field's value against the run's plan; the tensor to stage if this rank writes it."""
        spec, partition = self.fields[name], self._plan[name]
        if partition is None:
            if isinstance(value, Shard):
                raise CrucibleError(f"field {name!r} is replicated in this run (a plain tensor on every rank at its "
                                    f"first step): pass the tensor itself, not a Shard")
            tensor = as_tensor(name, value, spec)  # validated on every rank, written by rank 0 only
            if name not in self._blocks:
                return None
            return tensor if spec.row_indices is None else tensor.index_select(0, self._rows(name, tensor.device))
        if not isinstance(value, Shard):
            raise CrucibleError(f"field {name!r} is {_show_partition(partition)} in this run: pass this rank's "
                                f"rows as cr.Shard(rows, offset=first_row)")
        tensor = as_shard_tensor(name, value, spec)
        mine = partition.of_rank(self.rank)
        if (mine is None and value.rows) or (mine is not None and (value.offset, value.rows) != mine[1:]):
            holds = "no rows" if mine is None else f"rows {mine[1]}..{mine[1] + mine[2] - 1}"
            raise CrucibleError(f"field {name!r}: rank {self.rank} gave {value!r}, but holds {holds} in this run "
                                f"({_show_partition(partition)})")
        return tensor if name in self._blocks else None

    def _commit_points(self, step: int) -> tuple[bool, bool]:
        """(a commit point every rank agrees on, a commit point of this rank: also time-bounded)."""
        done = step + 1
        agreed = done == self.steps or any(spec.due(step) and spec.rows_at(done) % self._time_chunk[name] == 0
                                           for name, spec in self.fields.items())
        now = time.monotonic()
        commit = agreed or now - self._last_commit_point >= self.commit_interval
        if commit:
            self._last_commit_point = now
        return agreed, commit

    def _start_run(self, step: int, tensors: Mapping[str, Any]) -> None:
        """The first step: agree on how every field is split, create the run (rank 0), set up."""
        error, layout = None, None
        try:
            self._check_step(step)
            if self._create is None:  # resuming: the run's own split, to check the given one against
                self._group, _ = open_group(self.store, mode="r+" if self.rank == 0 else "r")
                self._stored = {name: read_partition(self._group[name]) for name in self.fields}
            layout, digests = {}, {}
            for name in self._due(step, tensors):
                value, spec = tensors[name], self.fields[name]
                if isinstance(value, Shard):
                    as_shard_tensor(name, value, spec)
                    layout[name] = (value.offset, value.rows)
                else:
                    digests[name] = _digest(as_tensor(name, value, spec))
                    layout[name] = None
        except Exception as e:
            error = _describe(e)
        gathered = self._ranks.all_gather((error, layout, digests))
        message = _first_error([e for e, _, _ in gathered])
        plan = None
        if message is None:
            try:
                plan = self._plan_of([given for _, given, _ in gathered])
                _check_replicated_agree(step, [d for _, _, d in gathered])
            except CrucibleError as e:
                message = str(e)
        if message is None and self._create is not None:
            created = None
            if self.rank == 0:
                try:
                    create_run(self.store, self.fields, steps=self.steps, layout=self._create["layout"],
                               attributes=self._create["attributes"], constants=self._create["constants"],
                               partitions={n: p for n, p in plan.items() if p is not None},
                               world_size=self.world_size, claimed=True)
                except Exception as e:
                    created = _describe(e)
            created = self._ranks.broadcast(created)
            if created:
                message = created if self.rank == 0 else f"rank 0: {created}"
        if message is None:
            error = None
            try:
                self._open(plan)
            except Exception as e:
                error = _describe(e)
            message = _first_error(self._ranks.all_gather(error))
        if message is not None:
            self._broken = message
            raise CrucibleError(message)
        self._plan = plan
        self._thread = threading.Thread(target=self._run_writer, name=f"crucible-record-writer-rank{self.rank}",
                                        daemon=True)
        self._thread.start()

    def _plan_of(self, layouts: list[dict]) -> dict[str, Partition | None]:
        """Every field's split from the gathered layouts: the same on every rank, or the same error."""
        plan = {}
        for name, spec in self.fields.items():
            if name not in layouts[0]:  # resuming at a step this field is not due: the run's own split
                plan[name] = self._stored.get(name)
                continue
            given = [layout[name] for layout in layouts]
            sharded = [r for r, g in enumerate(given) if g is not None]
            if sharded and len(sharded) < len(given):
                plain = [r for r, g in enumerate(given) if g is None]
                raise CrucibleError(
                    f"field {name!r} is a Shard on rank(s) {', '.join(map(str, sharded))} and a plain tensor on "
                    f"rank(s) {', '.join(map(str, plain))}: pass a Shard on every rank (a rank without rows: a "
                    f"Shard of 0 rows) or the whole tensor on every rank (replicated, written by rank 0)")
            partition = tile(name, spec.shape[0], dict(enumerate(given))) if sharded else None
            if self._create is None and partition != self._stored.get(name):
                raise CrucibleError(f"field {name!r} is {_show_partition(partition)} at step {self.next_step}, but "
                                    f"the run was recorded {_show_partition(self._stored.get(name))}; resume with "
                                    f"the same split")
            plan[name] = partition
        return plan

    def _open(self, plan: dict[str, Partition | None]) -> None:
        """Open the run's arrays; a block buffer for each field (or shard of one) this rank writes."""
        if self._group is None:
            self._group, _ = open_group(self.store, mode="r+" if self.rank == 0 else "r")
        sized = self.steps is not None
        for name, spec in self.fields.items():
            array = self._group[name]
            self._arrays[name] = array
            self._time_chunk[name] = array.chunks[0]
            partition, rows = plan[name], spec.rows_at(self.committed)
            if partition is None:
                if self.rank == 0:
                    self._blocks[name] = _Block(self.store, array, name, spec, sized, rows, resize=False)
                continue
            mine = partition.of_rank(self.rank)
            if mine is not None and partition.writer_of(mine[0]) == self.rank:
                self._blocks[name] = _Block(self.store, array, name, spec, sized, rows, part=mine, resize=False)

    # ----- writer thread ---------------------------------------------------------------------
    def _write_loop(self) -> None:
        pending: list[tuple[int, Callable]] = []
        received = self.committed
        poll = min(self.commit_interval, 1.0)
        while True:
            behind = self.committed < self._durable if self.rank == 0 else bool(pending)
            try:
                item = self._work.get(timeout=poll if behind else None)
            except queue.Empty:  # idle: rank 0 moves the marker as the others catch up; others read it
                self._advance()
                self._run_after_commit(pending)
                continue
            if item[0] == "close":
                self._finish(received, item[1])
                self._run_after_commit(pending)
                return
            received = self._handle(item, pending) or received

    def _commit(self, steps: int) -> None:
        """This rank's rows of steps 0..steps-1 made durable; then its progress (rank 0: the marker)."""
        self._write_own(steps)
        if self.rank == 0:
            self._advance()
        else:
            self._report(steps)
            self._read_marker()

    def _write_own(self, steps: int) -> None:
        for block in self._blocks.values():
            if block.dirty:
                self._written.extend(block.write(self._encode_threads()))
        for key in ["zarr.json"] + [f"{name}/zarr.json" for name in self.fields]:
            if not self.store.exists(key):  # never commit into a deleted run
                raise FileNotFoundError(f"the run {self.location} disappeared during the run ({key} is gone)")
        self.store.sync(dict.fromkeys(self._written))
        self._written.clear()
        self._durable = max(self._durable, steps)

    def _progress(self) -> tuple[dict[int, int], dict[int, str]]:
        """Rank 0: every other rank's durable steps in this session, and the errors they reported."""
        progress, failed = {}, {}
        for rank in range(1, self.world_size):
            doc = self.store.read_json(rank_key(rank))
            if isinstance(doc, dict) and doc.get("session") == self._session and isinstance(doc.get("steps"), int):
                progress[rank] = max(doc["steps"], self._start)
                if doc.get("error"):
                    failed[rank] = str(doc["error"])
            else:  # nothing reported in this session yet: what was committed before it
                progress[rank] = self._start
        return progress, failed

    def _advance(self) -> None:
        """Rank 0: move the marker to the smallest progress of all ranks. Others: read the marker."""
        if self.rank != 0:
            self._read_marker()
            return
        progress, failed = self._progress()
        self._mark(min(self._durable, *progress.values()))
        if failed and self._rank_failure is None:
            # The training thread raises it at its next record(); this writer goes on until close,
            # which commits what every rank has (the failed rank's last rows included).
            self._rank_failure = min(failed.items())
            self._error = RecorderError(self._failure_text())

    def _mark(self, steps: int) -> None:
        """Rank 0: grow open-ended arrays to `steps`, then move the marker (never back)."""
        if steps <= self.committed:
            return
        keys = []
        if self.steps is None:
            for name, spec in self.fields.items():
                array, rows = self._arrays[name], spec.rows_at(steps)
                if array.shape[0] < rows:
                    array.resize((rows,) + tuple(array.shape[1:]))
                    keys.append(f"{name}/zarr.json")
        self.store.sync(keys)
        self.store.check_writer()
        write_commit(self.store, steps)
        self.committed = steps

    def _read_marker(self) -> None:
        doc = self.store.read_json(COMMIT_KEY)
        if isinstance(doc, dict) and isinstance(doc.get("steps"), int) and doc["steps"] > self.committed:
            self.committed = doc["steps"]

    def _report(self, steps: int, *, closed: bool = False, error: str | None = None) -> None:
        """A rank > 0: its progress document (or rank 0: its verdict), replaced atomically, durable."""
        doc: dict[str, Any] = {"session": self._session, "rank": self.rank, "steps": int(steps)}
        if closed:
            doc["closed"] = True
        if error:
            doc["error"] = error
        key = rank_key(self.rank)
        self.store.set(key, (json.dumps(doc) + "\n").encode("utf-8"))
        self.store.sync([key])
        if closed or error:
            self._reported = True

    def _report_failure(self, error: str) -> None:
        """Best effort: tell the other ranks this one failed, so that they stop waiting for it."""
        try:
            if self.rank == 0:
                self._report(self.committed, closed=True, error=f"rank 0 failed: {error}")
            else:
                self._report(self._durable, closed=True, error=error)
        except Exception:
            pass

    def _failure_text(self) -> str:
        rank, error = self._rank_failure
        return f"rank {rank} failed: {error}; {self._committed_text()}"

    def _committed_text(self) -> str:
        return f"steps 0..{self.committed - 1} of the run are committed" if self.committed else \
            "no step of the run is committed"

    def _finish(self, received: int, failure: str | None) -> None:
        began = time.perf_counter()
        self._write_own(received)
        self.writer_seconds += time.perf_counter() - began
        if failure is not None:  # leaving on an exception: commit what every rank has, do not wait
            if self.rank == 0:
                progress, _ = self._progress()
                self._mark(min(self._durable, *progress.values()))
                if self._rank_failure is not None:  # the error names the steps finally committed
                    self._error = RecorderError(self._failure_text())
            self._report_failure(failure)
            return
        if self.rank == 0:
            self._finish_first(received)
        else:
            self._finish_other(received)

    def _finish_first(self, received: int) -> None:
        """Rank 0: wait for every rank to reach the last step, commit it, write the verdict."""
        deadline = time.monotonic() + self.rank_timeout
        while True:
            progress, failed = self._progress()
            self._mark(min(self._durable, *progress.values()))
            if failed:
                self._rank_failure = min(failed.items())
                self._fail(self._failure_text())
            behind = {rank: steps for rank, steps in progress.items() if steps < received}
            if not behind:
                break
            if time.monotonic() >= deadline:
                def reached(rank: int, steps: int) -> str:
                    if steps == self._start:
                        return f"rank {rank} never reported a step in this session (its rows are durable only " \
                               f"where committed before: {steps} steps)" if steps else \
                            f"rank {rank} never reported a step"
                    return f"rank {rank} reached step {steps - 1} (its rows of steps 0..{steps - 1} are durable)"
                self._fail(f"{'; '.join(reached(r, s) for r, s in sorted(behind.items()))}, not the last step "
                           f"{received - 1}, within rank_timeout={self.rank_timeout:g} s: {self._committed_text()} "
                           f"(a rank that died or stopped recording early stops the commit there)")
            time.sleep(_RANK_POLL_S)
        self._report(self.committed, closed=True)

    def _fail(self, message: str) -> None:
        """Rank 0: the verdict says why the run stops here (the others raise it too), then raise."""
        try:
            self._report(self.committed, closed=True, error=message)
        except Exception:
            pass
        raise RecorderError(message)

    def _finish_other(self, received: int) -> None:
        """A rank > 0: report its last step, then wait for rank 0's verdict on the run."""
        self._report(received, closed=True)
        limit = 2 * self.rank_timeout
        deadline, seen = time.monotonic() + limit, self.committed
        while True:
            verdict = self.store.read_json(rank_key(0))
            if isinstance(verdict, dict) and verdict.get("session") == self._session and verdict.get("closed"):
                self._read_marker()
                if verdict.get("error"):
                    raise RecorderError(f"rank 0 could not commit the run: {verdict['error']}")
                if self.committed < received:
                    raise RecorderError(f"rank 0 closed the run at step {self.committed - 1}, but rank {self.rank} "
                                        f"recorded up to step {received - 1}: {self._committed_text()}")
                return
            self._read_marker()
            if self.committed > seen:  # rank 0 is alive and committing: wait on
                seen, deadline = self.committed, time.monotonic() + limit
            if time.monotonic() >= deadline:
                raise RecorderError(f"rank 0 did not close the run within {limit:g} s (2 x rank_timeout) after "
                                    f"rank {self.rank} recorded its last step {received - 1} (is rank 0 dead?): "
                                    f"{self._committed_text()}")
            time.sleep(_RANK_POLL_S)
