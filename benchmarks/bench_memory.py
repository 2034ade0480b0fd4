"""Target 5 (and 7's memory half): peak RSS of `crucible-record train` / `export` vs run length.

Runs the real CLI (python -m crucible_record) in subprocesses with a small config
(--batch-size 4 --seq-len 16 --hidden-dim 64) for N and 10*N steps, and reads each child's own
peak RSS from wait4(). Memory should be bounded by the chunk size and the queue depth, never by
the number of steps: the target is growth <= 32 MB for 10x the steps, for train and for export.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, parser, r, run_child, scratch_dir  # noqa: E402

SMALL = ["--batch-size", "4", "--seq-len", "16", "--hidden-dim", "64"]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    res = Result("memory", args.quick)
    short = 10 if args.quick else 30
    lengths = [short, 10 * short]
    py = [sys.executable, "-m", "crucible_record"]
    rows = {}
    with scratch_dir("memory") as d:
        for n in lengths:
            run = d / f"run{n}"
            tr = run_child(py + ["train", *SMALL, "--steps", str(n), "--device", "cpu", "--no-progress",
                                 "--out", str(run)], timeout=900)
            ex = run_child(py + ["export", str(run), "--out", str(d / f"export{n}")], timeout=900)
            for label, out in (("train", tr), ("export", ex)):
                if out["rc"] != 0:
                    print(out["output_tail"], flush=True)
                    raise SystemExit(f"{label} of {n} steps failed (rc {out['rc']})")
            rows[n] = {"train": {k: r(v, 2) if isinstance(v, float) else v for k, v in tr.items() if k != "output_tail"},
                       "export": {k: r(v, 2) if isinstance(v, float) else v for k, v in ex.items() if k != "output_tail"}}
            print(f"  {n:4d} steps: train peak RSS {tr['peak_rss_mb']:.1f} MB ({tr['seconds']:.1f} s), "
                  f"export peak RSS {ex['peak_rss_mb']:.1f} MB ({ex['seconds']:.1f} s)", flush=True)
    res.details["runs"] = rows
    res.details["config"] = " ".join(SMALL) + " (vocab 10000, default corpus)"
    a, b = lengths
    for id_, what in (("5a", "train"), ("5b", "export")):
        growth = rows[b][what]["peak_rss_mb"] - rows[a][what]["peak_rss_mb"]
        res.target(id_, f"peak RSS of `crucible-record {what}` grows <= 32 MB for 10x steps ({a} -> {b})",
                   r(growth, 1), growth <= 32, unit=" MB",
                   note=f"{rows[a][what]['peak_rss_mb']:.0f} MB -> {rows[b][what]['peak_rss_mb']:.0f} MB")
    res.save()


if __name__ == "__main__":
    main()
