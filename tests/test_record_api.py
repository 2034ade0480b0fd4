"""The generic API, cr.record -> cr.open, for any training loop: dtypes bit for bit, cadences and row
subsets, refusals that name the field, open-ended runs, commits shared by all fields (even under
SIGKILL), resume, durability settings, empty runs and xarray."""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
import time

import numpy as np
import pytest
import torch
import xarray

import crucible_record as cr
from crucible_record.codecs import CODEC_PRESETS

from .test_recorder import bits, commit_marker, time_limit, wait_until

NEVER = 1e6  # commit_interval: commits only where a block fills, at a sized run's end and at close


# ----- a run of mixed fields: every step, every 3 steps, every 2 steps on a row subset ---------------
def mixed_fields():
    return {
        "w": cr.Field((6, 5), torch.bfloat16),
        "g": cr.Field((4,), torch.float32, every=3),
        "sub": cr.Field((10, 3), torch.float32, every=2, rows=[1, 4, 7]),
        "n": cr.Field((), torch.int64),
    }


def mixed_step(step):
    """What a training loop hands over at `step` (the fields due then): a function of step only."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = {"w": torch.randn(6, 5, generator=gen).to(torch.bfloat16), "n": torch.tensor(7 * step - 3)}
    if step % 3 == 0:
        out["g"] = torch.randn(4, generator=gen)
    if step % 2 == 0:
        out["sub"] = torch.randn(10, 3, generator=gen)
    return out


def expected(name, steps):
    """The stored rows of field `name` after `steps` steps (steps 0..steps-1)."""
    spec = mixed_fields()[name]
    values = torch.stack([mixed_step(s)[name] for s in range(0, steps, spec.every)])
    return values if spec.row_indices is None else values[:, torch.from_numpy(spec.row_indices)]


def assert_mixed(path, steps):
    """The run commits exactly `steps` steps; every field holds its rows of them, bit for bit."""
    t = cr.open(path)
    assert t.committed_steps == steps
    for name, spec in mixed_fields().items():
        field = t[name]
        assert len(field) == spec.rows_at(steps), name
        assert field.steps == range(0, steps, spec.every), name
        if steps:
            assert torch.equal(bits(field[:]), bits(expected(name, steps))), name
    return t


def record_mixed(path, steps, *, sized=None, time_chunk=4, **kwargs):
    with cr.record(path, mixed_fields(), steps=sized, layout=cr.Layout(time_chunk=time_chunk), **kwargs) as rec:
        for step in range(steps):
            rec.record(step, **mixed_step(step))
    return rec


def assert_same_fields(a, b):
    """Two runs hold the same committed steps and the same stored values, bit for bit."""
    ra, rb = cr.open(a), cr.open(b)
    assert ra.committed_steps == rb.committed_steps
    for name in mixed_fields():
        assert ra[name].array.shape == rb[name].array.shape, name
        assert ra[name].numpy().tobytes() == rb[name].numpy().tobytes(), name


# ----- dtypes -----------------------------------------------------------------------------------
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool]
# NaN (quiet, signalling, negative, with a payload), +inf, -inf, -0.0, the smallest subnormal, the largest finite
SPECIAL_BITS = {
    torch.bfloat16: [0x7FC0, 0x7F81, 0xFFC0, 0x7FD5, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x7F7F],
    torch.float16: [0x7E00, 0x7C01, 0xFE00, 0x7D55, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x7BFF],
    torch.float32: [0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FC12345, 0x7F800000, 0xFF800000, 0x80000000,
                    0x00000001, 0x7F7FFFFF],
    torch.float64: [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8000000000000, 0x7FF800000ABCDEF1,
                    0x7FF0000000000000, 0xFFF0000000000000, 0x8000000000000000, 0x0000000000000001,
                    0x7FEFFFFFFFFFFFFF],
}


def random_tensor(dtype, shape, seed):
    """Random bit patterns of `dtype` (any NaN payload included), with the special values up front."""
    rng = np.random.default_rng(seed)
    if dtype == torch.bool:
        return torch.from_numpy(rng.integers(0, 2, size=shape).astype(bool))
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape)
    raw = rng.integers(0, 256, size=count * itemsize, dtype=np.uint8)
    if dtype in SPECIAL_BITS:
        special = SPECIAL_BITS[dtype][:count]
        raw.view(f"<u{itemsize}")[: len(special)] = special
    else:
        info = torch.iinfo(dtype)
        special = [info.min, info.max][:count]
        raw.view(np.dtype(str(dtype).removeprefix("torch.")))[: len(special)] = special
    return torch.from_numpy(raw).view(dtype).reshape(shape)


SHAPES = {"m": (3, 5), "v": (7,), "s": ()}  # per step: a matrix, a vector, a scalar


@pytest.mark.parametrize("codec", CODEC_PRESETS)
def test_every_dtype_round_trips_bit_exact(tmp_path, codec):
    """Every dtype in every shape kind, through every codec preset: the raw bits come back."""
    kinds = [(f"{str(d).removeprefix('torch.')}_{k}", d, shape) for d in DTYPES for k, shape in SHAPES.items()]
    spec = {name: cr.Field(shape, d) for name, d, shape in kinds}
    values = {name: [random_tensor(d, shape, seed=100 * i + step) for step in range(6)]
              for i, (name, d, shape) in enumerate(kinds)}
    # 2 inner chunks of rows per shard (the second partial), a full block of 4 steps and a partial one
    with cr.record(tmp_path / "run", spec, layout=cr.Layout(time_chunk=4, row_chunk=2, codec=codec),
                   durability="none") as rec:  # (durability is not what this test is about: fast)
        for step in range(6):
            rec.record(step, **{name: values[name][step] for name in spec})
    t = cr.open(tmp_path / "run")
    assert t.committed_steps == 6
    wrong = []
    for name, dtype, shape in kinds:
        got = t[name][:]
        assert got.dtype == dtype and got.shape == (6,) + shape, name
        if not torch.equal(bits(got), bits(torch.stack(values[name]))):
            wrong.append(name)
    assert wrong == [], f"{codec}: fields not read back bit for bit: {wrong}"
    for dtype in DTYPES:  # a selection reads the same bits as the whole
        name = f"{str(dtype).removeprefix('torch.')}_m"
        assert torch.equal(bits(t[name][4, 1:, ::2]), bits(values[name][4][1:, ::2])), name
    assert t["bfloat16_m"].numpy().dtype == np.uint16  # stored as its bits
    assert np.isnan(t["float32_m"].numpy()[0].flat[0]) and np.signbit(t["float64_m"].numpy()[0].flat[6])


# ----- cadences and row subsets -----------------------------------------------------------------
def test_every_and_rows_store_exactly_their_steps_and_rows(tmp_path):
    mask = np.zeros(8, dtype=bool)
    mask[[1, 2, 6]] = True
    spec = {
        "a": cr.Field((5, 2), torch.float32, every=3),
        "r": cr.Field((8, 3), torch.float32, rows=[0, 3, 7]),
        "m": cr.Field((8,), torch.int32, rows=mask),
        "b": cr.Field((8, 3), torch.bfloat16, every=2, rows=torch.tensor([2, 5])),
    }

    def data(step):
        gen = torch.Generator().manual_seed(step)
        out = {"r": torch.randn(3, 8, generator=gen).t(),  # not contiguous
               "m": torch.arange(8, dtype=torch.int32) * 100 + step}
        if step % 3 == 0:
            out["a"] = torch.randn(5, 2, generator=gen, requires_grad=True)  # a parameter-like tensor
        if step % 2 == 0:
            out["b"] = torch.randn(8, 3, generator=gen).to(torch.bfloat16)
        return out

    with cr.record(tmp_path / "run", spec, layout=cr.Layout(time_chunk=2)) as rec:
        for step in range(11):
            rec.record(step, **data(step))
    t = cr.open(tmp_path / "run")
    assert t.committed_steps == 11
    kept = {"a": None, "r": [0, 3, 7], "m": [1, 2, 6], "b": [2, 5]}
    steps = {"a": [0, 3, 6, 9], "r": list(range(11)), "m": list(range(11)), "b": [0, 2, 4, 6, 8, 10]}
    for name, rows in kept.items():
        field = t[name]
        assert list(field.steps) == steps[name] and len(field) == len(steps[name]), name
        if rows is None:
            assert field.rows is None
        else:
            assert field.rows.tolist() == rows
            assert field.array.shape[1] == len(rows)  # only the kept rows are stored
        full = torch.stack([data(s)[name].detach() for s in steps[name]])
        want = full if rows is None else full[:, rows]
        assert torch.equal(bits(field[:]), bits(want)), name
    assert t["a"].row_of(9) == 3
    with pytest.raises(IndexError):
        t["a"].row_of(4)  # not a recorded step of a field recorded every 3 steps


# ----- refusals ---------------------------------------------------------------------------------
REFUSE_FIELDS = {"w": cr.Field((6, 5), torch.bfloat16), "g": cr.Field((4,), torch.float32, every=3),
                 "loss": cr.Field((), torch.float32)}


def good(step):
    out = {"w": torch.full((6, 5), step + 0.5, dtype=torch.bfloat16), "loss": torch.tensor(float(step))}
    if step % 3 == 0:
        out["g"] = torch.full((4,), -float(step))
    return out


BAD_RECORDS = [  # (id, step at which the bad call is made, the call's step and tensors, message)
    ("fp32-for-bf16", 0, lambda: (0, {**good(0), "w": good(0)["w"].float()}),
     r"field 'w': dtype torch\.float32 given, the field records torch\.bfloat16"),
    ("fp64-scalar", 0, lambda: (0, {**good(0), "loss": torch.tensor(1.0, dtype=torch.float64)}),
     r"field 'loss': dtype torch\.float64"),
    ("row-for-matrix", 0, lambda: (0, {**good(0), "w": good(0)["w"][0]}),
     r"field 'w': shape \(5,\) given, the field records \(6, 5\)"),
    ("broadcastable", 0, lambda: (0, {**good(0), "w": good(0)["w"][:1]}), r"field 'w': shape \(1, 5\)"),
    ("transposed", 0, lambda: (0, {**good(0), "w": good(0)["w"].t()}), r"field 'w': shape \(5, 6\)"),
    ("scalar-as-vector", 0, lambda: (0, {**good(0), "loss": torch.zeros(1)}), r"field 'loss': shape \(1,\)"),
    ("missing-due", 0, lambda: (0, {k: v for k, v in good(0).items() if k != "g"}), r"'g' are due and were not given"),
    ("not-due", 1, lambda: (1, {**good(1), "g": torch.zeros(4)}), r"'g' every 3 is not due at this step"),
    ("unknown", 0, lambda: (0, {**good(0), "zz": torch.zeros(1)}), r"'zz' is not a field of this run"),
    ("inexact-python-float", 0, lambda: (0, {**good(0), "loss": 0.1}), r"field 'loss': 0\.1 is not exactly a torch\.float32"),
    ("python-float-for-vector", 0, lambda: (0, {**good(0), "g": 1.5}), r"field 'g': pass a tensor, got float"),
    ("python-bool", 0, lambda: (0, {**good(0), "loss": True}), r"field 'loss': pass a tensor, got bool"),
    ("skips-a-step", 1, lambda: (2, good(2)), r"expected step 1, got 2"),
    ("repeats-a-step", 1, lambda: (0, good(0)), r"expected step 1, got 0"),
    ("str-step", 1, lambda: ("1", good(1)), r"step must be an int"),
    ("bool-step", 1, lambda: (True, good(1)), r"step must be an int"),
]


@pytest.mark.parametrize("at,call,message", [case[1:] for case in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_calls_are_refused_naming_the_field(tmp_path, at, call, message):
    path = tmp_path / "run"
    with cr.record(path, REFUSE_FIELDS, steps=4) as rec:
        for step in range(at):
            rec.record(step, **good(step))
        step, tensors = call()
        with pytest.raises(cr.CrucibleError, match=message):
            rec.record(step, **tensors)
        assert rec.next_step == at  # nothing was staged: the same step can be given again, right
        for step in range(at, 4):
            rec.record(step, **good(step))
    t = cr.open(path)
    assert t.committed_steps == 4
    for name in REFUSE_FIELDS:
        want = torch.stack([good(s)[name] for s in t[name].steps])
        assert torch.equal(bits(t[name][:]), bits(want)), name


def test_step_past_a_sized_run_and_after_close_are_refused(tmp_path):
    rec = cr.record(tmp_path / "run", REFUSE_FIELDS, steps=2)
    assert [rec.record(s, **good(s)) for s in range(2)] == [False, True]  # the last step is a commit point
    with pytest.raises(cr.CrucibleError, match=r"step 2 is past the run's 2 steps \(0\.\.1\)"):
        rec.record(2, **good(2))
    rec.close()
    with pytest.raises(cr.RecorderError, match="after close"):
        rec.record(2, **good(2))
    rec.close()  # closing twice is harmless
    assert cr.open(tmp_path / "run").committed_steps == 2



def test_latest_scalar_and_field_equality_stay_public(tmp_path):
    """Recorder.latest and Field.same_as are public API (cr.Recorder, cr.Field): kept, and right."""
    rec = cr.record(tmp_path / "run", REFUSE_FIELDS, steps=2)
    assert rec.latest("loss") is None
    for s in range(2):
        rec.record(s, **good(s))
    rec.close()  # the writer has placed every step
    assert rec.latest("loss") == float(good(1)["loss"]) and rec.latest("w") is None
    assert REFUSE_FIELDS["w"].same_as(cr.Field((6, 5), torch.bfloat16))
    assert not REFUSE_FIELDS["w"].same_as(cr.Field((6, 5), torch.float32))

BAD_FIELDS = [
    ("negative-shape", lambda: cr.Field((3, -1), torch.float32), "must not be negative"),
    ("shape-not-ints", lambda: cr.Field(("a",), torch.float32), "tuple of ints"),
    ("complex-dtype", lambda: cr.Field((3,), torch.complex64), "dtype .* is not supported"),
    ("uint16-dtype", lambda: cr.Field((3,), torch.uint16), "dtype .* is not supported"),
    ("dtype-as-str", lambda: cr.Field((3,), "float32"), "dtype .* is not supported"),
    ("every-0", lambda: cr.Field((3,), torch.float32, every=0), "every must be an integer >= 1, got 0"),
    ("every-float", lambda: cr.Field((3,), torch.float32, every=2.0), "every must be an integer"),
    ("every-bool", lambda: cr.Field((3,), torch.float32, every=True), "every must be an integer"),
    ("rows-out-of-range", lambda: cr.Field((4, 2), torch.float32, rows=[1, 4]), r"must lie in \[0, 4\)"),
    ("rows-negative", lambda: cr.Field((4, 2), torch.float32, rows=[-1, 2]), r"must lie in \[0, 4\)"),
    ("rows-duplicate", lambda: cr.Field((4, 2), torch.float32, rows=[1, 1]), "without repeats"),
    ("rows-empty", lambda: cr.Field((4, 2), torch.float32, rows=[]), "empty"),
    ("rows-all-false-mask", lambda: cr.Field((4, 2), torch.float32, rows=np.zeros(4, bool)), "empty"),
    ("rows-mask-length", lambda: cr.Field((4, 2), torch.float32, rows=np.ones(3, bool)), r"mask has shape \(3,\)"),
    ("rows-floats", lambda: cr.Field((4, 2), torch.float32, rows=[0.5, 1.5]), "row indices"),
    ("rows-2d", lambda: cr.Field((4, 2), torch.float32, rows=[[0, 1]]), "1-D"),
    ("rows-of-scalar", lambda: cr.Field((), torch.float32, rows=[0]), "at least one axis"),
    ("dims-count", lambda: cr.Field((4, 2), torch.float32, dims=("a",)), "dims must name each of the 2 axes"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
def test_bad_field_arguments_are_refused(make, message):
    with pytest.raises(cr.CrucibleError, match=message):
        make()


BAD_NAMES = [
    ("slash", {"a/b": cr.Field((2,), torch.float32)}, r"'a/b' must not contain '/'"),
    ("backslash", {"a\\b": cr.Field((2,), torch.float32)}, r"must not contain '/'"),
    ("dot", {".x": cr.Field((2,), torch.float32)}, r"'\.x' must not start with '\.' or '__'"),
    ("dunder", {"__x": cr.Field((2,), torch.float32)}, r"'__x' must not start with"),
    ("reserved", {"commit.json": cr.Field((2,), torch.float32)}, r"'commit\.json' is reserved"),
    ("empty", {"": cr.Field((2,), torch.float32)}, "non-empty string"),
    ("not-str", {1: cr.Field((2,), torch.float32)}, r"non-empty string, got 1"),
    ("duplicate", {"W": cr.Field((2,), torch.float32), "w": cr.Field((2,), torch.float32)}, r"'w' is given twice"),
    ("not-a-field", {"x": (2,)}, r"field 'x' must be a cr\.Field"),
    ("no-fields", {}, "non-empty dict"),
]


@pytest.mark.parametrize("spec,message", [c[1:] for c in BAD_NAMES], ids=[c[0] for c in BAD_NAMES])
def test_bad_field_names_are_refused_and_leave_no_run(tmp_path, spec, message):
    path = tmp_path / "run"
    with pytest.raises(cr.CrucibleError, match=message):
        cr.record(path, spec)
    assert not (path / "trajectory.zarr").exists()
    with cr.record(path, {"ok": cr.Field((2,), torch.float32)}) as rec:  # the path is still free, unlocked
        rec.record(0, ok=torch.ones(2))
    assert cr.open(path).committed_steps == 1


def test_existing_run_is_never_overwritten(tmp_path):
    path = tmp_path / "run"
    record_mixed(path, 5)
    marker = (path / "trajectory.zarr" / "commit.json").read_bytes()
    with pytest.raises(cr.CrucibleError, match="already holds a run"):
        cr.record(path, mixed_fields())
    with pytest.raises(cr.CrucibleError, match="already holds a run"):
        cr.record(path, {"other": cr.Field((1,), torch.float32)}, steps=3)
    assert (path / "trajectory.zarr" / "commit.json").read_bytes() == marker
    assert_mixed(path, 5)
    with cr.record(path, mixed_fields(), resume=True) as rec:  # one writer per run
        with pytest.raises(cr.CrucibleError, match="being written by another process"):
            cr.record(path, mixed_fields(), resume=True)
        assert rec.next_step == 5


def test_resume_with_other_fields_is_refused(tmp_path):
    path = tmp_path / "run"
    record_mixed(path, 5)
    base = mixed_fields()
    variants = {
        "extra field": ({**base, "x": cr.Field((1,), torch.float32)}, r"records fields .*'x'"),
        "missing field": ({k: v for k, v in base.items() if k != "g"},
                          r"records fields \['g', 'n', 'sub', 'w'\], not \['n', 'sub', 'w'\]"),
        "dtype": ({**base, "w": cr.Field((6, 5), torch.float16)}, r"field 'w' of .* was recorded as"),
        "shape": ({**base, "g": cr.Field((5,), torch.float32, every=3)}, r"field 'g' of"),
        "every": ({**base, "g": cr.Field((4,), torch.float32, every=2)}, r"field 'g' of"),
        "rows": ({**base, "sub": cr.Field((10, 3), torch.float32, every=2, rows=[1, 4, 8])}, r"field 'sub' of"),
        "no rows": ({**base, "sub": cr.Field((10, 3), torch.float32, every=2)}, r"field 'sub' of"),
    }
    for what, (fields, message) in variants.items():
        with pytest.raises(cr.CrucibleError, match=message):
            cr.record(path, fields, resume=True)
    with pytest.raises(cr.CrucibleError, match="open-ended: it has no step count to extend"):
        cr.record(path, base, steps=10, resume=True)
    with pytest.raises(cr.CrucibleError, match="resume=True continues a run with its own layout"):
        cr.record(path, base, layout=cr.Layout(), resume=True)
    with pytest.raises(cr.CrucibleError, match="not found"):
        cr.record(tmp_path / "nothing", base, resume=True)
    with cr.record(path, base, resume=True) as rec:  # the refusals released the lock
        assert rec.next_step == 5
        rec.record(5, **mixed_step(5))
    assert_mixed(path, 6)


def store_files(path) -> dict[str, bytes]:
    root = Path(path) / "trajectory.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_more_steps_extends_a_sized_run_byte_identical(tmp_path):
    """A sized run of 7 steps (finished), extended to 11 with resume=True, steps=11: every file of the
    store, the metadata included, is the one an uninterrupted 11-step run writes."""
    layout = cr.Layout(time_chunk=4)
    with cr.record(tmp_path / "whole", mixed_fields(), steps=11, attributes={"n": 11}, layout=layout) as rec:
        for step in range(11):
            rec.record(step, **mixed_step(step))
    path = tmp_path / "extended"
    with cr.record(path, mixed_fields(), steps=7, attributes={"n": 7}, layout=layout) as rec:
        for step in range(7):
            rec.record(step, **mixed_step(step))
    with pytest.raises(cr.CrucibleError, match="past the run's 7 steps"):
        with cr.record(path, mixed_fields(), resume=True) as rec:
            rec.record(7, **mixed_step(7))
    with pytest.raises(cr.CrucibleError, match="sized for 7 steps; it can be extended to more, not to 6"):
        cr.record(path, mixed_fields(), steps=6, resume=True)
    with cr.record(path, mixed_fields(), steps=11, attributes={"n": 11}, resume=True) as rec:
        assert rec.next_step == 7
        for step in range(7, 11):
            rec.record(step, **mixed_step(step))
    assert_mixed(path, 11)
    assert store_files(path) == store_files(tmp_path / "whole")


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), "5", None, True])
def test_bad_commit_interval_is_refused(tmp_path, interval):
    with pytest.raises(cr.CrucibleError, match="commit_interval must be a positive number of seconds"):
        cr.record(tmp_path / "run", mixed_fields(), commit_interval=interval)
    assert not (tmp_path / "run").exists()


def test_bad_durability_and_slots_are_refused(tmp_path):
    with pytest.raises(cr.CrucibleError, match="durability must be one of fsync, none"):
        cr.record(tmp_path / "run", mixed_fields(), durability="sometimes")
    with pytest.raises(cr.CrucibleError, match="slots must be an integer >= 1"):
        cr.record(tmp_path / "run", mixed_fields(), slots=0)
    assert not (tmp_path / "run" / "trajectory.zarr").exists()


# ----- open-ended runs and live readers ---------------------------------------------------------
def test_open_ended_run_grows_and_live_readers_see_committed_steps(tmp_path):
    path = tmp_path / "run"
    rec = cr.record(path, mixed_fields(), layout=cr.Layout(time_chunk=4), commit_interval=NEVER)
    points, first_reader = [], None
    with time_limit(60):
        for step in range(14):
            if rec.record(step, **mixed_step(step)):
                points.append(step)
                wait_until(lambda: rec.committed == step + 1, what=f"the commit of step {step}")
                t = assert_mixed(path, step + 1)  # a reader during the run: exactly the committed steps
                with pytest.raises(IndexError):
                    t["w"][step + 1]
                first_reader = first_reader or t
        # blocks of 4 rows fill: w/n at steps 3, 7, 11; sub (every 2) at step 6; g (every 3) at step 9
        assert points == [3, 6, 7, 9, 11]
        rec.close()
    assert commit_marker(path) == 14
    assert len(first_reader["w"]) == 4  # a reader keeps the steps committed when it opened
    t = assert_mixed(path, 14)
    for name, spec in mixed_fields().items():  # arrays hold the committed rows, nothing pre-sized
        assert t[name].array.shape == (spec.rows_at(14),) + spec.stored_shape, name
    shards = sorted(p.name for p in (path / "trajectory.zarr" / "w" / "c").iterdir())
    assert shards == ["0", "1", "2", "3"]  # 14 steps in blocks of 4


# ----- all fields commit together: SIGKILL at a random moment -----------------------------------
KILL_SEEDS = [0, 1, 2]
KILL_TIME_CHUNK = 8
# One interpreter imports torch once (seconds on a small machine), then forks one recording child per
# run directory: each records mixed fields until it is killed, with commits every 0.05 s and at full
# blocks. The parent reports each child's pid, then how each one ended.
SCRIPT = """
import os, sys, threading, time, traceback
import torch
import zarr
import crucible_record as cr

