"""Whole blocks of steps as store files: encoded in zarr's exact bytes, found, checked for absence.

zarr reads an absent chunk as fill values; for committed rows it can only mean damage (missing_blocks).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from ..storage import RunStore

# zarr skips chunks equal to the fill value; every chunk is written so that an absent chunk always
# means damage (readers check for it) and never "all fill".
WRITE_ALL = {"write_empty_chunks": True}

log = logging.getLogger("crucible_record")
_logged: set[tuple[str, str, str]] = set()


def log_fallback(path: str, what: str, why: str) -> None:
    """Say once per array and reason that its blocks take zarr-python's path instead of shardio's."""
    if (path, what, why) not in _logged:
        _logged.add((path, what, why))
        log.info("%s: whole blocks are %s through zarr-python, not shardio: %s", path, what, why)


def encode_block(array, block: int, rows: np.ndarray, row_shard: int = 0, threads: int = 1) -> dict[str, bytes]:
    """The shard files of time block `block` of `array` holding `rows` (of shard `row_shard` on the
    first axis): store key -> bytes. Encoded whole (zarr would read and merge the old shard): by
    shardio where it is one file, else by zarr into a scratch in-memory array."""
    import json

    import zarr
    from zarr.core.buffer import default_buffer_prototype

    single = array.ndim == 1 or all(u >= s for s, u in zip(array.shape[2:], (array.shards or array.chunks)[2:]))
    if single:
        from ..shardio import encode_shard

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
    written = {"zarr.json": default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())}
    zarr.open_array(zarr.storage.MemoryStore(store_dict=written), mode="r+", zarr_format=3).with_config(WRITE_ALL)[...] = rows
    files = {}
    for key, buf in written.items():
        if key != "zarr.json":  # "c/0/j/k" -> "c/<block>/j/k" in the real array
            coords = [int(c) for c in key.split("/")[1:]]
            if row_shard:
                coords[1] += row_shard
            files[f"{array.path}/{array.metadata.encode_chunk_key((block, *coords[1:]))}"] = buf.to_bytes()
    return files


def missing_blocks(store: RunStore, array, array_key: str, rows: range) -> list[int]:
    """Time blocks covering `rows` with an absent chunk (or shard) file."""
    if len(rows) == 0 or array.size == 0:
        return []
    unit = array.shards or array.chunks
    files = list(itertools.product(*(range(-(-size // u)) for size, u in zip(array.shape[1:], unit[1:]))))
    key = array.metadata.encode_chunk_key
    return [block for block in range(rows.start // unit[0], (rows.stop - 1) // unit[0] + 1)
            if not all(store.exists(f"{array_key}/{key((block, *rest))}") for rest in files)]
