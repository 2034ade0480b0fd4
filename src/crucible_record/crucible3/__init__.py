"""The Crucible-3 experiment (the notebook), one client of the generic recorder: config, data,
model, engine (the training loop), checkpoints, export, analysis and its report."""
