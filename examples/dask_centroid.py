"""The dead-token centroid of every step, computed by dask in parallel straight from the Zarr store.

    python examples/dask_centroid.py RUN_DIR        # a Crucible-3 run (crucible-record train)
    python examples/dask_centroid.py --small        # records a small run into runs/ first (seconds)

Two equivalent ways to get a named, lazy view of a run:

* ``xarray.open_zarr(RUN_DIR/trajectory.zarr, consolidated=False)`` opens the raw store (it has no
  consolidated metadata). W is uint16 bf16 bits there, and the arrays may hold rows past the
  commit marker (or fill values, for a run sized up front): keep the first ``S`` steps, where ``S``
  is ``steps`` in ``trajectory.zarr/commit.json`` (FORMAT.md). Pass dask chunks equal to whole
  shards (``chunks={"step": time_chunk}``); xarray's default is the small inner chunks.
* ``cr.open(RUN_DIR).to_xarray()`` does all of that for you and decodes W to float32 lazily.

Each dask task reads and decodes one stored block (steps x all tokens x hidden) and reduces it; the
threaded scheduler runs them on all cores. Memory stays around a few blocks per worker.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import xarray as xr

import crucible_record as cr
from crucible_record.xarray_view import bf16_bits_to_float32
from crucible_run_arg import crucible_run  # examples/crucible_run_arg.py: RUN_DIR or --small


def main() -> None:
    run_dir = Path(crucible_run(__doc__, "dask-centroid"))
    store = run_dir / "trajectory.zarr"
    if not (store / "commit.json").is_file():
        raise cr.CrucibleError(f"{run_dir} is not a crucible-record run (no {store / 'commit.json'})")

    # 1. The raw store through xarray, with its named dimensions.
    # zarr lists commit.json (the run's commit marker, not a zarr node) and warns about it: harmless.
    warnings.filterwarnings("ignore", message="Object at commit.json is not recognized")
    n = json.loads((store / "commit.json").read_text())["steps"]  # committed: steps 0 .. n-1
    time_chunk = json.loads((store / "W" / "zarr.json").read_text())["attributes"]["crucible_record"]["time_chunk"]
    # one dask chunk per shard: time_chunk steps x all tokens x all hidden
    raw = xr.open_zarr(store, consolidated=False, chunks={"step": time_chunk, "token": -1, "hidden": -1})
    print(f"{run_dir}: {n} committed steps; dims of W: {raw.W.dims}, of h_mean: {raw.h_mean.dims}")

    bits = raw.W.isel(step=slice(0, n))  # (step, token, hidden) uint16, lazy
    W = xr.apply_ufunc(bf16_bits_to_float32, bits, dask="parallelized", output_dtypes=[np.float32])
    dead = np.flatnonzero(raw.dead_mask.values)  # a constant of the run: (token,) bool
    # sum then divide keeps the per-chunk work a plain float32 reduction over the chunk's dead tokens
    centroid_dead = W.isel(token=dead).sum("token") / len(dead)

    start = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        result = centroid_dead.compute()
    seconds = time.perf_counter() - start
    print(f"dead centroid: shape {result.shape} ({len(dead)} dead tokens), computed by dask in {seconds:.2f} s "
          f"over {W.data.npartitions} chunks")
    norms = np.linalg.norm(result.values, axis=1)
    print(f"  |c_dead| at t=0: {norms[0]:.6f}   at t={n - 1}: {norms[-1]:.6f}")
    print(f"  total displacement: {np.linalg.norm(result.values[-1] - result.values[0]):.6f}")

    # 2. Cross-check against crucible-record's own streaming computation (torch, float32).
    from crucible_record.crucible3 import open_trajectory
    from crucible_record.crucible3.analysis import centroids

    ours, _ = centroids(open_trajectory(run_dir))
    print(f"  max |dask - crucible_record.crucible3.analysis.centroids| = {np.abs(result.values - ours.numpy()).max():.2e}")


if __name__ == "__main__":
    try:
        main()
    except cr.CrucibleError as e:  # e.g. not a run, or an existing run at --out: one line, no traceback
        sys.exit(f"error: {e}")
