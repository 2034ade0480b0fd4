"""The on-disk layout of one run: a Zarr v3 group with W, h_mean, loss and the token masks.

One run = one directory. ``RUN/trajectory.zarr`` holds the arrays; its group attributes hold the
config, provenance, layout and the commit marker (how many training steps are fully on disk).
Readers trust only that committed prefix. zarr's LocalStore replaces files atomically (temporary
file + rename), so the marker and each chunk are either old or new after a crash, never torn.
"""

from __future__ import annotations

import itertools
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CrucibleError

FORMAT_NAME = "crucible-record"
FORMAT_VERSION = 1
STORE_NAME = "trajectory.zarr"

# Step axis last inside a chunk: consecutive steps of one weight become neighbours in the byte
# stream, which is what makes bf16 training trajectories compress (see benchmarks/README.md).
_STEP_FASTEST = (1, 2, 0)


def _w_codecs(preset: str) -> dict[str, Any]:
    """Filters/compressors for W (uint16 bf16 bits) for one named preset; all lossless.

    Chosen by benchmarks/bench_compression.py on a real trajectory: after the transpose, plain
    zstd beats blosc's bit-shuffle + zstd in both ratio and speed, and a delta along steps adds
    the most (it is not a v3 spec codec, hence opt-in).
    """
    from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

    crc = Crc32cCodec()
    step_fastest = TransposeCodec(order=_STEP_FASTEST)
    if preset == "default":  # v3 spec codecs only: any Zarr v3 reader opens it
        return {"filters": [step_fastest], "compressors": [ZstdCodec(level=3), crc]}
    if preset == "max":  # smallest files; numcodecs Delta is not in the v3 spec
        from zarr.codecs.numcodecs import Delta

        return {"filters": [step_fastest, Delta(dtype="<u2")], "compressors": [ZstdCodec(level=9), crc]}
    if preset == "fast":  # for fast (GPU) training or huge embeddings: spec codecs, cheap to write
        return {
            "filters": [step_fastest],
            "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2), crc],
        }
    if preset == "zstd":
        return {"filters": [], "compressors": [ZstdCodec(level=3), crc]}
    if preset == "raw":
        return {"filters": [], "compressors": [crc]}
    raise CrucibleError(f"unknown codec preset {preset!r}; choose one of {', '.join(CODEC_PRESETS)}")


CODEC_PRESETS = ("default", "max", "fast", "zstd", "raw")


@dataclass(frozen=True)
class Layout:
    """How W is cut into chunks and compressed. Saved with the run."""

    time_chunk: int = 64  # steps per chunk: the writer buffers this many steps, writes once
    token_chunk: int = 100  # tokens per inner chunk: small = fast single-token reads
    codec: str = "default"

    def validate(self) -> None:
        if self.time_chunk <= 0 or self.token_chunk <= 0:
            raise CrucibleError("chunk sizes must be positive")
        if self.codec not in CODEC_PRESETS:
            raise CrucibleError(
                f"unknown codec preset {self.codec!r}; choose one of {', '.join(CODEC_PRESETS)}"
            )


def provenance(device: str) -> dict[str, str]:
    import torch
    import zarr

    from . import __version__

    return {
        "package": f"crucible-record {__version__}",
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": device,
        "torch_threads": str(torch.get_num_threads()),
    }


# zarr skips chunks equal to the fill value; we write every chunk so that an absent chunk file
# always means damage (readers check for it) and never "all zeros".
WRITE_ALL = {"write_empty_chunks": True}


