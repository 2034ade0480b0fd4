"""cr.open: a run's fields, read lazily over the committed steps only.

``t["wte"][10:20, 5]`` reads only the chunks it touches; a chunk that should hold committed rows
but is absent or fails its checksum is a CrucibleError, never fill values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import dtypes
from .blockread import read_blocks, read_one_row, read_selection, wants_one_row, wants_whole_blocks
from .errors import CrucibleError, describe, missing_chunk_error
from .fields import Field
from .format.blocks import missing_blocks
from .format.schema import open_group, read_commit
from .storage import RunStore, open_store


class LazyField:
    """One field over the committed steps: ``len()`` rows, row i = step ``steps[i]``; indexed like
    torch (ints, slices, one mask or index list per call)."""

    def __init__(self, store: RunStore, array, name: str, spec: Field, n_rows: int, first_step: int = 0):
        self._store, self.name, self.spec = store, name, spec
        self.array = array  # the zarr array (sized past the committed rows while a run is written)
        self.shape = torch.Size((n_rows,) + spec.stored_shape)
        self.dtype, self.every = spec.dtype, spec.every
        self.steps = range(first_step, first_step + n_rows * spec.every, spec.every)

    @property
    def rows(self) -> torch.Tensor | None:
        """The row indices kept of the recorded tensor's first axis (None: all rows)."""
        indices = self.spec.row_indices
        return None if indices is None else torch.from_numpy(indices.copy())

    def __len__(self) -> int:
        return self.shape[0]

    def row_of(self, step: int) -> int:
        """The row holding `step` (a KeyError-like IndexError if that step was not recorded)."""
        if step not in self.steps:
            raise IndexError(f"step {step} is not among the committed steps of {self.name!r} ({_show_range(self.steps)})")
        return self.steps.index(step)

    def __getitem__(self, key) -> torch.Tensor:
        return dtypes.from_stored(torch.from_numpy(self.numpy(key)), self.dtype)

    def numpy(self, key=slice(None)) -> np.ndarray:
        """The stored values of a selection (bf16 as its uint16 bits), C-contiguous."""
        selection, advanced = normalize_key(key, self.shape)
        data = None
        if wants_whole_blocks(selection, self.shape):  # whole shards, decoded straight into the result
            data = read_blocks(self._store, self.array, selection, self.name)
        elif wants_one_row(selection, self.shape):  # per block the index and one inner chunk
            data = read_one_row(self._store, self.array, selection, self.name)
        if data is None:  # any other selection: the inner chunks it touches
            data = read_selection(self._store, self.array, selection, self.name)
        if data is not None:
            return data
        # Only codecs shardio does not know (never the recorder's) come here. zarr reads a shard's
        # index and chunks in separate requests: beside a live writer, a spurious checksum error.
        self.check_present(_rows(selection[0]))
        try:
            data = self.array.oindex[selection] if advanced else self.array[selection]
        except Exception as e:  # zarr raises codec errors for damaged chunks
            raise CrucibleError(f"cannot read {self.name}{_show(key)}: {describe(e)}") from e
        data = np.asarray(data)
        return data if data.flags.c_contiguous else data.copy()  # (ascontiguousarray makes 0-d 1-d)

    def check_present(self, rows: range) -> None:
        missing = missing_blocks(self._store, self.array, self.array.path, rows)
        if missing:
            unit = (self.array.shards or self.array.chunks)[0]
            first = missing[0] * unit
            raise missing_chunk_error(self.name, first, first + unit - 1)

    def __repr__(self) -> str:
        return f"LazyField({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, every={self.every})"


