"""Whole shards encoded and decoded at the codec's own speed, byte for byte what zarr-python writes.

zarr-python copies every byte five or six times through its codec pipeline. For the recorder's one
write, a whole shard, this module produces the same bytes with one staging copy per inner chunk
(the transpose), numcodecs' compressor straight from it, a crc32c and one join, inner chunks in a
thread pool; the read side decodes a whole shard into a preallocated buffer, checksums verified.

Matched from the array's metadata: the layouts the codec presets write; anything else raises
NotImplementedError and the caller uses zarr. That is ``sharding_indexed`` (Morton order, index
``bytes`` + ``crc32c`` at the end) or none; inner codecs, in this order: the step-last
``transpose``, numcodecs ``delta``, native-endian ``bytes``, ``zstd`` or ``blosc``, ``crc32c``
(each but ``bytes`` optional). Edge shards and ``write_empty_chunks`` off behave as zarr's.

Refused on purpose: numcodecs' Delta after a transpose that leaves the chunk Fortran-contiguous
(zarr flattens it in Fortran order and decodes in C order: it cannot read back what it wrote).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ShardError", "ShardLayout", "encode_shard", "decode_shard", "decode_shard_with",
           "shard_layout", "default_threads", "index_start", "index_spans", "shard_spans", "decode_chunk"]

MAX_U64 = np.uint64(2**64 - 1)
_TORCH_MIN = 60 * 60  # torch's blocked transpose copy needs at least this many elements
# How inner chunks are transposed to/from step-last (same bytes either way): "auto" uses torch's
# blocked copy to encode and numpy tiles to decode chunks of >= _BLOCKED_MIN_STEPS steps (1.2-1.8x
# and 1.5x faster at 64 steps), numpy's plain copy for shorter ones (2-6x faster at <= 32 steps);
# "torch" / "numpy" force one (benchmarks/bench_codec_path.py "transposes").
STAGING = "auto"
_BLOCKED_MIN_STEPS = 48
_DECODE_TILE = 256


class ShardError(ValueError):
    """A shard that cannot be decoded: bad checksum, truncated or inconsistent index, bad sizes."""


def default_threads() -> int:
    """Threads for one shard: the cores this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ----- layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """Everything needed to encode/decode one shard of an array, parsed from its metadata."""

    sharded: bool
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    grid: tuple[int, ...]  # inner chunks per shard, per axis
    data_order: tuple[tuple[int, ...], ...]  # inner chunks in the order their bytes are laid out
    perm: tuple[int, ...] | None  # the step-last transpose, a 2-D (T, X) one (None: none)
    delta: bool
    compressor: Any  # the numcodecs Zstd or Blosc, or None
    crc: bool  # a crc32c after each inner chunk
    dtype: np.dtype
    fill: Any
    write_empty: bool

    @functools.cached_property
    def inverse(self) -> tuple[int, ...] | None:
        return None if self.perm is None else tuple(int(i) for i in np.argsort(self.perm))

    @functools.cached_property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of an inner chunk after the transpose (what the bytes hold, in C order)."""
        return tuple(self.chunk_shape[i] for i in self.perm) if self.perm else self.chunk_shape

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def index_nbytes(self) -> int:
        return 16 * int(np.prod(self.grid, dtype=np.int64)) + 4


def shard_layout(array) -> ShardLayout:
    """The shard layout of a zarr v3 array (NotImplementedError for one this module cannot match)."""
    metadata = array.metadata
    if getattr(metadata, "zarr_format", None) != 3:
        raise NotImplementedError("only Zarr v3 arrays")
    grid = getattr(metadata.chunk_grid, "chunk_shape", None)
    if grid is None:
        raise NotImplementedError("only regular chunk grids")
    codecs = json.dumps([c.to_dict() for c in metadata.codecs], sort_keys=True, default=list)
    dtype = np.dtype(metadata.data_type.to_native_dtype())
    fill = np.asarray(metadata.fill_value, dtype=dtype)
    config = array.config
    return _layout(codecs, tuple(int(s) for s in grid), dtype.str, fill.tobytes(),
                   bool(config.write_empty_chunks), str(config.order))


@functools.lru_cache(maxsize=256)
def _layout(codecs_json: str, shard_shape: tuple[int, ...], dtype_str: str, fill_bytes: bytes,
            write_empty: bool, order: str) -> ShardLayout:
    from zarr.core.indexing import morton_order_iter

    codecs = json.loads(codecs_json)
    dtype = np.dtype(dtype_str)
    fill = np.frombuffer(fill_bytes, dtype=dtype)[0]
    sharded = len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
    chunk_shape, inner = shard_shape, codecs
    if sharded:
        conf = codecs[0]["configuration"]
        chunk_shape = tuple(int(s) for s in conf["chunk_shape"])
        inner = conf["codecs"]
        index = conf["index_codecs"]
        index_endian = (index[0].get("configuration") or {}).get("endian", "little")
        if ([c["name"] for c in index] != ["bytes", "crc32c"] or index_endian != "little"
                or conf.get("index_location", "end") != "end"):
            raise NotImplementedError(f"shard index codecs {index} at the {conf.get('index_location')}")
        if len(chunk_shape) != len(shard_shape) or any(s % c for s, c in zip(shard_shape, chunk_shape)):
            raise NotImplementedError("inner chunks do not tile the shard")
    grid = tuple(s // c for s, c in zip(shard_shape, chunk_shape))

    rest = list(inner)

    def take(*names: str) -> dict | None:
        """The next codec's configuration (consumed) if it is one of `names`, else None."""
        if rest and rest[0]["name"] in names:
            return rest.pop(0).get("configuration") or {}
        return None

    transpose, delta, serializer = take("transpose"), take("numcodecs.delta"), take("bytes")
    zstd = take("zstd")
    blosc = take("blosc") if zstd is None else None
    crc = take("crc32c") is not None
    if serializer is None or rest:
        raise NotImplementedError(f"codecs {[c['name'] for c in inner]}")
    perm = tuple(int(i) for i in transpose["order"]) if transpose is not None else None
    if perm == tuple(range(len(chunk_shape))):
        perm = None
    if perm not in (None, tuple(range(1, len(chunk_shape))) + (0,)):
        raise NotImplementedError(f"transpose order {perm}, not the step-last one")
    if delta is not None and {np.dtype(delta["dtype"]), np.dtype(delta.get("astype", delta["dtype"]))} != {dtype}:
        raise NotImplementedError(f"delta {delta} on {dtype}")
    endian = serializer.get("endian")
    if endian not in (None, sys.byteorder) and dtype.itemsize > 1:
        raise NotImplementedError(f"bytes endian {endian!r}")
    compressor = None
    if zstd is not None:
        from numcodecs import Zstd

        compressor = Zstd(level=int(zstd.get("level", 0)), checksum=bool(zstd.get("checksum", False)))
    elif blosc is not None:
        import numcodecs.blosc
        from numcodecs import Blosc

        numcodecs.blosc.use_threads = False  # as zarr sets it; threads come from our pool
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc["shuffle"]]
        compressor = Blosc(cname=blosc["cname"], clevel=int(blosc["clevel"]), shuffle=shuffle,
                           blocksize=int(blosc.get("blocksize", 0)),
                           typesize=int(blosc.get("typesize", dtype.itemsize)))
    if delta is not None:
        # zarr hands Delta the transposed view of a chunk laid out in `order`; numcodecs flattens
        # it with order='A' and zarr decodes in C order: refuse when those differ.
        probe = np.empty(chunk_shape, dtype=dtype, order="F" if order == "F" else "C")
        probe = probe.transpose(perm) if perm else probe
        if probe.flags.f_contiguous and not probe.flags.c_contiguous:
            raise NotImplementedError(
                "numcodecs Delta after a transpose that leaves the chunk Fortran-ordered: zarr-python "
                "flattens it in Fortran order and decodes in C order (it does not read back what it wrote)")
    # zarr lays a shard's inner chunks out in its Morton order (C order for the presets' shards)
    data_order = tuple(tuple(int(i) for i in c) for c in morton_order_iter(grid))
    return ShardLayout(sharded, shard_shape, chunk_shape, grid, data_order, perm, delta is not None, compressor,
                       crc, dtype, fill, write_empty)


