"""The notebook's questions, answered from a store while streaming over blocks of steps."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .trajectory import Trajectory


def iter_blocks(traj: Trajectory, block: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first step, W[first:first+block] as bf16) for consecutive blocks of whole stored chunks."""
    block = block or traj.group["W"].chunks[0]
    for start in range(0, traj.steps + 1, block):
        yield start, traj.W[start:min(start + block, traj.steps + 1)]


def centroids(traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step dead and live centroids (steps+1, hidden), float32 as the notebook computes them."""
    dead, live = traj.dead_mask, traj.live_mask
    dead_parts, live_parts = [], []
    for _, W in iter_blocks(traj):
        dead_parts.append(W[:, dead, :].float().mean(dim=1))
        live_parts.append(W[:, live, :].float().mean(dim=1))
    return torch.cat(dead_parts), torch.cat(live_parts)


def quick_stats(traj: Trajectory) -> dict[str, float]:
    """The notebook's "Quick Stats" cell, in bounded memory."""
    centroid_dead, centroid_live = centroids(traj)
    dead_norm = torch.norm(centroid_dead, dim=1)
    live_norm = torch.norm(centroid_live, dim=1)
    separation = torch.norm(centroid_dead - centroid_live, dim=1)
    stats = {
        "dead_centroid_norm_first": dead_norm[0].item(),
        "dead_centroid_norm_last": dead_norm[-1].item(),
        "dead_centroid_displacement": torch.norm(centroid_dead[-1] - centroid_dead[0]).item(),
        "live_centroid_norm_first": live_norm[0].item(),
        "live_centroid_norm_last": live_norm[-1].item(),
        "live_centroid_displacement": torch.norm(centroid_live[-1] - centroid_live[0]).item(),
        "separation_first": separation[0].item(),
        "separation_last": separation[-1].item(),
    }
    if traj.steps > 0:
        h_norm = torch.norm(traj.h_mean, dim=1)
        stats.update(
            h_mean_norm_min=h_norm.min().item(),
            h_mean_norm_max=h_norm.max().item(),
            h_mean_norm_mean=h_norm.mean().item(),
        )
    return stats


def format_quick_stats(traj: Trajectory, stats: dict[str, float]) -> str:
    last = traj.steps
    lines = [
        "Dead token centroid:",
        f"  Norm at t=0: {stats['dead_centroid_norm_first']:.6f}",
        f"  Norm at t={last}: {stats['dead_centroid_norm_last']:.6f}",
        f"  Total displacement: {stats['dead_centroid_displacement']:.6f}",
        "Live token centroid:",
        f"  Norm at t=0: {stats['live_centroid_norm_first']:.6f}",
        f"  Norm at t={last}: {stats['live_centroid_norm_last']:.6f}",
        f"  Total displacement: {stats['live_centroid_displacement']:.6f}",
        "Live/Dead separation:",
        f"  Distance at t=0: {stats['separation_first']:.6f}",
        f"  Distance at t={last}: {stats['separation_last']:.6f}",
    ]
    if "h_mean_norm_min" in stats:
        lines += [
            "h_mean:",
            f"  L2 norm range: [{stats['h_mean_norm_min']:.6f}, {stats['h_mean_norm_max']:.6f}]",
            f"  Mean L2 norm: {stats['h_mean_norm_mean']:.6f}",
        ]
    return "\n".join(lines)
