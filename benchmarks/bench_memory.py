"""Peak memory of `crucible-record train`, `export` and `analyze` for a run 10x longer: it must not grow.

Each child runs the CLI in-process (``crucible_record.cli.main``) on a small Crucible-3 config
(vocab 10,000 x hidden 64, batch 4 x seq 16, CPU) and reports its own peak RSS (VmHWM of its
address space; wait4's ru_maxrss would include the parent's at fork time). train: a fresh run of
--steps and of 10x --steps; export and analyze: of two runs of those lengths, trained once before
the rounds. Memory should be bounded by the block size and the queue depth, never by the number
of steps: the rows give the growth from the short run to the long one.

    python benchmarks/bench_memory.py [--rounds 3] [--steps 70] [--quick] [--baseline-src DIR]
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import harness

SMALL = ["--batch-size", "4", "--seq-len", "16", "--hidden-dim", "64", "--device", "cpu", "--no-progress"]


def child(command: str, steps: int, run: str, time_chunk: int) -> dict:
    from crucible_record.cli import main as cli

    if command == "train":
        shutil.rmtree(run, ignore_errors=True)
        cli(["train", *SMALL, "--steps", str(steps), "--time-chunk", str(time_chunk), "--out", run])
    else:
        out = run + f"-{command}-{os.getpid()}"
        cli([command, run, "--out", out])
        shutil.rmtree(out, ignore_errors=True)
    status = Path("/proc/self/status").read_text().splitlines()
    return {"peak_rss_mb": next(int(x.split()[1]) for x in status if x.startswith("VmHWM")) / 1024}


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--steps", type=int, default=70, help="the short run's steps (the long one: 10x) [70]")
    p.add_argument("--time-chunk", type=int, default=64)
    args = p.parse_args()
    short, tc = (10, 8) if args.quick else (args.steps, args.time_chunk)
    res = harness.Result("memory", args)
    scratch = args.scratch / f"crucible-bench-memory-{os.getpid()}"
    try:
        variants = {}
        for n in (short, 10 * short):
            run = str(scratch / f"run{n}")
            harness.run_child(__file__, {"command": "train", "steps": n, "run": run, "time_chunk": tc})
            variants[f"train {n} steps"] = {"command": "train", "steps": n, "run": str(scratch / f"t{n}"), "time_chunk": tc}
            for command in ("export", "analyze"):
                variants[f"{command} {n} steps"] = {"command": command, "steps": n, "run": run, "time_chunk": tc}
        runs = harness.compare(__file__, variants, f"train {short} steps", args,
                               baseline_spec=lambda s: {**s, "run": s["run"] + "-base"} if s["command"] == "train" else s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = harness.summarize(runs, "peak_rss_mb", f"train {short} steps")
    res.table(f"peak RSS, MB (blocks of {tc} steps)", table)
    for command in ("train", "export", "analyze"):
        for suffix in ("", harness.BASE) if args.baseline_src else ("",):
            rows = table["rows"]
            growth = rows[f"{command} {10 * short} steps{suffix}"]["median"] - rows[f"{command} {short} steps{suffix}"]["median"]
            res.row(f"{command}{suffix}: peak RSS growth from {short} to {10 * short} steps", round(growth, 1), " MB")
    res.details["runs"] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
