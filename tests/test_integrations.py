"""The Trainer and Lightning callbacks on a tiny GPT-2 built from a config (nothing downloaded):
parameters, gradients, Adam state and the step's loss, bit-exact against copies taken in the loop."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import crucible_record as cr
from crucible_record.errors import CrucibleError
from crucible_record.integrations import hf, lightning

VOCAB, SEQ = 64, 12
WTE = "transformer.wte.weight"
WATCHED = dict(params=WTE, grads=WTE, optim_state=("exp_avg", "exp_avg_sq"))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=SEQ))


def token_batches(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB // 2, (n, SEQ), generator=gen)]


def copies_of(model, optimizer) -> dict[str, torch.Tensor]:
    param = model.get_parameter(WTE)
    state = optimizer.state[param]
    return {WTE: param.detach().clone(), f"{WTE}.grad": param.grad.clone(),
            f"{WTE}.exp_avg": state["exp_avg"].clone(), f"{WTE}.exp_avg_sq": state["exp_avg_sq"].clone()}


def assert_recorded(run, initial: torch.Tensor, copies: list[dict], losses: list[torch.Tensor]) -> None:
    t = cr.open(run)
    assert t.committed_steps == len(copies) + 1
    assert set(t.fields) == {WTE, f"{WTE}.grad", f"{WTE}.exp_avg", f"{WTE}.exp_avg_sq", "loss"}
    assert torch.equal(t[WTE][0], initial)  # step 0: the state before any update
    for name in (f"{WTE}.grad", f"{WTE}.exp_avg", "loss"):
        assert torch.isnan(t[name][0]).all()
    for step, copy in enumerate(copies, start=1):
        for name, value in copy.items():
            assert torch.equal(t[name][step], value), (name, step)
        assert torch.equal(t["loss"][step], losses[step - 1].float()), step


# ----- transformers.Trainer ----------------------------------------------------------------------

class CopyingTrainer(Trainer):
    """The loop's own copies: each micro-batch's loss as training_step returns it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses: list[torch.Tensor] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_losses.append(loss.detach().clone())
        return loss


class CopyAfterStep(TrainerCallback):
    """Copies of the parameter, its gradient and Adam state right after each optimizer step."""

    def __init__(self):
        self.copies, self.initial, self.optimizer = [], None, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer
        self.initial = model.get_parameter(WTE).detach().clone()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.copies.append(copies_of(self.model, self.optimizer))


def hf_trainer(tmp_path, callbacks, steps=4, accumulation=1):
    args = TrainingArguments(output_dir=str(tmp_path / "hf-out"), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1000,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return CopyingTrainer(model=tiny_gpt2(), args=args, train_dataset=token_batches(2 * steps * accumulation),
                          callbacks=callbacks)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_callback_records_params_grads_adam_state_and_loss(tmp_path, accumulation):
    copier = CopyAfterStep()
    recorder = hf.RecordCallback(tmp_path / "run", **WATCHED)
    trainer = hf_trainer(tmp_path, [copier, recorder], accumulation=accumulation)
    trainer.train()
    # the step's loss as the Trainer adds up the micro-batches' training_step losses
    per_step = [sum(trainer.step_losses[i:i + accumulation][1:], trainer.step_losses[i])
                for i in range(0, len(trainer.step_losses), accumulation)]
    assert len(copier.copies) == 4
    assert_recorded(tmp_path / "run", copier.initial, copier.copies, per_step)
    assert recorder.session.recorder._closed  # on_train_end committed and closed it


def test_trainer_error_leaves_every_recorded_step_committed(tmp_path):
    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom at step 3")

    recorder = hf.RecordCallback(tmp_path / "run", params=WTE, commit_interval=1e6)
    trainer = hf_trainer(tmp_path, [recorder, Fail()], steps=6)
    with pytest.raises(RuntimeError, match="boom"), recorder:
        trainer.train()
    assert cr.open(tmp_path / "run").committed_steps == 4  # steps 0..3, though no commit point came


def test_trainer_callback_refuses_a_loss_the_model_does_not_return(tmp_path):
    trainer = hf_trainer(tmp_path, [hf.RecordCallback(tmp_path / "run", params=WTE)])
    trainer.args.label_smoothing_factor = 0.1
    with pytest.raises(CrucibleError, match="loss=False"):
        trainer.train()


# ----- Lightning ---------------------------------------------------------------------------------

class TinyLM(pl.LightningModule):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.gpt = tiny_gpt2()
        self.fail_at = fail_at
        self.losses, self.copies = [], []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError(f"boom at batch {batch_idx}")
        loss = self.gpt(**batch).loss
        self.losses.append(loss.detach().clone())
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)  # steps the optimizer (and runs the closure)
        self.copies.append(copies_of(self.gpt, self.trainer.optimizers[0]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(token_batches(8), batch_size=2)


def lightning_fit(module, callback, steps=4):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback])
    trainer.fit(module)


def test_lightning_callback_records_params_grads_adam_state_and_loss(tmp_path):
    module = TinyLM()
    initial = module.gpt.get_parameter(WTE).detach().clone()
    recorder = lightning.RecordCallback(tmp_path / "run", params=f"gpt.{WTE}", grads=f"gpt.{WTE}",
                                        optim_state=("exp_avg", "exp_avg_sq"))
    lightning_fit(module, recorder)
    t = cr.open(tmp_path / "run")
    assert t.committed_steps == 5 and len(module.copies) == 4
    assert torch.equal(t[f"gpt.{WTE}"][0], initial) and torch.isnan(t[f"gpt.{WTE}.grad"][0]).all()
    for step, copy in enumerate(module.copies, start=1):
        for name, value in copy.items():
            assert torch.equal(t[f"gpt.{name}"][step], value), (name, step)
        assert torch.equal(t["loss"][step], module.losses[step - 1])


def test_lightning_error_leaves_every_recorded_step_committed(tmp_path):
    module = TinyLM(fail_at=3)
    recorder = lightning.RecordCallback(tmp_path / "run", params=f"gpt.{WTE}", commit_interval=1e6)
    with pytest.raises(RuntimeError, match="boom at batch 3"):
        lightning_fit(module, recorder)
    assert cr.open(tmp_path / "run").committed_steps == 4  # steps 0..3: batches 0-2 were steps 1-3
