"""A model sharded by FSDP2 (torch.distributed.fsdp.fully_shard), recorded on 2 gloo CPU ranks through
cr.watch: each rank writes its own rows of the DTensors, nothing is gathered.

Two jobs of two spawned processes (each runs its scenarios in turn and writes what each rank saw to
a JSON file per scenario and rank):

* job 1: an unevenly split embedding (1001 rows: 501 + 500) and a bias, data that differs per rank,
  recorded every step through cr.watch and compared bit for bit with full_tensor() copies the loop
  takes; the collectives and DTensor gathers inside capture/rec.record counted (none after step 0);
  a Replicate() DTensor and a DTensor with fewer rows than ranks; a Shard(1) DTensor, a 2-D mesh and
  rows= on a sharded field refused in one line on every rank; then the run killed (both ranks
  SIGKILL themselves) after steps 0..7 are committed.
* job 2: the killed run resumed on 2 ranks (the loop replays its own state) equals the uninterrupted
  one; Lightning's ModelParallelStrategy (FSDP2) with the Lightning callback, bit-exact likewise.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import crucible_record as cr
from crucible_record.verify import verify_run

from .test_multirank import free_port, spawn_ranks, wait_for_steps

ROWS, H = 1001, 16  # the embedding: rows 0..500 on rank 0, 501..1000 on rank 1
STEPS = 10  # steps 0..9; time_chunk 4: commit points after steps 3 and 7
KILLED_AT, COMMITTED_AT_KILL = 9, 8
LAYOUT = dict(time_chunk=4, row_chunk=256)
WATCHED = dict(params=("0.weight", "1.bias"), grads="0.weight", optim_state=("exp_avg", "exp_avg_sq"))
JOB_TIMEOUT = 180.0  # seconds a job may take before it counts as hung


# ----- the training loop (run on both ranks) -------------------------------------------------------
def sharded_model():
    """The same initial model on every rank, sharded by FSDP2 over both ranks; its Adam optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(ROWS, H), torch.nn.Linear(H, 7))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model, optimizer, rank: int, step: int) -> torch.Tensor:
    """One optimizer step on this rank's own batch (it differs per rank and step); its loss."""
    ids = torch.randint(0, ROWS, (4, 6), generator=torch.Generator().manual_seed(1000 * rank + step))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten() % 7)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def full_copies(model, optimizer) -> dict[str, torch.Tensor]:
    """What the watch should have recorded, gathered by the test (a collective: on every rank)."""
    out = {}
    for name in WATCHED["params"]:
        param = model.get_parameter(name)
        out[name] = param.full_tensor()
        for key in WATCHED["optim_state"]:
            out[f"{name}.{key}"] = optimizer.state[param][key].full_tensor()
    out["0.weight.grad"] = model.get_parameter("0.weight").grad.full_tensor()
    return out


class Counted:
    """Counts, while `active`, calls of torch.distributed's collectives and of DTensor's gathers, and
    the collectives the process group ran by any path (its sequence number: DTensor's functional
    collectives and other threads' too; the device mesh uses the default group)."""

    COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                   "all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
                   "broadcast", "barrier", "monitored_barrier", "all_to_all", "all_to_all_single", "gather",
                   "scatter", "reduce", "send", "recv", "isend", "irecv")

    def __init__(self):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        self.active, self.calls = False, []
        self.group = dist.distributed_c10d._get_default_group()
        for name in self.COLLECTIVES:
            for owner in (dist, dist.distributed_c10d):
                if hasattr(owner, name):
                    setattr(owner, name, self._wrap(getattr(owner, name), f"dist.{name}"))
        for name in ("full_tensor", "redistribute"):
            setattr(DTensor, name, self._wrap(getattr(DTensor, name), f"DTensor.{name}"))

    def _wrap(self, fn, label):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(label)
            return fn(*args, **kwargs)
        return counted

    def run(self, fn):
        """fn() and what it called: names, and 'group: n' for n collectives the group ran."""
        self.calls, self.active = [], True
        before = self.group._get_sequence_number_for_group()
        try:
            fn()
        finally:
            self.active = False
        ran = self.group._get_sequence_number_for_group() - before
        return self.calls + ([f"group: {ran}"] if ran else [])