# ----- threads and scratch buffers ------------------------------------------------------------
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_local = threading.local()


def _forget_pools() -> None:  # a forked child has none of the parent's threads
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _map(fn, items: list, threads: int) -> list:
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="crucible-shardio")
    return list(pool.map(fn, items))


def _scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable buffer (no allocation, no page faults per chunk)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (name, shape, dtype.str)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) > 16:
            buffers.clear()
        buf = buffers[key] = np.empty(shape, dtype=dtype)
    return buf


_INT_OF_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _as_torch(a: np.ndarray):
    import torch

    return torch.from_numpy(a.view(_INT_OF_SIZE[a.dtype.itemsize]))


def _rows_2d(a: np.ndarray) -> np.ndarray | None:
    """`a` (T, *rest) as a (T, X) view without copying, or None."""
    view = a.view()
    try:
        view.shape = (a.shape[0], -1)
    except AttributeError:
        return None
    return view


def _use_torch(layout: ShardLayout, size: int, encode: bool) -> bool:
    if STAGING == "numpy" or layout.perm is None or size < _TORCH_MIN or layout.dtype.itemsize not in _INT_OF_SIZE:
        return False
    return STAGING == "torch" or (encode and layout.chunk_shape[0] >= _BLOCKED_MIN_STEPS)


