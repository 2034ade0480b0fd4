"""Lazy, read-only view of a run: slice W like the notebook's W_history without loading it whole."""

from __future__ import annotations

import builtins
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .errors import CrucibleError
from .store import committed_steps, group_path, missing_blocks, open_store, store_bytes


class LazyW:
    """W[step, token, hidden] as bf16, reading only the chunks a selection touches.

    Indexing follows torch/numpy for ints, slices, one boolean mask or index list per call
    (e.g. ``W[:, dead_mask, :]``) and returns a ``torch.bfloat16`` tensor. Only committed steps
    exist: ``len(W) == steps + 1`` and ``W[-1]`` is the last committed step.
    """

    def __init__(self, group, n_steps: int):
        self._group = group
        self._array = group["W"]
        self._dir = group_path(group) / "W"
        self.shape = torch.Size((n_steps + 1,) + tuple(self._array.shape[1:]))
        self.dtype = torch.bfloat16

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        selection, advanced = _normalize(key, self.shape)
        _check_present(self._array, self._dir, "W", _rows(selection[0]))
        try:
            if advanced:
                data = self._array.oindex[selection]
            else:
                data = self._array[selection]
        except Exception as e:  # zarr raises codec errors for damaged chunks
            raise CrucibleError(f"cannot read W{_show(key)}: {_describe(e)}") from e
        data = np.asarray(data)
        if not data.flags.c_contiguous:
            data = data.copy()
        return torch.from_numpy(data).view(torch.bfloat16)

    def numpy_bits(self, key) -> np.ndarray:
        """The raw uint16 bits of a selection (what the safetensors export holds)."""
        return self[key].view(torch.uint16).numpy()

    def __repr__(self) -> str:
        return f"LazyW(shape={tuple(self.shape)}, dtype=torch.bfloat16)"


def _normalize(key, shape) -> tuple[tuple, bool]:
    """Turn a torch/numpy style key into a zarr selection bounded by the committed steps."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for W of {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    out, n_advanced = [], 0
    for k, size in zip(key, shape):
        if isinstance(k, torch.Tensor):
            k = k.item() if k.dim() == 0 and not k.dtype == torch.bool else k.cpu().numpy()
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
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
        raise IndexError("index W with at most one list or mask at a time (e.g. W[:, dead_mask][:, :, dims])")
    return tuple(out), n_advanced == 1


class Trajectory:
    """A run opened for reading. Everything reflects the committed steps only."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._group = open_store(self.run_dir)
        self.attrs: dict[str, Any] = dict(self._group.attrs)
        self.steps = committed_steps(self._group)
        if self.steps < 0:
            raise CrucibleError(f"{self.run_dir} has no committed step yet")
        self.W = LazyW(self._group, self.steps)

    @property
    def group(self):
        return self._group

    @cached_property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.attrs["config"])

    @cached_property
    def h_mean(self) -> torch.Tensor:
        """(steps, hidden) float32; h_mean[i] is from the forward pass of step i+1."""
        return self._read("h_mean", self.steps)

    @cached_property
    def loss(self) -> torch.Tensor:
        """(steps+1,) float32; loss[0] is NaN (no step yet)."""
        return self._read("loss", self.steps + 1)

    @cached_property
    def dead_mask(self) -> torch.Tensor:
        return self._read("dead_mask", None)

    @property
    def live_mask(self) -> torch.Tensor:
        return ~self.dead_mask

    @cached_property
    def dead_indices(self) -> torch.Tensor:
        return self._read("dead_indices", None)

    @property
    def epochs(self) -> int:
        return int(self.attrs.get("commit", {}).get("epoch", 0))

    def to_xarray(self):
        """An xarray.Dataset over the committed steps, W decoded to float32 lazily (dask)."""
        from .xarray_view import to_xarray

        return to_xarray(self)

    def bytes_on_disk(self) -> int:
        return store_bytes(self.run_dir)

    def raw_bytes(self) -> int:
        """Uncompressed size of the committed data."""
        hidden = self.W.shape[2]
        return (self.steps + 1) * self.W.shape[1] * hidden * 2 + self.steps * hidden * 4 + (self.steps + 1) * 4

    def _read(self, name: str, rows: int | None) -> torch.Tensor:
        array = self._group[name]
        rows_read = range(rows if rows is not None else array.shape[0])
        _check_present(array, group_path(self._group) / name, name, rows_read)
        try:
            data = array[:rows] if rows is not None else array[...]
        except Exception as e:
            raise CrucibleError(f"cannot read {name}: {_describe(e)}") from e
        return torch.from_numpy(np.ascontiguousarray(data))

    def __repr__(self) -> str:
        return f"Trajectory({str(self.run_dir)!r}, steps={self.steps}, W={tuple(self.W.shape)})"


def open(run_dir: str | Path) -> Trajectory:  # noqa: A001 - the public name is cr.open
    """Open a run directory for lazy reading."""
    return Trajectory(run_dir)


def _rows(selection) -> range:
    """The step rows a normalized step selection touches (a superset is fine)."""
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


def _check_present(array, directory: Path, name: str, rows: range) -> None:
    missing = missing_blocks(array, directory, rows)
    if missing:
        unit = (array.shards or array.chunks)[0]
        first = missing[0] * unit
        raise CrucibleError(
            f"{name} is damaged: the chunk holding rows {first}-{first + unit - 1} is missing "
            f"(run `crucible-record verify`)"
        )


def _show(key) -> str:
    return f"[{key!r}]" if not isinstance(key, tuple) else "[" + ", ".join(builtins.map(repr, key)) + "]"


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
