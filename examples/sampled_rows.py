"""Record a sample of an embedding's rows every step, and a per-token statistic every 3 steps.

    python examples/sampled_rows.py --out /tmp/sampled-run
    python examples/sampled_rows.py --small   # seconds on a CPU; into runs/sampled-rows-<date>-<time>

A 50,000-row embedding is too big to keep whole at every step for a long run; a fixed random sample
of its rows (2,000 by default) often answers the question. ``cr.Field(rows=...)`` keeps only those
rows: they are selected on the tensor's device before the copy, and their indices are stored with
the run (``t["emb_some"].rows``). Recorded fields:

    emb_some  (vocab, hidden) float32, rows=sample   every step      -> stored (steps, sample, hidden)
    grad_rms  (vocab,)        float16                every 3 steps   RMS of each token's gradient row
    loss      ()              float32                every step

The model is a bag of embeddings classifying sequences of Zipf-distributed tokens, so frequent
tokens get gradients often and rare ones seldom. Row s holds the weights used at step s and the
gradient they produced (recorded after backward, before the optimizer step).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import crucible_record as cr


SMALL = dict(vocab=5000, sample=200, hidden=16, steps=10, batch_size=8, seq_len=16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="new run directory (default: runs/sampled-rows-<date>-<time>)")
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--sample", type=int, default=2_000, help="rows of the embedding kept")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--stat-every", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true",
                   help="CPU-sized defaults (flags given explicitly still win): " + ", ".join(f"{k} {v}" for k, v in SMALL.items()))
    if "--small" in sys.argv[1:]:
        p.set_defaults(**SMALL)
    args = p.parse_args()
    args.out = args.out or time.strftime("runs/sampled-rows-%Y%m%d-%H%M%S")
    print(f"recording into {args.out}")
    V, H = args.vocab, args.hidden

    # The sample: unique row indices (Field(rows=...) takes any order and stores them as given);
    # sorted here so that a token's position among the stored rows is a searchsorted away.
    sample = np.sort(np.random.default_rng(args.seed).choice(V, size=args.sample, replace=False))

    torch.manual_seed(args.seed)
    emb = nn.Embedding(V, H)
    head = nn.Linear(H, args.classes)
    optimizer = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.5)
    token_class = torch.randint(0, args.classes, (V,))  # the label a token votes for
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)  # token i has frequency ~ 1/(i+1)

    fields = {
        "emb_some": cr.Field((V, H), torch.float32, rows=sample, dims=("token", "hidden")),
        "grad_rms": cr.Field((V,), torch.float16, every=args.stat_every, dims=("token",)),
        "loss": cr.Field((), torch.float32),
    }
    with cr.record(args.out, fields, steps=args.steps, attributes={"example": "sampled_rows", **vars(args)}) as rec:
        for step in range(args.steps):
            ids = torch.multinomial(zipf, args.batch_size * args.seq_len, replacement=True).view(args.batch_size, -1)
            labels = torch.mode(token_class[ids], dim=1).values  # the majority vote of a sequence's tokens
            loss = F.cross_entropy(head(emb(ids).mean(1)), labels)
            optimizer.zero_grad()
            loss.backward()
            tensors = {"emb_some": emb.weight, "loss": loss.detach()}
            if step % args.stat_every == 0:
                tensors["grad_rms"] = emb.weight.grad.pow(2).mean(1).sqrt().half()
            rec.record(step, **tensors)  # emb_some: only the sampled rows are copied
            if step == args.steps - 1:
                last = emb.weight.detach().clone()
            optimizer.step()

    # ----- read back -------------------------------------------------------------------------------
    t = cr.open(args.out)
    some, stat = t["emb_some"], t["grad_rms"]
    rows = some.rows  # tensor of the kept row indices, in the order they are stored
    print(f"emb_some: stored {tuple(some.shape)} of a ({V}, {H}) embedding; {len(rows)} rows kept, "
          f"first {rows[:5].tolist()}")
    print(f"rows stored equal the sample: {np.array_equal(rows.numpy(), sample)}")
    print(f"last step's stored rows equal the weight's rows: {torch.equal(some[-1], last[rows])}")
    for token in (int(rows[0]), int(rows[-1])):  # the most and the least frequent sampled token
        i = int(torch.searchsorted(rows, token))  # token id -> its position among the stored rows
        path = some[:, i]  # (steps, hidden): one sampled token's trajectory
        print(f"token {token} (stored row {i}): moved {(path[-1] - path[0]).norm():.6f} over {len(some)} steps")
    print(f"grad_rms steps: {list(stat.steps)}")
    g = stat[:].float()  # (recorded steps, vocab)
    print(f"grad_rms: {tuple(g.shape)} {stat.dtype}; tokens with a gradient at step {stat.steps[-1]}: "
          f"{(g[-1] > 0).float().mean():.1%}; token {int(rows[0])}'s RMS over time: "
          + ", ".join(f"{x:.2e}" for x in g[:, int(rows[0])].tolist()[:6]) + (", ..." if len(g) > 6 else ""))
    print(f"loss: {float(t['loss'][0]):.4f} -> {float(t['loss'][-1]):.4f}")
    full = len(some) * V * H * 4
    print(f"on disk: {t.bytes_on_disk() / 1e6:.2f} MB (the whole embedding every step would be {full / 1e6:.1f} MB raw)")


if __name__ == "__main__":
    try:
        main()
    except cr.CrucibleError as e:  # e.g. not a run, or an existing run at --out: one line, no traceback
        sys.exit(f"error: {e}")
