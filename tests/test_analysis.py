"""`crucible-record analyze` and crucible_record.crucible3.analysis: every quantity against a direct computation.

The direct computations below are written independently with plain torch on W loaded whole from the
tiny run (26 steps x 10,000 tokens x 16), not with the analysis code; a synthetic store whose answers
are known by construction pins the h_mean <-> W index pairing.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

from crucible_record.crucible3 import open_trajectory
from crucible_record.codecs import Layout
from crucible_record.crucible3.analysis import analyze, quick_stats
from crucible_record.crucible3.config import RunConfig
from crucible_record.crucible3.engine import fields
from crucible_record.crucible3.report import PLOT_NAMES, analyze_run
from crucible_record.crucible3.trajectory import EXPERIMENT
from crucible_record.errors import CrucibleError
from crucible_record.format.schema import create_run, write_commit
from crucible_record.reader import LazyField
from crucible_record.storage import open_store


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traj(tiny_run):
    return open_trajectory(tiny_run)


@pytest.fixture(scope="module")
def full(traj):
    """The whole tiny run in memory, as the notebook holds it."""
    W = traj.W[:]
    return {
        "W": W,
        "Wf": W.float(),
        "h": traj.h_mean.clone(),
        "dead": traj.dead_mask.clone(),
        "live": ~traj.dead_mask,
        "n": traj.steps,
    }


@pytest.fixture(scope="module")
def result(traj):
    return analyze(traj)


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    text = analyze_run(tiny_run, out)
    return out, text


def cos(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def close(ours, direct, rtol=1e-6, atol=1e-7):
    ours = torch.as_tensor(ours).double()
    direct = torch.as_tensor(direct).double()
    assert ours.shape == direct.shape, (ours.shape, direct.shape)
    torch.testing.assert_close(ours, direct, rtol=rtol, atol=atol, equal_nan=True)


def bf16_bits(values) -> np.ndarray:
    return torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).view(torch.uint16).numpy()


def make_store(run_dir: Path, W, h_mean, dead, committed: int, configured: int, time_chunk: int = 2) -> Path:
    """A hand-made Crucible run: W (t, vocab, hidden) values (exact in bf16), h_mean rows for steps
    1.. (the run's row 0 is NaN, as recorded), commit marker after training step `committed`."""
    W = np.asarray(W, dtype=np.float32)
    vocab, hidden = W.shape[1], W.shape[2]
    config = RunConfig(steps=configured, vocab_size=vocab, hidden_dim=hidden, num_heads=1, num_layers=1, device="cpu")
    dead = torch.tensor(dead, dtype=torch.bool)
    store = open_store(run_dir, read_only=False)
    group = create_run(store, fields(config), steps=configured + 1,
                       layout=Layout(time_chunk=time_chunk, row_chunk=vocab),
                       attributes={"experiment": EXPERIMENT, "config": config.to_dict()},
                       constants={"dead_mask": dead, "dead_indices": torch.nonzero(dead).flatten()})
    group["W"][: len(W)] = bf16_bits(W)
    if len(h_mean):
        group["h_mean"][1: len(h_mean) + 1] = np.asarray(h_mean, dtype=np.float32)
    group["loss"][1: committed + 1] = np.linspace(2.0, 1.0, committed, dtype=np.float32)
    group["epoch"][: committed + 1] = 1
    write_commit(store, committed + 1)
    return run_dir


# ----------------------------------------------------------------------------------------------
# 1. h_mean persistence
# ----------------------------------------------------------------------------------------------


def test_h_mean_persistence(result, full):
    h, n = full["h"], full["n"]
    lag1 = torch.stack([cos(h[t], h[t + 1]) for t in range(n - 1)])
    close(result["h_mean_cos_lag1"], lag1)
    autocorr = [torch.tensor(1.0, dtype=torch.float64)]
    for k in range(1, n):
        autocorr.append(torch.stack([cos(h[t], h[t + k]) for t in range(n - k)]).mean())
    close(result["h_mean_autocorr"], torch.stack(autocorr), rtol=1e-9, atol=1e-9)
    close(result["h_mean_cos_to_first"], torch.stack([cos(h[0], h[t]) for t in range(n)]))

    q1 = result["summary"]["h_mean_persistence"]
    assert q1["lag1_min"] == pytest.approx(lag1.min().item())
    assert q1["lag1_stays_at_or_above_0.95"] == bool((lag1 >= 0.95).all())
    # the first step from which lag-1 stays >= 0.95 (lag1[t] pairs training steps t+1, t+2)
    settled = next((t + 2 for t in range(n - 1) if (lag1[t:] >= 0.95).all()), None)
    assert q1["lag1_at_or_above_0.95_from_step"] == settled
    assert q1["lag1_share_at_or_above_0.95"] == pytest.approx((lag1 >= 0.95).double().mean().item())
    if (lag1 >= 0.95).all():
        assert q1["answer"] == "yes"
    else:
        assert q1["answer"] == (f"no (yes from step {settled} on)" if settled else "no")
    below = [k for k in range(1, n) if autocorr[k] < 0.5]
    assert q1["autocorr_first_lag_below_0.5"] == (below[0] if below else None)
    assert len(result["lag1_step"]) == n - 1 and result["lag1_step"][0] == 2  # h_mean[0], h_mean[1]: steps 1, 2


# ----------------------------------------------------------------------------------------------
# 2. centroids and path straightness
# ----------------------------------------------------------------------------------------------


def test_centroids_against_whole_W(result, full, traj):
    Wf, dead, live = full["Wf"], full["dead"], full["live"]
    c_dead, c_live = Wf[:, dead, :].mean(dim=1), Wf[:, live, :].mean(dim=1)  # the notebook's Quick Stats
    close(result["centroid_dead_norm"], torch.norm(c_dead, dim=1))
    close(result["centroid_live_norm"], torch.norm(c_live, dim=1))
    close(result["centroid_dead_displacement"], torch.norm(c_dead - c_dead[0], dim=1))
    close(result["centroid_live_displacement"], torch.norm(c_live - c_live[0], dim=1))
    close(result["centroid_separation"], torch.norm(c_dead - c_live, dim=1))
    assert result["centroid_separation"].dtype == torch.float32  # float32 math on bf16 values
    assert len(result["centroid_separation"]) == full["n"] + 1

    stats = quick_stats(traj)  # the pre-existing API agrees with the new arrays
    assert stats["separation_first"] == pytest.approx(result["centroid_separation"][0].item(), rel=1e-6)
    assert stats["separation_last"] == pytest.approx(result["centroid_separation"][-1].item(), rel=1e-6)
    q2 = result["summary"]["centroid_separation"]
    sep = torch.norm(c_dead - c_live, dim=1)
    assert q2["separation_growth"] == pytest.approx((sep[-1] / sep[0]).item(), rel=1e-5)


def test_path_straightness(result, full):
    Wf, dead, live = full["Wf"], full["dead"], full["live"]
    path = sum(torch.norm(Wf[t + 1] - Wf[t], dim=1).double() for t in range(full["n"]))
    net = torch.norm(Wf[-1] - Wf[0], dim=1).double()
    direct = net / path
    close(result["path_straightness"], direct, rtol=1e-5, atol=1e-9)
    for name, mask in (("path_straightness_dead", dead), ("path_straightness_live", live)):
        values = direct[mask]
        summary = result["summary"]["centroid_separation"][name]
        assert summary["tokens"] == int(mask.sum()) and summary["never_moved"] == 0
        q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        assert [summary["p10"], summary["median"], summary["p90"]] == pytest.approx(q.tolist(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. alignment, with the index pairing: h_mean[i] <-> W[i+1], displacement W[i] -> W[i+1]
# ----------------------------------------------------------------------------------------------


def test_alignment_pairs_h_mean_i_with_W_i_plus_1(result, full):
    Wf, dead, live, h, n = full["Wf"], full["dead"], full["live"], full["h"], full["n"]
    c_dead, c_live = Wf[:, dead, :].mean(dim=1), Wf[:, live, :].mean(dim=1)
    expect = {
        "cos_hmean_live_centroid": [cos(h[i], c_live[i + 1]) for i in range(n)],
        "cos_hmean_live_minus_dead": [cos(h[i], c_live[i + 1] - c_dead[i + 1]) for i in range(n)],
        "cos_dead_drift_neg_hmean": [cos(c_dead[i + 1] - c_dead[i], -h[i]) for i in range(n)],
        "cos_dead_drift_neg_sign_hmean": [cos(c_dead[i + 1] - c_dead[i], -torch.sign(h[i])) for i in range(n)],
        "cos_live_drift_hmean": [cos(c_live[i + 1] - c_live[i], h[i]) for i in range(n)],
        "cos_live_drift_sign_hmean": [cos(c_live[i + 1] - c_live[i], torch.sign(h[i])) for i in range(n)],
    }
    for name, values in expect.items():
        close(result[name], torch.stack(values), rtol=1e-5, atol=1e-6)
    # the pairing matters on this run: pairing h_mean[i] with c_live[i] instead gives other numbers
    shifted = torch.stack([cos(h[i], c_live[i]) for i in range(n)])
    assert (result["cos_hmean_live_centroid"] - shifted).abs().max() > 1e-3
    assert list(result["transition_step"][[0, -1]]) == [1, n]
    q3 = result["summary"]["h_mean_alignment"]
    assert q3["mean_cos_hmean_live_centroid"] == pytest.approx(torch.stack(expect["cos_hmean_live_centroid"]).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. bf16 stall
# ----------------------------------------------------------------------------------------------


def test_frac_changed(result, full):
    W, dead, live, n = full["W"], full["dead"], full["live"], full["n"]
    changed = W[1:].float() != W[:-1].float()  # (n, vocab, hidden), compared as values
    close(result["frac_changed_dead"], changed[:, dead, :].double().mean(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    close(result["frac_changed_live"], changed[:, live, :].double().mean(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    late = max(1, round(n * 0.1))
    q4 = result["summary"]["bf16_stall"]
    assert q4["late_mean_frac_changed_dead"] == pytest.approx(changed[-late:, dead].double().mean().item())


# ----------------------------------------------------------------------------------------------
# streaming: block boundaries, bounded reads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 3])
def test_block_size_does_not_change_results(traj, result, block):
    other = analyze(traj, block=block)  # tiny_run stores chunks of 8 steps; 1 and 3 cut differently
    for key, value in result.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-9.0), other[key].nan_to_num(-9.0)), key


def test_reads_at_most_one_chunk_of_W_at_a_time(traj, monkeypatch):
    original = LazyField.__getitem__
    spans = []

    def spy(self, key):
        out = original(self, key)
        if self.name == "W":
            spans.append(out.shape[0] if out.dim() == 3 else 1)
        return out

    monkeypatch.setattr(LazyField, "__getitem__", spy)
    analyze(open_trajectory(traj.run_dir))
    chunk = traj.W.array.chunks[0]
    assert spans and max(spans) <= chunk < traj.steps + 1
    assert sum(spans) <= traj.steps + 1 + 1  # one pass over W (plus at most one single-step read)


# ----------------------------------------------------------------------------------------------
# a synthetic run whose answers are known by construction (and is still in progress)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """4 tokens (0, 1 dead; 2, 3 live), hidden 4, 4 committed steps of 6, chunks of 2 steps.

    h_mean[i] = 2 e_i. Live tokens are (.5,.5,.5,.5) at step 0 and e_{t-1} at step t >= 1, so
    c_live[i+1] is parallel to h_mean[i]. Dead tokens move by -0.5 e_i in the update of step i+1.
    Step 5 is written but not committed (value 100): it must be ignored.
    """
    eye = np.eye(4, dtype=np.float32)
    W = np.zeros((6, 4, 4), dtype=np.float32)
    W[0, 2:] = 0.5
    for t in range(1, 6):
        W[t, :2] = -0.5 * eye[:t].sum(axis=0) if t <= 4 else 100.0
        W[t, 2:] = eye[t - 1] if t <= 4 else 100.0
    h = 2.0 * eye  # rows 0..3 committed
    run = make_store(tmp_path_factory.mktemp("synthetic") / "run", W, h, [True, True, False, False],
                     committed=4, configured=6)
    return run


def test_synthetic_run_known_answers(synthetic):
    traj = open_trajectory(synthetic)
    assert traj.steps == 4
    r = analyze(traj)
    n = 4
    close(r["cos_hmean_live_centroid"], torch.ones(n))  # h_mean[i] vs c_live[i+1]: parallel by construction
    close(r["cos_dead_drift_neg_hmean"], torch.ones(n))  # c_dead[i+1] - c_dead[i] = -0.5 e_i
    close(r["cos_dead_drift_neg_sign_hmean"], torch.ones(n))
    close(r["cos_live_drift_hmean"], torch.tensor([0.5] + [2 ** -0.5] * 3))
    # c_live - c_dead at step i+1 = e_i + 0.5 * sum_{j<=i} e_j
    lmd = [cos(torch.eye(4)[i] * 2, torch.eye(4)[i] + 0.5 * torch.eye(4)[: i + 1].sum(0)) for i in range(n)]
    close(r["cos_hmean_live_minus_dead"], torch.stack(lmd))
    # one coordinate of four per step (step 1 turns the other +0.0 into -0.0: equal values, unchanged)
    close(r["frac_changed_dead"], torch.full((n,), 0.25))
    close(r["frac_changed_live"], torch.tensor([1.0, 0.5, 0.5, 0.5]))
    straight = r["path_straightness"]
    close(straight[:2], torch.full((2,), 0.5))  # 4 orthogonal moves of 0.5: net 1, path 2
    close(straight[2:], torch.full((2,), 1.0 / (1.0 + 3 * 2 ** 0.5)))
    close(r["h_mean_cos_lag1"], torch.zeros(n - 1))  # orthogonal h_mean rows
    close(r["h_mean_autocorr"], torch.tensor([1.0, 0, 0, 0]))
    assert r["summary"]["h_mean_persistence"]["autocorr_first_lag_below_0.5"] == 1
    assert r["summary"]["h_mean_persistence"]["answer"] == "no"
    assert r["summary"]["h_mean_alignment"]["answer"].startswith("yes")
    assert r["summary"]["bf16_stall"]["answer"] == "yes"  # only 25% of dead entries change
    # the uncommitted step 5 (value 100) never leaks in
    assert r["centroid_dead_norm"].shape == (n + 1,) and r["centroid_dead_norm"].max() < 2


def test_report_on_run_in_progress(synthetic, tmp_path):
    text = analyze_run(synthetic, tmp_path / "out", plots=False)
    assert "steps 0..4 committed (4 of 6 training steps); run in progress or stopped" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.json"]
    doc = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert doc["committed_steps"] == 4 and len(doc["step"]) == 5 and doc["loss"][0] is None


# ----------------------------------------------------------------------------------------------
# the report: analysis.json, plots, table
# ----------------------------------------------------------------------------------------------


ARRAYS = [
    "h_mean_cos_lag1", "h_mean_autocorr", "h_mean_cos_to_first",
    "centroid_dead_norm", "centroid_live_norm", "centroid_dead_displacement", "centroid_live_displacement",
    "centroid_separation", "cos_hmean_live_centroid", "cos_hmean_live_minus_dead",
    "cos_dead_drift_neg_hmean", "cos_dead_drift_neg_sign_hmean", "cos_live_drift_hmean",
    "cos_live_drift_sign_hmean", "frac_changed_dead", "frac_changed_live",
]


def test_analysis_json_is_strict_and_complete(report, result):
    out, _ = report

    def no_nan(token):
        raise AssertionError(f"non-strict JSON constant {token}")

    doc = json.loads((out / "analysis.json").read_text(), parse_constant=no_nan)
    for name in ARRAYS:
        assert name in doc, name
        expected = [None if not np.isfinite(v) else v for v in result[name].double().tolist()]
        assert doc[name] == pytest.approx(expected, rel=1e-12), name
    assert doc["loss"][0] is None and len(doc["loss"]) == doc["committed_steps"] + 1
    assert set(doc["summary"]) >= {"h_mean_persistence", "centroid_separation", "h_mean_alignment", "bf16_stall"}
    for q in ("h_mean_persistence", "centroid_separation", "h_mean_alignment", "bf16_stall"):
        assert doc["summary"][q]["answer"] and doc["summary"][q]["evidence"]
    assert "h_mean[i]" in doc["indexing"]["transition"] and "c_live[i+1]" in doc["indexing"]["transition"]
    assert "path_straightness" not in doc  # per-token; its percentiles are in the summary


def test_plots_and_table(report):
    out, text = report
    for name in PLOT_NAMES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    for question in ("Does h_mean keep its direction?", "Do live and dead centroids separate?",
                     "Does h_mean point toward the live centroid?", "Does bf16 stall the drift?"):
        assert question in text
    assert "analysis.json" in text and "steps 0..25 committed (25 of 25 training steps)" in text


def test_out_dir_with_files_needs_force(tiny_run, report):
    out, _ = report
    before = (out / "analysis.json").read_bytes()
    with pytest.raises(CrucibleError, match="--force") as e:
        analyze_run(tiny_run, out)
    assert "\n" not in str(e.value)
    assert (out / "analysis.json").read_bytes() == before
    analyze_run(tiny_run, out, force=True, block=100, plots=False)  # overwrites (other block, same numbers)
    assert json.loads((out / "analysis.json").read_text())["centroid_separation"] == json.loads(before)["centroid_separation"]


# ----------------------------------------------------------------------------------------------
# bad input: one line each
# ----------------------------------------------------------------------------------------------


def _one_line_error(call, *fragments):
    with pytest.raises(CrucibleError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_inputs(tmp_path, tiny_run):
    _one_line_error(lambda: analyze_run(tmp_path / "missing", tmp_path / "o1"), "not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: analyze_run(tmp_path / "empty", tmp_path / "o2"), "not a crucible-record run")
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: analyze_run(tmp_path / "file", tmp_path / "o3"), "not a crucible-record run")
    _one_line_error(lambda: analyze_run(tiny_run, tmp_path / "file"), "not a directory")
    for committed in (0, 1):
        eye = np.eye(3, dtype=np.float32)
        run = make_store(tmp_path / f"short{committed}", eye[None].repeat(committed + 1, 0), eye[:committed],
                         [True, False, False], committed=committed, configured=5)
        _one_line_error(lambda: analyze_run(run, tmp_path / f"o{committed}"), "at least 2")
        _one_line_error(lambda: analyze(open_trajectory(run)), "at least 2")
        assert not (tmp_path / f"o{committed}").exists()


# ----------------------------------------------------------------------------------------------
# xarray / dask
# ----------------------------------------------------------------------------------------------


def test_xarray_open_zarr_named_dims(tiny_run, full):
    ds = xr.open_zarr(tiny_run / "trajectory.zarr", consolidated=False)
    assert ds.W.dims == ("step", "token", "hidden") and ds.W.dtype == np.uint16
    assert ds.h_mean.dims == ("step", "hidden") and ds.loss.dims == ("step",) and ds.epoch.dims == ("step",)
    assert ds.dead_mask.dims == ("token",) and ds.dead_indices.dims == ("dead_token",)
    assert np.array_equal(ds.W.values, full["W"].view(torch.uint16).numpy())
    assert np.isnan(ds.h_mean.values[0]).all() and np.array_equal(ds.h_mean.values[1:], full["h"].numpy())


def test_to_xarray_lazy_float32(traj, full):
    ds = traj.to_xarray()
    assert ds.W.dims == ("step", "token", "hidden") and ds.W.dtype == np.float32
    assert isinstance(ds.W.data, da.Array)  # lazy
    assert ds.W.data.chunksize[0] == traj.W.array.chunks[0]
    assert np.array_equal(ds.W.values, full["Wf"].numpy())
    # h_mean on the step axis: step s holds h_mean[s-1] (forward pass of step s), NaN at step 0
    assert ds.h_mean.dims == ("step", "hidden")
    assert np.isnan(ds.h_mean.sel(step=0).values).all()
    assert np.array_equal(ds.h_mean.sel(step=slice(1, None)).values, full["h"].numpy())
    assert np.isnan(ds.loss.values[0]) and np.array_equal(ds.loss.values[1:], traj.loss[1:].numpy())
    assert np.array_equal(ds.dead_mask.values, full["dead"].numpy())
    c = ds.W.isel(token=np.flatnonzero(ds.dead_mask.values)).mean("token").values
    close(c, full["Wf"][:, full["dead"], :].mean(1), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# examples and the CLI
# ----------------------------------------------------------------------------------------------


def test_cli_analyze(capsys, tiny_run, tmp_path):
    from .clirun import assert_one_line_error, run_cli

    result = run_cli(capsys, "analyze", tiny_run, "--out", tmp_path / "a")
    assert result.code == 0, result.err
    assert "Does bf16 stall the drift?" in result.out and (tmp_path / "a" / "analysis.json").exists()
    assert_one_line_error(run_cli(capsys, "analyze", tiny_run, "--out", tmp_path / "a"), "--force")
    assert run_cli(capsys, "analyze", tiny_run, "--out", tmp_path / "a", "--force").code == 0
    assert_one_line_error(run_cli(capsys, "analyze", tmp_path / "nope"), "not found")
