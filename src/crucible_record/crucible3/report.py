"""`crucible-record analyze`: analysis.json, lab-notebook plots and the printed answers for one run.

Plots use matplotlib's Agg canvas directly: no pyplot, so an interactive session's backend is kept.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, dtypes
from .analysis import analyze
from ..errors import CrucibleError
from ..steps_text import steps_committed
from ..storage import atomic_write_bytes, atomic_write_text, open_output_dir
from .trajectory import open_trajectory

JSON_NAME = "analysis.json"
PLOT_NAMES = (
    "h_mean_persistence.png",
    "centroids.png",
    "alignment.png",
    "frac_changed.png",
    "path_straightness.png",
)
# Arrays with one value per token: kept in analyze()'s result, left out of analysis.json (the
# file would grow with the vocabulary; their percentiles are in the summary).
PER_TOKEN_KEYS = ("path_straightness", "dead_mask")
_QUESTION_KEYS = ("h_mean_persistence", "centroid_separation", "h_mean_alignment", "bf16_stall")


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None, force: bool = False,
                *, block: int | None = None, plots: bool = True,
                scheduler: str | None = None, workers: int | None = None) -> str:
    """Analyse RUN_DIR's committed steps into OUT_DIR (default RUN_DIR/analysis): analysis.json and
    the plots; returns the text to print. An OUT_DIR holding files is refused unless ``force``.
    ``block``: W steps read at a time; ``scheduler`` / ``workers``: the pass over W as a dask graph
    (crucible3/distributed.py), with the same analysis.json.
    """
    traj = open_trajectory(run_dir)
    if traj.steps < 2:
        raise CrucibleError(
            f"{run_dir} has {max(traj.steps, 0)} committed step(s); the analysis needs at least 2"
        )
    if out_dir is None and traj.run_dir is None:
        raise CrucibleError(f"{run_dir} is at a URL: give the analysis a local --out folder")
    out = Path(out_dir) if out_dir is not None else traj.run_dir / "analysis"
    created = not os.path.lexists(out)
    folder = open_output_dir(out, traj.run_dir)
    if os.listdir(folder) and not force:
        os.close(folder)
        raise CrucibleError(f"output folder {out} already exists and is not empty; pass --force to overwrite it")
    try:
        scan = None
        if scheduler is not None or workers is not None:
            from .distributed import dask_client, scan_W_dask

            with dask_client(scheduler, workers) as client:
                scan = scan_W_dask(traj, client, block)
        result = analyze(traj, block=block, scan=scan)
        try:
            json_path = write_analysis_json(result, out / JSON_NAME, dir_fd=folder)
        except OSError as e:
            raise CrucibleError(f"cannot write to {out}: {e.strerror or e}") from None
        written, note = write_plots(result, out, dir_fd=folder) if plots else ([], "plots not requested")
    except BaseException:
        if created and not os.listdir(folder):  # (a failed analysis leaves no empty folder of its own)
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise
    finally:
        os.close(folder)
    wrote = (f"Wrote {json_path} and {len(written)} plots in {out}: {', '.join(p.name for p in written)}" if written
             else f"Wrote {json_path}; {note}")
    return f"{format_table(result)}\n\n{wrote}"


# ----- analysis.json ------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Tensors/arrays to lists, NaN and infinities to None, so the file is strict JSON."""
    if isinstance(value, torch.Tensor):
        value = dtypes.numpy_values(value.detach().cpu())
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()  # Python bools, ints and floats
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def analysis_document(result: dict[str, Any]) -> dict[str, Any]:
    """What analysis.json holds: metadata, summary, indexing, then the per-step arrays."""
    doc: dict[str, Any] = {"format": "crucible-record analysis", "format_version": 1,
                           "generated_by": f"crucible-record {__version__}"}
    for key in ("run_dir", "committed_steps", "configured_steps", "vocab_size", "hidden_dim", "n_dead", "n_live",
                "summary", "indexing"):
        doc[key] = result[key]
    doc.update({key: value for key, value in result.items() if key not in doc and key not in PER_TOKEN_KEYS})
    return to_jsonable(doc)


def write_analysis_json(result: dict[str, Any], path: Path, *, dir_fd: int | None = None) -> Path:
    """Strict JSON (no NaN): objects indented, arrays on one line each (dir_fd: `path`'s folder,
    opened by the caller)."""
    doc = analysis_document(result)
    parts = []
    for key, value in doc.items():
        text = json.dumps(value, allow_nan=False, indent=2 if isinstance(value, dict) else None)
        parts.append(f"  {json.dumps(key)}: " + text.replace("\n", "\n  "))
    atomic_write_text(Path(path), "{\n" + ",\n".join(parts) + "\n}\n", dir_fd=dir_fd)
    return Path(path)


# ----- The printed answers ------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """The four answers as a short table: question, plain answer, and the supporting numbers."""
    summary = result["summary"]
    n, total = result["committed_steps"], result["configured_steps"]
    progress = steps_committed(n + 1, of=total + 1, training=True) + ("; run in progress or stopped" if n < total else "")
    head = (f"crucible-record analysis of {result['run_dir']}: {progress}; "
            f"{result['n_dead']} dead, {result['n_live']} live tokens")
    rows = [(f"{i}. {summary[key]['question']}", summary[key]["answer"], summary[key]["evidence"])
            for i, key in enumerate(_QUESTION_KEYS, start=1)]
    width = max(len("Question"), *(len(q) for q, _, _ in rows))
    answer_width = max(len("Answer"), *(len(a) for _, a, _ in rows))
    lines = [head, "", f"{'Question':<{width}}  Answer", f"{'-' * width}  {'-' * answer_width}"]
    for question, answer, evidence in rows:
        lines += [f"{question:<{width}}  {answer}", f"     {evidence}"]
    return "\n".join(lines)


