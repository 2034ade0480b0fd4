"""A faithful copy of ../shared/seed/crucible_3_notebook.txt, parametrised for tiny test configs.

Kept deliberately close to the notebook, line for line (including its un-detached h_mean and its
in-RAM history), so that crucible-record's output can be compared with it bit for bit. Only the
constants became arguments, and the device is forced to the CPU.
"""

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset


def run_notebook(
    *,
    corpus_path,
    tokenizer_path,
    dead_mask_path,
    output_dir,
    TOTAL_STEPS=500,
    BATCH_SIZE=128,
    SEQ_LEN=128,
    LEARNING_RATE=1e-3,
    WEIGHT_DECAY=0.0,
    BETA1=0.9,
    BETA2=0.999,
    EPSILON=1e-8,
    VOCAB_SIZE=10000,
    HIDDEN_DIM=64,
    NUM_LAYERS=2,
    NUM_HEADS=2,
    RANDOM_SEED=42,
):
    CORPUS_PATH, TOKENIZER_PATH, DEAD_MASK_PATH, OUTPUT_DIR = corpus_path, tokenizer_path, dead_mask_path, output_dir
    device = "cpu"

    torch.manual_seed(RANDOM_SEED)
    random.seed(RANDOM_SEED)
    np.random.seed(RANDOM_SEED)

    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    masks = load_file(str(DEAD_MASK_PATH))
    dead_mask = masks["dead_mask"].bool()
    dead_indices = masks["dead_indices"].long()
    live_mask = ~dead_mask
    n_dead = dead_mask.sum().item()
    n_live = live_mask.sum().item()

    class TextDataset(Dataset):
        def __init__(self, corpus_path, tokenizer, seq_len):
            with open(corpus_path, "r", encoding="utf-8") as f:
                text = f.read()
            encoding = tokenizer.encode(text)
            self.tokens = encoding.ids
            self.seq_len = seq_len
            self.n_sequences = len(self.tokens) // seq_len

        def __len__(self):
            return self.n_sequences

        def __getitem__(self, idx):
            start = idx * self.seq_len
            chunk = self.tokens[start:start + self.seq_len]
            return torch.tensor(chunk, dtype=torch.long)

    dataset = TextDataset(CORPUS_PATH, tokenizer, SEQ_LEN)

    class TinyLM(nn.Module):
        def __init__(self, vocab_size, hidden_dim, num_layers, num_heads, seq_len):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, hidden_dim)
            self.pos_embedding = nn.Embedding(seq_len, hidden_dim)
            encoder_layer = nn.TransformerEncoderLayer(
                d_model=hidden_dim,
                nhead=num_heads,
                dim_feedforward=hidden_dim * 4,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(encoder_layer, num_layers=num_layers)
            self.ln_f = nn.LayerNorm(hidden_dim)
            nn.init.normal_(self.embedding.weight, mean=0.0, std=0.02)
            nn.init.normal_(self.pos_embedding.weight, mean=0.0, std=0.02)

        def forward(self, input_ids, return_hidden=False):
            batch_size, seq_len = input_ids.shape
            tok_emb = self.embedding(input_ids)
            pos_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
            pos_emb = self.pos_embedding(pos_ids)
            hidden = tok_emb + pos_emb
            causal_mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=input_ids.device)
            hidden = self.transformer(hidden, mask=causal_mask, is_causal=True)
            hidden = self.ln_f(hidden)
            logits = hidden @ self.embedding.weight.T
            if return_hidden:
                return logits, hidden
            return logits

    model = TinyLM(VOCAB_SIZE, HIDDEN_DIM, NUM_LAYERS, NUM_HEADS, SEQ_LEN)
    model = model.to(device).to(torch.bfloat16)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=(BETA1, BETA2), eps=EPSILON, weight_decay=WEIGHT_DECAY
    )

    output_path = Path(OUTPUT_DIR)
    output_path.mkdir(parents=True, exist_ok=True)
    W_history = torch.zeros(TOTAL_STEPS + 1, VOCAB_SIZE, HIDDEN_DIM, dtype=torch.bfloat16)
    h_mean_history = torch.zeros(TOTAL_STEPS, HIDDEN_DIM, dtype=torch.float32)
    loss_history = torch.zeros(TOTAL_STEPS + 1, dtype=torch.float32)

    dataloader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()

    W_history[0] = model.embedding.weight.detach().cpu().to(torch.bfloat16)
    loss_history[0] = float("nan")

    model.train()
    step = 0
    epoch = 0
    while step < TOTAL_STEPS:
        epoch += 1
        for batch in dataloader:
            if step >= TOTAL_STEPS:
                break
            input_ids = batch.to(device)
            with torch.autocast(device_type=device if device != "mps" else "cpu", dtype=torch.bfloat16):
                logits, h = model(input_ids, return_hidden=True)
                shift_logits = logits[:, :-1, :].contiguous()
                shift_labels = input_ids[:, 1:].contiguous()
                loss = loss_fn(shift_logits.view(-1, VOCAB_SIZE), shift_labels.view(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            W_history[step] = model.embedding.weight.detach().cpu().to(torch.bfloat16)
            h_mean = h.mean(dim=(0, 1)).cpu().float()
            h_mean_history[step - 1] = h_mean
            loss_history[step] = loss.item()

    data_to_save = {
        "W": W_history.view(torch.uint16),
        "h_mean": h_mean_history,
        "loss": loss_history,
        "dead_mask": dead_mask,
        "dead_indices": dead_indices,
    }
    save_path = output_path / "crucible_3_trajectory.safetensors"
    save_file(data_to_save, str(save_path))

    metadata = {
        "experiment": "Crucible 3",
        "series": "Crucible",
        "date": "2025-11-28",
        "total_steps": TOTAL_STEPS,
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "beta1": BETA1,
        "beta2": BETA2,
        "epsilon": EPSILON,
        "vocab_size": VOCAB_SIZE,
        "hidden_dim": HIDDEN_DIM,
        "num_layers": NUM_LAYERS,
        "num_heads": NUM_HEADS,
        "random_seed": RANDOM_SEED,
        "n_dead_tokens": n_dead,
        "n_live_tokens": n_live,
        "final_loss": loss_history[-1].item(),
        "total_epochs": epoch,
        "device": device,
        "data_shapes": {
            "W": list(W_history.shape),
            "h_mean": list(h_mean_history.shape),
            "loss": list(loss_history.shape),
        },
        "notes": "h_mean persistence and live/dead separation study. Records all tokens + h_mean[t]. Same seed as Crucible 1 & 2.",
    }
    with open(output_path / "metadata.json", "w") as f:
        json.dump(metadata, f, indent=2)
    return save_path
