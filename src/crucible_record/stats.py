"""Per-step statistics of a field, computed once per stored block (whole shards) and cached.

    from crucible_record.stats import FieldStats, stats
    s = stats(cr.open("runs/x")["W"])          # one pass: {"step", "norm", "mean", ...} numpy arrays
    fs = FieldStats()                          # or keep the cache: a later update reads new blocks only
    fs.update(cr.open("runs/x")["W"]).table()

Row i is the recorded step ``s["step"][i]``; over every stored element of that step (the kept rows
of a ``rows`` field; bf16 decoded exactly; float32 math): ``norm`` ||x_t||, ``mean``, ``max_abs``
max |x_t|, ``update_norm`` ||x_t - x_(t-1)|| between consecutive recorded rows (NaN at the first) and
``update_cos`` the cosine between successive updates (NaN at the first two rows and where an update is
zero; 1: moving straight on, -1: turning back). A field of 2 or more axes also gets the norm of each
of its rows (first axis; the others flattened), averaged into at most ``row_bins`` bins of
consecutive rows: :meth:`FieldStats.row_norms`, a rows x steps heatmap without a second read.

A complete block's results never change (committed steps are immutable); only the last, partial
block of a run being written is read again, and only when it has grown. Memory: one block, two
carried rows and 64 MB of float32 scratch, plus the results (the binned row norms: steps x 256 float32).
"""

from __future__ import annotations

import numpy as np
import torch

from . import dtypes
from .reader import LazyField

STATS = ("norm", "mean", "max_abs", "update_norm", "update_cos")
ROW_BINS = 256
SUB_BYTES = 64 << 20  # float32 temporaries: at most this many bytes of steps at a time


def stats(field: LazyField) -> dict[str, np.ndarray]:
    """Every statistic of `field`'s committed steps (see the module doc), in one pass over its blocks."""
    return FieldStats().update(field).table()


def block_rows(field: LazyField) -> int:
    """Recorded steps per stored block (one shard file) of `field`."""
    array = field.array
    return int((array.shards or array.chunks)[0]) if array.ndim else 1


def row_bin_edges(rows: int, bins: int = ROW_BINS) -> np.ndarray:
    """Start of each bin of consecutive rows, and the end: at most `bins` bins of rows 0..rows-1."""
    return np.unique(np.linspace(0, rows, min(bins, rows) + 1).astype(np.int64))


