"""Runs on object storage: the recorder's write throughput and a full scan's read throughput on a
local S3 server (moto's, started here) against the local disk, and zarr's two S3 store classes
(ObjectStore over obstore, FsspecStore over s3fs) on the same shard-sized objects.

    python benchmarks/bench_s3.py [--quick]

The field is a Crucible-size bf16 embedding (10,000 x 64) whose entries change a little each step,
recorded in blocks of 64 steps (one 82 MB block -> one shard object per block). moto keeps objects
in memory in this process's threads, so the S3 figures measure the protocol path (HTTP, signing,
one PUT per shard), not a network; they are an upper bound for a real endpoint. Medians of
`--repeats` interleaved runs with their spread; writes/reads repeated for an A/A control.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args()
    steps = 128 if args.quick else 256
    repeats = args.repeats or (3 if args.quick else 5)

    import pytest
    import torch

    import crucible_record as cr
    from tests.s3server import s3_server

    vocab, hidden, block = 10_000, 64, 64
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, hidden, generator=gen) * 0.02
    drift = [base + 1e-4 * i * torch.randn(vocab, hidden, generator=gen) for i in range(16)]
    values = [d.to(torch.bfloat16) for d in drift]
    fields = {"W": cr.Field((vocab, hidden), torch.bfloat16)}
    raw_mb = steps * vocab * hidden * 2 / 1e6

    def record(location) -> float:
        started = time.perf_counter()
        with cr.record(location, fields, layout=cr.Layout(time_chunk=block), commit_interval=1e9) as rec:
            for step in range(steps):
                rec.record(step, W=values[step % len(values)])
        return raw_mb / (time.perf_counter() - started)

    def scan(location) -> float:
        t = cr.open(location)
        started = time.perf_counter()
        for first in range(0, steps, block):
            t["W"][first:first + block]
        return raw_mb / (time.perf_counter() - started)

    mp = pytest.MonkeyPatch()
    results: dict[str, list[float]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        with s3_server(mp.setenv) as (bucket, endpoint, env):
            for r in range(repeats):  # interleaved: disk, s3, disk again (A/A), s3 again
                for name, location in [("write disk", scratch / f"d{r}"), ("write s3", f"s3://{bucket}/r{r}"),
                                       ("write disk A/A", scratch / f"e{r}"), ("write s3 A/A", f"s3://{bucket}/q{r}")]:
                    results.setdefault(name, []).append(record(location))
                for name, location in [("scan disk", scratch / f"d{r}"), ("scan s3", f"s3://{bucket}/r{r}"),
                                       ("scan disk A/A", scratch / f"d{r}"), ("scan s3 A/A", f"s3://{bucket}/r{r}")]:
                    results.setdefault(name, []).append(scan(location))
            results.update(store_classes(bucket, endpoint, env, repeats))
    finally:
        mp.undo()
        shutil.rmtree(scratch, ignore_errors=True)

    table = {name: {"median_MB_s": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1),
                    "runs": [round(x, 1) for x in v]} for name, v in results.items()}
    ratios = {
        "write s3 / disk": round(table["write s3"]["median_MB_s"] / table["write disk"]["median_MB_s"], 3),
        "scan s3 / disk": round(table["scan s3"]["median_MB_s"] / table["scan disk"]["median_MB_s"], 3),
        "write A/A disk": round(table["write disk A/A"]["median_MB_s"] / table["write disk"]["median_MB_s"], 3),
        "put obstore / s3fs": round(table["put obstore"]["median_MB_s"] / table["put s3fs"]["median_MB_s"], 3),
        "get obstore / s3fs": round(table["get obstore"]["median_MB_s"] / table["get s3fs"]["median_MB_s"], 3),
    }
    out = {"benchmark": "s3", "commit": commit(), "mode": "quick" if args.quick else "full", "steps": steps,
           "field": [vocab, hidden], "time_chunk": block, "raw_MB": raw_mb, "repeats": repeats,
           "load_average": os.getloadavg(), "MB_s": table, "ratios": ratios,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    folder = HERE / "results" / ("quick" if args.quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "s3.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name:18s} {row['median_MB_s']:8.1f} MB/s raw  (min {row['min']}, max {row['max']})")
    print(json.dumps(ratios))


def store_classes(bucket: str, endpoint: str, env: dict, repeats: int) -> dict[str, list[float]]:
    """PUT and GET of shard-sized objects (a real run's compressed shards) through zarr's two S3 stores."""
    import numpy as np
    import obstore.store
    import s3fs
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    payload = np.random.default_rng(0).integers(0, 255, 20_000_000, dtype=np.uint8).tobytes()  # ~ one shard
    buf = default_buffer_prototype().buffer.from_bytes(payload)
    stores = {
        "obstore": zarr.storage.ObjectStore(obstore.store.from_url(f"s3://{bucket}/classes/obstore")),
        "s3fs": zarr.storage.FsspecStore(s3fs.S3FileSystem(endpoint_url=endpoint, key=env["AWS_ACCESS_KEY_ID"],
                                                           secret=env["AWS_SECRET_ACCESS_KEY"], asynchronous=True),
                                         path=f"{bucket}/classes/s3fs"),
    }
    out: dict[str, list[float]] = {}
    mb = len(payload) / 1e6
    for r in range(repeats):
        for name, store in stores.items():
            started = time.perf_counter()
            sync(store.set(f"k{r}", buf))
            out.setdefault(f"put {name}", []).append(mb / (time.perf_counter() - started))
            started = time.perf_counter()
            got = sync(store.get(f"k{r}", default_buffer_prototype()))
            out.setdefault(f"get {name}", []).append(mb / (time.perf_counter() - started))
            assert got is not None and len(got) == len(payload)
    return out


if __name__ == "__main__":
    main()
