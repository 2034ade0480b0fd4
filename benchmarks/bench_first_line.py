"""Seconds from starting `crucible-record train` to its first line (the run, the device, the config).

Each child starts ``python -m crucible_record train --preset quick --device DEVICE --out RUN`` and
times its first line of output, then stops it (nothing is trained). The limit is the interpreter's
own start (``python -c pass``); ``import torch`` alone is shown beside it, since before this change
the line came after it. With --baseline-src the same command runs against another checkout.

    python benchmarks/bench_first_line.py [--rounds 10] [--baseline-src DIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import harness


def child(what: str, device: str = "auto") -> dict:
    scratch = os.path.join(tempfile.gettempdir(), f"crucible-bench-first-line-{os.getpid()}")
    command = {"python": [sys.executable, "-c", "print('ok')"],
               "import torch": [sys.executable, "-c", "import torch; print('ok')"],
               "train": [sys.executable, "-m", "crucible_record", "train", "--preset", "quick", "--device", device,
                         "--no-progress", "--out", scratch]}[what]
    t0 = time.perf_counter()
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    seconds = time.perf_counter() - t0
    p.kill()
    p.wait()
    shutil.rmtree(scratch, ignore_errors=True)
    if not line.strip():
        raise SystemExit(f"{what}: no line printed")
    return {"first_line_s": seconds, "line": line.strip()}


def main() -> None:
    args = harness.parser(__doc__, rounds=10).parse_args()
    res = harness.Result("first_line", args)
    variants = {"python -c (the limit)": {"what": "python"}, "import torch": {"what": "import torch"},
                "train, --device auto": {"what": "train"}, "train, --device cpu": {"what": "train", "device": "cpu"}}
    runs = harness.compare(__file__, variants, "python -c (the limit)", args,
                           library=["train, --device auto", "train, --device cpu"],
                           rounds=3 if args.quick else None)
    res.table("seconds to the first line of `train`", harness.summarize(runs, "first_line_s", "python -c (the limit)"))
    res.details["first_lines"] = {name: xs[0]["line"] for name, xs in runs.items()}
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
