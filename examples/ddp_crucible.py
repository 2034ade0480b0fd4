"""Record a data-parallel (DDP) run of the Crucible-3 TinyLM from every rank: one run, committed as one.

    python examples/ddp_crucible.py --small                    # 2 ranks (spawned), gloo, CPU, seconds; into runs/
    python examples/ddp_crucible.py --out runs/ddp --steps 200 # the notebook's model sizes
    torchrun --nproc-per-node 2 examples/ddp_crucible.py --out runs/ddp   # the same under torchrun

Every rank runs the same loop: DDP over TinyLM (``crucible_record.crucible3.model``) on the shipped
corpus and tokenizer (``crucible_record.crucible3.data``), each rank on its own part of every
global batch (DistributedSampler). Every rank calls ``cr.record`` with the same fields and hands
each step to it; the recorder runs no collective per step (only at its start and first step):

    W       (vocab, hidden) bf16   split: rank r hands over its rows, cr.Shard(W[a:b], offset=a), and
                                   writes only those (rank 0 rows 0..4999, rank 1 rows 5000..9999)
    h_mean  (hidden,) float32      replicated: the same tensor on every rank; rank 0 writes it
    loss    () float32             replicated, like h_mean

Step 0 is the initial embedding (no forward pass yet: h_mean and loss are NaN), step s the state
after training step s, as in a Crucible-3 run. DDP keeps a whole replica of W on every rank, so any
rank could write all of it; splitting the rows splits the writing (compression and I/O) among the
ranks. With a model whose embedding is really sharded (tensor parallel, FSDP), each rank hands over
the rows it holds in the same way.

What h_mean of a data-parallel step means. The notebook's h_mean is the mean of the final hidden
state over its whole batch (every sequence and position). Under DDP the global batch of a step is
split into one local batch per rank, and each rank only sees the hidden states of its own. The mean
over the whole global batch is the mean over ranks of each rank's local mean when the local batches
are equal (the same number of sequences and positions on every rank; DistributedSampler with
drop_last and a fixed batch size make it so):

    h_mean = (1 / (R*B*T)) * sum over ranks r, sequences, positions of h = (1/R) * sum_r mean_r(h)

The example gets it on the training thread: each rank computes its local mean, then
``dist.all_reduce(local_mean, SUM) / world_size`` — the training's own collective, next to DDP's
gradient all-reduce, not the recorder's — and hands the result, identical on every rank, to the
recorder as a replicated field. The loss is averaged the same way (cross-entropy is a mean over
each rank's equally many tokens). With unequal local batches, all-reduce sums and counts instead.

The global batch is world_size x --batch-size sequences, drawn in another order than the notebook's
DataLoader: this is a Crucible-3-shaped run, not the notebook's trajectory.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import crucible_record as cr
from crucible_record.crucible3.data import (TextDataset, default_corpus_path, default_tokenizer_path,
                                            load_tokenizer, tokenize_corpus)
from crucible_record.crucible3.model import TinyLM

VOCAB = 10000  # the shipped tokenizer's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the run directory, a new one (default: runs/ddp-crucible-<date>-<time>)")
    parser.add_argument("--ranks", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--time-chunk", type=int, default=None, help="steps per stored block (default: auto)")
    parser.add_argument("--corpus", default=str(default_corpus_path()))
    parser.add_argument("--tokenizer", default=str(default_tokenizer_path()))
    parser.add_argument("--small", action="store_true",
                        help="small sizes for a quick CPU check: batch 4, seq-len 16, hidden 16, 1 layer")
    args = parser.parse_args(argv)
    if args.small:
        args.batch_size, args.seq_len, args.hidden_dim, args.num_layers = 4, 16, 16, 1
    if args.out is None:  # the same on every rank under torchrun, unless they start in another second: give --out
        args.out = time.strftime("runs/ddp-crucible-%Y%m%d-%H%M%S")
    return args


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    tokens = tokenize_corpus(args.corpus, load_tokenizer(args.tokenizer, VOCAB))
    dataset = TextDataset(tokens, args.seq_len)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"the corpus holds {len(dataset)} sequences: too few for {world} ranks x {args.batch_size}")

    model = TinyLM(VOCAB, args.hidden_dim, args.num_layers, args.num_heads, args.seq_len).to(torch.bfloat16)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    rows = -(-VOCAB // world)  # torch.chunk's split of the vocabulary: equal shards, a shorter last one
    first, last = min(rank * rows, VOCAB), min((rank + 1) * rows, VOCAB)
    W = model.embedding.weight

    def mine() -> cr.Shard:
        return cr.Shard(W.detach()[first:last], offset=first)

    def mean_over_ranks(local: torch.Tensor) -> torch.Tensor:
        """The global batch's mean from the ranks' equal-sized local means (see the docstring)."""
        total = local.detach().float().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # the training's collective, on the training thread
        return total / world

    fields = {
        "W": cr.Field((VOCAB, args.hidden_dim), torch.bfloat16, dims=("token", "hidden")),
        "h_mean": cr.Field((args.hidden_dim,), torch.float32, dims=("hidden",)),
        "loss": cr.Field((), torch.float32),
    }
    attributes = {"experiment": "crucible-3-ddp", "world_size": world, "batch_size_per_rank": args.batch_size,
                  "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed}
    nan = torch.full((args.hidden_dim,), float("nan"))
    local_means = None
    with cr.record(args.out, fields, steps=args.steps + 1, attributes=attributes,
                   layout=cr.Layout(time_chunk=args.time_chunk)) as rec:
        rec.record(0, W=mine(), h_mean=nan, loss=nan[0].clone())
        step, epoch = 0, 0
        while step < args.steps:
            sampler.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                if step >= args.steps:
                    break
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                    logits, h = ddp(batch, return_hidden=True)
                    loss = loss_fn(logits[:, :-1, :].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
                optimizer.zero_grad()
                loss.backward()  # DDP all-reduces the gradients here
                optimizer.step()
                step += 1
                local_mean = h.detach().mean(dim=(0, 1)).float()
                rec.record(step, W=mine(), h_mean=mean_over_ranks(local_mean), loss=mean_over_ranks(loss))
        local_means = local_mean  # of the last step, for the check below
    # (recorded and committed: every rank's close returns once rank 0 committed the last step)

    # A check, not part of recording: gather the last step's local means (an extra collective).
    gathered = [torch.empty_like(local_means) for _ in range(world)]
    dist.all_gather(gathered, local_means)
    if rank == 0:
        t = cr.open(args.out)
        partition = t["W"].array.attrs["crucible_record"]["partition"]["shards"]
        print(", ".join(f"rank {s['ranks'][0]} {'recorded W rows' if i == 0 else 'rows'} "
                        f"{s['offset']}..{s['offset'] + s['rows'] - 1}" for i, s in enumerate(partition)))
        last = t.committed_steps - 1
        same_w = torch.equal(t["W"][last].view(torch.int16), W.detach().view(torch.int16))
        print(f"the recorded W of step {last} equals rank 0's model: {same_w}")
        expected = torch.stack(gathered).mean(dim=0)
        same_h = torch.allclose(t["h_mean"][last], expected, rtol=1e-6, atol=0)
        print(f"the recorded h_mean of step {last} equals the mean of the ranks' local means: {same_h}")
        print(f"loss: step 1 {t['loss'][1].item():.4f} -> step {last} {t['loss'][last].item():.4f}; "
              f"{t.committed_steps} steps committed in {args.out}")
    # Every rank tears the process group down together: a rank that destroys it and exits while a
    # peer still holds its gloo connection can be aborted by gloo ("terminate called without an
    # active exception", seen once in CI on rank 1 while rank 0 was still checking the run).
    dist.barrier()


def spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)  # (an existing run at --out is refused by cr.record, on every rank; here first, in one line)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise SystemExit(f"error: --out {args.out} already exists and is not empty; choose a new directory")
    print(f"recording into {args.out}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:  # a free port for the spawned ranks to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(spawned, args=(args.ranks, port, args), nprocs=args.ranks)
    except mp.ProcessRaisedException as e:  # a rank's error, with its traceback: say its last line
        raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}") from None


if __name__ == "__main__":
    sys.exit(main())
