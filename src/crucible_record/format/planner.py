"""How a field's rows are split among the ranks of a multi-rank run, and chunked so that every
shard file has exactly one writer (FORMAT.md, "Several ranks").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..codecs import chunking
from ..errors import CrucibleError


@dataclass(frozen=True)
class Partition:
    """How a field's first axis is split among the ranks: ``(offset, rows, ranks)`` in row order.
    Equal shards but a shorter last one (torch.chunk's split), so shard ``i`` is zarr shard ``i``;
    of several ranks holding one shard (replicas) the lowest writes it, the others only check theirs."""

    shard_rows: int
    shards: tuple[tuple[int, int, tuple[int, ...]], ...]

    def writer_of(self, index: int) -> int:
        return self.shards[index][2][0]

    def of_rank(self, rank: int) -> tuple[int, int, int] | None:
        """(shard index, offset, rows) of the shard `rank` holds, or None (it holds no rows)."""
        for index, (offset, rows, ranks) in enumerate(self.shards):
            if rank in ranks:
                return index, offset, rows
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"shard_rows": self.shard_rows,
                "shards": [{"offset": o, "rows": n, "ranks": list(r)} for o, n, r in self.shards]}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "Partition":
        try:
            shards = tuple((int(s["offset"]), int(s["rows"]), tuple(int(r) for r in s["ranks"])) for s in value["shards"])
            return cls(int(value["shard_rows"]), shards)
        except (KeyError, TypeError, ValueError) as e:
            raise CrucibleError(f"malformed partition {value!r}: {e}") from None


def _show_rows(start: int, stop: int) -> str:
    return f"row {start}" if stop - start == 1 else f"rows {start}..{stop - 1}"


def show_partition(partition: Partition | None) -> str:
    if partition is None:
        return "replicated (a plain tensor on every rank)"
    return "split " + ", ".join(f"rows {o}..{o + n - 1} to rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                                for o, n, r in partition.shards)


def tile(name: str, n_rows: int, given: Mapping[int, tuple[int, int]]) -> Partition:
    """The partition of field `name` from each rank's ``(offset, rows)``; refuses gaps, overlaps and
    unequal shards. Deterministic: every rank raises the same error on the same gathered input."""
    held: dict[tuple[int, int], list[int]] = {}
    for rank in sorted(given):
        offset, rows = given[rank]
        if rows > 0:
            held.setdefault((offset, rows), []).append(rank)
    if not held:
        raise CrucibleError(f"field {name!r}: every rank gave a Shard of 0 rows; the field has {n_rows}")

    def who(key: tuple[int, int]) -> str:
        ranks = held[key]
        return (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}") + \
            f" ({_show_rows(key[0], key[0] + key[1])})"

    ordered = sorted(held)
    end = 0
    for key in ordered:
        offset, rows = key
        if offset > end:
            raise CrucibleError(f"field {name!r}: no rank gives {_show_rows(end, offset)} of its {n_rows} "
                                f"(a gap before {who(key)}); the ranks' Shards must tile rows 0..{n_rows - 1}")
        if offset < end:
            previous = next(k for k in ordered if k[0] < offset + rows and k[0] + k[1] > offset and k != key)
            raise CrucibleError(f"field {name!r}: {who(previous)} and {who(key)} both give "
                                f"{_show_rows(offset, min(end, offset + rows))}; the ranks' Shards must not overlap")
        end = offset + rows
    if end < n_rows:
        raise CrucibleError(f"field {name!r}: no rank gives {_show_rows(end, n_rows)} of its {n_rows} "
                            f"(the last Shard ends at row {end - 1}); the ranks' Shards must tile rows 0..{n_rows - 1}")
    shard_rows = ordered[0][1]
    equal = "Shards must have equal lengths except a shorter last one (the split of torch.chunk / DTensor Shard(0))"
    for key in ordered[:-1]:
        if key[1] != shard_rows:
            raise CrucibleError(f"field {name!r}: {who(ordered[0])} and {who(key)} differ in length; {equal}")
    if ordered[-1][1] > shard_rows:
        raise CrucibleError(f"field {name!r}: the last Shard, {who(ordered[-1])}, is longer than the others "
                            f"({shard_rows} rows); {equal}")
    return Partition(shard_rows, tuple((o, n, tuple(held[(o, n)])) for o, n in ordered))


def partition_chunking(stored_shape: tuple[int, ...], time_chunk: int, row_chunk: int,
                       partition: Partition | None) -> dict[str, Any]:
    """chunks/shards of a field: for a field split among ranks, one shard per block and rank shard."""
    if partition is None or len(partition.shards) == 1:
        return chunking(stored_shape, time_chunk, row_chunk)
    rest = tuple(max(1, s) for s in stored_shape[1:])
    n = partition.shard_rows
    # inner chunk rows: the largest divisor of n <= row_chunk (a shard must be whole inner chunks)
    divisors = (c for d in range(1, math.isqrt(n) + 1) if n % d == 0 for c in (d, n // d))
    inner = max(c for c in divisors if c <= row_chunk)
    return {"chunks": (time_chunk, inner) + rest, "shards": (time_chunk, n) + rest}


def read_partition(array) -> "Partition | None":
    value = dict(array.attrs).get("crucible_record", {}).get("partition")
    return None if value is None else Partition.from_dict(value)
