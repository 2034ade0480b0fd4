"""``cr.record``: create or reopen a run and return its Recorder, for one process or for every rank.

One process records with a LocalCommit; under torch.distributed every rank records with a
RankCommit after one collective here and one at the first step (ranks.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .codecs import Layout
from .commit import LocalCommit, RankCommit
from .errors import CrucibleError, describe
from .fields import Field, check_fields
from .format.planner import read_partition
from .format.schema import check_run_arguments, create_run, extend_run, open_group, read_commit
from .ranks import Ranks, agree_on_call, agree_on_first_step, fingerprint
from .storage import DEFAULT_COMMIT_INTERVAL, RunStore, open_store
from .writer import Recorder

DEFAULT_RANK_TIMEOUT = 60.0  # multi-rank: how long a closing rank waits for the others


def record(path: str | Path, fields: Mapping[str, Field], steps: int | None = None,
           attributes: Mapping[str, Any] | None = None, *, constants: Mapping[str, Any] | None = None,
           resume: bool = False, layout: Layout | None = None,
           commit_interval: float = DEFAULT_COMMIT_INTERVAL, durability: str = "fsync",
           slots: int | None = None, rank_timeout: float = DEFAULT_RANK_TIMEOUT,
           distributed: bool | None = None, writer_threads: int | None = None) -> Recorder:
    """Create a run at `path` (refusing an existing one) and return its Recorder.

    steps: None = open-ended (arrays grow as the run goes); N = steps 0..N-1, arrays sized up front.
    constants: tensors stored once beside the fields (e.g. a token mask): name -> tensor, or
        name -> (tensor, dims) to name its axes.
    resume=True: reopen an existing run with the same fields; recording continues at
    ``rec.next_step``, its committed step count. `constants` and `layout` are then the run's own
    and must not be given. `steps=N` extends a sized run to N steps (N at least its own; one
    process): its arrays grow, nothing stored changes. `attributes` replaces the run's own (e.g. a
    config that names the step count); without it they are kept.

    Under torch.distributed (world size > 1) call it on every rank with the same arguments, and pass
    a rank's rows of a split field as ``cr.Shard(rows, offset=first_row)``, a replicated field as the
    tensor itself. Like torch.distributed.checkpoint.save, cr.record and the first rec.record are
    collective. rank_timeout: seconds a closing rank waits for the others (rank 0's final commit:
    twice that) before raising a RecorderError.
    distributed=False: this process records alone, as without torch.distributed (e.g. full
    tensors from rank 0 only: ``if rank == 0: cr.record(..., distributed=False)``).
    slots: steps staged before record() waits; None: staging_slots().
    writer_threads: threads compressing a block; None: default_writer_threads() at the first step.
    """
    if distributed not in (None, True, False):
        raise CrucibleError(f"distributed must be None (automatic), True or False, got {distributed!r}")
    ranks = Ranks.current() if distributed is not False else None
    if distributed is True and ranks is None and not Ranks.initialised():
        raise CrucibleError("distributed=True needs an initialised torch.distributed process group "
                            "(dist.init_process_group) on every rank")
    if ranks is not None:
        return _record_ranks(ranks, path, fields, steps, attributes, constants=constants, resume=resume,
                             layout=layout, commit_interval=commit_interval, durability=durability, slots=slots,
                             rank_timeout=rank_timeout, writer_threads=writer_threads)
    check_arguments(commit_interval, slots, rank_timeout, writer_threads)
    store = open_store(path, read_only=False, durability=durability)
    with ExitStack() as stack:
        if resume:
            _check_resume_arguments(None, None, constants, layout)
            group, info, committed = open_to_resume(store, stack, check_fields(fields), world_size=1)
            if steps is not None or attributes is not None:
                info = extend_run(store, group, info, steps, attributes)
        else:
            store.prepare_new()
            stack.enter_context(store.writer_lock())
            create_run(store, fields, steps=steps, layout=layout or Layout(time_chunk=None),
                       attributes=attributes, constants=constants)
            (group, info), committed = open_group(store, mode="r+"), 0
        commit = LocalCommit(store, info.fields, info.steps is not None, committed)
        return Recorder(store, info.fields, info.steps, commit, group=group, commit_interval=float(commit_interval),
                        slots=slots, release=stack.pop_all(), writer_threads=writer_threads)


def check_arguments(commit_interval, slots, rank_timeout, writer_threads) -> None:
    for name, value in (("commit_interval", commit_interval), ("rank_timeout", rank_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CrucibleError(f"{name} must be a positive number of seconds, got {value!r}")
    for name, value in (("slots", slots), ("writer_threads", writer_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CrucibleError(f"{name} must be an integer >= 1 or None (automatic), got {value!r}")


def _check_resume_arguments(steps, attributes, constants, layout) -> None:
    given = [name for name, value in (("steps", steps), ("attributes", attributes), ("constants", constants),
                                      ("layout", layout)) if value is not None]
    if given:
        raise CrucibleError(f"resume=True continues a run with its own {', '.join(given)}; drop "
                            + ("it" if len(given) == 1 else "them")
                            + (" (several ranks cannot extend a run)" if steps is not None or attributes is not None else ""))


def _ranks_text(n: int) -> str:
    return "one process" if n == 1 else f"{n} ranks (torch.distributed world size {n})"


def open_to_resume(store: RunStore, stack: ExitStack, fields: Mapping[str, Field], world_size: int):
    """Reopen a run to continue it (one process, or rank 0): checked, locked, claimed, swept,
    uncommitted rows dropped; (group, info, committed steps)."""
    open_group(store)  # a clear error if this is not a run, before taking the lock
    stack.enter_context(store.writer_lock())
    group, info = open_group(store, mode="r+")
    if info.version < 2:
        raise CrucibleError(f"{store.location} is a format-{info.version} run: it can be read, not continued")
    if set(fields) != set(info.fields):
        raise CrucibleError(f"{store.location} records fields {sorted(info.fields)}, not {sorted(fields)}")
    for name, spec in fields.items():
        if spec != info.fields[name]:
            raise CrucibleError(f"field {name!r} of {store.location} was recorded as {info.fields[name]}, not {spec}")
    if info.world_size != world_size:
        raise CrucibleError(f"{store.location} was recorded by {_ranks_text(info.world_size)}; it can only be "
                            f"continued by {_ranks_text(info.world_size)}, not by {_ranks_text(world_size)}")
    store.claim_existing()
    store.sweep_partial_files()
    committed = read_commit(store, group, info)["steps"]
    if info.steps is None:
        for name, spec in info.fields.items():
            array = group[name]
            if array.shape[0] != spec.rows_at(committed):
                array.resize((spec.rows_at(committed),) + tuple(array.shape[1:]))
    return group, info, committed


def _record_ranks(ranks: Ranks, path, fields, steps, attributes, *, constants, resume, layout, commit_interval,
                  durability, slots, rank_timeout, writer_threads) -> Recorder:
    """cr.record on one rank of several: rank 0 claims the path (or reopens the run), then one
    all_gather so that every rank raises the same error or none."""
    stack = ExitStack()
    error, claim, store, checked = None, None, None, None
    try:
        check_arguments(commit_interval, slots, rank_timeout, writer_threads)
        if resume:
            _check_resume_arguments(steps, attributes, constants, layout)
            checked = check_fields(fields)
        else:
            checked, _ = check_run_arguments(fields, steps, layout or Layout(time_chunk=None), constants)
        if str(path).lower().startswith("memory:"):
            raise CrucibleError(f"{path}: a memory:// run lives in one process; a run recorded by several ranks "
                                f"needs a shared directory or an object store")
        store = open_store(path, read_only=False, durability=durability)
        if ranks.rank == 0:
            claim = {"session": uuid.uuid4().hex, "committed": 0, "steps": steps}  # names this recording
            if resume:
                _, info, claim["committed"] = open_to_resume(store, stack, checked, ranks.size)
                claim["steps"] = info.steps
            else:
                store.prepare_new()
                stack.enter_context(store.writer_lock())
                store.claim_new()
    except Exception as e:  # every rank raises the lowest rank's error, after the gather
        error = describe(e)
    try:
        claim = agree_on_call(ranks, error, fingerprint(path, fields, steps, resume, layout, durability), claim)
    except CrucibleError:
        stack.close()
        raise
    marker = LocalCommit(store, checked, claim["steps"] is not None, claim["committed"]) if ranks.rank == 0 else None
    commit = RankCommit(store, ranks.rank, ranks.size, claim["session"], claim["committed"], marker=marker,
                        commit_interval=float(commit_interval), rank_timeout=float(rank_timeout))
    state: dict[str, Any] = {}  # the run's group, once opened at the first step
    mode = "r+" if ranks.rank == 0 else "r"

    def stored():
        if not resume:
            return None
        state["group"], _ = open_group(store, mode=mode)
        return {name: read_partition(state["group"][name]) for name in checked}

    def create(plan):
        create_run(store, checked, steps=steps, layout=layout or Layout(time_chunk=None), attributes=attributes,
                   constants=constants, partitions={n: p for n, p in plan.items() if p is not None},
                   world_size=ranks.size, claimed=True)

    def open_run(plan):
        group = state.get("group") or open_group(store, mode=mode)[0]
        recorder.open(plan, group)

    def agree(step, tensors, due):
        return agree_on_first_step(ranks, checked, step, due, tensors, stored, None if resume else create, open_run)

    recorder = Recorder(store, checked, claim["steps"], commit, rank=ranks.rank,
                        commit_interval=float(commit_interval), slots=slots, release=stack.pop_all(),
                        writer_threads=writer_threads, agree=agree)
    return recorder
