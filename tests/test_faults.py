"""Writer faults during a real training run: a clear error within a step, committed data intact."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

import crucible_record as cr
from crucible_record.errors import RecorderError
from crucible_record.recorder import Recorder, _Block

from .clirun import assert_one_line_error, run_cli
from .test_cli import tiny_flags
from .test_recorder import fake_step, new_store, time_limit


def test_disk_full_during_train(capsys, tmp_path, tiny_corpus, monkeypatch):
    real_flush, calls = _Block.flush, {"n": 0}
    recorded = []

    def flaky_flush(self):
        if self.array.basename == "W":
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(28, "No space left on device")
        real_flush(self)

    real_record = Recorder.record

    def counting_record(self, step, *args, **kwargs):
        recorded.append(step)
        return real_record(self, step, *args, **kwargs)

    monkeypatch.setattr(_Block, "flush", flaky_flush)
    monkeypatch.setattr(Recorder, "record", counting_record)
    run = tmp_path / "run"
    with time_limit(120):
        result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", run, "--time-chunk", "4")
    assert_one_line_error(result, "writing the trajectory failed", "No space left on device")
    t = cr.open(run)
    assert t.steps == 7  # two blocks of 4 W rows made it before the disk filled
    # the fault is found at the next record() after the writer hit it: the trainer ran on for
    # at most the steps that were already queued (slots), not to the end
    assert max(recorded) < 7 + 4 + 4 + 2


def test_store_deleted_during_run(tmp_path):
    group = new_store(tmp_path, steps=40, time_chunk=4)
    rec = Recorder(group)
    with time_limit(20), pytest.raises(RecorderError, match="disappeared"):
        for step in range(41):
            if step == 6:
                time.sleep(0.2)
                shutil.rmtree(tmp_path / "trajectory.zarr")
            W, h, loss = fake_step(step)
            rec.record(step, W=W, h_mean=h if step else None, loss=loss)
            time.sleep(0.01)
        rec.close()
    assert not (tmp_path / "trajectory.zarr").exists()  # nothing half-recreated


def test_chunk_file_cannot_be_written(tmp_path):
    group = new_store(tmp_path, steps=40, time_chunk=4)
    blocker = tmp_path / "trajectory.zarr" / "W" / "c" / "1" / "0" / "0"
    blocker.mkdir(parents=True)  # a directory where the second shard must go
    rec = Recorder(group)
    with time_limit(20), pytest.raises(RecorderError) as info:
        for step in range(41):
            W, h, loss = fake_step(step)
            rec.record(step, W=W, h_mean=h if step else None, loss=loss)
        rec.close()
    assert "IsADirectoryError" in str(info.value) or "Directory" in str(info.value)
    assert cr.open(tmp_path).steps == 3
    assert torch.equal(cr.open(tmp_path).W[3], fake_step(3)[0])


def test_corrupted_chunk_is_reported(capsys, tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert run_cli(capsys, "verify", run).code == 0
    shard = run / "trajectory.zarr" / "W" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = run_cli(capsys, "verify", run)
    assert_one_line_error(result, "1 damaged chunk")
    assert "CORRUPT W steps 8-15" in result.out and "checksum" in result.out
    t = cr.open(run)
    with pytest.raises(cr.CrucibleError, match="checksum"):
        t.W[:]
    assert t.W[0:8].shape[0] == 8  # undamaged blocks still read

    (run / "trajectory.zarr" / "loss" / "c" / "2").unlink()  # a chunk file lost altogether
    result = run_cli(capsys, "verify", run)
    assert "CORRUPT loss steps 16-23: chunk file missing" in result.out
    with pytest.raises(cr.CrucibleError, match="missing"):
        cr.open(run).loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_do_not_synchronize(tmp_path, tiny_config):
    """On CUDA the training thread never waits for the device to record a step."""
    from crucible_record.crucible3.engine import load_inputs, train
    from crucible_record.store import Layout, create_store

    config = tiny_config.replace(device="cuda", steps=12)
    inputs = load_inputs(config)
    group = create_store(tmp_path, steps=config.steps, vocab_size=config.vocab_size, hidden_dim=config.hidden_dim,
                         dead_mask=inputs.masks.dead_mask.numpy(), attributes={"config": config.to_dict()},
                         layout=Layout(time_chunk=4))
    rec = Recorder(group, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        train(config, inputs, rec, progress=True, replay_until=-1)
    except RuntimeError as e:
        if "synchroniz" in str(e):
            pytest.fail(f"a step synchronised with the device: {e}")
        raise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.close()
    assert cr.open(tmp_path).steps == 12
