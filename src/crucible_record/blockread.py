"""Reads of a run's fields by shardio, every shard file read as one version of it.

Whole time blocks (a scan, export, verify, a dask task) are one GET per shard decoded straight into
the result (read_blocks): zarr's general pipeline runs at 0.22-0.38x of the bare decompressor
(benchmarks/bench_codec_path.py). Any other selection (``W[:, tok]``, strided steps, a list) reads
per shard its index and only the inner chunks it touches (read_selection), for every shard at once
(zarr spends ~2 ms a shard on bookkeeping: benchmarks/bench_token_layout.py).

A writer replaces a partial block's shard whole at every commit; every read here sees one version
of each file (fetch_shards), so a live reader never pairs one version's index with another's bytes.
Where shardio cannot decode an array (an unknown codec) the reason is logged once (log_fallback)
and the caller reads through zarr; a decodable but damaged shard is a CrucibleError, never zarr's.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CrucibleError, describe, missing_chunk_error
from .format.blocks import log_fallback, missing_blocks
from .shardio import (ShardError, ShardLayout, decode_chunk, decode_shard_with, default_threads, index_spans,
                      index_start, shard_layout, shard_spans)
from .storage import open_file_beneath, open_store, read_fd


class DamagedBlock(CrucibleError):
    """A shard file that is absent or fails to decode; `detail` says how, without the rows."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def block_layout(array) -> tuple[ShardLayout | None, str]:
    """(the layout shardio decodes every time block of `array` with, or None; why not)."""
    if array.ndim == 0:
        return None, "a 0-d array has no time blocks"
    unit = array.shards or array.chunks
    if any(u < s for s, u in zip(array.shape[1:], unit[1:])):
        return None, "a time block is split over several files (a field split among ranks)"
    try:
        return shard_layout(array), ""
    except NotImplementedError as e:
        return None, str(e)


def _is_step_range(key) -> bool:
    return isinstance(key, slice) and key.step == 1 and key.stop > key.start


def _is_whole(key, size: int) -> bool:
    return isinstance(key, slice) and (key.start, key.stop, key.step) == (0, size, 1)


def wants_whole_blocks(selection: tuple, shape) -> bool:
    """A normalized selection that reads every inner chunk of the blocks it touches: a step-1 slice
    of rows, and on every other axis the whole axis or one list/mask (its values: numpy arrays)."""
    rest = selection[1:]
    if not _is_step_range(selection[0]):
        return False
    lists = [isinstance(k, np.ndarray) for k in rest]
    return all(_is_whole(k, n) or li for k, n, li in zip(rest, shape[1:], lists)) and sum(lists) <= 1


