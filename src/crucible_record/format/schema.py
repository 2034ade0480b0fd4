"""The run's metadata (FORMAT.md is its specification): group layout, field attributes, the commit marker.

A run is a Zarr v3 group: a step-first array per field, constants beside them, row indices in
``.rows``, and ``commit.json``; this module knows no experiment. Format-1 runs are read from their
arrays' own metadata, not a list of Crucible-3's fields (opening a run must not depend on crucible3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..codecs import Layout, codecs_for, time_chunk_for
from ..errors import CrucibleError, describe
from ..fields import MAX_ELEMENTS, Field, check_fields, check_name, field_from_description, stored_dims
from ..storage import MARKER, STORE_NAME, RunStore
from .blocks import WRITE_ALL
from .planner import Partition, partition_chunking

FORMAT_NAME = "crucible-record"
FORMAT_VERSION = 2
COMMIT_KEY = MARKER
ROWS_GROUP = ".rows"
RANKS_PREFIX = ".ranks"  # .ranks/<rank>.json: a rank's progress (multi-rank runs)
DIGESTS = "metadata_sha256"  # group attribute: array path -> sha256 of its zarr.json as created, less "shape"
# codecs this package writes (codecs.py, shardio); anything else in an array's zarr.json is not ours
KNOWN_CODECS = {"sharding_indexed", "transpose", "bytes", "zstd", "blosc", "crc32c", "numcodecs.delta"}


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
    array_rows: dict[str, int] = field(default_factory=dict)  # each field array's first axis, when opened

    def steps_held(self) -> int:
        """The most steps the field arrays hold, as their first axes were at open (and within
        ``steps`` for a sized run): a marker beyond this is damage, never data."""
        held = [self.first_step.get(name, 0) + self.array_rows.get(name, 0) * spec.every
                for name, spec in self.fields.items()]
        if self.steps is not None:
            held.append(self.steps)
        return min(held)


def check_run_arguments(fields: Mapping[str, Field], steps: int | None, layout: Layout,
                        constants: Mapping[str, Any] | None) -> tuple[dict[str, Field], dict[str, tuple]]:
    """What create_run refuses before writing anything: the fields, steps, layout and constants."""
    fields = check_fields(fields)
    layout.validate()
    if steps is not None and not _is_count(steps, 1):
        raise CrucibleError(f"steps must be a positive integer or None (open-ended), got {steps!r}")
    return fields, _check_constants(constants or {}, fields)


def create_run(store: RunStore, fields: Mapping[str, Field], *, steps: int | None, layout: Layout,
               attributes: Mapping[str, Any] | None = None,
               constants: Mapping[str, Any] | None = None,
               partitions: Mapping[str, Partition] | None = None, world_size: int = 1,
               claimed: bool = False):
    """Create the group, the arrays, constants and row indices, all durable; commit 0 steps.
    partitions, world_size: fields split among ranks; claimed: see RunStore.claim_new."""
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
        meta = {**spec.describe(), "time_chunk": time_chunk, **dtypes.encoding_attribute(spec.dtype)}
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
    written = [*fields, *constants, *(f"{ROWS_GROUP}/{n}" for n, spec in fields.items() if spec.row_indices is not None)]
    group.attrs.put({  # one write (attrs.update writes zarr.json once per key: readers would see halves)
        DIGESTS: {path: metadata_digest(group[path]) for path in written},
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
    """Open a run's group and metadata, refusing what is not a run of a known version or whose
    arrays contradict the run's record of them (check_array), before anything is read."""
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
        raise CrucibleError(f"{store.location}: cannot open {STORE_NAME}: {describe(e)}") from None
    if attrs.get("format") != FORMAT_NAME:
        raise CrucibleError(f"{store.location} is not a crucible-record run (no format marker)")
    version = attrs.get("format_version")
    if not _is_count(version, 1):
        raise CrucibleError(f"{store.location}: unreadable format version {version!r}")
    if version > FORMAT_VERSION:
        raise CrucibleError(
            f"{store.location} was written by a newer crucible-record (format {version}, this one reads "
            f"{FORMAT_VERSION}); upgrade crucible-record"
        )
    try:
        info = _info_v1(group, attrs) if version == 1 else _info_v2(group, attrs, store)
    except CrucibleError:
        raise
    except Exception as e:  # zarr's own errors on an array's metadata (malformed JSON, unknown codec...)
        raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}: {describe(e)}") from None
    for name in list(info.fields) + info.constants:
        array = _array(store, group, name)
        if version > 1:
            check_array(store, name, array, info, attrs)
        if name in info.fields:
            info.array_rows[name] = int(array.shape[0])
    return group, info


