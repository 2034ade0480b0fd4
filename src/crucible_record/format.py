"""The run format (FORMAT.md is its specification): group layout, field attributes, commit marker.

A run is a Zarr v3 group. Each field is an array at the group's root with the step axis first;
constants (tensors recorded once) sit beside them; row indices of row-subset fields live in the
``.rows`` subgroup; ``commit.json`` says how many steps every field holds durably. This module
creates and opens that layout; it knows nothing of any experiment.

A run recorded by several ranks of a torch.distributed job (``world_size`` in the group attributes)
may split a field's first axis among them: its :class:`Partition` (array attribute ``partition``)
says which rows each rank holds; each block of steps is then one shard per rank's rows
(``<field>/c/<block>/<shard>/0...``), so that every shard file has exactly one writer. Each rank
other than 0 records its progress in ``.ranks/<rank>.json``; rank 0 alone writes metadata and moves
``commit.json``, to the smallest progress of all ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codecs import Layout, chunking, codecs_for, time_chunk_for
from .errors import CrucibleError
from .fields import (BF16_NAN_BITS, DTYPES, Field, check_fields, check_name, dtype_name,
                     field_from_description, stored_dims)
from .storage import MARKER, STORE_NAME, LocalRunStore, RunStore

FORMAT_NAME = "crucible-record"
FORMAT_VERSION = 2
COMMIT_KEY = MARKER
ROWS_GROUP = ".rows"
RANKS_PREFIX = ".ranks"  # .ranks/<rank>.json: a rank's progress (multi-rank runs)
# zarr skips chunks equal to the fill value; every chunk is written so that an absent chunk always
# means damage (readers check for it) and never "all fill".
WRITE_ALL = {"write_empty_chunks": True}


@dataclass
class RunInfo:
    """What a run's metadata says (read once when it is opened)."""

    version: int
    fields: dict[str, Field]
    constants: list[str]
    attributes: dict[str, Any]
    layout: Layout
    steps: int | None  # steps the run was sized for; None = open-ended
    first_step: dict[str, int] = field(default_factory=dict)  # format 1 only: h_mean starts at step 1
    world_size: int = 1  # ranks of the torch.distributed job that recorded it


@dataclass(frozen=True)
class Partition:
    """How a field's first axis is split among the ranks of a multi-rank run.

    shards: ``(offset, rows, ranks)`` in row order, tiling ``[0, n)``: every shard has ``shard_rows``
    rows except a shorter last one (torch.chunk's and DTensor Shard(0)'s split), so shard ``i``
    starts at row ``i * shard_rows`` and is the zarr shard ``i`` along that axis. ``ranks`` hold it
    (more than one: replicas, e.g. data-parallel copies of a tensor-parallel shard); the first
    (lowest) writes it, the others only check theirs. Ranks in no shard hold 0 rows.
    """

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


def tile(name: str, n_rows: int, given: Mapping[int, tuple[int, int]]) -> Partition:
    """The partition of field `name` (first axis `n_rows`) from each rank's ``(offset, rows)``.

    Refuses gaps, overlaps (two ranks giving identical rows are replicas, not an overlap) and
    unequal shards (equal lengths but a shorter last one). Deterministic: every rank that runs it on
    the same gathered input raises the same error.
    """
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
    for key in ordered[:-1]:
        if key[1] != shard_rows:
            raise CrucibleError(
                f"field {name!r}: {who(ordered[0])} and {who(key)} differ in length; Shards must have equal "
                f"lengths except a shorter last one (the split of torch.chunk / DTensor Shard(0))")
    if ordered[-1][1] > shard_rows:
        raise CrucibleError(
            f"field {name!r}: the last Shard, {who(ordered[-1])}, is longer than the others ({shard_rows} rows); "
            f"Shards must have equal lengths except a shorter last one (the split of torch.chunk / DTensor Shard(0))")
    return Partition(shard_rows, tuple((o, n, tuple(held[(o, n)])) for o, n in ordered))


