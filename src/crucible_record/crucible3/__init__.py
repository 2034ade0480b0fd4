"""The Crucible-3 experiment (the notebook), one client of the generic recorder: config, data,
model, engine (the training loop), checkpoints, export, analysis, its report and CLI commands.

``open_trajectory(run)`` is the notebook-shaped view of a recorded run (``t.W``, ``t.h_mean``, ...),
imported on first use (PEP 562), as the package's own names are."""


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'crucible_record.crucible3' has no attribute {name!r}")
    from . import trajectory

    return getattr(trajectory, name)


__all__ = ["Trajectory", "open_trajectory"]