def _array(store: RunStore, group, path: str):
    """The array at `path` of the group, its metadata parsed by zarr (errors as CrucibleErrors)."""
    try:
        return group[path]
    except KeyError:
        raise CrucibleError(f"{store.location} is damaged: array {path} is missing") from None
    except Exception as e:
        raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/{path}/zarr.json: {describe(e)}") from None


def metadata_digest(array) -> str:
    """sha256 of an array's metadata as zarr reads it, without ``shape`` (open-ended arrays grow)."""
    meta = array.metadata.to_dict()
    meta.pop("shape", None)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_array(store: RunStore, path: str, array, info: RunInfo, attrs: Mapping[str, Any]) -> None:
    """The run's record of the field or constant at `path` (its metadata digest, dtype, shape,
    cadence, codecs) against what zarr reads: a mismatch would read wrong values silently."""
    where = f"{store.location} is damaged: {STORE_NAME}/{path}/zarr.json"
    digests = attrs.get(DIGESTS)
    if digests is not None:
        if not isinstance(digests, dict) or path not in digests:
            raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/zarr.json: {DIGESTS} has no entry for {path}")
        if metadata_digest(array) != digests[path]:
            raise CrucibleError(f"{where} was changed after the run was created (its metadata no longer matches "
                                f"the sha256 the run recorded); restore it from a copy")
    meta = array.metadata.to_dict()
    own = dict(array.attrs).get("crucible_record")
    if not isinstance(own, dict):
        raise CrucibleError(f"{where}: its attributes lack the crucible_record description")
    spec = info.fields.get(path)
    if spec is not None:
        dtype, shape = spec.dtype, tuple(array.shape[1:])
        recorded = {**spec.describe(), "time_chunk": own.get("time_chunk")}
        if {k: own.get(k) for k in recorded} != recorded:
            raise CrucibleError(f"{where}: its description {_short(own)} contradicts the group's {_short(spec.describe())}")
        tc, unit = own.get("time_chunk"), (array.shards or array.chunks)
        if isinstance(tc, bool) or not isinstance(tc, int) or tc != unit[0]:
            raise CrucibleError(f"{where}: time_chunk {tc!r} is not the array's block of {unit[0]} rows")
        if array.ndim != 1 + len(spec.stored_shape) or shape != spec.stored_shape:
            raise CrucibleError(f"{where}: shape {tuple(array.shape)} does not hold steps of {spec.stored_shape}")
        if info.steps is not None and array.shape[0] > spec.rows_at(info.steps):
            raise CrucibleError(f"{where}: {array.shape[0]} rows, more than the run's {info.steps} steps hold")
    else:
        try:
            dtype = dtypes.dtype_from_name(own.get("dtype"))
        except CrucibleError as e:
            raise CrucibleError(f"{where}: {e}") from None
        shape = tuple(array.shape)
        if own.get("constant") is not True or own.get("shape") != list(shape):
            raise CrucibleError(f"{where}: shape {shape} contradicts its description {_short(own)}")
        if array.chunks != tuple(max(1, s) for s in shape) or array.shards is not None:
            raise CrucibleError(f"{where}: a constant is stored in one chunk, not in chunks of {array.chunks}")
    if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise CrucibleError(f"{where}: shape {shape} is beyond any tensor this package records")
    stored = np.dtype(dtypes.stored_dtype(dtype))
    if meta.get("data_type") != stored.name or np.dtype(array.dtype) != stored:
        raise CrucibleError(f"{where}: data_type {meta.get('data_type')!r}, but {path} records "
                            f"{dtypes.dtype_name(dtype)} (stored as {stored.name})")
    if (own.get("encoding") is not None) != bool(dtypes.encoding_attribute(dtype)):
        raise CrucibleError(f"{where}: its encoding attribute does not fit dtype {dtypes.dtype_name(dtype)}")
    _check_codecs(where, meta.get("codecs"), array.ndim if spec is not None else 0)


