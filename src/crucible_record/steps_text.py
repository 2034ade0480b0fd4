"""One wording of how far a run got, shared by every command (train, info, verify, analyze, export).
A Crucible-3 run records step 0 as the initial state, so its recorded steps 0..T are T training steps.
"""

from __future__ import annotations


def steps_committed(committed: int, *, of: int | None = None, training: bool = False) -> str:
    """``committed`` recorded steps (of ``of`` planned; None = open-ended) as one phrase.

    >>> steps_committed(21, of=21, training=True)
    'steps 0..20 committed (20 of 20 training steps)'
    >>> steps_committed(7)
    'steps 0..6 committed (7 steps, open-ended)'
    """
    if committed <= 0:
        return "no steps committed"
    count, planned, unit = (committed - 1, of - 1 if of else None, "training steps") if training else (committed, of, "steps")
    return f"steps 0..{committed - 1} committed ({count} {unit}, open-ended)" if planned is None else \
        f"steps 0..{committed - 1} committed ({count} of {planned} {unit})"
