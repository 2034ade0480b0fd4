"""Reproduce the Crucible-3 notebook's Quick Stats and its three answers from a recorded run.

    python examples/reproduce_notebook.py RUN_DIR
    python examples/reproduce_notebook.py --small   # records a small run into runs/ first (seconds)

Works on a run still in progress (committed steps only). W is streamed chunk by chunk, never loaded
whole. The same numbers, with plots, come from `crucible-record analyze RUN_DIR`.
"""

import argparse
import sys
import time

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3.analysis import analyze, format_quick_stats, quick_stats


def small_run(out, name: str) -> str:
    """--small: record a small Crucible-3 run first (20 steps of a narrow model, seconds on a CPU)."""
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    out = out or time.strftime(f"runs/{name}-%Y%m%d-%H%M%S")
    print(f"recording a small Crucible-3 run into {out}")
    config = RunConfig(steps=20, batch_size=4, seq_len=16, hidden_dim=16, num_layers=1, device="cpu")
    start_run(config, out, layout=Layout(time_chunk=8), progress=False)
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a Crucible-3 run (crucible-record train)")
    p.add_argument("--small", action="store_true", help="record a small Crucible-3 run first (seconds on a CPU) and use it")
    p.add_argument("--out", help="with --small: the new run's directory (default: runs/reproduce-notebook-<date>-<time>)")
    args = p.parse_args()
    if (args.run_dir is None) == (not args.small):
        p.error("give a RUN_DIR, or --small to record a small run first (not both)")
    if args.out and not args.small:
        p.error("--out goes with --small")
    return args


def main() -> None:
    args = parse_args()
    traj = open_trajectory(small_run(args.out, "reproduce-notebook") if args.small else args.run_dir)
    print("=" * 60 + "\nCRUCIBLE 3 STATS\n" + "=" * 60)
    print(format_quick_stats(traj, quick_stats(traj)))

    summary = analyze(traj)["summary"]  # needs at least 2 committed steps
    for key in ("h_mean_persistence", "centroid_separation", "h_mean_alignment"):  # the notebook's 3 questions
        q = summary[key]
        print(f"\n{q['question']}  {q['answer']}\n  {q['evidence']}")


if __name__ == "__main__":
    try:
        main()
    except cr.CrucibleError as e:  # e.g. not a run, or an existing run at --out: one line, no traceback
        sys.exit(f"error: {e}")
