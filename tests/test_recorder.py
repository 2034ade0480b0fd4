"""The generic Recorder on its own: commits, partial blocks, writer errors, bounded memory, after_commit.

Faults are injected at the seam that writes a block, ``crucible_record.writer.BlockBuffer.write``
(``failing_writes`` below): every row a field stores goes through it, on the writer thread.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import crucible_record as cr
from crucible_record.codecs import CODEC_PRESETS
from crucible_record.errors import RecorderError
from crucible_record.writer import STAGING_BYTES, BlockBuffer, staging_slots
from crucible_record.verify import verify_run

V, H = 300, 8
NEVER = 1e6  # commit_interval: commits only where a block fills, at a sized run's end and at close


def fields():
    return {
        "W": cr.Field((V, H), torch.bfloat16),
        "h": cr.Field((H,), torch.float32),
        "loss": cr.Field((), torch.float32),
    }


def new_run(path, steps=None, *, time_chunk=4, row_chunk=100, codec="default", commit_interval=NEVER, **kwargs):
    return cr.record(path, fields(), steps=steps, layout=cr.Layout(time_chunk, row_chunk, codec),
                     commit_interval=commit_interval, **kwargs)


def fake_step(step):
    """A bf16 trajectory: small changes each step, like training; a deterministic function of step."""
    g = torch.Generator().manual_seed(step)
    W = (torch.linspace(-1, 1, V * H).reshape(V, H) + 1e-3 * step * torch.randn(V, H, generator=g)).to(torch.bfloat16)
    return {"W": W, "h": torch.randn(H, generator=g), "loss": torch.tensor(10.0 / (step + 1))}


def stacked(name, steps):
    return torch.stack([fake_step(s)[name] for s in steps])


def bits(tensor):
    """Raw bytes of a tensor (bit-exact comparisons: NaN == NaN, -0.0 != 0.0)."""
    return tensor.contiguous().view(torch.uint8)


def assert_run_holds(path, steps):
    """The run commits exactly `steps` steps and every field holds fake_step's values, bit for bit."""
    t = cr.open(path)
    assert t.committed_steps == steps
    for name in fields():
        assert len(t[name]) == steps
        if steps:
            assert torch.equal(bits(t[name][:]), bits(stacked(name, range(steps)))), name
    return t


def commit_marker(path):
    return json.loads((path / "trajectory.zarr" / "commit.json").read_text())["steps"]