def create_store(
    run_dir: str | Path,
    *,
    steps: int,
    vocab_size: int,
    hidden_dim: int,
    dead_mask: np.ndarray,
    attributes: dict[str, Any],
    layout: Layout = Layout(),
):
    """Create an empty run store, arrays pre-sized to the full run (unwritten chunks cost nothing)."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    layout.validate()
    path = Path(run_dir) / STORE_NAME
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    time_chunk = min(layout.time_chunk, steps + 1)
    token_chunk = min(layout.token_chunk, vocab_size)
    group.create_array(
        "W",
        shape=(steps + 1, vocab_size, hidden_dim),
        dtype="uint16",
        chunks=(time_chunk, token_chunk, hidden_dim),
        shards=(time_chunk, -(-vocab_size // token_chunk) * token_chunk, hidden_dim),
        serializer="auto",
        fill_value=0,
        config=WRITE_ALL,
        dimension_names=("step", "token", "hidden"),
        attributes={"encoding": "bfloat16 bits stored as uint16"},
        **_w_codecs(layout.codec),
    )
    small = {"compressors": [ZstdCodec(level=3), Crc32cCodec()], "filters": [], "config": WRITE_ALL}
    group.create_array(
        "h_mean",
        shape=(steps, hidden_dim),
        dtype="float32",
        chunks=(min(time_chunk, steps), hidden_dim),
        fill_value=float("nan"),
        dimension_names=("step_minus_one", "hidden"),
        attributes={"note": "h_mean[i] comes from the forward pass of step i+1; W[i+1] is the embedding after it"},
        **small,
    )
    group.create_array(
        "loss",
        shape=(steps + 1,),
        dtype="float32",
        chunks=(time_chunk,),
        fill_value=float("nan"),
        dimension_names=("step",),
        **small,
    )
    dead_mask = np.asarray(dead_mask, dtype=bool)
    dead_indices = np.flatnonzero(dead_mask).astype(np.int64)
    group.create_array(
        "dead_mask", data=dead_mask, chunks=(max(1, vocab_size),), dimension_names=("token",), **small
    )
    group.create_array(
        "dead_indices",
        shape=dead_indices.shape,
        dtype="int64",
        chunks=(max(1, len(dead_indices)),),
        dimension_names=("dead_token",),
        **small,
    )
    if len(dead_indices):
        group["dead_indices"].with_config(WRITE_ALL)[:] = dead_indices
    group.attrs.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": asdict(layout),
            "commit": {"steps": -1, "epoch": 0},
            **attributes,
        }
    )
    return group


def open_store(run_dir: str | Path, mode: str = "r"):
    """Open a run's group, refusing what is not a crucible-record run of a known version."""
    import zarr

    run_dir = Path(run_dir)
    path = run_dir / STORE_NAME
    if not run_dir.exists():
        raise CrucibleError(f"run directory not found: {run_dir}")
    if not (path / "zarr.json").is_file():
        raise CrucibleError(f"{run_dir} is not a crucible-record run (no {STORE_NAME})")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        attrs = dict(group.attrs)
    except Exception as e:
        raise CrucibleError(f"{run_dir}: cannot open {STORE_NAME}: {type(e).__name__}: {e}") from None
    if attrs.get("format") != FORMAT_NAME:
        raise CrucibleError(f"{run_dir} is not a crucible-record run (no format marker)")
    version = attrs.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CrucibleError(
            f"{run_dir} was written by a newer crucible-record (format {version}, this one reads {FORMAT_VERSION}); upgrade crucible-record"
        )
    for name in ("W", "h_mean", "loss", "dead_mask", "dead_indices"):
        if name not in group:
            raise CrucibleError(f"{run_dir} is damaged: array {name} is missing")
    return group


def committed_steps(group) -> int:
    """Training steps fully on disk (W[0..n], h_mean[0..n-1], loss[0..n]); -1 before W[0]."""
    return int(group.attrs.get("commit", {}).get("steps", -1))


def write_commit(group, steps: int, epoch: int) -> None:
    group.attrs.update({"commit": {"steps": int(steps), "epoch": int(epoch)}})


def store_bytes(run_dir: str | Path) -> int:
    """Bytes on disk under the store."""
    return sum(p.stat().st_size for p in (Path(run_dir) / STORE_NAME).rglob("*") if p.is_file())


def atomic_write_text(path: Path, text: str) -> None:
    import os
    import uuid

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def group_path(group) -> Path:
    """Directory of a group in a LocalStore."""
    return Path(group.store.root) / group.path


def missing_blocks(array, directory: Path, rows: range) -> list[int]:
    """Time blocks of `array` (stored under `directory`) covering `rows` whose chunk files are absent.

    zarr reads an absent chunk as fill values without complaint; for committed steps an absent
    chunk can only mean damage, so readers check for it first. Takes the opened array so that a
    read does not open the array's metadata a second time.
    """
    unit = array.shards or array.chunks
    if len(rows) == 0 or array.size == 0:
        return []
    others = [range(-(-size // u)) for size, u in zip(array.shape[1:], unit[1:])]
    root = Path(directory) / "c"
    blocks = range(rows.start // unit[0], (rows.stop - 1) // unit[0] + 1)
    missing = []
    for block in blocks:
        for rest in itertools.product(*others):
            if not (root / "/".join(map(str, (block, *rest)))).is_file():
                missing.append(block)
                break
    return missing