def _to_step_last(chunk: np.ndarray, layout: ShardLayout) -> np.ndarray:
    """The chunk laid out as its stored (transposed) C-ordered array; a view when it already is
    (a chunk staged step-last by the caller)."""
    moved = chunk if layout.perm is None else chunk.transpose(layout.perm)
    if moved.flags.c_contiguous:
        return moved
    out = _scratch("stage", layout.stored_shape, layout.dtype)
    rows = _rows_2d(chunk) if _use_torch(layout, chunk.size, True) else None
    if rows is None:
        np.copyto(out, moved)
        return out
    # gather the rows contiguous, then torch's cache-blocked 2-D transpose copy (see STAGING)
    if not rows.flags.c_contiguous:
        tmp = _scratch("rows", rows.shape, layout.dtype)
        np.copyto(tmp, rows)
        rows = tmp
    _as_torch(out.reshape(rows.shape[1], rows.shape[0])).copy_(_as_torch(rows).t())
    return out


def _from_step_last(stored: np.ndarray, dest: np.ndarray, layout: ShardLayout) -> None:
    """Copy a decoded (stored-order, C-contiguous) chunk into `dest` (a region of the output)."""
    full = dest.shape == layout.chunk_shape
    rows = _rows_2d(dest) if full and layout.perm is not None else None
    if rows is not None and _use_torch(layout, stored.size, False):
        target = rows if rows.flags.c_contiguous else _scratch("rows", rows.shape, layout.dtype)
        _as_torch(target).copy_(_as_torch(stored.reshape(rows.shape[1], rows.shape[0])).t())
        if target is not rows:
            np.copyto(rows, target)
        return
    if rows is not None and STAGING == "auto" and layout.chunk_shape[0] >= _BLOCKED_MIN_STEPS:
        flat = stored.reshape(rows.shape[1], rows.shape[0])  # tiles of the (T, X) transpose that stay in L1
        for c in range(0, flat.shape[0], _DECODE_TILE):
            np.copyto(rows[:, c:c + _DECODE_TILE], flat[c:c + _DECODE_TILE].T)
        return
    chunk = stored if layout.perm is None else stored.transpose(layout.inverse)
    dest[...] = chunk if full else chunk[tuple(slice(0, n) for n in dest.shape)]


def _crc32c(data) -> bytes:
    import google_crc32c

    return int(google_crc32c.value(data)).to_bytes(4, "little")


