"""Record your own training loop in a few lines: name the tensors, give their shapes, record each step.

A toy regression: an embedding whose rows for the tokens in a batch are pulled toward a target.
Tokens 500.. never occur in the batches ("unused"): their rows never move. Run:

    python examples/record_custom_loop.py --small [--out runs/custom] [--steps 200]

(default --out: runs/custom-loop-<date>-<time>), then read it back with `crucible-record info RUN`
or `crucible_record.open`.
"""

import argparse
import sys
import time

import torch

import crucible_record as cr

p = argparse.ArgumentParser()
p.add_argument("--out", help="new run directory (default: runs/custom-loop-<date>-<time>)")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--vocab", type=int, default=1000)
p.add_argument("--hidden", type=int, default=32)
p.add_argument("--small", action="store_true", help="CPU-sized defaults: 20 steps, vocab 200 (flags given explicitly still win)")
if "--small" in sys.argv[1:]:
    p.set_defaults(steps=20, vocab=200)
args = p.parse_args()
steps, vocab, hidden = args.steps, args.vocab, args.hidden
run_dir = args.out or time.strftime("runs/custom-loop-%Y%m%d-%H%M%S")
print(f"recording into {run_dir}")

torch.manual_seed(0)
emb = torch.nn.Embedding(vocab, hidden)
opt = torch.optim.SGD(emb.parameters(), lr=0.1)
target = torch.randn(hidden)
unused = torch.zeros(vocab, dtype=torch.bool)
unused[vocab // 2:] = True  # never sampled below

# 1. Describe what is recorded: name -> shape, dtype (and optionally every=K, rows=..., dims=...).
fields = {
    "embedding": cr.Field((vocab, hidden), torch.float32, dims=("token", "hidden")),
    "batch_mean": cr.Field((hidden,), torch.float32, dims=("hidden",)),
    "loss": cr.Field((), torch.float32),
}
# 2. Open the run (steps=N sizes it for steps 0..N-1; leave it out for an open-ended run).
try:
    rec = cr.record(run_dir, fields, steps=steps, constants={"unused": unused},
                    attributes={"what": "toy regression", "lr": 0.1})
except cr.CrucibleError as e:  # e.g. an existing run at --out: one line, no traceback
    sys.exit(f"error: {e}")
with rec:
    for step in range(steps):
        ids = torch.randint(0, vocab // 2, (64,))
        h = emb(ids)
        loss = ((h - target) ** 2).mean()
        # 3. Record the step: every field due at this step, by name. The copy is taken now.
        rec.record(step, embedding=emb.weight, batch_mean=h.detach().mean(0), loss=loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()

run = cr.open(run_dir)
E = run["embedding"]  # lazy: indexing reads only the chunks it needs
print(f"recorded {run.committed_steps} steps of {', '.join(run.fields)}; constants: {', '.join(run.info.constants)}")
print(f"embedding: {tuple(E.shape)} {E.dtype}; loss {float(run['loss'][0]):.4f} -> {float(run['loss'][-1]):.4f}")
dead = run["unused"]
print(f"token 7 moved {float((E[-1, 7] - E[0, 7]).norm()):.4f}, "
      f"unused token {vocab - 1} moved {float((E[-1, vocab - 1] - E[0, vocab - 1]).norm()):.4f}; "
      f"unused rows unchanged: {torch.equal(E[-1][dead], E[0][dead])}")
