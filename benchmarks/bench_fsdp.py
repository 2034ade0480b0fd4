"""A model sharded by FSDP2 on 2 CPU ranks (gloo), trained recorded through cr.watch vs unrecorded.

The model: an embedding (--rows x 64 float32) -> Linear(64, 256) -> GELU -> Linear(256, 512),
``fully_shard`` over both ranks; Adam; each rank its own batch of 16 x 32 tokens a step. Recorded:
the embedding, its gradient, Adam's exp_avg and exp_avg_sq (each rank writes its own rows: 4 x
rows/2 x 64 x 4 bytes a step) and the per-rank loss, default layout and durability. Variants:
    unrecorded   the training loop alone
    recorded     the same loop with cr.watch + cr.record, each rank writing its rows (no gather)
The limit: the preset's bare compressor (numcodecs) on the bytes rank 0 wrote, read back after the
recorded run (timed in the parent child, not during training).
Per run, of the slowest rank: loop_s, the seconds of the steps (record() included), and wall_s,
from the first step to close() returning (the last blocks written and committed).

    python benchmarks/bench_fsdp.py [--rounds 3] [--steps 48] [--rows 20000] [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import harness


def rank_main(rank: int, port: int, rows: int, steps: int, recorded: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import crucible_record as cr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(rows, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 512))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, rows, (16, 32), generator=gen) for _ in range(8)]

    def train(step: int) -> torch.Tensor:
        ids = batches[step % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten() % 512)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    dist.barrier()
    began = time.perf_counter()
    if recorded:
        w = cr.watch(model, optimizer, params="0.weight", grads="0.weight", optim_state=("exp_avg", "exp_avg_sq"))
        with cr.record(Path(out) / "run", w.fields, commit_interval=1e6) as rec:
            rec.record(0, **w.capture(0))
            for step in range(1, steps + 1):
                loss = train(step)
                rec.record(step, **w.capture(step, loss=loss))
            loop = time.perf_counter() - began
    else:
        for step in range(1, steps + 1):
            train(step)
        loop = time.perf_counter() - began
    Path(out, f"rank{rank}.json").write_text(json.dumps({"loop_s": loop, "wall_s": time.perf_counter() - began}))
    dist.destroy_process_group()


def child(rows: int, steps: int, recorded: bool, scratch: str) -> dict:
    out = tempfile.mkdtemp(dir=scratch, prefix="crucible-bench-fsdp-")
    try:
        harness.run_ranks(rank_main, 2, (rows, steps, recorded, out))
        ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(2)]
        codec_s = bare_codec_seconds(Path(out) / "run", rows) if recorded else None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"loop_s": max(x["loop_s"] for x in ranks), "wall_s": max(x["wall_s"] for x in ranks), "codec_s": codec_s}


def bare_codec_seconds(run: Path, rows: int) -> float:
    """The limit: seconds the preset's bare compressor takes on the bytes rank 0 wrote (its rows of
    the four (rows, 64) fields, step-last chunks as stored), without zarr, files or the recorder."""
    import crucible_record as cr

    opened, seconds = cr.open(run), 0.0
    for name, field in opened.fields.items():
        if len(field.shape) != 2:
            continue
        data = opened[name].numpy((slice(None), slice(0, -(-rows // 2))))
        chunks = harness.step_last_chunks(data, opened.info.layout.row_chunk)
        codec = harness.bare_compressor(str(data.dtype), chunks[0].shape)
        t0 = time.perf_counter()
        for chunk in chunks:
            codec.encode(chunk)
        seconds += time.perf_counter() - t0
    return seconds


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()
    steps, rows = (4, 2001) if args.quick else (args.steps, args.rows)
    res = harness.Result("fsdp", args)
    common = {"rows": rows, "steps": steps, "scratch": str(args.scratch)}
    variants = {"unrecorded": {**common, "recorded": False}, "recorded": {**common, "recorded": True}}
    runs = harness.compare(__file__, variants, "unrecorded", args)
    size = f"FSDP2, 2 CPU ranks, embedding {rows} x 64 f32, {steps} steps"
    res.table(f"{size}: seconds of the loop (slowest rank)", harness.summarize(runs, "loop_s", "unrecorded"))
    res.table(f"{size}: seconds to close() (slowest rank)", harness.summarize(runs, "wall_s", "unrecorded"))
    res.row("the limit: the bare compressor on rank 0's recorded bytes (median)",
            round(statistics.median(x["codec_s"] for x in runs["recorded"]), 3), " s",
            "with no spare core, each rank's writer needs at least this much CPU beside its training")
    res.details["runs"] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
