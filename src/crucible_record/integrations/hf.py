"""Record a ``transformers.Trainer`` run: parameters, their gradients, optimizer state, the loss.

    from crucible_record.integrations.hf import RecordCallback
    recorder = RecordCallback("runs/gpt2", params="transformer.wte.weight",
                              grads="transformer.wte.weight", optim_state=("exp_avg", "exp_avg_sq"))
    trainer = Trainer(model, args, train_dataset=..., callbacks=[recorder])
    with recorder:          # commits and closes the run even if train() raises
        trainer.train()

Step s is the Trainer's ``global_step`` s: recorded in ``on_optimizer_step``, after the optimizer
step and before ``model.zero_grad()``, so the gradients are those the optimizer used (after
clipping). Step 0 is the state when training begins. The loss is the one the model returns
(``outputs.loss``) for the step's micro-batches, combined as the Trainer combines them (their sum
when it passes ``num_items_in_batch``, else their mean), not the ``logging_steps`` average; a loss
the Trainer computes itself (``label_smoothing_factor``, ``compute_loss_func``) is not what the
model returns: record with ``loss=False`` then.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ..errors import CrucibleError
from ._session import RecordingSession


class RecordCallback(TrainerCallback):
    """See the module docstring; keyword arguments as for :func:`crucible_record.watch` and,
    for the rest (``commit_interval``, ``layout``, ``durability``, ...), :func:`crucible_record.record`."""

    def __init__(self, path: str | Path, *, params=(), grads=(), optim_state=(), every: int = 1, rows=None,
                 loss: bool = True, **record_options):
        self.session = RecordingSession(
            path, dict(params=params, grads=grads, optim_state=optim_state, every=every, rows=rows, loss=loss),
            record_options)
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.session.records_loss and getattr(args, "label_smoothing_factor", 0):
            raise CrucibleError("with label_smoothing_factor the Trainer's loss is not the model's: "
                                "RecordCallback(..., loss=False)")
        self.session.start(model, optimizer)
        if self.session.records_loss:
            self._hook = model.register_forward_hook(self._model_returned, with_kwargs=True)

    def _model_returned(self, module, args, kwargs, output) -> None:
        if not module.training:
            return  # evaluation
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None:
            self.session.add_loss(loss, part_of_sum=kwargs.get("num_items_in_batch") is not None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.session.optimizer_stepped()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Commit and release the run (what ``with recorder:`` does on leaving)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.session.close()

    def __enter__(self) -> "RecordCallback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
