"""A Crucible-3 run read back with the notebook's names: ``t.W``, ``t.h_mean``, ``t.loss``, masks.

The run is a generic one; a Trajectory holds it (``t.run``) and maps the notebook's conventions onto
it by composition, so the generic reader never learns the experiment's names. Every field is recorded
at every step, so at step 0 (before any forward pass) h_mean and loss are NaN; ``t.h_mean`` drops that
row, as the notebook's ``h_mean_history`` has none.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import CrucibleError
from ..reader import LazyField, Run
from ..xarray_view import dask_and_xarray, field_dask
from .config import RunConfig

EXPERIMENT = "crucible-3"


def is_crucible(run: Run) -> bool:
    """Format-1 runs were all Crucible-3 runs; format-2 runs say so in their attributes."""
    return run.version == 1 or run.attributes.get("experiment") == EXPERIMENT


def open_trajectory(source: str | Path | Run) -> Trajectory:
    """Open a Crucible-3 run (a path, a URL or an opened :class:`Run`) with the notebook's names."""
    return Trajectory(source if isinstance(source, Run) else Run(source))


class Trajectory:
    """A Crucible-3 run opened for reading (committed steps only); ``t.run`` is the generic Run."""

    def __init__(self, run: Run):
        if not is_crucible(run):
            raise CrucibleError(f"{run.location} is not a Crucible-3 run (it records {', '.join(run.fields)}); "
                                f"this command needs one")
        if run.committed_steps < 1:
            raise CrucibleError(f"{run.location} has no committed step yet")
        self.run = run
        self.steps = run.committed_steps - 1  # training steps: W holds steps 0..steps
        self.W = run["W"]

    # the generic run's own answers, passed through
    location = property(lambda self: self.run.location)
    run_dir = property(lambda self: self.run.run_dir)
    committed_steps = property(lambda self: self.run.committed_steps)
    fields = property(lambda self: self.run.fields)
    version = property(lambda self: self.run.version)
    attrs = property(lambda self: self.run.attributes)

    def __getitem__(self, name: str) -> LazyField | torch.Tensor:
        return self.run[name]

    def __contains__(self, name: str) -> bool:
        return name in self.run

    def constant(self, name: str) -> torch.Tensor:
        return self.run.constant(name)

    @cached_property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.attrs["config"])

    @cached_property
    def h_mean(self) -> torch.Tensor:
        """(steps, hidden) float32; h_mean[i] is from the forward pass of step i+1."""
        field = self["h_mean"]
        return field[1 - field.steps.start:]

    @cached_property
    def loss(self) -> torch.Tensor:
        """(steps+1,) float32; loss[0] is NaN (no step yet)."""
        return self["loss"][:]

    @cached_property
    def dead_mask(self) -> torch.Tensor:
        return self.constant("dead_mask")

    @property
    def live_mask(self) -> torch.Tensor:
        return ~self.dead_mask

    @cached_property
    def dead_indices(self) -> torch.Tensor:
        return self.constant("dead_indices")

    @cached_property
    def epochs(self) -> int:
        """Epochs begun by the last committed step."""
        if "epoch" in self.fields:
            return int(self["epoch"][-1])
        return int(self.run.commit.get("epoch", 0))  # format 1 kept it in the commit marker

    def to_xarray(self):
        """An xarray.Dataset over the committed steps, W decoded to float32 lazily (dask);
        ``ds.sel(step=s)`` is everything recorded after training step s."""
        da, xr = dask_and_xarray()
        n = self.steps
        hidden, vocab = self.W.shape[2], self.W.shape[1]
        h_mean = field_dask(self["h_mean"], self.location)
        if self["h_mean"].steps.start == 1:  # format 1 stored h_mean from step 1
            h_mean = da.concatenate([da.full((1, hidden), np.nan, dtype=np.float32, chunks=(1, hidden)), h_mean])
        dead = self.dead_mask.numpy().astype(bool)
        return xr.Dataset(
            {
                "W": (("step", "token", "hidden"), field_dask(self.W, self.location),
                      {"description": "token embedding after step t (t = 0: initialisation)",
                       "encoding": "bfloat16 values decoded exactly to float32"}),
                "h_mean": (("step", "hidden"), h_mean,
                           {"description": "mean final hidden state of the forward pass of training step t; NaN at step 0"}),
                "loss": (("step",), field_dask(self["loss"], self.location), {"description": "training loss of step t; NaN at step 0"}),
                "dead_mask": (("token",), dead, {"description": "tokens that never occur in the corpus"}),
                "live_mask": (("token",), ~dead, {"description": "tokens that occur in the corpus"}),
            },
            coords={"step": np.arange(n + 1), "token": np.arange(vocab)},
            attrs={"run": self.location, "committed_steps": n,
                   "configured_steps": int(self.attrs.get("config", {}).get("steps", n)),
                   "config": json.dumps(self.attrs.get("config", {}))},
        )

    def __repr__(self) -> str:
        return f"Trajectory({self.location!r}, steps={self.steps}, W={tuple(self.W.shape)})"
