"""Every script in examples/ runs as a user would run it (a subprocess, small sizes) and does what it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import crucible_record as cr
from crucible_record.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TESTED = {"gpt2_embedding.py", "sampled_rows.py", "record_custom_loop.py", "dask_centroid.py", "reproduce_notebook.py",
          "ddp_crucible.py"}  # ddp_crucible.py: tests/test_multirank.py::test_ddp_example


def run(*args, timeout: float = 120, cwd: Path = ROOT) -> str:
    """Run a command with this interpreter (from the repository root by default); its stdout (fails on non-zero exit)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def zarr_json(run_dir: Path, key: str) -> dict:
    return json.loads((run_dir / "trajectory.zarr" / key / "zarr.json").read_text())


@pytest.fixture(scope="module")
def crucible_run(tmp_path_factory, tiny_corpus) -> Path:
    """A tiny Crucible-3 run made by `crucible-record train` (the CLI's entry point, called in-process)."""
    out = tmp_path_factory.mktemp("examples") / "crucible"
    args = ["train", "--steps", 6, "--batch-size", 4, "--seq-len", 16, "--hidden-dim", 16, "--num-layers", 1,
            "--time-chunk", 4, "--corpus", tiny_corpus, "--device", "cpu", "--no-progress", "--out", out]
    try:  # in-process: the same entry point as the `crucible-record` command, without a second torch import
        cli_main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, f"crucible-record train exited {e.code}"
    assert json.loads((out / "trajectory.zarr" / "commit.json").read_text()) == {"steps": 7}
    return out


HELPERS = {"crucible_run_arg.py"}  # imported by dask_centroid.py and reproduce_notebook.py


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == TESTED | HELPERS


def test_gpt2_embedding(tmp_path):
    out = tmp_path / "gpt2"
    text = run(EXAMPLES / "gpt2_embedding.py", "--small", "--steps", 21, "--layers", 1, "--hidden", 16,
                "--seq-len", 16, "--batch-size", 2, "--active", 64, "--out", out)
    assert "lm_head steps: [0, 10, 20]" in text
    assert "last wte row equals the model's weight at that step: True" in text
    assert re.search(r"token 999 \(unseen\): \|wte\[20\] - wte\[0\]\| = 0\.000000", text), text

    t = cr.open(out)
    assert t.committed_steps == 21
    assert list(t["lm_head"].steps) == [0, 10, 20]
    assert list(t["wte"].steps) == list(range(21))
    assert tuple(t["wte"].shape) == (21, 1000, 16) and t["wte"].dtype == torch.bfloat16
    assert tuple(t["lm_head"].shape) == (3, 1000, 16)
    losses = t["loss"][:]
    assert losses.shape == (21,) and torch.isfinite(losses).all()
    assert losses[-1] < losses[0]  # the synthetic task is learnable
    assert not torch.equal(t["wte"][20, 7], t["wte"][0, 7])  # a token of the data moved
    assert zarr_json(out, "lm_head")["dimension_names"] == ["step_every_10", "token", "hidden"]
    assert zarr_json(out, "wte")["dimension_names"] == ["step", "token", "hidden"]


def test_sampled_rows(tmp_path):
    out = tmp_path / "sampled"
    text = run(EXAMPLES / "sampled_rows.py", "--small", "--seed", 3, "--out", out)  # 5000 x 16, 200 rows, 10 steps
    assert "rows stored equal the sample: True" in text
    assert "last step's stored rows equal the weight's rows: True" in text
    assert "grad_rms steps: [0, 3, 6, 9]" in text

    sample = np.sort(np.random.default_rng(3).choice(5000, size=200, replace=False))  # the example's sample
    t = cr.open(out)
    some = t["emb_some"]
    assert np.array_equal(some.rows.numpy(), sample)
    assert tuple(some.shape) == (10, 200, 16)
    assert t.fields["emb_some"].shape == (5000, 16)
    assert zarr_json(out, "emb_some")["dimension_names"] == ["step", "emb_some_row", "hidden"]
    stored_rows = zarr_json(out, ".rows/emb_some")
    assert stored_rows["shape"] == [200] and stored_rows["data_type"] == "int64"
    stat = t["grad_rms"]
    assert list(stat.steps) == [0, 3, 6, 9] and stat.dtype == torch.float16
    g = stat[:]
    assert g.shape == (4, 5000) and torch.isfinite(g).all()
    assert (g[:, 0] > 0).all()  # token 0 is the most frequent: it has a gradient at every recorded step


@pytest.mark.parametrize("script, prefix, steps", [("sampled_rows.py", "sampled-rows", 3), ("gpt2_embedding.py", "gpt2-embedding", 3),
                                                   ("record_custom_loop.py", "custom-loop", 3),
                                                   ("dask_centroid.py", "dask-centroid", 21),
                                                   ("reproduce_notebook.py", "reproduce-notebook", 21)])
def test_small_examples_need_no_out(tmp_path, script, prefix, steps):
    """Every example takes --small, and writes its run under ./runs/ by default (ddp_crucible.py:
    tests/test_multirank.py::test_ddp_example)."""
    text = run(EXAMPLES / script, "--small", *(["--steps", steps] if steps == 3 else []), cwd=tmp_path)
    [made] = (tmp_path / "runs").iterdir()
    assert made.name.startswith(prefix + "-") and f" into runs/{made.name}" in text
    assert cr.open(made).committed_steps == steps


@pytest.mark.parametrize("script", sorted(TESTED))
def test_examples_say_errors_in_one_line(tmp_path, crucible_run, script):
    """An existing run at --out is refused in one line `error: ...`, with no traceback."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--small", "--out", str(crucible_run)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already" in lines[0], proc.stderr


def test_record_custom_loop(tmp_path):
    out = tmp_path / "custom"
    text = run(EXAMPLES / "record_custom_loop.py", "--out", out, "--small", "--steps", 12)  # vocab 200
    assert "unused rows unchanged: True" in text
    t = cr.open(out)
    assert set(t.fields) == {"embedding", "batch_mean", "loss"}
    assert t.committed_steps == 12
    unused = t["unused"]
    assert unused.dtype == torch.bool and int(unused.sum()) == 100
    E = t["embedding"]
    assert torch.equal(E[-1][unused], E[0][unused])
    assert not torch.equal(E[-1][~unused], E[0][~unused])


def test_dask_centroid(crucible_run):
    text = run(EXAMPLES / "dask_centroid.py", crucible_run)
    assert "7 committed steps" in text
    assert "dims of W: ('step', 'token', 'hidden')" in text
    assert "over 2 chunks" in text  # one dask chunk per shard: steps 0-3 and 4-6
    diff = float(re.search(r"centroids\| = (\S+)", text).group(1))
    assert diff < 1e-5


def test_reproduce_notebook(crucible_run):
    text = run(EXAMPLES / "reproduce_notebook.py", crucible_run)
    assert "CRUCIBLE 3 STATS" in text
    for question in ("Does h_mean keep its direction?", "Do live and dead centroids separate?",
                     "Does h_mean point toward the live centroid?"):
        assert question in text
