"""The dead-token centroid of every step, computed by dask in parallel straight from the Zarr store.

    python examples/dask_centroid.py RUN_DIR

Two equivalent ways to get a named, lazy view of the store:

* ``xarray.open_zarr(RUN_DIR/trajectory.zarr, consolidated=False)`` opens the raw store (the store has
  no consolidated metadata, hence ``consolidated=False``). W is uint16 bf16 bits there, and the arrays
  are pre-sized to the configured run, so slice to the committed steps (``attrs["commit"]["steps"]``).
* ``cr.open(RUN_DIR).to_xarray()`` / ``crucible_record.xarray_view.to_xarray(traj)`` does that for you
  and decodes W to float32 lazily.

Each dask task reads and decodes one stored chunk (steps x tokens x hidden) and reduces it; the
threaded scheduler runs them on all cores. Memory stays around a few chunks per worker.
"""

import sys
import time
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from crucible_record.xarray_view import bf16_bits_to_float32

run_dir = Path(sys.argv[1])

# 1. The raw store through xarray, with its named dimensions.
raw = xr.open_zarr(run_dir / "trajectory.zarr", consolidated=False)
n = raw.attrs["commit"]["steps"]  # committed steps: only W[0..n] are data
print(f"{run_dir}: {n} committed steps; dims of W: {raw.W.dims}, of h_mean: {raw.h_mean.dims}")

bits = raw.W.isel(step=slice(0, n + 1))  # (step, token, hidden) uint16, lazy
W = xr.apply_ufunc(bf16_bits_to_float32, bits, dask="parallelized", output_dtypes=[np.float32])
dead = np.flatnonzero(raw.dead_mask.values)
# sum then divide keeps the per-chunk work a plain float32 reduction over the chunk's dead tokens
centroid_dead = W.isel(token=dead).sum("token") / len(dead)

start = time.perf_counter()
with dask.config.set(scheduler="threads"):
    result = centroid_dead.compute()
seconds = time.perf_counter() - start
print(f"dead centroid: shape {result.shape} ({len(dead)} dead tokens), computed by dask in {seconds:.2f} s "
      f"over {W.data.npartitions} chunks")
norms = np.linalg.norm(result.values, axis=1)
print(f"  |c_dead| at t=0: {norms[0]:.6f}   at t={n}: {norms[-1]:.6f}")
print(f"  total displacement: {np.linalg.norm(result.values[-1] - result.values[0]):.6f}")

# 2. Cross-check against crucible-record's own streaming computation (torch, float32).
import crucible_record as cr  # noqa: E402
from crucible_record.crucible3.analysis import centroids  # noqa: E402

ours, _ = centroids(cr.open(run_dir))
print(f"  max |dask - crucible_record.crucible3.analysis.centroids| = {np.abs(result.values - ours.numpy()).max():.2e}")
