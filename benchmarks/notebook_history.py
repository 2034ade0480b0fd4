"""The notebook's way of recording, as a recorder the engine can call.

The Crucible-3 notebook preallocates the whole history in RAM and, every step, copies the
embedding to the host with ``.cpu()`` and the loss with ``.item()`` (both synchronise with a
GPU). This class does exactly that behind the Recorder's interface, so
``engine.train(config, inputs, NotebookHistory(...))`` measures the notebook's cost on the same
engine.
"""

from __future__ import annotations

import torch


class NotebookHistory:
    """Preallocated in-RAM W/h_mean/loss history; `.cpu()` and `.item()` every step."""

    def __init__(self, steps: int, vocab_size: int, hidden_dim: int):
        self.W_history = torch.zeros((steps + 1, vocab_size, hidden_dim), dtype=torch.bfloat16)
        self.h_mean_history = torch.zeros((steps, hidden_dim), dtype=torch.float32)
        self.loss_history = torch.full((steps + 1,), float("nan"), dtype=torch.float32)
        self.latest_loss = float("nan")
        self.steps_recorded = 0

    def record(self, step, W, h_mean=None, loss=None, *, epoch=None) -> None:
        self.W_history[step] = W.detach().cpu()
        if h_mean is not None:
            self.h_mean_history[step - 1] = h_mean.detach().cpu()
        if loss is not None:
            self.latest_loss = loss.item()
            self.loss_history[step] = self.latest_loss
        self.steps_recorded = step + 1

    def checkpoint(self, step, save) -> None:
        save()  # everything is already "recorded" in RAM

    def close(self) -> None:
        pass
