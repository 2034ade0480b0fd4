"""Runs written by crucible-record 0.1 (format 1) still open, read, verify and export; resume refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3.config import RunConfig
from crucible_record.crucible3.export import export_safetensors
from crucible_record.verify import verify_run

from .clirun import assert_one_line_error, run_cli

V, H, STEPS, COMMITTED = 30, 4, 9, 6


def make_format1_run(run_dir):
    """The layout crucible-record 0.1 wrote (its store.create_store), filled by hand."""
    rng = np.random.default_rng(0)
    W = torch.from_numpy(rng.standard_normal((STEPS + 1, V, H)).astype(np.float32)).to(torch.bfloat16)
    h_mean = rng.standard_normal((STEPS, H)).astype(np.float32)
    loss = np.concatenate([[np.nan], np.linspace(3, 2, STEPS)]).astype(np.float32)
    dead = np.zeros(V, dtype=bool)
    dead[::4] = True
    group = zarr.open_group(str(run_dir / "trajectory.zarr"), mode="w-", zarr_format=3)
    group.create_array("W", data=W.view(torch.uint16).numpy(), chunks=(4, 10, H), shards=(4, V, H),
                       dimension_names=("step", "token", "hidden"))
    group.create_array("h_mean", data=h_mean, chunks=(4, H), dimension_names=("step_minus_one", "hidden"))
    group.create_array("loss", data=loss, chunks=(4,), dimension_names=("step",))
    group.create_array("dead_mask", data=dead, chunks=(V,), dimension_names=("token",))
    group.create_array("dead_indices", data=np.flatnonzero(dead).astype(np.int64), chunks=(V,),
                       dimension_names=("dead_token",))
    config = RunConfig(steps=STEPS, vocab_size=V, hidden_dim=H, num_heads=1, num_layers=1, device="cpu")
    group.attrs.update({"format": "crucible-record", "format_version": 1, "config": config.to_dict(),
                        "layout": {"time_chunk": 4, "token_chunk": 10, "codec": "default"},
                        "commit": {"steps": COMMITTED, "epoch": 2}, "date": "2026-01-02",
                        "provenance": {"device": "cpu"}})
    return W, h_mean, loss, dead


@pytest.fixture
def old_run(tmp_path):
    run_dir = tmp_path / "old"
    return run_dir, make_format1_run(run_dir)


def test_format1_run_reads_as_before(old_run):
    run_dir, (W, h_mean, loss, dead) = old_run
    t = open_trajectory(run_dir)
    assert t.version == 1 and t.steps == COMMITTED and t.epochs == 2
    assert torch.equal(t.W[:].view(torch.uint16), W[: COMMITTED + 1].view(torch.uint16))
    assert np.array_equal(t.h_mean.numpy(), h_mean[:COMMITTED])
    assert np.array_equal(t.loss.numpy(), loss[: COMMITTED + 1], equal_nan=True)
    assert np.array_equal(t.dead_mask.numpy(), dead)
    assert list(t["h_mean"].steps) == list(range(1, COMMITTED + 1))  # format 1 stored h_mean from step 1
    assert t.committed_steps == COMMITTED + 1 and set(t.fields) == {"W", "h_mean", "loss"}
    ds = t.to_xarray()
    assert np.isnan(ds.h_mean.sel(step=0).values).all()
    assert np.array_equal(ds.h_mean.sel(step=slice(1, None)).values, h_mean[:COMMITTED])
    assert verify_run(run_dir).ok


def test_format1_export_and_cli(capsys, old_run, tmp_path):
    run_dir, (W, h_mean, loss, dead) = old_run
    target, meta = export_safetensors(open_trajectory(run_dir), tmp_path / "exp")
    tensors = load_file(str(target))
    assert torch.equal(tensors["W"], W[: COMMITTED + 1].view(torch.uint16))
    assert np.array_equal(tensors["h_mean"].numpy(), h_mean[:COMMITTED])
    assert json.loads(meta.read_text())["total_epochs"] == 2
    info = run_cli(capsys, "info", run_dir)
    assert info.code == 0 and "format 1" in info.out and f"{COMMITTED} of {STEPS} training steps" in info.out
    assert run_cli(capsys, "verify", run_dir).code == 0
    assert_one_line_error(run_cli(capsys, "train", "--resume", run_dir), "format 1", "not resumed")