def inner_rows(shard_rows: int, row_chunk: int) -> int:
    """Rows of an inner chunk of a rank's shard: the largest divisor of `shard_rows` <= row_chunk
    (zarr's sharding needs the shard to be a whole number of inner chunks)."""
    best = 1
    for d in range(1, int(shard_rows ** 0.5) + 1):
        if shard_rows % d == 0:
            for c in (d, shard_rows // d):
                if best < c <= row_chunk:
                    best = c
    return best


def partition_chunking(stored_shape: tuple[int, ...], time_chunk: int, row_chunk: int,
                       partition: Partition | None) -> dict[str, Any]:
    """chunks/shards of a field: one shard per block (codecs.chunking), or, for a field split
    among ranks, one shard per block and rank shard, so that each shard file has one writer."""
    if partition is None or len(partition.shards) == 1:
        return chunking(stored_shape, time_chunk, row_chunk)
    rest = tuple(max(1, s) for s in stored_shape[1:])
    n = partition.shard_rows
    return {"chunks": (time_chunk, inner_rows(n, row_chunk)) + rest, "shards": (time_chunk, n) + rest}


def read_partition(array) -> Partition | None:
    value = dict(array.attrs).get("crucible_record", {}).get("partition")
    return None if value is None else Partition.from_dict(value)


def fill_value(dtype: torch.dtype) -> Any:
    """What an unwritten row reads as: NaN for floats (bf16 NaN bits for bf16), else 0/False."""
    if dtype == torch.bfloat16:
        return BF16_NAN_BITS
    if dtype.is_floating_point:
        return float("nan")
    return False if dtype == torch.bool else 0


def check_run_arguments(fields: Mapping[str, Field], steps: int | None, layout: Layout,
                        constants: Mapping[str, Any] | None) -> tuple[dict[str, Field], dict[str, tuple]]:
    """What create_run refuses before writing anything: the fields, steps, layout and constants."""
    fields = check_fields(fields)
    layout.validate()
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise CrucibleError(f"steps must be a positive integer or None (open-ended), got {steps!r}")
    return fields, _check_constants(constants or {}, fields)


def create_run(store: RunStore, fields: Mapping[str, Field], *, steps: int | None, layout: Layout,
               attributes: Mapping[str, Any] | None = None,
               constants: Mapping[str, Any] | None = None,
               partitions: Mapping[str, Partition] | None = None, world_size: int = 1,
               claimed: bool = False):
    """Create the group, one array per field, the constants and the row indices; commit 0 steps.

    Refuses an existing run (zarr's ``mode="w-"``). Everything is fsynced before it returns.
    partitions, world_size: a run recorded by `world_size` ranks, fields split among them
    (multi-rank runs; ``claimed``: the caller already claimed the store, see RunStore.claim_new).
    """
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    fields, constants = check_run_arguments(fields, steps, layout, constants)
    attributes = dict(attributes or {})
    partitions = dict(partitions or {})
    if not claimed:
        store.claim_new()  # on an object store: the conditional create that makes this the only writer
    try:  # (on a disk the caller holds the run's lock, and "w-" refuses an existing group)
        group = zarr.open_group(store.store, mode="w-" if isinstance(store, LocalRunStore) else "a", zarr_format=3)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        raise CrucibleError(f"{store.location} already holds a run; choose a new path (or resume it)") from None
    for name, spec in fields.items():
        step_bytes = int(np.prod(spec.stored_shape, dtype=np.int64)) * np.dtype(spec.storage_dtype).itemsize
        time_chunk = time_chunk_for(layout, step_bytes)
        meta = {**spec.describe(), "time_chunk": time_chunk}
        if spec.dtype == torch.bfloat16:
            meta["encoding"] = "bfloat16 bits stored as uint16"
        partition = partitions.get(name)
        if partition is not None:
            meta["partition"] = partition.to_dict()
        chunks = partition_chunking(spec.stored_shape, time_chunk, layout.row_chunk, partition)
        group.create_array(
            name,
            shape=(spec.rows_at(steps) if steps else 0,) + spec.stored_shape,
            dtype=spec.storage_dtype,
            fill_value=fill_value(spec.dtype),
            dimension_names=stored_dims(name, spec),
            attributes={"crucible_record": meta},
            config=WRITE_ALL,
            **chunks,
            **codecs_for(layout.codec, chunks["chunks"], spec.storage_dtype),
        )
    small = {"compressors": [ZstdCodec(level=3), Crc32cCodec()], "filters": []}  # checksummed, like fields
    for name, spec in fields.items():
        if spec.row_indices is not None:
            _write_whole(group, f"{ROWS_GROUP}/{name}", spec.row_indices, (f"{name}_row",),
                         {"crucible_record": {"rows_of": name}}, **small)
    for name, (tensor, dims) in constants.items():
        meta = {"constant": True, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        if tensor.dtype == torch.bfloat16:
            meta["encoding"] = "bfloat16 bits stored as uint16"
            tensor = tensor.view(torch.uint16)
        _write_whole(group, name, tensor.numpy(), dims, {"crucible_record": meta}, **small)
    group.attrs.put({  # one write (attrs.update writes zarr.json once per key: readers would see halves)
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fields": {name: spec.describe() for name, spec in fields.items()},
        "constants": list(constants),
        "layout": layout.to_dict(),
        "steps": steps,
        "attributes": attributes,
        **({"world_size": int(world_size)} if world_size > 1 else {}),
    })
    store.sync_all()  # everything written so far is durable before the first marker
    write_commit(store, 0)
    return group


def _write_whole(group, name: str, data: np.ndarray, dims, attributes, **codecs) -> None:
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=tuple(max(1, s) for s in data.shape) or None,
                               dimension_names=dims, attributes=attributes, config=WRITE_ALL, **codecs)
    if data.size:
        array[...] = data


def _check_constants(constants: Mapping[str, Any], fields: Mapping[str, Field]) -> dict[str, tuple]:
    """name -> tensor, or name -> (tensor, dims): tensors stored once, beside the fields."""
    checked = {}
    for name, value in constants.items():
        check_name(name)
        if name.lower() in {n.lower() for n in [*fields, *checked]}:
            raise CrucibleError(f"constant {name!r} has the name of a field or of another constant")
        value, dims = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor) or value.dtype not in DTYPES:
            raise CrucibleError(f"constant {name!r} must be a tensor of a supported dtype (or a (tensor, dims) pair)")
        if value.dim() == 0:
            raise CrucibleError(f"constant {name!r} is a scalar: put it in attributes= (or give it one axis)")
        dims = tuple(dims) if dims is not None else tuple(f"{name}_{i}" for i in range(value.dim()))
        if len(dims) != value.dim() or not all(isinstance(d, str) and d for d in dims):
            raise CrucibleError(f"constant {name!r}: dims must name each of its {value.dim()} axes, got {dims!r}")
        checked[name] = (value.detach().cpu().contiguous(), dims)
    return checked