def _check_codecs(where: str, codecs: Any, ndim: int) -> None:
    """Only codecs this package writes, bytes little-endian, a transpose only as the step-last order."""
    if not isinstance(codecs, (list, tuple)):
        raise CrucibleError(f"{where}: no codec list")
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else None
        config = codec.get("configuration") or {} if isinstance(codec, dict) else {}
        if name not in KNOWN_CODECS:
            raise CrucibleError(f"{where}: codec {name!r} is not one crucible-record writes")
        if name == "bytes" and config.get("endian", "little") != "little":
            raise CrucibleError(f"{where}: {config.get('endian')!r}-endian bytes; runs are little-endian")
        if name == "transpose" and list(config.get("order", ())) != [*range(1, ndim), 0]:
            raise CrucibleError(f"{where}: transpose order {config.get('order')!r} is not the step-last order "
                                f"{[*range(1, ndim), 0]}")
        if name == "sharding_indexed":
            # runs write the index last, checksummed; shardio reads no other (zarr, the fallback, would
            # read an inner chunk absent from another kind of index as fill, silently)
            index = [c.get("name") if isinstance(c, dict) else None for c in config.get("index_codecs") or ()]
            if config.get("index_location", "end") != "end" or index != ["bytes", "crc32c"]:
                raise CrucibleError(f"{where}: a shard index other than the checksummed one at the shard's end")
            _check_codecs(where, config.get("codecs"), ndim)
            _check_codecs(where, config.get("index_codecs"), 0)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _info_v2(group, attrs: dict, store: RunStore) -> RunInfo:
    where = f"{store.location} is damaged: {STORE_NAME}/zarr.json"
    described = attrs.get("fields")
    if not isinstance(described, dict) or not described:
        raise CrucibleError(f"{store.location} is damaged: no field descriptions")
    fields = {}
    for name, description in described.items():
        try:
            check_name(name)
            field_from_description(description, None)  # strict types first, before any array is read
        except CrucibleError as e:
            raise CrucibleError(f"{where}: field {name!r}: {e}") from None
        rows = None
        if description.get("rows") is not None:
            path = f"{ROWS_GROUP}/{name}"
            array = _array(store, group, path)
            if np.dtype(array.dtype) != np.int64 or tuple(array.shape) != (description["rows"],):
                raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/{path}/zarr.json: {array.dtype} "
                                    f"{tuple(array.shape)}, the field keeps {description['rows']} rows (int64)")
            if attrs.get(DIGESTS) is not None and metadata_digest(array) != dict(attrs[DIGESTS]).get(path):
                raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/{path}/zarr.json was changed after "
                                    f"the run was created; restore it from a copy")
            try:
                rows = np.asarray(array[...])
            except Exception as e:
                raise CrucibleError(f"{store.location} is damaged: row indices of {name}: {describe(e)}") from None
        try:
            fields[name] = field_from_description(description, rows)
        except CrucibleError as e:
            raise CrucibleError(f"{where}: field {name!r}: {e}") from None
    world_size = attrs.get("world_size", 1)
    if not _is_count(world_size, 1):
        raise CrucibleError(f"{store.location} is damaged: world_size {world_size!r}")
    constants = attrs.get("constants", [])
    if not isinstance(constants, list) or not all(isinstance(c, str) for c in constants):
        raise CrucibleError(f"{where}: constants {_short(constants)} is not a list of names")
    for name in constants:
        try:
            check_name(name)
        except CrucibleError as e:
            raise CrucibleError(f"{where}: {e}") from None
    steps = attrs.get("steps")
    if steps is not None and not _is_count(steps, 1):
        raise CrucibleError(f"{where}: steps {steps!r} is not a positive integer or null")
    user = attrs.get("attributes") or {}
    if not isinstance(user, dict):
        raise CrucibleError(f"{where}: attributes {_short(user)} is not an object")
    return RunInfo(version=2, fields=fields, constants=list(constants), attributes=dict(user),
                   layout=read_layout(attrs.get("layout", {}), where), steps=steps, world_size=world_size)


