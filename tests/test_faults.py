"""Writer faults: a clear error within a few steps, never a hang, committed data intact and readable."""

from __future__ import annotations

import shutil

import pytest
import torch

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.errors import RecorderError
from crucible_record.crucible3.config import RunConfig
from crucible_record.crucible3.engine import fields as crucible_fields
from crucible_record.writer import Recorder, staging_slots

from .clirun import assert_one_line_error, run_cli
from .conftest import TINY
from .test_cli import tiny_flags
from .test_recorder import (assert_run_holds, bits, commit_marker, failing_writes, fake_step, fields, new_run,
                            time_limit, wait_until)


def test_disk_full_during_train(capsys, tmp_path, tiny_corpus, monkeypatch):
    """A real `crucible-record train`: W's third block write fails like a full disk."""
    failing_writes(monkeypatch, "W", ok_writes=2)
    recorded = []
    real_record = Recorder.record

    def counting_record(self, step, **tensors):
        recorded.append(step)
        return real_record(self, step, **tensors)

    monkeypatch.setattr(Recorder, "record", counting_record)
    run = tmp_path / "run"
    with time_limit(120):
        result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", run, "--time-chunk", "4",
                         "--commit-interval", "1000")
    assert_one_line_error(result, f"writing {run} failed", "No space left on device")
    t = open_trajectory(run)
    assert t.committed_steps == 8 and t.steps == 7  # two blocks of 4 steps made it before the disk filled
    for name in ("W", "h_mean", "loss", "epoch"):
        assert len(t[name]) == 8, name
    assert not torch.isnan(t.W[:].float()).any() and torch.isnan(t.loss[0]) and not torch.isnan(t.loss[1:]).any()
    # the writer failed placing step 11 (the third block); the trainer stops there (after_commit of
    # that commit point raises) or at the latest once the staging slots run out, never at the end of the run
    assert 11 <= max(recorded) <= 11 + staging_slots(crucible_fields(RunConfig.from_dict(TINY)), 4)


@pytest.mark.parametrize("steps", [None, 40], ids=["open-ended", "sized"])
def test_store_deleted_during_run(tmp_path, steps):
    path = tmp_path / "run"
    rec = new_run(path, steps=steps)
    for step in range(6):
        rec.record(step, **fake_step(step))
    wait_until(lambda: rec.committed == 4, what="the first block to commit")
    shutil.rmtree(path / "trajectory.zarr")
    with time_limit(20), pytest.raises(RecorderError, match="disappeared") as info:
        for step in range(6, 40):
            rec.record(step, **fake_step(step))
        rec.close()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with time_limit(20), pytest.raises(RecorderError, match="disappeared"):
        rec.close()
    assert not (path / "trajectory.zarr").exists()  # nothing half-recreated
    with pytest.raises(cr.CrucibleError, match="not a crucible-record run"):
        cr.open(path)


def test_chunk_file_cannot_be_written(tmp_path):
    path = tmp_path / "run"
    rec = new_run(path, steps=40)
    blocker = path / "trajectory.zarr" / "W" / "c" / "1" / "0" / "0"
    blocker.mkdir(parents=True)  # a directory where the second block's shard must go
    with time_limit(20), pytest.raises(RecorderError) as info:
        for step in range(40):
            rec.record(step, **fake_step(step))
        rec.close()
    assert "IsADirectoryError" in str(info.value) and isinstance(info.value.__cause__, OSError)
    with pytest.raises(RecorderError):
        rec.close()
    assert commit_marker(path) == 4
    t = assert_run_holds(path, 4)  # every field at the common committed step, values intact
    assert torch.equal(bits(t["W"][3]), bits(fake_step(3)["W"]))


