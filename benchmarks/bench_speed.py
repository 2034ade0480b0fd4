"""The writer and the reads against the bare codec on the same bytes, in the same run.

Data: bf16 bits of a trained-looking embedding (``trajectory``: float32 master weights ~N(0, 0.02)
plus small Gaussian updates each step, ~35 % of the entries change a step), default preset
(transpose to step-last, zstd-3, crc32c). MB = 1e6 raw bytes. Each variant is one fresh process
(harness.compare: interleaved rounds, order rotated, A/A control of the limit).

Writer, at Crucible size (10,000 x 64, blocks of 64 steps) and GPT-2 size (50,257 x 768, the
time chunk cr.Layout(time_chunk=None) picks, codecs.time_chunk_for):
  bare encode     the preset's compressor (numcodecs, one thread) on one block's step-last chunks
  writer xN       cr.record(..., writer_threads=N, durability none) fed that same block again and
                  again as fast as record() accepts it, --blocks whole blocks, timed from the first
                  record() to close() returning; also its stalls and the child's peak RSS
  writer x1 fsync the same with the default durability (Crucible size only)
Reads of a --read-steps run written by cr.record (W and a float32 loss), page cache warm:
  bare decode     the same compressor decoding every inner chunk of W (encoded beforehand from the
                  same bytes) into one preallocated buffer, one thread
  scan            cr.open(run)["W"][a:a+T] for every block, the reader's default threads
  centroid        the scan plus [:, mask].float().mean(1), ~20 % of the rows masked
  verify, export  `crucible-record verify RUN` / `export RUN --out DIR` (the CLI, in-process)
  token           cr.open(run)["W"][:, tok] for random tokens: median ms per token trajectory

    python benchmarks/bench_speed.py [--rounds 5] [--read-rounds 3] [--quick] [--baseline-src DIR]
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

import harness

CRUCIBLE, GPT2 = (10000, 64), (50257, 768)
ROW_CHUNK = 100


def trajectory(rows: int, cols: int, steps: int, *, lr: float = 2.5e-5, seed: int = 0):
    """Yield the bf16 bits (uint16, (rows, cols)) of each of `steps` snapshots of a trained weight."""
    import torch

    g = torch.Generator().manual_seed(seed)
    master = torch.randn(rows, cols, generator=g) * 0.02
    for _ in range(steps):
        yield master.bfloat16().view(torch.uint16).numpy().copy()
        master += torch.randn(rows, cols, generator=g) * lr


def block_of(shape, T) -> np.ndarray:
    return np.stack(list(trajectory(*shape, T)))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----- children: one measurement each --------------------------------------------------------
def child(job: str, **spec) -> dict:
    return globals()[f"job_{job}"](**spec)


def job_bare_encode(shape, T, blocks, **_) -> dict:
    block = block_of(shape, T)
    chunks = harness.step_last_chunks(block, ROW_CHUNK)
    codec = harness.bare_compressor("uint16", chunks[0].shape)
    t0 = time.perf_counter()
    for _ in range(blocks):
        for c in chunks:
            codec.encode(c)
    return {"MBps": blocks * block.nbytes / (time.perf_counter() - t0) / 1e6}


def job_writer(shape, T, blocks, threads, durability, folder, **_) -> dict:
    import torch

    import crucible_record as cr

    block = block_of(shape, T)
    tensors = [torch.from_numpy(b).view(torch.bfloat16) for b in block]
    shutil.rmtree(folder, ignore_errors=True)
    rec = cr.record(folder, {"W": cr.Field(tuple(shape), torch.bfloat16)}, steps=blocks * T,
                    layout=cr.Layout(time_chunk=T, row_chunk=ROW_CHUNK), durability=durability, writer_threads=threads)
    t0 = time.perf_counter()
    for step in range(blocks * T):
        rec.record(step, W=tensors[step % T])
    rec.close()
    seconds = time.perf_counter() - t0
    exact = bool(np.array_equal(cr.open(folder)["W"][blocks * T - 1].view(torch.uint16).numpy(), block[-1]))
    shutil.rmtree(folder, ignore_errors=True)
    return {"MBps": blocks * block.nbytes / seconds / 1e6, "stalls": rec.stalls, "stall_s": rec.stall_seconds,
            "writer_s": rec.writer_seconds, "peak_rss_mb": peak_rss_mb(), "last_step_exact": exact}


def job_write_read_run(folder, steps, frames=None, **_) -> dict:
    """The run the reads use (not timed); with `frames`, also W's chunks through the bare compressor."""
    import torch

    import crucible_record as cr

    T, parts = 64, []
    fields = {"W": cr.Field(CRUCIBLE, torch.bfloat16), "loss": cr.Field((), torch.float32)}
    with cr.record(folder, fields, steps=steps, layout=cr.Layout(time_chunk=T, row_chunk=ROW_CHUNK),
                   durability="none") as rec:
        pending = []
        for s, bits in enumerate(trajectory(*CRUCIBLE, steps)):
            rec.record(s, W=torch.from_numpy(bits).view(torch.bfloat16), loss=torch.tensor(5.0 / (1 + s)))
            pending.append(bits)
            if frames and (len(pending) == T or s == steps - 1):
                chunks = harness.step_last_chunks(np.stack(pending), ROW_CHUNK)
                codec = harness.bare_compressor("uint16", chunks[0].shape)
                parts += [(np.frombuffer(codec.encode(c), np.uint8), c.nbytes) for c in chunks]
                pending = []
    if frames:
        np.savez(frames, data=np.concatenate([p for p, _ in parts]), sizes=[len(p) for p, _ in parts],
                 raw=[n for _, n in parts])
    return {}


