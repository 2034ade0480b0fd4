"""A reader beside a live writer in another process sees only whole, committed, bit-exact data.

The writer rewrites the shard file of a partial block whole at every commit (a rename on disk);
a read that took the index of one version and the bytes of another would report damage that is
not there (a checksum mismatch) or return wrong values. For 20 s the test process opens the run
again and again and reads it every way the reader has (whole blocks, ranges, one token, one
index of a 3-D field, strided steps, a mask): no error, and every value equal to the function of
the step the writer recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

import crucible_record as cr

READ_SECONDS = float(os.environ.get("CRUCIBLE_LIVE_SECONDS", "20"))
W_SHAPE, V_SHAPE = (20, 6), (10, 3, 5)

# The writer: an open-ended run, small blocks (time_chunk 8) and short commit intervals, so the
# partial block's shard is replaced several times a second; values are a function of the step.
WRITER = textwrap.dedent(f"""
    import sys, time
    import torch
    import crucible_record as cr

    W_SHAPE, V_SHAPE = {W_SHAPE!r}, {V_SHAPE!r}
    fields = {{"w": cr.Field(W_SHAPE, torch.bfloat16), "v": cr.Field(V_SHAPE, torch.float32)}}
    w0 = torch.arange(120, dtype=torch.float32).reshape(W_SHAPE)
    v0 = torch.arange(150, dtype=torch.float32).reshape(V_SHAPE)
    deadline = time.monotonic() + float(sys.argv[2])
    with cr.record(sys.argv[1], fields, layout=cr.Layout(time_chunk=8, row_chunk=4),
                   commit_interval=0.2) as rec:
        step = 0
        while time.monotonic() < deadline:
            rec.record(step, w=(w0 + step * 0.25).bfloat16(), v=v0 * 0.5 - step)
            step += 1
            time.sleep(0.04)
