"""`analyze --scheduler/--workers`: the pass over W as a dask graph on a real distributed cluster.

Tolerance: none. The tasks run the single-process per-block code on the same rows, and the client
adds the float64 path-length partials in the single-process order, so on one machine the WScan and
analysis.json are bit-identical to the single-process analysis (crucible3/distributed.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import shutil
import socket

import pytest
import torch
import distributed
from distributed import LocalCluster
from distributed.core import Status

from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3 import distributed as dist
from crucible_record.crucible3.analysis import analyze, scan_W
from crucible_record.crucible3.report import JSON_NAME, analyze_run
from crucible_record.errors import CrucibleError

SCAN_FIELDS = ("centroid_dead", "centroid_live", "changed_dead", "changed_live", "path_length", "net_displacement")


@pytest.fixture(scope="module")
def local():
    """The cluster of `--workers 2`: dask_client starts a LocalCluster of two worker processes (one
    thread each) and closes it on exit; the LocalCluster's arguments are recorded."""
    started = []

    def local_cluster(**kwargs):
        started.append((kwargs, LocalCluster(**kwargs)))
        return started[-1][1]

    patch = pytest.MonkeyPatch()
    patch.setattr(distributed, "LocalCluster", local_cluster)
    try:
        with dist.dask_client(workers=2) as client:
            patch.undo()
            yield client, started
    finally:
        patch.undo()
    assert [cluster.status for _, cluster in started] == [Status.closed]


@pytest.fixture(scope="module")
def client(local):
    return local[0]