def _is_fill(chunk: np.ndarray, fill) -> bool:
    """zarr's NDBuffer.all_equal: NaN equals NaN; a float 0.0 fill is compared bit for bit."""
    if chunk.dtype.kind in "fc" and fill == 0:
        void = f"V{chunk.dtype.itemsize}"
        bits = np.asarray(fill, chunk.dtype).view(void)
        return bool(np.array_equal(chunk.view(void), np.broadcast_to(bits, chunk.shape)))
    return bool(np.array_equal(chunk, np.broadcast_to(fill, chunk.shape), equal_nan=chunk.dtype.kind in "fc"))


def _delta(flat: np.ndarray, out: np.ndarray) -> np.ndarray:
    """numcodecs' Delta encoding of `flat` into `out`."""
    out[:1] = flat[:1]
    np.subtract(flat[1:], flat[:-1], out=out[1:])
    return out


# ----- encode --------------------------------------------------------------------------------
def encode_shard(array, block: np.ndarray, threads: int = 1) -> bytes | None:
    """The bytes zarr-python stores for one shard of `array` holding `block` (None: zarr deletes it).

    `block` may be smaller than the shard on any axis (the array's end): the rest is fill, as zarr
    writes it into an empty store. A block staged step-last is compressed without a staging copy.
    NotImplementedError for a layout this module does not reproduce (use zarr then).
    """
    block = np.asarray(block)
    layout = _fitting_layout(array, block, "block")
    cs = layout.chunk_shape

    def chunk_of(coords) -> np.ndarray | None:
        r = _region(coords, cs, block.shape)
        if r is None:
            return None
        view = block[r]
        if view.shape != cs:  # an edge chunk: the rest is fill
            padded = np.full(cs, layout.fill, dtype=layout.dtype)
            padded[tuple(slice(0, n) for n in view.shape)] = view
            view = padded
        if not layout.write_empty and _is_fill(view, layout.fill):
            return None
        return view

    if layout.compressor is None:
        return _encode_fixed(layout, chunk_of, threads)

    def encode_one(coords) -> list | None:
        chunk = chunk_of(coords)
        if chunk is None:
            return None
        data = _to_step_last(chunk, layout).reshape(-1)
        if layout.delta:
            data = _delta(data, _scratch("delta", data.shape, layout.dtype))
        payload = layout.compressor.encode(data.view(np.uint8))
        return [payload, _crc32c(payload)] if layout.crc else [payload]

    parts = _map(encode_one, list(layout.data_order), threads)
    if not layout.sharded:
        return None if parts[0] is None else b"".join(parts[0])
    spans, offset, pieces = {}, 0, []
    for coords, chunk_parts in zip(layout.data_order, parts):
        if chunk_parts is not None:
            n = sum(len(p) for p in chunk_parts)
            spans[coords] = (offset, n)
            offset += n
            pieces.extend(chunk_parts)
    return b"".join([*pieces, _index_bytes(layout, spans)]) if pieces else None


def _index_bytes(layout: ShardLayout, spans: dict) -> bytes:
    """A shard index holding `spans` (inner chunk coords -> (offset, nbytes)), its checksum appended."""
    index = np.full(layout.grid + (2,), MAX_U64, dtype="<u8")
    for coords, span in spans.items():
        index[coords] = span
    return index.tobytes() + _crc32c(index.tobytes())


def _encode_fixed(layout: ShardLayout, chunk_of, threads: int) -> bytes | None:
    """No compressor: every chunk is staged straight into its place in the output buffer."""
    size = layout.chunk_nbytes + (4 if layout.crc else 0)
    chunks = [chunk_of(coords) for coords in layout.data_order]
    present = [i for i, c in enumerate(chunks) if c is not None]
    if not present:
        return None
    out = np.empty(size * len(present) + (layout.index_nbytes if layout.sharded else 0), dtype=np.uint8)

    def place(k: int) -> None:
        start, end = k * size, k * size + layout.chunk_nbytes
        target = out[start:end].view(layout.dtype).reshape(layout.stored_shape)
        staged = _to_step_last(chunks[present[k]], layout)
        if layout.delta:
            _delta(staged.reshape(-1), target.reshape(-1))
        else:
            np.copyto(target, staged)
        if layout.crc:
            out[end:end + 4] = np.frombuffer(_crc32c(out[start:end]), dtype=np.uint8)

    _map(place, list(range(len(present))), threads)
    if layout.sharded:
        spans = {layout.data_order[i]: (k * size, size) for k, i in enumerate(present)}
        out[size * len(present):] = np.frombuffer(_index_bytes(layout, spans), dtype=np.uint8)
    return out.tobytes()


