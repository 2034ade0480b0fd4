"""The notebook's training loop. It knows nothing of storage: it hands each step to a Recorder.

Everything that decides the numbers follows the notebook line for line, so that on the CPU the
recorded trajectory is bit-identical to the notebook's. Checkpoints add what an exact resume needs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import RECORDABLE, RunConfig
from .data import (TextDataset, TokenMasks, default_corpus_path, default_tokenizer_path, derive_dead_mask,
                   load_dead_mask, load_tokenizer, tokenize_corpus)
from ..errors import CrucibleError, Interrupted
from ..fields import Field
from . import checkpoint
from .model import TinyLM


def resolve_device(name: str) -> str:
    """'auto' is the notebook's detection: cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if name == "auto":
        return next((device for device, present in available.items() if present()), "cpu")
    if name in available and not available[name]():
        raise CrucibleError(f"--device {name} was asked for but {name.upper()} is not available")
    return name


@dataclass
class Inputs:
    """What the run trains on: token ids and the live/dead masks."""

    tokens: list[int]
    masks: TokenMasks
    corpus_path: Path
    tokenizer_path: Path


def load_inputs(config: RunConfig) -> Inputs:
    """Load and check the corpus, tokenizer and dead mask before anything is written."""
    corpus = Path(config.corpus) if config.corpus else default_corpus_path()
    tokenizer_path = Path(config.tokenizer) if config.tokenizer else default_tokenizer_path()
    tokenizer = load_tokenizer(tokenizer_path, config.vocab_size)
    tokens = tokenize_corpus(corpus, tokenizer)
    if config.seq_len < 2:
        raise CrucibleError("--seq-len must be at least 2 (the loss predicts the next token)")
    n_sequences = len(tokens) // config.seq_len
    if n_sequences < config.batch_size:
        raise CrucibleError(f"corpus {corpus} is too short: {len(tokens)} tokens make {n_sequences} sequences of "
                            f"{config.seq_len}, fewer than one batch of {config.batch_size}")
    masks = (load_dead_mask(config.dead_mask, config.vocab_size) if config.dead_mask
             else derive_dead_mask(tokens, config.vocab_size))
    return Inputs(tokens, masks, corpus, tokenizer_path)


@dataclass
class TrainResult:
    last_loss: torch.Tensor | None  # a device tensor: reading it is the caller's (one) sync
    epochs: int

    @property
    def final_loss(self) -> float:
        return float(self.last_loss.float()) if self.last_loss is not None else float("nan")


def fields(config: RunConfig, masks: TokenMasks | None = None) -> dict[str, Field]:
    """What a Crucible-3 run records at every step (h_mean and loss are NaN at step 0), and with
    ``--record`` W's gradient and AdamW state: bf16 like the model, so recorded bit-exact."""
    recorded = {
        "W": Field((config.vocab_size, config.hidden_dim), torch.bfloat16, dims=("token", "hidden")),
        "h_mean": Field((config.hidden_dim,), torch.float32, dims=("hidden",)),
        "loss": Field((), torch.float32),
        "epoch": Field((), torch.int64),
    }
    rows = None  # the token rows kept of the --record fields: None for all of them
    if config.record and config.record_rows != "all":
        if masks is None:
            raise CrucibleError("--record-rows dead/live needs the run's dead mask")
        rows = masks.dead_indices if config.record_rows == "dead" else torch.nonzero(~masks.dead_mask).flatten()
        if rows.numel() == 0:
            raise CrucibleError(f"--record-rows {config.record_rows}: this corpus and vocabulary leave no "
                                f"{config.record_rows} token")
    for name in config.recorded_fields:
        recorded[name] = Field((config.vocab_size, config.hidden_dim), torch.bfloat16, rows=rows,
                               dims=("token", "hidden"))
    return recorded


LOG_EVERY = 10  # on a GPU the progress bar's loss is read (a host sync) every LOG_EVERY steps

# Called with (step, tensors) for steps already on disk: a resume recomputes them and checks them.
StepHook = Callable[[int, dict], None]


def build_model(config: RunConfig) -> TinyLM:
    """The notebook's model for `config`, float32 on the default device (train() moves and casts it)."""
    return TinyLM(config.vocab_size, config.hidden_dim, config.num_layers, config.num_heads, config.seq_len)


