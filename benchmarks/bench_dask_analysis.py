"""`crucible-record analyze` on a Dask cluster vs in one process, for a run whose W is larger than a
worker's memory limit.

    python benchmarks/bench_dask_analysis.py [--quick] [--steps N] [--workers 2] [--memory-limit 700MB]

What it does:
1. Records a synthetic Crucible-3 run with ``cr.record`` and the experiment's own fields
   (``crucible3.engine.fields``: W bf16 (10,000 x 64) = 1.28 MB a step, h_mean, loss, epoch) and its
   constants (dead_mask: 30% of the tokens, dead_indices), default layout (blocks of 64 steps =
   82 MB of W), durability "none". Why synthetic: it is written at the speed of compression
   (seconds), where `crucible-record train` on this 2-core CPU needs minutes for the same size. W is a
   bf16 random walk shaped like Adam's updates (each step moves about half the live and 5% of the
   dead entries by +-1e-3; small steps stall in bf16, as in the real run), h_mean and loss random.
   Full size: 800 training steps, W of 801 x 10,000 x 64 bf16 = 1.03 GB raw, above each worker's
   memory limit (--memory-limit, default 700 MB: a worker process with torch and zarr imported
   already holds about 350 MB, so the limit of 300 MB the issue suggested would not even let a
   worker start; dask pauses a worker at 80% and kills it at 95% of its limit).
2. ``single``: a fresh subprocess opens the run, resets its peak-RSS mark (/proc/self/clear_refs),
   runs ``analysis.analyze`` (the single-process streaming pass) and writes analysis.json; wall time
   of the analysis and the peak RSS above the baseline (VmHWM).
3. ``dask``: a fresh subprocess starts ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
   processes=True, memory_limit=...)``, imports the task code on the workers, resets every peak mark,
   then runs ``scan_W_dask`` + ``analyze(traj, scan=...)`` and writes analysis.json; wall time of the
   analysis (cluster start reported apart), the client's peak RSS and every worker's peak RSS
   (VmHWM read on the workers), and whether any worker process was replaced (pids before/after).
4. The two analysis.json files are compared byte for byte.

Results: benchmarks/results/dask_analysis.json (benchmarks/results/quick/ with --quick), with the git
commit (``git rev-parse HEAD``), the machine and its load. On a 2-core machine two workers compete
with the client and with each other: the point here is memory (each worker holds one block, whatever
the run length) and equality, not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VOCAB, HIDDEN = 10_000, 64
FULL_STEPS, QUICK_STEPS = 800, 130  # quick: 131 rows of W = 2 whole 64-step blocks and 3 more rows


# ----- helpers used in the children and on the workers ----------------------------------------
def status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker_memory() -> dict:
    return {"pid": os.getpid(), "rss_mb": status_mb("VmRSS"), "peak_mb": status_mb("VmHWM")}


def worker_warm_up() -> dict:
    """Import what the tasks import, then reset the peak mark: the peak measured later is the scan's."""
    import crucible_record.crucible3.distributed  # noqa: F401
    import crucible_record.reader  # noqa: F401

    out = worker_memory()
    out["peak_reset"] = reset_peak()
    return out


