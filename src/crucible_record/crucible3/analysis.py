"""The notebook's questions, answered from a store while streaming over blocks of steps.

Only committed steps are used, so a run in progress can be analysed. W is never loaded whole
(:func:`scan_W`: one pass over stored chunks). How every array is indexed: :data:`INDEXING`. A
cosine with a zero vector (a centroid that did not move in bf16) is NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CrucibleError
from .trajectory import Trajectory

# Thresholds behind the plain answers of the summary (also written into it).
LAG1_THRESHOLD = 0.95
AUTOCORR_THRESHOLD = 0.5
SEPARATION_GROWTH = 1.1  # last/first separation above this: "yes, they separate"
ALIGN_STRONG = 0.5  # mean cosine above this: "yes"; above 0: "weakly"
STALL_STRONG = 0.5  # late share of changed dead entries below this: "yes, bf16 stalls"
STALL_PARTLY = 0.9  # ... below this: "partly"
LATE_FRACTION = 0.1  # "late in training" = the last 10% of steps (at least one)

_SUB_STEPS = 8  # steps handled at once inside a stored block: bounds the float32 temporaries

INDEXING = {
    "step": "W[t], loss[t], centroid_*[t], centroid_separation[t]: t = 0..n is the training step after "
    "which W was recorded (t = 0: initialisation); x axis 'step'.",
    "h_mean": "h_mean[i], i = 0..n-1, comes from the forward pass of training step i+1; that pass read W[i], "
    "its update produced W[i+1], and h_mean[i] is recorded together with W[i+1].",
    "transition": "Per-transition arrays (length n, x axis 'transition_step' = i+1) pair h_mean[i] with the "
    "update W[i] -> W[i+1]: cos_dead_drift_* / cos_live_drift_* use c[i+1] - c[i], frac_changed_* compare "
    "W[i+1] with W[i], and cos_hmean_live_centroid[i], cos_hmean_live_minus_dead[i] use c_live[i+1], "
    "c_dead[i+1] (the centroids of the W recorded with h_mean[i]).",
    "h_mean_cos_lag1": "h_mean_cos_lag1[i] = cos(h_mean[i], h_mean[i+1]), i = 0..n-2 (training steps i+1 and i+2; "
    "x axis 'lag1_step' = i+2).",
    "h_mean_autocorr": "h_mean_autocorr[k] = mean over i of cos(h_mean[i], h_mean[i+k]) for lag k = 0..n-1 "
    "(index = lag, x axis 'lag'; k = 0 is 1 by definition).",
    "h_mean_cos_to_first": "h_mean_cos_to_first[i] = cos(h_mean[0], h_mean[i]), i = 0..n-1 (x axis 'transition_step').",
    "path_straightness": "per token |W[n] - W[0]| / sum_t |W[t+1] - W[t]| (L2 over hidden, float32 on the bf16 "
    "values); 1.0 is a straight line; tokens that never moved are left out of the percentiles.",
    "nan": "NaN (null in JSON) where a cosine involves a zero vector or a population is empty.",
}


def iter_blocks(traj: Trajectory, block: int | None = None) -> Iterator[torch.Tensor]:
    """W[first:first+block] as bf16 for consecutive blocks of whole stored chunks."""
    block = block or traj.W.array.chunks[0]
    for start in range(0, traj.steps + 1, block):
        yield traj.W[start:min(start + block, traj.steps + 1)]


def centroids(traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step dead and live centroids (steps+1, hidden), float32 as the notebook computes them."""
    dead, live = traj.dead_mask, traj.live_mask
    dead_parts, live_parts = [], []
    for W in iter_blocks(traj):
        dead_parts.append(W[:, dead, :].float().mean(dim=1))
        live_parts.append(W[:, live, :].float().mean(dim=1))
    return torch.cat(dead_parts), torch.cat(live_parts)


