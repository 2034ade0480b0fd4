"""Crafted and damaged runs: every entry point gives a clean error (or the right data), never silent
wrong values, a hang or a memory blowup.

Two small runs are recorded once per module (a generic run made with cr.record and a tiny Crucible-3
run); each case copies one, applies one mutation to its metadata, and runs every entry point on the
copy: cr.open and a read of every field and constant, `info`, `verify`, `verify --repair`,
`export`, and for the Crucible-3 run `analyze` and `train --resume`. A sentinel folder beside the
copy must be left as it was. The cases whose metadata claims huge sizes run their entry points in a
child process under an address-space limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import crucible_record as cr
from crucible_record.errors import CrucibleError

from .clirun import assert_one_line_error, run_cli

STORE = "trajectory.zarr"
GEN_STEPS = 10


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_corpus):
    """The two runs every case starts from, recorded once, and their values as read before any damage."""
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    root = tmp_path_factory.mktemp("crafted")
    rec = cr.record(root / "gen", {"w": cr.Field((3, 4), torch.float32), "b": cr.Field((5,), torch.bfloat16, every=2),
                                   "s": cr.Field((), torch.int64)}, steps=GEN_STEPS,
                    constants={"k": torch.arange(6, dtype=torch.bfloat16), "m": torch.arange(4, dtype=torch.float32)},
                    layout=cr.Layout(time_chunk=4))
    for i in range(GEN_STEPS):
        due = {"b": torch.full((5,), float(i), dtype=torch.bfloat16)} if i % 2 == 0 else {}
        rec.record(i, w=torch.arange(12, dtype=torch.float32).reshape(3, 4) + i, s=torch.tensor(i), **due)
    rec.close()
    config = RunConfig(steps=6, batch_size=4, seq_len=16, hidden_dim=16, num_layers=1, num_heads=2,
                       corpus=str(tiny_corpus), device="cpu")
    start_run(config, root / "c3", layout=cr.Layout(time_chunk=4, row_chunk=1000), progress=False)
    values = {name: _values(root / name) for name in ("gen", "c3")}  # all 7 steps of c3: what a resume recomputes
    # a run stopped after 4 of its 7 recorded steps (its arrays are sized for 7): train --resume has work to do
    (root / "c3" / STORE / "commit.json").write_text(json.dumps({"steps": 4}))
    return {name: (root / name, values[name]) for name in ("gen", "c3")}


def _values(path) -> dict[str, torch.Tensor]:
    run = cr.open(path)
    out = {name: run[name][:] for name in run.fields}
    out.update({name: run.constant(name) for name in run.info.constants})
    return out


# -- mutations: each edits one thing of a copied run ------------------------------------------------


def _edit_json(key: str, change):
    def mutate(store: Path) -> None:
        path = store / key
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return mutate


def _write(key: str, text: str):
    def mutate(store: Path) -> None:
        (store / key).write_text(text)
    return mutate


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(doc):
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value
    return change


def _codec(doc, name):
    """The codec `name` inside an array's (possibly sharded) codec list."""
    codecs = doc["codecs"]
    if codecs[0]["name"] == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]
    return next(c for c in codecs if c["name"] == name)


def _both_shapes(n):
    def change(doc):
        doc["shape"] = [n]
        doc["chunk_grid"]["configuration"]["chunk_shape"] = [n]
        doc["attributes"]["crucible_record"]["shape"] = [n]
    return change


