"""The run's metadata (FORMAT.md is its specification): group layout, field attributes, the commit marker.

A run is a Zarr v3 group. Each field is an array at the group's root with the step axis first;
constants (tensors recorded once) sit beside them; row indices of row-subset fields live in the
``.rows`` subgroup; ``commit.json`` says how many steps every field holds durably. This module
creates and opens that layout; it knows nothing of any experiment. How a field is split among
ranks is format/planner.py; how a block of steps becomes files is format/blocks.py. Format-1 runs
(crucible-record 0.1, all written by the Crucible-3 experiment) are read from their stored arrays'
own metadata (dimension names, dtypes, lengths), not from a list of that experiment's fields: a
hook into crucible3 would make opening a run depend on whether crucible3 was imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..codecs import Layout, codecs_for, time_chunk_for
from ..errors import CrucibleError
from ..fields import Field, check_fields, check_name, field_from_description, stored_dims
from ..storage import MARKER, STORE_NAME, RunStore
from .blocks import WRITE_ALL
from .planner import Partition, partition_chunking

FORMAT_NAME = "crucible-record"
FORMAT_VERSION = 2
COMMIT_KEY = MARKER
ROWS_GROUP = ".rows"
RANKS_PREFIX = ".ranks"  # .ranks/<rank>.json: a rank's progress (multi-rank runs)


@dataclass
class RunInfo:
    """What a run's metadata says (read once when it is opened)."""

    version: int
    fields: dict[str, Field]
    constants: list[str]
    attributes: dict[str, Any]
    layout: Layout
    steps: int | None  # steps the run was sized for; None = open-ended
    first_step: dict[str, int] = field(default_factory=dict)  # format 1 only: fields stored from step 1
    world_size: int = 1  # ranks of the torch.distributed job that recorded it


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
        group = zarr.open_group(store.store, mode="a" if store.conditional_put else "w-", zarr_format=3)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        raise CrucibleError(f"{store.location} already holds a run; choose a new path (or resume it)") from None
    for name, spec in fields.items():
        step_bytes = int(np.prod(spec.stored_shape, dtype=np.int64)) * np.dtype(spec.storage_dtype).itemsize
        time_chunk = time_chunk_for(layout, step_bytes)
        meta = {**spec.describe(), "time_chunk": time_chunk}
        meta.update(dtypes.encoding_attribute(spec.dtype))
        partition = partitions.get(name)
        if partition is not None:
            meta["partition"] = partition.to_dict()
        chunks = partition_chunking(spec.stored_shape, time_chunk, layout.row_chunk, partition)
        group.create_array(
            name,
            shape=(spec.rows_at(steps) if steps else 0,) + spec.stored_shape,
            dtype=spec.storage_dtype,
            fill_value=dtypes.fill_value(spec.dtype),
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
        meta = {"constant": True, "dtype": dtypes.dtype_name(tensor.dtype), "shape": list(tensor.shape),
                **dtypes.encoding_attribute(tensor.dtype)}
        _write_whole(group, name, dtypes.stored_numpy(tensor), dims, {"crucible_record": meta}, **small)
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
        if not isinstance(value, torch.Tensor) or not dtypes.supported(value.dtype):
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
        location = str(store.location).rstrip("/")
        if location == STORE_NAME or location.endswith("/" + STORE_NAME):  # the run's store itself was given
            parent = location[: -len(STORE_NAME)].rstrip("/") or "."
            raise CrucibleError(f"{location} is the store inside a run: pass the run directory, {parent}")
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
    info = _info_v1(group, attrs) if version == 1 else _info_v2(group, attrs, store)
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


def _info_v1(group, attrs: dict) -> RunInfo:
    """Format 1 (crucible-record 0.1), derived from what is stored rather than from which experiment
    wrote it, so this layer names no field: an array whose first axis is named ``step`` is a field,
    ``step_minus_one`` a field recorded from step 1; any other array is a constant. 0.1 stored
    bfloat16 as uint16 bits (and nothing else as uint16), without format 2's dtype attribute. It
    sized every array for the whole run when it created it: their lengths give the run's steps."""
    fields, constants, first_step, steps = {}, [], {}, 0
    for name, array in sorted(group.arrays()):
        dims = tuple(array.metadata.dimension_names or ())
        if not dims or dims[0] not in ("step", "step_minus_one"):
            constants.append(name)
            continue
        stored = np.dtype(array.dtype)
        dtype = torch.bfloat16 if stored == np.uint16 else dtypes.dtype_from_name(stored.name)
        fields[name] = Field(tuple(array.shape[1:]), dtype, dims=dims[1:] or None)
        first = int(dims[0] == "step_minus_one")
        if first:
            first_step[name] = first
        steps = max(steps, array.shape[0] + first)
    attributes = {k: v for k, v in attrs.items() if k not in ("format", "format_version", "commit", "layout")}
    return RunInfo(version=1, fields=fields, constants=constants, attributes=attributes,
                   layout=Layout.from_dict(attrs.get("layout", {})), steps=steps or None, first_step=first_step)


def extend_run(store: RunStore, group, info: RunInfo, steps: int | None,
               attributes: Mapping[str, Any] | None = None) -> RunInfo:
    """Size a sized run for `steps` steps (at least its own; None: as it is): grow every field's
    array, then record the new count (and `attributes`, if given, in place of the run's own).
    The caller holds the run (its lock). The arrays grow before the group says so: a run the group
    sizes for N steps never has an array shorter than that. Growing changes no stored chunk."""
    if steps is not None:
        if info.steps is None:
            raise CrucibleError(f"{store.location} is open-ended: it has no step count to extend (record past it instead)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < info.steps:
            raise CrucibleError(f"{store.location} is sized for {info.steps} steps; it can be extended to more, "
                                f"not to {steps!r}")
    steps = info.steps if steps is None else steps
    keys = []
    for name, spec in info.fields.items() if steps is not None else ():
        array, rows = group[name], spec.rows_at(steps)
        if array.shape[0] != rows:
            array.resize((rows,) + tuple(array.shape[1:]))
            keys.append(f"{name}/zarr.json")
    store.sync(keys)
    attrs = dict(group.attrs)
    attrs["steps"] = steps  # same keys in the same order as create_run wrote them
    if attributes is not None:
        attrs["attributes"] = dict(attributes)
    group.attrs.put(attrs)
    store.sync(["zarr.json"])
    return dataclasses.replace(info, steps=steps, attributes=dict(attrs["attributes"]))


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
