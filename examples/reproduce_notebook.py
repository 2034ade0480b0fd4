"""Reproduce the Crucible-3 notebook's Quick Stats and its three answers from a recorded run.

    python examples/reproduce_notebook.py RUN_DIR

Works on a run still in progress (committed steps only). W is streamed chunk by chunk, never loaded
whole. The same numbers, with plots, come from `crucible-record analyze RUN_DIR`.
"""

import sys

from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3.analysis import analyze, format_quick_stats, quick_stats

traj = open_trajectory(sys.argv[1])
print("=" * 60 + "\nCRUCIBLE 3 STATS\n" + "=" * 60)
print(format_quick_stats(traj, quick_stats(traj)))

summary = analyze(traj)["summary"]  # needs at least 2 committed steps
for key in ("h_mean_persistence", "centroid_separation", "h_mean_alignment"):  # the notebook's 3 questions
    q = summary[key]
    print(f"\n{q['question']}  {q['answer']}\n  {q['evidence']}")
