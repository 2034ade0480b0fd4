"""writer_threads / --writer-threads: the same bytes with any number of threads, a sensible
default, and a clear refusal of anything that is not a positive integer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crucible_record as cr
from crucible_record import writer as recorder_module
from crucible_record.shardio import default_threads

from .clirun import assert_one_line_error, run_cli
from .test_recorder import wait_until
from .test_cli import tiny_flags

FIELDS = {"w": cr.Field((500, 32), torch.bfloat16), "loss": cr.Field((), torch.float32)}


def _record(path: Path, writer_threads) -> cr.Recorder:
    gen = torch.Generator().manual_seed(1)
    rec = cr.record(path, FIELDS, layout=cr.Layout(time_chunk=8, row_chunk=50), writer_threads=writer_threads)
    with rec:
        for step in range(19):  # two whole blocks and a partial one
            rec.record(step, w=torch.randn(500, 32, generator=gen).bfloat16(), loss=torch.tensor(float(step)))
    return rec


def _files(path: Path) -> dict[str, bytes]:
    root = path / "trajectory.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_any_number_of_threads_writes_the_same_bytes(tmp_path):
    one = _record(tmp_path / "one", 1)
    three = _record(tmp_path / "three", 3)
    assert (one.writer_threads, three.writer_threads) == (1, 3)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "three")
    assert len([k for k in a if "/c/" in k]) >= 3 * 2  # both fields, three blocks each
    assert a == b


def test_default_is_one_thread_for_cpu_tensors(tmp_path):
    rec = cr.record(tmp_path / "run", FIELDS)
    assert rec.writer_threads is None  # decided by the first step's device
    with rec:
        rec.record(0, w=torch.zeros(500, 32, dtype=torch.bfloat16), loss=torch.tensor(0.0))
        assert rec.writer_threads == 1


def test_default_on_a_gpu_leaves_one_core_per_training_process(monkeypatch):
    monkeypatch.setattr(recorder_module, "default_threads", lambda: 16)
    assert recorder_module.default_writer_threads(on_gpu=True) == 15
    assert recorder_module.default_writer_threads(on_gpu=True, processes=8) == 1
    assert recorder_module.default_writer_threads(on_gpu=True, processes=4) == 3
    assert recorder_module.default_writer_threads(on_gpu=False) == 1
    monkeypatch.setattr(recorder_module, "default_threads", lambda: 1)
    assert recorder_module.default_writer_threads(on_gpu=True) == 1
    assert default_threads() >= 1


def test_after_close_is_called_every_core_compresses_what_is_left(tmp_path, monkeypatch):
    """Training is over once close() is called: the blocks still to write get the machine's cores,
    not the one thread a CPU run's writer uses beside training; the bytes are the same."""
    monkeypatch.setattr(recorder_module, "default_threads", lambda: 4)
    threads_used = []
    real_write = recorder_module.BlockBuffer.write

    def write(self, threads=1):
        threads_used.append((self.key, threads))
        return real_write(self, threads)

    monkeypatch.setattr(recorder_module.BlockBuffer, "write", write)
    gen = torch.Generator().manual_seed(1)
    rec = cr.record(tmp_path / "run", FIELDS, layout=cr.Layout(time_chunk=8, row_chunk=50))
    steps = [dict(w=torch.randn(500, 32, generator=gen).bfloat16(), loss=torch.tensor(float(step))) for step in range(11)]
    for step in range(8):  # one whole block, written while "training" goes on
        rec.record(step, **steps[step])
    wait_until(lambda: rec.committed == 8, what="the first block to commit")
    for step in range(8, 11):  # a partial block: written at close
        rec.record(step, **steps[step])
    rec.close()
    assert sorted(threads_used) == [("loss", 1), ("loss", 4), ("w", 1), ("w", 4)]
    t = cr.open(tmp_path / "run")
    for step, tensors in enumerate(steps):
        assert torch.equal(t["w"][step], tensors["w"]) and torch.equal(t["loss"][step], tensors["loss"])


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
def test_bad_writer_threads_are_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(cr.CrucibleError, match=r"^writer_threads must be an integer >= 1 or None"):
        cr.record(tmp_path / "run", FIELDS, writer_threads=bad)
    assert not (tmp_path / "run").exists()


def test_cli_writer_threads(capsys, tmp_path, tiny_corpus):
    result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", tmp_path / "bad", "--writer-threads", "0")
    assert_one_line_error(result, "--writer-threads must be at least 1")
    assert not (tmp_path / "bad").exists()
    result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--steps", "5", "--out", tmp_path / "two",
                     "--writer-threads", "2")
    assert result.code == 0, result
    assert cr.open(tmp_path / "two").committed_steps == 6


def test_cpu_writer_runs_at_a_lower_priority(tmp_path):
    """On a CPU run the writer thread yields the cores to torch's threads (nice + CPU_WRITER_NICE)."""
    import os
    import sys
    import threading

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are a Linux feature")
    seen = []
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with cr.record(tmp_path / "run", FIELDS) as rec:
        rec.record(0, w=torch.zeros(500, 32, dtype=torch.bfloat16), loss=torch.tensor(0.0))
        rec.after_commit(0, lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's is untouched
    assert seen == [min(19, base + recorder_module.CPU_WRITER_NICE)]
