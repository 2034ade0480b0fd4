"""crucible_record.stats: the per-step statistics equal numpy's on the same recorded data.

Runs recorded here: bf16 and float32 fields, every=k, a rows subset, a scalar, a 3-D field, blocks
of a few steps (so the carry across blocks is exercised) and a run read while only part of its
last block is committed; numpy computes every statistic in float64 from the stored values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crucible_record as cr
from crucible_record.dtypes import decode_stored
from crucible_record.stats import FieldStats, row_bin_edges, stats


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """numpy, float64, from decoded values (steps, ...)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    upd = np.diff(flat, axis=0)
    un = np.linalg.norm(upd, axis=1)
    denom = un[1:] * un[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, (upd[1:] * upd[:-1]).sum(axis=1) / denom, np.nan)
    return {"norm": np.linalg.norm(flat, axis=1), "mean": flat.mean(axis=1), "max_abs": np.abs(flat).max(axis=1),
            "update_norm": np.concatenate([[np.nan], un]),
            "update_cos": np.concatenate([[np.nan, np.nan], cos])[:len(flat)]}


def walk(steps: int, shape, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A random walk with a drift, some entries frozen (as bf16 stalls): (steps, *shape) float32."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    moves = torch.randn((steps, *shape), generator=g) * scale + 0.01
    moves[:, ..., :2] = 0
    moves[5:6] = 0  # one step with no update at all: its cosine is NaN
    return x0 + moves.cumsum(0)


def record_run(path, steps: int = 30):
    W = walk(steps, (50, 8), 0)
    V = walk(steps, (6, 3, 5), 1)
    keep = [0, 3, 4, 17, 42, 49]
    fields = {"W": cr.Field((50, 8), torch.bfloat16), "V": cr.Field((6, 3, 5), torch.float32, every=3),
              "sub": cr.Field((50, 8), torch.bfloat16, rows=keep, every=2), "loss": cr.Field((), torch.float32)}
    with cr.record(path, fields, constants={"dead": torch.arange(50) % 3 == 0},
                   layout=cr.Layout(time_chunk=4, row_chunk=16)) as rec:
        for s in range(steps):
            tensors = {"W": W[s].bfloat16(), "loss": torch.tensor(float("nan") if s == 0 else 1 / s)}
            if s % 3 == 0:
                tensors["V"] = V[s]
            if s % 2 == 0:
                tensors["sub"] = W[s].bfloat16()
            rec.record(s, **tensors)


def check(field, got: dict[str, np.ndarray]) -> None:
    want = reference(decode_stored(field.numpy(), field.dtype))
    assert np.array_equal(got["step"], np.asarray(field.steps))
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, rtol=2e-5, atol=1e-5, equal_nan=True, err_msg=name)


def test_stats_equal_numpy(tmp_path):
    record_run(tmp_path / "run")
    run = cr.open(tmp_path / "run")
    for name in ("W", "V", "sub", "loss"):
        check(run[name], stats(run[name]))
    assert len(stats(run["V"])["step"]) == 10 and list(stats(run["V"])["step"][:3]) == [0, 3, 6]
    assert np.isnan(stats(run["W"])["update_cos"][6])  # step 5 did not move
    # the row-norm bins of a 2-D and a 3-D field: mean of the rows' L2 norms in each bin
    for name, bins in (("W", 7), ("V", 4)):
        field = run[name]
        x = decode_stored(field.numpy(), field.dtype).astype(np.float64)
        norms = np.linalg.norm(x.reshape(len(x), x.shape[1], -1), axis=2)
        edges = row_bin_edges(x.shape[1], bins)
        want = np.stack([norms[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
        np.testing.assert_allclose(FieldStats(row_bins=bins).update(field).row_norms(), want, rtol=2e-5)
    assert FieldStats().update(run["loss"]).row_norms() is None


class CountingField:
    """A field whose reads are counted (by rows read)."""

    def __init__(self, field, n=None):
        self.field, self.reads = field, []
        self.n = len(field) if n is None else n

    def __getattr__(self, name):
        return getattr(self.field, name)

    def __len__(self):
        return self.n

    @property
    def steps(self):
        return self.field.steps

    def numpy(self, key):
        self.reads.append((key.start, key.stop))
        return self.field.numpy(key)


def test_cache_reads_each_complete_block_once(tmp_path):
    record_run(tmp_path / "run")
    field = cr.open(tmp_path / "run")["W"]  # 30 steps in blocks of 4
    fs = FieldStats()
    grown = []
    for n in (3, 3, 9, 14, 30, 30):  # as a live run's commit marker moves on
        view = CountingField(field, n)
        table = fs.update(view).table()
        grown.append(view.reads)
        want = reference(decode_stored(field.numpy(slice(0, n)), field.dtype))
        np.testing.assert_allclose(table["update_cos"], want["update_cos"], rtol=2e-5, atol=1e-5, equal_nan=True)
        assert len(table["step"]) == n == fs.rows
    assert grown == [[(0, 3)], [], [(0, 4), (4, 8), (8, 9)], [(8, 12), (12, 14)],
                     [(12, 16), (16, 20), (20, 24), (24, 28), (28, 30)], []]
    # a block at a time, as the live page reads a long run
    fs, covered = FieldStats(), []
    while fs.rows < len(field):
        covered.append(fs.update(field, blocks=1).rows)
    assert covered == [4, 8, 12, 16, 20, 24, 28, 30]
    check(field, fs.table())


@pytest.mark.parametrize("steps", [1, 2])
def test_first_steps(tmp_path, steps):
    record_run(tmp_path / "run", steps=steps)
    run = cr.open(tmp_path / "run")
    check(run["W"], stats(run["W"]))


def test_wide_steps_match_float64():
    """8 million elements a step: torch's vector_norm and einsum add up such rows in float32 loosely
    (a norm off by ~1e-4, a cosine by ~1e-2); the statistics must stay at float32's own precision."""
    from crucible_record.stats import block_stats

    g = np.random.default_rng(0)
    x0 = g.standard_normal(8_000_000).astype(np.float32)
    moves = [(g.random(x0.size) < 0.25) * g.standard_normal(x0.size).astype(np.float32) * 1e-3 for _ in range(3)]
    flat = np.stack([x0, x0 + moves[0], x0 + moves[0] + moves[1], x0 + moves[0] + moves[1] + moves[2]])
    got = block_stats(flat, flat[:0], torch.float32, (4000, 2000))
    want = reference(flat)
    for key in ("norm", "update_norm", "update_cos"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, equal_nan=True, err_msg=key)


def test_commit_moved_back_to_a_block_boundary(tmp_path):
    """A FieldStats that saw 10 steps (blocks of 4: two complete and 2 rows of a third) updated with
    the same run committed only to step 8: every column has 8 rows, equal to a fresh pass."""
    x = walk(10, (50, 8), 0)
    for name, steps in (("ten", 10), ("eight", 8)):
        with cr.record(tmp_path / name, {"W": cr.Field((50, 8), torch.float32)},
                       layout=cr.Layout(time_chunk=4, row_chunk=16)) as rec:
            for s in range(steps):
                rec.record(s, W=x[s])
    fs = FieldStats().update(cr.open(tmp_path / "ten")["W"])
    table = fs.update(cr.open(tmp_path / "eight")["W"]).table()
    want = stats(cr.open(tmp_path / "eight")["W"])
    assert {len(v) for v in table.values()} == {8}
    for key, values in want.items():
        np.testing.assert_array_equal(table[key], values, err_msg=key)
