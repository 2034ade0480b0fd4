"""Peak memory of `crucible-record analyze` for two run lengths: it must stay flat as runs grow.

    python benchmarks/analysis_memory.py [--steps 64 256] [--quick] [--out benchmarks/results/analysis_memory.json]

What it does:
1. Records two runs with crucible_record.crucible3.run.start_run on a small config: the notebook's model
   (vocab 10,000, hidden 64, 2 layers, 2 heads) on the shipped corpus, but batch 4 x seq 16 so that a
   CPU step is fast, CPU device, default layout (blocks of 64 steps x 100 tokens). Only the number of
   steps differs: 64 vs 256 by default (4x apart; W of 65 vs 257 steps, i.e. 1 vs 4 whole blocks of
   64 steps plus one 1-step block). --quick: 16 vs 64 steps in blocks of 8, results in results/quick/.
2. For each run, a fresh subprocess imports everything and opens the run; its RSS then is the
   baseline (interpreter + torch + zarr + matplotlib). It resets the kernel's peak-RSS mark
   (/proc/self/clear_refs), runs the whole analysis (report.analyze_run: the streaming pass over W,
   analysis.json and the PNG plots) and reads the peak RSS (VmHWM in /proc/self/status). The
   difference is what the analysis itself needed. (getrusage's ru_maxrss is only a fallback: on
   Linux it survives exec, so a child may report its parent's peak.) It also records the peak after
   each block of W (``peak_after_block_mb``): it should level off after the first blocks.
3. For contrast, another subprocess does what the notebook does: load W whole (t.W[:]) and compute
   the centroids with .float() on the full tensor. Its peak grows with the run.

Results go to benchmarks/results/analysis_memory.json (with `git rev-parse HEAD`). RSS is what the OS saw, so it includes
allocator slack; tracemalloc is not used because torch's tensor memory bypasses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    # ru_maxrss survives exec on Linux (it may hold the parent's peak): only a fallback
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, run_dir: str, out_dir: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    from crucible_record.crucible3 import open_trajectory
    from crucible_record.crucible3.report import analyze_run

    traj = open_trajectory(run_dir)
    _ = traj.dead_mask, traj.h_mean, traj.loss
    reset = _reset_peak()
    baseline = _status_mb("VmRSS") if reset else _peak_mb()
    trace: list[float] = []
    start = time.perf_counter()
    if mode == "analyze":
        from crucible_record.crucible3 import analysis

        original = analysis.iter_blocks

        def traced(traj, block=None):  # peak so far, after each block has been processed
            for item in original(traj, block):
                yield item
                del item
                trace.append(round(_peak_mb() - baseline, 1))

        analysis.iter_blocks = traced
        analyze_run(run_dir, out_dir)
    elif mode == "naive":  # the notebook's way: the whole W in memory, then float32 centroids
        W_history = traj.W[:]
        centroid_dead = W_history[:, traj.dead_mask, :].float().mean(dim=1)
        centroid_live = W_history[:, traj.live_mask, :].float().mean(dim=1)
        torch.norm(centroid_dead - centroid_live, dim=1)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    print(json.dumps({"baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
                      "analysis_mb": round(peak - baseline, 1), "seconds": round(seconds, 2),
                      **({"peak_after_block_mb": trace} if trace else {}),
                      "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss"}))


def measure(mode: str, run_dir: Path, out_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(run_dir), str(out_dir)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {run_dir} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git_head() -> str | None:
    """The commit measured (`git rev-parse HEAD`, read-only)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="[default: 64 256; --quick: 16 64]")
    parser.add_argument("--quick", action="store_true", help="short runs (16 vs 64 steps), results/quick/")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # run_all.py passes it to every benchmark; unused
    parser.add_argument("--out", type=Path, default=None,
                        help="[default: benchmarks/results/analysis_memory.json, results/quick/ with --quick]")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "RUN_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    args.steps = args.steps or ([16, 64] if args.quick else [64, 256])
    args.out = args.out or HERE / "results" / ("quick" if args.quick else "") / "analysis_memory.json"

    import torch

    import crucible_record
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    layout = Layout(time_chunk=8) if args.quick else Layout()  # quick: both short runs still span several blocks
    results = []
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        for steps in args.steps:
            config = RunConfig(steps=steps, batch_size=4, seq_len=16, device="cpu")
            run_dir = Path(tmp) / f"run{steps}"
            started = time.perf_counter()
            start_run(config, run_dir, layout=layout, checkpoints=False, progress=False)
            train_s = time.perf_counter() - started
            w_raw_mb = (steps + 1) * config.vocab_size * config.hidden_dim * 2 / 2**20
            entry = {
                "steps": steps,
                "W_shape": [steps + 1, config.vocab_size, config.hidden_dim],
                "W_raw_bf16_mb": round(w_raw_mb, 1),
                "train_seconds": round(train_s, 1),
                "analyze": measure("analyze", run_dir, Path(tmp) / f"analysis{steps}"),
                "naive_whole_W": measure("naive", run_dir, Path(tmp) / "unused"),
            }
            results.append(entry)
            print(json.dumps(entry), flush=True)

    doc = {
        "benchmark": "peak RSS of `crucible-record analyze` (report.analyze_run) vs run length",
        "runs_are": "crucible_record.crucible3.run.start_run on RunConfig(steps=N, batch_size=4, seq_len=16, device='cpu'): "
                    "the notebook's model (vocab 10000, hidden 64, 2 layers, 2 heads), shipped corpus, "
                    f"default layout (blocks of {layout.time_chunk} steps x {layout.row_chunk} tokens, "
                    f"codec {layout.codec})",
        "measure": "each mode in a fresh subprocess: RSS after imports + open_trajectory (baseline), then the peak-RSS "
                   "mark is reset (/proc/self/clear_refs) and VmHWM read after the work (peak); "
                   "analysis_mb = peak - baseline; peak_after_block_mb = peak - baseline after each block of W",
        "modes": {
            "analyze": "the full analysis: streaming pass over W, analysis.json and the PNG plots",
            "naive_whole_W": "for contrast, the notebook's way: W loaded whole, then .float() centroids",
        },
        "mode": "quick" if args.quick else "full",
        "commit": _git_head(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "crucible_record": crucible_record.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "results": results,
    }
    if len(results) >= 2:
        a, b = results[0], results[-1]
        doc["ratio_steps"] = round(b["steps"] / a["steps"], 2)
        doc["ratio_analysis_mb"] = round(b["analyze"]["analysis_mb"] / max(a["analyze"]["analysis_mb"], 1e-9), 2)
        doc["ratio_naive_mb"] = round(b["naive_whole_W"]["analysis_mb"] / max(a["naive_whole_W"]["analysis_mb"], 1e-9), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
