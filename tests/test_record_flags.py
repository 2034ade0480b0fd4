"""`train --record grad,exp_avg,exp_avg_sq [--record-rows dead|live|all]`: the Crucible-2 data of W.

The recorded values are checked bit for bit against copies taken inside the training loop by
optimizer step hooks (the gradient just before optimizer.step(), AdamW's state just after it).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
import torch
import zarr
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.codecs import Layout
from crucible_record.crucible3.config import RunConfig
from crucible_record.crucible3.export import export_safetensors
from crucible_record.crucible3.run import start_run
from crucible_record.errors import CrucibleError, Interrupted

from .clirun import assert_one_line_error, run_cli
from .conftest import TINY
from .test_cli import tiny_flags

V, H = 10000, TINY["hidden_dim"]
EXTRAS = ("W_grad", "W_exp_avg", "W_exp_avg_sq")
ALL = "grad,exp_avg,exp_avg_sq"
NOTEBOOK_TENSORS = {"W", "h_mean", "loss", "dead_mask", "dead_indices"}
# RunConfig.to_dict() of every run recorded before --record existed (and of a default run now)
OLD_CONFIG_KEYS = ["steps", "batch_size", "seq_len", "lr", "weight_decay", "beta1", "beta2", "eps", "vocab_size",
                   "hidden_dim", "num_layers", "num_heads", "seed", "corpus", "tokenizer", "dead_mask", "device"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t.view(torch.uint8)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), what


@contextmanager
def loop_copies(stop_after: int | None = None):
    """Clones of W's gradient before each optimizer.step() and of AdamW's state for W after it,
    taken by global optimizer step hooks; optionally Ctrl-C after that many steps."""
    copies = {"W_grad": [], "W_exp_avg": [], "W_exp_avg_sq": []}

    def embedding(optimizer):
        (w,) = [p for group in optimizer.param_groups for p in group["params"] if tuple(p.shape) == (V, H)]
        return w

    def pre(optimizer, args, kwargs):
        copies["W_grad"].append(embedding(optimizer).grad.clone())

    def post(optimizer, args, kwargs):
        state = optimizer.state[embedding(optimizer)]
        copies["W_exp_avg"].append(state["exp_avg"].clone())
        copies["W_exp_avg_sq"].append(state["exp_avg_sq"].clone())
        if stop_after is not None and len(copies["W_grad"]) == stop_after:
            raise KeyboardInterrupt

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        yield copies
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_config):
    """A --record grad,exp_avg,exp_avg_sq run (API, as `train` makes it) and the loop's copies."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    config = tiny_config.replace(record=("grad", "exp_avg", "exp_avg_sq"))
    with loop_copies() as copies:
        start_run(config, run_dir, layout=Layout(time_chunk=8), progress=False)
    return run_dir, {name: torch.stack(values) for name, values in copies.items()}


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory, tiny_config):
    """The same run with --record-rows dead (API, as `train` makes it)."""
    run_dir = tmp_path_factory.mktemp("dead") / "run"
    config = tiny_config.replace(record=("grad", "exp_avg", "exp_avg_sq"), record_rows="dead")
    start_run(config, run_dir, layout=Layout(time_chunk=8), progress=False)
    return run_dir


def test_recorded_values_are_the_loops_bit_for_bit(full):
    run_dir, copies = full
    t = open_trajectory(run_dir)
    assert t.config.record == ("grad", "exp_avg", "exp_avg_sq")
    assert len(copies["W_grad"]) == TINY["steps"]
    for name in EXTRAS:
        field = t[name]
        assert field.dtype == copies[name].dtype == torch.bfloat16, name  # what the loop has, never cast
        assert field.shape == (TINY["steps"] + 1, V, H) and field.rows is None
        stored = field[:]
        assert_bits_equal(stored[1:], copies[name], name)  # step s: the gradient / state of step s
        assert torch.isnan(stored[0].float()).all(), name  # step 0: none exists yet
    # the gradient of step s is not the state, and it changes from step to step: the check can fail
    assert not torch.equal(bits(copies["W_grad"][3]), bits(copies["W_grad"][4]))
    assert not torch.equal(bits(copies["W_grad"][3]), bits(copies["W_exp_avg"][3]))