def quick_stats(traj: Trajectory) -> dict[str, float]:
    """The notebook's "Quick Stats" cell, in bounded memory."""
    centroid_dead, centroid_live = centroids(traj)
    stats = {}
    for who, c in (("dead", centroid_dead), ("live", centroid_live)):
        norm = torch.norm(c, dim=1)
        stats[f"{who}_centroid_norm_first"] = norm[0].item()
        stats[f"{who}_centroid_norm_last"] = norm[-1].item()
        stats[f"{who}_centroid_displacement"] = torch.norm(c[-1] - c[0]).item()
    separation = torch.norm(centroid_dead - centroid_live, dim=1)
    stats.update(separation_first=separation[0].item(), separation_last=separation[-1].item())
    if traj.steps > 0:
        h_norm = torch.norm(traj.h_mean, dim=1)
        stats.update(h_mean_norm_min=h_norm.min().item(), h_mean_norm_max=h_norm.max().item(),
                     h_mean_norm_mean=h_norm.mean().item())
    return stats


def format_quick_stats(traj: Trajectory, stats: dict[str, float]) -> str:
    last = traj.steps
    lines = []
    for who in ("dead", "live"):
        lines += [f"{who.capitalize()} token centroid:",
                  f"  Norm at t=0: {stats[f'{who}_centroid_norm_first']:.6f}",
                  f"  Norm at t={last}: {stats[f'{who}_centroid_norm_last']:.6f}",
                  f"  Total displacement: {stats[f'{who}_centroid_displacement']:.6f}"]
    lines += ["Live/Dead separation:", f"  Distance at t=0: {stats['separation_first']:.6f}",
              f"  Distance at t={last}: {stats['separation_last']:.6f}"]
    if "h_mean_norm_min" in stats:
        lines += ["h_mean:", f"  L2 norm range: [{stats['h_mean_norm_min']:.6f}, {stats['h_mean_norm_max']:.6f}]",
                  f"  Mean L2 norm: {stats['h_mean_norm_mean']:.6f}"]
    return "\n".join(lines)


# --- One streaming pass over W ---


@dataclass
class WScan:
    """What one pass over W gathers: per-step centroids (n+1, hidden) float32 (NaN for an empty
    population), per-transition changed shares (n,) float64, per-token path length and |W[n] - W[0]|."""

    centroid_dead: torch.Tensor
    centroid_live: torch.Tensor
    changed_dead: torch.Tensor
    changed_live: torch.Tensor
    path_length: torch.Tensor
    net_displacement: torch.Tensor


