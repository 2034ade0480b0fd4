"""Record a GPT-2-shaped model's token embedding every step and its output head every 10 steps.

    python examples/gpt2_embedding.py --out /tmp/gpt2-run             # GPT-2 small shapes: for a GPU
    python examples/gpt2_embedding.py --small   # a few seconds on a CPU; into runs/gpt2-embedding-<date>-<time>

The default sizes are GPT-2 small's (124M parameters, vocab 50257, hidden 768, 12 layers): a step
takes minutes on a CPU (bf16 matmuls) and a fraction of a second on a GPU, where the recorder copies
the tensors off the device without a host sync. wte is 77 MB a step in bf16: 50 steps are ~3.9 GB
before compression.

The model is plain torch: token embedding ``wte``, positional embedding ``wpe``, pre-LayerNorm
transformer blocks and an untied ``lm_head`` Linear, trained on synthetic tokens: noisy "next
token = token + 1" sequences over the first --active ids (the rest of the vocabulary never occurs,
like rare tokens in real text; their wte rows do not move). Three fields are recorded:

    wte      (vocab, hidden)  every step      dtype of the model's weights (--dtype bf16|f32)
    lm_head  (vocab, hidden)  every 10 steps  (nn.Linear(hidden, vocab).weight)
    loss     ()               every step      float32

Row s of a field holds the tensor at step s: the weights the forward pass of step s used, and the
loss that pass gave (recorded before ``optimizer.step()``). The run is then read back lazily.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import crucible_record as cr


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (z.view(b, t, self.heads, h // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, context: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(context, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)  # untied: its own weight, recorded apart
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def synthetic_batch(gen: torch.Generator, active: int, batch: int, seq_len: int) -> torch.Tensor:
    """Tokens 0..active-1 where the next token is mostly the current one + 1 (mod active)."""
    start = torch.randint(0, active, (batch, 1), generator=gen)
    ids = (start + torch.arange(seq_len)) % active
    noise = torch.rand(batch, seq_len, generator=gen) < 0.1
    return torch.where(noise, torch.randint(0, active, (batch, seq_len), generator=gen), ids)


SMALL = dict(vocab=1000, hidden=32, layers=2, heads=2, seq_len=32, batch_size=4, steps=21)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="new run directory (default: runs/gpt2-embedding-<date>-<time>)")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--active", type=int, default=512, help="tokens that occur in the synthetic data")
    p.add_argument("--lm-head-every", type=int, default=10)
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="dtype of the model's weights")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--token", type=int, default=7, help="token whose trajectory is printed")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized defaults (flags given explicitly still win): " + ", ".join(f"{k} {v}" for k, v in SMALL.items()))
    if "--small" in sys.argv[1:]:
        p.set_defaults(**SMALL)
    args = p.parse_args()
    args.out = args.out or time.strftime("runs/gpt2-embedding-%Y%m%d-%H%M%S")
    print(f"recording into {args.out}")

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = GPT(args.vocab, args.hidden, args.layers, args.heads, args.seq_len).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    V, H = args.vocab, args.hidden
    fields = {
        "wte": cr.Field((V, H), model.wte.weight.dtype, dims=("token", "hidden")),
        "lm_head": cr.Field((V, H), model.lm_head.weight.dtype, every=args.lm_head_every, dims=("token", "hidden")),
        "loss": cr.Field((), torch.float32),
    }
    started = time.perf_counter()
    with cr.record(args.out, fields, steps=args.steps, attributes={"model": "gpt2-shaped", **vars(args)}) as rec:
        for step in range(args.steps):
            ids = synthetic_batch(gen, min(args.active, V), args.batch_size, args.seq_len).to(device)
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
            tensors = {"wte": model.wte.weight, "loss": loss.detach()}
            if step % args.lm_head_every == 0:
                tensors["lm_head"] = model.lm_head.weight
            rec.record(step, **tensors)  # copies off the device before the weights change below
            if step == args.steps - 1:
                last_wte = model.wte.weight.detach().cpu().clone()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    print(f"recorded {args.steps} steps of a {sum(p.numel() for p in model.parameters()):,}-parameter model "
          f"in {time.perf_counter() - started:.1f} s")

    # ----- read back (lazily: each read touches only the chunks it needs) -------------------------
    t = cr.open(args.out)
    wte, lm_head, losses = t["wte"], t["lm_head"], t["loss"][:]
    print(f"committed steps: {t.committed_steps}")
    print(f"wte: {tuple(wte.shape)} {wte.dtype}, steps {wte.steps.start}..{wte.steps[-1]}")
    print(f"lm_head steps: {list(lm_head.steps)}")
    print(f"loss: step 0 {losses[0]:.4f} -> step {args.steps - 1} {losses[-1]:.4f}")
    token = wte[:, args.token].float()  # (steps, hidden): one token's trajectory, one column of chunks
    moved = (token[1:] - token[:-1]).norm(dim=1)
    print(f"token {args.token}: |wte[{args.steps - 1}] - wte[0]| = {(token[-1] - token[0]).norm():.6f}; "
          f"largest step-to-step move {moved.max():.6f} at step {int(moved.argmax()) + 1}")
    unseen = V - 1  # never in the data (when --active < --vocab): only weight decay could move it
    print(f"token {unseen} (unseen): |wte[{args.steps - 1}] - wte[0]| = "
          f"{(wte[-1, unseen].float() - wte[0, unseen].float()).norm():.6f}")
    head = lm_head[:, args.token].float()
    print(f"token {args.token} in lm_head at steps {list(lm_head.steps)}: norms "
          + ", ".join(f"{x:.4f}" for x in head.norm(dim=1).tolist()))
    print(f"last wte row equals the model's weight at that step: {torch.equal(wte[-1], last_wte)}")
    print(f"on disk: {t.bytes_on_disk() / 1e6:.2f} MB for {t.raw_bytes() / 1e6:.2f} MB of tensors")


if __name__ == "__main__":
    try:
        main()
    except cr.CrucibleError as e:  # e.g. not a run, or an existing run at --out: one line, no traceback
        sys.exit(f"error: {e}")
