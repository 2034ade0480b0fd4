"""Issue 15: which `chunks=` to give xarray.open_zarr on a run: the steps of a shard alone, or whole shards.

A 256-step run of a 10,000 x 64 bf16 field (blocks of 64 steps, inner chunks of 100 rows) is
opened with ``xarray.open_zarr(RUN/trajectory.zarr, consolidated=False, chunks=...)`` and a mean
over steps and hidden computed (float32), 5 times per choice, the choices alternated (A, B, A, B):

    steps_only    chunks={"step": 64}                 one dask task per inner chunk (400)
    whole_shards  chunks={"step": 64, "token": -1}    one task per shard (4)

    python benchmarks/bench_xarray_chunks.py [--quick]
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, median, parser, r, scratch_dir  # noqa: E402

CHOICES = {"steps_only": {"step": 64}, "whole_shards": {"step": 64, "token": -1}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    import torch
    import xarray as xr

    import crucible_record as cr

    warnings.filterwarnings("ignore", message="Object at commit.json")
    steps, repeats = (128, 3) if args.quick else (256, 5)
    res = Result("xarray_chunks", args.quick)
    with scratch_dir("xarray") as d:
        run = d / "run"
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(10000, 64, generator=gen)
        with cr.record(run, {"W": cr.Field((10000, 64), torch.bfloat16, dims=("token", "hidden"))}, steps=steps) as rec:
            for step in range(steps):
                W += 1e-3 * torch.randn(10000, 64, generator=gen)
                rec.record(step, W=W.to(torch.bfloat16))
        times = {name: [] for name in CHOICES}
        tasks = {}
        for _ in range(2):  # A, B, A, B
            for name, chunks in CHOICES.items():
                for _ in range(repeats):
                    ds = xr.open_zarr(run / "trajectory.zarr", consolidated=False, chunks=chunks)
                    t0 = time.perf_counter()
                    ds.W.astype("float32").mean(("step", "hidden")).compute()
                    times[name].append(time.perf_counter() - t0)
                    tasks[name] = ds.W.data.npartitions
        table = {name: {"median_s": r(median(ts)), "min_s": r(min(ts)), "max_s": r(max(ts)), "dask_chunks": tasks[name],
                        "runs": len(ts)} for name, ts in times.items()}
        res.details.update(table=table, steps=steps)
        speedup = table["steps_only"]["median_s"] / table["whole_shards"]["median_s"]
        res.target("whole_shards_vs_steps_only", "whole shards at least as fast as the steps of a shard alone",
                   r(speedup, 2), speedup >= 1.0,
                   f"whole shards {table['whole_shards']['median_s']} s ({table['whole_shards']['min_s']}.."
                   f"{table['whole_shards']['max_s']}), steps only {table['steps_only']['median_s']} s "
                   f"({table['steps_only']['min_s']}..{table['steps_only']['max_s']})", "x")
    res.save()


if __name__ == "__main__":
    main()
