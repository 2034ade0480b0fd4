"""`crucible-record import`: a notebook output file -> a Crucible-3 run, streamed.

The notebook saves ``crucible_3_trajectory.safetensors`` (``W`` bf16 bits (steps+1, vocab, hidden),
``h_mean`` (steps, hidden), ``loss`` (steps+1,) with ``loss[0]`` NaN, ``dead_mask``, ``dead_indices``)
and ``metadata.json``. The run is what a recorded one would be: step ``s`` holds ``W[s]``,
``h_mean[s-1]`` (NaN at step 0) and ``loss[s]``; exporting it gives the input back byte for byte.

What the file does not say, the run does not invent: a step's **epoch** is recorded where every
batches-per-epoch count consistent with ``total_epochs`` agrees, **-1 (unknown)** elsewhere; the
**config** comes from ``metadata.json`` (checked against the tensors) or, without it, from the
shapes and RunConfig defaults, as ``attributes["import"]["config_from"]`` says.

Nothing is written until the whole input has been checked; the run is written into a hidden
sibling folder, renamed to ``--out`` when complete and removed on failure. Memory stays flat: plain
reads (mapped pages count as resident), one block of steps at a time, through the Recorder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, dtypes
from ..codecs import Layout, time_chunk_for
from ..errors import CrucibleError
from ..api import record
from ..safetensors_io import header as safetensors_header
from ..safetensors_io import parse_header
from ..storage import MAX_METADATA_BYTES, fsync_path, is_url, open_regular, open_store, read_fd
from .config import NOTEBOOK_KEYS, RunConfig
from .data import TokenMasks
from .engine import fields
from .trajectory import EXPERIMENT

# name -> (safetensors dtype, numpy dtype, number of dimensions)
NOTEBOOK_TENSORS = {
    "W": ("U16", "<u2", 3),
    "h_mean": ("F32", "<f4", 2),
    "loss": ("F32", "<f4", 1),
    "dead_mask": ("BOOL", "|u1", 1),
    "dead_indices": ("I64", "<i8", 1),
}
# every key the notebook's metadata.json holds, in its order
METADATA_KEYS = ("experiment", "series", "date", *NOTEBOOK_KEYS, "n_dead_tokens", "n_live_tokens", "final_loss",
                 "total_epochs", "device", "data_shapes", "notes")
UNKNOWN_EPOCH = -1


@dataclass
class NotebookFile:
    """A checked notebook output file: where each tensor's bytes are."""

    path: Path
    size: int
    header: bytes  # length prefix + JSON, as in the file
    data_start: int
    entries: dict[str, tuple[str, list[int], int, int]]  # name -> (dtype, shape, begin, end) in the data
    steps: int  # W's shape: (steps + 1, vocab, hidden)
    vocab: int
    hidden: int

    def read(self, f, name: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """Rows [first, first+count) of a tensor, by plain reads (never memory-mapped)."""
        dtype, shape, begin, _ = self.entries[name]
        np_dtype = np.dtype(NOTEBOOK_TENSORS[name][1])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np_dtype.itemsize
        count = shape[0] - first if count is None else count
        offset = self.data_start + begin + first * row_bytes
        try:
            data = read_fd(f.fileno(), offset, offset + count * row_bytes)
        except OSError as e:
            raise CrucibleError(f"cannot read {self.path}: {e.strerror or e}") from None
        if len(data) != count * row_bytes:
            raise CrucibleError(f"{self.path} ended early, inside tensor {name}")
        out = np.frombuffer(data, dtype=np_dtype).reshape(count, *shape[1:])
        return out.astype(np_dtype.newbyteorder("="), copy=False)


@dataclass
class ImportSummary:
    run_dir: Path
    steps: int
    vocab: int
    hidden: int
    config_from: str
    byte_identical_export: bool
    epochs_known: int  # training steps whose epoch is known (of `steps`)
    bytes_on_disk: int


def import_notebook(file: str | Path, out: str | Path, metadata: str | Path | None = None, *,
                    layout: Layout | None = None, durability: str = "fsync") -> ImportSummary:
    """Turn the notebook's safetensors file (and metadata.json) into a Crucible-3 run at `out`."""
    if is_url(out):
        raise CrucibleError(f"--out {out}: import writes a local run directory (copy it to a store afterwards)")
    file, out = Path(file), Path(out)
    layout = layout or Layout()
    layout.validate()
    if out.is_symlink():  # (the run is renamed into place: a link there would be replaced, or followed)
        raise CrucibleError(f"--out {out} is a symlink; give the path of a new directory itself")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CrucibleError(f"--out {out} already exists and is not empty; choose a new directory")
    nb = read_notebook_file(file)
    with _open_input(file) as f:
        masks = check_tensors(nb, f)
        meta = load_metadata(Path(metadata)) if metadata is not None else None
        if meta is not None:
            config = check_metadata(meta, nb, Path(metadata), f)
            config_from = f"metadata file {Path(metadata).name}"
        else:
            heads = RunConfig().num_heads
            try:
                config = RunConfig(steps=nb.steps, vocab_size=nb.vocab, hidden_dim=nb.hidden,
                                   num_heads=heads if nb.hidden % heads == 0 else 1)
            except CrucibleError as e:
                raise CrucibleError(f"{file}: the shapes make no Crucible-3 config: {e}") from None
            config_from = ("tensor shapes (steps, vocab_size, hidden_dim); every other key is a RunConfig default"
                           + (", num_heads 1 (2 does not divide hidden_dim)" if config.num_heads == 1 else "")
                           + ", not necessarily the notebook's value")
        try:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise CrucibleError(f"cannot read {file}: {e.strerror or e}") from None
    epochs = EpochBounds(nb.steps, meta["total_epochs"] if meta is not None else None)
    tensors = {name: (dtype, shape, end - begin) for name, (dtype, shape, begin, end) in nb.entries.items()}
    canonical = safetensors_header(tensors)[0] == nb.header  # what safetensors' save_file (and `export`) writes?
    attributes = {
        "experiment": EXPERIMENT,
        "config": config.to_dict(),
        "provenance": {"imported_by": f"crucible-record {__version__}",
                       "device": meta["device"] if meta is not None else "unknown"},
        "checkpoints": False,
        "import": {
            "source": file.name,
            "sha256": sha256,
            "bytes": nb.size,
            "imported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config_from": config_from,
            "epoch": "the file does not record epoch boundaries: -1 = unknown; known where every batches-per-epoch "
                     "count consistent with total_steps and total_epochs gives the same epoch",
            "epochs_known": epochs.known_steps(),
            "byte_identical_export": canonical,
        },
    }
    if meta is not None:
        attributes["date"] = meta["date"]
        attributes["notebook_metadata"] = meta
    _write_run(nb, out, config, attributes, masks, epochs, layout, durability)
    return ImportSummary(out, nb.steps, nb.vocab, nb.hidden, config_from, canonical, epochs.known_steps(),
                         open_store(out).bytes_on_disk())


# ----- checking the input --------------------------------------------------------------------
def read_notebook_file(path: Path) -> NotebookFile:
    """Parse and check the safetensors header: the notebook's five tensors, dtypes and shapes."""
    from safetensors import SafetensorError, safe_open

    try:
        with _open_input(path) as f:  # the header only: the tensors are streamed later by plain reads
            size = os.fstat(f.fileno()).st_size
            parsed = parse_header(f.read, size, str(path))
    except OSError as e:
        raise CrucibleError(f"cannot read {path}: {e.strerror or e}") from None
    try:  # the safetensors library's own checks (it opens the header only; no tensor is read)
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CrucibleError(f"{path} is not a safetensors file ({text})") from None
    entries = parsed.entries
    missing = [t for t in NOTEBOOK_TENSORS if t not in entries]
    if missing:
        raise CrucibleError(f"{path} is not a notebook output: tensor(s) {', '.join(missing)} missing "
                            f"(it holds {', '.join(entries) or 'none'})")
    extra = sorted(set(entries) - set(NOTEBOOK_TENSORS))
    if extra:
        raise CrucibleError(f"{path} is not a notebook output: unexpected tensor(s) {', '.join(extra)} "
                            f"(a Crucible-3 run would drop them)")
    for t, (dtype, _, ndim) in NOTEBOOK_TENSORS.items():
        got, shape = entries[t][0], entries[t][1]
        if got != dtype:
            raise CrucibleError(f"{path}: tensor {t} has dtype {got}, the notebook writes {dtype}")
        if len(shape) != ndim:
            raise CrucibleError(f"{path}: tensor {t} has shape {shape}, the notebook writes {ndim} dimension(s)")
    W, h_mean, loss, dead_mask, dead_indices = (entries[t][1] for t in NOTEBOOK_TENSORS)
    steps = W[0] - 1
    if steps < 1:
        raise CrucibleError(f"{path}: W has shape {W}: no training step (the notebook writes steps+1 rows)")
    if W[1] < 1 or W[2] < 1:
        raise CrucibleError(f"{path}: W has shape {W}: an empty vocabulary or width")
    if h_mean[0] != steps or loss[0] != steps + 1:
        raise CrucibleError(f"{path}: inconsistent step counts: W has {W[0]} rows (steps+1), h_mean {h_mean[0]} "
                            f"(steps), loss {loss[0]} (steps+1)")
    if h_mean[1] != W[2]:
        raise CrucibleError(f"{path}: h_mean has shape {h_mean}, its width differs from W's {W[2]}")
    if dead_mask[0] != W[1]:
        raise CrucibleError(f"{path}: dead_mask has shape {dead_mask}, W's vocabulary is {W[1]}")
    if dead_indices[0] > W[1]:
        raise CrucibleError(f"{path}: dead_indices has {dead_indices[0]} entries for a vocabulary of {W[1]}")
    return NotebookFile(path, size, parsed.raw, parsed.data_start, entries, steps, W[1], W[2])


def check_tensors(nb: NotebookFile, f) -> TokenMasks:
    """The values the steps' rows do not stream: masks consistent, loss[0] NaN. Returns the masks."""
    mask = nb.read(f, "dead_mask")
    if (mask > 1).any():
        raise CrucibleError(f"{nb.path}: dead_mask holds bytes other than 0 and 1")
    indices = nb.read(f, "dead_indices")
    if not np.array_equal(indices, np.flatnonzero(mask)):
        raise CrucibleError(f"{nb.path}: dead_indices does not list the tokens set in dead_mask "
                            f"({len(indices)} indices, {int(mask.sum())} dead tokens)")
    first = nb.read(f, "loss", 0, 1)[0]
    if not np.isnan(first):
        raise CrucibleError(f"{nb.path}: loss[0] is {float(first)}, the notebook writes NaN (no step yet)")
    return TokenMasks(torch.from_numpy(mask.astype(bool)), torch.from_numpy(indices.astype(np.int64)))


def load_metadata(path: Path) -> dict[str, Any]:
    """The notebook's metadata.json: a regular file of at most MAX_METADATA_BYTES."""
    try:
        fd, size = open_regular(path, MAX_METADATA_BYTES, follow=True, what="metadata file ")
    except FileNotFoundError:
        raise CrucibleError(f"cannot read metadata file {path}: No such file or directory") from None
    except IsADirectoryError:
        raise CrucibleError(f"metadata file {path} is a directory, not a file") from None
    try:
        text = bytes(read_fd(fd, 0, size))
    except OSError as e:
        raise CrucibleError(f"cannot read metadata file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        meta = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CrucibleError(f"metadata file {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CrucibleError(f"metadata file {path} must hold a JSON object, not {type(meta).__name__}")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise CrucibleError(f"metadata file {path} lacks the notebook's key(s) {', '.join(missing)}")
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise CrucibleError(f"metadata file {path} has key(s) the notebook does not write: {', '.join(unknown)}")
    return meta


def check_metadata(meta: dict[str, Any], nb: NotebookFile, path: Path, f) -> RunConfig:
    """The config the metadata gives, after checking every value the tensors also say."""
    def bad(text: str) -> CrucibleError:
        return CrucibleError(f"metadata file {path} does not match {nb.path.name}: {text}")

    for key in ("experiment", "series", "date", "device", "notes"):
        if not isinstance(meta[key], str):
            raise CrucibleError(f"metadata file {path}: {key} must be a string, got {meta[key]!r}")
    try:
        config = RunConfig.from_dict({NOTEBOOK_KEYS[k]: meta[k] for k in NOTEBOOK_KEYS})
    except CrucibleError as e:
        raise CrucibleError(f"metadata file {path}: {e}") from None
    for key, value in (("total_steps", nb.steps), ("vocab_size", nb.vocab), ("hidden_dim", nb.hidden)):
        if meta[key] != value:
            raise bad(f"{key} is {meta[key]}, the tensors have {value}")
    n_dead = nb.entries["dead_indices"][1][0]
    for key, value in (("n_dead_tokens", n_dead), ("n_live_tokens", nb.vocab - n_dead)):
        if _int(meta[key]) != value:
            raise bad(f"{key} is {meta[key]!r}, dead_mask has {value}")
    shapes = {t: nb.entries[t][1] for t in ("W", "h_mean", "loss")}
    if meta["data_shapes"] != shapes:
        raise bad(f"data_shapes is {meta['data_shapes']!r}, the tensors have {shapes}")
    last = float(nb.read(f, "loss", nb.steps, 1)[0])
    final = meta["final_loss"]
    if isinstance(final, bool) or not isinstance(final, (int, float)) or not (
            final == last or (math.isnan(final) and math.isnan(last))):
        raise bad(f"final_loss is {final!r}, loss[-1] is {last!r}")
    epochs = _int(meta["total_epochs"])
    if epochs is None or not 1 <= epochs <= nb.steps or (epochs - 1) * -(-nb.steps // epochs) >= nb.steps:
        raise bad(f"total_epochs {meta['total_epochs']!r} is impossible for {nb.steps} steps "
                  f"(every epoch has the same number of batches)")
    return config


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class EpochBounds:
    """What the step count and total_epochs say about each step's epoch (see the module docstring)."""

    def __init__(self, steps: int, total_epochs: int | None):
        self.steps = steps
        if total_epochs is None:
            self.fewest, self.most = 1, None  # batches per epoch: any B >= 1
        else:
            self.fewest = -(-steps // total_epochs)
            self.most = (steps - 1) // (total_epochs - 1) if total_epochs > 1 else None

    def at(self, first: int, count: int) -> np.ndarray:
        """Epochs of steps first..first+count-1: 0 at step 0, -1 where unknown."""
        s = np.arange(first, first + count, dtype=np.int64)
        high = -(-s // self.fewest)
        low = np.ones_like(s) if self.most is None else -(-s // self.most)
        epoch = np.where(high == low, high, UNKNOWN_EPOCH)
        epoch[s == 0] = 0
        return epoch

    def known_steps(self) -> int:
        return int((self.at(1, self.steps) != UNKNOWN_EPOCH).sum())


# ----- writing the run -----------------------------------------------------------------------
def _write_run(nb: NotebookFile, out: Path, config: RunConfig, attributes: dict, masks: TokenMasks,
               epochs: EpochBounds, layout: Layout, durability: str) -> None:
    """Record every step into a hidden sibling of `out`, then rename it to `out`. The file is read
    one block of W's stored steps at a time."""
    created = list(itertools.takewhile(lambda p: not p.exists(), out.parents))  # removed again on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CrucibleError(f"cannot create {out.parent}: {e.strerror or e}") from None
    tmp = out.parent / f".{out.name}.import-{uuid.uuid4().hex[:12]}"
    block = time_chunk_for(layout, nb.vocab * nb.hidden * 2)
    nan_h = torch.full((nb.hidden,), float("nan"), dtype=torch.float32)
    try:
        recorder = record(tmp, fields(config), steps=nb.steps + 1, attributes=attributes, constants=masks.constants(),
                          layout=layout, commit_interval=1e9, durability=durability)
        try:
            with _open_input(nb.path) as f:
                for first in range(0, nb.steps + 1, block):
                    count = min(block, nb.steps + 1 - first)
                    W = dtypes.from_stored(torch.from_numpy(nb.read(f, "W", first, count)), torch.bfloat16)
                    h_first = max(first - 1, 0)
                    h_mean = torch.from_numpy(nb.read(f, "h_mean", h_first, first + count - 1 - h_first))
                    loss = torch.from_numpy(nb.read(f, "loss", first, count))
                    epoch = torch.from_numpy(epochs.at(first, count))
                    for i, step in enumerate(range(first, first + count)):
                        h = nan_h if step == 0 else h_mean[step - 1 - h_first]
                        recorder.record(step, W=W[i], h_mean=h, loss=loss[i], epoch=epoch[i])
                    del W, h_mean, loss
        finally:
            recorder.close()
        if out.exists():
            out.rmdir()  # an empty directory (checked before): replaced by the run
        os.rename(tmp, out)
        if durability == "fsync":
            fsync_path(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            raise CrucibleError(f"cannot write {out}: {e.strerror or e}") from None
        raise


def _open_input(path: Path):
    """The input file: a regular file (a symlink the user named is followed), never a FIFO or device."""
    try:
        fd, _ = open_regular(path, sys.maxsize, follow=True)
    except FileNotFoundError:
        raise CrucibleError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise CrucibleError(f"{path} is not a file") from None
    return os.fdopen(fd, "rb")