class ScanParts:
    """The per-block parts of a pass over W, in step order: gathered here by scan_W, or on Dask
    workers and merged in block order (distributed.py), to the same float64 sums either way.
    ``path_groups``: a list to keep each group's path lengths in, apart (a worker's, for the client
    to add in the same order as the single-process pass), instead of adding them to ``path``."""

    def __init__(self, dead: torch.Tensor, path_groups: list[torch.Tensor] | None = None):
        self.dead = dead.bool()
        self.live = ~self.dead
        self.n_dead, self.n_live = int(self.dead.sum()), int(self.live.sum())
        self.c_dead, self.c_live, self.ch_dead, self.ch_live = [], [], [], []
        self.path = torch.zeros(len(self.dead), dtype=torch.float64)
        self.path_groups = path_groups
        self.scratch: dict[str, torch.Tensor] = {}  # temporaries reused by every block (see _scratch)

    def block(self, W: torch.Tensor, prev: torch.Tensor | None) -> None:
        """One block of steps, a few at a time; ``prev``: the step before the block (or None)."""
        for s in range(0, W.shape[0], _SUB_STEPS):
            part = W[s:s + _SUB_STEPS]
            self.c_dead.append(_masked_mean(part, self.dead, self.n_dead, self.scratch))
            self.c_live.append(_masked_mean(part, self.live, self.n_live, self.scratch))
            # transitions a[j] -> b[j] that end in `part`; the previous block's last step is carried
            if s > 0:
                a, b = W[s - 1:s - 1 + part.shape[0]], part
            elif prev is not None:
                a, b = torch.cat([prev[None], part[:-1]], out=_scratch(self.scratch, "a", part.shape, part.dtype)), part
            else:  # global step 0 has no step before it
                a, b = part[:-1], part[1:]
            if a.shape[0]:
                self._transitions(a, b)

    def _transitions(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate the transitions a[j] -> b[j] (bf16, (k, vocab, hidden))."""
        # (k, vocab) changed entries (by value: -0.0 == +0.0)
        per_token = torch.ne(a, b, out=_scratch(self.scratch, "ne", a.shape, torch.bool)).sum(dim=2)
        for mask, count, out in ((self.dead, self.n_dead, self.ch_dead), (self.live, self.n_live, self.ch_live)):
            out.append(per_token[:, mask].sum(dim=1).double() / (count * a.shape[2]) if count else
                       torch.full((a.shape[0],), float("nan"), dtype=torch.float64))
        fb = _scratch(self.scratch, "fb", b.shape, torch.float32).copy_(b)  # b.float() - a.float(), reused buffers
        fa = _scratch(self.scratch, "fa", a.shape, torch.float32).copy_(a)
        lengths = torch.norm(fb.sub_(fa), dim=2).double().sum(dim=0)
        if self.path_groups is None:
            self.path += lengths
        else:
            self.path_groups.append(lengths)

    def arrays(self) -> dict[str, torch.Tensor]:
        """The parts joined: centroid_dead/live, changed_dead/live (empty without a transition)."""
        empty = torch.zeros(0, dtype=torch.float64)
        return {"centroid_dead": torch.cat(self.c_dead), "centroid_live": torch.cat(self.c_live),
                "changed_dead": torch.cat(self.ch_dead) if self.ch_dead else empty,
                "changed_live": torch.cat(self.ch_live) if self.ch_live else empty}

    def result(self, first: torch.Tensor, last: torch.Tensor) -> WScan:
        """The WScan, given the first and last steps of W."""
        return WScan(**self.arrays(), path_length=self.path,
                     net_displacement=torch.norm(last.float() - first.float(), dim=1))


def scan_W(traj: Trajectory, block: int | None = None) -> WScan:
    """Stream once over W in blocks of whole stored chunks, carrying the last step across blocks."""
    parts = ScanParts(traj.dead_mask)
    first = prev = None
    for W in iter_blocks(traj, block):
        if first is None:
            first = W[0].clone()
        parts.block(W, prev)
        prev = W[-1].clone()
        del W  # drop this block before the next one is read: one block in memory at a time
    if prev is None:
        raise CrucibleError(f"{traj.location} has no committed step of W")
    return parts.result(first, prev)


def _scratch(scratch: dict[str, torch.Tensor], key: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of `shape`, the same memory from block to block: temporaries allocated afresh
    fragment the C heap (the resident memory grew ~150 MB a block). Allocated at its largest, sliced."""
    size = int(np.prod(shape[1:], dtype=np.int64))
    buffer = scratch.get(key)
    if buffer is None or buffer.dtype != dtype or buffer.shape[1:].numel() != size or buffer.shape[0] < shape[0]:
        buffer = scratch[key] = torch.empty((max(shape[0], _SUB_STEPS), *shape[1:]), dtype=dtype)
    return buffer.view(-1)[:int(shape[0]) * size].view(tuple(shape))


def _masked_mean(W: torch.Tensor, mask: torch.Tensor, count: int, scratch: dict[str, torch.Tensor]) -> torch.Tensor:
    if count == 0:
        return torch.full((W.shape[0], W.shape[2]), float("nan"), dtype=torch.float32)
    shape = (W.shape[0], count, W.shape[2])  # W[:, mask, :].float(), into reused buffers: the same values
    gathered = torch.index_select(W, 1, mask.nonzero().flatten(), out=_scratch(scratch, f"gather{count}", shape, W.dtype))
    return _scratch(scratch, f"float{count}", shape, torch.float32).copy_(gathered).mean(dim=1)


# --- The questions ---


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine in float64, NaN where either row is zero."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    denom = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
    out = (a * b).sum(dim=-1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def h_mean_persistence(traj: Trajectory) -> dict[str, torch.Tensor]:
    """Question 1: does h_mean keep its direction? (autocorr by FFT: O(n log n), not O(n^2))"""
    h = traj.h_mean.double()
    n = h.shape[0]
    norms = torch.norm(h, dim=1)
    valid = (norms > 0) & torch.isfinite(norms)
    unit = torch.where(valid[:, None], h / torch.where(valid, norms, 1.0)[:, None], torch.zeros_like(h))
    lag1 = cosine(h[:-1], h[1:])
    to_first = cosine(h[:1], h)
    if n == 0:
        autocorr = torch.zeros(0, dtype=torch.float64)
    else:
        size = 2 * n
        spec = torch.fft.rfft(unit, n=size, dim=0)
        sums = torch.fft.irfft(spec * spec.conj(), n=size, dim=0)[:n].sum(dim=1)
        vspec = torch.fft.rfft(valid.double(), n=size)
        counts = torch.fft.irfft(vspec * vspec.conj(), n=size)[:n].round()
        autocorr = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        autocorr = autocorr.clamp(-1.0, 1.0)
    return {"h_mean_cos_lag1": lag1, "h_mean_autocorr": autocorr, "h_mean_cos_to_first": to_first}


def centroid_dynamics(scan: WScan) -> dict[str, torch.Tensor]:
    """Question 2, per step t = 0..n (float32 math on the bf16 values, as the notebook's Quick Stats)."""
    cd, cl = scan.centroid_dead, scan.centroid_live
    return {
        "centroid_dead_norm": torch.norm(cd, dim=1),
        "centroid_live_norm": torch.norm(cl, dim=1),
        "centroid_dead_displacement": torch.norm(cd - cd[:1], dim=1),
        "centroid_live_displacement": torch.norm(cl - cl[:1], dim=1),
        "centroid_separation": torch.norm(cd - cl, dim=1),
    }


def straightness_summary(straightness: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """median, p10, p90 of path straightness over the tokens of ``mask`` that moved."""
    values = straightness[mask.bool()].numpy()
    moved = values[np.isfinite(values)]
    percentiles = np.percentile(moved, [50, 10, 90]).tolist() if moved.size else [None] * 3
    return {"tokens": int(values.size), "never_moved": int(values.size - moved.size),
            **dict(zip(("median", "p10", "p90"), percentiles))}


def alignment(traj: Trajectory, scan: WScan) -> dict[str, torch.Tensor]:
    """Question 3, per transition i = 0..n-1, float64. Under Adam a steady gradient moves each
    coordinate by about the learning rate, so the drift may follow sign(h_mean) more closely than
    h_mean: both are computed."""
    h = traj.h_mean
    cd, cl = scan.centroid_dead, scan.centroid_live
    drift_dead = cd[1:] - cd[:-1]
    drift_live = cl[1:] - cl[:-1]
    return {
        "cos_hmean_live_centroid": cosine(h, cl[1:]),
        "cos_hmean_live_minus_dead": cosine(h, cl[1:] - cd[1:]),
        "cos_dead_drift_neg_hmean": cosine(drift_dead, -h),
        "cos_dead_drift_neg_sign_hmean": cosine(drift_dead, -torch.sign(h)),
        "cos_live_drift_hmean": cosine(drift_live, h),
        "cos_live_drift_sign_hmean": cosine(drift_live, torch.sign(h)),
    }


def analyze(traj: Trajectory, block: int | None = None, scan: WScan | None = None) -> dict[str, Any]:
    """All four questions in one pass over W: every array above, the axes, ``indexing`` and ``summary``.
    ``scan``: the pass over W made elsewhere (e.g. ``distributed.scan_W_dask``) for the same steps."""
    n = traj.steps
    if n < 2:
        raise CrucibleError(f"{traj.location} has {max(n, 0)} committed step(s); the analysis needs at least 2")
    if scan is None:
        scan = scan_W(traj, block)
    elif scan.centroid_dead.shape[0] != n + 1:
        raise CrucibleError(f"the scan of W covers {scan.centroid_dead.shape[0]} steps, the run {n + 1}")
    dead = traj.dead_mask.bool()
    result: dict[str, Any] = {
        "run_dir": traj.location,
        "committed_steps": n,
        "configured_steps": int(traj.attrs.get("config", {}).get("steps", n)),
        "vocab_size": int(traj.W.shape[1]),
        "hidden_dim": int(traj.W.shape[2]),
        "n_dead": int(dead.sum()),
        "n_live": int((~dead).sum()),
        "indexing": dict(INDEXING),
        "step": torch.arange(n + 1),
        "transition_step": torch.arange(1, n + 1),
        "lag1_step": torch.arange(2, n + 1),
        "lag": torch.arange(n),
        "loss": traj.loss,
    }
    result.update(h_mean_persistence(traj))
    result.update(centroid_dynamics(scan))
    result.update(alignment(traj, scan))
    # question 4, per transition: the share of the dead (live) entries whose bf16 value changed
    result.update(frac_changed_dead=scan.changed_dead, frac_changed_live=scan.changed_live)
    # per token; NaN for tokens that never moved (their path length is 0)
    ratio = scan.net_displacement.double() / scan.path_length
    result["path_straightness"] = torch.where(scan.path_length > 0, ratio, torch.full_like(ratio, float("nan")))
    result["dead_mask"] = dead
    result["summary"] = summarize(result, dead)
    return result


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _nanmean(x: torch.Tensor) -> float | None:
    x = x.double()
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else None


def summarize(result: dict[str, Any], dead_mask: torch.Tensor) -> dict[str, Any]:
    """A plain answer and the supporting numbers for each question (thresholds included)."""
    n = result["committed_steps"]
    late = max(1, int(round(n * LATE_FRACTION)))

    # 1. h_mean persistence
    lag1, auto = result["h_mean_cos_lag1"], result["h_mean_autocorr"]
    finite = torch.isfinite(lag1)
    lag1_min = float(lag1[finite].min()) if finite.any() else None
    lag1_min_at = int(torch.where(finite, lag1, torch.inf).argmin()) + 2 if finite.any() else None
    stays = lag1_min is not None and lag1_min >= LAG1_THRESHOLD
    # the first step from which lag-1 never drops below the threshold again (early steps often do)
    dips = torch.nonzero(~(lag1 >= LAG1_THRESHOLD)).flatten()
    settled_from = 2 if len(dips) == 0 else (int(dips[-1]) + 3 if int(dips[-1]) + 1 < len(lag1) else None)
    first_below = next((k for k in range(1, len(auto))
                        if torch.isfinite(auto[k]) and auto[k] < AUTOCORR_THRESHOLD), None)
    lag_text = (f"mean cos first < {AUTOCORR_THRESHOLD} at lag {first_below}" if first_below is not None
                else f"mean cos never < {AUTOCORR_THRESHOLD} (lags 1..{n - 1})")
    q1 = {
        "question": "Does h_mean keep its direction?",
        "answer": "yes" if stays else (f"no (yes from step {settled_from} on)" if settled_from else "no"),
        "lag1_stays_at_or_above_0.95": stays,
        "lag1_at_or_above_0.95_from_step": settled_from,
        "lag1_share_at_or_above_0.95": _num((lag1 >= LAG1_THRESHOLD).double().mean()) if len(lag1) else None,
        "lag1_min": lag1_min,
        "lag1_min_at_step": lag1_min_at,
        "lag1_mean": _nanmean(lag1),
        "autocorr_first_lag_below_0.5": first_below,
        "autocorr_at_max_lag": _num(auto[-1]) if len(auto) > 1 else None,
        "cos_to_first_at_last_step": _num(result["h_mean_cos_to_first"][-1]),
        "evidence": f"lag-1 cos min {_fmt(lag1_min)} (step {lag1_min_at}), "
                    f"{'>=' if stays else 'not always >='} {LAG1_THRESHOLD}; {lag_text}",
    }

    # 2. centroid separation and path straightness
    sep = result["centroid_separation"]
    sep_first, sep_last = _num(sep[0]), _num(sep[-1])
    growth = sep_last / sep_first if sep_first and sep_last is not None else None
    if growth is None:
        answer2 = "unknown"
    elif growth > SEPARATION_GROWTH:
        answer2 = "yes"
    elif growth >= 1 / SEPARATION_GROWTH:
        answer2 = "no (about unchanged)"
    else:
        answer2 = "no (they come closer)"
    s_dead = straightness_summary(result["path_straightness"], dead_mask)
    s_live = straightness_summary(result["path_straightness"], ~dead_mask.bool())
    q2 = {
        "question": "Do live and dead centroids separate?",
        "answer": answer2,
        "separation_first": sep_first,
        "separation_last": sep_last,
        "separation_growth": growth,
        "dead_centroid_displacement": _num(result["centroid_dead_displacement"][-1]),
        "live_centroid_displacement": _num(result["centroid_live_displacement"][-1]),
        "path_straightness_dead": s_dead,
        "path_straightness_live": s_live,
        "evidence": f"separation {_fmt(sep_first)} -> {_fmt(sep_last)} ({_fmt(growth, '.2f')}{'x' if growth else ''}); "
                    f"path straightness median "
                    f"dead {_fmt(s_dead['median'], '.2f')}, live {_fmt(s_live['median'], '.2f')} (1 = straight)",
    }

    # 3. alignment
    mean_live = _nanmean(result["cos_hmean_live_centroid"])
    mean_lmd = _nanmean(result["cos_hmean_live_minus_dead"])
    drift = {name: _nanmean(result[name]) for name in (
        "cos_dead_drift_neg_hmean", "cos_dead_drift_neg_sign_hmean", "cos_live_drift_hmean", "cos_live_drift_sign_hmean")}
    dead_h, dead_s = drift["cos_dead_drift_neg_hmean"], drift["cos_dead_drift_neg_sign_hmean"]
    answer3, answer3_lmd = _align_answer(mean_live), _align_answer(mean_lmd)
    q3 = {
        "question": "Does h_mean point toward the live centroid?",
        "answer": answer3 if answer3_lmd == answer3 else f"{answer3} ({answer3_lmd} toward c_live - c_dead)",
        "answer_live_minus_dead": answer3_lmd,
        "mean_cos_hmean_live_centroid": mean_live,
        "share_of_steps_positive": _num((result["cos_hmean_live_centroid"] > 0).double().mean()),
        "mean_cos_hmean_live_minus_dead": mean_lmd,
        **{f"mean_{k}": v for k, v in drift.items()},
        "dead_drift_follows": ("unknown" if dead_h is None or dead_s is None
                               else "-sign(h_mean)" if dead_s > dead_h else "-h_mean"),
        "evidence": f"mean cos(h_mean, c_live) {_fmt(mean_live, '+.3f')}, "
                    f"cos(h_mean, c_live - c_dead) {_fmt(mean_lmd, '+.3f')}; "
                    f"dead drift vs -sign(h) {_fmt(dead_s, '+.2f')}, vs -h {_fmt(dead_h, '+.2f')}; "
                    f"live drift vs sign(h) {_fmt(drift['cos_live_drift_sign_hmean'], '+.2f')}, "
                    f"vs h {_fmt(drift['cos_live_drift_hmean'], '+.2f')}",
    }

    # 4. bf16 stall
    fd, fl = result["frac_changed_dead"], result["frac_changed_live"]
    late_dead, late_live = _nanmean(fd[-late:]), _nanmean(fl[-late:])
    if late_dead is None:
        answer4 = "unknown"
    elif late_dead < STALL_STRONG:
        answer4 = "yes"
    elif late_dead < STALL_PARTLY:
        answer4 = "partly"
    else:
        answer4 = "no"
    q4 = {
        "question": "Does bf16 stall the drift?",
        "answer": answer4,
        "late_steps": late,
        "late_mean_frac_changed_dead": late_dead,
        "late_mean_frac_changed_live": late_live,
        "first_frac_changed_dead": _num(fd[0]),
        "first_frac_changed_live": _num(fl[0]),
        "evidence": f"last {late} step(s): {_fmt(late_dead, '.1%')} of dead and {_fmt(late_live, '.1%')} of live "
                    f"entries change per step "
                    f"(step 1: {_fmt(_num(fd[0]), '.1%')} dead, {_fmt(_num(fl[0]), '.1%')} live)",
    }
    return {
        "h_mean_persistence": q1,
        "centroid_separation": q2,
        "h_mean_alignment": q3,
        "bf16_stall": q4,
        "thresholds": {
            "lag1": LAG1_THRESHOLD,
            "autocorr": AUTOCORR_THRESHOLD,
            "separation_growth_yes": SEPARATION_GROWTH,
            "alignment_yes": ALIGN_STRONG,
            "stall_yes_below": STALL_STRONG,
            "stall_partly_below": STALL_PARTLY,
            "late_fraction": LATE_FRACTION,
        },
    }


def _align_answer(mean_cos: float | None) -> str:
    if mean_cos is None:
        return "unknown"
    if mean_cos > ALIGN_STRONG:
        return "yes"
    return "weakly" if mean_cos > 0 else "no"


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)
