"""Codec presets and chunk layouts, chosen by measurement (benchmarks/README.md).

A block of ``time_chunk`` steps is one shard (one file, one PUT), written once from RAM: a
partial-chunk write is a read-modify-write. Inside a chunk the step axis is put last, so consecutive
steps of one weight are neighbours in the byte stream: that is what makes trajectories compress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CrucibleError

CODEC_PRESETS = ("default", "max", "fast", "zstd", "raw")
BLOCK_BYTES = 256 << 20  # auto time_chunk: at most this many bytes of one field buffered per block
MAX_TIME_CHUNK = 64


@dataclass(frozen=True)
class Layout:
    """How fields are cut into chunks and compressed. Saved with the run.
    time_chunk None: up to 64 steps, fewer for large fields; small row_chunk: fast reads of a few rows."""

    time_chunk: int | None = 64
    row_chunk: int = 100
    codec: str = "default"

    def validate(self) -> None:
        if self.time_chunk is not None and (isinstance(self.time_chunk, bool) or self.time_chunk <= 0) \
                or self.row_chunk <= 0:
            raise CrucibleError("chunk sizes must be positive")
        if self.codec not in CODEC_PRESETS:
            raise CrucibleError(f"unknown codec preset {self.codec!r}; choose one of {', '.join(CODEC_PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"time_chunk": self.time_chunk, "row_chunk": self.row_chunk, "codec": self.codec}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Layout":
        return cls(values.get("time_chunk"), values.get("row_chunk", values.get("token_chunk", 100)),
                   values.get("codec", "default"))


def codecs_for(preset: str, chunk_shape: tuple[int, ...], storage_dtype: str) -> dict[str, Any]:
    """Filters/serializer/compressors for one array; all lossless, crc32c on every chunk.
    ``default`` uses only codecs of the Zarr v3 specification, so any v3 reader opens the run; blosc-lz4
    shuffle for wide floats, where zstd finds little to squeeze in the mantissas (bench_hf_overhead.py)."""
    from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

    ndim = len(chunk_shape)
    crc = Crc32cCodec()
    step_last = [TransposeCodec(order=tuple(range(1, ndim)) + (0,))] if ndim >= 2 else []
    itemsize = np.dtype(storage_dtype).itemsize
    wide_float = np.dtype(storage_dtype).kind == "f" and itemsize >= 4
    if preset == "fast" or (preset == "default" and wide_float):
        blosc = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)
        return {"filters": step_last, "compressors": [blosc, crc]}
    if preset == "default":
        return {"filters": step_last, "compressors": [ZstdCodec(level=3), crc]}
    if preset == "max":
        from zarr.codecs.numcodecs import Delta

        # Delta is lossless on integers only (bf16 bits), and only on chunks that are not
        # Fortran-ordered: numcodecs' Delta encodes those in memory order but decodes in C order.
        c_ordered = ndim == 1 or sum(size > 1 for size in chunk_shape[1:]) >= 2
        lossless = np.dtype(storage_dtype).kind in "iu" and c_ordered
        delta = [Delta(dtype=np.dtype(storage_dtype).str)] if lossless else []
        return {"filters": step_last + delta, "compressors": [ZstdCodec(level=9), crc]}
    if preset == "zstd":
        return {"filters": [], "compressors": [ZstdCodec(level=3), crc]}
    if preset == "raw":
        return {"filters": [], "compressors": [crc]}
    raise CrucibleError(f"unknown codec preset {preset!r}; choose one of {', '.join(CODEC_PRESETS)}")


def time_chunk_for(layout: Layout, step_bytes: int) -> int:
    """Rows per block: the layout's, or as many steps as fit BLOCK_BYTES (1..64)."""
    if layout.time_chunk is not None:
        return layout.time_chunk
    return max(1, min(MAX_TIME_CHUNK, BLOCK_BYTES // max(step_bytes, 1)))


def chunking(stored_shape: tuple[int, ...], time_chunk: int, row_chunk: int) -> dict[str, Any]:
    """chunks/shards for an array of shape (steps, *stored_shape): one shard per block of steps."""
    if not stored_shape:
        return {"chunks": (time_chunk,)}
    first = max(1, stored_shape[0])
    inner = min(row_chunk, first)
    rest = tuple(max(1, s) for s in stored_shape[1:])
    return {
        "chunks": (time_chunk, inner) + rest,
        "shards": (time_chunk, -(-first // inner) * inner) + rest,
    }