""")


def expected(steps: int) -> dict[str, np.ndarray]:
    """What the writer records at steps 0..steps-1, as stored (bf16 as its uint16 bits)."""
    s = torch.arange(steps, dtype=torch.float32)
    w0 = torch.arange(120, dtype=torch.float32).reshape(W_SHAPE)
    v0 = torch.arange(150, dtype=torch.float32).reshape(V_SHAPE)
    w = (w0[None] + s[:, None, None] * 0.25).bfloat16().view(torch.uint16).numpy()
    v = (v0[None] * 0.5 - s[:, None, None, None]).numpy()
    return {"w": w, "v": v}


def test_live_reader_sees_no_damage_and_exact_values(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    log = open(tmp_path / "writer.log", "w")
    writer = subprocess.Popen([sys.executable, str(script), str(run), str(READ_SECONDS + 60)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        marker = Path(run) / "trajectory.zarr" / "commit.json"
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert writer.poll() is None, (tmp_path / "writer.log").read_text()
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.1)
        want = expected(20000)
        errors: list[str] = []
        opens = reads = 0
        rng = np.random.default_rng(0)
        end = time.monotonic() + READ_SECONDS
        while time.monotonic() < end:
            t = cr.open(run)
            opens += 1
            for name in ("w", "v"):
                field, ref = t[name], want[name]
                n = len(field)
                ref = ref[:n]
                tail = max(0, n - int(rng.integers(1, 17)))  # the partial block, rewritten at each commit
                a = int(rng.integers(0, max(1, n)))
                b = int(rng.integers(a, n + 1))
                tok = int(rng.integers(0, ref.shape[1]))
                mask = rng.random(ref.shape[1]) < 0.5
                keys = [(slice(tail, n), 2), slice(tail, n), (slice(tail, n), tok), slice(tail, n, 3),
                        (slice(tail, n), mask), (slice(tail, n), slice(1, 3)), (slice(a, b), tok)]
                if ref.ndim == 4:
                    keys += [(slice(tail, n), slice(None), 1), (slice(tail, n), tok, 2),
                             (slice(tail, n), 1, slice(None), 4)]
                if opens % 20 == 1:  # the whole field and every kind of read over all of it, now and then
                    keys += [slice(None), (slice(None), 2), slice(a, b), (slice(None), tok), slice(3, 9, 2),
                             slice(1, None, 3), (slice(None), mask)]
                for key in keys:
                    reads += 1
                    try:
                        got = field.numpy(key)
                    except cr.CrucibleError as e:
                        errors.append(f"{name}{key!r} with {n} rows: {e}")
                        continue
                    if not np.array_equal(got.view(np.uint8), np.ascontiguousarray(ref[key]).view(np.uint8)):
                        errors.append(f"{name}{key!r} with {n} rows: wrong values")
        assert writer.poll() is None, (tmp_path / "writer.log").read_text()
        print(f"live reader: {opens} opens, {reads} reads, {len(errors)} errors, {len(cr.open(run)['w'])} rows", errors[:3])
        assert opens > 10 and len(cr.open(run)["w"]) > 50, (opens, len(cr.open(run)["w"]))
        assert not errors, f"{len(errors)} of {reads} reads in {opens} opens failed; first: {errors[:5]}"
    finally:
        writer.terminate()
        writer.wait(30)
        log.close()


# ----- the same, made deterministic: a shard replaced between a read's requests --------------------
FIELDS = {"w": cr.Field((8, 3), torch.bfloat16)}  # row_chunk 2: 4 inner chunks of 2 rows per shard


def _values(step: int, version: int) -> torch.Tensor:
    return (torch.arange(24, dtype=torch.float32).reshape(8, 3) * (version + 1) + step).bfloat16()


def _record_version(path, version: int, steps: int = 11):
    with cr.record(path, FIELDS, layout=cr.Layout(time_chunk=4, row_chunk=2), commit_interval=1e6) as rec:
        for step in range(steps):
            rec.record(step, w=_values(step, version))


def _bits(step_rows, version: int) -> np.ndarray:
    return torch.stack([_values(s, version) for s in step_rows]).view(torch.uint16).numpy()


def test_local_read_keeps_the_version_it_opened(tmp_path, monkeypatch):
    """The shard of block 1 is replaced (renamed over) after a read took its index: the read
    finishes on the version it opened (one descriptor), no error, its values exact."""
    from crucible_record import blockread

    _record_version(tmp_path / "a", 0)
    _record_version(tmp_path / "b", 1)
    target = tmp_path / "a" / "trajectory.zarr" / "w" / "c" / "1" / "0" / "0"
    newer = tmp_path / "newer"
    newer.write_bytes((tmp_path / "b" / "trajectory.zarr" / "w" / "c" / "1" / "0" / "0").read_bytes())
    assert newer.read_bytes() != target.read_bytes()
    real, calls = blockread._pread, []

    def pread_then_replace(fd, n, offset):
        data = real(fd, n, offset)
        calls.append(n)
        if len(calls) == 1:  # after the index of block 1: the writer replaces the file
            os.replace(newer, target)
        return data

    w = cr.open(tmp_path / "a")["w"]
    monkeypatch.setattr(blockread, "_pread", pread_then_replace)
    got = w.numpy((slice(4, 8), 5))
    assert len(calls) == 2  # the index, then the one inner chunk holding row 5
    assert np.array_equal(got, _bits(range(4, 8), 0)[:, 5])
    assert np.array_equal(w.numpy((slice(4, 8), 5)), _bits(range(4, 8), 1)[:, 5])  # the new version, whole


def test_object_store_read_retries_on_a_replaced_object(tmp_path, monkeypatch):
    """On an object store the chunk's GET is pinned to the index's ETag (If-Match): an object
    replaced in between is read again from its index, never mixed."""
    import obstore

    from crucible_record.storage import open_store

    url = "memory://live/run"
    _record_version(url, 0)
    _record_version(tmp_path / "b", 1)
    newer = (tmp_path / "b" / "trajectory.zarr" / "w" / "c" / "1" / "0" / "0").read_bytes()
    objects = open_store(url).store.store
    real, calls = obstore.get_async, []

    async def get_then_replace(store, key, *, options=None):
        calls.append((key, dict(options or {})))
        result = await real(store, key, options=options)
        if len(calls) == 1:  # after the index of block 1: the writer replaces the object
            await obstore.put_async(objects, "w/c/1/0/0", newer)
        return result

    w = cr.open(url)["w"]
    monkeypatch.setattr(obstore, "get_async", get_then_replace)
    got = w.numpy((slice(4, 8), 5))
    assert np.array_equal(got, _bits(range(4, 8), 1)[:, 5])  # the new version, read again from its index
    assert [("suffix" in str(o.get("range")), "if_match" in o) for _, o in calls] == \
        [(True, False), (False, True), (True, False), (False, True)]


def test_one_token_reads_the_index_and_one_inner_chunk_per_block(tmp_path, monkeypatch):
    from crucible_record import blockread
    from crucible_record.shardio import shard_layout

    _record_version(tmp_path / "a", 0)
    w = cr.open(tmp_path / "a")["w"]
    layout = shard_layout(w.array)
    real, sizes = blockread._pread, []
    monkeypatch.setattr(blockread, "_pread", lambda fd, n, offset: sizes.append(n) or real(fd, n, offset))
    assert np.array_equal(w.numpy((slice(None), 3)), _bits(range(11), 0)[:, 3])
    assert len(sizes) == 6 and sizes[::2] == [layout.index_nbytes] * 3  # 3 blocks: index, one chunk each
    assert all(n < layout.index_nbytes + 200 for n in sizes[1::2])
