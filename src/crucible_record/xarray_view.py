"""A run as an ``xarray.Dataset`` backed by dask: named axes, W decoded to float32 lazily.

Two ways in:

* ``to_xarray(cr.open(run_dir))`` (this module): committed steps only, W as float32, and every
  variable on one ``step`` axis (see below).
* ``xarray.open_zarr(run_dir / "trajectory.zarr", consolidated=False)``: the raw store with its own
  dimension names (W ``(step, token, hidden)`` uint16 bf16 bits, h_mean ``(step_minus_one, hidden)``,
  loss ``(step,)``, dead_mask ``(token,)``, dead_indices ``(dead_token,)``). Pass ``consolidated=False``
  (the store has no consolidated metadata; without it xarray warns and falls back). The arrays are
  pre-sized to the configured run: only the first ``ds.attrs["commit"]["steps"] + 1`` steps of W and
  loss (and ``commit.steps`` rows of h_mean) are data; the rest is fill value. W stays uint16: decode
  with :func:`bf16_bits_to_float32`.

Axis choice of to_xarray: ``h_mean`` is put on the ``step`` axis of W, with ``h_mean.sel(step=s)``
(s >= 1) being the h_mean from the forward pass of training step s, i.e. the stored ``h_mean[s-1]``,
recorded together with ``W.sel(step=s)`` and ``loss.sel(step=s)``; ``h_mean.sel(step=0)`` is NaN,
like ``loss.sel(step=0)``. So ``ds.sel(step=s)`` is everything recorded after training step s.
"""

from __future__ import annotations

import json

import numpy as np

from .errors import CrucibleError


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 bits -> float32 (exact: bf16 is the top half of a float32)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def to_xarray(traj):
    """``xarray.Dataset`` of a Trajectory's committed steps, lazy (dask) wherever it reads W.

    Variables: ``W`` (step, token, hidden) float32, decoded chunk by chunk from the stored bf16 bits
    (dask chunks = the store's chunks); ``h_mean`` (step, hidden) float32 with NaN at step 0 (see the
    module docstring for why it sits on ``step``); ``loss`` (step,) float32, NaN at step 0;
    ``dead_mask`` and ``live_mask`` (token,) bool. Coordinates ``step`` = 0..n and ``token`` = 0..vocab-1.
    """
    try:
        import dask.array as da
        import xarray as xr
    except ImportError:
        raise CrucibleError("to_xarray needs xarray and dask: pip install xarray dask") from None

    n = traj.steps
    group = traj.group
    hidden = group["W"].shape[2]
    vocab = group["W"].shape[1]
    bits = da.from_zarr(group["W"])[: n + 1]
    W = bits.map_blocks(bf16_bits_to_float32, dtype=np.float32)
    h_rows = da.from_zarr(group["h_mean"])[:n]
    h_mean = da.concatenate([da.full((1, hidden), np.nan, dtype=np.float32, chunks=(1, hidden)), h_rows], axis=0)
    loss = da.from_zarr(group["loss"])[: n + 1]
    dead = traj.dead_mask.numpy().astype(bool)
    config = traj.attrs.get("config", {})
    return xr.Dataset(
        {
            "W": (("step", "token", "hidden"), W,
                  {"description": "token embedding after step t (t = 0: initialisation)",
                   "encoding": "bfloat16 values decoded exactly to float32"}),
            "h_mean": (("step", "hidden"), h_mean,
                       {"description": "mean final hidden state of the forward pass of training step t "
                                       "(stored h_mean[t-1]); NaN at step 0"}),
            "loss": (("step",), loss, {"description": "training loss of step t; NaN at step 0"}),
            "dead_mask": (("token",), dead, {"description": "tokens that never occur in the corpus"}),
            "live_mask": (("token",), ~dead, {"description": "tokens that occur in the corpus"}),
        },
        coords={"step": np.arange(n + 1), "token": np.arange(vocab)},
        attrs={
            "run_dir": str(traj.run_dir),
            "committed_steps": n,
            "configured_steps": int(config.get("steps", n)),
            "config": json.dumps(config),
        },
    )