@pytest.fixture(scope="module")
def traj(tiny_run):
    return open_trajectory(tiny_run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_task_per_stored_block(traj):
    shard = traj.W.array.shards[0]
    assert shard == 8  # the tiny run's Layout(time_chunk=8): W has 26 rows, 4 blocks
    assert dist.block_ranges(traj) == [(0, 8), (8, 16), (16, 24), (24, 26)]
    assert dist.block_ranges(traj, 10) == [(0, 10), (10, 20), (20, 26)]
    assert len(dist.build_tasks(traj)) == 4


def test_graph_holds_plain_values_only(traj):
    """No store object, zarr array, Trajectory or torch tensor travels: the location string, row
    ranges and the dead mask as a numpy array (one key shared by all tasks)."""
    tasks = dist.build_tasks(traj)
    graph = {}
    for task in tasks:
        graph.update(dict(task.__dask_graph__()))
    assert len(graph) == len(tasks) + 1  # the block tasks and the shared dead mask
    blob = pickle.dumps(graph)
    for name in (b"RunStore", b"LocalStore", b"zarr", b"Trajectory", b"LazyField", b"torch"):
        assert name not in blob, name
    assert str(traj.location).encode() in blob
    assert len(blob) < 4 * traj.W.shape[1] + 20_000  # the dead mask once, not once per task


@pytest.mark.parametrize("block", [None, 5])
def test_scan_bit_identical_to_single_process(traj, client, block):
    ours = dist.scan_W_dask(traj, client, block)
    single = scan_W(traj, block)
    for name in SCAN_FIELDS:
        a, b = getattr(ours, name), getattr(single, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert ours.centroid_dead.shape[0] == traj.steps + 1 and ours.changed_live.shape[0] == traj.steps
    assert (ours.path_length > 0).any()  # the run moved: the comparison is not of zeros


def test_analysis_json_identical_through_analyze_run(tiny_run, client, tmp_path):
    single, ours = tmp_path / "single", tmp_path / "dask"
    analyze_run(tiny_run, single, plots=False)
    text = analyze_run(tiny_run, ours, plots=False, scheduler=client.scheduler.address)
    assert "Wrote" in text and "Question" in text
    a, b = (single / JSON_NAME).read_text(), (ours / JSON_NAME).read_text()
    assert a == b  # byte for byte
    doc = json.loads(b)
    assert doc["committed_steps"] == 25 and len(doc["centroid_separation"]) == 26
    assert doc["summary"]["centroid_separation"]["path_straightness_live"]["median"] is not None


def test_analyze_with_given_scan_checks_its_length(traj, client):
    scan = dist.scan_W_dask(traj, client)
    result = analyze(traj, scan=scan)
    assert torch.equal(result["centroid_separation"], torch.norm(scan.centroid_dead - scan.centroid_live, dim=1))
    scan.centroid_dead = scan.centroid_dead[:-1]
    with pytest.raises(CrucibleError, match="covers 25 steps, the run 26"):
        analyze(traj, scan=scan)


def test_workers_option_starts_local_processes(local):
    client, started = local
    [(kwargs, cluster)] = started
    assert kwargs["n_workers"] == 2 and kwargs["processes"] and kwargs["threads_per_worker"] == 1
    assert len(client.scheduler_info()["workers"]) == 2
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()  # two processes, not this one


def test_analyze_run_passes_scheduler_and_workers(tiny_run, client, tmp_path, monkeypatch):
    """report.analyze_run(workers=N / scheduler=...) -> dask_client(scheduler, workers) -> scan_W_dask."""
    calls = []

    @contextlib.contextmanager
    def fake_client(scheduler, workers):
        calls.append((scheduler, workers))
        yield client

    monkeypatch.setattr(dist, "dask_client", fake_client)
    analyze_run(tiny_run, tmp_path / "single", plots=False)
    analyze_run(tiny_run, tmp_path / "local", plots=False, workers=3)
    assert calls == [(None, 3)]
    assert (tmp_path / "local" / JSON_NAME).read_text() == (tmp_path / "single" / JSON_NAME).read_text()


def test_task_error_reaches_the_client_as_crucible_error(tiny_run, tmp_path, client):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    shard = damaged / "trajectory.zarr" / "W" / "c" / "1" / "0" / "0"
    assert shard.is_file()
    shard.unlink()  # rows 8..15 of W
    traj = open_trajectory(damaged)
    # tasks 1 (rows 7-15: it reads the row before it) and 2 (rows 15-23) both need that shard
    with pytest.raises(CrucibleError, match=r"^W is damaged: the chunk holding rows 8-15 is missing"):
        dist.scan_W_dask(traj, client)


def test_workers_that_cannot_see_the_run(tiny_run, tmp_path, client):
    """A worker that cannot open the location (here: gone after the graph was built) fails its task;
    the client reports it as one line naming the rows."""
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)
    traj = open_trajectory(moved)
    traj.dead_mask  # read by the client when it builds the graph (before the run disappears here)
    shutil.rmtree(moved)
    with pytest.raises(CrucibleError) as info:
        dist.scan_W_dask(traj, client)
    message = str(info.value)
    assert "\n" not in message
    assert f"of {moved} on a Dask worker failed: FileNotFoundError" in message
    assert message.startswith("reading W rows ")


def test_bad_scheduler_is_one_line_error(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "out"
    with pytest.raises(CrucibleError) as info:
        analyze_run(tiny_run, out, plots=False, scheduler=address)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot connect to the Dask scheduler at {address}: ")
    assert not out.exists()
    with pytest.raises(CrucibleError, match=r"^cannot connect to the Dask scheduler at nonsense: .*port"):
        analyze_run(tiny_run, out, plots=False, scheduler="nonsense")
    environ = dict(os.environ)  # LocalCluster sets OMP_NUM_THREADS=1 and more here: put them back after
    try:
        with LocalCluster(n_workers=0, processes=True, dashboard_address=None,
                          scheduler_kwargs=dist.NO_DASHBOARD) as empty:  # a scheduler, no workers
            with pytest.raises(CrucibleError, match=r"^the Dask scheduler at tcp://\S+ has no workers"):
                analyze_run(tiny_run, out, plots=False, scheduler=empty.scheduler_address)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    with pytest.raises(CrucibleError, match="not both"):
        analyze_run(tiny_run, out, plots=False, scheduler=address, workers=2)
    with pytest.raises(CrucibleError, match="positive integer"):
        analyze_run(tiny_run, out, plots=False, workers=0)


def test_failed_connection_leaves_no_client_for_a_later_collection(monkeypatch):
    """A Client that failed to connect, collected later at a random moment, closes its IO loop from
    __del__ and can deadlock inside the next LocalCluster's start (CI hung there): dask_client
    collects it before raising, so none is left for the garbage collector to find later."""
    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)

    def clients() -> int:
        return sum(isinstance(o, distributed.Client) for o in gc.get_objects())

    gc.collect()  # earlier tests' unreachable clients would otherwise be counted here and collected below
    before = clients()
    for _ in range(3):
        with pytest.raises(CrucibleError, match="cannot connect"):
            with dist.dask_client(f"tcp://127.0.0.1:{free_port()}"):
                pass
        assert clients() == before


def test_cli_analyze_on_the_cluster(tiny_run, client, tmp_path, capsys):
    """`crucible-record analyze RUN --scheduler ADDRESS` writes the single-process analysis.json."""
    from .clirun import assert_one_line_error, run_cli

    result = run_cli(capsys, "analyze", tiny_run, "--out", tmp_path / "dask", "--scheduler", client.scheduler.address)
    assert result.code == 0, result.err
    single = analyze_run(tiny_run, tmp_path / "single", plots=False)
    assert single and (tmp_path / "dask" / "analysis.json").read_bytes() == (tmp_path / "single" / "analysis.json").read_bytes()
    assert_one_line_error(run_cli(capsys, "analyze", tiny_run, "--out", tmp_path / "x", "--workers", "0"), "workers")


def test_local_workers_leave_this_process_environment_alone(tiny_run, tmp_path):
    """LocalCluster sets OMP_NUM_THREADS=1 in its parent's environment for its workers; a later
    training subprocess would inherit it and compute other numbers. dask_client restores it."""
    before = dict(os.environ)
    with dist.dask_client(workers=1):
        pass
    assert dict(os.environ) == before
