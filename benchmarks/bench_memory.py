"""Target 5 (and 7's memory half): peak RSS of `crucible-record train` / `export` vs run length.

Runs the real CLI (python -m crucible_record) in subprocesses with a small config
(--batch-size 4 --seq-len 16 --hidden-dim 64) for N and 10*N steps, and reads each child's own
peak RSS (VmHWM of its address space, written at exit; wait4's ru_maxrss is kept for reference but
on Linux it includes the parent's RSS at fork time). Memory should be bounded by the chunk size and the queue depth, never by
the number of steps: the target is growth <= 32 MB for 10x the steps, for train and for export.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, parser, r, run_module_child, scratch_dir  # noqa: E402

SMALL = ["--batch-size", "4", "--seq-len", "16", "--hidden-dim", "64"]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--time-chunk", type=int, default=None,
                   help="pass --time-chunk to train (results go to memory_time_chunk_N.json) [default: the CLI's]")
    args = p.parse_args()
    res = Result("memory" if args.time_chunk is None else f"memory_time_chunk_{args.time_chunk}", args.quick)
    tc = [] if args.time_chunk is None else ["--time-chunk", str(args.time_chunk)]
    # The short run must hold at least one whole block of steps: a run shorter than --time-chunk
    # gets a smaller block (the chunk is clamped to the run), which would compare block sizes.
    from _common import src_layout

    block = args.time_chunk or src_layout().time_chunk
    short = 10 if args.quick else max(30, block + 6)
    lengths = [short, 10 * short]
    rows = {}
    with scratch_dir("memory") as d:
        for n in lengths:
            run = d / f"run{n}"
            tr = run_module_child("crucible_record", ["train", *SMALL, *tc, "--steps", str(n), "--device", "cpu",
                                                      "--no-progress", "--out", str(run)], timeout=900)
            ex = run_module_child("crucible_record", ["export", str(run), "--out", str(d / f"export{n}")], timeout=900)
            for label, out in (("train", tr), ("export", ex)):
                if out["rc"] != 0:
                    print(out["output_tail"], flush=True)
                    raise SystemExit(f"{label} of {n} steps failed (rc {out['rc']})")
            rows[n] = {"train": {k: r(v, 2) if isinstance(v, float) else v for k, v in tr.items() if k != "output_tail"},
                       "export": {k: r(v, 2) if isinstance(v, float) else v for k, v in ex.items() if k != "output_tail"}}
            print(f"  {n:4d} steps: train peak RSS {tr['peak_rss_mb']:.1f} MB ({tr['seconds']:.1f} s), "
                  f"export peak RSS {ex['peak_rss_mb']:.1f} MB ({ex['seconds']:.1f} s)", flush=True)
        # where does export memory stop growing? prefixes of the long run (hard links, same chunks)
        from _common import prefix_copy

        plateau = {}
        for n in sorted({short, 3 * short + 1, 10 * short}):
            run = prefix_copy(d / f"run{10 * short}", d / f"prefix{n}", n) if n != 10 * short else d / f"run{n}"
            ex = run_module_child("crucible_record", ["export", str(run), "--out", str(d / f"pexport{n}")], timeout=900)
            plateau[n] = r(ex["peak_rss_mb"], 1) if ex["rc"] == 0 else f"failed: {ex['output_tail'][-200:]}"
        res.details["export_peak_rss_mb_by_prefix_of_the_long_run"] = plateau
        print(f"  export peak RSS by prefix of the {10 * short}-step run: {plateau}", flush=True)
    res.details["runs"] = rows
    res.details["config"] = " ".join(SMALL + tc) + " (vocab 10000, default corpus)"
    from _common import src_layout

    res.details["time_chunk"] = args.time_chunk or src_layout().time_chunk
    a, b = lengths
    suffix = "" if args.time_chunk is None else f"-{args.time_chunk}"
    for id_, what in (("5a" + suffix, "train"), ("5b" + suffix, "export")):
        growth = rows[b][what]["peak_rss_mb"] - rows[a][what]["peak_rss_mb"]
        note = f"{rows[a][what]['peak_rss_mb']:.0f} MB -> {rows[b][what]['peak_rss_mb']:.0f} MB"
        if what == "export":
            note += f"; prefixes of the long run: {res.details['export_peak_rss_mb_by_prefix_of_the_long_run']} MB"
        if args.quick:  # 10 steps fill less than one block, so the buffers are smaller: not the target's test
            note += f"; quick mode: the shorter run is under one {block}-step block, see the full run for the target"
        res.target(id_, f"peak RSS of `crucible-record {what}` grows <= 32 MB for 10x steps ({a} -> {b}, "
                        f"time chunk {res.details['time_chunk']})",
                   r(growth, 1), None if args.quick else growth <= 32, unit=" MB", note=note)
    res.save()


if __name__ == "__main__":
    main()
