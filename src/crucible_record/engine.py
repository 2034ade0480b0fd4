"""The notebook's training loop. It knows nothing of storage: it hands each step to a Recorder.

Everything that decides the numbers (seeding, model construction, optimizer, DataLoader
shuffling, autocast, bf16 casts) follows the notebook line for line, so that on the CPU the
recorded trajectory is bit-identical to the notebook's. Checkpoints add the state needed to
resume exactly: model, optimizer, RNG states, and the position in the current epoch.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .config import RunConfig
from .data import (
    TextDataset,
    TokenMasks,
    default_corpus_path,
    default_tokenizer_path,
    derive_dead_mask,
    load_dead_mask,
    load_tokenizer,
    tokenize_corpus,
)
from .errors import CrucibleError
from .model import TinyLM


def resolve_device(name: str) -> str:
    """'auto' is the notebook's detection: cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CrucibleError("--device cuda was asked for but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CrucibleError("--device mps was asked for but MPS is not available")
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
        raise CrucibleError(
            f"corpus {corpus} is too short: {len(tokens)} tokens make {n_sequences} sequences of "
            f"{config.seq_len}, fewer than one batch of {config.batch_size}"
        )
    if config.dead_mask:
        masks = load_dead_mask(config.dead_mask, config.vocab_size)
    else:
        masks = derive_dead_mask(tokens, config.vocab_size)
    return Inputs(tokens, masks, corpus, tokenizer_path)


@dataclass
class TrainResult:
    last_loss: torch.Tensor | None  # a device tensor: reading it is the caller's (one) sync
    epochs: int
    steps: int

    @property
    def final_loss(self) -> float:
        return float(self.last_loss.float()) if self.last_loss is not None else float("nan")


@dataclass
class Checkpoint:
    """Everything needed to continue after `step` exactly as if never stopped."""

    step: int
    epoch: int
    batches_done: int  # batches of `epoch` already used
    epoch_rng_state: torch.Tensor  # torch CPU RNG before the epoch's DataLoader iterator was made
    model: dict
    optimizer: dict
    python_rng: tuple
    numpy_rng: tuple
    cuda_rng: list | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def train(
    config: RunConfig,
    inputs: Inputs,
    recorder=None,
    *,
    progress: bool = True,
    checkpoint_every: int = 0,
    save_checkpoint: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
    replay: StepHook | None = None,
    replay_until: int = -1,
) -> TrainResult:
    """Run the notebook's experiment.

    recorder: None trains without recording (for overhead measurements).
    checkpoint_every/save_checkpoint: every K steps a snapshot is handed to
        ``recorder.checkpoint`` so it is saved only once that step is committed.
    resume_from: a checkpoint dict; training continues after its step.
    replay/replay_until: steps up to `replay_until` are already recorded; instead of being
        recorded again they are passed to `replay` (which checks them against the store).
    """

    def emit(step: int, W, h_mean, loss, epoch: int) -> None:
        if step <= replay_until and replay is not None:
            replay(step, W, h_mean, loss)
        elif recorder is not None:
            recorder.record(step, W=W, h_mean=h_mean, loss=loss, epoch=epoch)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if device == "cuda":
        torch.cuda.manual_seed_all(config.seed)

    dataset = TextDataset(inputs.tokens, config.seq_len)
    model = TinyLM(config.vocab_size, config.hidden_dim, config.num_layers, config.num_heads, config.seq_len)
    model = model.to(device).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    dataloader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    autocast_device = device if device != "mps" else "cpu"

    step, epoch, skip = 0, 0, 0
    if resume_from is not None:
        ckpt = resume_from
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        random.setstate(ckpt["python_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        if ckpt["cuda_rng"] is not None and device == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        torch.set_rng_state(ckpt["epoch_rng_state"])
        step, epoch, skip = ckpt["step"], ckpt["epoch"] - 1, ckpt["batches_done"]
    else:
        emit(0, model.embedding.weight.detach(), None, None, 0)

    bar = _progress_bar(config.steps, step, progress)
    model.train()
    loss = None
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
                optimizer.step()

                step += 1
                batches_done += 1
                # The notebook never detaches h_mean; detaching keeps the values, drops the graph.
                h_mean = h.detach().mean(dim=(0, 1)).float()
                emit(step, model.embedding.weight.detach(), h_mean, loss.detach(), epoch)
                if recorder is not None and checkpoint_every and step % checkpoint_every == 0 and save_checkpoint:
                    snapshot = _snapshot(step, epoch, batches_done, epoch_rng_state, model, optimizer, device)
                    recorder.checkpoint(step, lambda s=snapshot: save_checkpoint(s))
                if bar is not None:
                    shown = recorder.latest_loss if recorder is not None and step > replay_until else float(loss)
                    bar.set_postfix({"loss": f"{shown:.4f}", "epoch": epoch})
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(last_loss=loss.detach() if loss is not None else None, epochs=epoch, steps=step)


def _snapshot(step, epoch, batches_done, epoch_rng_state, model, optimizer, device) -> dict:
    return Checkpoint(
        step=step,
        epoch=epoch,
        batches_done=batches_done,
        epoch_rng_state=epoch_rng_state.clone(),
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=copy.deepcopy(optimizer.state_dict()),
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if device == "cuda" else None,
    ).to_dict()


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="Training")
