"""Keep streaming passes from growing the process's memory through heap fragmentation.

glibc raises its mmap threshold to 32 MiB after the first large free; the per-block temporaries of
a streaming pass (decoded chunks, float32 copies) then come from the heap, fragment it, and RSS grows
with every block although nothing is kept. Serving allocations of 1 MiB and more with mmap returns
them to the OS at once. Process-wide, done once; skipped off glibc or when MALLOC_MMAP_THRESHOLD_
is set (benchmarks/analysis_memory.py and benchmarks/bench_memory.py measure the effect).
"""

from __future__ import annotations

import os
import sys

_MMAP_THRESHOLD = 1 << 20
_done = False


def limit_heap_growth() -> None:
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _done = True
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] == "glibc":
            ctypes.CDLL(None).mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, ValueError):
        pass