GROUP, COMMIT = "zarr.json", "commit.json"
W = "w/zarr.json"
CASES = {
    # marker ahead of the arrays / arrays cut short of the marker
    "marker ahead": _edit_json(COMMIT, _set("steps", GEN_STEPS + 1)),
    "array shape cut": _edit_json(W, _set("shape", [5, 3, 4])),
    "marker 1e18": _edit_json(COMMIT, _set("steps", 10**18)),
    "marker true": _edit_json(COMMIT, _set("steps", True)),
    "marker negative": _edit_json(COMMIT, _set("steps", -1)),
    "marker float": _edit_json(COMMIT, _set("steps", 5.0)),
    "marker not json": _write(COMMIT, '{"steps": 1'),
    # the run's own record of a field against the array's metadata
    "field record says bfloat16": _edit_json(GROUP, _set("attributes", "fields", "w", "dtype", "bfloat16")),
    "field record says int32": _edit_json(GROUP, _set("attributes", "fields", "w", "dtype", "int32")),
    "field record shape": _edit_json(GROUP, _set("attributes", "fields", "w", "shape", [4, 3])),
    "field record rows": _edit_json(GROUP, _set("attributes", "fields", "w", "rows", 2)),
    "field record not a dict": _edit_json(GROUP, _set("attributes", "fields", "w", "float32")),
    "every 2.5": _edit_json(GROUP, _set("attributes", "fields", "b", "every", 2.5)),
    "every '2'": _edit_json(GROUP, _set("attributes", "fields", "b", "every", "2")),
    "every 1 in the record, 2 in the array": _edit_json(GROUP, _set("attributes", "fields", "b", "every", 1)),
    "constant claims bfloat16": _edit_json("m/zarr.json", _set("attributes", "crucible_record", "dtype", "bfloat16")),
    "constant record missing": _edit_json("m/zarr.json", _set("attributes", {})),
    "layout not a dict": _edit_json(GROUP, _set("attributes", "layout", "fast")),
    "steps true": _edit_json(GROUP, _set("attributes", "steps", True)),
    # an array's zarr.json edited
    "endian big": _edit_json(W, lambda d: _codec(d, "bytes")["configuration"].update(endian="big")),
    "transpose order": _edit_json(W, lambda d: _codec(d, "transpose")["configuration"].update(order=[2, 1, 0])),
    "data_type float64": _edit_json(W, _set("data_type", "float64")),
    "unknown codec": _edit_json(W, lambda d: _codec(d, "blosc").update(name="bogus")),
    "array zarr.json not json": _write(W, "{"),
    "group zarr.json not json": _write(GROUP, '{"zarr_format": 3,'),
    "array attributes rewritten": _edit_json(W, _set("attributes", "crucible_record", "every", 3)),
    # absurd sizes: must neither hang nor allocate
    "constant shape 1e15": _edit_json("k/zarr.json", _set("shape", [10**15])),
    "constant shape and chunk 1e15": _edit_json("k/zarr.json", _both_shapes(10**15)),
    "field record shape 1e15": _edit_json(GROUP, _set("attributes", "fields", "w", "shape", [10**15, 4])),
}
HUGE = {"marker 1e18", "constant shape 1e15", "constant shape and chunk 1e15", "field record shape 1e15"}
C3_CASES = {  # the same kinds of damage on the Crucible-3 run, where analyze and train --resume run too
    "W says float16": _edit_json("W/zarr.json", lambda d: d.update(data_type="float16", fill_value="NaN")),
    "W record says float32": _edit_json(GROUP, _set("attributes", "fields", "W", "dtype", "float32")),
    "marker ahead": _edit_json(COMMIT, _set("steps", 8)),
    "marker 1e18": _edit_json(COMMIT, _set("steps", 10**18)),
    "loss endian big": _edit_json("loss/zarr.json", lambda d: _codec(d, "bytes")["configuration"].update(endian="big")),
    "h_mean every '1'": _edit_json(GROUP, _set("attributes", "fields", "h_mean", "every", "1")),
    "dead_mask shape 1e15": _edit_json("dead_mask/zarr.json", _both_shapes(10**15)),
}
C3_HUGE = {"marker 1e18", "dead_mask shape 1e15"}


# -- running the entry points -----------------------------------------------------------------------


def _copy(bases, which: str, tmp_path: Path, mutate) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(bases[which][0], run)
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("untouched")
    mutate(run / STORE)
    return run, sentinel


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_all(run_dir) -> dict[str, torch.Tensor]:
    run = cr.open(run_dir)
    out = {name: run[name][:] for name in run.fields}
    out.update({name: run.constant(name) for name in run.info.constants})
    return out


def _assert_correct_or_refused(run_dir, expected: dict[str, torch.Tensor]) -> None:
    """cr.open and a read of everything: a CrucibleError, or exactly the values recorded."""
    try:
        got = _read_all(run_dir)
    except CrucibleError as e:
        assert "\n" not in str(e), str(e)
        return
    assert set(got) == set(expected)
    for name, value in got.items():
        want = expected[name][: len(value)] if value.dim() and name in cr.open(run_dir).fields else expected[name]
        assert value.dtype == want.dtype and value.shape == want.shape, (name, value.dtype, want.dtype, value.shape)
        assert torch.equal(value.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), name  # NaN too