def read_layout(values: Any, where: str) -> Layout:
    """The group's layout attribute, strictly typed (it is what a resumed run's blocks follow)."""
    if not isinstance(values, dict):
        raise CrucibleError(f"{where}: layout {_short(values)} is not an object")
    try:
        layout = Layout.from_dict(values)
        tc, rc = layout.time_chunk, layout.row_chunk
        if (tc is not None and (isinstance(tc, bool) or not isinstance(tc, int))) or isinstance(rc, bool) \
                or not isinstance(rc, int) or not isinstance(layout.codec, str):
            raise CrucibleError("chunk sizes must be integers")
        layout.validate()
    except CrucibleError as e:
        raise CrucibleError(f"{where}: layout {_short(values)}: {e}") from None
    except Exception as e:
        raise CrucibleError(f"{where}: layout {_short(values)}: {describe(e)}") from None
    return layout


def _info_v1(group, attrs: dict) -> RunInfo:
    """Format 1 (crucible-record 0.1), from what is stored: a first axis named ``step`` is a field,
    ``step_minus_one`` one from step 1, anything else a constant; uint16 is bfloat16 bits, and the
    arrays' lengths (sized for the whole run) give its steps."""
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
        if not _is_count(steps, info.steps):
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


def read_commit(store: RunStore, group, info: RunInfo | None = None) -> dict[str, Any]:
    """The commit marker: ``steps`` = how many steps every field holds durably. With `info`, a marker
    beyond a field's array (it would read uninitialised rows) is refused (``verify --repair``)."""
    if info is not None and info.version == 1 or info is None and group.attrs.get("format_version") == 1:
        commit = group.attrs.get("commit", {})
        steps, epoch = (commit.get("steps", -1), commit.get("epoch", 0)) if isinstance(commit, dict) else (None, None)
        if not _is_count(steps, -1) or not _is_count(epoch, 0):
            raise CrucibleError(f"{store.location} is damaged: the commit attribute {_short(commit)} is malformed")
        commit = {"steps": steps + 1, "epoch": epoch}
    else:
        try:
            commit = store.read_json(COMMIT_KEY)
        except Exception as e:  # not JSON, not UTF-8
            raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/{COMMIT_KEY} is unreadable: {describe(e)} "
                                f"(`crucible-record verify --repair` cannot fix this: restore it, or write "
                                f'{{"steps": 0}} to start over)') from None
        if not isinstance(commit, dict) or not _is_count(commit.get("steps"), 0):
            raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/{COMMIT_KEY} is missing or malformed "
                                f"(its steps must be an integer >= 0, got {_short(commit)})")
    if info is not None:
        check_commit(store, group, info, commit["steps"])
    return commit


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_commit(store: RunStore, group, info: RunInfo, steps: int) -> None:
    """Refuse a marker past what the arrays hold: past a sized run's steps, or past a field's rows.
    An open-ended array read before the marker may have grown since: it is looked at again."""
    held = info.steps_held()
    if steps <= held:
        return
    if info.steps is None or steps <= info.steps:
        for name in info.fields:
            info.array_rows[name] = int(_array(store, group, name).shape[0])  # a live run grows
        held = info.steps_held()
        if steps <= held:
            return
    raise CrucibleError(f"{store.location} is damaged: {STORE_NAME}/{COMMIT_KEY} says {steps} steps are committed, "
                        f"but the arrays hold {held}; run `crucible-record verify --repair` to move it back")


def rank_key(rank: int) -> str:
    """The progress document of `rank` in a multi-rank run: {"session", "steps", "error"?, "closed"?}."""
    return f"{RANKS_PREFIX}/{int(rank)}.json"


def write_commit(store: RunStore, steps: int) -> None:
    """Move the marker: written atomically after the data it vouches for is durable."""
    store.write_marker({"steps": int(steps)})