# ----- scenarios -----------------------------------------------------------------------------------
def scenario_watch(rank: int, tmp: Path) -> dict:
    """The user's loop, as in one process; counted inside capture and rec.record; copies saved."""
    counter = Counted()
    model, optimizer = sharded_model()
    w = cr.watch(model, optimizer, **WATCHED)
    copies, losses, counts = [], [], {}
    with cr.record(tmp / "watched", w.fields, layout=cr.Layout(**LAYOUT), commit_interval=1e6) as rec:
        counts[0] = counter.run(lambda: rec.record(0, **w.capture(0)))
        copies.append({name: model.get_parameter(name).full_tensor() for name in WATCHED["params"]})
        for step in range(1, STEPS):
            loss = train_step(model, optimizer, rank, step)
            counts[step] = counter.run(lambda: rec.record(step, **w.capture(step, loss=loss)))
            copies.append(full_copies(model, optimizer))
            losses.append(loss.item())
        local = model.get_parameter("0.weight").to_local()  # the controls: the counter sees a gather
        control_gather = counter.run(lambda: model.get_parameter("0.weight").full_tensor())
        control_reduce = counter.run(lambda: torch.distributed.all_reduce(torch.ones(1)))
    if rank == 0:
        torch.save(copies, tmp / "copies.pt")
    return {"counts": counts, "losses": losses, "local_rows": local.shape[0], "fields": list(w.fields),
            "control_gather": control_gather, "control_reduce": control_reduce}


def scenario_placements(rank: int, tmp: Path) -> dict:
    """Replicate() and a split with an empty shard are recorded; Shard(1), a 2-D mesh and rows= on a
    sharded field are refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    fields = {"rep": cr.Field((4, 6), torch.float32), "one": cr.Field((1, 6), torch.float32),
              "odd": cr.Field((5,), torch.int64)}
    with cr.record(tmp / "placements", fields) as rec:
        for step in range(3):
            rec.record(step, rep=distribute_tensor(full + step, mesh, [Replicate()]),
                       one=distribute_tensor(full[:1] * step, mesh, [Shard(0)]),
                       odd=distribute_tensor(torch.arange(5) * step, mesh, [Shard(0)]))
    refused = {}
    mesh2d = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    cases = {"shard1": ({"x": cr.Field((4, 6), torch.float32)}, distribute_tensor(full, mesh, [Shard(1)])),
             "mesh2d": ({"x": cr.Field((4, 6), torch.float32)},
                        distribute_tensor(full, mesh2d, [Shard(0), Replicate()])),
             "rows": ({"x": cr.Field((4, 6), torch.float32, rows=[2, 0])}, distribute_tensor(full, mesh, [Shard(0)]))}
    for case, (fields, value) in cases.items():
        try:
            with cr.record(tmp / case, fields) as rec:
                rec.record(0, x=value)
            refused[case] = None
        except cr.CrucibleError as e:
            refused[case] = str(e)
    return {"refused": refused}


def scenario_kill(rank: int, tmp: Path) -> dict:
    """The watch's loop killed at step 9 (both ranks SIGKILL themselves) once steps 0..7 are durable."""
    model, optimizer = sharded_model()
    w = cr.watch(model, optimizer, **WATCHED)
    run = tmp / "killed"
    rec = cr.record(run, w.fields, layout=cr.Layout(**LAYOUT), commit_interval=1e6)
    rec.record(0, **w.capture(0))
    for step in range(1, STEPS):
        if step == KILLED_AT:
            progress = run / "trajectory.zarr" / ("commit.json" if rank == 0 else ".ranks/1.json")
            wait_for_steps(progress, COMMITTED_AT_KILL, str(progress), timeout=60)
            os.kill(os.getpid(), signal.SIGKILL)
        loss = train_step(model, optimizer, rank, step)
        rec.record(step, **w.capture(step, loss=loss))
    return {}