def open_group(store: RunStore, mode: str = "r"):
    """Open a run's group and read its metadata, refusing what is not a run of a known version."""
    import zarr

    if not store.run_exists():
        raise CrucibleError(f"{store.location} is not a crucible-record run (no {STORE_NAME})")
    try:
        group = zarr.open_group(store.store, mode=mode, zarr_format=3)
        attrs = dict(group.attrs)
    except Exception as e:
        raise CrucibleError(f"{store.location}: cannot open {STORE_NAME}: {type(e).__name__}: {e}") from None
    if attrs.get("format") != FORMAT_NAME:
        raise CrucibleError(f"{store.location} is not a crucible-record run (no format marker)")
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CrucibleError(f"{store.location}: unreadable format version {version!r}")
    if version > FORMAT_VERSION:
        raise CrucibleError(
            f"{store.location} was written by a newer crucible-record (format {version}, this one reads "
            f"{FORMAT_VERSION}); upgrade crucible-record"
        )
    info = _info_v1(attrs) if version == 1 else _info_v2(group, attrs, store)
    for name in list(info.fields) + info.constants:
        if name not in group:
            raise CrucibleError(f"{store.location} is damaged: array {name} is missing")
    return group, info


def _info_v2(group, attrs: dict, store: RunStore) -> RunInfo:
    described = attrs.get("fields")
    if not isinstance(described, dict) or not described:
        raise CrucibleError(f"{store.location} is damaged: no field descriptions")
    fields = {}
    for name, description in described.items():
        rows = None
        if isinstance(description, dict) and description.get("rows") is not None:
            try:
                rows = np.asarray(group[f"{ROWS_GROUP}/{name}"][...])
            except Exception as e:
                text = str(e).splitlines()[0] if str(e) else ""
                raise CrucibleError(f"{store.location} is damaged: row indices of {name}: {type(e).__name__}: {text}") from None
        fields[check_name(name)] = field_from_description(description, rows)
    world_size = attrs.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CrucibleError(f"{store.location} is damaged: world_size {world_size!r}")
    return RunInfo(version=2, fields=fields, constants=list(attrs.get("constants", [])),
                   attributes=dict(attrs.get("attributes") or {}), layout=Layout.from_dict(attrs.get("layout", {})),
                   steps=attrs.get("steps"), world_size=world_size)


def _info_v1(attrs: dict) -> RunInfo:
    """Format 1 (crucible-record 0.1): the Crucible-3 arrays, h_mean stored from step 1."""
    config = attrs.get("config", {})
    vocab, hidden = int(config.get("vocab_size", 0)), int(config.get("hidden_dim", 0))
    fields = {
        "W": Field((vocab, hidden), torch.bfloat16, dims=("token", "hidden")),
        "h_mean": Field((hidden,), torch.float32, dims=("hidden",)),
        "loss": Field((), torch.float32),
    }
    attributes = {k: v for k, v in attrs.items() if k not in ("format", "format_version", "commit", "layout")}
    steps = config.get("steps")
    return RunInfo(version=1, fields=fields, constants=["dead_mask", "dead_indices"], attributes=attributes,
                   layout=Layout.from_dict(attrs.get("layout", {})), steps=steps + 1 if steps else None,
                   first_step={"h_mean": 1})