class FieldStats:
    """The statistics of one field, block by block; :meth:`update` with a newer open of the same run
    reads only the blocks not yet complete."""

    def __init__(self, row_bins: int = ROW_BINS):
        self.row_bins = row_bins
        self._done: list[dict[str, np.ndarray]] = []  # per complete block
        self._before: np.ndarray | None = None  # the last two stored rows of the complete blocks
        self._partial: tuple[int, dict[str, np.ndarray]] | None = None  # (rows, results) of the last block
        self._steps = range(0)

    @property
    def rows(self) -> int:
        """Recorded steps covered."""
        return len(self._steps)

    def update(self, field: LazyField, blocks: int | None = None) -> FieldStats:
        """Cover the committed steps of `field`: complete blocks once, the partial block when it grew;
        at most `blocks` blocks read in this call (None: all, so every committed step is covered)."""
        unit, n = block_rows(field), len(field)
        if n < len(self._done) * unit:  # the commit moved back (verify --repair): start over
            self.__init__(self.row_bins)
        elif self._partial is not None and n < self._partial[0]:  # back to the end of a complete block
            self._partial = None
        for _ in range(-(-n // unit) if blocks is None else blocks):
            first = len(self._done) * unit
            stop = min(first + unit, n)
            if first >= n:
                break
            if stop < first + unit and self._partial is not None and self._partial[0] == stop:
                break  # the partial block has not grown
            data = field.numpy(slice(first, stop)).reshape(stop - first, -1)
            before = np.zeros((0, data.shape[1]), data.dtype) if self._before is None else self._before
            part = block_stats(data, before, field.dtype, field.spec.stored_shape, self.row_bins)
            if stop < first + unit:
                self._partial = (stop, part)
                break
            self._done.append(part)
            self._before, self._partial = np.concatenate([before, data[-2:]])[-2:], None
        self._steps = field.steps[:self._partial[0] if self._partial else len(self._done) * unit]
        return self

    def _parts(self) -> list[dict[str, np.ndarray]]:
        return self._done + ([self._partial[1]] if self._partial else [])

    def table(self) -> dict[str, np.ndarray]:
        """{"step": recorded steps, and each of STATS}: float64 arrays of one value per step."""
        parts = self._parts()
        return {"step": np.asarray(self._steps, dtype=np.int64),
                **{name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0) for name in STATS}}

    def row_norms(self) -> np.ndarray | None:
        """(steps, bins) float32: the mean row norm of each bin of rows (row_bin_edges); None for a
        field of fewer than 2 axes."""
        parts = self._parts()
        if not parts or "row_norms" not in parts[0]:
            return None
        return np.concatenate([p["row_norms"] for p in parts])


def values(stored: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (bf16 as bits) as float32 values."""
    return dtypes.from_stored(torch.from_numpy(np.ascontiguousarray(stored)), dtype).float()


# torch.linalg.vector_norm and einsum add up a long row in float32 loosely (relative errors of 2e-3 and
# 5e-2 over a 50257 x 768 step); torch.sum's cascade keeps about 1e-7. So: products into a scratch
# buffer, then sum.
def dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of (rows, n) a and b; scratch: at least as large, overwritten."""
    return torch.mul(a, b, out=scratch[:len(a)]).sum(dim=-1)


def norm(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The L2 norm over the last axis (scratch: as for dot)."""
    return dot(x, x, scratch).sqrt()


def block_stats(flat: np.ndarray, before: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...],
                row_bins: int = ROW_BINS) -> dict[str, np.ndarray]:
    """STATS (and binned row norms) of the stored steps `flat` (steps, elements); `before`: up to two
    stored steps just before them (none at the first step of the field)."""
    n = len(flat)
    out = {name: np.full(n, np.nan) for name in STATS}
    if len(shape) >= 2:
        edges = row_bin_edges(shape[0], row_bins)
        out["row_norms"] = np.zeros((n, len(edges) - 1), dtype=np.float32)
    last = values(before[-1:], dtype)[0] if len(before) else None  # x_(t-1)
    last_update = last - values(before[-2:-1], dtype)[0] if len(before) == 2 else None  # x_(t-1) - x_(t-2)
    sub = max(1, SUB_BYTES // max(4 * flat.shape[1], 1))
    # float32 buffers reused from one group of steps to the next (fresh ones are page-fault bound)
    x_buffer, update_buffer, scratch = (torch.empty((min(sub, n), flat.shape[1])) for _ in range(3))
    for a in range(0, n, sub):
        k = len(flat[a:a + sub])
        x = x_buffer[:k].copy_(dtypes.from_stored(torch.from_numpy(np.ascontiguousarray(flat[a:a + k])), dtype))
        out["norm"][a:a + k] = norm(x, scratch[:k]).numpy()
        out["mean"][a:a + k] = x.mean(dim=1).numpy()
        if x.shape[1]:
            out["max_abs"][a:a + k] = torch.maximum(-x.amin(dim=1), x.amax(dim=1)).numpy()
        if "row_norms" in out:
            norms = norm(x.view(k, shape[0], -1), scratch[:k].view(k, shape[0], -1)).numpy()
            out["row_norms"][a:a + k] = np.add.reduceat(norms, edges[:-1], axis=1) / np.diff(edges)
        # the updates ending at rows a+skip .. a+k-1, and the one before them (if any)
        skip = 0 if last is not None else 1
        update = update_buffer[:k - skip]
        if last is not None:
            torch.sub(x[:1], last[None], out=update[:1])
        torch.sub(x[1:], x[:-1], out=update[1 - skip:])
        size = norm(update, scratch[:len(update)])
        out["update_norm"][a + skip:a + k] = size.numpy()
        # cos(update_t, update_(t-1)) = dot / (|update_t| |update_(t-1)|), for the last len(dots) rows
        dots, before_size, after_size = dot(update[1:], update[:-1], scratch), size[:-1], size[1:]
        if last_update is not None:  # the first update's predecessor ended the group before
            dots = torch.cat([dot(update[:1], last_update[None], scratch), dots])
            before_size, after_size = torch.cat([norm(last_update[None], scratch[:1]), before_size]), size
        if len(dots):
            denom = (after_size * before_size).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = dots.numpy().astype(np.float64) / denom
            out["update_cos"][a + k - len(dots):a + k] = np.where(denom > 0, cos, np.nan)
        last = x[-1].clone()
        last_update = update[-1].clone() if len(update) else last_update
    return out