def test_notebook_fields_are_a_default_runs(full, tiny_run):
    ours, default = open_trajectory(full[0]), open_trajectory(tiny_run)
    assert set(default.fields) == {"W", "h_mean", "loss", "epoch"}
    for name in default.fields:
        assert_bits_equal(ours[name][:], default[name][:], name)
    assert list(default.attrs["config"]) == OLD_CONFIG_KEYS  # a default run stores no record keys
    assert ours.attrs["config"]["record"] == ["grad", "exp_avg", "exp_avg_sq"]
    assert ours.attrs["config"]["record_rows"] == "all"


def test_export_default_unchanged_extras_added(tmp_path, full, tiny_run):
    default_file, default_meta = export_safetensors(open_trajectory(tiny_run), tmp_path / "default")
    extras_file, extras_meta = export_safetensors(open_trajectory(full[0]), tmp_path / "extras")
    default, extras = load_file(str(default_file)), load_file(str(extras_file))
    assert set(default) == NOTEBOOK_TENSORS
    assert set(extras) == NOTEBOOK_TENSORS | set(EXTRAS)
    for name in NOTEBOOK_TENSORS:  # the notebook's tensors, unchanged
        assert_bits_equal(extras[name], default[name], name)
    t = cr.open(full[0])
    for name in EXTRAS:  # stored like W: bf16 bits as uint16
        assert extras[name].dtype == torch.uint16
        assert torch.equal(extras[name], t[name][:].view(torch.uint16)), name

    default_meta, extras_meta = json.loads(default_meta.read_text()), json.loads(extras_meta.read_text())
    assert "record_rows" not in default_meta and set(default_meta["data_shapes"]) == {"W", "h_mean", "loss"}
    assert extras_meta.pop("record_rows") == "all"
    assert {k: extras_meta["data_shapes"].pop(k) for k in EXTRAS} == {k: [TINY["steps"] + 1, V, H] for k in EXTRAS}
    # each run's own training date: the two runs may be trained on either side of midnight
    assert extras_meta.pop("date") == open_trajectory(full[0]).attrs["date"]
    assert default_meta.pop("date") == open_trajectory(tiny_run).attrs["date"]
    assert extras_meta == default_meta


@pytest.mark.parametrize("rows", ["dead", "live"])
def test_record_rows_keeps_exactly_those_rows(capsys, tmp_path, tiny_corpus, full, dead_run, rows):
    if rows == "dead":
        run_dir = dead_run
    else:
        run_dir = tmp_path / "run"
        result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", run_dir, "--time-chunk", "8",
                         "--record", "exp_avg_sq,grad", "--record-rows", "live")
        assert result.code == 0, result.err
    t, reference = open_trajectory(run_dir), open_trajectory(full[0])
    dead = t.dead_mask
    kept = torch.nonzero(dead if rows == "dead" else ~dead).flatten()
    assert 0 < len(kept) < V
    if rows == "dead":
        assert torch.equal(kept, t.dead_indices)
    names = EXTRAS if rows == "dead" else ("W_exp_avg_sq", "W_grad")
    assert set(t.fields) == {"W", "h_mean", "loss", "epoch", *names}
    for name in names:
        assert torch.equal(t[name].rows, kept), name
        assert_bits_equal(t[name][:], reference[name][:][:, kept], name)
    assert_bits_equal(t.W[:], reference.W[:], "W")

    exported = load_file(str(export_safetensors(t, tmp_path / "export")[0]))
    for name in names:
        assert exported[name].shape == (TINY["steps"] + 1, len(kept), H)
        assert torch.equal(exported[f"{name}.rows"], kept)


def rewind(source, run_dir, steps: int):
    """A copy of a finished run whose commit marker says it stopped after training step `steps`."""
    shutil.copytree(source, run_dir)
    (run_dir / "trajectory.zarr" / "commit.json").write_text(json.dumps({"steps": steps + 1}))
    return run_dir


def assert_same_run(run_dir, reference_dir):
    t, ref = open_trajectory(run_dir), open_trajectory(reference_dir)
    assert t.steps == ref.steps == TINY["steps"] and set(t.fields) == set(ref.fields)
    for name in t.fields:
        assert_bits_equal(t[name][:], ref[name][:], name)


