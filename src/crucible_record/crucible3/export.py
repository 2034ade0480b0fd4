"""A Crucible-3 run -> the notebook's crucible_3_trajectory.safetensors + metadata.json, streamed.

Byte for byte what the notebook saves (tests/test_fidelity.py), h_mean without the run's NaN row of
step 0. Fields from ``--record`` are added under their names (NaN at step 0), a row subset's token
ids as ``<name>.rows``; a default run's two files are the notebook's, unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import dtypes
from ..errors import CrucibleError
from ..export import check_targets, field_blocks, tensor_spec, write_safetensors
from ..storage import write_json
from .config import NOTEBOOK_KEYS, RECORDABLE
from .trajectory import Trajectory

TRAJECTORY_FILE = "crucible_3_trajectory.safetensors"
METADATA_FILE = "metadata.json"


def export_safetensors(traj: Trajectory, out_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write the notebook's two files for the committed steps of a run."""
    folder, (target, meta_path) = check_targets(Path(out_dir), [TRAJECTORY_FILE, METADATA_FILE], force, traj.run_dir)
    try:
        tensors = {name: tensor_spec(getattr(traj, name)) for name in ("h_mean", "loss", "dead_mask", "dead_indices")}
        for name in ["W", *recorded_extras(traj)]:  # the notebook saves W's bf16 bits (U16); --record fields alike
            field = traj[name]
            bits = dtypes.stored_torch_dtype(field.dtype)
            tensors[name] = (dtypes.safetensors_name(bits), list(field.shape), field.shape.numel() * bits.itemsize,
                             field_blocks(field))
            if field.rows is not None:
                tensors[f"{name}.rows"] = tensor_spec(field.rows)
        write_safetensors(target, tensors, dir_fd=folder)
        try:
            write_json(meta_path, notebook_metadata(traj), dir_fd=folder)
        except OSError as e:
            raise CrucibleError(f"cannot write {meta_path}: {e.strerror or e}") from None
    finally:
        os.close(folder)
    return target, meta_path


def recorded_extras(traj: Trajectory) -> list[str]:
    """The --record fields of the run (none for a default or imported run)."""
    return [name for name in RECORDABLE.values() if name in traj.fields]


def notebook_metadata(traj: Trajectory) -> dict:
    """The notebook's metadata.json, with the run's values, in the notebook's key order."""
    c = traj.config
    n_dead = int(traj.dead_mask.sum())
    final_loss = float(traj.loss[-1]) if traj.steps > 0 else float("nan")
    meta = {
        "experiment": "Crucible 3",
        "series": "Crucible",
        "date": traj.attrs.get("date", ""),
        **{key: getattr(c, name) for key, name in NOTEBOOK_KEYS.items()},
        "total_steps": traj.steps,  # the committed steps (keeps its place, the first of NOTEBOOK_KEYS)
        "n_dead_tokens": n_dead,
        "n_live_tokens": c.vocab_size - n_dead,
        "final_loss": final_loss,
        "total_epochs": traj.epochs if traj.epochs >= 0 else None,  # -1: unknown (an imported file)
        "device": traj.attrs.get("provenance", {}).get("device", ""),
        "data_shapes": {
            "W": list(traj.W.shape),
            "h_mean": [traj.steps, c.hidden_dim],
            "loss": [traj.steps + 1],
        },
        "notes": "h_mean persistence and live/dead separation study. Records all tokens + h_mean[t]. Same seed as Crucible 1 & 2.",
    }
    extras = recorded_extras(traj)
    if extras:  # not the notebook's: only for a run recorded with --record
        meta["data_shapes"].update((name, list(traj[name].shape)) for name in extras)
        meta["record_rows"] = traj.config.record_rows
    kept = traj.attrs.get("notebook_metadata")
    if isinstance(kept, dict):  # an imported notebook file: its values where the tensors cannot say them
        meta.update((key, kept[key]) for key in ("experiment", "series", "date", "total_epochs", "device", "notes")
                    if key in kept)
    return meta
