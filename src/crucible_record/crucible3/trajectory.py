"""A Crucible-3 run read back with the notebook's names: ``t.W``, ``t.h_mean``, ``t.loss``, masks.

The run itself is a generic one (fields ``W``, ``h_mean``, ``loss``, ``epoch``; constants
``dead_mask``, ``dead_indices``); this class only maps the notebook's conventions onto it. The
notebook's pairing, h_mean[i] from the forward pass of step i+1, is recorded generically: every
field is recorded at every step, and at step 0 (the initial embedding, before any forward pass)
h_mean and loss are NaN. ``t.h_mean`` drops that row, as the notebook's ``h_mean_history`` has none.
A run recorded with ``train --record`` has the fields ``W_grad``, ``W_exp_avg``, ``W_exp_avg_sq``
too (``t["W_grad"]``; bf16, NaN at step 0; ``t["W_grad"].rows``: the kept token ids, or None).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import CrucibleError
from ..reader import Run
from .config import RunConfig

EXPERIMENT = "crucible-3"


def is_crucible(run: Run) -> bool:
    """Format-1 runs were all Crucible-3 runs; format-2 runs say so in their attributes."""
    return run.version == 1 or run.attributes.get("experiment") == EXPERIMENT


class Trajectory(Run):
    """A Crucible-3 run opened for reading; everything reflects the committed steps only.

    The generic interface (``t["W"]``, ``t["W_grad"]``, ``t.fields``, ``t.committed_steps``) works too.
    """

    def __init__(self, source: str | Path | Run):
        run = source if isinstance(source, Run) else Run(source)
        if not is_crucible(run):
            raise CrucibleError(f"{run.location} is not a Crucible-3 run (it records {', '.join(run.fields)}); "
                                f"this command needs one")
        if run.committed_steps < 1:
            raise CrucibleError(f"{run.location} has no committed step yet")
        self.__dict__.update(run.__dict__)  # the opened run's state: nothing is read twice
        self.attrs: dict[str, Any] = run.attributes
        self.steps = run.committed_steps - 1  # training steps: W holds steps 0..steps
        self.W = run["W"]

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
        return int(self.commit.get("epoch", 0))  # format 1 kept it in the commit marker

    def to_xarray(self):
        """An xarray.Dataset over the committed steps, W decoded to float32 lazily (dask)."""
        from ..xarray_view import crucible_to_xarray

        return crucible_to_xarray(self)

    def __repr__(self) -> str:
        return f"Trajectory({self.location!r}, steps={self.steps}, W={tuple(self.W.shape)})"
