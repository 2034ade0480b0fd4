"""Record a ``transformers.Trainer`` run: parameters, their gradients, optimizer state, the loss.

    from crucible_record.integrations.hf import RecordCallback
    recorder = RecordCallback("runs/gpt2", params="transformer.wte.weight",
                              grads="transformer.wte.weight", optim_state=("exp_avg", "exp_avg_sq"))
    trainer = Trainer(model, args, train_dataset=..., callbacks=[recorder])
    with recorder:          # commits and closes the run even if train() raises
        trainer.train()

Step s is recorded in ``on_optimizer_step``, before ``model.zero_grad()``, so the gradients are
those the optimizer used (after clipping). The loss is the model's ``outputs.loss`` combined as the
Trainer combines micro-batches; a loss the Trainer computes itself (``label_smoothing_factor``,
``compute_loss_func``) is not that: record with ``loss=False`` then.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..errors import CrucibleError
from ._session import SessionCallback


class RecordCallback(SessionCallback, TrainerCallback):
    """See the module docstring and :class:`SessionCallback`."""

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

    def __enter__(self) -> "RecordCallback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
