"""Runs on object storage, against a real S3 server (moto's): nothing is mocked below the protocol."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import boto3
import numpy as np
import pytest
import torch

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.errors import CrucibleError, RecorderError
from crucible_record.storage import open_store
from crucible_record.verify import verify_run

from .s3server import s3_server

FIELDS = {
    "w": cr.Field((60, 8), torch.bfloat16),
    "g": cr.Field((60,), torch.float16, every=3),
    "some": cr.Field((60, 8), torch.float32, rows=[1, 5, 59]),
    "loss": cr.Field((), torch.float32),
}


def step_tensors(step: int) -> dict:
    """What a deterministic loop records at `step`."""
    gen = torch.Generator().manual_seed(step)
    w = torch.randn(60, 8, generator=gen)
    out = {"w": w.bfloat16(), "some": w, "loss": torch.tensor(1.0 / (step + 1))}
    if step % 3 == 0:
        out["g"] = w.norm(dim=1).half()
    return out


@pytest.fixture(scope="module")
def s3():
    mp = pytest.MonkeyPatch()
    with s3_server(mp.setenv) as (bucket, endpoint, env):
        yield bucket, endpoint, env
    mp.undo()


def client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing-secret")


def record_steps(url, n, **kwargs):
    with cr.record(url, FIELDS, layout=cr.Layout(time_chunk=4, row_chunk=16), **kwargs) as rec:
        for step in range(n):
            rec.record(step, **step_tensors(step))


def test_record_and_read_back_on_s3(s3, tmp_path):
    bucket, endpoint, _ = s3
    url = f"s3://{bucket}/runs/a"
    record_steps(url, 11)
    record_steps(tmp_path / "local", 11)
    t, local = cr.open(url), cr.open(tmp_path / "local")
    assert t.committed_steps == 11 and list(t["g"].steps) == [0, 3, 6, 9]
    for name in FIELDS:
        assert torch.equal(t[name][:].view(torch.uint8), local[name][:].view(torch.uint8)), name
    assert t["w"][4:9, 3].shape == (5, 8)
    keys = [o["Key"] for o in client(endpoint).list_objects_v2(Bucket=bucket, Prefix="runs/a/")["Contents"]]
    assert "runs/a/trajectory.zarr/commit.json" in keys and "runs/a/trajectory.zarr/w/c/2/0/0" in keys
    assert not any(k.endswith(".partial") for k in keys)
    assert verify_run(url).ok and t.bytes_on_disk() > 0
    ds = t.to_xarray()  # lazy, each task reopens the run from its URL
    assert np.array_equal(ds["loss"].values, local["loss"][:].numpy())


def test_shards_are_written_in_one_put_each(s3, monkeypatch):
    """Whole shards in one PUT, never read back first (no read-modify-write over the network)."""
    import zarr.storage

    bucket, _, _ = s3
    calls = []
    conditional = type(open_store(f"s3://{bucket}/runs/puts").store)  # zarr's ObjectStore, PUTs conditional
    real_get, real_set = zarr.storage.ObjectStore.get, conditional.set

    async def get(self, key, *args, **kwargs):
        calls.append(("get", key))
        return await real_get(self, key, *args, **kwargs)

    async def set_(self, key, value):
        calls.append(("set", key))
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.ObjectStore, "get", get)
    monkeypatch.setattr(conditional, "set", set_)
    record_steps(f"s3://{bucket}/runs/puts", 8, commit_interval=1e9)
    shard_sets = [k for op, k in calls if op == "set" and k.startswith("w/c/")]
    assert sorted(shard_sets) == ["w/c/0/0/0", "w/c/1/0/0"]  # two blocks of 4 steps, one PUT each
    assert not [k for op, k in calls if op == "get" and k.split("/")[0] in FIELDS and "/c/" in k]


def test_second_writer_is_refused(s3):
    bucket, _, _ = s3
    url = f"s3://{bucket}/runs/two"
    first = cr.record(url, FIELDS, layout=cr.Layout(time_chunk=4))
    with pytest.raises(CrucibleError, match="already holds a run"):
        cr.record(url, FIELDS)  # a second creator: the conditional create fails
    for step in range(5):
        first.record(step, **step_tensors(step))
    deadline = time.monotonic() + 120  # wait for the first block's commit by the run's own marker, not a clock
    while cr.open(url).committed_steps < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cr.record(url, FIELDS, resume=True)  # takes the run over: the first is fenced off
    with pytest.raises(RecorderError, match="another writer"):
        for step in range(5, 40):
            first.record(step, **step_tensors(step))
        first.close()
    assert second.next_step >= 4
    for step in range(second.next_step, second.next_step + 3):
        second.record(step, **step_tensors(step))
    second.close()
    t = cr.open(url)
    assert t.committed_steps == second.next_step
    assert torch.equal(t["w"][:], torch.stack([step_tensors(s)["w"] for s in range(t.committed_steps)]))


def test_corrupted_object_is_detected(s3):
    bucket, endpoint, _ = s3
    url = f"s3://{bucket}/runs/bad"
    record_steps(url, 9)
    key = "runs/bad/trajectory.zarr/w/c/1/0/0"
    s3c = client(endpoint)
    data = bytearray(s3c.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x10
    s3c.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    report = verify_run(url)
    assert not report.ok and any("w steps 4-7" in p for p in report.problems)
    with pytest.raises(CrucibleError, match="checksum"):
        cr.open(url)["w"][:]
    s3c.delete_object(Bucket=bucket, Key="runs/bad/trajectory.zarr/loss/c/0")
    with pytest.raises(CrucibleError, match="missing"):
        cr.open(url)["loss"][:]


def test_kill_leaves_a_readable_committed_prefix(s3, tmp_path):
    bucket, _, env = s3
    url = f"s3://{bucket}/runs/killed"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})
        import crucible_record as cr
        from tests.test_s3 import FIELDS, step_tensors
        with cr.record({url!r}, FIELDS, layout=cr.Layout(time_chunk=4), commit_interval=0.05) as rec:
            for step in range(10_000):
                rec.record(step, **step_tensors(step))
                time.sleep(0.01)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            try:
                if cr.open(url).committed_steps >= 12:
                    break
            except CrucibleError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the writer committed nothing in 60 s")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    t = cr.open(url)
    n = t.committed_steps
    assert n >= 12
    for name, spec in FIELDS.items():
        assert len(t[name]) == spec.rows_at(n), name
    assert torch.equal(t["w"][:], torch.stack([step_tensors(s)["w"] for s in range(n)]))
    assert torch.equal(t["g"][:], torch.stack([step_tensors(s)["g"] for s in range(0, n, 3)]))
    assert verify_run(url).ok
    rec = cr.record(url, FIELDS, resume=True)  # and it continues where it was
    assert rec.next_step == n
    rec.record(n, **step_tensors(n))
    rec.close()
    assert cr.open(url).committed_steps == n + 1


def test_urls_that_cannot_work_are_refused(tmp_path):
    for url, fragment in [("ftp://host/run", "unsupported URL scheme"), ("s3://", "needs a bucket"),
                          ("gs://bucket/run", "unsupported URL scheme")]:
        with pytest.raises(CrucibleError, match=fragment):
            cr.record(url, FIELDS)
    record_steps(f"file://{tmp_path}/viafile", 3)  # file:// is a local path
    assert cr.open(tmp_path / "viafile").committed_steps == 3
    record_steps("memory://tests/run", 3)
    assert cr.open("memory://tests/run").committed_steps == 3


def test_cli_end_to_end_on_s3_is_byte_identical_to_local(s3, tmp_path, capsys, tiny_corpus, tiny_run):
    """train -> info -> verify -> export on s3:// gives the same file as the local run of the same config."""
    from .clirun import run_cli
    from .test_cli import tiny_flags

    bucket, _, _ = s3
    url = f"s3://{bucket}/runs/crucible"
    result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", url, "--time-chunk", "8")
    assert result.code == 0, result.err
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:")  # no local folder named after the URL
    assert run_cli(capsys, "info", url).code == 0
    assert run_cli(capsys, "verify", url).code == 0
    assert run_cli(capsys, "export", url, "--out", tmp_path / "from-s3").code == 0
    assert run_cli(capsys, "export", tiny_run, "--out", tmp_path / "from-disk").code == 0
    name = "crucible_3_trajectory.safetensors"
    assert (tmp_path / "from-s3" / name).read_bytes() == (tmp_path / "from-disk" / name).read_bytes()
    # a stopped run on S3 resumes from its checkpoint, also on S3
    assert open_trajectory(url).steps == 25
    resumed = run_cli(capsys, "train", "--resume", url)
    assert resumed.code != 0 and "already complete" in resumed.err