def read_blocks(store, array, selection: tuple, name: str, threads: int | None = None) -> np.ndarray | None:
    """``array[selection]`` (see wants_whole_blocks) decoded shard by shard, or None if shardio cannot
    decode this array; an absent or damaged shard is a CrucibleError naming the field and rows."""
    layout, why = block_layout(array)
    if layout is None:
        log_fallback(array.path, "read", why)
        return None
    threads = default_threads() if threads is None else threads
    rows, rest = selection[0], selection[1:]
    unit = layout.shard_shape[0]
    whole_rest = not any(isinstance(k, np.ndarray) for k in rest)
    out = np.empty((rows.stop - rows.start,) + tuple(len(k) if isinstance(k, np.ndarray) else n
                                                     for k, n in zip(rest, array.shape[1:])), dtype=layout.dtype)
    for block in range(rows.start // unit, (rows.stop - 1) // unit + 1):
        first, end = block * unit, min((block + 1) * unit, array.shape[0])
        lo, hi = max(first, rows.start), min(end, rows.stop)
        if whole_rest and (lo, hi) == (first, end):  # straight into the result
            _decode_block(store, array, layout, block, out[lo - rows.start:hi - rows.start], name, threads)
            continue
        scratch = np.empty((end - first,) + tuple(array.shape[1:]), dtype=layout.dtype)
        _decode_block(store, array, layout, block, scratch, name, threads)
        # one list or mask, the other axes whole: numpy's indexing is the orthogonal one here
        out[lo - rows.start:hi - rows.start] = scratch[(slice(lo - first, hi - first),) + rest]
    return out


def _missing(name: str, first: int, last: int) -> DamagedBlock:
    return DamagedBlock(str(missing_chunk_error(name, first, last)), "chunk file missing")


def _undecodable(name: str, first: int, last: int, error: ShardError) -> DamagedBlock:
    return DamagedBlock(f"cannot read {name} rows {first}-{last}: {error}", f"ShardError: {error}")


def _decode_block(store, array, layout: ShardLayout, block: int, out: np.ndarray, name: str, threads: int) -> None:
    first = block * layout.shard_shape[0]
    last = first + len(out) - 1
    data = store.get_buffer(f"{array.path}/{array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))}")
    if data is None:
        raise _missing(name, first, last)
    try:
        decode_shard_with(layout, data, out, threads, complete=True)
    except ShardError as e:
        raise _undecodable(name, first, last, e) from None


def wants_one_row(selection: tuple, shape) -> bool:
    """A step-1 slice of steps, one index on the second axis, the other axes whole: ``W[a:b, tok]``."""
    if len(selection) < 2 or not _is_step_range(selection[0]):
        return False
    return isinstance(selection[1], int) and all(_is_whole(k, n) for k, n in zip(selection[2:], shape[2:]))


def read_selection(store, array, selection: tuple, name: str) -> np.ndarray | None:
    """``array[selection]`` (ints, slices of any step, at most one list; orthogonal) read per shard
    file as its index and the inner chunks touched (the whole file when it touches them all), one
    version of each file (fetch_shards); None where shardio cannot decode the array (zarr then)."""
    if array.ndim == 0:
        return None
    try:
        layout = shard_layout(array)
    except NotImplementedError as e:
        log_fallback(array.path, "read", str(e))
        return None
    axes = [_axis_indices(k, n) for k, n in zip(selection, array.shape)]
    shape = tuple(len(ix) for ix, _ in axes)
    out = np.empty(shape, dtype=layout.dtype)
    final = tuple(n for n, (_, dropped) in zip(shape, axes) if not dropped)
    if out.size == 0:
        return out.reshape(final)
    shards: dict[tuple[int, ...], list] = {}  # shard coords -> [(inner coords, out selection, chunk selection)]
    for parts in itertools.product(*(_by_chunk(ix, n) for (ix, _), n in zip(axes, layout.chunk_shape))):
        shard, inner = zip(*(divmod(p[0], g) for p, g in zip(parts, layout.grid)))
        shards.setdefault(shard, []).append((inner, _orthogonal([p[1] for p in parts]),
                                             _orthogonal([p[2] for p in parts])))
    jobs = []
    for shard, pieces in shards.items():
        extent = tuple(min(s, n - c * s) for c, s, n in zip(shard, layout.shard_shape, array.shape))
        wanted = None if len(pieces) == int(np.prod(layout.grid)) or not layout.sharded else [p[0] for p in pieces]
        jobs.append((f"{array.path}/{array.metadata.encode_chunk_key(shard)}", wanted, extent))
    results = fetch_shards(store, layout, jobs)
    for (shard, pieces), (_, _, extent), result in zip(shards.items(), jobs, results):
        first = shard[0] * layout.shard_shape[0]
        last = first + extent[0] - 1
        if result is None:
            raise _missing(name, first, last)
        try:
            if isinstance(result, ShardError):
                raise result
            for inner, out_sel, chunk_sel in pieces:
                stored = decode_chunk(result[inner], layout, inner)
                chunk = stored.transpose(layout.inverse) if layout.perm else stored  # the array's axis order
                out[out_sel] = chunk[chunk_sel]
        except ShardError as e:
            raise _undecodable(name, first, last, e) from None
    return out.reshape(final)


read_one_row = read_selection  # ``array[rows, k]`` (wants_one_row): per block the index and one inner chunk


def read_whole_rows(store, array, name: str, start: int, stop: int) -> np.ndarray | None:
    """Rows [start, stop) by shardio: whole blocks, else per file (a block split among ranks' files);
    None where shardio cannot decode the array (zarr then)."""
    selection = (slice(start, stop, 1),) + tuple(slice(0, n, 1) for n in array.shape[1:])
    data = read_blocks(store, array, selection, name)
    return read_selection(store, array, selection, name) if data is None else data


def _axis_indices(key, size: int) -> tuple[np.ndarray, bool]:
    """One axis of a normalized selection as the indices it takes, and whether it drops the axis."""
    if isinstance(key, int):
        return np.array([key], dtype=np.int64), True
    if isinstance(key, slice):
        return np.arange(key.start, key.stop, key.step, dtype=np.int64), False
    return np.asarray(key, dtype=np.int64), False


def _by_chunk(indices: np.ndarray, chunk: int) -> list[tuple[int, Any, Any]]:
    """Indices of one axis grouped by inner chunk: (chunk number, positions in the output,
    positions in the chunk), positions as slices where they are evenly spaced."""
    q = indices // chunk
    order = np.argsort(q, kind="stable")
    groups = []
    for pos in np.split(order, np.flatnonzero(np.diff(q[order])) + 1):
        number = int(q[pos[0]])
        groups.append((number, _as_slice(pos), _as_slice(indices[pos] - number * chunk)))
    return groups


def _as_slice(a: np.ndarray):
    """Evenly spaced increasing indices as a slice (a view, not a gather); else the array."""
    step = int(a[1] - a[0]) if len(a) > 1 else 1
    if step > 0 and np.all(np.diff(a) == step):
        return slice(int(a[0]), int(a[-1]) + 1, step)
    return a


def _orthogonal(keys: list) -> tuple:
    """Per-axis keys as one numpy index that selects orthogonally (np.ix_ when two are arrays)."""
    if sum(isinstance(k, np.ndarray) for k in keys) <= 1:
        return tuple(keys)
    return np.ix_(*(np.arange(k.start, k.stop, k.step) if isinstance(k, slice) else k for k in keys))


# ----- one version of a shard file --------------------------------------------------------------
# Index and chunks from one version: one whole read; on a disk one open descriptor (a rename does not
# change what it reads); on an object store ranged GETs If-Match the index GET's ETag, retried from
# the index when it changed, and read whole after RANGED_TRIES changes.
RANGED_TRIES = 3
CONCURRENT_FILES = 16  # shard files read at once (object stores: requests in flight)


def fetch_shards(store, layout: ShardLayout, jobs: list) -> list:
    """Per job (key, wanted inner chunks or None for all, extent): {inner coords: payload} from one
    version of the file, None if absent, or its index's ShardError; every request is awaited."""
    from zarr.core.sync import sync

    async def run():
        limit = asyncio.Semaphore(CONCURRENT_FILES)

        async def one(job):
            async with limit:
                return await _fetch_one(store, layout, *job)

        results = await asyncio.gather(*(one(job) for job in jobs), return_exceptions=True)
        for result in results:  # anything but a ShardError is not about the data: raise the first
            if isinstance(result, BaseException) and not isinstance(result, ShardError):
                raise result
        return results

    return sync(run())


async def _fetch_one(store, layout: ShardLayout, key: str, wanted, extent):
    import zarr

    inner = store.store
    if wanted is not None and isinstance(inner, zarr.storage.LocalStore):
        return _local_chunks(inner, key, layout, wanted, extent)
    if wanted is not None and isinstance(inner, zarr.storage.ObjectStore):
        for _ in range(RANGED_TRIES):
            result = await _object_chunks(inner.store, key, layout, wanted, extent)
            if result is not _CHANGED:
                return result
    return await _whole(inner, key, layout, wanted, extent)  # any other store: one read is one version


_CHANGED = object()


async def _whole(inner, key: str, layout: ShardLayout, wanted, extent):
    from zarr.core.buffer import default_buffer_prototype

    data = await inner.get(key, default_buffer_prototype())
    if data is None:
        return None
    buf = data.as_numpy_array()
    try:
        spans = shard_spans(layout, buf, extent)
    except ShardError as e:
        return e
    coords = spans if wanted is None else wanted
    return {c: buf[spans[c][0]:spans[c][0] + spans[c][1]] for c in coords}


def _local_chunks(inner, key: str, layout: ShardLayout, wanted, extent):
    """The index and the wanted inner chunks of a local shard file, read from one descriptor, opened
    as every store read is (no symlink beneath the run, a regular file within its array's cap)."""
    opened = open_file_beneath(Path(inner.root), key, inner.cap(key))
    if opened is None:
        return None
    fd, size = opened
    try:
        spans = index_spans(layout, _pread(fd, layout.index_nbytes, index_start(layout, size)), size, extent)
        return {c: _pread(fd, spans[c][1], spans[c][0]) for c in wanted}
    except ShardError as e:
        return e
    finally:
        os.close(fd)


def _pread(fd: int, n: int, offset: int) -> np.ndarray:
    return np.frombuffer(read_fd(fd, offset, offset + n), dtype=np.uint8)


async def _object_chunks(objects, key: str, layout: ShardLayout, wanted, extent):
    """The index and the wanted inner chunks of an object, every GET pinned to the first one's ETag;
    _CHANGED if the object was replaced in between."""
    import obstore
    from obstore.exceptions import NotFoundError, PreconditionError

    try:
        first = await obstore.get_async(objects, key, options={"range": {"suffix": layout.index_nbytes}})
        raw = np.frombuffer(await first.bytes_async(), dtype=np.uint8)
    except (FileNotFoundError, NotFoundError):
        return None
    etag, size = first.meta.get("e_tag"), int(first.meta["size"])
    if etag is None:  # a store without ETags: one whole GET instead
        return _CHANGED
    try:
        spans = index_spans(layout, raw, size, extent)
    except ShardError as e:
        return e

    async def chunk(c):
        offset, nbytes = spans[c]
        got = await obstore.get_async(objects, key, options={"range": (offset, offset + nbytes), "if_match": etag})
        return np.frombuffer(await got.bytes_async(), dtype=np.uint8)

    payloads = await asyncio.gather(*(chunk(c) for c in wanted), return_exceptions=True)
    for payload in payloads:
        if isinstance(payload, (PreconditionError, FileNotFoundError, NotFoundError)):
            return _CHANGED
        if isinstance(payload, BaseException):
            raise payload
    return dict(zip(wanted, payloads))


def read_rows(location: str, name: str, start: int, stop: int) -> np.ndarray:
    """Stored rows [start, stop) of one field, opened afresh from `location` (a dask task: only the
    location and the rows travel; the commit marker is not re-read)."""
    import zarr

    store = open_store(location)
    array = zarr.open_array(store.store, path=name, mode="r", zarr_format=3)
    if stop > start:
        data = read_whole_rows(store, array, name, start, stop)
        if data is not None:
            return data
    missing = missing_blocks(store, array, name, range(start, stop))
    if missing:
        unit = (array.shards or array.chunks)[0]
        raise missing_chunk_error(name, missing[0] * unit, missing[0] * unit + unit - 1)
    try:
        return np.asarray(array[start:stop])
    except Exception as e:
        raise CrucibleError(f"cannot read {name}[{start}:{stop}]: {describe(e)}") from e