{sources}

def record_forever(path):
    with cr.record(path, mixed_fields(), layout=cr.Layout(time_chunk={time_chunk}), commit_interval=0.05) as rec:
        for step in range(20000):
            rec.record(step, **mixed_step(step))
            time.sleep(0.004)

assert threading.active_count() == 1  # forking is safe: no other thread to lose
children = {{}}
for path in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            record_forever(path)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    children[pid] = path
    print(path, pid, flush=True)
while children:
    pid, status = os.wait()
    print(children.pop(pid), "signal" if os.WIFSIGNALED(status) else "exit",
          os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


def _read_marker(path):
    try:
        return commit_marker(path)
    except (FileNotFoundError, ValueError):
        return -1


def _alive(pid):
    try:
        os.kill(pid, 0)  # the forking parent reaps its children at once: a dead child's pid is gone
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Three runs, each SIGKILLed at a seeded random delay after its marker shows >= 2 steps.
    Returns seed -> run dir."""
    base = tmp_path_factory.mktemp("killed")
    sources = "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in (mixed_fields, mixed_step))
    script = base / "record_until_killed.py"
    script.write_text(SCRIPT.format(sources=sources, time_chunk=KILL_TIME_CHUNK))
    runs = {seed: base / f"run{seed}" for seed in KILL_SEEDS}
    with open(base / "stderr.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), *map(str, runs.values())], stdout=subprocess.PIPE,
                                stderr=log, text=True, cwd=base, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                start_new_session=True)  # its own process group: cleanup kills only it
    pids = {}
    try:
        with time_limit(120):
            for _ in KILL_SEEDS:
                line = proc.stdout.readline().split()
                assert len(line) == 2, (base / "stderr.txt").read_text()
                pids[next(s for s, p in runs.items() if str(p) == line[0])] = int(line[1])
            kill_at, killed = {}, set()
            while len(killed) < len(pids):
                now = time.monotonic()
                for seed, pid in pids.items():
                    if seed not in killed and not _alive(pid):
                        raise AssertionError(f"run {seed} stopped by itself: {(base / 'stderr.txt').read_text()}")
                    if seed not in kill_at and _read_marker(runs[seed]) >= 2:
                        kill_at[seed] = now + random.Random(seed).uniform(0.0, 0.5)
                    if seed in kill_at and now >= kill_at[seed] and seed not in killed:
                        os.kill(pid, signal.SIGKILL)  # a live child of the script (checked just above)
                        killed.add(seed)
                time.sleep(0.002)
            ended = sorted(proc.communicate()[0].splitlines())
    finally:
        if proc.poll() is None:  # a failure above: stop the script and the children it forked
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    # every child was still recording when it was killed (none ended on its own or by an error)
    assert ended == sorted(f"{runs[seed]} signal {int(signal.SIGKILL)}" for seed in KILL_SEEDS), \
        (base / "stderr.txt").read_text()
    return runs


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_leaves_every_field_at_one_committed_step(killed_runs, seed):
    path = killed_runs[seed]
    steps = commit_marker(path)
    assert steps >= 2
    t = assert_mixed(path, steps)  # len == Field.rows_at(steps) for each field, values as recorded
    for name, spec in mixed_fields().items():
        assert t[name].array.shape[0] >= spec.rows_at(steps), name


# ----- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sized", [None, 20], ids=["open-ended", "sized"])
def test_resume_after_close_continues_bit_exact(tmp_path, sized):
    path, reference = tmp_path / "run", tmp_path / "reference"
    record_mixed(reference, 20, sized=sized, durability="none")
    record_mixed(path, 10, sized=sized)  # stops inside a block (blocks of 4 rows)
    with cr.record(path, mixed_fields(), resume=True) as rec:
        assert rec.next_step == rec.committed == 10
        points = [rec.record(step, **mixed_step(step)) for step in range(10, 20)]
    assert points[-1] is True  # step 19 fills a block of w (and ends the sized run)
    assert_mixed(path, 20)
    assert_same_fields(path, reference)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_resume_after_sigkill_continues_bit_exact(killed_runs, tmp_path, seed):
    path, reference = tmp_path / "run", tmp_path / "reference"
    shutil.copytree(killed_runs[seed], path)
    committed = commit_marker(path)
    total = committed + 2 * KILL_TIME_CHUNK + 3  # across two more blocks of every field
    with cr.record(path, mixed_fields(), resume=True) as rec:
        assert rec.next_step == rec.committed == committed
        for step in range(committed, total):
            rec.record(step, **mixed_step(step))
    assert_mixed(path, total)
    assert not list((path / "trajectory.zarr").rglob("*.partial"))  # a killed writer's temporaries are swept
    record_mixed(reference, total, time_chunk=KILL_TIME_CHUNK, durability="none")
    assert_same_fields(path, reference)


# ----- durability, empty runs -------------------------------------------------------------------
@pytest.mark.parametrize("durability", ["default", "fsync", "none"])
def test_durability_settings_record_correctly(tmp_path, monkeypatch, durability):
    import crucible_record.storage as storage

    fsyncs = []
    real_fsync = storage.os.fsync
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    kwargs = {} if durability == "default" else {"durability": durability}
    rec = record_mixed(tmp_path / "run", 9, **kwargs)
    assert rec.committed == 9
    assert_mixed(tmp_path / "run", 9)
    assert (len(fsyncs) == 0) == (durability == "none")


@pytest.mark.parametrize("sized", [None, 5], ids=["open-ended", "sized"])
def test_open_a_run_with_no_committed_step(tmp_path, sized):
    path = tmp_path / "run"
    rec = cr.record(path, mixed_fields(), steps=sized, layout=cr.Layout(time_chunk=4))
    for t in (cr.open(path), None):  # while it is being recorded, then after close
        if t is None:
            rec.close()
            t = cr.open(path)
        assert isinstance(t, cr.Run) and t.committed_steps == 0
        for name, spec in mixed_fields().items():
            field = t[name]
            assert len(field) == 0 and field.steps == range(0) and field.shape == (0,) + spec.stored_shape
            assert field[:].shape == (0,) + spec.stored_shape and field[:].dtype == spec.dtype
    ds = t.to_xarray()
    assert ds.sizes["step"] == 0 and ds["w"].shape == (0, 6, 5)


# ----- export -----------------------------------------------------------------------------------
def test_export_writes_each_fields_steps_into_the_metadata(tmp_path):
    """A field recorded every 3 steps keeps its step mapping in the file: <field>.steps in __metadata__."""
    from safetensors import safe_open

    from crucible_record.export import export_run

    record_mixed(tmp_path / "run", 11)
    target = export_run(cr.open(tmp_path / "run"), tmp_path / "out")
    with safe_open(str(target), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    steps = {name: json.loads(metadata[f"{name}.steps"]) for name in mixed_fields()}
    assert steps == {"w": {"start": 0, "every": 1, "count": 11}, "g": {"start": 0, "every": 3, "count": 4},
                     "sub": {"start": 0, "every": 2, "count": 6}, "n": {"start": 0, "every": 1, "count": 11}}
    for name, entry in steps.items():  # row i of the tensor is step start + i * every
        assert len(tensors[name]) == entry["count"]
    assert torch.equal(tensors["g"][2], mixed_step(6)["g"])
    assert torch.equal(tensors["sub.rows"], torch.tensor([1, 4, 7]))


# ----- xarray -----------------------------------------------------------------------------------
def test_to_xarray_of_mixed_cadences(tmp_path):
    path = tmp_path / "run"
    record_mixed(path, 11)
    ds = cr.open(path).to_xarray()
    assert ds["w"].dims == ("step", "w_0", "w_1")
    assert ds["g"].dims == ("step_every_3", "g_0")
    assert ds["sub"].dims == ("step_every_2", "sub_row", "sub_1")
    assert ds["n"].dims == ("step",)
    assert ds["step"].values.tolist() == list(range(11))
    assert ds["step_every_3"].values.tolist() == [0, 3, 6, 9]
    assert ds["step_every_2"].values.tolist() == [0, 2, 4, 6, 8, 10]
    assert ds["sub_row"].values.tolist() == [1, 4, 7]
    assert ds["w"].dtype == np.float32  # bf16 decoded exactly
    assert np.array_equal(ds["w"].values, expected("w", 11).float().numpy())
    assert np.array_equal(ds["g"].sel(step_every_3=6).values, mixed_step(6)["g"].numpy())
    assert np.array_equal(ds["sub"].sel(step_every_2=10, sub_row=4).values, mixed_step(10)["sub"][4].numpy())
    assert np.array_equal(ds["n"].values, expected("n", 11).numpy())


def test_to_xarray_keeps_each_constants_dtype(tmp_path):
    """float64 stays float64 (not narrowed to float32), bf16 is decoded exactly to float32, the rest as stored."""
    path = tmp_path / "run"
    constants = {"f64": torch.tensor([0.1, 1e-300, 1 + 2**-40], dtype=torch.float64),
                 "f16": torch.tensor([0.5, 65504.0], dtype=torch.float16),
                 "bf16": torch.tensor([0.1, -3.5, 1e38], dtype=torch.bfloat16),
                 "i64": torch.tensor([2**62, -1]), "mask": torch.tensor([True, False])}
    with cr.record(path, {"x": cr.Field((2,), torch.float32)}, constants=constants) as rec:
        rec.record(0, x=torch.zeros(2))
    ds = cr.open(path).to_xarray()
    for name, value in constants.items():
        if value.dtype == torch.bfloat16:
            assert ds[name].dtype == np.float32 and np.array_equal(ds[name].values, value.float().numpy())
        else:
            assert ds[name].dtype == value.numpy().dtype, name
            assert np.array_equal(ds[name].values, value.numpy()), name


def test_xarray_open_zarr_reads_a_closed_run(tmp_path):
    path = tmp_path / "run"
    spec = {"every1": cr.Field((4,), torch.float32), "every3": cr.Field((2, 3), torch.float32, every=3),
            "count": cr.Field((), torch.int32)}
    with cr.record(path, spec, layout=cr.Layout(time_chunk=4)) as rec:
        for step in range(10):
            values = {"every1": torch.arange(4.0) + step, "count": torch.tensor(step, dtype=torch.int32)}
            if step % 3 == 0:
                values["every3"] = torch.full((2, 3), float(step))
            rec.record(step, **values)
    ds = xarray.open_zarr(path / "trajectory.zarr", consolidated=False)
    assert ds.sizes["step"] == 10 and ds.sizes["step_every_3"] == 4
    assert ds["every1"].dims == ("step", "every1_0") and ds["every3"].dims == ("step_every_3", "every3_0", "every3_1")
    assert np.array_equal(ds["every1"].values, (np.arange(4.0) + np.arange(10)[:, None]).astype(np.float32))
    assert np.array_equal(ds["every3"].values[:, 0, 0], [0.0, 3.0, 6.0, 9.0])
    assert ds["count"].values.tolist() == list(range(10))
    assert json.loads((path / "trajectory.zarr" / "commit.json").read_text())["steps"] == 10


@pytest.mark.parametrize("shape,rows,row_chunk", [((1, 6), None, 100), ((5, 1), None, 100), ((5, 6), [2], 100),
                                                  ((5, 6), None, 1), ((7,), None, 100), ((5, 6), None, 100)])
def test_max_preset_round_trips_every_chunk_shape(tmp_path, shape, rows, row_chunk):
    """numcodecs' Delta after the step-last transpose corrupts Fortran-ordered chunks: max must not use it there."""
    fields = {"i": cr.Field(shape, torch.int32, rows=rows), "b": cr.Field(shape, torch.bfloat16, rows=rows)}
    gen = torch.Generator().manual_seed(1)
    values = [torch.randint(-1000, 1000, shape, generator=gen, dtype=torch.int32) for _ in range(6)]
    with cr.record(tmp_path / "run", fields, layout=cr.Layout(time_chunk=4, row_chunk=row_chunk, codec="max")) as rec:
        for step, v in enumerate(values):
            rec.record(step, i=v, b=v.to(torch.bfloat16))
    t = cr.open(tmp_path / "run")
    keep = slice(None) if rows is None else rows
    assert torch.equal(t["i"][:], torch.stack(values)[:, keep])
    assert torch.equal(t["b"][:].view(torch.uint16), torch.stack(values).to(torch.bfloat16)[:, keep].view(torch.uint16))


def test_scalar_constant_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(cr.CrucibleError, match="scalar"):
        cr.record(tmp_path / "run", {"x": cr.Field((2,), torch.float32)}, constants={"lr": torch.tensor(0.5)})
    assert not (tmp_path / "run" / "trajectory.zarr").exists()


def test_damaged_row_indices_are_found_by_verify(tmp_path):
    from crucible_record.verify import verify_run

    with cr.record(tmp_path / "run", {"e": cr.Field((50, 2), torch.float32, rows=[3, 9, 40])}) as rec:
        rec.record(0, e=torch.zeros(50, 2))
    chunk = tmp_path / "run" / "trajectory.zarr" / ".rows" / "e" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x08
    chunk.write_bytes(bytes(data))
    with pytest.raises(cr.CrucibleError, match="row indices of e.*checksum"):  # found on open, in one line
        verify_run(tmp_path / "run")
    with pytest.raises(cr.CrucibleError, match="row indices of e"):
        cr.open(tmp_path / "run")


def test_rows_in_any_order_are_stored_in_the_order_given(tmp_path):
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:20]
    assert not torch.equal(order, order.sort().values)
    fields = {"sub": cr.Field((50, 4), torch.float32, rows=order)}
    weights = [torch.randn(50, 4, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    with cr.record(tmp_path / "run", fields) as rec:
        for step, w in enumerate(weights):
            rec.record(step, sub=w)
    t = cr.open(tmp_path / "run")
    assert torch.equal(t["sub"].rows, order)
    assert torch.equal(t["sub"][:], torch.stack([w[order] for w in weights]))  # like W[rows]


@pytest.mark.parametrize("dtype,value", [(torch.float32, 1.5), (torch.float32, 3), (torch.float64, 0.1),
                                         (torch.float16, float("nan")), (torch.int64, 2**40), (torch.int8, -7)])
def test_python_numbers_for_scalar_fields_are_stored_exactly(tmp_path, dtype, value):
    with cr.record(tmp_path / "run", {"x": cr.Field((), dtype)}) as rec:
        rec.record(0, x=value)
        rec.record(1, x=torch.tensor(value, dtype=dtype))
    stored = cr.open(tmp_path / "run")["x"][:]
    assert stored.dtype == dtype
    expected = torch.tensor([value, value], dtype=dtype)
    assert torch.equal(bits(stored), bits(expected))  # bit for bit, NaN included


@pytest.mark.parametrize("dtype,value,message", [(torch.int32, 1.0, "a Python float 1.0 given"),
                                                 (torch.int8, 300, "does not fit in torch.int8"),
                                                 (torch.bool, 1, "a Python int 1 given"),
                                                 (torch.float64, 2**53 + 1, "is not exactly a torch.float64")])
def test_python_numbers_that_would_narrow_are_refused(tmp_path, dtype, value, message):
    with cr.record(tmp_path / "run", {"x": cr.Field((), dtype)}) as rec:
        with pytest.raises(cr.CrucibleError, match=message):
            rec.record(0, x=value)
        rec.record(0, x=torch.zeros((), dtype=dtype))
    assert cr.open(tmp_path / "run").committed_steps == 1


def test_a_tied_parameter_recorded_twice_warns_once_naming_both(tmp_path, recwarn):
    wte = torch.nn.Parameter(torch.randn(8, 4))
    lm_head = torch.nn.Linear(4, 8, bias=False)
    lm_head.weight = wte  # tied, as in GPT-2
    fields = {"wte": cr.Field((8, 4), torch.float32), "lm_head": cr.Field((8, 4), torch.float32),
              "other": cr.Field((8, 4), torch.float32)}
    with cr.record(tmp_path / "run", fields) as rec:
        for step in range(3):
            rec.record(step, wte=wte, lm_head=lm_head.weight, other=wte.detach().clone())
    tied = [w for w in recwarn if "same tensor" in str(w.message)]
    assert len(tied) == 1
    assert "'wte' and 'lm_head'" in str(tied[0].message) and "other" not in str(tied[0].message)
    assert tied[0].filename == __file__  # points at the caller's record()


def test_a_recorder_never_closed_commits_its_steps_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import torch, crucible_record as cr
        rec = cr.record({str(tmp_path / "run")!r}, {{"w": cr.Field((3,), torch.float32)}}, commit_interval=1e6)
        for step in range(7):
            rec.record(step, w=torch.full((3,), float(step)))
        raise RuntimeError("the training loop failed")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the training loop failed" in done.stderr
    assert "was not closed; committing its 7 recorded steps at interpreter exit" in done.stderr
    t = cr.open(tmp_path / "run")
    assert t.committed_steps == 7
    assert torch.equal(t["w"][:], torch.arange(7.0).repeat_interleave(3).view(7, 3))