def test_cli_killed_on_s3_resumes_byte_identical(s3, tmp_path, capsys, tiny_corpus, tiny_run):
    from .clirun import run_cli
    from .test_cli import tiny_flags

    bucket, _, env = s3
    url = f"s3://{bucket}/runs/crucible-killed"
    cmd = [sys.executable, "-m", "crucible_record", "train", *tiny_flags(tiny_corpus), "--out", url, "--time-chunk", "4"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while True:
            try:
                if open_trajectory(url).steps >= 9:
                    break
            except CrucibleError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert 9 <= open_trajectory(url).steps < 25
    resumed = run_cli(capsys, "train", "--resume", url)
    assert resumed.code == 0, resumed.err
    assert run_cli(capsys, "export", url, "--out", tmp_path / "a").code == 0
    assert run_cli(capsys, "export", tiny_run, "--out", tmp_path / "b").code == 0
    name = "crucible_3_trajectory.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_xarray_open_zarr_on_s3(s3):
    """The documented way to open a run on S3 with plain xarray, dask chunks = whole shards."""
    import obstore.store
    import xarray as xr
    import zarr.storage

    bucket, _, _ = s3
    url = f"s3://{bucket}/runs/xr"
    record_steps(url, 9)
    store = zarr.storage.ObjectStore(obstore.store.from_url(url + "/trajectory.zarr"), read_only=True)
    ds = xr.open_zarr(store, consolidated=False, chunks={"step": 4})
    assert ds["w"].dims == ("step", "w_0", "w_1") and ds["w"].data.chunksize[0] == 4
    assert np.array_equal(ds["w"].values, cr.open(url)["w"].numpy())
    assert np.array_equal(ds["loss"].values, cr.open(url)["loss"][:].numpy())


def test_every_put_of_a_run_is_conditional(s3, monkeypatch):
    """No PUT without If-Match / If-None-Match: a writer fenced off between two requests can never
    overwrite what a newer writer committed (blocks, zarr.json on resize, the marker, checkpoints)."""
    from moto.s3.responses import S3Response

    bucket, _, _ = s3
    puts = []
    real_put = S3Response._key_response_put

    def put(self, query, key_name):
        puts.append((key_name, self.headers.get("If-Match"), self.headers.get("If-None-Match"), sorted(query)))
        return real_put(self, query, key_name)

    monkeypatch.setattr(S3Response, "_key_response_put", put)
    url = f"s3://{bucket}/runs/conditional"
    with cr.record(url, FIELDS, layout=cr.Layout(time_chunk=4, row_chunk=16), commit_interval=1e-6) as rec:
        for step in range(20):
            rec.record(step, **step_tensors(step))
        rec.store.put_file("checkpoint.bin", b"one")
        rec.store.put_file("checkpoint.bin", b"two")
    with cr.record(url, FIELDS, resume=True, commit_interval=1e-6) as rec:  # a second writer: ETags from a LIST
        for step in range(20, 40):
            rec.record(step, **step_tensors(step))
        rec.store.put_file("checkpoint.bin", b"three")
    monkeypatch.undo()
    ours = [p for p in puts if p[0].startswith("runs/conditional/")]
    assert len(ours) > 40
    assert [p for p in ours if not p[1] and p[2] != "*"] == []
    assert sum(1 for p in ours if p[1] and "/w/c/" in p[0]) >= 5  # partial blocks rewritten If-Match
    t = cr.open(url)
    assert t.committed_steps == 40 and t.store.get_file("checkpoint.bin") == b"three"
    assert torch.equal(t["w"][:], torch.stack([step_tensors(s)["w"] for s in range(40)]))


def test_a_fenced_writer_never_overwrites_the_new_writers_commits(s3):
    """Writer A passes its writer check; before its PUT, writer B takes the run over and commits a
    block; A's PUT of that block must be refused (not overwrite it), and A stops with a clear error."""
    bucket, _, _ = s3
    url = f"s3://{bucket}/runs/fenced"
    a = cr.record(url, FIELDS, layout=cr.Layout(time_chunk=4), commit_interval=1e9)
    for step in range(6):  # block 0 (steps 0-3) committed; steps 4, 5 staged
        a.record(step, **step_tensors(step))
    time.sleep(0.2)
    assert cr.open(url).committed_steps == 4

    def other(step):  # what B records: not what A has for the same steps
        tensors = step_tensors(step)
        return {**tensors, "w": tensors["w"] + 1}

    real_check = a.store.check_writer
    taken = []

    def check_then_taken_over():
        real_check()
        if not taken:  # B takes over right after A's check, before A's PUT of block 1
            taken.append(True)
            with cr.record(url, FIELDS, resume=True, commit_interval=1e9) as b:
                for step in range(b.next_step, 8):
                    b.record(step, **other(step))

    a.store.check_writer = check_then_taken_over
    with pytest.raises(RecorderError) as raised:
        a.close()  # commits steps 4, 5: its PUT of block 1 comes after B committed block 1
    assert taken
    t = cr.open(url)
    assert t.committed_steps == 8
    expected = [step_tensors(s)["w"] for s in range(4)] + [other(s)["w"] for s in range(4, 8)]
    assert torch.equal(t["w"][:], torch.stack(expected))  # B's commit, intact
    assert verify_run(url).ok
    assert "another writer took over" in str(raised.value) and "nothing of the other's was overwritten" in str(raised.value)


def test_an_orphan_claim_without_a_run_is_created_anew_not_resumed(s3):
    """commit.json claimed, no zarr.json: no run was ever created. Resuming says so; creating takes the
    orphan claim over (conditionally: of two creators racing, one wins)."""
    bucket, _, _ = s3
    url = f"s3://{bucket}/runs/orphan"
    stopped = open_store(url, read_only=False)
    stopped.prepare_new()
    stopped.claim_new()  # ... and then creation failed
    with pytest.raises(CrucibleError, match="no run was ever created.*create it anew"):
        cr.record(url, FIELDS, resume=True)
    first, second = open_store(url, read_only=False), open_store(url, read_only=False)
    first.prepare_new()
    second.prepare_new()
    first.claim_new()
    with pytest.raises(CrucibleError, match="already holds a run"):
        second.claim_new()
    record_steps(url, 6)  # and a creator later takes the (again orphan) claim over
    t = cr.open(url)
    assert t.committed_steps == 6
    assert torch.equal(t["w"][:], torch.stack([step_tensors(s)["w"] for s in range(6)]))
    with pytest.raises(CrucibleError, match="already holds a run"):
        record_steps(url, 1)  # a real run is never taken over by a creator


def test_the_new_writer_rewrites_what_a_fenced_writer_left_and_the_fenced_one_stops(s3):
    """A writer fenced off may still PUT an object the new writer has not rewritten since its LIST
    (its ETag is still the one it knows); the new writer, holding the marker, then rewrites it; the
    fenced one stops at its next PUT."""
    bucket, _, _ = s3
    url = f"s3://{bucket}/runs/stale"
    a = open_store(url, read_only=False)
    a.prepare_new()
    a.claim_new()
    a.set("k", b"a1")
    b = open_store(url, read_only=False)
    b.claim_existing()  # the marker is b's; one LIST: k's ETag
    a.set("k", b"a2")  # a does not know yet: its ETag of k is still current
    b.set("k", b"b1")  # refused, then rewritten on the ETag read after checking the marker
    with pytest.raises(CrucibleError, match="another writer took over"):
        a.set("k", b"a3")
    with pytest.raises(CrucibleError, match="another writer took over"):
        a.write_marker({"steps": 1})
    b.set("k", b"b2")
    b.write_marker({"steps": 0})
    assert open_store(url).get("k") == b"b2"
