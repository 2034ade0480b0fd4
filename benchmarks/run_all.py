"""Run every benchmark, one after another, then regenerate benchmarks/README.md.

    python benchmarks/run_all.py            # full mode
    python benchmarks/run_all.py --quick    # small sizes
    python benchmarks/run_all.py --only speed,overhead

Each benchmark runs in its own process (so RSS and zarr's once-per-process settings start clean)
and writes benchmarks/results/<name>.json (results/quick/<name>.json with --quick), each with the
commit it measured (`git rev-parse HEAD`). A benchmark that fails is reported and the others still
run; the exit code is 1 if any failed. A full run regenerates README.md; --quick leaves it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, extra args). Order: cheap and independent first; the ones that read the recorded
# run last, so it has grown as much as possible by then.
BENCHMARKS = {
    "overhead": ("bench_overhead.py", []),
    "overhead_cuda": ("bench_overhead.py", ["--device", "cuda"]),
    "speed": ("bench_speed.py", []),
    "token_layout": ("bench_token_layout.py", []),
    "codec_path": ("bench_codec_path.py", []),
    "memory": ("bench_memory.py", []),
    "compression": ("bench_compression.py", []),
    "durability": ("bench_durability.py", []),
    "analysis_memory": ("analysis_memory.py", []),
    "dask_analysis": ("bench_dask_analysis.py", []),
    "multirank": ("bench_multirank.py", []),
    "s3": ("bench_s3.py", []),
    "xarray_chunks": ("bench_xarray_chunks.py", []),
    "hf_overhead": ("bench_hf_overhead.py", ["--crucible"]),
}


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHMARKS))
    p.add_argument("--run", default=None, help="recorded run to read (default: /work/runs/default500 or $CRUCIBLE_BENCH_RUN)")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    started = time.perf_counter()
    timings, failed = {}, []
    for name in names:
        script, extra = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), *extra]
        if args.quick:
            cmd.append("--quick")
        if args.run:
            cmd += ["--run", args.run]
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"=== {name}: exit {rc}, {timings[name]} s (total so far {time.perf_counter() - started:.0f} s)", flush=True)
        if rc != 0:
            failed.append(name)
    total = round(time.perf_counter() - started, 1)
    folder = HERE / "results" / ("quick" if args.quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_all.json").write_text(json.dumps(
        {"mode": "quick" if args.quick else "full", "seconds": total, "per_benchmark_s": timings, "failed": failed,
         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_head()}, indent=2) + "\n")
    if not args.quick:  # README.md shows full results; quick ones are a smoke test
        subprocess.call([sys.executable, str(HERE / "make_readme.py")])
    print(f"all done in {total} s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
