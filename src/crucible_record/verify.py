"""Read every committed chunk of a run and report damage by array and step range."""

from __future__ import annotations

from dataclasses import dataclass, field

from .heap import limit_heap_growth
from .store import committed_steps, group_path, missing_blocks, open_store

ARRAYS = ("W", "h_mean", "loss", "dead_mask", "dead_indices")


@dataclass
class VerifyReport:
    steps: int
    blocks_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_run(run_dir) -> VerifyReport:
    """Decode every chunk that holds committed rows; checksums (crc32c) catch flipped bits."""
    limit_heap_growth()
    group = open_store(run_dir)
    steps = committed_steps(group)
    report = VerifyReport(steps=steps)
    rows_of = {"W": steps + 1, "h_mean": steps, "loss": steps + 1}
    for name in ARRAYS:
        array = group[name]
        rows = rows_of.get(name, array.shape[0])
        unit = (array.shards or array.chunks)[0]
        label = "steps" if name in ("W", "loss") else ("h_mean rows" if name == "h_mean" else "rows")
        missing = set(missing_blocks(array, group_path(group) / name, range(rows)))
        for start in range(0, rows, unit):
            stop = min(start + unit, rows)
            where = f"{name} {label} {start}-{stop - 1}"
            if start // unit in missing:
                report.problems.append(f"{where}: chunk file missing")
                continue
            try:
                array[start:stop]
                report.blocks_read += 1
            except Exception as e:  # codec errors: checksum mismatch, truncated data
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                report.problems.append(f"{where}: {type(e).__name__}: {text}")
    return report
