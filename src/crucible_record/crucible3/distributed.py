"""The streaming pass over W on a Dask cluster (``crucible-record analyze RUN --scheduler/--workers``).

One task per stored block of W runs the very same per-block code as ``analysis.scan_W`` and the
client combines the partials in block order, so the WScan is bit-identical to the single-process one
(path lengths come back as per-group partial sums to keep the same rounding). Tasks get plain values
only (the run's location, a row range, the dead mask) and reopen the field themselves: no store or
credential is pickled, and the committed prefix is the one read when the graph was built. Each task
also decodes the previous shard for the row before its block: twice the decompression of one process.
A ``memory://`` run lives inside one process: workers cannot open it, so it is refused.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..errors import CrucibleError
from .analysis import ScanParts, WScan
from .trajectory import Trajectory

CONNECT_TIMEOUT_S = 10.0  # how long to try to reach a --scheduler before giving up
# A LocalCluster's scheduler serves HTTP even without a dashboard, on 8787 by default: a free local port.
NO_DASHBOARD = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}


# --- On the workers ---


def scan_block(location: str, start: int, stop: int, dead: np.ndarray, keep_last: bool) -> dict[str, Any]:
    """One task: rows [start, stop) of W and the row before (for the transitions across the block
    boundary), read afresh from ``location``; numpy arrays only come back."""
    from ..blockread import read_rows

    bits = read_rows(location, "W", start - 1 if start else start, stop)
    rows = dtypes.from_stored(torch.from_numpy(bits), torch.bfloat16)
    groups: list[torch.Tensor] = []
    parts = ScanParts(torch.from_numpy(np.ascontiguousarray(dead, dtype=bool)), path_groups=groups)
    parts.block(rows[1:] if start else rows, rows[0] if start else None)
    return {
        "start": start,
        "stop": stop,
        **{key: value.numpy() for key, value in parts.arrays().items()},
        "path_parts": torch.stack(groups).numpy() if groups else np.zeros((0, rows.shape[1]), dtype=np.float64),
        # copies: a view would keep the whole block alive in the worker's memory with the result
        "first": bits[0].copy() if start == 0 else None,
        "last": bits[-1].copy() if keep_last else None,
    }


# --- On the client ---


def block_ranges(traj: Trajectory, block: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) row ranges of W over the committed steps: whole stored shards by default."""
    array = traj.W.array
    unit = block or (array.shards or array.chunks)[0]
    if unit < 1:
        raise CrucibleError(f"block must be at least 1 step, got {unit}")
    n_rows = traj.steps + 1
    return [(start, min(start + unit, n_rows)) for start in range(0, n_rows, unit)]


def build_tasks(traj: Trajectory, block: int | None = None) -> list:
    """The graph: one ``dask.delayed`` task per block, in block order."""
    import dask
    from dask.base import tokenize

    location = str(traj.location)
    if location.lower().startswith("memory:"):
        raise CrucibleError(f"{location} is an in-process memory:// run: Dask workers cannot open it; "
                            f"analyse it without --scheduler/--workers")
    ranges = block_ranges(traj, block)
    dead = traj.dead_mask.bool().numpy().copy()
    token = tokenize(location, traj.steps, ranges, dead)
    dead_key = dask.delayed(dead, name=f"crucible-dead-mask-{token}")
    last = len(ranges) - 1
    return [dask.delayed(scan_block, pure=True)(location, start, stop, dead_key, i == last,
                                                dask_key_name=f"crucible-scan-W-{token}-{i}")
            for i, (start, stop) in enumerate(ranges)]


def scan_W_dask(traj: Trajectory, client, block: int | None = None) -> WScan:
    """``analysis.scan_W`` on ``client``'s cluster; any task failure other than a CrucibleError
    becomes a one-line CrucibleError naming the rows."""
    from distributed import as_completed

    tasks = build_tasks(traj, block)
    ranges = block_ranges(traj, block)
    futures = client.compute(tasks)
    order = {future.key: i for i, future in enumerate(futures)}
    parts = ScanParts(traj.dead_mask)
    first = last = None
    done: dict[int, dict[str, Any]] = {}
    wanted = 0
    try:
        for future in as_completed(futures):
            i = order[future.key]
            try:
                done[i] = future.result()
            except CrucibleError:
                raise  # already one line for the user (e.g. a damaged chunk)
            except Exception as e:  # e.g. a worker that cannot see the run, or died (KilledWorker)
                start, stop = ranges[i]
                raise CrucibleError(f"reading W rows {start}-{stop - 1} of {traj.location} on a Dask worker failed: "
                                    f"{_one_line(e)} (the workers must reach the run at that same path or URL)"
                                    ) from e
            future.release()
            while wanted in done:  # combine in block order, as scan_W does
                part = done.pop(wanted)
                for key, out in (("centroid_dead", parts.c_dead), ("centroid_live", parts.c_live),
                                 ("changed_dead", parts.ch_dead), ("changed_live", parts.ch_live)):
                    if len(part[key]):
                        out.append(torch.from_numpy(part[key]))
                for group in torch.from_numpy(part["path_parts"]):
                    parts.path += group
                if part["first"] is not None:
                    first = dtypes.from_stored(torch.from_numpy(part["first"]), torch.bfloat16)
                if part["last"] is not None:
                    last = dtypes.from_stored(torch.from_numpy(part["last"]), torch.bfloat16)
                wanted += 1
    finally:
        client.cancel([f for f in futures if not f.done()])
    if first is None or last is None:
        raise CrucibleError(f"{traj.location} has no committed step of W")
    return parts.result(first, last)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` of the scheduler at ``scheduler``, or of a LocalCluster of ``workers``
    processes started here. The workers are spawned: a calling script must guard its entry point."""
    if scheduler is not None and workers is not None:
        raise CrucibleError("pass either a Dask scheduler address or a number of local workers, not both")
    if scheduler is None and workers is None:
        raise CrucibleError("a Dask scheduler address or a number of local workers is needed")
    try:
        import distributed
    except ImportError:
        raise CrucibleError("analysis on a Dask cluster needs dask.distributed: "
                            "pip install 'crucible-record[dask]'") from None
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise CrucibleError(f"the number of Dask workers must be a positive integer, got {workers!r}")
        environ = dict(os.environ)
        try:
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, memory_limit="auto",
                                               scheduler_kwargs=NO_DASHBOARD)
        except Exception as e:
            raise CrucibleError(f"cannot start a local Dask cluster of {workers} workers: {_one_line(e)}") from None
        finally:  # LocalCluster sets OMP_NUM_THREADS=1 (and more) in this process's environment for
            os.environ.clear()  # its workers; every later subprocess would inherit it (a training run
            os.environ.update(environ)  # with 1 thread computes other numbers): leave ours as it was
        try:
            with distributed.Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    address = str(scheduler).strip()
    failure = None
    try:
        client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S)
    except Exception as e:
        failure = _one_line(e)
    if failure is not None:
        # The half-built Client's __del__, left to a later collection, can deadlock on distributed's
        # loop lock inside the next Client: collect it here, and raise outside the except block.
        gc.collect()
        raise CrucibleError(f"cannot connect to the Dask scheduler at {address}: {failure}")
    try:
        try:  # a scheduler without workers would leave the graph waiting forever
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except Exception:
            raise CrucibleError(f"the Dask scheduler at {address} has no workers "
                                f"(none joined within {CONNECT_TIMEOUT_S:g} s)") from None
        yield client
    finally:
        client.close()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
