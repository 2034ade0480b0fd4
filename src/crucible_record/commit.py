"""Commit strategies: what the writer does once this process's rows of steps 0..n-1 are durable.

* :class:`LocalCommit`: one process moves the commit marker itself.
* :class:`RankCommit`: a rank r > 0 reports its progress in ``.ranks/<r>.json``; rank 0 moves the
  marker (through a LocalCommit) to the smallest progress of all (DCP's coordinator ``finish``) and
  at close writes its verdict.

The marker moves after the open-ended arrays grew, never back. Called on the writer thread only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from .errors import RecorderError
from .fields import Field
from .format.schema import COMMIT_KEY, rank_key, write_commit
from .storage import RunStore

RANK_POLL_S = 0.1  # how often a closing rank reads the others' progress


def committed_text(committed: int) -> str:
    return f"steps 0..{committed - 1} of the run are committed" if committed else "no step of the run is committed"


class LocalCommit:
    """The commit marker of a run, moved by the one process that may: a process recording alone
    (the marker follows its own durable rows), or rank 0 of several (for its RankCommit)."""

    world_size = 1
    failure: BaseException | None = None

    def __init__(self, store: RunStore, fields: Mapping[str, Field], sized: bool, committed: int):
        self.store, self.fields, self.sized = store, fields, sized
        self.committed = committed
        self.arrays: dict[str, Any] = {}  # set once the run's arrays are open (writer.open)

    def move(self, steps: int) -> None:
        """Grow open-ended arrays to `steps` (their zarr.json made durable), then move the marker."""
        if steps <= self.committed:
            return
        keys = []
        if not self.sized:
            for name, spec in self.fields.items():
                array, rows = self.arrays[name], spec.rows_at(steps)
                if array.shape[0] < rows:
                    array.resize((rows,) + tuple(array.shape[1:]))
                    keys.append(f"{name}/zarr.json")
        self.store.sync(keys)
        self.store.check_writer()
        write_commit(self.store, steps)
        self.committed = steps

    durable = move

    def attach(self, arrays: dict[str, Any]) -> None:
        self.arrays = arrays

    def poll_seconds(self, waiting_callbacks: bool) -> float | None:
        return None  # nothing happens between steps: wait for work

    def idle(self) -> None:
        pass

    def finish(self, received: int, failure: str | None) -> None:
        """Close: commit what was received, also when the caller leaves on an exception."""
        self.move(received)

    def report_failure(self, error: str) -> None:
        pass


class RankCommit:
    """One rank of several; see the module docstring. ``.ranks/<r>.json`` of a rank r > 0 holds
    {"session", "rank", "steps"[, "closed", "error"]}; rank 0's holds its verdict at close."""

    def __init__(self, store: RunStore, rank: int, world_size: int, session: str, committed: int, *,
                 marker: LocalCommit | None, commit_interval: float, rank_timeout: float):
        self.store, self.rank, self.world_size, self.session = store, rank, world_size, session
        self.marker = marker  # rank 0 only
        self._committed = committed  # ranks > 0: the marker last read
        self.start = committed  # every rank holds at least this (committed when this session began)
        self.durable_steps = committed  # this rank's own rows are durable for steps 0 .. durable_steps-1
        self.poll = min(commit_interval, 1.0)
        self.rank_timeout = rank_timeout
        self.failure: BaseException | None = None  # rank 0: a rank reported an error (raised in training)
        self._rank_failure: tuple[int, str] | None = None
        self.reported = False

    @property
    def committed(self) -> int:
        return self.marker.committed if self.marker is not None else self._committed

    def attach(self, arrays: dict[str, Any]) -> None:
        if self.marker is not None:
            self.marker.attach(arrays)

    def poll_seconds(self, waiting_callbacks: bool) -> float | None:
        """Rank 0 polls while the marker lags its own rows (the others catch up); the others
        while callbacks wait for a marker only rank 0 moves."""
        behind = self.committed < self.durable_steps if self.rank == 0 else waiting_callbacks
        return self.poll if behind else None

    def idle(self) -> None:
        """Rank 0: move the marker to the smallest progress of all ranks. Others: read the marker."""
        if self.rank != 0:
            self._read_marker()
            return
        _, failed = self._catch_up()
        if failed and self._rank_failure is None:
            # The training thread raises it at its next record(); the writer goes on until close,
            # which commits what every rank has (the failed rank's last rows included).
            self._rank_failure = min(failed.items())
            self.failure = RecorderError(self._failure_text())

    def durable(self, steps: int) -> None:
        self.durable_steps = max(self.durable_steps, steps)
        if self.rank != 0:
            self._report(steps)
        self.idle()

    # ----- progress and the marker ------------------------------------------------------------
    def _catch_up(self) -> tuple[dict[int, int], dict[int, str]]:
        """Rank 0: move the marker to the smallest progress of all ranks; every other rank's durable
        steps in this session, and the errors they reported."""
        progress, failed = {}, {}
        for rank in range(1, self.world_size):
            doc = self.store.read_json(rank_key(rank))
            if isinstance(doc, dict) and doc.get("session") == self.session and isinstance(doc.get("steps"), int):
                progress[rank] = max(doc["steps"], self.start)
                if doc.get("error"):
                    failed[rank] = str(doc["error"])
            else:  # nothing reported in this session yet: what was committed before it
                progress[rank] = self.start
        self.marker.move(min(self.durable_steps, *progress.values()))
        return progress, failed

    def _read_marker(self) -> None:
        doc = self.store.read_json(COMMIT_KEY)
        if isinstance(doc, dict) and isinstance(doc.get("steps"), int) and doc["steps"] > self._committed:
            self._committed = doc["steps"]

    def _report(self, steps: int, *, closed: bool = False, error: str | None = None) -> None:
        """A rank > 0: its progress document (or rank 0: its verdict), replaced atomically, durable."""
        doc: dict[str, Any] = {"session": self.session, "rank": self.rank, "steps": int(steps)}
        if closed:
            doc["closed"] = True
        if error:
            doc["error"] = error
        key = rank_key(self.rank)
        self.store.set(key, (json.dumps(doc) + "\n").encode("utf-8"))
        self.store.sync([key])
        if closed or error:
            self.reported = True

    def report_failure(self, error: str) -> None:
        if not self.reported:
            self._report_error(error if self.rank else f"rank 0 failed: {error}")

    def _report_error(self, error: str) -> None:
        """Best effort: tell the other ranks this one failed, so that they stop waiting for it."""
        with suppress(Exception):
            self._report(self.committed if self.rank == 0 else self.durable_steps, closed=True, error=error)

    def _failure_text(self) -> str:
        rank, error = self._rank_failure
        return f"rank {rank} failed: {error}; {committed_text(self.committed)}"

    # ----- close -----------------------------------------------------------------------------
    def finish(self, received: int, failure: str | None) -> None:
        """Close, once this rank's rows of steps 0..received-1 are durable."""
        self.durable_steps = max(self.durable_steps, received)
        if failure is not None:  # leaving on an exception: commit what every rank has, do not wait
            if self.rank == 0:
                self._catch_up()
                if self._rank_failure is not None:  # the error names the steps finally committed
                    self.failure = RecorderError(self._failure_text())
            self.report_failure(failure)
            return
        if self.rank == 0:
            self._finish_first(received)
        else:
            self._finish_other(received)

    def _finish_first(self, received: int) -> None:
        """Rank 0: wait for every rank to reach the last step, commit it, write the verdict."""
        deadline = time.monotonic() + self.rank_timeout
        while True:
            progress, failed = self._catch_up()
            if failed:
                self._rank_failure = min(failed.items())
                self._fail(self._failure_text())
            behind = {rank: steps for rank, steps in progress.items() if steps < received}
            if not behind:
                break
            if time.monotonic() >= deadline:
                def reached(rank: int, steps: int) -> str:
                    if steps == self.start:
                        return f"rank {rank} never reported a step in this session (its rows are durable only " \
                               f"where committed before: {steps} steps)" if steps else \
                            f"rank {rank} never reported a step"
                    return f"rank {rank} reached step {steps - 1} (its rows of steps 0..{steps - 1} are durable)"
                self._fail(f"{'; '.join(reached(r, s) for r, s in sorted(behind.items()))}, not the last step "
                           f"{received - 1}, within rank_timeout={self.rank_timeout:g} s: "
                           f"{committed_text(self.committed)} (a rank that died or stopped recording early stops "
                           f"the commit there)")
            time.sleep(RANK_POLL_S)
        self._report(self.committed, closed=True)

    def _fail(self, message: str) -> None:
        """Rank 0: the verdict says why the run stops here (the others raise it too), then raise."""
        self._report_error(message)
        raise RecorderError(message)

    def _finish_other(self, received: int) -> None:
        """A rank > 0: report its last step, then wait for rank 0's verdict on the run."""
        self._report(received, closed=True)
        limit = 2 * self.rank_timeout
        deadline, seen = time.monotonic() + limit, self.committed
        while True:
            verdict = self.store.read_json(rank_key(0))
            self._read_marker()  # (after the verdict: rank 0 moves the marker before it writes that)
            if isinstance(verdict, dict) and verdict.get("session") == self.session and verdict.get("closed"):
                if verdict.get("error"):
                    raise RecorderError(f"rank 0 could not commit the run: {verdict['error']}")
                if self.committed < received:
                    raise RecorderError(f"rank 0 closed the run at step {self.committed - 1}, but rank {self.rank} "
                                        f"recorded up to step {received - 1}: {committed_text(self.committed)}")
                return
            if self.committed > seen:  # rank 0 is alive and committing: wait on
                seen, deadline = self.committed, time.monotonic() + limit
            if time.monotonic() >= deadline:
                raise RecorderError(f"rank 0 did not close the run within {limit:g} s (2 x rank_timeout) after "
                                    f"rank {self.rank} recorded its last step {received - 1} (is rank 0 dead?): "
                                    f"{committed_text(self.committed)}")
            time.sleep(RANK_POLL_S)
