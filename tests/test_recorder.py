"""The Recorder on its own: ordering, commits, partial blocks, writer errors, bounded memory."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import crucible_record as cr
from crucible_record.errors import RecorderError
from crucible_record.recorder import Recorder
from crucible_record.store import CODEC_PRESETS, Layout, committed_steps, create_store, open_store

V, H = 300, 8


def new_store(path, steps=20, codec="default", time_chunk=4, row_chunk=100):
    dead = np.zeros(V, dtype=bool)
    dead[::3] = True
    return create_store(path, steps=steps, vocab_size=V, hidden_dim=H, dead_mask=dead,
                        attributes={"config": {}, "provenance": {}}, layout=Layout(time_chunk, token_chunk, codec))


def fake_step(step):
    """A bf16-ish trajectory: small changes each step, like training."""
    g = torch.Generator().manual_seed(step)
    W = (torch.linspace(-1, 1, V * H).reshape(V, H) + 1e-3 * step * torch.randn(V, H, generator=g)).to(torch.bfloat16)
    return W, torch.randn(H, generator=g), torch.tensor(10.0 / (step + 1))


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


@pytest.mark.parametrize("codec", CODEC_PRESETS)
def test_every_codec_reads_back_bit_exact(tmp_path, codec):
    group = new_store(tmp_path, steps=11, codec=codec)
    written = []
    with Recorder(group) as rec:
        for step in range(12):
            W, h, loss = fake_step(step)
            written.append(W)
            rec.record(step, W=W, h_mean=h if step else None, loss=loss if step else None)
    t = cr.open(tmp_path)
    assert t.steps == 11
    assert torch.equal(t.W[:].view(torch.uint16), torch.stack(written).view(torch.uint16))
    assert torch.isnan(t.loss[0]) and t.loss[5].item() == pytest.approx(10 / 6)
    assert torch.equal(t.h_mean[3], fake_step(4)[1])


def test_commits_whole_blocks_while_running(tmp_path):
    group = new_store(tmp_path, steps=20, time_chunk=4)
    rec = Recorder(group)
    for step in range(7):  # W rows 0..6: one full block of 4 rows
        W, h, loss = fake_step(step)
        rec.record(step, W=W, h_mean=h if step else None, loss=loss)
    deadline = time.time() + 10
    while committed_steps(open_store(tmp_path)) < 3 and time.time() < deadline:
        time.sleep(0.01)
    t = cr.open(tmp_path)  # a reader while the run is in progress
    assert t.steps == 3 and len(t.W) == 4 and t.h_mean.shape == (3, H)
    assert torch.equal(t.W[-1], fake_step(3)[0])
    with pytest.raises(IndexError):
        t.W[4]
    rec.close()  # the partial block (rows 4..6) is committed at close
    assert cr.open(tmp_path).steps == 6


def test_all_zero_chunks_and_no_dead_tokens_are_stored(tmp_path):
    """Chunks equal to the fill value are written too, so 'missing' always means damage."""
    group = create_store(tmp_path, steps=3, vocab_size=V, hidden_dim=H, dead_mask=np.zeros(V, dtype=bool),
                         attributes={"config": {}}, layout=Layout(time_chunk=2, row_chunk=100))
    with Recorder(group) as rec:
        for step in range(4):
            rec.record(step, W=torch.zeros(V, H), h_mean=torch.zeros(H) if step else None, loss=0.0)
    t = cr.open(tmp_path)
    assert t.steps == 3 and not t.dead_mask.any() and len(t.dead_indices) == 0
    assert not t.W[:].float().any()
    from crucible_record.verify import verify_run

    assert verify_run(tmp_path).ok


def test_steps_out_of_order_are_refused(tmp_path):
    rec = Recorder(new_store(tmp_path))
    rec.record(0, W=fake_step(0)[0])
    with pytest.raises(RecorderError, match="expected step 1"):
        rec.record(2, W=fake_step(2)[0], h_mean=torch.zeros(H), loss=1.0)
    rec.close()


class FailingArray:
    """Wraps a zarr array; its writes fail (like a full disk) after `ok_writes` succeed."""

    def __init__(self, array, ok_writes, delay=0.0):
        self._array, self.ok_writes, self.delay = array, ok_writes, delay

    def __getattr__(self, name):
        return getattr(self._array, name)

    def __getitem__(self, key):
        return self._array[key]

    def with_config(self, config):
        self._array = self._array.with_config(config)
        return self

    def __setitem__(self, key, value):
        time.sleep(self.delay)
        if self.ok_writes <= 0:
            raise OSError(28, "No space left on device")
        self.ok_writes -= 1
        self._array[key] = value


class GroupWith:
    def __init__(self, group, **arrays):
        self._group, self._arrays = group, arrays

    def __getattr__(self, name):
        return getattr(self._group, name)

    def __getitem__(self, name):
        return self._arrays.get(name) or self._group[name]


def test_writer_error_reaches_the_trainer_without_hanging(tmp_path):
    group = new_store(tmp_path, steps=40, time_chunk=4)
    failing = GroupWith(group, W=FailingArray(group["W"], ok_writes=1))
    rec = Recorder(failing, slots=2)
    with time_limit(20), pytest.raises(RecorderError, match="No space left on device") as info:
        for step in range(41):
            W, h, loss = fake_step(step)
            rec.record(step, W=W, h_mean=h if step else None, loss=loss)
    assert isinstance(info.value.__cause__, OSError)
    with time_limit(20), pytest.raises(RecorderError, match="No space left"):
        rec.close()  # close raises it too, and returns
    t = cr.open(tmp_path)  # what was committed before the fault stays readable
    assert t.steps == 3
    assert torch.equal(t.W[:].view(torch.uint16), torch.stack([fake_step(s)[0] for s in range(4)]).view(torch.uint16))


def test_writer_error_at_close(tmp_path):
    group = new_store(tmp_path, steps=40, time_chunk=8)
    rec = Recorder(GroupWith(group, W=FailingArray(group["W"], ok_writes=0)))
    for step in range(3):  # fewer than one block: the failing write happens at close
        W, h, loss = fake_step(step)
        rec.record(step, W=W, h_mean=h if step else None, loss=loss)
    with time_limit(20), pytest.raises(RecorderError, match="No space left"):
        rec.close()
    assert committed_steps(group) == -1


def test_slow_writer_blocks_the_producer_instead_of_growing(tmp_path):
    """With a writer slower than training, memory stays at the slots: record() waits."""
    group = new_store(tmp_path, steps=12, time_chunk=1)
    rec = Recorder(GroupWith(group, W=FailingArray(group["W"], ok_writes=10**6, delay=0.05)), slots=2)
    waits = []
    for step in range(13):
        W, h, loss = fake_step(step)
        started = time.perf_counter()
        rec.record(step, W=W, h_mean=h if step else None, loss=loss)
        waits.append(time.perf_counter() - started)
        assert rec._work.qsize() <= 2  # never more queued steps than slots
    rec.close()
    assert sum(waits) > 0.2  # the producer did wait for the writer
    assert threading.active_count() >= 1 and cr.open(tmp_path).steps == 12


def test_checkpoint_runs_only_after_its_step_is_committed(tmp_path):
    group = new_store(tmp_path, steps=20, time_chunk=4)
    seen = []
    rec = Recorder(group)
    for step in range(6):
        W, h, loss = fake_step(step)
        rec.record(step, W=W, h_mean=h if step else None, loss=loss)
        if step == 5:
            rec.checkpoint(5, lambda: seen.append(committed_steps(group)))
    time.sleep(0.2)
    assert seen == []  # step 5 sits in a block that is not complete yet
    rec.close()
    assert seen == [5]
