"""Target 7: export to safetensors, throughput and memory vs run length.

export_safetensors(cr.open(run), out_dir) on the recorded run (all committed steps, stated):
MB/s of raw tensor data written, split into the time spent reading/decoding W (the same block
reads, timed alone) and the rest (conversion + file writes). Memory: `crucible-record export`
in subprocesses (peak RSS = VmHWM of the child) of a prefix of the run (about a tenth of the steps: a
hard-linked copy whose commit marker says fewer steps) and of the whole run.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_RUN_NOTE, Result, parser, prefix_copy, r, recorded_run, run_module_child, scratch_dir  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--max-wait", type=float, default=0, help="seconds to wait for the run to reach 500 steps")
    args = p.parse_args()
    res = Result("export", args.quick)
    import crucible_record as cr
    from crucible_record.crucible3.export import export_safetensors

    t = recorded_run(args, 500, args.max_wait)
    if getattr(args, "quick_run", False):
        res.smoke_note = QUICK_RUN_NOTE
    steps = t.steps
    with scratch_dir("export") as d:
        if args.quick:  # a prefix of 64 steps stands in for the whole run
            steps = min(steps, 64)
            t = cr.open(prefix_copy(args.run, d / "quickrun", steps))
        raw_w = (steps + 1) * t.W.shape[1] * t.W.shape[2] * 2
        # 1. throughput, in process
        t0 = time.perf_counter()
        target, meta = export_safetensors(t, d / "out")
        export_s = time.perf_counter() - t0
        size = target.stat().st_size
        # check the exported W against the store (a few steps)
        from safetensors import safe_open

        with safe_open(str(target), framework="np") as f:
            sl = f.get_slice("W")
            exact = all(np.array_equal(sl[s:s + 1][0], t.W.numpy(s)) for s in (0, steps // 2, steps))
        (d / "out" / target.name).unlink()
        # 2. the same W block reads alone
        block = t.W.array.chunks[0]
        t0 = time.perf_counter()
        for a in range(0, steps + 1, block):
            t.W.numpy(slice(a, min(a + block, steps + 1)))
        read_s = time.perf_counter() - t0
        mbps = raw_w / 2**20 / export_s
        res.details["throughput"] = {"steps": steps, "raw_W_MB": r(raw_w / 2**20, 1), "file_MB": r(size / 2**20, 1),
                                     "export_s": r(export_s, 2), "export_MBps": r(mbps, 1),
                                     "reading_W_alone_s": r(read_s, 2), "rest_s": r(export_s - read_s, 2),
                                     "bit_exact_sampled_steps": exact}
        print(f"  export of {steps} steps: {export_s:.2f} s = {mbps:.1f} MB/s raw "
              f"(reading/decoding W alone {read_s:.2f} s)", flush=True)
        # 3. memory vs run length, subprocesses
        short = max(1, steps // 10)
        rss = {}
        for n in (short, steps):
            run = prefix_copy(args.run, d / f"prefix{n}", n)
            out = run_module_child("crucible_record", ["export", str(run), "--out", str(d / f"e{n}")], timeout=900)
            if out["rc"] != 0:
                print(out["output_tail"], flush=True)
                raise SystemExit(f"export of {n} steps failed")
            rss[n] = {"peak_rss_mb": r(out["peak_rss_mb"], 1), "seconds": r(out["seconds"], 2)}
            shutil.rmtree(d / f"e{n}", ignore_errors=True)
            print(f"  `crucible-record export` of {n} steps: peak RSS {out['peak_rss_mb']:.1f} MB, {out['seconds']:.1f} s",
                  flush=True)
        res.details["memory"] = rss
    growth = rss[steps]["peak_rss_mb"] - rss[short]["peak_rss_mb"]
    res.target("7a", f"export >= 500 MB/s of raw tensor data ({steps} steps)", r(mbps, 1), mbps >= 500, unit=" MB/s",
               note=f"reading/decoding W alone takes {read_s / export_s * 100:.0f}% of it; file bit-exact on sampled steps: {exact}")
    block = t.W.array.chunks[0]
    res.target("7b", f"export peak memory flat in run length ({short} -> {steps} steps, <= 32 MB growth)",
               r(growth, 1), growth <= 32 if short >= block else None, unit=" MB",
               note=f"{rss[short]['peak_rss_mb']:.0f} MB -> {rss[steps]['peak_rss_mb']:.0f} MB"
                    + ("" if short >= block else f"; the shorter export is under one {block}-step block (its buffers "
                                                 "are smaller): not the target's test, see the full run"))
    res.save()


if __name__ == "__main__":
    main()
