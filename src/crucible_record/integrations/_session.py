"""One training run recorded through a Watch, driven by a framework's callbacks.

Step 0 (the initial state) is recorded when training starts, then one step per optimizer step;
the run is committed and closed when training ends, fails (where the framework says so), when the
callback is used as a context manager and the block ends, or at the latest at interpreter exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CrucibleError
from ..api import record
from ..writer import Recorder
from ..watcher import Watch


class RecordingSession:
    def __init__(self, path: str | Path, watch_options: Mapping[str, Any], record_options: Mapping[str, Any]):
        self.path, self.watch_options, self.record_options = path, dict(watch_options), dict(record_options)
        self.watch: Watch | None = None
        self.recorder: Recorder | None = None
        self.step = 0
        self._losses: list[torch.Tensor] = []
        self._loss_is_sum = True

    @property
    def records_loss(self) -> bool:
        return self.watch_options.get("loss", True)

    def start(self, model: torch.nn.Module, optimizer) -> None:
        """Create the run and record step 0, the state before any update."""
        if self.recorder is not None:
            raise CrucibleError(f"{self.path}: this callback already recorded a training run; give a new one a new path")
        self.watch = Watch(model, optimizer, distributed=self.record_options.get("distributed"), **self.watch_options)
        self.recorder = record(self.path, self.watch.fields, **self.record_options)
        self.recorder.record(0, **self.watch.capture(0))

    def add_loss(self, loss: torch.Tensor, *, part_of_sum: bool = True) -> None:
        """One micro-batch's loss (on the device: no sync). The step's loss is their sum when each
        is already a share of it (Lightning, a Trainer passing num_items_in_batch), else their mean."""
        self._losses.append(loss.detach())
        self._loss_is_sum = part_of_sum

    def optimizer_stepped(self) -> None:
        """Record the step the optimizer just took: parameters, gradients (not yet zeroed), state, loss."""
        if self.recorder is None:
            return  # a step outside the recorded training (e.g. a framework's own warm-up)
        self.step += 1
        loss = None
        if self.records_loss:
            if not self._losses:
                raise CrucibleError(f"step {self.step}: no training loss was seen for it (the model returned none); "
                                    f"record without it: loss=False")
            loss = sum(self._losses[1:], self._losses[0])  # in order, as the framework adds them up
            if not self._loss_is_sum and len(self._losses) > 1:
                loss = loss / len(self._losses)
        self._losses = []
        self.recorder.record(self.step, **self.watch.capture(self.step, loss=loss))

    def close(self) -> None:
        """Commit what is recorded and release the run (again: nothing)."""
        if self.recorder is not None:
            self.recorder.close()


class SessionCallback:
    """What both frameworks' callbacks share. Keyword arguments as for :func:`crucible_record.watch`
    and, for the rest (``commit_interval``, ``layout``, ...), :func:`crucible_record.record`."""

    def __init__(self, path: str | Path, *, params=(), grads=(), optim_state=(), every: int = 1, rows=None,
                 loss: bool = True, **record_options):
        self.session = RecordingSession(
            path, dict(params=params, grads=grads, optim_state=optim_state, every=every, rows=rows, loss=loss),
            record_options)
        self._hook = None

    def close(self) -> None:
        """Commit and release the run."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.session.close()
