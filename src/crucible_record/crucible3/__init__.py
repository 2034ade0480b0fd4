"""The Crucible-3 experiment (the notebook), one client of the generic recorder: config, data,
model, engine (the training loop), checkpoints, export, analysis, its report and CLI commands.

``open_trajectory(run)`` is the notebook-shaped view of a recorded run (``t.W``, ``t.h_mean``, ...)."""

from .trajectory import Trajectory, open_trajectory

__all__ = ["Trajectory", "open_trajectory"]