def wait_until(predicate, seconds=20.0, what="condition"):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def time_limit(seconds):
    """Fail instead of hanging: the writer must never leave the trainer blocked."""
    def fire(*_):
        raise TimeoutError(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def failing_writes(monkeypatch, name, ok_writes, delay=0.0, error=None):
    """Patch the block writer: writes of field `name` fail (a full disk) after `ok_writes` succeed;
    each takes `delay` seconds. Returns the counter of successful writes of that field."""
    real_write = BlockBuffer.write
    calls = {"ok": 0}

    def write(self, threads=1):
        if self.key == name:
            time.sleep(delay)
            if calls["ok"] >= ok_writes:
                raise error or OSError(28, "No space left on device")
            keys = real_write(self, threads)
            calls["ok"] += 1
            return keys
        return real_write(self, threads)

    monkeypatch.setattr(BlockBuffer, "write", write)
    return calls


@pytest.mark.parametrize("codec", CODEC_PRESETS)
def test_every_codec_reads_back_bit_exact(tmp_path, codec):
    """Several inner chunks per shard (row_chunk 128 of 300 rows), two full blocks and a partial one."""
    with new_run(tmp_path / "run", steps=11, codec=codec, row_chunk=128) as rec:
        for step in range(11):
            rec.record(step, **fake_step(step))
    t = assert_run_holds(tmp_path / "run", 11)
    assert t["W"].array.shards[0] == 4 and t["W"].array.chunks[1] == 128
    assert torch.isclose(t["loss"][5], torch.tensor(10 / 6))


def test_default_preset_shuffles_float32_and_zstds_the_rest(tmp_path):
    """float32/float64: blosc-lz4 with byte shuffle (zstd alone barely compresses their mantissas);
    bf16 bits, ints and float16: zstd-3. Every one of them reads back bit-exact."""
    fields = {"f32": cr.Field((6, 3), torch.float32), "f64": cr.Field((), torch.float64),
              "bf16": cr.Field((6, 3), torch.bfloat16), "i32": cr.Field((6,), torch.int32),
              "f16": cr.Field((6,), torch.float16)}

    def value(spec, step):
        counts = torch.arange(int(np.prod(spec.shape)), dtype=torch.float64).reshape(spec.shape) + step
        return (counts / 7 if spec.dtype.is_floating_point else counts).to(spec.dtype)

    steps = [{name: value(spec, step) for name, spec in fields.items()} for step in range(5)]
    with cr.record(tmp_path / "run", fields, steps=5, layout=cr.Layout(time_chunk=4)) as rec:
        for step, tensors in enumerate(steps):
            rec.record(step, **tensors)
    t = cr.open(tmp_path / "run")

    def compressor(name):
        codecs = json.loads((tmp_path / "run" / "trajectory.zarr" / name / "zarr.json").read_text())["codecs"]
        inner = codecs[0]["configuration"]["codecs"] if codecs[0]["name"] == "sharding_indexed" else codecs
        return [c for c in inner if c["name"] not in ("transpose", "bytes", "crc32c")]

    for name in ("f32", "f64"):
        (blosc,) = compressor(name)
        assert blosc["name"] == "blosc" and blosc["configuration"]["cname"] == "lz4"
        assert blosc["configuration"]["shuffle"] == "shuffle"
        assert blosc["configuration"]["typesize"] == fields[name].dtype.itemsize
    for name in ("bf16", "i32", "f16"):
        assert [c["name"] for c in compressor(name)] == ["zstd"]
    for name in fields:
        for step, tensors in enumerate(steps):
            assert torch.equal(t[name][step], tensors[name]), (name, step)


def test_commits_whole_blocks_while_running(tmp_path):
    path = tmp_path / "run"
    rec = new_run(path)
    points = [rec.record(step, **fake_step(step)) for step in range(7)]
    assert points == [False, False, False, True, False, False, False]  # block of 4 steps full at step 3
    wait_until(lambda: rec.committed == 4, what="the first block to commit")
    t = cr.open(path)  # a reader while the run is in progress sees the committed steps only
    assert t.committed_steps == 4 and len(t["W"]) == 4 and t["h"].shape == (4, H)
    assert torch.equal(bits(t["W"][-1]), bits(fake_step(3)["W"]))
    with pytest.raises(IndexError):
        t["W"][4]
    rec.close()  # the partial block (steps 4..6) is committed at close
    assert commit_marker(path) == 7
    assert_run_holds(path, 7)


def test_all_fill_chunks_are_stored(tmp_path):
    """Chunks equal to the fill value are written too, so an absent chunk always means damage."""
    path = tmp_path / "run"
    spec = {"z": cr.Field((V, H), torch.float32), "nan": cr.Field((H,), torch.float32),
            "off": cr.Field((3,), torch.bool)}
    with cr.record(path, spec, steps=3, layout=cr.Layout(time_chunk=2)) as rec:
        for step in range(3):
            rec.record(step, z=torch.zeros(V, H), nan=torch.full((H,), float("nan")), off=torch.zeros(3, dtype=torch.bool))
    root = path / "trajectory.zarr"
    for block in ("0", "1"):
        assert (root / "z" / "c" / block / "0" / "0").is_file()
        assert (root / "nan" / "c" / block / "0").is_file()
        assert (root / "off" / "c" / block / "0").is_file()
    t = cr.open(path)
    assert not t["z"][:].any() and torch.isnan(t["nan"][:]).all() and not t["off"][:].any()
    report = verify_run(path)
    assert report.ok and report.steps == 3 and report.blocks_read == 6


def test_steps_out_of_order_are_refused(tmp_path):
    with new_run(tmp_path / "run") as rec:
        rec.record(0, **fake_step(0))
        with pytest.raises(cr.CrucibleError, match="expected step 1, got 2"):
            rec.record(2, **fake_step(2))
        with pytest.raises(cr.CrucibleError, match="expected step 1, got 0"):
            rec.record(0, **fake_step(0))
        assert rec.next_step == 1
        rec.record(1, **fake_step(1))
    assert_run_holds(tmp_path / "run", 2)


def test_writer_error_reaches_the_trainer_without_hanging(tmp_path, monkeypatch):
    path = tmp_path / "run"
    failing_writes(monkeypatch, "W", ok_writes=1)  # block 0 (steps 0..3) is written, block 1 fails
    rec = new_run(path, steps=40, slots=2)
    attempted = []
    with time_limit(20), pytest.raises(RecorderError, match="No space left on device") as info:
        for step in range(40):
            attempted.append(step)
            rec.record(step, **fake_step(step))
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    assert str(path) in str(info.value)
    # the writer failed placing step 7; the trainer learns it once the slots (2) run out, not later
    assert 7 < attempted[-1] <= 7 + 2
    with time_limit(20), pytest.raises(RecorderError, match="No space left on device"):
        rec.close()  # close raises it too, and returns
    assert not rec._thread.is_alive()
    assert commit_marker(path) == 4
    assert_run_holds(path, 4)  # what was committed before the fault stays readable, every field
    monkeypatch.undo()
    with cr.record(path, fields(), resume=True) as again:  # close released the run's lock
        assert again.next_step == 4


def test_writer_error_at_close(tmp_path, monkeypatch):
    path = tmp_path / "run"
    failing_writes(monkeypatch, "W", ok_writes=0)
    rec = new_run(path, steps=40, time_chunk=8)
    for step in range(3):  # fewer than one block: the failing write happens at close
        assert rec.record(step, **fake_step(step)) is False
    with time_limit(20), pytest.raises(RecorderError, match="No space left on device") as info:
        rec.close()
    assert isinstance(info.value.__cause__, OSError)
    assert not rec._thread.is_alive()
    assert commit_marker(path) == 0
    assert_run_holds(path, 0)
    with pytest.raises(RecorderError):  # the run is closed and broken: no more steps
        rec.record(3, **fake_step(3))


def test_slow_writer_blocks_the_producer_instead_of_growing(tmp_path, monkeypatch):
    """With a writer slower than training, memory stays at the slots: record() waits."""
    slots, delay, steps = 2, 0.05, 12
    written = failing_writes(monkeypatch, "W", ok_writes=10**6, delay=delay)
    rec = new_run(tmp_path / "run", steps=steps, time_chunk=1, slots=slots, durability="none")
    waits = []
    for step in range(steps):
        started = time.perf_counter()
        rec.record(step, **fake_step(step))
        waits.append(time.perf_counter() - started)
        assert rec.backlog <= slots  # never more queued steps than slots
        assert step + 1 - written["ok"] <= slots  # staged but unwritten steps: at most the slots
    # the writer needs >= delay per step; a producer that never waited would finish in far less
    assert sum(waits) >= (steps - slots - 1) * delay
    # the recorder counts those waits itself (what benchmarks report as stalls)
    assert rec.stalls >= steps - slots - 1
    assert (steps - slots - 1) * delay * 0.9 <= rec.stall_seconds <= sum(waits)
    rec.close()
    assert not rec._thread.is_alive() and rec._thread not in threading.enumerate()
    assert written["ok"] == steps
    assert_run_holds(tmp_path / "run", steps)


def test_a_writer_that_keeps_up_never_stalls_training(tmp_path):
    """12 steps through 2 slots, each step handed over only once the writer took the previous one:
    the writer holds at most one slot when the next step comes, so nothing may wait."""
    rec = new_run(tmp_path / "run", steps=12, time_chunk=4, slots=2, durability="none")
    for step in range(12):
        rec.record(step, **fake_step(step))
        wait_until(lambda: rec.backlog == 0, what="the writer to take the step")
    rec.close()
    assert (rec.stalls, rec.stall_seconds, rec.backlog) == (0, 0.0, 0)
    assert_run_holds(tmp_path / "run", 12)


def test_a_writer_that_falls_behind_stalls_training_and_says_so(tmp_path, monkeypatch):
    """The counterpart: a writer slower than training (every block write 0.3 s) makes the 13th of
    12 steps' worth of staging wait, and the counters show it."""
    failing_writes(monkeypatch, "W", ok_writes=10**6, delay=0.3)
    rec = new_run(tmp_path / "run", steps=12, time_chunk=2, slots=2, durability="none")
    for step in range(12):
        rec.record(step, **fake_step(step))
    rec.close()
    assert rec.stalls >= 1 and rec.stall_seconds > 0
    assert_run_holds(tmp_path / "run", 12)


def test_an_exception_leaving_the_with_block_is_not_replaced_by_the_writers_error(tmp_path, monkeypatch):
    """The user's own exception goes on; the writer's failure (here a full disk at the first block)
    rides along as a note, never instead of it."""
    failing_writes(monkeypatch, "W", ok_writes=0)
    with pytest.raises(ValueError, match="the loss is NaN") as caught:
        with new_run(tmp_path / "run", time_chunk=2) as rec:
            rec.record(0, **fake_step(0))
            rec.record(1, **fake_step(1))  # fills W's block: its write fails on the writer thread
            raise ValueError("the loss is NaN")
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and "No space left on device" in notes[0] and "closing the recorder" in notes[0], notes


def test_a_failed_copy_gives_its_staging_slot_back(tmp_path, monkeypatch):
    """Staging that fails after a slot was taken (an out-of-memory index_select) returns the slot:
    with one slot, the step can be recorded again instead of waiting forever for a free slot."""
    spec = {"W": cr.Field((V, H), torch.bfloat16, rows=[5, 1, 7])}
    real = torch.Tensor.index_select
    failures = {"left": 1}

    def index_select(self, *args, **kwargs):
        if failures["left"] and threading.current_thread() is threading.main_thread():
            failures["left"] -= 1
            raise MemoryError("out of memory (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    rec = cr.record(tmp_path / "run", spec, steps=2, slots=1, commit_interval=NEVER, durability="none")
    W = fake_step(0)["W"]
    with pytest.raises(MemoryError):
        rec.record(0, W=W)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (rec.record(0, W=W), rec.record(1, W=W), done.set()), daemon=True)
    worker.start()
    worker.join(60)  # (a slot never given back: record() waits forever; the test fails, never hangs)
    assert done.is_set(), "record() waited for a staging slot that the failed copy never gave back"
    rec.close()
    assert torch.equal(bits(cr.open(tmp_path / "run")["W"][:]), bits(torch.stack([W[[5, 1, 7]]] * 2)))


@pytest.mark.parametrize("slots", [None, 3], ids=["default", "3 slots"])
def test_the_writers_pause_at_a_full_block_does_not_hold_training_up(tmp_path, monkeypatch, slots):
    """Encoding a whole block pauses the writer (here 0.25 s, 5 steps of training): the default
    staging holds one block's steps, so training runs on; 3 slots made it wait at every block."""
    written = failing_writes(monkeypatch, "W", ok_writes=10**6, delay=0.25)
    rec = new_run(tmp_path / "run", steps=24, time_chunk=8, slots=slots, durability="none")
    assert rec.slots == (9 if slots is None else 3)
    for step in range(24):
        rec.record(step, **fake_step(step))
        time.sleep(0.05)  # a training step
    rec.close()
    assert written["ok"] == 3
    if slots is None:
        assert rec.stalls == 0 and rec.stall_seconds == 0.0
    else:
        assert rec.stalls >= 2 and rec.stall_seconds > 0.1
    assert_run_holds(tmp_path / "run", 24)


def test_staging_is_one_block_of_steps_within_its_byte_budget():
    small = {"w": cr.Field((10,), torch.float32)}
    assert staging_slots(small, 64) == 65 and staging_slots(small, 1) == 3
    big = {"w": cr.Field((50257, 768), torch.float32)}  # 154 MB a step: one step fits the budget, 3 is the floor
    assert staging_slots(big, 2) == 3
    mid = {"w": cr.Field((1000, 1000), torch.float32)}  # 4 MB a step
    assert staging_slots(mid, 100) == STAGING_BYTES // 4_000_000 == 67  # the budget binds before the block


def test_after_commit_runs_only_once_its_step_is_committed(tmp_path):
    path = tmp_path / "run"
    seen = {}

    def observe(step):
        def fn():  # on the writer thread: what is durable and readable at this moment
            t = cr.open(path)
            seen[step] = (commit_marker(path), t.committed_steps, threading.current_thread().name,
                          torch.equal(bits(t["W"][step]), bits(fake_step(step)["W"])))
        return fn

    rec = new_run(path)  # blocks of 4 steps, no time-based commits
    for step in range(6):
        rec.record(step, **fake_step(step))
        if step in (2, 5):
            rec.after_commit(step, observe(step))
    wait_until(lambda: 2 in seen, what="after_commit(2) to run at the commit of steps 0..3")
    assert seen[2][:3] == (4, 4, "crucible-record-writer") and seen[2][3]
    rec.close()  # commits steps 4..5, then runs after_commit(5)
    assert seen[5][:3] == (6, 6, "crucible-record-writer") and seen[5][3]
    assert sorted(seen) == [2, 5]


def test_after_commit_error_is_raised_with_its_cause(tmp_path):
    rec = new_run(tmp_path / "run")
    rec.record(0, **fake_step(0))

    def broken():
        raise ValueError("checkpoint could not be saved")

    rec.after_commit(0, broken)
    with time_limit(20), pytest.raises(RecorderError, match="checkpoint could not be saved") as info:
        rec.close()
    assert isinstance(info.value.__cause__, ValueError)
    assert_run_holds(tmp_path / "run", 1)  # the step it waited for was committed first


def test_a_partial_block_after_a_full_one_is_padded_with_fill_not_old_rows(tmp_path):
    """The block buffer is reused without a refill; the rows after the last one of a sized run's
    partial block must still be written as the fill value, never as the previous block's rows."""
    import zarr

    from crucible_record.dtypes import fill_value

    path = tmp_path / "run"
    with new_run(path, steps=12) as rec:  # blocks of 4 steps
        for step in range(6):  # block 0 full, block 1 holds steps 4-5 when the run is closed
            rec.record(step, **fake_step(step))
    assert_run_holds(path, 6)
    raw = zarr.open_array(path / "trajectory.zarr", path="W", mode="r")[6:8]
    assert raw.shape == (2, V, H)
    assert (raw == np.asarray(fill_value(torch.bfloat16), dtype=raw.dtype)).all()