class Run:
    """A run opened for reading. Everything reflects the committed steps at open time."""

    def __init__(self, path: str | Path):
        self.store = open_store(path)
        self.location = self.store.location  # a local path or a URL
        self.run_dir = self.store.run_dir  # a Path for a local run, None for a URL
        self.group, self.info = open_group(self.store)
        self.commit = read_commit(self.store, self.group, self.info)
        self.committed_steps = int(self.commit["steps"])  # steps 0 .. committed_steps-1 are readable
        self.version, self.attributes = self.info.version, self.info.attributes
        self._fields: dict[str, LazyField] = {}

    @property
    def fields(self) -> dict[str, Field]:
        return dict(self.info.fields)

    def __getitem__(self, name: str) -> LazyField | torch.Tensor:
        """A field (lazy) or a constant (a tensor, read whole)."""
        if name in self.info.fields:
            if name not in self._fields:
                spec = self.info.fields[name]
                first = self.info.first_step.get(name, 0)
                rows = spec.rows_at(self.committed_steps - first)
                self._fields[name] = LazyField(self.store, self.group[name], name, spec, rows, first)
            return self._fields[name]
        if name in self.info.constants:
            return self.constant(name)
        raise KeyError(f"{name!r} is neither a field nor a constant of {self.location} "
                       f"(fields: {', '.join(self.info.fields)})")

    def __contains__(self, name: str) -> bool:
        return name in self.info.fields or name in self.info.constants

    def constant(self, name: str) -> torch.Tensor:
        array = self.group[name]
        if array.size and missing_blocks(self.store, array, name, range(array.shape[0] if array.ndim else 1)):
            raise CrucibleError(f"{name} is damaged: its chunk is missing (run `crucible-record verify`)")
        try:
            data = np.asarray(array[...]).copy()
        except Exception as e:
            raise CrucibleError(f"cannot read {name}: {describe(e)}") from e
        meta = dict(array.attrs).get("crucible_record", {})
        tensor = torch.from_numpy(data)
        return dtypes.from_stored(tensor, dtypes.dtype_from_name(meta["dtype"])) if "dtype" in meta else tensor

    def bytes_on_disk(self) -> int:
        return self.store.bytes_on_disk()

    def raw_bytes(self) -> int:
        """Uncompressed size of the committed data."""
        return sum(len(self[name]) * int(np.prod(spec.stored_shape, dtype=np.int64)) * spec.dtype.itemsize
                   for name, spec in self.info.fields.items())

    def to_xarray(self):
        """An xarray.Dataset of the committed steps, lazy (dask); see crucible_record.xarray_view."""
        from .xarray_view import run_to_xarray

        return run_to_xarray(self)

    def __repr__(self) -> str:
        return f"Run({self.location!r}, committed_steps={self.committed_steps}, fields={list(self.info.fields)})"


def normalize_key(key, shape) -> tuple[tuple, bool]:
    """A torch/numpy style key -> a zarr selection within `shape` (the committed rows)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for a field of {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    out, n_advanced = [], 0
    for k, size in zip(key, shape):
        if isinstance(k, torch.Tensor):
            k = k.item() if k.dim() == 0 and not k.dtype == torch.bool else k.cpu().numpy()
        if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
            k = int(k)
            if not -size <= k < size:
                raise IndexError(f"index {k} is out of range for an axis of {size}")
            out.append(k % size)
        elif isinstance(k, slice):
            out.append(slice(*k.indices(size)))
        else:
            arr = np.asarray(k)
            if arr.dtype == bool:
                if arr.shape != (size,):
                    raise IndexError(f"boolean mask of shape {arr.shape} for an axis of {size}")
                arr = np.flatnonzero(arr)
            elif not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
                raise IndexError(f"unsupported index {k!r}")
            if ((arr < -size) | (arr >= size)).any():
                raise IndexError(f"index out of range for an axis of {size}")
            out.append(arr % size)
            n_advanced += 1
    if n_advanced > 1:
        raise IndexError("index with at most one list or mask at a time (e.g. W[:, dead_mask][:, :, dims])")
    return tuple(out), n_advanced == 1


def _rows(selection) -> range:
    """The rows a normalized first-axis selection touches (a superset is fine)."""
    if isinstance(selection, int):
        return range(selection, selection + 1)
    if isinstance(selection, slice):
        start, stop, step = selection.start, selection.stop, selection.step
        if step < 0:
            start, stop = stop + 1, start + 1
        return range(start, max(start, stop))
    if len(selection) == 0:
        return range(0)
    return range(int(selection.min()), int(selection.max()) + 1)


def _show_range(r: range) -> str:
    if len(r) == 0:
        return "none"
    return f"{r.start}..{r[-1]}" + (f" every {r.step}" if r.step != 1 else "")


def _show(key) -> str:
    return f"[{key!r}]" if not isinstance(key, tuple) else "[" + ", ".join(map(repr, key)) + "]"
