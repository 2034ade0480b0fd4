"""A run recorded by 2 ranks (torch.distributed, gloo, one process each) vs one process.

One field W (--rows x 64 bf16; 10,000 rows = 1.28 MB a step), --steps steps, blocks of 64 steps,
default preset and durability (fsync), commits where a block fills and at close. Step to step W
moves like bf16 AdamW late in training: ~25 % of the entries change by one bf16 ulp. Variants:
    one_process       1 process records all rows (no process group)
    two_ranks         2 ranks, each records its half of the rows as cr.Shard
    one_process_half  1 process records half the rows (what one rank writes, without a neighbour)
Per run: wall seconds from the first record() to close() returning (the slowest rank), and each
rank's writer rate: its raw bytes / rec.writer_seconds.

    python benchmarks/bench_multirank.py [--rounds 5] [--steps 128] [--quick] [--baseline-src DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import harness


def rank_main(rank: int, port: int, world: int, rows: int, steps: int, out: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    import crucible_record as cr

    share = -(-rows // world)
    first, last = rank * share, min(rows, (rank + 1) * share)
    rng = np.random.default_rng(rank)
    bits = torch.from_numpy(rng.integers(0x3C00, 0x3F80, size=(last - first, 64), dtype=np.int16))
    masks = [torch.from_numpy((rng.random((last - first, 64)) < 0.25).astype(np.int16)) for _ in range(8)]
    began = time.perf_counter()
    with cr.record(Path(out) / "run", {"W": cr.Field((rows, 64), torch.bfloat16)}, layout=cr.Layout(time_chunk=64),
                   commit_interval=1e6) as rec:
        for step in range(steps):
            bits += masks[step % len(masks)]
            value = bits.view(torch.bfloat16)
            rec.record(step, W=cr.Shard(value, offset=first) if world > 1 else value)
    raw = (last - first) * 64 * 2 * steps
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"wall_s": time.perf_counter() - began, "writer_MBps": raw / 1e6 / rec.writer_seconds}))
    if world > 1:
        dist.destroy_process_group()


def child(world: int, rows: int, steps: int, scratch: str) -> dict:
    out = tempfile.mkdtemp(dir=scratch, prefix="crucible-bench-multirank-")
    try:
        harness.run_ranks(rank_main, world, (world, rows, steps, out))
        ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": max(x["wall_s"] for x in ranks), "writer_MBps": ranks[0]["writer_MBps"],
            "writer_MBps_per_rank": [x["writer_MBps"] for x in ranks]}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--steps", type=int, default=128)
    args = p.parse_args()
    steps = 16 if args.quick else args.steps
    res = harness.Result("multirank", args)
    common = {"steps": steps, "scratch": str(args.scratch)}
    variants = {"one_process": {"world": 1, "rows": args.rows, **common},
                "two_ranks": {"world": 2, "rows": args.rows, **common},
                "one_process_half": {"world": 1, "rows": -(-args.rows // 2), **common}}
    runs = harness.compare(__file__, variants, "one_process", args)
    size = f"W {args.rows} x 64 bf16, {steps} steps"
    res.table(f"{size}: wall seconds (slowest rank)", harness.summarize(runs, "wall_s", "one_process"))
    res.table(f"{size}: rank 0's writer MB/s (raw bytes / writer_seconds)",
              harness.summarize(runs, "writer_MBps", "one_process"))
    res.details["runs"] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