def job_bare_decode(frames, **_) -> dict:
    saved = np.load(frames)
    data, sizes, raw = saved["data"], saved["sizes"], saved["raw"]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    pieces = [data[a:b] for a, b in zip(edges, edges[1:])]
    codec = harness.bare_compressor("uint16", (ROW_CHUNK, CRUCIBLE[1], 64))
    out = np.empty(int(raw.max()), np.uint8)
    t0 = time.perf_counter()
    for piece, n in zip(pieces, raw):
        codec.decode(piece, out=out[:n])
    return {"MBps": int(raw.sum()) / (time.perf_counter() - t0) / 1e6}


def job_read(what, folder, tokens=12, **_) -> dict:
    import torch

    import crucible_record as cr
    from crucible_record.cli import main as cli

    W = cr.open(folder)["W"]
    rows, T = len(W), 64
    nbytes = rows * CRUCIBLE[0] * CRUCIBLE[1] * 2
    mask = torch.from_numpy(np.random.default_rng(0).random(CRUCIBLE[0]) < 0.2)
    W[:, 0]  # warm-up
    t0 = time.perf_counter()
    if what in ("scan", "centroid"):
        for a in range(0, rows, T):
            x = W[a:min(a + T, rows)]
            if what == "centroid":
                x[:, mask].float().mean(1)
    elif what == "verify":
        cli(["verify", str(folder)])
    elif what == "export":
        out = Path(folder).with_name(Path(folder).name + "-export")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        cli(["export", str(folder), "--out", str(out)])
    elif what == "token":
        ms = []
        for tok in np.random.default_rng().integers(0, CRUCIBLE[0], tokens):
            t1 = time.perf_counter()
            W[:, int(tok)]
            ms.append((time.perf_counter() - t1) * 1e3)
        return {"ms": statistics.median(ms), "ms_all": ms}
    return {"MBps": nbytes / (time.perf_counter() - t0) / 1e6}


# ----- main ----------------------------------------------------------------------------------
def writer_table(res, args, name, shape, T, durabilities) -> None:
    import os

    folder = str(args.scratch / f"crucible-bench-speed-{os.getpid()}-w")
    common = {"shape": shape, "T": T, "blocks": args.blocks}
    variants = {"bare encode x1": {"job": "bare_encode", **common}}
    for threads, durability in durabilities:
        variants[f"writer x{threads}, {durability}"] = {"job": "writer", **common, "threads": threads,
                                                       "durability": durability, "folder": folder}
    runs = harness.compare(__file__, variants, "bare encode x1", args, library=list(variants)[1:])
    res.table(f"writer, {name} ({shape[0]} x {shape[1]} bf16, {T}-step blocks, {args.blocks} a run), MB/s",
              harness.summarize(runs, "MBps", "bare encode x1"), note="ratio: of one core of the bare codec")
    res.details[f"writer {name}"] = runs


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--read-rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=3, help="whole blocks a writer run [3]")
    p.add_argument("--read-steps", type=int, default=1200)
    args = p.parse_args()
    if args.quick:
        args.blocks, args.read_steps = 1, 136
    res = harness.Result("speed", args)
    from crucible_record.codecs import time_chunk_for  # the time chunk cr.Layout(time_chunk=None) gives

    import crucible_record as cr

    writer_table(res, args, "Crucible size", CRUCIBLE, 64, [(1, "none"), (2, "none"), (1, "fsync")])
    if not args.quick:
        T = time_chunk_for(cr.Layout(time_chunk=None), GPT2[0] * GPT2[1] * 2)
        writer_table(res, args, "GPT-2 size", GPT2, T, [(1, "none"), (2, "none")])

    import os

    scratch = args.scratch / f"crucible-bench-speed-{os.getpid()}"
    try:
        trees = {"": None, **({harness.BASE: args.baseline_src / "src"} if args.baseline_src else {})}
        for suffix, src in trees.items():  # each tree reads a run it wrote itself
            harness.run_child(__file__, {"job": "write_read_run", "folder": str(scratch / f"run{suffix.strip()}"),
                                         "steps": args.read_steps,
                                         "frames": None if src else str(scratch / "frames.npz")}, src)
        run = str(scratch / "run")
        variants = {"bare decode x1": {"job": "bare_decode", "frames": str(scratch / "frames.npz")},
                    **{w: {"job": "read", "what": w, "folder": run} for w in ("scan", "centroid", "verify", "export")},
                    "token": {"job": "read", "what": "token", "folder": run}}
        runs = harness.compare(__file__, variants, "bare decode x1", args, library=list(variants)[1:],
                               rounds=args.read_rounds, baseline_spec=lambda s: {**s, "folder": run + "@base"})
        res.table(f"reads of a {args.read_steps}-step Crucible-size run, MB/s of W (verify, export: of W)",
                  harness.summarize({k: v for k, v in runs.items() if not k.startswith("token")}, "MBps",
                                    "bare decode x1"), note="ratio: of one core of the bare decoder")
        res.table(f"one token's trajectory ({args.read_steps} steps), median ms",
                  harness.summarize({k: v for k, v in runs.items() if k.startswith("token")}, "ms", "token"))
        res.details["reads"] = runs
        disk = sum(f.stat().st_size for f in Path(run).rglob("*") if f.is_file() and "/W/" in str(f))
        res.row("compression of W, default preset (synthetic trajectory)",
                round(args.read_steps * CRUCIBLE[0] * CRUCIBLE[1] * 2 / disk, 3), "x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