def train(config: RunConfig, inputs: Inputs, recorder=None, *, progress: bool = True, checkpoints_to=None,
          resume_from: dict | None = None, replay: StepHook | None = None,
          stop_requested: Callable[[], bool] = lambda: False) -> TrainResult:
    """Run the notebook's experiment, handing every step to `recorder` (None: train unrecorded).
    Checkpoints are saved only once their step is committed (never ahead of the data); steps already
    recorded are recomputed and passed to `replay` to be checked instead of being recorded again;
    `stop_requested()` is asked after each recorded step (True stops training there: Interrupted)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if device == "cuda":
        torch.cuda.manual_seed_all(config.seed)

    dataset = TextDataset(inputs.tokens, config.seq_len)
    model = build_model(config).to(device).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                  eps=config.eps, weight_decay=config.weight_decay)
    dataloader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    autocast_device = device if device != "mps" else "cpu"
    recorded_from = recorder.next_step if recorder is not None else 0
    W = model.embedding.weight

    def emit(step: int, epoch: int, h_mean: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor | None) -> bool:
        """Hand one step to the recorder (or to the replay check); True at a commit point."""
        tensors = {"W": W.detach(), "h_mean": h_mean, "loss": loss, "epoch": torch.tensor(epoch, dtype=torch.int64)}
        if config.record and grad is None:  # --record at step 0: no gradient or optimizer state yet
            tensors.update((name, torch.full_like(W, float("nan")).detach()) for name in config.recorded_fields)
        elif config.record:  # W's gradient and AdamW state, passed as they are (the recorder copies them at once)
            state = optimizer.state[W]
            values = {"grad": grad, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            tensors.update((RECORDABLE[name], values[name]) for name in config.record)
        if step < recorded_from:
            if replay is not None:
                replay(step, tensors)
            return False
        return recorder is not None and recorder.record(step, **tensors)

    step, epoch, skip = 0, 0, 0
    if resume_from is not None:
        step, epoch, skip = checkpoint.restore(resume_from, model, optimizer, device)
        epoch -= 1  # the loop below begins the checkpoint's epoch again and skips its used batches
    else:
        nan = torch.full((), float("nan"), device=device)
        emit(0, 0, nan.expand(config.hidden_dim).clone(), nan, None)  # the initial embedding: no forward pass yet

    bar = tqdm(total=config.steps, initial=step, desc="Training") if progress else None
    model.train()
    loss, shown = None, "..."
    try:
        while step < config.steps:
            epoch += 1
            epoch_rng_state = torch.get_rng_state()
            batches = iter(dataloader)
            for _ in range(skip):  # resuming: replay the sampler to the saved position
                next(batches)
            batches_done, skip = skip, 0
            for batch in batches:
                if step >= config.steps:
                    break
                if device == "cuda":  # no host sync per step: pinned source, asynchronous copy
                    input_ids = batch.pin_memory().to(device, non_blocking=True)
                else:
                    input_ids = batch.to(device)

                with torch.autocast(device_type=autocast_device, dtype=torch.bfloat16):
                    logits, h = model(input_ids, return_hidden=True)
                    shift_logits = logits[:, :-1, :].contiguous()
                    shift_labels = input_ids[:, 1:].contiguous()
                    loss = loss_fn(shift_logits.view(-1, config.vocab_size), shift_labels.view(-1))

                optimizer.zero_grad()
                loss.backward()
                grad = W.grad if config.record else None  # --record: this step's gradient of W, before step()
                optimizer.step()

                step += 1
                batches_done += 1
                # The notebook never detaches h_mean; detaching keeps the values, drops the graph.
                h_mean = h.detach().mean(dim=(0, 1)).float()
                if emit(step, epoch, h_mean, loss.detach().float(), grad) and checkpoints_to is not None:
                    snap = checkpoint.snapshot(step, epoch, batches_done, epoch_rng_state, model, optimizer)
                    recorder.after_commit(step, lambda s=snap: checkpoint.save(checkpoints_to, s))
                if bar is not None:
                    if device == "cpu" or step % LOG_EVERY == 0:  # on a GPU .item() is a host sync: rarely
                        shown = f"{loss.item():.4f}" if device == "cpu" else f"{loss.item():.4f} (step {step})"
                    status = {"checking": "recomputed step"} if step < recorded_from else {"loss": shown}
                    bar.set_postfix({**status, "epoch": epoch}, refresh=False)  # drawn once, with its step
                    bar.update(1)
                if stop_requested():
                    raise Interrupted(f"stopped after step {step}")
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(last_loss=loss.detach() if loss is not None else None, epochs=epoch)
