"""Read every committed chunk of a run, report damage by field and step range, repair the marker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .blockread import DamagedBlock, read_whole_rows
from .errors import CrucibleError
from .format.blocks import missing_blocks
from .format.schema import COMMIT_KEY, ROWS_GROUP, check_commit, open_group, read_commit, write_commit
from .storage import RunStore, open_store


@dataclass
class VerifyReport:
    steps: int  # committed steps (0 .. steps-1), as the marker says
    sized_steps: int | None = None  # the steps the run was sized for (None: open-ended)
    blocks_read: int = 0
    problems: list[str] = field(default_factory=list)
    # per field: the first step whose block is damaged (what a repair rolls the marker back to)
    first_bad_step: dict[str, int] = field(default_factory=dict)
    constants_damaged: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_run(run_dir: str | Path) -> VerifyReport:
    """Decode every chunk holding committed rows; crc32c checksums catch flipped bits."""
    store = open_store(run_dir)
    group, info = open_group(store)
    steps = read_commit(store, group)["steps"]  # type-checked only: a marker past the arrays is reported below
    report = VerifyReport(steps=steps, sized_steps=info.steps)
    try:
        check_commit(store, group, info, steps)  # (an open-ended run being written is looked at again)
    except CrucibleError:  # rows past an array's end would read as whatever memory held: never data
        held = info.steps_held()
        report.problems.append(f"{COMMIT_KEY} says {steps} steps are committed, but the arrays hold only {held}")
        report.first_bad_step[COMMIT_KEY] = held
        steps = held
    for name, spec in info.fields.items():
        first = info.first_step.get(name, 0)
        _check_array(store, group[name], name, spec.rows_at(steps - first), report,
                     lambda row, s=spec, f=first: f + row * s.every)
    row_arrays = [f"{ROWS_GROUP}/{name}" for name, spec in info.fields.items() if spec.row_indices is not None]
    for name in info.constants + row_arrays:
        array = group[name]
        bad_before = len(report.problems)
        _check_array(store, array, name, array.shape[0] if array.ndim else 1, report, None)
        report.constants_damaged |= len(report.problems) > bad_before
    return report


def _check_array(store: RunStore, array, name: str, rows: int, report: VerifyReport, step_of) -> None:
    unit = (array.shards or array.chunks)[0] if array.ndim else 1
    missing = set(missing_blocks(store, array, array.path, range(rows))) if array.size else set()
    for start in range(0, rows, unit):
        stop = min(start + unit, rows)
        where = f"{name} rows {start}-{stop - 1}" if step_of is None else \
            f"{name} steps {step_of(start)}-{step_of(stop - 1)}"
        problem = None
        if start // unit in missing:
            problem = "chunk file missing"
        else:
            try:  # by shardio where it can, else through zarr
                if not array.ndim:
                    array[...]
                elif read_whole_rows(store, array, name, start, stop) is None:
                    array[start:stop]
                report.blocks_read += 1
            except DamagedBlock as e:  # shardio: checksum mismatch, truncated data
                problem = e.detail
            except Exception as e:  # zarr's codec errors, likewise
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                problem = f"{type(e).__name__}: {text}"
        if problem:
            report.problems.append(f"{where}: {problem}")
            if step_of is not None and name not in report.first_bad_step:
                report.first_bad_step[name] = step_of(start)


def repair_run(run_dir: str | Path) -> tuple[int, int]:
    """Move the commit marker back to the last step before the first damaged block of any field,
    so the run can be resumed from there. Returns (steps before, steps after)."""
    report = verify_run(run_dir)
    if report.ok:
        return report.steps, report.steps
    if report.constants_damaged:
        raise CrucibleError(f"{run_dir}: a constant or row-index array is damaged; the marker cannot repair that")
    store = open_store(run_dir, read_only=False)
    group, info = open_group(store)
    if info.version < 2:
        raise CrucibleError(f"{run_dir} is a format-1 run: repair needs format 2")
    with store.writer_lock():
        store.claim_existing()
        # never past what the arrays hold, nor past the marker itself
        steps = min(*report.first_bad_step.values(), info.steps_held(), report.steps)
        write_commit(store, steps)
    return report.steps, steps


