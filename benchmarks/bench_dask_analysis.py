"""`crucible-record analyze` in one process vs on a local Dask cluster (`--workers N`).

The run is a synthetic Crucible-3 run recorded by cr.record with the experiment's own fields
(crucible3.engine.fields: W bf16 10,000 x 64 = 1.28 MB a step, h_mean, loss, epoch) and constants
(dead_mask: 30 % of the tokens), --steps steps (800: W is 1.03 GB raw), default layout. W moves
like Adam's updates in bf16 (about half the live and 5 % of the dead entries by +-1e-3 a step).
Synthetic because it is written at the speed of compression, where `crucible-record train` on a
2-core CPU needs minutes. Each child runs the CLI in-process; reported: wall seconds, the child's
own peak RSS (VmHWM) and its largest descendant's (a Dask worker), and whether both analyses
wrote the same analysis.json. On 2 cores the workers compete with the client: the point is
memory (a worker holds one block whatever the run's length) and equality, not speed.

    python benchmarks/bench_dask_analysis.py [--rounds 3] [--steps 800] [--workers 2] [--quick]
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import time
from pathlib import Path

import harness

VOCAB, HIDDEN = 10_000, 64


def make_run(path: str, steps: int) -> None:
    import torch

    import crucible_record as cr
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.engine import fields

    g = torch.Generator().manual_seed(0)
    config = RunConfig(steps=steps, vocab_size=VOCAB, hidden_dim=HIDDEN, device="cpu")
    dead = torch.rand(VOCAB, generator=g) < 0.3
    W = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).bfloat16()
    p_move = torch.where(dead, 0.05, 0.5)[:, None]
    nan = torch.tensor(float("nan"))
    with cr.record(path, fields(config), steps=steps + 1,
                   attributes={"experiment": "crucible-3", "config": config.to_dict(), "synthetic": True},
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


def child(job: str, run: str, out: str = "", workers: int = 0, steps: int = 0) -> dict:
    if job == "make":
        make_run(run, steps)
        return {}
    from crucible_record.cli import main as cli

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cli(["analyze", run, "--out", out] + (["--workers", str(workers)] if workers else []))
    seconds = time.perf_counter() - started
    vmhwm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    digest = hashlib.sha256(Path(out, "analysis.json").read_bytes()).hexdigest()[:16]
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": seconds, "peak_rss_mb": vmhwm / 1024, "analysis_json": digest,
            "largest_child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    steps = 70 if args.quick else args.steps
    res = harness.Result("dask_analysis", args)
    scratch = args.scratch / f"crucible-bench-dask-{os.getpid()}"
    try:
        run = str(scratch / "run")
        harness.run_child(__file__, {"job": "make", "run": run, "steps": steps})
        variants = {"one process": {"job": "analyze", "run": run, "out": str(scratch / "single")},
                    f"dask, {args.workers} workers": {"job": "analyze", "run": run, "out": str(scratch / "dask"),
                                                      "workers": args.workers}}
        runs = harness.compare(__file__, variants, "one process", args,
                               baseline_spec=lambda s: {**s, "out": s["out"] + "-base"})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    label = f"analyze, W {steps + 1} x {VOCAB} x {HIDDEN} bf16 ({(steps + 1) * VOCAB * HIDDEN * 2 / 1e9:.2f} GB raw)"
    for metric, what in (("wall_s", "wall seconds"), ("peak_rss_mb", "peak RSS of the analyze process, MB"),
                         ("largest_child_rss_mb", "peak RSS of its largest child (a Dask worker), MB")):
        res.table(f"{label}: {what}", harness.summarize(runs, metric, "one process"))
    digests = {x["analysis_json"] for xs in runs.values() for x in xs}
    res.row("analysis.json identical in every run (one process and Dask)", len(digests) == 1)
    res.details["runs"] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
