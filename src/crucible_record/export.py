"""Store -> the notebook's crucible_3_trajectory.safetensors + metadata.json, streamed.

The safetensors library needs every tensor in memory at once, so the file is written here
directly: an 8-byte little-endian header length, the JSON header (padded with spaces to a
multiple of 8), then the tensors' bytes back to back, W one block of steps at a time. The
layout (tensor order, JSON spelling, padding) matches what ``safetensors.torch.save_file``
writes for the same tensors, byte for byte; tests/test_fidelity.py checks it.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import numpy as np

from .errors import CrucibleError
from .heap import limit_heap_growth
from .store import write_json
from .trajectory import Trajectory

TRAJECTORY_FILE = "crucible_3_trajectory.safetensors"
METADATA_FILE = "metadata.json"

# safetensors orders tensors by dtype (its enum order, largest first), then by name.
_DTYPE_RANK = {"BOOL": 0, "U8": 4, "I8": 5, "I16": 9, "U16": 10, "F16": 11, "BF16": 12,
               "I32": 13, "U32": 14, "F32": 15, "F64": 17, "I64": 18, "U64": 19}


def safetensors_header(tensors: dict[str, tuple[str, list[int], int]]) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix included) and the order the data must follow.

    tensors: name -> (safetensors dtype, shape, number of bytes).
    """
    order = sorted(tensors, key=lambda name: (-_DTYPE_RANK[tensors[name][0]], name))
    header, offset = {}, 0
    for name in order:
        dtype, shape, nbytes = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, order


def export_safetensors(traj: Trajectory, out_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write the notebook's two files for the committed steps of a run."""
    out_dir = Path(out_dir)
    target, meta_path = out_dir / TRAJECTORY_FILE, out_dir / METADATA_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise CrucibleError(f"--out {out_dir} exists and is not a directory")
    for path in (target, meta_path):
        if path.exists() and not force:
            raise CrucibleError(f"{path} already exists; pass --force to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)

    steps, vocab, hidden = traj.steps, traj.W.shape[1], traj.W.shape[2]
    small = {
        "h_mean": traj.h_mean.numpy().astype("<f4"),
        "loss": traj.loss.numpy().astype("<f4"),
        "dead_mask": traj.dead_mask.numpy().astype(bool),
        "dead_indices": traj.dead_indices.numpy().astype("<i8"),
    }
    dtypes = {"h_mean": "F32", "loss": "F32", "dead_mask": "BOOL", "dead_indices": "I64"}
    spec = {name: (dtypes[name], list(a.shape), a.nbytes) for name, a in small.items()}
    spec["W"] = ("U16", [steps + 1, vocab, hidden], (steps + 1) * vocab * hidden * 2)
    header, order = safetensors_header(spec)

    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for name in order:
                if name == "W":
                    _write_w(traj, f)
                else:
                    f.write(small[name].tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise CrucibleError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    write_json(meta_path, notebook_metadata(traj))
    return target, meta_path


def _write_w(traj: Trajectory, f) -> None:
    """W in blocks of whole stored chunks, so memory stays one block whatever the run length."""
    limit_heap_growth()
    block = traj.group["W"].chunks[0]
    for start in range(0, traj.steps + 1, block):
        stop = min(start + block, traj.steps + 1)
        bits = np.ascontiguousarray(traj.W.numpy_bits(slice(start, stop))).astype("<u2", copy=False)
        f.write(memoryview(bits).cast("B"))  # no bytes copy of the block
        del bits  # freed before the next block is decoded


def notebook_metadata(traj: Trajectory) -> dict:
    """The notebook's metadata.json, with the run's values, in the notebook's key order."""
    c = traj.config
    n_dead = int(traj.dead_mask.sum())
    final_loss = float(traj.loss[-1]) if traj.steps > 0 else float("nan")
    return {
        "experiment": "Crucible 3",
        "series": "Crucible",
        "date": traj.attrs.get("date", ""),
        "total_steps": traj.steps,
        "batch_size": c.batch_size,
        "seq_len": c.seq_len,
        "learning_rate": c.lr,
        "weight_decay": c.weight_decay,
        "beta1": c.beta1,
        "beta2": c.beta2,
        "epsilon": c.eps,
        "vocab_size": c.vocab_size,
        "hidden_dim": c.hidden_dim,
        "num_layers": c.num_layers,
        "num_heads": c.num_heads,
        "random_seed": c.seed,
        "n_dead_tokens": n_dead,
        "n_live_tokens": c.vocab_size - n_dead,
        "final_loss": final_loss,
        "total_epochs": traj.epochs,
        "device": traj.attrs.get("provenance", {}).get("device", ""),
        "data_shapes": {
            "W": list(traj.W.shape),
            "h_mean": [traj.steps, c.hidden_dim],
            "loss": [traj.steps + 1],
        },
        "notes": "h_mean persistence and live/dead separation study. Records all tokens + h_mean[t]. Same seed as Crucible 1 & 2.",
    }
