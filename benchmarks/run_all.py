"""Run every benchmark, one after another, then regenerate benchmarks/README.md.

    python benchmarks/run_all.py [--quick] [--only speed,hf_overhead] [--baseline-src DIR]

Each benchmark writes results/<name>.json (results/quick/ with --quick); a failure is reported and
the others still run (exit 1 if any failed). --baseline-src is passed to every benchmark.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # name -> the script and its arguments
    "speed": ["bench_speed.py"],
    "hf_overhead": ["bench_hf_overhead.py", "--crucible"],
    "memory": ["bench_memory.py"],
    "multirank": ["bench_multirank.py"],
    "fsdp": ["bench_fsdp.py"],
    "s3": ["bench_s3.py"],
    "dask_analysis": ["bench_dask_analysis.py"],
    "first_line": ["bench_first_line.py"],
    "view": ["bench_view.py"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated: " + ", ".join(BENCHMARKS))
    p.add_argument("--baseline-src", default=None)
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    failed = []
    for name in names:
        script, *extra = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), *extra, *(["--quick"] if args.quick else []),
               *(["--baseline-src", args.baseline_src] if args.baseline_src else [])]
        print("===", " ".join(cmd[1:]), flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(name)
    subprocess.call([sys.executable, str(HERE / "make_readme.py"), *(["--quick"] if args.quick else [])])
    print(f"failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
