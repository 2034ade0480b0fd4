"""Any run -> one safetensors file, streamed: one tensor per field (its committed rows) and constant.

The safetensors library needs every tensor in memory, so the file is written here, byte for byte
what ``safetensors.torch.save_file`` writes (metadata keys sorted), one stored block at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import dtypes
from .errors import CrucibleError
from .reader import LazyField, Run
from .safetensors_io import header as safetensors_header
from .storage import atomic_write_bytes, lexists_at, open_output_dir, write_all

# name -> (safetensors dtype, shape, a function yielding the tensor's little-endian bytes in order)
Chunks = Callable[[], Iterator[memoryview | bytes]]


def write_safetensors(target: Path, tensors: dict[str, tuple[str, list[int], int, Chunks]],
                      metadata: Mapping[str, str] | None = None, *, dir_fd: int | None = None) -> None:
    """Stream tensors into `target` by a durable replace (never a torn file, never through a symlink);
    dir_fd: `target`'s folder (open_output_dir), else its parent as named."""
    header, order = safetensors_header({name: spec[:3] for name, spec in tensors.items()}, metadata)

    def fill(fd: int) -> None:
        # One thread writes a block while this one decodes the next (memory: two blocks).
        with ThreadPoolExecutor(1, thread_name_prefix="crucible-export") as writer:
            pending = writer.submit(write_all, fd, header)
            for name in order:
                written = 0
                for chunk in tensors[name][3]():
                    pending.result()
                    pending = writer.submit(write_all, fd, chunk)
                    written += memoryview(chunk).nbytes
                if written != tensors[name][2]:
                    raise CrucibleError(f"{name}: wrote {written} bytes, the header promised {tensors[name][2]}")
            pending.result()

    try:
        atomic_write_bytes(target, fill, dir_fd=dir_fd, mode=0o644)
    except OSError as e:
        raise CrucibleError(f"cannot write {target}: {e.strerror or e}") from None


def field_blocks(field: LazyField) -> Chunks:
    """A field's rows as little-endian bytes, one stored block of steps at a time."""
    rows, block = len(field), field.array.chunks[0]

    def chunks():
        for first in range(0, rows, block):  # whole stored blocks: each decoded once
            data = field.numpy(slice(first, min(first + block, rows)))
            data = data.astype(data.dtype.newbyteorder("<"), copy=False)
            yield memoryview(data).cast("B")  # no bytes copy of the block
            del data  # freed before the next block is decoded

    return chunks


def tensor_spec(tensor: torch.Tensor) -> tuple[str, list[int], int, Chunks]:
    data = np.ascontiguousarray(dtypes.stored_numpy(tensor))
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    return dtypes.safetensors_name(tensor.dtype), list(tensor.shape), data.nbytes, lambda: iter([data.tobytes()])


def check_targets(out_dir: Path, names: list[str], force: bool, run_dir: Path | None = None) -> tuple[int, list[Path]]:
    """(the output folder's descriptor (open_output_dir), the targets); none of `names` may be there
    unless `force`. The caller closes the descriptor."""
    fd = open_output_dir(out_dir, run_dir)
    try:
        paths = [out_dir / name for name in names]
        for path in paths:
            if lexists_at(path.name, fd) and not force:
                raise CrucibleError(f"{path} already exists; pass --force to overwrite it")
    except BaseException:
        os.close(fd)
        raise
    return fd, paths


def export_run(run: Run, out_dir: str | Path, *, force: bool = False) -> Path:
    """Every field's committed rows (recorded dtype, bf16 as BF16), every constant, and the row
    indices of row-subset fields (``<name>.rows``), in ``RUN_NAME.safetensors``. The file's
    metadata holds each field's step numbers: ``<name>.steps`` -> JSON ``{"start", "every",
    "count"}`` (row i holds step start + i * every), read back by ``safe_open(...).metadata()``."""
    folder, (target,) = check_targets(Path(out_dir), [f"{run.store.name or 'run'}.safetensors"], force, run.run_dir)
    tensors, metadata = {}, {}
    try:
        for name, spec in run.fields.items():
            field = run[name]
            nbytes = len(field) * int(np.prod(spec.stored_shape, dtype=np.int64)) * spec.dtype.itemsize
            tensors[name] = (dtypes.safetensors_name(spec.dtype), list(field.shape), nbytes, field_blocks(field))
            metadata[f"{name}.steps"] = json.dumps({"start": field.steps.start, "every": field.every,
                                                    "count": len(field)})
            if field.rows is not None:
                tensors[f"{name}.rows"] = tensor_spec(field.rows)
        for name in run.info.constants:
            tensors[name] = tensor_spec(run.constant(name))
        write_safetensors(target, tensors, metadata, dir_fd=folder)
    finally:
        os.close(folder)
    return target
