"""`python -m _export_patched ARGS` = `crucible-record ARGS` with one change to export._write_w:
each W block is written from its buffer (no .tobytes() copy) and released before the next block is
read. Used by bench_memory.py to measure a proposed src change without editing src/."""

import numpy as np

import crucible_record.crucible3.export as export


def _write_w(traj, f) -> None:
    if hasattr(export, "limit_heap_growth"):
        export.limit_heap_growth()
    block = traj.group["W"].chunks[0]
    for start in range(0, traj.steps + 1, block):
        stop = min(start + block, traj.steps + 1)
        bits = np.ascontiguousarray(traj.W.numpy(slice(start, stop))).astype("<u2", copy=False)
        f.write(memoryview(bits).cast("B"))
        del bits


export._write_w = _write_w

if __name__ == "__main__":
    from crucible_record.cli import main

    main()