def scenario_resume(rank: int, tmp: Path) -> dict:
    """The loop restores its own state (here: it replays its deterministic steps), the recorder
    continues at its committed step."""
    model, optimizer = sharded_model()
    w = cr.watch(model, optimizer, **WATCHED)
    with cr.record(tmp / "resumed", w.fields, resume=True, commit_interval=1e6) as rec:
        first = rec.next_step
        for step in range(1, STEPS):
            loss = train_step(model, optimizer, rank, step)
            if step >= first:
                rec.record(step, **w.capture(step, loss=loss))
    return {"next_step": first, "committed": rec.committed}


def scenario_lightning(rank: int, tmp: Path) -> dict:
    """Lightning's ModelParallelStrategy shards the module with FSDP2; the Lightning callback records."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from crucible_record.integrations.lightning import RecordCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Embedding(ROWS, H), torch.nn.Linear(H, 7))
            self.losses = []

        def configure_model(self):
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

        def training_step(self, ids, index):
            loss = torch.nn.functional.cross_entropy(self.net(ids).flatten(0, 1), ids.flatten() % 7)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    class Copy(pl.Callback):  # after each optimizer step (Lightning zeroes the gradients before backward)
        def __init__(self):
            self.copies = []

        def on_train_start(self, trainer, module):
            self.copies.append({"net.0.weight": module.net[0].weight.full_tensor()})

        def on_train_batch_end(self, trainer, module, *args):
            param = module.net[0].weight
            state = trainer.optimizers[0].state[param]
            self.copies.append({"net.0.weight": param.full_tensor(), "net.0.weight.grad": param.grad.full_tensor(),
                                "net.0.weight.exp_avg": state["exp_avg"].full_tensor()})

    data = [torch.randint(0, ROWS, (6,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    copier, recorder = Copy(), RecordCallback(tmp / "lightning", params="net.0.weight", grads="net.0.weight",
                                              optim_state=("exp_avg",), commit_interval=1e6)
    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                         tensor_parallel_size=1), max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[copier, recorder])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    if rank == 0:
        torch.save(copier.copies, tmp / "lightning_copies.pt")
    return {"losses": module.losses, "placement": str(module.net[0].weight.placements)}


SCENARIOS = {"watch": scenario_watch, "placements": scenario_placements, "kill": scenario_kill,
             "resume": scenario_resume, "lightning": scenario_lightning}


def _worker(rank: int, port: int, scenarios: list, tmp: str) -> None:
    # as torchrun sets them: Lightning then runs in this process instead of launching its own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", NODE_RANK="0")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    for name in scenarios:
        try:
            result = {"result": SCENARIOS[name](rank, Path(tmp))}
        except BaseException as e:  # reported to the test, which fails with it
            result = {"raised": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (Path(tmp) / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_job(tmp: Path, scenarios: list[str], killed: bool = False) -> dict:
    """Run `scenarios` on 2 spawned ranks; {scenario: [rank 0's, rank 1's]}. killed: both end by SIGKILL."""
    codes = spawn_ranks(_worker, (free_port(), scenarios, str(tmp)), JOB_TIMEOUT)
    results = {}
    for name in scenarios:
        per_rank = []
        for rank in range(2):
            path = tmp / f"{name}.rank{rank}.json"
            doc = json.loads(path.read_text()) if path.exists() else {"result": None}
            assert "raised" not in doc, f"{name} on rank {rank}: {doc.get('traceback')}"
            per_rank.append(doc["result"])
        results[name] = per_rank
    assert codes == [-signal.SIGKILL if killed else 0] * 2, results
    return results


@pytest.fixture(scope="module")
def job1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp1")
    return tmp, run_job(tmp, ["watch", "placements", "kill"], killed=True)


@pytest.fixture(scope="module")
def job2(tmp_path_factory, job1):
    import shutil

    tmp = tmp_path_factory.mktemp("fsdp2")
    shutil.copytree(job1[0] / "killed", tmp / "resumed")
    return tmp, run_job(tmp, ["resume", "lightning"])


def assert_same_runs(a: Path, b: Path) -> None:
    ta, tb = cr.open(a), cr.open(b)
    assert ta.committed_steps == tb.committed_steps == STEPS
    for name in ta.fields:
        assert torch.equal(ta[name][:].view(torch.int32), tb[name][:].view(torch.int32)), name


# ----- job 1 -----------------------------------------------------------------------------------------
def test_fsdp2_watch_records_every_rank_s_rows_bit_exact(job1):
    tmp, results = job1
    rank0, rank1 = results["watch"]
    assert (rank0["local_rows"], rank1["local_rows"]) == (501, 500)  # DTensor's own uneven split
    copies = torch.load(tmp / "copies.pt")
    t = cr.open(tmp / "watched")
    assert t.committed_steps == STEPS
    assert set(t.fields) == set(rank0["fields"]) == {"0.weight", "0.weight.exp_avg", "0.weight.exp_avg_sq", "1.bias",
                                                     "1.bias.exp_avg", "1.bias.exp_avg_sq", "0.weight.grad", "loss"}
    assert tuple(t["0.weight"].shape) == (STEPS, ROWS, H) and tuple(t["1.bias"].shape) == (STEPS, 7)
    for name in WATCHED["params"]:
        assert torch.equal(t[name][0], copies[0][name]), name  # step 0: the initial parameters
    assert torch.isnan(t["0.weight.grad"][0]).all() and torch.isnan(t["0.weight.exp_avg"][0]).all()
    for step in range(1, STEPS):
        assert set(copies[step]) == set(t.fields) - {"loss"}
        for name, value in copies[step].items():
            assert torch.equal(t[name][step], value), (name, step)
    assert not torch.equal(t["0.weight"][STEPS - 1], t["0.weight"][0])  # it trained
    # whole shards of their own: each rank's rows in its own shard files
    meta = json.loads((tmp / "watched" / "trajectory.zarr" / "0.weight" / "zarr.json").read_text())
    assert meta["attributes"]["crucible_record"]["partition"]["shards"] == [
        {"offset": 0, "rows": 501, "ranks": [0]}, {"offset": 501, "rows": 500, "ranks": [1]}]
    assert verify_run(tmp / "watched").ok


def test_no_collective_and_no_gather_after_the_first_step(job1):
    _, results = job1
    for rank, result in enumerate(results["watch"]):
        counts = result["counts"]
        assert "dist.all_gather_object" in counts["0"], counts["0"]  # step 0: the one agreement, seen
        assert any(c.startswith("group: ") for c in counts["0"]), counts["0"]
        later = {step: calls for step, calls in counts.items() if step != "0"}
        assert len(later) == STEPS - 1 and not any(later.values()), (rank, later)
        # the counter is not blind: a full_tensor() and an all_reduce in the same window are seen
        assert "DTensor.full_tensor" in result["control_gather"], result["control_gather"]
        assert "dist.all_reduce" in result["control_reduce"], result["control_reduce"]
        for control in (result["control_gather"], result["control_reduce"]):
            assert any(c.startswith("group: ") for c in control), control


def test_the_loss_is_one_row_per_rank(job1):
    tmp, results = job1
    t = cr.open(tmp / "watched")
    loss = t["loss"]
    assert tuple(loss.shape) == (STEPS, 2) and loss.dtype == torch.float32
    assert t.to_xarray()["loss"].dims == ("step", "rank")
    assert torch.isnan(loss[0]).all()
    for rank, result in enumerate(results["watch"]):
        assert loss[1:, rank].tolist() == result["losses"], rank  # each rank's own, not rank 0's
    assert results["watch"][0]["losses"] != results["watch"][1]["losses"]  # the ranks' data differ


def test_replicate_and_an_empty_shard_are_recorded(job1):
    tmp, _ = job1
    t = cr.open(tmp / "placements")
    full = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for step in range(3):
        assert torch.equal(t["rep"][step], full + step)
        assert torch.equal(t["one"][step], full[:1] * step)  # 1 row over 2 ranks: rank 1 holds none
        assert torch.equal(t["odd"][step], torch.arange(5) * step)  # 3 + 2 rows
    meta = json.loads((tmp / "placements" / "trajectory.zarr" / "rep" / "zarr.json").read_text())
    assert "partition" not in meta["attributes"]["crucible_record"]  # replicated: rank 0 wrote it


@pytest.mark.parametrize("case, message", [
    ("shard1", r"^field 'x': a DTensor placed \(Shard\(dim=1\),\) on a 1-D mesh of shape \(2,\) is not recorded "
               r"\(only Shard\(0\) or Replicate\(\) on a 1-D mesh\); redistribute it first "
               r"\(x\.redistribute\(x\.device_mesh, \[Shard\(0\)\]\)\) or pass x\.full_tensor\(\)$"),
    ("mesh2d", r"^field 'x': a DTensor placed \(Shard\(dim=0\), Replicate\(\)\) on a 2-D mesh of shape \(1, 2\) is "
               r"not recorded"),
    ("rows", r"^field 'x' keeps a subset of its rows \(rows=\.\.\.\): a Shard \(or a DTensor sharded on rows\) of it "
             r"is not supported; drop rows=, or pass the whole tensor on every rank \(a DTensor's full_tensor\(\)\)$"),
])
def test_other_placements_are_refused_in_one_line_on_every_rank(job1, case, message):
    import re

    tmp, results = job1
    errors = [r["refused"][case] for r in results["placements"]]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "\n" not in errors[0] and re.search(message, errors[0]), errors[0]
    assert not (tmp / case / "trajectory.zarr" / "x").exists()  # refused before anything was written


def test_a_killed_run_keeps_its_committed_prefix(job1):
    tmp, results = job1
    assert results["kill"] == [None, None]  # both ranks died in it
    t = cr.open(tmp / "killed")
    assert t.committed_steps == COMMITTED_AT_KILL
    watched = cr.open(tmp / "watched")
    for name in t.fields:
        assert torch.equal(t[name][:].view(torch.int32), watched[name][:COMMITTED_AT_KILL].view(torch.int32)), name


# ----- job 2 -----------------------------------------------------------------------------------------
def test_resume_on_two_ranks_equals_the_uninterrupted_run(job1, job2):
    tmp, results = job2
    assert [r["next_step"] for r in results["resume"]] == [COMMITTED_AT_KILL] * 2
    assert [r["committed"] for r in results["resume"]] == [STEPS] * 2
    assert_same_runs(tmp / "resumed", job1[0] / "watched")
    assert verify_run(tmp / "resumed").ok


def test_lightning_model_parallel_strategy_records_fsdp2_shards(job2):
    tmp, results = job2
    assert [r["placement"] for r in results["lightning"]] == ["(Shard(dim=0),)"] * 2  # it really was sharded
    copies = torch.load(tmp / "lightning_copies.pt")
    t = cr.open(tmp / "lightning")
    assert t.committed_steps == len(copies) == 5
    assert torch.equal(t["net.0.weight"][0], copies[0]["net.0.weight"])
    for step in range(1, 5):
        for name, value in copies[step].items():
            assert torch.equal(t[name][step], value), (name, step)
    for rank, result in enumerate(results["lightning"]):
        assert t["loss"][1:, rank].tolist() == result["losses"], rank
    meta = json.loads((tmp / "lightning" / "trajectory.zarr" / "net.0.weight" / "zarr.json").read_text())
    assert [s["rows"] for s in meta["attributes"]["crucible_record"]["partition"]["shards"]] == [501, 500]