def _entry_points(capsys, run: Path, expected, crucible: bool) -> None:
    # the API refuses the damaged run (every case below is damage a reader must see)
    with pytest.raises(CrucibleError) as refused:
        _read_all(run)
    assert "\n" not in str(refused.value)
    for args in (["info", run], ["verify", run], ["export", run, "--out", run.parent / "export"]) + (
            (["analyze", run, "--out", run.parent / "analysis"],) if crucible else ()):
        assert_one_line_error(run_cli(capsys, *args))
    assert not (run.parent / "export").exists() or not any((run.parent / "export").iterdir())
    repaired = run_cli(capsys, "verify", run, "--repair")
    if repaired.code:
        assert_one_line_error(repaired)
    else:  # a repair that succeeds leaves a run that reads back right
        _assert_correct_or_refused(run, expected)
    if crucible:
        resumed = run_cli(capsys, "train", "--resume", run, "--no-progress")
        if resumed.code:
            assert_one_line_error(resumed)
        else:
            _assert_correct_or_refused(run, expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [c for c in CASES if c not in HUGE])
def test_damaged_generic_run(case, bases, tmp_path, capsys):
    run, sentinel = _copy(bases, "gen", tmp_path, CASES[case])
    before = _snapshot(sentinel)
    _entry_points(capsys, run, bases["gen"][1], crucible=False)
    assert _snapshot(sentinel) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [c for c in C3_CASES if c not in C3_HUGE])
def test_damaged_crucible_run(case, bases, tmp_path, capsys):
    run, sentinel = _copy(bases, "c3", tmp_path, C3_CASES[case])
    before = _snapshot(sentinel)
    _entry_points(capsys, run, bases["c3"][1], crucible=True)
    assert _snapshot(sentinel) == before


CHILD = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import crucible_record as cr
    from crucible_record.cli import main
    from crucible_record.errors import CrucibleError
    for case in sys.argv[1:]:
        run, crucible = case[:-2], case.endswith(":1")
        try:
            r = cr.open(run)
            for name in r.fields:
                r[name][:]
            for name in r.info.constants:
                r.constant(name)
            print(run, "API READ")
        except CrucibleError as e:
            print(run, "API REFUSED")
        commands = [["info", run], ["verify", run], ["export", run, "--out", run + "-export"]]
        if crucible:
            commands += [["analyze", run, "--out", run + "-analysis"], ["train", "--resume", run, "--no-progress"]]
        for args in commands + [["verify", run, "--repair"]]:  # a repair last: it may mend the run
            try:
                main(args)
                print(run, "EXIT 0", " ".join(args))
            except SystemExit as e:
                print(run, "EXIT", e.code, " ".join(args))