# ----- Plots --------------------------------------------------------------------------------


def write_plots(result: dict[str, Any], out: Path, *, dir_fd: int | None = None) -> tuple[list[Path], str]:
    """The lab-notebook figures as PNGs, each an atomic replace; ([], reason) without matplotlib.
    dir_fd: `out`, opened by the caller."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'crucible-record[plot]')"

    a = {k: (v.double().numpy() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}
    n = result["committed_steps"]
    marker = "." if n <= 60 else None
    step, trans, lag1_step, lag = a["step"], a["transition_step"], a["lag1_step"], a["lag"]
    written = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out / name
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        try:
            atomic_write_bytes(path, png.getbuffer(), dir_fd=dir_fd)
        except OSError as e:
            raise CrucibleError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(path)

    title = f"{Path(result['run_dir']).name} ({n} steps)"

    def label(ax, ylabel: str, title: str, xlabel: str | None = None, legend: bool = True) -> None:
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if legend:
            ax.legend(fontsize=8)

    # 1. h_mean persistence
    fig = Figure(figsize=(8, 7))
    ax1, ax2 = fig.subplots(2, 1)
    ax1.plot(lag1_step, a["h_mean_cos_lag1"], marker=marker, label="cos(h_mean[t-1], h_mean[t]) (lag 1)")
    ax1.plot(trans, a["h_mean_cos_to_first"], marker=marker, alpha=0.7, label="cos(h_mean at step 1, h_mean[t])")
    ax1.axhline(0.95, color="grey", linestyle="--", linewidth=0.8, label="0.95")
    label(ax1, "cosine", f"h_mean persistence over time - {title}",
          "training step t (forward pass that produced h_mean)")
    ax2.plot(lag[1:], a["h_mean_autocorr"][1:], marker=marker)
    ax2.axhline(0.5, color="grey", linestyle="--", linewidth=0.8, label="0.5")
    label(ax2, "mean over t of cos(h_mean[t], h_mean[t+k])", "h_mean autocorrelation by lag", "lag k (steps)")
    save(fig, PLOT_NAMES[0])

    # 2. centroids
    fig = Figure(figsize=(8, 9))
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    ax1.plot(step, a["centroid_dead_norm"], marker=marker, label="dead centroid |c_dead|")
    ax1.plot(step, a["centroid_live_norm"], marker=marker, label="live centroid |c_live|")
    label(ax1, "L2 norm", f"Centroid norms - {title}")
    ax2.plot(step, a["centroid_separation"], marker=marker, color="black")
    label(ax2, "|c_dead - c_live|", "Live/dead centroid separation", legend=False)
    ax3.plot(step, a["centroid_dead_displacement"], marker=marker, label="dead |c[t] - c[0]|")
    ax3.plot(step, a["centroid_live_displacement"], marker=marker, label="live |c[t] - c[0]|")
    label(ax3, "displacement from step 0", "Centroid displacement from initialisation",
          "training step t (W after step t; 0 = initialisation)")
    save(fig, PLOT_NAMES[1])

    # 3. alignment
    fig = Figure(figsize=(8, 8))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(trans, a["cos_hmean_live_centroid"], marker=marker, label="cos(h_mean, c_live)")
    ax1.plot(trans, a["cos_hmean_live_minus_dead"], marker=marker, label="cos(h_mean, c_live - c_dead)")
    ax1.axhline(0, color="grey", linewidth=0.8)
    label(ax1, "cosine", f"Does h_mean point toward the live centroid? - {title}")
    for key, text in (("cos_dead_drift_neg_sign_hmean", "dead drift vs -sign(h_mean)"),
                      ("cos_dead_drift_neg_hmean", "dead drift vs -h_mean"),
                      ("cos_live_drift_sign_hmean", "live drift vs +sign(h_mean)"),
                      ("cos_live_drift_hmean", "live drift vs +h_mean")):
        ax2.plot(trans, a[key], marker=marker, linewidth=1, label=text)
    ax2.axhline(0, color="grey", linewidth=0.8)
    label(ax2, "cosine", "Centroid drift directions (Adam: sign vs value of h_mean)",
          "training step t (h_mean of step t; drift c[t] - c[t-1]; centroids of W[t])")
    save(fig, PLOT_NAMES[2])

    # 4. share of entries changed
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot(trans, a["frac_changed_dead"], marker=marker, label="dead tokens")
    ax.plot(trans, a["frac_changed_live"], marker=marker, label="live tokens")
    ax.set_ylim(-0.02, 1.02)
    label(ax, "share of W entries changed", f"Does bf16 stall the drift? - {title}",
          "training step t (W[t] compared with W[t-1])")
    save(fig, PLOT_NAMES[3])

    # 5. path straightness per token
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    straight = result["path_straightness"].double().numpy()
    dead = result["dead_mask"].bool().numpy()
    bins = np.linspace(0, 1, 51)
    for mask, who in ((dead, "dead tokens"), (~dead, "live tokens")):
        values = straight[mask]
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=bins, density=True, alpha=0.6, label=f"{who} ({values.size})")
    label(ax, "density of tokens", f"How straight are the token paths? - {title}",
          "path straightness |W[T] - W[0]| / sum_t |W[t+1] - W[t]| (1 = straight line)")
    save(fig, PLOT_NAMES[4])
    return written, ""

