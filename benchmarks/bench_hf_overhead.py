"""What recording costs a training loop, end to end: a Hugging Face GPT-2 loop and (--crucible) the
Crucible-3 loop, each run a fresh process, interleaved rounds, medians, A/A control.

HF: ``GPT2LMHeadModel`` (n_embd 64, 2 layers, vocab 5000, built from a config) trained by its own
AdamW loop, --steps steps of batch 8 x 64 tokens, recording through plain ``rec.record`` calls:
wte (float32, every step: 1.28 MB a step), the grad norm every 5 steps, a 500-row bf16 copy of
wte, the loss. Variants:
    none        unrecorded (the loop computes the grad norm and the bf16 copy all the same)
    recorded    cr.record with its defaults
    bare_codec  the physical limit: unrecorded, with the recorded bytes' own work beside it -- each
                full block's step-last inner chunks through the default preset's compressor
                (harness.bare_compressor), one thread at the writer's nice while training runs,
                what is left on every core after the last step, as the recorder does
Reported: wall seconds from the first step to close() returning; the step-time p50/p99/max of
each run (bursts at block boundaries show there); stalls and the writer's busy seconds.

--crucible: the Crucible-3 config at batch 16 x seq 128, 12 steps, blocks of 4 steps, default
layout otherwise: ``crucible3.engine.train(config, inputs, rec)`` with rec = cr.record(...) of the
experiment's own fields (as `crucible-record train --no-checkpoints` records them) against
``train(config, inputs, None)``; the inputs are loaded before the clock in both (--quick: 4 steps
of batch 2 x seq 16, a smoke test). --device cuda
runs it on a GPU (benchmarks/gpu_check.sh).

    python benchmarks/bench_hf_overhead.py [--rounds 5] [--steps 200] [--crucible] [--no-hf] [--baseline-src DIR]
"""

from __future__ import annotations

import queue
import shutil
import statistics
import threading
import time

import harness

VOCAB, HIDDEN, BATCH, SEQ, T = 5000, 64, 8, 64, 64


