"""Record a training loop that is not crucible-record's engine, in a few lines.

A toy regression whose weight matrix plays the part of W. Run:
    python examples/record_custom_loop.py /tmp/custom-run
then read it back with `crucible-record info /tmp/custom-run` or `crucible_record.open`.
"""

import sys

import numpy as np
import torch

import crucible_record as cr
from crucible_record.store import create_store

run_dir = sys.argv[1] if len(sys.argv) > 1 else "custom-run"
steps, vocab, hidden = 200, 1000, 32

torch.manual_seed(0)
emb = torch.nn.Embedding(vocab, hidden)
opt = torch.optim.SGD(emb.parameters(), lr=0.1)
target = torch.randn(hidden)
unused = np.zeros(vocab, dtype=bool)
unused[500:] = True  # tokens 500.. never appear in the batches below: "dead"

# 1. a store sized for the run, 2. a Recorder, 3. one record() per step.
group = create_store(run_dir, steps=steps, vocab_size=vocab, hidden_dim=hidden, dead_mask=unused,
                     attributes={"config": {"steps": steps, "vocab_size": vocab, "hidden_dim": hidden}})
with cr.Recorder(group) as recorder:
    recorder.record(0, W=emb.weight)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 500, (64,))
        h = emb(ids)
        loss = ((h - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.record(step, W=emb.weight, h_mean=h.detach().mean(0), loss=loss.detach())

traj = cr.open(run_dir)
print(f"recorded {traj.steps} steps; token 7 moved {float((traj.W[-1, 7].float() - traj.W[0, 7].float()).norm()):.4f}, "
      f"dead token 700 moved {float((traj.W[-1, 700].float() - traj.W[0, 700].float()).norm()):.4f}")
