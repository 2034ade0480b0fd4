"""The collectives of a run recorded by several ranks of a torch.distributed job.

As in torch.distributed.checkpoint.save, they run on the training thread only: at ``cr.record``
and at the first ``rec.record``, never per step; then each rank writes its own shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .codecs import Layout
from .errors import CrucibleError, describe
from .fields import Field, Shard, as_shard_tensor, as_tensor, local_part
from .format.planner import Partition, show_partition, tile


@dataclass(frozen=True)
class Ranks:
    """This process's place in the torch.distributed job."""

    rank: int
    size: int

    @staticmethod
    def initialised() -> bool:
        return dist.is_available() and dist.is_initialized()

    @staticmethod
    def current() -> "Ranks | None":
        """The default process group's rank and size; None without one or with a single rank."""
        if not Ranks.initialised():
            return None
        size = dist.get_world_size()
        return Ranks(dist.get_rank(), size) if size > 1 else None

    def gather(self, error: str | None, payload: Any = None) -> list:
        """One all_gather of (error, payload): every rank raises the error of the lowest rank that
        has one, named by its rank, or none does; else every rank's payload."""
        gathered = [None] * self.size
        dist.all_gather_object(gathered, (error, payload))
        for rank, (message, _) in enumerate(gathered):
            if message:
                raise CrucibleError(message if rank == 0 else f"rank {rank}: {message}")
        return [sent for _, sent in gathered]


def _attempt(fn: Callable, *args) -> str | None:
    """Run fn(*args); the error it raised, described (for a collective), or None."""
    try:
        fn(*args)
    except Exception as e:
        return describe(e)
    return None


def fingerprint(path: Any, fields: Any, steps: Any, resume: bool, layout: Any, durability: Any) -> dict:
    """What must be the same on every rank's cr.record call."""
    try:
        described = {str(n): s.describe() if isinstance(s, Field) else repr(s) for n, s in dict(fields).items()}
    except Exception:
        described = repr(fields)
    return {"path": str(path), "fields": described, "steps": repr(steps), "resume": bool(resume),
            "durability": repr(durability), "layout": layout.to_dict() if isinstance(layout, Layout) else repr(layout)}


def agree_on_call(ranks: Ranks, error: str | None, call: dict, claimed: Any) -> Any:
    """cr.record on every rank: one all_gather of (error, fingerprint, rank 0's claim); every rank
    raises the same error or none. Returns rank 0's claim."""
    gathered = ranks.gather(error, (call, claimed))
    first = gathered[0][0]
    for rank, (other, _) in enumerate(gathered):
        if other != first:
            differ = [k for k in other if other[k] != first[k]]
            raise CrucibleError(f"cr.record was called on rank {rank} with other {', '.join(differ)} than on rank 0; "
                                f"call it on every rank with the same arguments")
    return gathered[0][1]


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


def _plan_of(fields: Mapping[str, Field], layouts: list[dict], stored: Mapping[str, Partition | None] | None,
             step: int) -> dict[str, Partition | None]:
    """Every field's split from the gathered layouts: the same on every rank, or the same error.
    stored: a resumed run's own splits (the given ones must match), None for a new run."""
    plan = {}
    for name, spec in fields.items():
        if name not in layouts[0]:  # resuming at a step this field is not due: the run's own split
            plan[name] = (stored or {}).get(name)
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
        if stored is not None and partition != stored.get(name):
            raise CrucibleError(f"field {name!r} is {show_partition(partition)} at step {step}, but "
                                f"the run was recorded {show_partition(stored.get(name))}; resume with "
                                f"the same split")
        plan[name] = partition
    return plan


def agree_on_first_step(ranks: Ranks, fields: Mapping[str, Field], step: int, due: Callable[[], list[str]],
                        tensors: Mapping[str, Any], stored: Callable[[], Mapping[str, Partition | None] | None],
                        create: Callable[[dict], None] | None, open_run: Callable[[dict], None]
                        ) -> dict[str, Partition | None]:
    """The first rec.record on every rank: gather every Shard's (offset, rows) and plain tensor's
    digest, derive one plan; rank 0 runs `create(plan)`, every rank `open_run(plan)`. Each phase
    ends in a collective, so every rank raises the same error or none."""
    error, layout, digests, known = None, {}, {}, None
    try:
        known = stored()
        for name in due():
            value, spec = local_part(name, tensors[name]), fields[name]
            if isinstance(value, Shard):
                as_shard_tensor(name, value, spec)
                layout[name] = (value.offset, value.rows)
            else:
                digests[name] = _digest(as_tensor(name, value, spec))
                layout[name] = None
    except Exception as e:
        error = describe(e)
    gathered = ranks.gather(error, (layout, digests))
    plan = _plan_of(fields, [given for given, _ in gathered], known, step)
    _check_replicated_agree(step, [sums for _, sums in gathered])
    if create is not None:
        box = [_attempt(create, plan) if ranks.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise CrucibleError(box[0] if ranks.rank == 0 else f"rank 0: {box[0]}")
    ranks.gather(_attempt(open_run, plan))
    return plan
