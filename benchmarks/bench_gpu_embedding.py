"""A GPT-2-size embedding (50257 x 768 bf16, 77 MB a step) recorded while a GPT-2-shaped model trains.

Issue 16's GPU measurement: the steps per second with and without recording, the writer threads
used, the host cores busy, and whether the writer keeps up (time training waited for a free staging
slot, the steps still queued at the end), for three ways of recording wte:

    none      unrecorded (the baseline), twice: A then A again at the end (the A/A control)
    every     wte every step
    rows      2,000 rows of wte (a fixed random sample), every step
    every10   wte every 10 steps

Each variant runs --warmup unmeasured steps, then --steps measured ones, in this process, on one
model (its weights keep training: recording never changes them). Times per step are host
wall-clock between record() calls with a device sync every step (so they include the GPU's work
and any wait for the writer); "steps/s" is measured steps over the measured wall, and
"until committed" adds close() (the writer finishing the backlog). Host cores busy = process CPU
seconds (all threads) / wall seconds over the measured steps.

    python benchmarks/bench_gpu_embedding.py --device cuda            # on a GPU machine (gpu_check.sh)
    python benchmarks/bench_gpu_embedding.py --device cpu --small     # seconds on a CPU: a dry run

Writes benchmarks/results/gpu_embedding.json (results/quick/ with --small).
"""

from __future__ import annotations

import math
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import SCRATCH, Result, parser, r

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt2_embedding import GPT, synthetic_batch  # noqa: E402  (the example's model, not a copy)

import crucible_record as cr  # noqa: E402

GPT2 = dict(vocab=50257, hidden=768, layers=12, heads=12, seq_len=256, batch_size=16)
SMALL = dict(vocab=1000, hidden=32, layers=2, heads=2, seq_len=32, batch_size=4)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, model, optimizer, gen, shape: dict, device: str, warmup: int, steps: int,
                sample: torch.Tensor, writer_threads: int | None) -> dict:
    V, H = shape["vocab"], shape["hidden"]
    dtype = model.wte.weight.dtype
    fields = {"loss": cr.Field((), torch.float32)}
    if name == "every":
        fields["wte"] = cr.Field((V, H), dtype)
    elif name == "rows":
        fields["wte"] = cr.Field((V, H), dtype, rows=sample)
    elif name == "every10":
        fields["wte"] = cr.Field((V, H), dtype, every=10)
    recorded = "wte" in fields
    run = SCRATCH / f"bench_gpu_embedding_{name}"
    shutil.rmtree(run, ignore_errors=True)
    rec = cr.record(run, fields, durability="none", writer_threads=writer_threads) if recorded else None
    times: list[float] = []
    try:
        for step in range(warmup + steps):
            if step == warmup:
                sync(device)
                t0, c0 = time.perf_counter(), cpu_seconds()
                stalls0 = rec.stall_seconds if rec else 0.0
            began = time.perf_counter()
            ids = synthetic_batch(gen, min(512, V), shape["batch_size"], shape["seq_len"]).to(device)
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
            if rec is not None:
                tensors = {"loss": loss.detach()}
                if fields["wte"].due(step):
                    tensors["wte"] = model.wte.weight
                rec.record(step, **tensors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - began)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
        backlog = rec.backlog if rec else 0
        stall = (rec.stall_seconds - stalls0) if rec else 0.0
        threads = rec.writer_threads if rec else None
        if rec is not None:
            rec.close()
        committed_wall = time.perf_counter() - t0
    finally:
        if rec is not None:
            rec.close()
        shutil.rmtree(run, ignore_errors=True)
    ordered = sorted(times)
    wte = fields.get("wte")
    raw = 0 if wte is None else (math.prod(wte.stored_shape) * wte.dtype.itemsize
                                 * sum(wte.due(s) for s in range(warmup, warmup + steps)))
    return {
        "variant": name, "steps": steps, "steps_per_s": r(steps / wall, 2), "wall_s": r(wall),
        "until_committed_s": r(committed_wall), "writer_threads": threads,
        "host_cores_busy": r(cpu / wall, 2), "stall_s": r(stall), "backlog_at_end": backlog,
        "recorded_MB": r(raw / 1e6, 1), "recorded_MBps": r(raw / 1e6 / wall, 1),
        "step_ms": {"p50": r(1e3 * statistics.median(ordered), 2),
                    "p99": r(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
                    "max": r(1e3 * ordered[-1], 2)},
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--small", action="store_true", help="tiny model and 12 steps: a dry run on a CPU")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant [100; --small 12]")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps per variant [10; --small 2]")
    p.add_argument("--writer-threads", type=int, default=None, help="[the recorder's default for the device]")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_embedding: --device cuda and no CUDA device (use --device cpu --small for a dry run)")
    shape = SMALL if args.small else GPT2
    steps = args.steps or (12 if args.small else 100)
    warmup = args.warmup or (2 if args.small else 10)
    res = Result("gpu_embedding", args.small)
    if args.small:
        res.smoke_note = "not judged: --small (a dry run of the script, not the GPT-2 size)"

    torch.manual_seed(0)
    model = GPT(shape["vocab"], shape["hidden"], shape["layers"], shape["heads"], shape["seq_len"])
    model = model.to(args.device, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(shape["vocab"], generator=torch.Generator().manual_seed(1))[:min(2000, shape["vocab"])]
    sample = sample.sort().values
    rows = []
    for name in ("none", "every", "rows", "every10", "none"):
        row = run_variant(name, model, optimizer, gen, shape, args.device, warmup, steps, sample, args.writer_threads)
        rows.append(row)
        print(f"  {name:8s} {row['steps_per_s']:8.2f} steps/s  step p50 {row['step_ms']['p50']} ms "
              f"p99 {row['step_ms']['p99']} max {row['step_ms']['max']}  cores {row['host_cores_busy']}  "
              f"writer threads {row['writer_threads']}  stall {row['stall_s']} s  backlog {row['backlog_at_end']}",
              flush=True)
    res.details.update(shape=shape, device=args.device, warmup=warmup, rows=rows,
                       gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    base = statistics.median([rows[0]["steps_per_s"], rows[-1]["steps_per_s"]])
    res.target("aa", "A/A control: unrecorded steps/s, last run / first", r(rows[-1]["steps_per_s"] / rows[0]["steps_per_s"]),
               None, "x")
    for row in rows[1:-1]:
        ratio = r(base / row["steps_per_s"])
        res.target(f"wte_{row['variant']}", f"{row['variant']}: unrecorded / recorded steps/s (<= 1.05)", ratio,
                   ratio <= 1.05, f"writer keeps up: {row['stall_s'] == 0 and row['backlog_at_end'] == 0}", "x")
    res.save()


if __name__ == "__main__":
    main()
