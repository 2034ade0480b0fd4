"""The collectives of a run recorded by several ranks of a torch.distributed job.

As in torch.distributed.checkpoint.save, they run on the training thread only: at ``cr.record``
and at the first ``rec.record``, never per step; then each rank writes its own shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .codecs import Layout
from .errors import CrucibleError, describe
from .fields import Field, Shard, as_shard_tensor, as_tensor, local_part
from .format.planner import Partition, show_partition, tile


class Ranks:
    """This process's place in the torch.distributed job, and the two collectives used."""

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
        if not Ranks.initialised():
            return None
        import torch.distributed as dist

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

    def agree(self, error: str | None) -> None:
        """Every rank raises the lowest rank's error, or none does (one all_gather)."""
        message = first_error(self.all_gather(error))
        if message is not None:
            raise CrucibleError(message)


def first_error(errors: list) -> str | None:
    """The error of the lowest rank that has one, named by its rank (every rank raises this one)."""
    for rank, error in enumerate(errors):
        if error:
            return error if rank == 0 else f"rank {rank}: {error}"
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
    gathered = ranks.all_gather((error, call, claimed))
    message = first_error([g[0] for g in gathered])
    if message is None:
        for rank, (_, other, _) in enumerate(gathered):
            if other != gathered[0][1]:
                differ = [k for k in other if other[k] != gathered[0][1][k]]
                message = (f"cr.record was called on rank {rank} with other {', '.join(differ)} than on rank 0; "
                           f"call it on every rank with the same arguments")
                break
    if message is not None:
        raise CrucibleError(message)
    return gathered[0][2]


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
    gathered = ranks.all_gather((error, layout, digests))
    message = first_error([e for e, _, _ in gathered])
    if message is not None:
        raise CrucibleError(message)
    plan = _plan_of(fields, [g for _, g, _ in gathered], known, step)
    _check_replicated_agree(step, [d for _, _, d in gathered])
    if create is not None:
        created = None
        if ranks.rank == 0:
            try:
                create(plan)
            except Exception as e:
                created = describe(e)
        created = ranks.broadcast(created)
        if created:
            raise CrucibleError(created if ranks.rank == 0 else f"rank 0: {created}")
    error = None
    try:
        open_run(plan)
    except Exception as e:
        error = describe(e)
    ranks.agree(error)
    return plan
