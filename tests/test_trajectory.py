"""open_trajectory(run).W slices like the notebook's W_history and agrees with the safetensors export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3.export import export_safetensors


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    path, _ = export_safetensors(open_trajectory(tiny_run), out)
    tensors = load_file(str(path))
    tensors["W_bf16"] = tensors["W"].view(torch.bfloat16)
    return tensors


def test_attributes(tiny_run, exported):
    t = open_trajectory(tiny_run)
    assert t.steps == 25 and t.W.shape == (26, 10000, 16) and len(t.W) == 26
    assert t.W.dtype == torch.bfloat16 and t.config.steps == 25
    assert torch.equal(t.dead_mask, exported["dead_mask"]) and torch.equal(t.live_mask, ~exported["dead_mask"])
    assert torch.equal(t.dead_indices, exported["dead_indices"])
    assert torch.equal(t.h_mean, exported["h_mean"])
    assert torch.isnan(t.loss[0]) and torch.equal(t.loss[1:], exported["loss"][1:])


def _selections(mask):
    idx = torch.nonzero(mask).flatten()[:7]
    return [
        0, -1, 7, (slice(None),), (slice(3, 11, 2),), (slice(-5, None),),
        (5, 123), (5, 123, 4), (slice(None), 42), (slice(None), 42, slice(2, 5)),
        (slice(None), mask, slice(None)), (slice(None), mask.numpy()), (slice(2, 9), idx),
        (slice(2, 9), idx.tolist()), (torch.tensor(3), slice(0, 10)), ([0, 5, 25],), (Ellipsis, 3),
        (np.int64(4),),
    ]


def test_slicing_matches_export(tiny_run, exported):
    t = open_trajectory(tiny_run)
    full = exported["W_bf16"]
    for key in _selections(t.dead_mask):
        ours = t.W[key]
        assert ours.dtype == torch.bfloat16, key
        expected = full[key]
        assert ours.shape == expected.shape, key
        assert torch.equal(ours.view(torch.uint16), expected.contiguous().view(torch.uint16)), key


def test_bad_indices(tiny_run):
    t = open_trajectory(tiny_run)
    for key in (26, -27, (0, 10000), (slice(None), torch.zeros(5, dtype=torch.bool)), (0, 0, 0, 0),
                ([0, 1], [0, 1])):
        with pytest.raises(IndexError):
            t.W[key]


def test_notebook_quick_stats_cell_runs_unchanged(tiny_run, exported):
    """The notebook's Quick Stats cell, verbatim, with W_history = t.W."""
    t = open_trajectory(tiny_run)
    scope = {"torch": torch, "W_history": t.W, "dead_mask": t.dead_mask, "live_mask": t.live_mask,
             "h_mean_history": t.h_mean}
    exec(QUICK_STATS, scope)
    in_ram = {"torch": torch, "W_history": exported["W_bf16"], "dead_mask": exported["dead_mask"],
              "live_mask": ~exported["dead_mask"], "h_mean_history": exported["h_mean"]}
    exec(QUICK_STATS, in_ram)
    for name in ("centroid_dead", "centroid_live", "separation", "h_mean_norm"):
        assert torch.equal(scope[name], in_ram[name]), name


def test_quick_stats_streaming_equals_in_ram(tiny_run, exported):
    from crucible_record.crucible3.analysis import quick_stats

    stats = quick_stats(open_trajectory(tiny_run))
    W = exported["W_bf16"]
    dead = exported["dead_mask"]
    c_dead = W[:, dead, :].float().mean(dim=1)
    c_live = W[:, ~dead, :].float().mean(dim=1)
    assert stats["dead_centroid_norm_last"] == torch.norm(c_dead, dim=1)[-1].item()
    assert stats["separation_last"] == torch.norm(c_dead - c_live, dim=1)[-1].item()
    assert stats["live_centroid_displacement"] == torch.norm(c_live[-1] - c_live[0]).item()


QUICK_STATS = '''
print("=" * 60)
print("CRUCIBLE 3 STATS")
print("=" * 60)

# Centroid stats
W_dead = W_history[:, dead_mask, :].float()
W_live = W_history[:, live_mask, :].float()

centroid_dead = W_dead.mean(dim=1)  # (501, 64)
centroid_live = W_live.mean(dim=1)  # (501, 64)

centroid_dead_norm = torch.norm(centroid_dead, dim=1)
centroid_live_norm = torch.norm(centroid_live, dim=1)

print(f"\\nDead token centroid:")
print(f"  Norm at t=0: {centroid_dead_norm[0].item():.6f}")
print(f"  Norm at t=500: {centroid_dead_norm[-1].item():.6f}")
print(f"  Total displacement: {torch.norm(centroid_dead[-1] - centroid_dead[0]).item():.6f}")

print(f"\\nLive token centroid:")
print(f"  Norm at t=0: {centroid_live_norm[0].item():.6f}")
print(f"  Norm at t=500: {centroid_live_norm[-1].item():.6f}")
print(f"  Total displacement: {torch.norm(centroid_live[-1] - centroid_live[0]).item():.6f}")

# Separation
separation = torch.norm(centroid_dead - centroid_live, dim=1)
print(f"\\nLive/Dead separation:")
print(f"  Distance at t=0: {separation[0].item():.6f}")
print(f"  Distance at t=500: {separation[-1].item():.6f}")

# h_mean stats
h_mean_norm = torch.norm(h_mean_history, dim=1)
print(f"\\nh_mean:")
print(f"  L2 norm range: [{h_mean_norm.min().item():.6f}, {h_mean_norm.max().item():.6f}]")
print(f"  Mean L2 norm: {h_mean_norm.mean().item():.6f}")
'''
