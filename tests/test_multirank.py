"""One run written by every rank of a torch.distributed job (gloo, 2 processes on the CPU).

Two jobs of two spawned processes each (a process start costs seconds; each job runs several
scenarios in turn, and writes what each rank saw to a JSON file per scenario and rank):

* job 1: a run with a vocab-sharded bf16 embedding, an unevenly split every-3 field (torch.chunk's
  split: 4 + 3 rows) and replicated fields, compared bit for bit with a one-process recording of
  the same full tensors; bad tilings and mismatched calls refused on every rank; then rank 1 kills
  itself (SIGKILL) mid-run and rank 0 closes with an error naming it.
* job 2: the killed run resumed on 2 ranks (bit-exact to the end), then a run whose rank 0 kills
  itself: rank 1 closes with an error instead of waiting forever.

Plus: resuming a 2-rank run in one process is refused; examples/ddp_crucible.py runs at a tiny size.
Every job is bounded in time (a hang fails the test, it never blocks CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import crucible_record as cr
from crucible_record.errors import CrucibleError, RecorderError
from crucible_record.verify import verify_run

ROOT = Path(__file__).resolve().parent.parent
STORE = "trajectory.zarr"
V, H = 12, 6  # the embedding: rows 0..5 on rank 0, 6..11 on rank 1
HEAD_ROWS = 7  # an every-3 int32 field split as torch.chunk does: rows 0..3 on rank 0, 4..6 on rank 1
STEPS = 11  # time_chunk 4: blocks of steps 0-3, 4-7 and 8-10 (partial)
KILL_STEPS, KILLED_AT, COMMITTED_AT_KILL = 16, 9, 8  # the victim dies before step 9 (no commit point
# after step 7 before it: head fills a block at step 9), so steps 0..7 are committed, exactly
LAYOUT = dict(time_chunk=4, row_chunk=4)  # a rank's 6 rows: inner chunks of 3 rows (a divisor of 6)
RANK_TIMEOUT = 2.0
JOB_TIMEOUT = 120.0  # seconds a job may take before it counts as hung (it normally takes ~15)


def fields():
    return {
        "wte": cr.Field((V, H), torch.bfloat16, dims=("token", "hidden")),
        "head": cr.Field((HEAD_ROWS, 2), torch.int32, every=3),
        "loss": cr.Field((), torch.float32),
        "small": cr.Field((3,), torch.float32),
    }


def full_step(step: int) -> dict[str, torch.Tensor]:
    """The full tensors of step `step` (a function of the step only: every rank computes them)."""
    gen = torch.Generator().manual_seed(500 + step)
    out = {"wte": torch.randn(V, H, generator=gen).to(torch.bfloat16),
           "loss": torch.randn((), generator=gen), "small": torch.randn(3, generator=gen)}
    if step % 3 == 0:
        out["head"] = torch.randint(-1000, 1000, (HEAD_ROWS, 2), generator=gen, dtype=torch.int32)
    return out


def rank_step(rank: int, step: int, world: int = 2) -> dict:
    """What rank `rank` hands over: its torch.chunk rows of the split fields, the others whole."""
    out = {}
    for name, tensor in full_step(step).items():
        if name in ("wte", "head"):
            size = -(-tensor.shape[0] // world)
            out[name] = cr.Shard(tensor[rank * size:(rank + 1) * size], offset=min(rank * size, tensor.shape[0]))
        else:
            out[name] = tensor
    return out


def expected(name: str, steps: int) -> np.ndarray:
    """Stored values (bf16 as uint16 bits) of `name` for steps 0..steps-1."""
    every = fields()[name].every
    values = torch.stack([full_step(s)[name] for s in range(0, steps, every)])
    return (values.view(torch.uint16) if values.dtype == torch.bfloat16 else values).numpy()


def record_one_process(path: Path, steps: int) -> None:
    with cr.record(path, fields(), layout=cr.Layout(**LAYOUT), commit_interval=1e6) as rec:
        for step in range(steps):
            rec.record(step, **full_step(step))


# ----- scenarios: run on both ranks of a job, in order ---------------------------------------------
def scenario_record(rank: int, tmp: Path) -> dict:
    """The run compared with the one-process recording; an after_commit on every rank."""
    flagged, ran = [], []
    with cr.record(tmp / "sharded", fields(), layout=cr.Layout(**LAYOUT), commit_interval=1e6,
                   rank_timeout=30) as rec:
        rec.after_commit(5, lambda: ran.append(rec.committed))
        for step in range(STEPS):
            if rec.record(step, **rank_step(rank, step)):
                flagged.append(step)
    return {"flagged": flagged, "committed": rec.committed, "after_commit": ran}


def bad_calls(rank: int) -> dict:
    """name -> what each rank hands over at step 0 (or the cr.record keyword arguments)."""
    good = rank_step(rank, 0)
    wte = full_step(0)["wte"]
    calls = {
        "gap": {**good, "wte": cr.Shard(wte[:5], 0) if rank == 0 else cr.Shard(wte[6:], 6)},
        "overlap": {**good, "wte": cr.Shard(wte[:7], 0) if rank == 0 else cr.Shard(wte[6:], 6)},
        "unequal": {**good, "wte": cr.Shard(wte[:4], 0) if rank == 0 else cr.Shard(wte[4:], 4)},
        "mixed": {**good, "wte": cr.Shard(wte[:6], 0) if rank == 0 else wte},
        "past_the_end": {**good, "wte": good["wte"] if rank == 0 else cr.Shard(wte[6:], 10)},
        "wrong_dtype_on_rank_1": {**good, "loss": full_step(0)["loss"].double() if rank == 1 else good["loss"]},
        "rank_local_loss": {**good, "loss": good["loss"] + rank},  # each rank's own loss, passed as replicated
    }
    return calls


def scenario_refusals(rank: int, tmp: Path) -> dict:
    """Every bad call raises the same error on every rank, in bounded time, and leaves no run."""
    out = {}
    for case, tensors in bad_calls(rank).items():
        began = time.monotonic()
        try:
            with cr.record(tmp / case, fields(), layout=cr.Layout(**LAYOUT)) as rec:
                rec.record(0, **tensors)
            out[case] = {"error": None}
        except CrucibleError as e:
            out[case] = {"error": str(e), "type": type(e).__name__, "seconds": time.monotonic() - began,
                         "run_created": (tmp / case / STORE).exists()}
    other = fields() if rank == 0 else {**fields(), "loss": cr.Field((), torch.float64)}
    try:
        cr.record(tmp / "other_fields", other)
        out["other_fields"] = {"error": None}
    except CrucibleError as e:
        out["other_fields"] = {"error": str(e)}
    try:
        cr.record(tmp / ("other_path" if rank == 0 else "other_path_1"), fields())
        out["other_path"] = {"error": None}
    except CrucibleError as e:
        out["other_path"] = {"error": str(e)}
    if rank == 0:  # one rank recording alone, the other not calling cr.record at all: no collective
        with cr.record(tmp / "alone", fields(), distributed=False, commit_interval=1e6) as rec:
            for step in range(3):
                rec.record(step, **full_step(step))
        # the same through cr.watch: distributed=False makes its loss one scalar, as for one process
        w = cr.watch(torch.nn.Linear(3, 2), params="weight", distributed=False)
        with cr.record(tmp / "alone_watch", w.fields, distributed=False) as rec:
            rec.record(0, **w.capture(0))
            rec.record(1, **w.capture(1, loss=torch.tensor(0.5)))
    try:  # a run recorded by one process (made by the test before the job) cannot be continued by 2 ranks
        cr.record(tmp / "one_process", fields(), resume=True)
        out["resume_one_process_run"] = {"error": None}
    except CrucibleError as e:
        out["resume_one_process_run"] = {"error": str(e)}
    return out


def wait_for_steps(path: Path, steps: int, what: str, timeout: float = 30) -> None:
    """Until the JSON progress record at `path` says `steps` steps (a marker or a rank's progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(path.read_text())["steps"] >= steps:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"{what} never reached {steps} steps")


def scenario_kill(rank: int, tmp: Path, victim: int, name: str) -> dict:
    """The victim SIGKILLs itself at step KILLED_AT once steps 0..7 are durable (rank 1: its own
    progress; rank 0: the marker); the survivor records every step, then closes."""
    run = tmp / name
    rec = cr.record(run, fields(), layout=cr.Layout(**LAYOUT), commit_interval=1e6, rank_timeout=RANK_TIMEOUT)
    for step in range(KILL_STEPS):
        if rank == victim and step == KILLED_AT:
            wait_for_steps(run / STORE / (".ranks/1.json" if victim == 1 else "commit.json"), COMMITTED_AT_KILL,
                      f"rank {victim}'s progress")
            os.kill(os.getpid(), signal.SIGKILL)
        rec.record(step, **rank_step(rank, step))
    began = time.monotonic()
    try:
        rec.close()
        return {"error": None}
    except RecorderError as e:
        return {"error": str(e), "close_seconds": time.monotonic() - began}


def scenario_resume(rank: int, tmp: Path, name: str) -> dict:
    with cr.record(tmp / name, fields(), resume=True, commit_interval=1e6, rank_timeout=30) as rec:
        first = rec.next_step
        for step in range(first, KILL_STEPS):
            rec.record(step, **rank_step(rank, step))
    return {"next_step": first, "committed": rec.committed}


def scenario_rank1_raises(rank: int, tmp: Path) -> dict:
    """Rank 1's loop raises at step 5 (leaving its with block): it reports the error instead of
    waiting, and rank 0, which records every step, fails at once instead of after rank_timeout."""
    began = time.monotonic()
    try:
        with cr.record(tmp / "raised", fields(), layout=cr.Layout(**LAYOUT), commit_interval=1e6,
                       rank_timeout=60) as rec:
            for step in range(12):
                if rank == 1 and step == 5:
                    raise ValueError("the loss is NaN")
                rec.record(step, **rank_step(rank, step))
    except (ValueError, RecorderError) as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - began}
    return {"error": None}