def test_corrupted_chunk_is_reported(capsys, tmp_path):
    path = tmp_path / "run"
    spec = {"W": cr.Field((20, 4), torch.bfloat16), "g": cr.Field((3,), torch.float32, every=2),
            "loss": cr.Field((), torch.float32)}

    def data(step):
        values = {"W": torch.full((20, 4), step / 7, dtype=torch.bfloat16) + torch.arange(4).to(torch.bfloat16),
                  "loss": torch.tensor(float(step))}
        if step % 2 == 0:
            values["g"] = torch.arange(3, dtype=torch.float32) * step
        return values

    with cr.record(path, spec, layout=cr.Layout(time_chunk=4)) as rec:
        for step in range(16):
            rec.record(step, **data(step))
    ok = run_cli(capsys, "verify", path)
    assert ok.code == 0 and "OK: steps 0..15 committed" in ok.out

    root = path / "trajectory.zarr"
    for shard in (root / "W" / "c" / "1" / "0" / "0", root / "g" / "c" / "1" / "0"):
        data_bytes = bytearray(shard.read_bytes())
        data_bytes[len(data_bytes) // 3] ^= 0x40
        shard.write_bytes(bytes(data_bytes))
    result = run_cli(capsys, "verify", path)
    assert_one_line_error(result, "2 damaged chunk(s); steps 0..15 committed")
    corrupt = [line for line in result.out.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 2
    assert corrupt[0].startswith("CORRUPT W steps 4-7:") and "checksum" in corrupt[0].lower()
    assert corrupt[1].startswith("CORRUPT g steps 8-14:") and "checksum" in corrupt[1].lower()  # rows 4-7 of every=2
    t = cr.open(path)
    with pytest.raises(cr.CrucibleError, match="(?i)checksum"):
        t["W"][:]
    with pytest.raises(cr.CrucibleError, match="(?i)checksum"):
        t["g"][5]
    assert torch.equal(bits(t["W"][0:4]), bits(torch.stack([data(s)["W"] for s in range(4)])))  # undamaged blocks
    assert torch.equal(t["W"][8:16].float(), torch.stack([data(s)["W"] for s in range(8, 16)]).float())

    (root / "loss" / "c" / "2").unlink()  # a chunk file lost altogether
    result = run_cli(capsys, "verify", path)
    assert "CORRUPT loss steps 8-11: chunk file missing" in result.out
    with pytest.raises(cr.CrucibleError, match="missing"):
        cr.open(path)["loss"][:]
    assert torch.equal(cr.open(path)["loss"][:8], torch.arange(8, dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_do_not_synchronize(tmp_path, tiny_config):
    """On CUDA the training thread never waits for the device to record a step."""
    from crucible_record.crucible3 import engine

    config = tiny_config.replace(device="cuda", steps=12)
    inputs = engine.load_inputs(config)
    rec = cr.record(tmp_path / "run", engine.fields(config), steps=config.steps + 1, layout=cr.Layout(time_chunk=4))
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.train(config, inputs, rec, progress=True)
    except RuntimeError as e:
        if "synchroniz" in str(e):
            pytest.fail(f"a step synchronised with the device: {e}")
        raise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.close()
    t = cr.open(tmp_path / "run")
    assert t.committed_steps == config.steps + 1
    loss = t["loss"][:]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    assert torch.isfinite(t["W"][:].float()).all() and not torch.equal(t["W"][0], t["W"][-1])


KILLED_MID_WRITE = r"""
import sys, time, uuid
from pathlib import Path
from crucible_record.storage import DurableFiles
from tests.test_recorder import fake_step, new_run

run, flag = Path(sys.argv[1]), Path(sys.argv[2])
real_replace = DurableFiles.replace

def torn_replace(self, path, data, *, exclusive=False):
    # W's third block (steps 8-11): half its shard reaches the temporary file, then the process is killed
    if "W/c/2/" in Path(path).as_posix():
        self.make_dirs(path.parent)
        view = memoryview(data).cast("B")
        with open(path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial"), "wb") as f:
            f.write(view[: len(view) // 2])
            f.flush()
        flag.touch()
        time.sleep(120)
    return real_replace(self, path, data, exclusive=exclusive)

DurableFiles.replace = torn_replace
rec = new_run(run, time_chunk=4)
for step in range(12):
    rec.record(step, **fake_step(step))
rec.close()
"""


def test_kill_during_a_block_write_keeps_the_committed_steps(tmp_path):
    """SIGKILL while the shard of a block is half written (shardio's bytes, the store's temporary file):
    the two committed blocks read back intact, verify finds nothing wrong, and resume rewrites the
    block."""
    import os
    import signal
    import subprocess
    import sys

    from crucible_record.verify import verify_run

    from .test_recorder import stacked

    run, flag = tmp_path / "run", tmp_path / "writing"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(run), str(flag)], cwd=root)
    try:
        wait_until(lambda: flag.exists() or child.poll() is not None, seconds=60, what="the torn write")
        assert child.poll() is None, "the child ended before its block write"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert commit_marker(run) == 8
    assert not (run / "trajectory.zarr" / "W" / "c" / "2" / "0" / "0").exists()  # only a temporary file
    assert_run_holds(run, 8)
    assert verify_run(run).ok
    with cr.record(run, fields(), resume=True) as rec:
        assert rec.next_step == 8
        for step in range(8, 12):
            rec.record(step, **fake_step(step))
    assert_run_holds(run, 12)
    assert verify_run(run).ok
    assert not [p for p in (run / "trajectory.zarr").rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    assert torch.equal(bits(cr.open(run)["W"][8:12]), bits(stacked("W", range(8, 12))))
