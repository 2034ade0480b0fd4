"""A run as an ``xarray.Dataset`` backed by dask: named axes, committed steps only.

``xarray.open_zarr("RUN/trajectory.zarr", consolidated=False)`` reads the raw arrays instead: they
may hold rows past the commit marker (trust only the committed rows, FORMAT.md), bf16 fields stay
uint16 there (:func:`bf16_bits_to_float32`), and xarray's default dask chunks are the small inner
chunks (pass whole shards instead, e.g. ``chunks={"step": 64}``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import dtypes
from .blockread import read_rows
from .errors import CrucibleError


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 bits -> float32 (exact: bf16 is the top half of a float32)."""
    return dtypes.decode_stored(np.asarray(bits), torch.bfloat16)


def dask_and_xarray():
    try:
        import dask.array as da
        import xarray as xr
    except ImportError:
        raise CrucibleError("to_xarray needs xarray and dask: pip install xarray dask") from None
    return da, xr


def field_dask(field, location: str):
    """A LazyField as a dask array over its committed rows, one chunk per shard, bf16 as float32.
    Each task reopens the run from its location, so no store object or key is pickled."""
    import dask

    da, _ = dask_and_xarray()
    field.check_present(range(len(field)))
    block = field.array.chunks[0]
    dtype = dtypes.shown_dtype(field.dtype)
    parts = [da.from_delayed(dask.delayed(_read_block)(location, field.name, start, min(start + block, len(field)),
                                                       field.dtype),
                             shape=(min(start + block, len(field)) - start,) + tuple(field.shape[1:]), dtype=dtype)
             for start in range(0, len(field), block)]
    if not parts:
        return da.zeros((0,) + tuple(field.shape[1:]), dtype=dtype)
    return da.concatenate(parts)


def _read_block(location: str, name: str, start: int, stop: int, dtype: torch.dtype) -> np.ndarray:
    return dtypes.decode_stored(read_rows(location, name, start, stop), dtype)


def run_to_xarray(run):
    """``xarray.Dataset`` of a Run: one variable per field and constant, lazy where it reads fields."""
    _, xr = dask_and_xarray()
    variables, coords = {}, {}
    for name in run.fields:
        field = run[name]
        dims = tuple(field.array.metadata.dimension_names or ())
        variables[name] = (dims, field_dask(field, run.location), {"every": field.every})
        coords[dims[0]] = np.asarray(field.steps, dtype=np.int64)
        if field.rows is not None:
            coords[dims[1]] = field.rows.numpy()
    for name in run.info.constants:
        dims = tuple(run.group[name].metadata.dimension_names or ())
        variables[name] = (dims, dtypes.numpy_values(run.constant(name)))
    return xr.Dataset(variables, coords=coords,  # the run's attributes (cr.record(attributes=...)), then these two
                      attrs={**run.info.attributes, "run": run.location, "committed_steps": run.committed_steps})