""")


@pytest.mark.timeout(180)
def test_absurd_sizes_neither_hang_nor_allocate(bases, tmp_path):
    """Sizes of 1e15 elements or 1e18 steps in the metadata: refused in one line, in one child process
    limited to 4 GB of address space, within the timeout (before: verify hung, reads blew up)."""
    cases = [("gen", c, CASES[c]) for c in sorted(HUGE)] + [("c3", c, C3_CASES[c]) for c in sorted(C3_HUGE)]
    runs, sentinels = [], []
    for i, (which, case, mutate) in enumerate(cases):
        run, sentinel = _copy(bases, which, tmp_path / str(i), mutate)
        runs.append(f"{run}:{int(which == 'c3')}")
        sentinels.append((sentinel, _snapshot(sentinel)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(cr.__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", CHILD, *runs], capture_output=True, text=True, timeout=170, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert all("MemoryError" not in line and "CRUCIBLE_DEBUG" not in line for line in errors), errors
    lines = done.stdout.splitlines()
    for (which, case, _), run in zip(cases, runs):
        mine = [line.split(" ", 1)[1] for line in lines if line.startswith(run[:-2] + " ")]
        assert mine[0] == "API REFUSED", (case, mine)
        assert len(mine) == (7 if which == "c3" else 5), (case, mine)
        assert all(line.startswith("EXIT 1") for line in mine[1:-1]), (case, mine)  # all but the repair
    for sentinel, before in sentinels:
        assert _snapshot(sentinel) == before



@pytest.mark.parametrize("index", [{"index_location": "start"},
                                   {"index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}])
def test_a_foreign_shard_index_is_refused_even_with_its_digest_rewritten(index, bases, tmp_path):
    """A crafted run can re-sign its edited metadata; an index of another kind is still refused, not
    read through zarr (which reads an inner chunk absent from such an index as fill)."""
    from crucible_record.format.schema import DIGESTS, metadata_digest
    import zarr

    run, _ = _copy(bases, "gen", tmp_path, lambda store: None)
    _edit_json(W, lambda d: d["codecs"][0]["configuration"].update(index))(run / STORE)
    digest = metadata_digest(zarr.open_array(str(run / STORE / "w"), mode="r"))
    _edit_json(GROUP, lambda d: d["attributes"][DIGESTS].update(w=digest))(run / STORE)
    with pytest.raises(CrucibleError, match="shard index other than the checksummed one"):
        cr.open(run)["w"][:]

# -- names that would collide with the format's own files -------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["zarr.json", "ZARR.JSON", "commit.json", ".rows", ".ranks", "x" * 300, "é" * 150,
                                  "w.0123456789abcdef0123456789abcdef.partial"])
def test_names_colliding_with_the_format_are_refused_before_anything_is_created(name, tmp_path):
    for fields, constants in (({name: cr.Field((2,), torch.float32)}, None),
                              ({"w": cr.Field((2,), torch.float32)}, {name: torch.zeros(2)})):
        path = tmp_path / f"run{constants is not None}"
        with pytest.raises(CrucibleError, match="name"):
            cr.record(path, fields, steps=2, constants=constants)
        assert not (path / STORE).exists()
        cr.record(path, {"ok": cr.Field((2,), torch.float32)}, steps=1).close()  # the path is still usable


# -- repairs and messages ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_repair_never_sets_the_marker_past_the_arrays(bases, tmp_path, capsys):
    run, _ = _copy(bases, "gen", tmp_path, _edit_json(W, _set("shape", [5, 3, 4])))
    result = run_cli(capsys, "verify", run, "--repair")
    steps = json.loads((run / STORE / COMMIT).read_text())["steps"]
    assert steps <= 5, (steps, result)
    if result.code == 0:
        _assert_correct_or_refused(run, bases["gen"][1])
        assert cr.open(run).committed_steps == steps


@pytest.mark.timeout(60)
def test_repair_of_a_marker_ahead_rolls_it_back_to_what_the_arrays_hold(bases, tmp_path, capsys):
    run, _ = _copy(bases, "gen", tmp_path, _edit_json(COMMIT, _set("steps", GEN_STEPS + 1)))
    result = run_cli(capsys, "verify", run, "--repair")
    assert result.code == 0, result
    assert "0..-1" not in result.out and "True steps" not in result.out
    run_read = cr.open(run)
    assert run_read.committed_steps == GEN_STEPS
    _assert_correct_or_refused(run, bases["gen"][1])
    assert "all checksums match" in run_cli(capsys, "verify", run).out


@pytest.mark.timeout(60)
def test_repair_of_block_zero_says_its_ranges_forward(bases, tmp_path, capsys):
    run, _ = _copy(bases, "gen", tmp_path, lambda store: (store / "w/c/0/0/0").write_bytes(b"garbage"))
    result = run_cli(capsys, "verify", run, "--repair")
    text = result.out + result.err
    assert result.code == 0, result
    assert "0..-1" not in text and "rows 0--1" not in text, text
    assert cr.open(run).committed_steps == 0


@pytest.mark.timeout(120)
def test_resume_over_a_damaged_first_block_fails_clearly(bases, tmp_path, capsys, tiny_corpus):
    """train --resume from a checkpoint at the committed step recomputes nothing: it must still not
    continue (and exit 0) over a damaged committed block it never reads."""
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    run, _ = _copy(bases, "c3", tmp_path, _edit_json(COMMIT, _set("steps", 5)))
    config = RunConfig(steps=4, batch_size=4, seq_len=16, hidden_dim=16, num_layers=1, num_heads=2,
                       corpus=str(tiny_corpus), device="cpu")
    start_run(config, tmp_path / "short", layout=cr.Layout(time_chunk=4, row_chunk=1000), progress=False)
    shutil.copy(tmp_path / "short" / "checkpoint.safetensors", run / "checkpoint.safetensors")  # at step 4
    shard = run / STORE / "W" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert result.code != 0, result
    assert "Traceback" not in result.err
    assert result.err.splitlines()[-1].startswith("error: ") and "W" in result.err.splitlines()[-1], result.err
