"""The notebook's way of recording, as a recorder the engine can call.

The Crucible-3 notebook preallocates the whole history in RAM and, every step, copies the
embedding to the host with ``.cpu()`` and the loss with ``.item()`` (both synchronise with a
GPU). This class does exactly that behind the Recorder's interface (``record(step, **tensors)``,
``next_step``, ``latest``, ``after_commit``, ``close``), so
``engine.train(config, inputs, NotebookHistory(...))`` measures the notebook's cost on the same
engine. Step 0 (the initial embedding) has no h_mean, as in the notebook.
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
        self.next_step = 0  # the engine records from here (a fresh run: from step 0)

    def record(self, step, *, W, h_mean, loss, epoch=None) -> bool:
        self.W_history[step] = W.detach().cpu()
        if step > 0:
            self.h_mean_history[step - 1] = h_mean.detach().cpu()
            self.latest_loss = loss.item()
            self.loss_history[step] = self.latest_loss
        self.next_step = step + 1
        return False  # never a commit point: nothing is ever durable

    def latest(self, name: str) -> float | None:
        return self.latest_loss if name == "loss" else None

    def after_commit(self, step, fn) -> None:
        fn()  # everything is already "recorded" in RAM

    def close(self) -> None:
        pass
