"""Reproduce the Crucible-3 notebook's Quick Stats and its three answers from a recorded run.

    python examples/reproduce_notebook.py RUN_DIR
    python examples/reproduce_notebook.py --small   # records a small run into runs/ first (seconds)

Works on a run still in progress (committed steps only). W is streamed chunk by chunk, never loaded
whole. The same numbers, with plots, come from `crucible-record analyze RUN_DIR`.
"""

import sys

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3.analysis import analyze, format_quick_stats, quick_stats
from crucible_run_arg import crucible_run  # examples/crucible_run_arg.py: RUN_DIR or --small


def main() -> None:
    traj = open_trajectory(crucible_run(__doc__, "reproduce-notebook"))
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