def read_commit(store: RunStore, group) -> dict[str, Any]:
    """The commit marker: ``steps`` = how many steps (0 .. steps-1) every field holds durably."""
    if int(group.attrs.get("format_version", 0)) == 1:
        commit = dict(group.attrs.get("commit", {}))
        return {"steps": int(commit.get("steps", -1)) + 1, "epoch": int(commit.get("epoch", 0))}
    commit = store.read_json(COMMIT_KEY)
    if not isinstance(commit, dict) or not isinstance(commit.get("steps"), int) or commit["steps"] < 0:
        raise CrucibleError(f"{store.location} is damaged: {COMMIT_KEY} is missing or malformed")
    return commit


def rank_key(rank: int) -> str:
    """The progress document of `rank` in a multi-rank run: {"session", "steps", "error"?, "closed"?}."""
    return f"{RANKS_PREFIX}/{int(rank)}.json"


def write_commit(store: RunStore, steps: int) -> None:
    """Move the marker: written atomically after the data it vouches for is durable."""
    store.write_marker({"steps": int(steps)})


def encode_block(array, block: int, rows: np.ndarray, row_shard: int = 0, threads: int = 1) -> dict[str, bytes]:
    """The chunk (shard) files of time block `block` of `array` holding `rows`, encoded by zarr's own
    codec pipeline: store key -> bytes.

    row_shard: `rows` are one rank's shard of a field split among ranks (Partition): the rows of
    zarr shard `row_shard` along the first axis, at most one shard's rows; its keys are
    ``c/<block>/<row_shard>/0...``.

    zarr's write of a sharded array reads the existing shard first and merges into it (a
    read-modify-write: a GET over the network on S3, and a failure if the old shard is damaged).
    The block is therefore encoded whole and written in one piece (one PUT per file, atomic):
    by crucible_record.shardio (zarr's exact bytes with numcodecs, 1.2-1.4x less CPU than zarr's
    pipeline: benchmarks/bench_codec_path.py) where the block is one shard file, else by zarr's
    own pipeline into a scratch in-memory array with the same metadata, shaped just this block."""
    import json

    import zarr
    from zarr.core.buffer import default_buffer_prototype

    from .blockread import log_fallback

    single = array.ndim == 1 or all(u >= s for s, u in zip(array.shape[2:], (array.shards or array.chunks)[2:]))
    if single:
        from .shardio import encode_shard

        try:
            data = encode_shard(array, rows, threads)
        except NotImplementedError as e:  # a layout shardio does not reproduce: zarr's pipeline below
            log_fallback(array.path, "written", str(e))
            data = None
        if data is not None:
            coords = (block,) if array.ndim == 1 else (block, row_shard) + (0,) * (array.ndim - 2)
            return {f"{array.path}/{array.metadata.encode_chunk_key(coords)}": data}
    else:
        log_fallback(array.path, "written", "a time block is split over several files (a field split among ranks)")
    meta = json.loads(array.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
    meta["shape"] = list(rows.shape)
    scratch = zarr.storage.MemoryStore()
    scratch._store_dict["zarr.json"] = default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())
    zarr.open_array(scratch, mode="r+", zarr_format=3).with_config(WRITE_ALL)[...] = rows
    files = {}
    for key, buf in scratch._store_dict.items():
        if key != "zarr.json":  # "c/0/j/k" -> "c/<block>/j/k" in the real array
            coords = [int(c) for c in key.split("/")[1:]]
            if row_shard:
                coords[1] += row_shard
            files[f"{array.path}/{array.metadata.encode_chunk_key((block, *coords[1:]))}"] = buf.to_bytes()
    return files


def block_keys(array, array_key: str, block: int) -> list[str]:
    """Store keys of every chunk (or shard) file holding rows of time block `block`."""
    unit = array.shards or array.chunks
    grid = [range(-(-size // u)) for size, u in zip(array.shape[1:], unit[1:])]
    return [f"{array_key}/{array.metadata.encode_chunk_key((block, *rest))}" for rest in itertools.product(*grid)]


def missing_blocks(store: RunStore, array, array_key: str, rows: range) -> list[int]:
    """Time blocks covering `rows` with an absent chunk file: zarr would read them as fill values
    without complaint; for committed rows an absent chunk can only mean damage."""
    if len(rows) == 0 or array.size == 0:
        return []
    unit = (array.shards or array.chunks)[0]
    return [block for block in range(rows.start // unit, (rows.stop - 1) // unit + 1)
            if not all(store.exists(key) for key in block_keys(array, array_key, block))]
