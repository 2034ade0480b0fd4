"""A GPT-2-size embedding (50257 x 768 bf16, 77 MB a step) recorded while a GPT-2-shaped model trains.

The model is examples/gpt2_embedding.py's (12 layers, batch 16 x seq 256, bf16). Variants, each a
fresh process (harness: interleaved rounds, A/A control):
    none      unrecorded
    every     wte every step
    rows      2,000 rows of wte (a fixed random sample), every step
    every10   wte every 10 steps
Each runs --warmup unmeasured steps, then --steps measured ones, with a device sync every step
(so a step's time holds the GPU's work and any wait for the writer). Reported: steps/s over the
measured steps; step-time p50/p99/max; host cores busy (process CPU seconds / wall); the seconds
training waited for a free staging slot (rec.stall_seconds) and the steps still queued at the
end (rec.backlog).

    python benchmarks/bench_gpu_embedding.py --device cuda            # a GPU machine (gpu_check.sh)
    python benchmarks/bench_gpu_embedding.py --device cpu --quick     # seconds on a CPU: a dry run
"""

from __future__ import annotations

import resource
import shutil
import statistics
import sys
import time

import harness

GPT2 = dict(vocab=50257, hidden=768, layers=12, heads=12, seq_len=256, batch_size=16)
SMALL = dict(vocab=1000, hidden=32, layers=2, heads=2, seq_len=32, batch_size=4)


def child(variant: str, shape: dict, device: str, warmup: int, steps: int, folder: str) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(harness.ROOT / "examples"))
    from gpt2_embedding import GPT, synthetic_batch  # the example's model, not a copy

    import crucible_record as cr

    V, H = shape["vocab"], shape["hidden"]
    torch.manual_seed(0)
    model = GPT(V, H, shape["layers"], shape["heads"], shape["seq_len"]).to(device, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:min(2000, V)].sort().values
    every = 10 if variant == "every10" else 1
    wte = {"every": cr.Field((V, H), torch.bfloat16), "rows": cr.Field((V, H), torch.bfloat16, rows=sample),
           "every10": cr.Field((V, H), torch.bfloat16, every=10)}.get(variant)
    shutil.rmtree(folder, ignore_errors=True)
    rec = (cr.record(folder, {"wte": wte, "loss": cr.Field((), torch.float32)}, durability="none")
           if wte is not None else None)
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize() if device == "cuda" else None
            t0, usage0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            stall0 = rec.stall_seconds if rec else 0.0
        began = time.perf_counter()
        ids = synthetic_batch(gen, min(512, V), shape["batch_size"], shape["seq_len"]).to(device)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
        if rec is not None:
            rec.record(step, loss=loss.detach(), **({"wte": model.wte.weight} if step % every == 0 else {}))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize() if device == "cuda" else None
        if step >= warmup:
            times.append(time.perf_counter() - began)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    out = {"steps_per_s": steps / wall, "p50_ms": 1e3 * statistics.median(times),
           "p99_ms": 1e3 * sorted(times)[min(len(times) - 1, int(0.99 * len(times)))], "max_ms": 1e3 * max(times),
           "host_cores_busy": cpu / wall, "stall_s": rec.stall_seconds - stall0 if rec else 0.0,
           "backlog_at_end": rec.backlog if rec else 0}
    if rec is not None:
        rec.close()
    shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    import os

    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=100, help="measured steps a run [100; --quick 12]")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured steps a run [10; --quick 2]")
    args = p.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_gpu_embedding: --device cuda and no CUDA device (--device cpu --quick: a dry run)")
    shape = SMALL if args.quick else GPT2
    steps, warmup = (12, 2) if args.quick else (args.steps, args.warmup)
    res = harness.Result("gpu_embedding", args)
    common = {"shape": shape, "device": args.device, "warmup": warmup, "steps": steps,
              "folder": str(args.scratch / f"crucible-bench-gpu-embedding-{os.getpid()}")}
    runs = harness.compare(__file__, {v: {"variant": v, **common} for v in ("none", "every", "rows", "every10")},
                           "none", args)
    label = f"wte {shape['vocab']} x {shape['hidden']} bf16 while a {shape['layers']}-layer GPT trains on {args.device}"
    res.table(f"{label}: steps/s", harness.summarize(runs, "steps_per_s", "none"),
              note="ratio: recorded / unrecorded steps per second")
    for metric in ("p99_ms", "host_cores_busy", "stall_s"):
        res.table(f"{label}: {metric}", harness.summarize(runs, metric, "none"))
    res.details["runs"] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