# ----- decode --------------------------------------------------------------------------------
def decode_shard(array, data, out: np.ndarray, threads: int = 1) -> np.ndarray:
    """Decode one shard's bytes into `out` (the shard shape or its leading part) and return it;
    checksums verified (ShardError); absent inner chunks read as the fill value, as in zarr."""
    return decode_shard_with(_fitting_layout(array, out, "out"), data, out, threads)


def _fitting_layout(array, a: np.ndarray, what: str) -> ShardLayout:
    """The array's layout, after checking that `a` (a block or an output) fits one of its shards."""
    layout = shard_layout(array)
    if a.dtype != layout.dtype:
        raise ValueError(f"{what} dtype {a.dtype} is not the array's {layout.dtype}")
    if a.ndim != len(layout.shard_shape) or any(n > s for n, s in zip(a.shape, layout.shard_shape)):
        raise ValueError(f"{what} of shape {a.shape} does not fit the shard shape {layout.shard_shape}")
    return layout


def decode_shard_with(layout: ShardLayout, data, out: np.ndarray, threads: int = 1,
                      complete: bool = False) -> np.ndarray:
    """decode_shard with a parsed layout; complete: the shard holds every inner chunk, each its own
    bytes (as the recorder writes them), else ShardError (see index_spans)."""
    if hasattr(data, "as_numpy_array"):  # a zarr Buffer, as store.get returns it
        data = data.as_numpy_array()
    buf = np.frombuffer(data, dtype=np.uint8)
    spans = shard_spans(layout, buf, out.shape if complete else None)

    def decode_one(coords) -> None:
        r = _region(coords, layout.chunk_shape, out.shape)
        if r is None:
            return
        span = spans.get(coords)
        if span is None:
            out[r] = layout.fill
        else:
            _from_step_last(decode_chunk(buf[span[0]:span[0] + span[1]], layout, coords), out[r], layout)

    _map(decode_one, list(np.ndindex(*layout.grid)), threads)
    return out


def _region(coords, chunk_shape, extent) -> tuple[slice, ...] | None:
    """The part of inner chunk `coords` inside `extent` (a block's shape), or None if none is."""
    r = tuple(slice(c * n, min((c + 1) * n, e)) for c, n, e in zip(coords, chunk_shape, extent))
    return None if any(s.start >= s.stop for s in r) else r