def test_resume_records_and_checks_the_extras(capsys, tmp_path, full):
    run_dir = rewind(full[0], tmp_path / "run", 10)  # its checkpoint (step 25) is ahead: recomputed from 0
    result = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
    assert result.code == 0, result.err
    assert "recomputing and checking steps 0-10" in result.err
    assert open_trajectory(run_dir).config.record == ("grad", "exp_avg", "exp_avg_sq")
    assert_same_run(run_dir, full[0])


def test_resume_from_a_checkpoint_with_dead_rows(capsys, tmp_path, tiny_config, dead_run):
    """Ctrl-C after step 12: resume restores the checkpoint of step 7 (AdamW's state with it),
    recomputes and checks steps 8-12 on the dead rows, and ends as the uninterrupted run."""
    run_dir = tmp_path / "run"
    config = tiny_config.replace(record=("grad", "exp_avg", "exp_avg_sq"), record_rows="dead")
    with loop_copies(stop_after=13), pytest.raises(Interrupted):
        start_run(config, run_dir, layout=Layout(time_chunk=8), progress=False)
    assert open_trajectory(run_dir).steps == 12
    result = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
    assert result.code == 0, result.err
    assert "at training step 13: recomputing and checking steps 8-12" in result.err
    assert_same_run(run_dir, dead_run)


def test_resume_detects_a_changed_extra(capsys, tmp_path, full):
    run_dir = rewind(full[0], tmp_path / "run", 10)
    grad = zarr.open_array(run_dir / "trajectory.zarr" / "W_grad", mode="r+")
    grad[5, 3, 0] = grad[5, 3, 0] ^ 1  # one bit of the gradient of step 5
    result = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
    assert result.code != 0 and "Traceback" not in result.err
    assert result.err.splitlines()[-1].startswith("error: resume diverged at step 5 (W_grad)"), result.err
    assert open_trajectory(run_dir).steps == 10


@pytest.mark.parametrize("args, fragments", [
    (["--record", "grad,momentum"], ["unknown name 'momentum'", "grad, exp_avg, exp_avg_sq"]),
    (["--record", "grad,exp_avg,grad"], ["'grad' is given twice"]),
    (["--record", ""], ["--record", "empty name"]),
    (["--record-rows", "dead"], ["--record-rows needs --record"]),
    (["--record-rows", "all"], ["--record-rows needs --record"]),
    (["--record", "grad", "--record-rows", "some"], ["--record-rows"]),
], ids=["unknown", "repeated", "empty", "rows-without-record", "all-rows-without-record", "bad-rows"])
def test_bad_record_flags(capsys, tmp_path, tiny_corpus, args, fragments):
    out = tmp_path / "run"
    assert_one_line_error(run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", out, *args), *fragments)
    assert not out.exists()  # refused before anything is written


def test_resume_takes_the_runs_own_choice(capsys, tiny_run):
    assert_one_line_error(run_cli(capsys, "train", "--resume", tiny_run, "--record", "grad"), "drop --record")


def test_config_stays_backward_compatible(tiny_config):
    old = tiny_config.to_dict()
    assert list(old) == OLD_CONFIG_KEYS  # a default config: the keys runs always had
    config = RunConfig.from_dict(old)  # a run recorded before --record existed
    assert config.record == () and config.record_rows == "all" and config.to_dict() == old
    chosen = RunConfig.from_dict({**old, "record": ["exp_avg"], "record_rows": "live"})  # as JSON stores it
    assert chosen.record == ("exp_avg",) and chosen.recorded_fields == ("W_exp_avg",)
    assert RunConfig.from_dict(json.loads(json.dumps(chosen.to_dict()))) == chosen
    assert RunConfig.from_dict({**old, "record": "grad, exp_avg"}).record == ("grad", "exp_avg")  # a config file's string
    for bad in ({"record": ["grad", "grad"]}, {"record": ["nope"]}, {"record_rows": "dead"}, {"record": [1]}):
        with pytest.raises(CrucibleError):
            RunConfig.from_dict({**old, **bad})