# ----- 1. the run ------------------------------------------------------------------------------
def make_run(path: Path, steps: int, seed: int = 0) -> dict:
    import torch

    import crucible_record as cr
    from crucible_record.crucible3 import open_trajectory
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.engine import fields
    from crucible_record.crucible3.trajectory import EXPERIMENT

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    config = RunConfig(steps=steps, vocab_size=VOCAB, hidden_dim=HIDDEN, device="cpu")
    dead = torch.rand(VOCAB, generator=g) < 0.3
    W = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).bfloat16()
    p_move = torch.where(dead, 0.05, 0.5)[:, None]
    nan = torch.tensor(float("nan"))
    with cr.record(path, fields(config), steps=steps + 1,
                   attributes={"experiment": EXPERIMENT, "config": config.to_dict(), "synthetic": True},
                   constants={"dead_mask": (dead, ("token",)), "dead_indices": (torch.nonzero(dead).flatten(), ("dead_token",))},
                   durability="none") as rec:
        for step in range(steps + 1):
            if step:
                moves = torch.rand(VOCAB, HIDDEN, generator=g) < p_move
                sign = torch.randint(0, 2, (VOCAB, HIDDEN), generator=g).float() * 2 - 1
                W = (W.float() + 1e-3 * sign * moves).bfloat16()
            h = torch.randn(HIDDEN, generator=g) if step else torch.full((HIDDEN,), float("nan"))
            rec.record(step, W=W, h_mean=h, loss=(2.0 - step / (steps + 1)) * torch.ones(()) if step else nan,
                       epoch=torch.tensor(step // 100, dtype=torch.int64))
    t = open_trajectory(path)
    return {"steps": t.steps, "W_shape": list(t.W.shape), "W_raw_mb": round(t.W.shape.numel() * 2 / 1e6, 1),
            "W_block_steps": t.W.array.shards[0], "bytes_on_disk_mb": round(t.run.bytes_on_disk() / 1e6, 1),
            "seconds_to_record": round(time.perf_counter() - t0, 1)}


# ----- 2. and 3. the children -------------------------------------------------------------------
def child_single(run: str, out: str) -> dict:
    from crucible_record.crucible3 import open_trajectory
    from crucible_record.crucible3.analysis import analyze
    from crucible_record.crucible3.report import write_analysis_json

    traj = open_trajectory(run)
    baseline = status_mb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    result = analyze(traj)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    write_analysis_json(result, Path(out) / "analysis.json")
    return {"seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "peak_above_baseline_mb": peak - baseline}


def child_dask(run: str, out: str, workers: int, memory_limit: str) -> dict:
    import distributed

    from crucible_record.crucible3 import open_trajectory
    from crucible_record.crucible3.analysis import analyze
    from crucible_record.crucible3.distributed import NO_DASHBOARD, scan_W_dask
    from crucible_record.crucible3.report import write_analysis_json

    traj = open_trajectory(run)
    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit=memory_limit,
                                       scheduler_kwargs=NO_DASHBOARD)
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(workers)
        warm = client.run(worker_warm_up)
        start_s = time.perf_counter() - t0
        baseline = status_mb("VmRSS")
        reset_peak()
        t1 = time.perf_counter()
        scan = scan_W_dask(traj, client)
        scan_s = time.perf_counter() - t1
        result = analyze(traj, scan=scan)
        seconds = time.perf_counter() - t1
        peak = status_mb("VmHWM")
        after = client.run(worker_memory)
        limits = {w: info["memory_limit"] for w, info in client.scheduler_info()["workers"].items()}
    finally:
        client.close()
        cluster.close()
    write_analysis_json(result, Path(out) / "analysis.json")
    same = sorted(v["pid"] for v in warm.values()) == sorted(v["pid"] for v in after.values())
    return {
        "seconds": seconds, "scan_seconds": scan_s, "cluster_start_seconds": start_s,
        "client_baseline_rss_mb": baseline, "client_peak_rss_mb": peak,
        "client_peak_above_baseline_mb": peak - baseline,
        "worker_memory_limit_mb": sorted(v / 2**20 for v in limits.values()),
        "worker_rss_before_mb": sorted(v["rss_mb"] for v in warm.values()),
        "worker_peak_rss_mb": sorted(v["peak_mb"] for v in after.values()),
        "workers_replaced": not same,
    }


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args],
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"child {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----- main --------------------------------------------------------------------------------------
def main() -> None:
    import _common

    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help=f"training steps [default {FULL_STEPS}, quick {QUICK_STEPS}]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="700MB", help="each worker's dask memory_limit [default 700MB]")
    args = p.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    res = _common.Result("dask_analysis", args.quick)
    with _common.scratch_dir("dask-analysis") as tmp:
        run = tmp / "run"
        made = make_run(run, steps)
        print(f"[dask_analysis] recorded {made}", flush=True)
        (tmp / "single").mkdir()
        (tmp / "dask").mkdir()
        single = run_child(["single", str(run), str(tmp / "single")])
        print(f"[dask_analysis] single process: {single}", flush=True)
        dask = run_child(["dask", str(run), str(tmp / "dask"), str(args.workers), args.memory_limit])
        print(f"[dask_analysis] dask: {dask}", flush=True)
        a = (tmp / "single" / "analysis.json").read_bytes()
        b = (tmp / "dask" / "analysis.json").read_bytes()
    identical = a == b
    limit_mb = max(dask["worker_memory_limit_mb"])
    res.details.update(run=made, single=single, dask=dask, workers=args.workers, memory_limit=args.memory_limit,
                       analysis_json_identical=identical, analysis_json_bytes=len(a))
    res.target("dask-equal", "analysis.json of the Dask run identical to the single-process one", identical, identical)
    res.target("dask-bigger-than-worker", "W larger than a worker's memory limit",
               f"W {made['W_raw_mb']} MB raw vs limit {limit_mb:.0f} MiB",
               None if args.quick else made["W_raw_mb"] > limit_mb * 1.048576,
               note="quick size: a smoke test, W is smaller than the limit" if args.quick else "")
    worker_peak = max(dask["worker_peak_rss_mb"])
    res.target("dask-worker-memory", "every worker's peak RSS below its memory limit, no worker replaced",
               f"{worker_peak:.0f} MiB peak of {limit_mb:.0f} MiB", worker_peak < limit_mb and not dask["workers_replaced"])
    res.target("dask-time", f"wall time of the analysis, {args.workers} workers vs one process (informational)",
               f"{dask['seconds']:.1f} s vs {single['seconds']:.1f} s", None,
               note=f"cluster start {dask['cluster_start_seconds']:.1f} s not included")
    res.target("dask-rss", "peak RSS: single process vs client + largest worker (informational)",
               f"{single['peak_rss_mb']:.0f} MiB vs {dask['client_peak_rss_mb']:.0f} + {worker_peak:.0f} MiB", None)
    res.save()
    if not identical:
        raise SystemExit("analysis.json differs between the Dask and the single-process analysis")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        import warnings

        warnings.filterwarnings("ignore")
        if mode == "single":
            out = child_single(*rest)
        else:
            out = child_dask(rest[0], rest[1], int(rest[2]), rest[3])
        print(json.dumps(out), flush=True)
    else:
        main()