class BareCodec:
    """The recorded bytes' compression, with the writer's thread and priority and nothing else."""

    def __init__(self):
        self.blocks: dict[str, list] = {}
        self.work: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def add(self, name: str, tensor) -> None:
        import torch

        rows = self.blocks.setdefault(name, [])
        rows.append((tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().copy())
        if len(rows) == T:
            self.work.put(self.blocks.pop(name))

    def _run(self) -> None:
        harness.lower_thread_priority()
        while (rows := self.work.get()) is not None:
            for job in self.jobs(rows):
                job()

    @staticmethod
    def jobs(rows: list) -> list:
        import numpy as np

        block = np.stack(rows)
        if block.ndim == 1:
            codec = harness.bare_compressor(block.dtype.str, (T,))
            return [lambda: codec.encode(block)]
        chunks = harness.step_last_chunks(block, 100)
        codec = harness.bare_compressor(block.dtype.str, chunks[0].shape)
        return [lambda c=c: codec.encode(c) for c in chunks]

    def close(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from crucible_record.shardio import default_threads

        self.work.put(None)
        self.thread.join()
        with ThreadPoolExecutor(default_threads()) as pool:
            list(pool.map(lambda job: job(), [j for rows in self.blocks.values() for j in self.jobs(rows)]))


def counters(rec) -> dict:
    """The Recorder's documented counters (None: unrecorded)."""
    if rec is None:
        return {"stalls": 0, "stall_s": 0.0, "writer_s": 0.0}
    return {"stalls": rec.stalls, "stall_s": rec.stall_seconds, "writer_s": rec.writer_seconds, "slots": rec.slots}


def child(workload: str, variant: str, steps: int, folder: str, device: str = "cpu", quick: bool = False) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    try:
        return hf_child(variant, steps, folder) if workload == "hf" else crucible_child(variant, folder, device, quick)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def hf_child(variant: str, steps: int, folder: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import crucible_record as cr

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=SEQ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wte = model.transformer.wte.weight
    sample = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:500]
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(16)]
    fields = {"wte": cr.Field((VOCAB, HIDDEN), torch.float32), "grad_norm": cr.Field((), torch.float32, every=5),
              "wte_bf16_some": cr.Field((VOCAB, HIDDEN), torch.bfloat16, rows=sample.tolist()),
              "loss": cr.Field((), torch.float32)}
    rec = cr.record(folder, fields, steps=steps) if variant == "recorded" else None
    bare = BareCodec() if variant == "bare_codec" else None
    stamps = [time.perf_counter()]
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        some = wte.detach().to(torch.bfloat16)
        tensors = {"wte": wte.detach(), "wte_bf16_some": some, "loss": loss.detach()}
        if step % 5 == 0:
            tensors["grad_norm"] = grad_norm
        if rec is not None:
            rec.record(step, **tensors)
        if bare is not None:
            tensors["wte_bf16_some"] = some[sample]
            for name, tensor in tensors.items():
                bare.add(name, tensor)
        optimizer.step()
        stamps.append(time.perf_counter())
    if rec is not None:
        rec.close()
    if bare is not None:
        bare.close()
    step_ms = sorted((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))
    return {"wall_s": time.perf_counter() - stamps[0], "p50_ms": statistics.median(step_ms),
            "p99_ms": step_ms[min(len(step_ms) - 1, round(0.99 * (len(step_ms) - 1)))], "max_ms": step_ms[-1],
            **counters(rec)}


def crucible_child(variant: str, folder: str, device: str, quick: bool = False) -> dict:
    import torch

    import crucible_record as cr
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.engine import fields, load_inputs, train

    config = (RunConfig(steps=12, batch_size=16, seq_len=128, device=device) if not quick else
              RunConfig(steps=4, batch_size=2, seq_len=16, device=device))
    inputs = load_inputs(config)
    began = time.perf_counter()
    rec = None
    if variant == "recorded":
        rec = cr.record(folder, fields(config, inputs.masks), steps=config.steps + 1, layout=cr.Layout(time_chunk=4),
                        constants={"dead_mask": (inputs.masks.dead_mask, ("token",)),
                                   "dead_indices": (inputs.masks.dead_indices, ("dead_token",))})
    train(config, inputs, rec, progress=False)
    if rec is not None:
        rec.close()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - began, **counters(rec)}


def main() -> None:
    import os

    p = harness.parser(__doc__)
    p.add_argument("--steps", type=int, default=200, help="HF steps a run [200; --quick 10]")
    p.add_argument("--crucible", action="store_true", help="also the Crucible-3 batch-16 loop")
    p.add_argument("--no-hf", action="store_true", help="only the Crucible-3 loop")
    p.add_argument("--device", default="cpu", help="device of the Crucible-3 loop [cpu]")
    args = p.parse_args()
    steps = 10 if args.quick else args.steps
    res = harness.Result("hf_overhead" if not args.no_hf else "crucible_overhead", args)
    folder = str(args.scratch / f"crucible-bench-overhead-{os.getpid()}")
    workloads = ([] if args.no_hf else ["hf"]) + (["crucible"] if args.crucible or args.no_hf else [])
    for workload in workloads:
        names = ("none", "recorded", "bare_codec") if workload == "hf" else ("none", "recorded")
        variants = {v: {"workload": workload, "variant": v, "steps": steps, "folder": f"{folder}-{v}",
                        "device": args.device, "quick": args.quick} for v in names}
        runs = harness.compare(__file__, variants, "none", args,
                               library=["recorded"] if workload == "hf" else ["none", "recorded"],
                               baseline_spec=lambda s: {**s, "folder": s["folder"] + "-base"})
        label = (f"HF GPT-2 loop, {steps} steps" if workload == "hf" else
                 f"Crucible-3 loop, batch 16 x seq 128, 12 steps, blocks of 4, {args.device}")
        res.table(f"{label}: wall seconds", harness.summarize(runs, "wall_s", "none"),
                  note="ratio: recorded / unrecorded; bare_codec: the physical limit")
        if workload == "hf":
            res.table(f"{label}: step-time p99, ms", harness.summarize(runs, "p99_ms", "none"))
        res.details[workload] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
