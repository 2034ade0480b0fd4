"""Whole time blocks read at the codec's own speed: one GET per shard file, decoded by shardio
straight into the result.

zarr-python reads a shard through its general pipeline, which decodes every inner chunk into a
fresh buffer, transposes it and copies it into the output (0.38x of the bare decompressor on a
Crucible-size block, 0.22x at GPT-2 size: benchmarks/bench_codec_path.py). Reads that take whole
blocks of steps (a scan, export, verify, a dask task) are the ones that need the speed; they go
through here. A read that touches a few inner chunks of each shard (one token's trajectory) stays
with zarr, which fetches only those chunks, or, for one row of the second axis (one token's
trajectory: ``W[:, tok]``), goes through read_one_row: per block, the shard's index and the one
inner chunk holding that row, fetched as byte ranges for every block at once (two rounds of
concurrent reads) and decoded by shardio (zarr spends ~2 ms a shard on its own bookkeeping
there: benchmarks/bench_token_layout.py).

Where shardio cannot match an array's layout (a field split among ranks keeps several files per
block; an unknown codec), the reason is logged once per array at INFO on the ``crucible_record``
logger (format.blocks.log_fallback; encode_block does the same for writes) and the caller reads through zarr: same
values, zarr's speed. A shard that *can* be decoded but is damaged is never handed to zarr
instead: it is a CrucibleError.
"""

from __future__ import annotations

import asyncio

import numpy as np

from .errors import CrucibleError, describe, missing_chunk_error
from .format.blocks import log_fallback, missing_blocks
from .shardio import (MAX_U64, ShardError, ShardLayout, decode_chunk, decode_shard_with, default_threads, parse_index,
                      shard_layout)
from .storage import open_store


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


def _layout_or_log(array) -> ShardLayout | None:
    layout, why = block_layout(array)
    if layout is None:
        log_fallback(array.path, "read", why)
    return layout


def whole_rows(array, start: int, stop: int) -> tuple:
    """The normalized selection of rows [start, stop) with every other axis whole."""
    return (slice(start, stop, 1),) + tuple(slice(0, n, 1) for n in array.shape[1:])


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
    """``array[selection]`` (orthogonal indexing; see wants_whole_blocks for what `selection` may
    be) decoded shard by shard, or None if shardio cannot decode this array's shards. A shard file
    that is absent or damaged raises a CrucibleError naming the field and its rows."""
    layout = _layout_or_log(array)
    if layout is None:
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


def _shard_key(array, block: int) -> str:
    """The store key of the one shard file holding time block `block`."""
    return f"{array.path}/{array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))}"


def _missing(name: str, first: int, last: int) -> DamagedBlock:
    return DamagedBlock(str(missing_chunk_error(name, first, last)), "chunk file missing")


def _undecodable(name: str, rows: str, error: ShardError) -> DamagedBlock:
    return DamagedBlock(f"cannot read {name} rows {rows}: {error}", f"ShardError: {error}")


def _decode_block(store, array, layout: ShardLayout, block: int, out: np.ndarray, name: str, threads: int) -> None:
    first = block * layout.shard_shape[0]
    rows = f"{first}-{first + len(out) - 1}"
    data = store.get_buffer(_shard_key(array, block))
    if data is None:
        raise _missing(name, first, first + len(out) - 1)
    try:
        decode_shard_with(layout, data, out, threads)
    except ShardError as e:
        raise _undecodable(name, rows, e) from None


def wants_one_row(selection: tuple, shape) -> bool:
    """A step-1 slice of steps, one index on the second axis, the other axes whole: ``W[a:b, tok]``."""
    if len(selection) < 2 or not _is_step_range(selection[0]):
        return False
    return isinstance(selection[1], int) and all(_is_whole(k, n) for k, n in zip(selection[2:], shape[2:]))


def read_one_row(store, array, selection: tuple, name: str) -> np.ndarray | None:
    """``array[rows, k]`` (see wants_one_row) read inner chunk by inner chunk, or None where the
    layout is not one inner chunk per block along every axis but the second (zarr reads it then)."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    layout = _layout_or_log(array)
    if layout is None or not layout.sharded or any(g != 1 for i, g in enumerate(layout.grid) if i != 1):
        return None
    rows, k = selection[0], selection[1]
    unit, per_chunk = layout.shard_shape[0], layout.chunk_shape[1]
    coords = (0, k // per_chunk) + (0,) * (array.ndim - 2)
    blocks = list(range(rows.start // unit, (rows.stop - 1) // unit + 1))
    keys = [_shard_key(array, b) for b in blocks]
    prototype = default_buffer_prototype()

    async def fetch(requests):
        return await asyncio.gather(*(store.store.get(key, prototype, byte_range=req) for key, req in requests))

    n = layout.index_nbytes
    where = RangeByteRequest(0, n) if layout.index_at_start else SuffixByteRequest(n)
    indexes = sync(fetch([(key, where) for key in keys]))
    spans = []
    for block, buf in zip(blocks, indexes):
        rows_of_block = f"{block * unit}-{block * unit + unit - 1}"
        if buf is None:
            raise _missing(name, block * unit, block * unit + unit - 1)
        try:
            offset, nbytes = (int(x) for x in parse_index(layout, buf.as_numpy_array())[coords])
        except ShardError as e:
            raise _undecodable(name, rows_of_block, e) from None
        absent = offset == int(MAX_U64) and nbytes == int(MAX_U64)  # a fill-valued inner chunk
        spans.append(None if absent else (offset, nbytes))
    wanted = [(key, RangeByteRequest(span[0], span[0] + span[1])) for key, span in zip(keys, spans) if span]
    payloads = iter(sync(fetch(wanted)))
    out = np.empty((rows.stop - rows.start,) + tuple(array.shape[2:]), dtype=layout.dtype)
    for block, span in zip(blocks, spans):
        first = block * unit
        lo, hi = max(first, rows.start), min(first + unit, rows.stop)
        dest = out[lo - rows.start:hi - rows.start]
        if span is None:  # an inner chunk left out of the index reads as the fill value, as in zarr
            dest[...] = layout.fill
            continue
        payload = next(payloads)
        try:
            if payload is None or len(payload) != span[1]:
                raise ShardError(f"inner chunk {coords} is truncated")
            stored = decode_chunk(payload.as_numpy_array(), layout, coords)
        except ShardError as e:
            raise _undecodable(name, f"{first}-{first + unit - 1}", e) from None
        chunk = stored.transpose(layout.inverse) if layout.perm else stored  # back to the array's axis order
        dest[...] = chunk[lo - first:hi - first, k % per_chunk]
    return out


def read_rows(location: str, name: str, start: int, stop: int) -> np.ndarray:
    """Stored rows [start, stop) of one field, opened afresh from `location` (for dask tasks:
    only the location and the row range travel; the commit marker is not re-read). Here, not in
    reader: it needs no Run, only whole blocks."""
    import zarr

    store = open_store(location)
    array = zarr.open_array(store.store, path=name, mode="r", zarr_format=3)
    if stop > start:
        data = read_blocks(store, array, whole_rows(array, start, stop), name)
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