SCENARIOS = {"record": scenario_record, "refusals": scenario_refusals, "kill": scenario_kill,
             "resume": scenario_resume, "rank1_raises": scenario_rank1_raises}


def _worker(rank: int, world: int, port: int, scenarios: list, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    for label, name, kwargs in scenarios:
        try:
            result = {"result": SCENARIOS[name](rank, Path(tmp), **kwargs)}
        except BaseException as e:  # reported to the test, which fails with it
            result = {"raised": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (Path(tmp) / f"{label}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, args: tuple, timeout: float, world: int = 2) -> list[int]:
    """target(rank, *args) in `world` spawned processes; their exit codes. One still running after
    `timeout` seconds is killed and fails the test (a hang)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=target, args=(rank, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert not hung, f"rank(s) {hung} still running after {timeout} s: a hang"
    return [proc.exitcode for proc in procs]


def run_job(tmp: Path, scenarios: list, dies: int | None = None) -> dict:
    """Run `scenarios` [(label, scenario, kwargs)] on 2 spawned ranks; {label: [rank 0's, rank 1's]}.
    `dies`: the rank expected to end by SIGKILL."""
    codes = spawn_ranks(_worker, (2, free_port(), scenarios, str(tmp)), JOB_TIMEOUT)
    for rank, code in enumerate(codes):
        expected_code = -signal.SIGKILL if rank == dies else 0
        assert code == expected_code, f"rank {rank} exited with {code}"
    results = {}
    for label, _, _ in scenarios:
        per_rank = []
        for rank in range(2):
            path = tmp / f"{label}.rank{rank}.json"
            if not path.exists():
                per_rank.append(None)  # the rank died in this scenario
                continue
            doc = json.loads(path.read_text())
            assert "raised" not in doc, f"{label} on rank {rank}: {doc.get('traceback')}"
            per_rank.append(doc["result"])
        results[label] = per_rank
    return results


@pytest.fixture(scope="module")
def job1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job1")
    record_one_process(tmp / "one_process", STEPS)
    results = run_job(tmp, [("record", "record", {}), ("refusals", "refusals", {}),
                            ("kill1", "kill", {"victim": 1, "name": "killed1"})], dies=1)
    return tmp, results


@pytest.fixture(scope="module")
def job2(tmp_path_factory, job1):
    tmp = tmp_path_factory.mktemp("job2")
    shutil.copytree(job1[0] / "killed1", tmp / "resumed")
    results = run_job(tmp, [("resume", "resume", {"name": "resumed"}), ("rank1_raises", "rank1_raises", {}),
                            ("kill0", "kill", {"victim": 0, "name": "killed0"})], dies=0)
    return tmp, results


def decode_shard_file(array_dir: Path, key: str, shard_shape: list[int]) -> np.ndarray:
    """One shard file decoded on its own: its bytes as the only shard of an array of its shape."""
    from zarr.core.buffer import default_buffer_prototype

    meta = json.loads((array_dir / "zarr.json").read_text())
    meta["shape"] = shard_shape
    meta["attributes"] = {}
    buffer = default_buffer_prototype().buffer.from_bytes
    scratch = zarr.storage.MemoryStore({"zarr.json": buffer(json.dumps(meta).encode()),
                                        "c/" + "/".join("0" * len(shard_shape)): buffer((array_dir / key).read_bytes())})
    return np.asarray(zarr.open_array(scratch, mode="r", zarr_format=3)[...])


def assert_committed_prefix(run: Path, steps: int) -> None:
    """Every field holds exactly the deterministic data of steps 0..steps-1, nothing more."""
    t = cr.open(run)
    assert t.committed_steps == steps
    for name, spec in fields().items():
        assert len(t[name]) == spec.rows_at(steps), name
        assert t[name].numpy().tobytes() == expected(name, steps).tobytes(), f"{name} differs from the data"
    report = verify_run(run)
    assert report.ok, report.problems


# ----- job 1 -----------------------------------------------------------------------------------------
def test_two_ranks_record_the_same_run_as_one_process(job1):
    tmp, results = job1
    rank0, rank1 = results["record"]
    assert rank0["committed"] == rank1["committed"] == STEPS
    assert rank0["flagged"] == rank1["flagged"] == [3, 7, 9]  # blocks fill (wte: steps 3, 7; head: step 9)
    assert rank0["after_commit"] and rank1["after_commit"] and rank1["after_commit"][0] >= 6

    ours, one = cr.open(tmp / "sharded"), cr.open(tmp / "one_process")
    assert ours.committed_steps == one.committed_steps == STEPS
    for name in fields():
        a, b = ours[name], one[name]
        assert (a.shape, a.dtype, list(a.steps)) == (b.shape, b.dtype, list(b.steps)), name
        assert a.numpy().tobytes() == b.numpy().tobytes() == expected(name, STEPS).tobytes(), name
    assert torch.equal(ours["wte"][:].view(torch.int16), one["wte"][:].view(torch.int16))

    root = tmp / "sharded" / STORE
    group = json.loads((root / "zarr.json").read_text())["attributes"]
    assert group["world_size"] == 2 and "world_size" not in json.loads((tmp / "one_process" / STORE / "zarr.json")
                                                                       .read_text())["attributes"]
    meta = {name: json.loads((root / name / "zarr.json").read_text()) for name in fields()}
    assert meta["wte"]["attributes"]["crucible_record"]["partition"] == {
        "shard_rows": 6, "shards": [{"offset": 0, "rows": 6, "ranks": [0]}, {"offset": 6, "rows": 6, "ranks": [1]}]}
    assert meta["head"]["attributes"]["crucible_record"]["partition"]["shards"] == [
        {"offset": 0, "rows": 4, "ranks": [0]}, {"offset": 4, "rows": 3, "ranks": [1]}]
    assert "partition" not in meta["loss"]["attributes"]["crucible_record"]
    sharding = meta["wte"]["codecs"][0]["configuration"]
    assert meta["wte"]["chunk_grid"]["configuration"]["chunk_shape"] == [4, 6, H]  # one shard per rank and block
    assert sharding["chunk_shape"] == [4, 3, H]  # inner chunks: 3 rows, a divisor of 6 <= row_chunk 4
    assert meta["wte"]["dimension_names"] == ["step", "token", "hidden"]

    # every shard file is whole and self-contained: decoded alone it holds its rank's rows of its block
    keys = sorted(p.relative_to(root / "wte").as_posix() for p in (root / "wte" / "c").rglob("*") if p.is_file())
    assert keys == [f"c/{b}/{i}/0" for b in range(3) for i in range(2)]
    full = expected("wte", STEPS)
    for key in keys:
        block, shard = int(key.split("/")[1]), int(key.split("/")[2])
        decoded = decode_shard_file(root / "wte", key, [4, 6, H])
        rows = full[block * 4:(block + 1) * 4, shard * 6:(shard + 1) * 6]
        assert decoded[:len(rows)].tobytes() == rows.tobytes(), key
        assert (decoded[len(rows):] == 0x7FC0).all(), key  # after the last step: fill (bf16 NaN)
    head_keys = sorted(p.relative_to(root / "head").as_posix() for p in (root / "head" / "c").rglob("*") if p.is_file())
    assert head_keys == ["c/0/0/0", "c/0/1/0"]  # steps 0, 3, 6, 9: one block; rows 0..3 and 4..6
    head = expected("head", STEPS)
    assert decode_shard_file(root / "head", "c/0/1/0", [4, 4, 2])[:, :3].tobytes() == head[:, 4:].tobytes()
    progress = json.loads((root / ".ranks" / "1.json").read_text())
    assert progress["steps"] == STEPS and progress["closed"] and progress["rank"] == 1
    assert json.loads((root / ".ranks" / "0.json").read_text())["steps"] == STEPS  # rank 0's verdict


@pytest.mark.parametrize("case, message", [
    ("gap", r"field 'wte': no rank gives row 5 of its 12 \(a gap before rank 1 \(rows 6\.\.11\)\)"),
    ("overlap", r"field 'wte': rank 0 \(rows 0\.\.6\) and rank 1 \(rows 6\.\.11\) both give row 6; .*must not overlap"),
    ("unequal", r"field 'wte': the last Shard, rank 1 \(rows 4\.\.11\), is longer than the others \(4 rows\)"),
    ("mixed", r"field 'wte' is a Shard on rank\(s\) 0 and a plain tensor on rank\(s\) 1"),
    ("past_the_end", r"^rank 1: field 'wte': Shard rows 10\.\.15 lie past the field's 12 rows"),
    ("wrong_dtype_on_rank_1", r"^rank 1: field 'loss': dtype torch.float64 given, the field records torch.float32"),
    ("rank_local_loss", r"^field 'loss' is a plain tensor \(replicated: rank 0 writes it\) but rank\(s\) 1 gave other "
                        r"values than rank 0 at step 0: a rank-local value\?"),
])
def test_bad_tiling_is_refused_on_every_rank(job1, case, message):
    rank0, rank1 = job1[1]["refusals"]
    assert rank0[case]["error"] is not None, f"{case} was accepted"
    assert rank0[case]["error"] == rank1[case]["error"], "the ranks raised different errors"
    assert re.search(message, rank0[case]["error"]), rank0[case]["error"]
    assert rank0[case]["type"] == rank1[case]["type"] == "CrucibleError"
    assert not rank0[case]["run_created"]  # refused before anything was created
    assert max(rank0[case]["seconds"], rank1[case]["seconds"]) < 20


def test_mismatched_calls_are_refused_on_every_rank(job1):
    rank0, rank1 = job1[1]["refusals"]
    for case, message in [("other_fields", "cr.record was called on rank 1 with other fields than on rank 0"),
                          ("other_path", "cr.record was called on rank 1 with other path than on rank 0"),
                          ("resume_one_process_run", "was recorded by one process; it can only be continued by one "
                                                     "process, not by 2 ranks")]:
        assert rank0[case]["error"] == rank1[case]["error"], case
        assert message in rank0[case]["error"], rank0[case]["error"]


def test_distributed_false_records_from_one_rank_alone(job1):
    tmp, _ = job1
    assert not (tmp / "other_path" / STORE).exists() and not (tmp / "other_path_1").exists()  # refused: no run
    t = cr.open(tmp / "alone")
    assert t.committed_steps == 3 and "world_size" not in t.group.attrs
    for name in fields():
        assert t[name].numpy().tobytes() == expected(name, 3).tobytes(), name
    loss = cr.open(tmp / "alone_watch")["loss"]
    assert tuple(loss.shape) == (2,) and np.isnan(loss[0].item()) and loss[1].item() == 0.5


def test_sigkill_of_rank_1_leaves_a_committed_prefix_and_rank_0_names_it(job1):
    tmp, results = job1
    survivor, dead = results["kill1"]
    assert dead is None
    error = survivor["error"]
    assert error is not None, "rank 0 closed without noticing that rank 1 died"
    assert "rank 1 reached step 7 (its rows of steps 0..7 are durable)" in error, error
    assert "not the last step 15, within rank_timeout=2 s: steps 0..7 of the run are committed" in error, error
    assert survivor["close_seconds"] < RANK_TIMEOUT + 10
    assert_committed_prefix(tmp / "killed1", COMMITTED_AT_KILL)


def test_resume_of_a_two_rank_run_in_one_process_is_refused(job1, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(job1[0] / "killed1", run)
    with pytest.raises(CrucibleError, match=r"was recorded by 2 ranks \(torch.distributed world size 2\); it can "
                                            r"only be continued by 2 ranks .*, not by one process"):
        cr.record(run, fields(), resume=True)
    assert_committed_prefix(run, COMMITTED_AT_KILL)  # untouched


# ----- job 2 -----------------------------------------------------------------------------------------
def test_resume_on_two_ranks_continues_bit_exact(job2, tmp_path):
    tmp, results = job2
    assert [r["next_step"] for r in results["resume"]] == [COMMITTED_AT_KILL] * 2
    assert [r["committed"] for r in results["resume"]] == [KILL_STEPS] * 2
    assert_committed_prefix(tmp / "resumed", KILL_STEPS)
    record_one_process(tmp_path / "one_process", KILL_STEPS)
    one = cr.open(tmp_path / "one_process")
    for name in fields():
        assert cr.open(tmp / "resumed")[name].numpy().tobytes() == one[name].numpy().tobytes(), name


def test_a_rank_leaving_on_an_exception_stops_the_commit_at_once(job2):
    tmp, results = job2
    rank0, rank1 = results["rank1_raises"]
    assert rank1["error"] == "ValueError: the loss is NaN"  # its own exception, not a recorder error
    # rank 1's rows of steps 0..4 are durable; rank 0 commits up to there, or up to step 3 if it saw
    # the failure (at its commit of steps 0..3) before handing step 4 over
    committed = cr.open(tmp / "raised").committed_steps
    assert committed in (4, 5)
    assert f"rank 1 failed: ValueError: the loss is NaN; steps 0..{committed - 1} of the run are committed" \
        in rank0["error"], rank0
    assert rank0["seconds"] < 20  # not rank_timeout=60: rank 1 reported its failure
    assert_committed_prefix(tmp / "raised", committed)


def test_sigkill_of_rank_0_makes_rank_1_fail_instead_of_hanging(job2):
    tmp, results = job2
    dead, survivor = results["kill0"]
    assert dead is None
    error = survivor["error"]
    assert error is not None, "rank 1 closed as if the run were committed"
    assert "rank 0 did not close the run within 4 s (2 x rank_timeout) after rank 1 recorded its last step 15 " \
           "(is rank 0 dead?): steps 0..7 of the run are committed" in error, error
    assert survivor["close_seconds"] < 2 * RANK_TIMEOUT + 10
    assert_committed_prefix(tmp / "killed0", COMMITTED_AT_KILL)


# ----- the example -----------------------------------------------------------------------------------
def test_ddp_example(tmp_path):
    corpus = tmp_path / "corpus.txt"
    from crucible_record.crucible3.data import default_corpus_path

    corpus.write_text(default_corpus_path().read_text(encoding="utf-8")[:6000], encoding="utf-8")
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ddp_crucible.py"), "--small", "--steps", "6",
                           "--corpus", str(corpus), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "rank 0 recorded W rows 0..4999, rank 1 rows 5000..9999" in text, text
    assert "the recorded W of step 6 equals rank 0's model: True" in text, text
    assert "the recorded h_mean of step 6 equals the mean of the ranks' local means: True" in text, text
    t = cr.open(out)
    assert t.committed_steps == 7  # step 0 (the initial embedding) and 6 training steps
    assert tuple(t["W"].shape) == (7, 10000, 16) and t["W"].dtype == torch.bfloat16
    losses = t["loss"][:]
    assert torch.isnan(losses[0]) and torch.isfinite(losses[1:]).all()
    assert torch.isfinite(t["h_mean"][1:]).all() and tuple(t["h_mean"].shape) == (7, 16)
    assert not torch.equal(t["W"][6], t["W"][0])  # it trained
    root = out / STORE
    assert json.loads((root / "zarr.json").read_text())["attributes"]["world_size"] == 2
    assert (root / "W" / "c" / "0" / "1" / "0").is_file() and (root / "W" / "c" / "0" / "0" / "0").is_file()
    assert verify_run(out).ok
