"""Checkpoints for exact resume, with nothing executable in them: one safetensors file.

Tensors are safetensors tensors, everything else JSON in its metadata: a crafted file can at worst
be refused, never run code (torch.load of a pickle could). Written atomically and fsynced.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from ..errors import CrucibleError
from ..safetensors_io import parse_bytes
from ..storage import RunStore

CHECKPOINT_FILE = "checkpoint.safetensors"
_META_KEY = "crucible_checkpoint"
_VERSION = 1


def snapshot(step: int, epoch: int, batches_done: int, epoch_rng_state: torch.Tensor,
             model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything needed to continue after `step` exactly as if never stopped (copied now)."""
    tensors = {"rng.torch_epoch": epoch_rng_state.clone(),
               **{f"model.{key}": value.detach().clone() for key, value in model.state_dict().items()}}
    optim = optimizer.state_dict()
    state_scalars: dict[str, dict[str, Any]] = {}
    for param_id, state in optim["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{name}"] = value.detach().clone()
            else:
                state_scalars.setdefault(str(param_id), {})[name] = value
    np_state = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state.clone()
    python_state = random.getstate()
    meta = {"version": _VERSION, "step": step, "epoch": epoch, "batches_done": batches_done,
            "param_groups": optim["param_groups"], "optimizer_state_scalars": state_scalars,
            "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return {"tensors": tensors, "meta": meta}


def save(store: RunStore, snap: dict[str, Any]) -> None:
    """Replace the run's checkpoint atomically (and durably: fsync on a disk, one PUT on S3)."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in snap["tensors"].items()}
    store.put_file(CHECKPOINT_FILE, save(tensors, metadata={_META_KEY: json.dumps(snap["meta"])}))


def size_limit(model: torch.nn.Module) -> int:
    """The most bytes a checkpoint of `model` may hold: its tensors three times (weights and
    AdamW's two moments) plus 64 MiB (RNG states, step counters, the JSON header). `model` may
    live on the meta device."""
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 3 * nbytes + (64 << 20)


def load(store: RunStore, limit: int) -> dict[str, Any] | None:
    """The checkpoint, or None; a malformed file, or one over `limit` bytes (never read), is refused."""
    from safetensors.torch import load

    path = f"{store.location}/{CHECKPOINT_FILE}"
    try:
        data = store.get_file(CHECKPOINT_FILE, limit)
    except CrucibleError as e:
        raise CrucibleError(f"checkpoint {e}; delete it to resume from step 0") from None
    if data is None:
        return None
    try:
        meta = json.loads(parse_bytes(data, "the file").metadata[_META_KEY])  # (safetensors: from a path only)
        tensors = load(data)
        if not isinstance(meta, dict) or meta.get("version") != _VERSION:
            raise ValueError("unknown checkpoint version")
        for key in ("step", "epoch", "batches_done"):
            if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 0:
                raise ValueError(f"bad {key}")
    except Exception as e:  # anything malformed: refuse in one line, never execute
        raise CrucibleError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"delete it to resume from step 0") from None
    return {"tensors": tensors, "meta": meta}


def _model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state_dict as saved in the checkpoint (its "model." tensors)."""
    return {k[len("model."):]: v for k, v in ckpt["tensors"].items() if k.startswith("model.")}


def check_fits(ckpt: dict[str, Any], model: torch.nn.Module) -> None:
    """Refuse a checkpoint whose model tensors are not `model`'s (names, shapes, dtypes), before a
    resume takes the run; `model` may live on the meta device."""
    saved = _model_state(ckpt)
    wanted = model.state_dict()
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved or name not in wanted:
            why = f"{'no' if name not in saved else 'an unexpected'} tensor model.{name}"
        elif saved[name].shape != wanted[name].shape or saved[name].dtype != wanted[name].dtype:
            why = (f"model.{name} is {saved[name].dtype} {tuple(saved[name].shape)}, "
                   f"this run's is {wanted[name].dtype} {tuple(wanted[name].shape)}")
        else:
            continue
        raise CrucibleError(f"checkpoint does not fit this run ({why}); delete it to resume from step 0")


def restore(ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            device: str) -> tuple[int, int, int]:
    """Load model, optimizer and RNG states; returns (step, epoch, batches_done)."""
    tensors, meta = ckpt["tensors"], ckpt["meta"]
    try:
        model.load_state_dict(_model_state(ckpt))
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, param_id, key = name.split(".", 2)
                state.setdefault(int(param_id), {})[key] = value
        for param_id, scalars in meta["optimizer_state_scalars"].items():
            state.setdefault(int(param_id), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        name, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
        if cuda and device == "cuda":
            torch.cuda.set_rng_state_all(cuda)
        torch.set_rng_state(tensors["rng.torch_epoch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CrucibleError(f"checkpoint does not fit this run ({type(e).__name__}: {first}); delete it to resume from step 0") from None
    return meta["step"], meta["epoch"], meta["batches_done"]
