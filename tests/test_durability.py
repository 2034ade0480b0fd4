"""Durable and safe: interval commits that survive kill -9, fsync order, checkpoints that never run code,
locks that never follow links, verify --repair, kill leftovers, and readers that never take an absent
chunk for data.

Crucible runs are tiny (tests/conftest.py TINY, fewer steps); generic runs are a few KB. The one
subprocess test slows each step with a sleep in a wrapper script (the numbers are unchanged) and logs
each step handed to the recorder and whether it was a commit point; it kills by the run's own reports.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.errors import CrucibleError, Interrupted, RecorderError
from crucible_record.reader import Run
from crucible_record.storage import open_store, run_lock

from .clirun import assert_one_line_error, run_cli
from .conftest import TINY
from .test_cli import tiny_flags

STORE = "trajectory.zarr"
PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
CRUCIBLE_FIELDS = ("W", "h_mean", "loss", "epoch")
BASE_STEPS = 10  # the shared Crucible run: W blocks of 4 rows -> rows 0-3, 4-7, 8-10
NEVER = 1e6  # commit_interval for generic runs: commits only at full blocks, a sized run's end, close


# ----- helpers -------------------------------------------------------------------------------------
def commit_steps(run_dir: Path) -> int:
    return json.loads((Path(run_dir) / STORE / "commit.json").read_text())["steps"]


def set_commit(run_dir: Path, steps: int) -> None:
    """What a kill after `steps` committed steps leaves (later rows may be on disk, uncommitted)."""
    (Path(run_dir) / STORE / "commit.json").write_text(json.dumps({"steps": steps}) + "\n")


def crucible_flags(corpus, steps: int) -> list[str]:
    flags = tiny_flags(corpus)
    flags[flags.index("--steps") + 1] = str(steps)
    return flags


def assert_same_prefix(run_dir: Path, reference: Path, steps: int) -> None:
    """Steps 0..steps-1 of every field are bit-identical to the reference run's."""
    ours, ref = Run(run_dir), Run(reference)
    for name in CRUCIBLE_FIELDS:
        a, b = ours[name].numpy(slice(0, steps)), ref[name].numpy(slice(0, steps))
        assert a.shape == b.shape and a.shape[0] == steps, name
        assert a.tobytes() == b.tobytes(), f"{name} differs from the uninterrupted run in steps 0..{steps - 1}"


def export_bytes(capsys, run_dir: Path, out: Path) -> bytes:
    result = run_cli(capsys, "export", run_dir, "--out", out)
    assert result.code == 0, result.err
    return (out / "crucible_3_trajectory.safetensors").read_bytes()


def partial_name(stem: str, n: int) -> str:
    return f"{stem}.{n:032x}.partial"


def partial_files(run_dir: Path) -> list[Path]:
    return [p for p in (Path(run_dir) / STORE).rglob("*") if PARTIAL.search(p.name)]


def resume(capsys, run_dir: Path):
    return run_cli(capsys, "train", "--resume", run_dir, "--no-progress")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_corpus) -> Path:
    """One finished tiny Crucible run of 10 steps in blocks of 4; tests work on copies of it."""
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    config = RunConfig(**{**TINY, "steps": BASE_STEPS}, corpus=str(tiny_corpus), device="cpu")
    run_dir = tmp_path_factory.mktemp("durability") / "base"
    start_run(config, run_dir, layout=Layout(time_chunk=4, row_chunk=1000), progress=False)
    assert commit_steps(run_dir) == BASE_STEPS + 1
    return run_dir


def copy_run(base: Path, dst: Path, *, committed: int | None = None) -> Path:
    shutil.copytree(base, dst, symlinks=True)
    if committed is not None:
        set_commit(dst, committed)
    return dst


# ----- 1. commit points come from the interval; kill -9 keeps what the run reported committed --------
KILL_STEPS = 16  # configured steps of the killed run and of its reference
STEP_SLEEP = 0.5  # added to every step: ~0.5-1 s a step, so 16 steps span several commit intervals
INTERVAL = 2.0  # --commit-interval
KILL_AFTER = 9  # steps handed to the recorder before the kill, at least


