"""Record a Lightning run: parameters, their gradients, optimizer state, the loss.

    from crucible_record.integrations.lightning import RecordCallback
    trainer = lightning.pytorch.Trainer(..., callbacks=[RecordCallback("runs/x", params="wte.weight",
                                        grads="wte.weight", optim_state=("exp_avg", "exp_avg_sq"))])
    trainer.fit(module)

Step s is recorded by a hook on the optimizer right after it steps (the gradients are those it
used, not yet zeroed). The loss is the one passed to backward, summed over the step's micro-batches
(Lightning divides each by ``accumulate_grad_batches``).
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback

from ..errors import CrucibleError
from ._session import SessionCallback

log = logging.getLogger("crucible_record")


class RecordCallback(SessionCallback, Callback):
    """See the module docstring and :class:`SessionCallback`."""

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise CrucibleError(f"RecordCallback records a run with one optimizer; this one has {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        self.session.start(pl_module, optimizer)
        self._hook = optimizer.register_step_post_hook(lambda *_: self.session.optimizer_stepped())

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.session.records_loss:
            self.session.add_loss(loss, part_of_sum=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            self.close()  # every recorded step committed before the training error propagates
        except CrucibleError as e:  # the training error stays the one raised; the recorder's is logged
            log.error("crucible-record: closing %s after a training error failed: %s", self.session.path, e)