def index_spans(layout: ShardLayout, raw: np.ndarray, size: int,
                extent: tuple[int, ...] | None = None) -> dict[tuple[int, ...], tuple[int, int]]:
    """The (offset, nbytes) of each inner chunk present in a shard of `size` bytes whose index is
    `raw`: checksum verified, every span inside the shard's data (ShardError otherwise).
    extent (the shard's part inside its array): every inner chunk was written (WRITE_ALL), so one
    absent within `extent`, or two overlapping, is damage zarr would read silently: ShardError."""
    hi = index_start(layout, size)
    raw = np.asarray(raw, dtype=np.uint8)
    if len(raw) != layout.index_nbytes:
        raise ShardError(f"shard index of {len(raw)} bytes, not {layout.index_nbytes}")
    if _crc32c(raw[:-4]) != raw[-4:].tobytes():
        raise ShardError("shard index checksum mismatch")
    index = raw[:-4].view("<u8").reshape(-1, 2)  # (offset, nbytes) per inner chunk; absent: MAX_U64 twice
    coords = _grid_coords(layout.grid)  # (numpy, whole arrays: a token read parses one index a block)
    offsets, sizes = index[:, 0], index[:, 1]
    absent = (offsets == MAX_U64) & (sizes == MAX_U64)
    if extent is not None:
        inside = np.all(coords * np.asarray(layout.chunk_shape) < np.asarray(extent), axis=1)
        if (absent & inside).any():
            first = tuple(int(c) for c in coords[np.flatnonzero(absent & inside)[0]])
            raise ShardError(f"inner chunk {first} is absent from the shard index (every inner chunk is written)")
    present = np.flatnonzero(~absent)
    offsets, sizes = offsets[present].astype(np.int64), sizes[present].astype(np.int64)
    outside = np.flatnonzero((offsets < 0) | (offsets > hi) | (sizes < 0) | (sizes > hi) | (offsets + sizes > hi))
    if len(outside):
        i = outside[0]
        raise ShardError(f"shard index entry {tuple(int(c) for c in coords[present[i]])} "
                         f"({int(index[present[i], 0])}, {int(index[present[i], 1])}) points outside the shard's data")
    if extent is not None and len(present) > 1:
        order = np.lexsort((sizes, offsets))
        ends, starts = (offsets + sizes)[order[:-1]], offsets[order[1:]]
        clash = np.flatnonzero(ends > starts)
        if len(clash):
            j = clash[0]
            a, b = (tuple(int(c) for c in coords[present[order[k]]]) for k in (j, j + 1))
            raise ShardError(f"shard index entries {a} and {b} overlap (bytes {int(starts[j])}-{int(ends[j]) - 1})")
    keys = map(tuple, coords[present].tolist())
    return dict(zip(keys, zip(offsets.tolist(), sizes.tolist())))


@functools.lru_cache(maxsize=64)
def _grid_coords(grid: tuple[int, ...]) -> np.ndarray:
    """Every inner chunk's coordinates in C order (the index's order), one row each."""
    return np.array(list(np.ndindex(*grid)), dtype=np.int64).reshape(-1, len(grid))


def index_start(layout: ShardLayout, size: int) -> int:
    """Where the index of a shard of `size` bytes starts (ShardError if the shard is shorter)."""
    if size < layout.index_nbytes:
        raise ShardError(f"shard of {size} bytes is shorter than its index ({layout.index_nbytes} bytes)")
    return size - layout.index_nbytes


def shard_spans(layout: ShardLayout, buf: np.ndarray, extent: tuple[int, ...] | None = None) -> dict:
    """index_spans of a whole shard's bytes (an unsharded array's "shard" is its one chunk)."""
    if not layout.sharded:
        return {layout.data_order[0]: (0, len(buf))}
    return index_spans(layout, buf[index_start(layout, len(buf)):], len(buf), extent)


def decode_chunk(payload: np.ndarray, layout: ShardLayout, coords) -> np.ndarray:
    """One inner chunk's bytes -> its stored (transposed) array, C-contiguous (a scratch buffer or a view)."""
    nbytes = layout.chunk_nbytes
    if layout.crc:
        if len(payload) < 4 or _crc32c(payload[:-4]) != payload[-4:].tobytes():
            raise ShardError(f"checksum mismatch in inner chunk {coords}")
        payload = payload[:-4]
    if layout.compressor is not None:
        raw = _scratch("decoded", (nbytes,), np.dtype(np.uint8))
        try:
            layout.compressor.decode(payload, out=raw)
        except Exception as e:
            raise ShardError(f"inner chunk {coords} does not decompress to {nbytes} bytes: {e}") from e
    elif len(payload) != nbytes:
        raise ShardError(f"inner chunk {coords} holds {len(payload)} bytes, not {nbytes}")
    else:
        raw = payload
    values = raw.view(layout.dtype)
    if layout.delta:
        values = np.cumsum(values, dtype=layout.dtype, out=_scratch("delta", values.shape, layout.dtype))
    return values.reshape(layout.stored_shape)