def _reported(entries, run_dir: Path) -> int | None:
    """The last commit point the run logged that its marker already says is durable (None: none yet).
    Judged by the run's own reports (its log and commit.json), not by the clock: load cannot change it."""
    try:
        committed = commit_steps(run_dir)
    except (OSError, ValueError):
        return None
    points = [step for step, _, commit in entries if commit and step + 1 <= committed]
    return points[-1] if points else None

WRAPPER = '''
import os, sys, time
log, pause = sys.argv[1], float(sys.argv[2])
import crucible_record.writer as recorder
_record = recorder.Recorder.record

def record(self, step, **tensors):
    time.sleep(pause)  # a slow training step; the numbers do not change
    commit = _record(self, step, **tensors)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{step} {time.monotonic():.6f} {int(commit)}\\n".encode())
    finally:
        os.close(fd)
    return commit

recorder.Recorder.record = record
from crucible_record.cli import main
main(sys.argv[3:])
'''


def read_log(path: Path) -> list[tuple[int, float, bool]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:  # a line cut by the kill is ignored
            entries.append((int(parts[0]), float(parts[1]), parts[2] == "1"))
    return entries


def test_kill_9_keeps_every_reported_commit_and_resumes_byte_identical(capsys, tmp_path, tiny_corpus):
    """A slowed run whose blocks never fill (64 steps a block, 16 steps) commits at points its
    commit interval makes; kill -9 once it has reported (commit.json) such a commit: every step it
    reported stays, nothing past what it recorded appears, and a resume finishes it byte-identical.
    Every condition is the run's own progress, so a loaded machine only makes it slower (how many
    seconds a commit lags its step depends on the machine's load: it is not asserted)."""
    wrapper = tmp_path / "slow_train.py"
    wrapper.write_text(WRAPPER)
    flags = [*crucible_flags(tiny_corpus, KILL_STEPS), "--time-chunk", "64", "--commit-interval", str(INTERVAL)]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref_log, log = tmp_path / "reference.log", tmp_path / "killed.log"

    def start(log_file, pause, out):
        return subprocess.Popen([sys.executable, str(wrapper), str(log_file), str(pause), "train", *flags, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # the uninterrupted reference runs alongside (same flags, not slowed): the killed run mostly sleeps
    reference = start(ref_log, 0, ref_dir)
    proc = start(log, STEP_SLEEP, run_dir)
    try:
        deadline = time.monotonic() + 300  # only a run that never commits gets here
        while len(read_log(log)) < KILL_AFTER or _reported(read_log(log), run_dir) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the slowed run ended (or never committed) before the kill: rc={proc.wait()} "
                            f"log {read_log(log)} {proc.communicate()[1][-2000:]}")
            time.sleep(0.01)
        reported = _reported(read_log(log), run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        _, err = reference.communicate(timeout=300)
        assert reference.returncode == 0, err[-2000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
                p.communicate()

    entries = read_log(log)
    assert [step for step, _, _ in entries] == list(range(len(entries)))
    assert KILL_AFTER <= len(entries) < KILL_STEPS + 1  # killed mid-run
    points = [step for step, _, commit in entries if commit]
    assert points, entries  # commit points though no block filled: the interval's
    committed = commit_steps(run_dir)
    assert committed >= reported + 1, f"kill -9 lost steps the run had reported committed: {committed} < {reported + 1}"
    assert committed <= len(entries)  # never ahead of what was recorded
    assert open_trajectory(run_dir).steps == committed - 1
    assert_same_prefix(run_dir, ref_dir, committed)

    # temporaries a kill leaves inside the store are swept by train --resume
    planted = [run_dir / STORE / "W" / "c" / "0" / "0" / partial_name("0", 0xABC),
               run_dir / STORE / partial_name("commit", 0xDEF)]
    for path in planted:
        path.write_bytes(b"\0" * 4096)
    result = resume(capsys, run_dir)
    assert result.code == 0, result.err
    assert not any(p.exists() for p in planted) and partial_files(run_dir) == []
    assert commit_steps(run_dir) == KILL_STEPS + 1
    assert_same_prefix(run_dir, ref_dir, KILL_STEPS + 1)
    assert export_bytes(capsys, run_dir, tmp_path / "exp_killed") == export_bytes(capsys, ref_dir, tmp_path / "exp_ref")


# ----- 2. checkpoints never run code ---------------------------------------------------------------
class _WritesMarker:
    """Unpickling this opens (creates) the marker file: any code execution at load would show."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_WritesMarker(marker))


def test_the_crafted_pickle_is_live(tmp_path):
    """The payload used below really runs code when unpickled (else the tests below prove nothing)."""
    probe = tmp_path / "probe"
    pickle.loads(evil_pickle(probe)).close()
    assert probe.exists()


def test_pickled_checkpoint_is_refused_or_ignored_never_run(capsys, tmp_path, base_run):
    marker = tmp_path / "code_ran"
    # (a) a pickle under the safetensors name: a one-line refusal, nothing executed, nothing committed
    run_a = copy_run(base_run, tmp_path / "a", committed=4)
    (run_a / "checkpoint.safetensors").write_bytes(evil_pickle(marker))
    (run_a / "checkpoint.pt").write_bytes(evil_pickle(marker))
    assert_one_line_error(resume(capsys, run_a), "checkpoint.safetensors", "unreadable")
    assert not marker.exists()
    assert commit_steps(run_a) == 4

    # (b) an old-style checkpoint.pt is not read at all: the resume recomputes and finishes
    run_b = copy_run(base_run, tmp_path / "b", committed=4)
    (run_b / "checkpoint.safetensors").unlink()
    (run_b / "checkpoint.pt").write_bytes(evil_pickle(marker))
    result = resume(capsys, run_b)
    assert result.code == 0, result.err
    assert not marker.exists()
    assert commit_steps(run_b) == BASE_STEPS + 1
    assert_same_prefix(run_b, base_run, BASE_STEPS + 1)


def _meta(**overrides) -> dict:
    meta = {"version": 1, "step": 1, "epoch": 1, "batches_done": 1, "param_groups": [],
            "optimizer_state_scalars": {}, "python_rng": [3, [1], None], "numpy_rng": ["MT19937", 0, 0, 0.0]}
    meta.update(overrides)
    return {"crucible_checkpoint": json.dumps(meta)}


def bad_metadata(marker: Path) -> dict[str, dict]:
    code = f"open({str(marker)!r}, 'w')"
    return {
        "not JSON": {"crucible_checkpoint": "{'step': 1, "},
        "no checkpoint key": {"something": "else"},
        "deeply nested JSON": {"crucible_checkpoint": "[" * 100_000 + "]" * 100_000},
        "JSON list": {"crucible_checkpoint": "[1, 2, 3]"},
        "code as the step": _meta(step=code),
        "code as the metadata": {"crucible_checkpoint": code},
        "negative step": _meta(step=-1),
        "boolean epoch": _meta(epoch=True),
        "unknown version": _meta(version=99),
        # well-formed metadata, but the tensors are not this run's model: torch's error is many lines long
        "state of another model": _meta(),
    }


BAD_CASES = list(bad_metadata(Path("m")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_checkpoint_with_malformed_metadata_gets_a_one_line_refusal(capsys, tmp_path, base_run, case):
    marker = tmp_path / "code_ran"
    run_dir = copy_run(base_run, tmp_path / "run", committed=4)
    save_file({"x": torch.zeros(2)}, str(run_dir / "checkpoint.safetensors"), metadata=bad_metadata(marker)[case])
    assert_one_line_error(resume(capsys, run_dir), "checkpoint")
    assert commit_steps(run_dir) == 4
    assert not marker.exists()


def test_checkpoint_of_another_shape_is_refused_naming_the_tensor(capsys, tmp_path, base_run):
    """A real checkpoint with one model tensor of the wrong shape: refused before the resume starts."""
    from safetensors import safe_open

    run_dir = copy_run(base_run, tmp_path / "run", committed=8)
    path = run_dir / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.embedding.weight"] = tensors["model.embedding.weight"][:-1].clone()
    save_file(tensors, str(path), metadata=metadata)
    result = resume(capsys, run_dir)
    assert_one_line_error(result, "checkpoint does not fit", "model.embedding.weight")
    assert commit_steps(run_dir) == 8


def test_a_refused_resume_releases_the_run(capsys, tmp_path, base_run):
    """After a refused checkpoint, the same process can try again: the run's lock is not kept."""
    run_dir = copy_run(base_run, tmp_path / "run", committed=4)
    bad = bad_metadata(tmp_path / "m")["not JSON"]
    save_file({"x": torch.zeros(2)}, str(run_dir / "checkpoint.safetensors"), metadata=bad)
    assert_one_line_error(resume(capsys, run_dir), "checkpoint")
    again = resume(capsys, run_dir)
    assert "another process" not in again.err, again.err
    assert_one_line_error(again, "checkpoint")
    with run_lock(run_dir):  # free again
        pass


# ----- 3. locks never follow links nor truncate foreign files -------------------------------------
def test_lock_that_is_a_symlink_is_refused_and_its_target_untouched(capsys, tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path / "run", committed=4)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n" * 10)
    (run_dir / ".lock").unlink()
    (run_dir / ".lock").symlink_to(victim)
    assert_one_line_error(resume(capsys, run_dir), "symlink")
    assert victim.read_text() == "precious data\n" * 10
    assert commit_steps(run_dir) == 4

    dangling = tmp_path / "not_there"  # a symlink to nowhere: nothing is created at its target
    (run_dir / ".lock").unlink()
    (run_dir / ".lock").symlink_to(dangling)
    assert_one_line_error(resume(capsys, run_dir), "symlink")
    assert not dangling.exists() and not dangling.is_symlink()


def test_lock_that_is_a_hard_link_or_a_foreign_file_is_refused_and_untouched(capsys, tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path / "run", committed=4)
    other = tmp_path / "other.txt"
    other.write_text("1234\n")  # small, like a lock file: only its second link gives it away
    (run_dir / ".lock").unlink()
    os.link(other, run_dir / ".lock")
    assert os.stat(run_dir / ".lock").st_nlink == 2
    assert_one_line_error(resume(capsys, run_dir), "lock")
    assert other.read_text() == "1234\n"

    (run_dir / ".lock").unlink()
    foreign = "not a lock file: somebody's notes, longer than 32 bytes\n"
    (run_dir / ".lock").write_text(foreign)
    assert_one_line_error(resume(capsys, run_dir), "lock")
    assert (run_dir / ".lock").read_text() == foreign
    assert commit_steps(run_dir) == 4


# ----- 4. fsync order: data, then directories, then the marker, then its directory ----------------
GENERIC_STEPS = 10


def generic_fields():
    return {"w": cr.Field((8, 3), torch.bfloat16),  # row_chunk 2: 4 inner chunks in each shard
            "x": cr.Field((5,), torch.float32, every=2),
            "n": cr.Field((), torch.int64)}


def generic_values(step: int, fields=None) -> dict:
    g = torch.Generator().manual_seed(step)
    values = {"w": torch.randn(8, 3, generator=g).to(torch.bfloat16), "x": torch.randn(5, generator=g),
              "n": torch.tensor(step + 1, dtype=torch.int64)}
    fields = fields or generic_fields()
    return {name: v for name, v in values.items() if fields[name].due(step)}


def record_generic(path: Path, steps: int, *, run_steps=None, durability="fsync", time_chunk=4, row_chunk=2):
    with cr.record(path, generic_fields(), steps=run_steps, layout=cr.Layout(time_chunk, row_chunk),
                   commit_interval=NEVER, durability=durability) as rec:
        for step in range(steps):
            rec.record(step, **generic_values(step))


def log_file_operations(monkeypatch) -> list[tuple[str, str]]:
    """(operation, absolute real path) for every fsync, replace, rename and link, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename, real_link = os.fsync, os.replace, os.rename, os.link

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def moved(real, name):
        def move(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            folder = kwargs.get("dst_dir_fd")  # (a name in a folder opened without following symlinks)
            dst = dst if folder is None else os.path.join(os.readlink(f"/proc/self/fd/{folder}"), dst)
            events.append((name, os.path.realpath(os.fspath(dst))))
            return result
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace, "replace"))
    monkeypatch.setattr(os, "rename", moved(real_rename, "rename"))
    monkeypatch.setattr(os, "link", moved(real_link, "link"))
    return events


def test_fsync_order_before_and_after_each_commit(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    events = log_file_operations(monkeypatch)
    record_generic(run_dir, GENERIC_STEPS)
    monkeypatch.undo()
    root = os.path.realpath(run_dir / STORE)
    marker = os.path.join(root, "commit.json")
    events = [(op, path) for op, path in events if path == root or path.startswith(root + os.sep)]
    commits = [i for i, (op, path) in enumerate(events) if op != "fsync" and path == marker]
    # creation, block fills at steps 3 (w, n), 6 (x), 7 (w, n), and close at 10
    assert len(commits) == 5, events
    assert commit_steps(run_dir) == GENERIC_STEPS

    start = 0
    for number, at in enumerate(commits):
        segment = events[start:at + 1]
        writes = [(i, path) for i, (op, path) in enumerate(segment) if op != "fsync"]
        temps = [path for op, path in segment if op == "fsync" and PARTIAL.search(path)]
        if number > 0:
            assert [p for _, p in writes if f"{os.sep}c{os.sep}" in p], f"commit {number} wrote no block"
        # each file: its temporary fsynced (one per file written, not one per inner chunk), renamed,
        # then its directory fsynced, all before the marker moves
        assert len(temps) == len(writes), (number, segment)
        for wrote, path in writes:
            assert ("fsync", os.path.dirname(path)) in segment[wrote + 1:] + events[at + 1:at + 2], (number, path)
        # then the marker is durable: its directory, the store root, before anything else is written
        assert events[at + 1] == ("fsync", root), (number, events[at:at + 3])
        start = at + 2
    assert events[start:] == []  # closed: nothing after the last commit


def test_durability_none_fsyncs_nothing(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    events = log_file_operations(monkeypatch)
    record_generic(run_dir, GENERIC_STEPS, durability="none")
    monkeypatch.undo()
    root = os.path.realpath(run_dir / STORE)
    ours = [(op, p) for op, p in events if p.startswith(root)]
    assert [p for op, p in ours if op == "fsync" and f"{os.sep}c{os.sep}" in p] == []  # no shard fsync
    assert [p for op, p in ours if op == "fsync"] == []
    # commits still move the marker atomically
    assert sum(1 for op, p in ours if op == "replace" and p == os.path.join(root, "commit.json")) == 5
    assert commit_steps(run_dir) == GENERIC_STEPS


# ----- 5. verify --repair of a damaged last block, then resume to a byte-identical run -------------
def test_verify_repair_then_resume_is_byte_identical(capsys, tmp_path, base_run):
    run_dir = copy_run(base_run, tmp_path / "run")
    before = export_bytes(capsys, run_dir, tmp_path / "exp_before")
    shards = sorted((run_dir / STORE / "W" / "c").glob("*/0/0"), key=lambda p: int(p.parent.parent.name))
    last = shards[-1]
    assert int(last.parent.parent.name) == 2  # rows 8-10 = steps 8-10
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))

    result = run_cli(capsys, "verify", run_dir)
    assert_one_line_error(result, "damaged", "--repair")
    corrupt = [line for line in result.out.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 1 and "W steps 8-10" in corrupt[0], result.out

    repaired = run_cli(capsys, "verify", "--repair", run_dir)
    assert repaired.code == 0, repaired.err
    assert "moved back from steps 0..10: steps 0..7 committed (7 of 10 training steps)" in repaired.out
    assert commit_steps(run_dir) == 8
    ok = run_cli(capsys, "verify", run_dir)
    assert ok.code == 0 and "OK: steps 0..7 committed" in ok.out, ok

    result = resume(capsys, run_dir)
    assert result.code == 0, result.err
    assert commit_steps(run_dir) == BASE_STEPS + 1
    assert run_cli(capsys, "verify", run_dir).code == 0
    assert export_bytes(capsys, run_dir, tmp_path / "exp_after") == before


# ----- 6. temporaries left by a kill: not counted, swept on resume --------------------------------
def test_partial_files_are_not_counted_and_are_swept_on_resume(capsys, tmp_path):
    run_dir = tmp_path / "run"
    record_generic(run_dir, 6)
    store = run_dir / STORE
    size_before = open_store(run_dir).bytes_on_disk()
    info_before = run_cli(capsys, "info", run_dir)
    assert info_before.code == 0, info_before.err
    planted = [store / "w" / "c" / "1" / partial_name("0", 1), store / partial_name("zarr", 2),
               store / partial_name("commit", 3), store / "n" / "c" / partial_name("1", 4)]
    for i, path in enumerate(planted):
        path.write_bytes(os.urandom(200_000 + i))
    assert open_store(run_dir).bytes_on_disk() == size_before
    info_after = run_cli(capsys, "info", run_dir)
    size_line = [line for line in info_before.out.splitlines() if line.startswith("Size:")]
    assert size_line and size_line == [line for line in info_after.out.splitlines() if line.startswith("Size:")]

    # not zarr's temporaries: kept; a symlink with a temporary's name: its target untouched
    keep = store / "notes.partial"
    keep.write_text("mine")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (store / "w" / partial_name("link", 5)).symlink_to(victim)
    with cr.record(run_dir, generic_fields(), resume=True, commit_interval=NEVER) as rec:
        assert rec.next_step == 6
        for step in range(6, 8):
            rec.record(step, **generic_values(step))
    assert not any(p.exists() for p in planted)
    assert keep.read_text() == "mine" and victim.read_bytes() == b"precious"
    assert cr.open(run_dir).committed_steps == 8


# ----- 7. readers never mistake absence for data --------------------------------------------------
def test_unwritten_rows_read_as_nan_in_plain_zarr(tmp_path):
    run_dir = tmp_path / "run"
    record_generic(run_dir, 6, run_steps=12)  # sized for 12 steps, 6 recorded: rows 6-7 filled, 8-11 absent
    w = zarr.open_array(str(run_dir / STORE / "w"), mode="r")
    x = zarr.open_array(str(run_dir / STORE / "x"), mode="r")
    assert w.shape == (12, 8, 3) and w.dtype == np.uint16
    stored = w[...]
    assert (stored[6:] == 0x7FC0).all()  # bf16 NaN, never 0.0
    expected = torch.stack([generic_values(s)["w"] for s in range(6)]).view(torch.uint16).numpy()
    assert np.array_equal(stored[:6], expected)
    assert x.shape == (6, 5) and np.isnan(x[3:]).all() and not np.isnan(x[:3]).any()  # x every 2: rows 0..2 written
    run = cr.open(run_dir)
    assert run.committed_steps == 6 and len(run["w"]) == 6 and len(run["x"]) == 3


def test_to_xarray_refuses_a_missing_committed_chunk(tmp_path, base_run):
    run_dir = tmp_path / "run"
    record_generic(run_dir, 8)
    (run_dir / STORE / "w" / "c" / "0" / "0" / "0").unlink()
    run = cr.open(run_dir)
    with pytest.raises(CrucibleError, match="missing"):
        run.to_xarray()
    with pytest.raises(CrucibleError, match="missing"):
        run["w"][1]

    crucible = copy_run(base_run, tmp_path / "crucible")
    (crucible / STORE / "W" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(CrucibleError, match="missing"):
        open_trajectory(crucible).to_xarray()


def test_resume_refuses_a_missing_chunk_in_the_partial_last_block(tmp_path):
    """Committed rows 4-5 sit in a block of 4 whose chunk is gone: resuming must not rewrite them as
    fill values (zeros for the int field) and commit them as if they were data."""
    run_dir = tmp_path / "run"
    record_generic(run_dir, 6)
    assert commit_steps(run_dir) == 6
    (run_dir / STORE / "n" / "c" / "1").unlink()
    (run_dir / STORE / "w" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises((CrucibleError, RecorderError), match="(?i)missing|damaged"):
        with cr.record(run_dir, generic_fields(), resume=True, commit_interval=NEVER) as rec:
            for step in range(rec.next_step, 8):
                rec.record(step, **generic_values(step))
    # refused before anything was written: the damage is left for `verify --repair`, never papered over
    # with fill values (zeros for the int field) committed as data
    assert not (run_dir / STORE / "n" / "c" / "1").exists()
    assert not (run_dir / STORE / "w" / "c" / "1" / "0" / "0").exists()
    assert commit_steps(run_dir) == 6


# ----- 8. a Crucible run with nothing committed ---------------------------------------------------
def test_crucible_run_with_nothing_committed_is_refused_by_info_and_export(capsys, monkeypatch, tmp_path, tiny_config):
    from crucible_record.codecs import Layout
    from crucible_record.crucible3 import run as crucible_run

    def killed_before_step_0(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crucible_run, "train", killed_before_step_0)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        crucible_run.start_run(tiny_config, run_dir, layout=Layout(time_chunk=4, row_chunk=1000), progress=False)
    monkeypatch.undo()
    assert commit_steps(run_dir) == 0

    assert_one_line_error(run_cli(capsys, "info", run_dir), "no committed step yet")
    assert_one_line_error(run_cli(capsys, "export", run_dir, "--out", tmp_path / "exp"), "no committed step yet")
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())

    generic = tmp_path / "generic"
    with cr.record(generic, generic_fields()):
        pass
    run = cr.open(generic)
    assert run.committed_steps == 0 and len(run["w"]) == 0
    info = run_cli(capsys, "info", generic)
    assert info.code == 0 and "Progress: no steps committed" in info.out, info


def test_every_replace_in_a_local_run_is_a_durable_replace(monkeypatch, tmp_path):
    """A block committed partial is rewritten whole at the next commit (and commit.json, and an array's
    zarr.json on resize): power loss between the rename and a later fsync could leave a torn file in
    place of committed rows. Every rename over a file of the run must move a temporary file that was
    fsynced before it, and the directory must be fsynced after it."""
    events: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def moved(real):
        def move(src, dst, *args, **kwargs):
            def where(name, folder):  # (a name in a folder opened without following symlinks)
                name = os.fspath(name)
                return os.path.realpath(name if folder is None else os.path.join(os.readlink(f"/proc/self/fd/{folder}"), name))
            src_path, dst_path = where(src, kwargs.get("src_dir_fd")), where(dst, kwargs.get("dst_dir_fd"))
            existed = os.path.isfile(dst_path)
            result = real(src, dst, *args, **kwargs)
            events.append(("move", dst_path, src_path, existed))
            return result
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    run_dir = tmp_path / "run"
    # one block of 8 steps, a commit at almost every step inside it: the partial block is rewritten whole
    with cr.record(run_dir, {"x": cr.Field((4, 3), torch.float32)}, layout=cr.Layout(time_chunk=8),
                   commit_interval=1e-6) as rec:
        for step in range(12):
            rec.record(step, x=torch.full((4, 3), float(step)))
            deadline = time.monotonic() + 5  # committed, then the next step (a commit at most steps)
            while Run(run_dir).committed_steps <= step and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)  # (the recorder notes its commit just after the marker moved)
    monkeypatch.undo()
    root = os.path.realpath(run_dir / STORE)
    overwrites = [(i, e) for i, e in enumerate(events) if e[0] == "move" and e[3] and e[1].startswith(root + os.sep)]
    replaced = {os.path.relpath(e[1], root) for _, e in overwrites}
    assert {"commit.json", "x/zarr.json", "x/c/0/0/0"} <= replaced, replaced
    assert sum(1 for _, e in overwrites if e[1].endswith("x/c/0/0/0")) >= 3  # the partial block, rewritten
    for i, (_, dst, src, _) in overwrites:
        assert ("fsync", src) in events[:i], f"{dst} was replaced by {src}, which was never fsynced"
        assert ("fsync", os.path.dirname(dst)) in events[i + 1:], f"{dst} replaced, its directory never fsynced after"
    assert commit_steps(run_dir) == 12
    assert torch.equal(cr.open(run_dir)["x"][:], torch.arange(12.0)[:, None, None].expand(12, 4, 3))
