"""Per-rank writer throughput of a run recorded by 2 ranks (torch.distributed, gloo) vs 1 process.

One field W (--rows x --hidden, bf16; default 10000 x 64 = 1.28 MB a step), --steps steps (128),
time_chunk 64, codec default, durability fsync, commits only where a block fills and at close.
Step to step W moves like bf16 AdamW late in training: ~25 % of the entries change by one bf16 ulp
(an in-place integer add on the bits: the producer costs little).

Modes (each repeat starts fresh processes, spawned; the recorder's timings are taken inside them):
  one_process         1 process records all rows (no process group: the single-process path)
  two_ranks           2 processes (gloo), each records its half of the rows as cr.Shard
  one_process_half    1 process records half the rows (what one rank writes, without a neighbour)

Per rank and repeat:
  writer_s        rec.writer_seconds: wall time the writer thread spent placing rows, encoding,
                  writing and fsyncing (not waiting for work or for other ranks)
  writer_MBps     raw bytes this rank recorded / writer_s
  wall_s          first record() .. close() returned (close includes rank 0's wait for the others
                  and rank 1's wait for rank 0's verdict)
  sustained_MBps  raw bytes this rank recorded / wall_s
  record_s        time spent inside record() (copies + waiting for a free staging slot)
  cpu_s           process CPU seconds over the same window (all threads)
  writer_cpu_s    CPU seconds of every thread but the training thread (the writer and zarr's event
                  loop and codec threads: encode, checksums, writes, fsync calls; not the staging
                  copies); writer_cpu_MBps = raw bytes / writer_cpu_s: what one rank's writing
                  sustains per core it gets, the basis for more ranks per node
Reported: medians over repeats. Writes benchmarks/results/multirank.json (or results/quick/ with
--quick) with the machine, load average and git commit.

    python benchmarks/bench_multirank.py            # 5 repeats, ~2 minutes on 2 cores
    python benchmarks/bench_multirank.py --quick    # 2 repeats, 32 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    import crucible_record as cr

    rows, hidden, steps = cfg["rows"], cfg["hidden"], cfg["steps"]
    share = -(-rows // world)
    first, last = rank * share, min(rows, (rank + 1) * share)
    rng = np.random.default_rng(rank)
    bits = torch.from_numpy(rng.integers(0x3C00, 0x3F80, size=(last - first, hidden), dtype=np.int16))
    masks = [torch.from_numpy((rng.random((last - first, hidden)) < 0.25).astype(np.int16)) for _ in range(8)]
    fields = {"W": cr.Field((rows, hidden), torch.bfloat16)}
    run = Path(out) / "run"
    layout = cr.Layout(time_chunk=cfg["time_chunk"], codec=cfg["codec"])
    in_record = 0.0
    began, cpu0, own0 = time.perf_counter(), time.process_time(), time.thread_time()
    with cr.record(run, fields, layout=layout, commit_interval=1e6, rank_timeout=120) as rec:
        for step in range(steps):
            bits += masks[step % len(masks)]
            value = bits.view(torch.bfloat16)
            t = time.perf_counter()
            rec.record(step, W=cr.Shard(value, offset=first) if world > 1 else value)
            in_record += time.perf_counter() - t
        began_close = time.perf_counter()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    writer_cpu = cpu - (time.thread_time() - own0)  # all but the training thread: writer, zarr's codec threads
    raw = (last - first) * hidden * 2 * steps
    result = {"rank": rank, "world": world, "rows": last - first, "raw_MB": raw / 1e6, "wall_s": wall,
              "close_s": time.perf_counter() - began_close, "writer_s": rec.writer_seconds,
              "writer_MBps": raw / 1e6 / rec.writer_seconds, "sustained_MBps": raw / 1e6 / wall,
              "record_s": in_record, "cpu_s": cpu, "writer_cpu_s": writer_cpu,
              "writer_cpu_MBps": raw / 1e6 / writer_cpu}
    if rank == 0:
        result["bytes_on_disk"] = cr.open(run).bytes_on_disk()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_mode(world: int, cfg: dict, scratch: Path) -> list[dict]:
    import multiprocessing

    out = Path(tempfile.mkdtemp(dir=scratch))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=worker, args=(rank, world, port, cfg, str(out))) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        if p.exitcode != 0:
            raise SystemExit(f"a rank exited with {p.exitcode}")
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]
    shutil.rmtree(out)
    return results


def median_of(samples: list[list[dict]], key: str, rank: int) -> float:
    return round(statistics.median(s[rank][key] for s in samples), 3)


def git_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "src_changes_not_committed": [l for l in git("status", "--porcelain", "src").splitlines() if l]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--time-chunk", type=int, default=64)
    parser.add_argument("--codec", default="default")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    cfg = {"rows": args.rows, "hidden": args.hidden, "steps": args.steps or (32 if args.quick else 128),
           "time_chunk": args.time_chunk, "codec": args.codec}
    modes = {"one_process": (1, cfg), "two_ranks": (2, cfg),
             "one_process_half": (1, {**cfg, "rows": -(-cfg["rows"] // 2)})}
    load_start = [round(x, 2) for x in os.getloadavg()]
    samples: dict[str, list] = {m: [] for m in modes}
    scratch = Path(tempfile.mkdtemp(prefix="bench_multirank_"))
    try:
        for repeat in range(repeats):
            for mode, (world, mode_cfg) in modes.items():
                samples[mode].append(run_mode(world, mode_cfg, scratch))
                print(f"repeat {repeat + 1}/{repeats} {mode}: " + "; ".join(
                    f"rank {r['rank']} writer {r['writer_MBps']:.0f} MB/s, wall {r['wall_s']:.2f} s"
                    for r in samples[mode][-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    keys = ["raw_MB", "writer_s", "writer_MBps", "writer_cpu_s", "writer_cpu_MBps", "wall_s", "sustained_MBps",
            "close_s", "record_s", "cpu_s"]
    summary = {mode: [{"rank": rank, **{k: median_of(samples[mode], k, rank) for k in keys}}
                      for rank in range(modes[mode][0])] for mode in modes}
    for mode in summary:
        print(mode, json.dumps(summary[mode]))
    import torch
    import zarr

    result = {
        "name": "multirank",
        "command": "python benchmarks/bench_multirank.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__, "zarr": zarr.__version__, "source": git_state()},
        "load": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "config": {**cfg, "repeats": repeats, "durability": "fsync", "commit_interval": "blocks and close only",
                   "field": f"W ({cfg['rows']}, {cfg['hidden']}) bf16"},
        "medians": summary,
        "samples": samples,
    }
    out = HERE / "results" / ("quick" if args.quick else "") / "multirank.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
