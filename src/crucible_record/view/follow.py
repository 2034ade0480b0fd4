"""What the live page shows, kept up to date off the server's event loop.

One thread per served run follows the commit marker (a fresh open every ``poll`` seconds): it
brings each field's :class:`~crucible_record.stats.FieldStats` up to the committed steps (new blocks
only), fits the projection basis of each field of 2 or more axes, and computes the experiment's
panels, then publishes one :class:`Snapshot`. Pages only read snapshots; the reads a page makes
itself (one step of the shown rows, one row over the steps) are of what it shows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field as dataclass_field, replace

import numpy as np
import torch

from ..errors import describe
from ..reader import LazyField, Run
from ..stats import FieldStats, values
from ..steps_text import steps_committed

POLL = 1.0  # seconds between two looks at the commit marker
SHOWN_ROWS = 4000  # at most this many rows in a projection (every k-th row)
PANELS_EVERY = 15.0  # the experiment's panels (which may read a field whole) at most this often

Panels = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # title -> series -> (x, y)


@dataclass(frozen=True)
class Basis:
    """One PCA plane for a whole field: its shown rows (stored positions), their mean and two axes
    (fitted on the shown rows at up to 3 steps spread over the committed ones: first, middle, last)."""

    rows: np.ndarray
    mean: torch.Tensor
    axes: torch.Tensor  # (elements of a row, 2)
    steps: tuple[int, ...]
    extent: tuple[float, float, float, float]  # x0, x1, y0, y1 of the fitted points, with a margin

    def project(self, stored: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        """Stored rows (..., elements) -> (..., 2) coordinates in this plane."""
        x = values(stored.reshape(-1, self.mean.numel()), dtype)
        return ((x - self.mean) @ self.axes).numpy().reshape(stored.shape[:-1] + (2,))


def shown_rows(field: LazyField) -> np.ndarray:
    rows = field.shape[1]
    return np.arange(0, rows, -(-rows // SHOWN_ROWS))


def fit_basis(field: LazyField) -> Basis:
    """The PCA plane of `field`'s shown rows at its first, middle and last committed steps."""
    rows, n = shown_rows(field), len(field)
    at = sorted({0, n // 2, n - 1})
    data = np.concatenate([field.numpy((i, rows)).reshape(len(rows), -1) for i in at])
    x = values(data, field.dtype)
    x = x[torch.isfinite(x).all(dim=1)]  # a diverging row (inf, NaN) is left out of the fit, drawn nowhere
    mean = x.mean(dim=0) if len(x) else torch.zeros(x.shape[1])
    q = min(2, *x.shape)
    axes = torch.zeros(x.shape[1], 2)
    if q:
        axes[:, :q] = torch.pca_lowrank(x - mean, q=q, center=False, niter=4)[2][:, :q]
    xy = ((x - mean) @ axes).numpy() if len(x) else np.zeros((1, 2))
    lo, hi = np.nanmin(xy, axis=0), np.nanmax(xy, axis=0)
    pad = np.maximum((hi - lo) * 0.1, 1e-6)
    return Basis(rows, mean, axes, tuple(field.steps[i] for i in at),
                 (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])))


def title_of(where: str, run: Run | None, training: bool) -> str:
    """`runs/x — steps 0..T committed (T of N training steps)`: the page's (and tab's) title."""
    if run is None:
        return f"{where} — not readable yet"
    return f"{where} — {steps_committed(run.committed_steps, of=run.info.steps, training=training)}"


@dataclass(frozen=True)
class Snapshot:
    """The latest state of a followed run, as one page shows it."""

    title: str
    run: Run | None = None
    tables: dict[str, dict[str, np.ndarray]] = dataclass_field(default_factory=dict)  # field -> stats.table()
    row_norms: dict[str, np.ndarray] = dataclass_field(default_factory=dict)  # field (2+ axes) -> (steps, bins)
    bases: dict[str, Basis] = dataclass_field(default_factory=dict)
    panels: Panels = dataclass_field(default_factory=dict)
    error: str = ""
    behind: bool = False  # statistics not yet read up to the committed steps


class Follower:
    """Follows one run (a local path or a URL) in a daemon thread; :meth:`snapshot` is its latest state.
    training: count steps as training steps in the title (an experiment's run).
    panels: run -> {title: {series: (x, y)}}, the experiment's own panels (or None)."""

    def __init__(self, where: str, *, training: bool = False, panels: Callable[[Run], Panels] | None = None,
                 poll: float = POLL):
        self.where, self.training, self.panels_of, self.poll = where, training, panels, poll
        self._stats: dict[str, FieldStats] = {}
        self._bases: dict[str, tuple[int, Basis]] = {}  # field -> (rows when fitted, basis)
        self._panels: Panels = {}
        self._panels_at = (-1, 0.0)  # (committed steps, monotonic time) of the last panels
        self._panels_took = 0.0  # seconds the last panels took
        self._snapshot = Snapshot(title_of(where, None, training))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="crucible-view-follow", daemon=True)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        """Stop following; wait for a look in progress to end (a thread cut off at interpreter exit
        in the middle of a torch op aborts the process)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                behind = self.refresh().behind
            except Exception as e:  # a run not yet created, a transient read error: said on the page, retried
                self._snapshot, behind = replace(self._snapshot, error=describe(e)), False
            self._stop.wait(0 if behind else self.poll)

    def refresh(self) -> Snapshot:
        """One look at the run: open it afresh and read one more block of each field's statistics
        (a page shows a long run block by block; `behind` says there is more to read)."""
        run = Run(self.where)
        old, (panel_steps, panel_time) = self._snapshot, self._panels_at
        panels_due = self.panels_of is not None and panel_steps != run.committed_steps
        if (old.run is not None and run.committed_steps == old.run.committed_steps and not old.error
                and not old.behind and not panels_due):
            return old
        tables, row_norms, bases, behind, errors = {}, {}, {}, False, []
        for name in run.fields:
            field = run[name]
            try:  # one field's failure is said on the page; the others go on
                stats = self._stats.setdefault(name, FieldStats()).update(field, blocks=1)
                behind |= stats.rows < len(field)
                tables[name] = stats.table()
                if len(field.shape) >= 3 and stats.rows:
                    row_norms[name] = stats.row_norms()
                    if len(field) >= 2 * self._bases.get(name, (0, None))[0]:  # refit as the run doubles: a handful of fits per run
                        self._bases[name] = (len(field), fit_basis(field))
                    bases[name] = self._bases[name][1]
            except Exception as e:
                errors.append(f"{name}: {describe(e)}")
                tables.pop(name, None), row_norms.pop(name, None), bases.pop(name, None)
        # the experiment's panels may read a field whole: at most one look in ten is spent on them
        if panels_due and (panel_steps < 0 or time.monotonic() - panel_time >= max(PANELS_EVERY, 10 * self._panels_took)):
            began = time.monotonic()
            try:
                self._panels = self.panels_of(run)
            except Exception as e:
                errors.append(f"panels: {describe(e)}")
            self._panels_at, self._panels_took = (run.committed_steps, time.monotonic()), time.monotonic() - began
        self._snapshot = Snapshot(title_of(self.where, run, self.training), run, tables, row_norms, bases,
                                  self._panels, error="; ".join(errors), behind=behind)
        return self._snapshot
