"""Target 6: lazy reads (crucible_record.open) vs the same data in a safetensors file.

On the recorded run (all committed steps; the count is stated) and on re-encodings of the same W
into stores with other chunk shapes / codec, through the public API (cr.open(...).W[...]):
  one step          W[s]                     (median of 5 random steps)
  one token         W[:, tok]                (median of 5 random tokens) - target <= 20 ms
  full scan         every W block decoded    GB/s of decoded bf16 - target >= 1 GB/s
  dead centroid     mean over dead tokens, every step (W[a:b][:, dead].float().mean(1)), GB/s
and the same reads from the exported safetensors file via safe_open (get_slice) and a numpy
memory map. The page cache is warm for both (files just written or read); 2 cores.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (QUICK_RUN_NOTE, Result, codec_label, commit, dir_bytes, make_store, median, parser, r,  # noqa: E402
                     recorded_run, scratch_dir, src_layout)


def timed(f, repeat=1):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts) if repeat > 1 else ts[0]


def zarr_reads(t, rows: int, dead_idx, steps_probe, tokens_probe) -> dict:
    import torch

    W = t.W
    vocab, hidden = W.shape[1:]
    T = W.array.chunks[0]
    one_step = [timed(lambda s=s: W[s]) * 1000 for s in steps_probe]
    one_token = [timed(lambda k=k: W[:rows, k]) * 1000 for k in tokens_probe]
    nbytes = rows * vocab * hidden * 2

    def scan():
        for a in range(0, rows, T):
            W[a:min(a + T, rows)]

    def centroid():
        out = []
        for a in range(0, rows, T):
            out.append(W[a:min(a + T, rows)][:, dead_idx].float().mean(1))
        return torch.cat(out)

    scan_s = timed(scan)
    cent_s = timed(centroid)
    return {
        "one_step_ms": r(median(one_step), 2),
        "one_token_ms": r(median(one_token), 2),
        "full_scan_GBps": r(nbytes / scan_s / 1e9, 3),
        "dead_centroid_scan_GBps": r(nbytes / cent_s / 1e9, 3),
        "full_scan_s": r(scan_s, 2),
        "dead_centroid_s": r(cent_s, 2),
    }


def safetensors_reads(path: Path, rows: int, dead_idx, steps_probe, tokens_probe, T=32) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="np") as f:
        sl = f.get_slice("W")
        vocab, hidden = sl.get_shape()[1:]
        out["safe_open_one_step_ms"] = r(median([timed(lambda s=s: sl[s:s + 1]) * 1000 for s in steps_probe]), 3)
        out["safe_open_one_token_ms"] = r(median([timed(lambda k=k: sl[:rows, k:k + 1]) * 1000 for k in tokens_probe]), 3)

        def scan():
            for a in range(0, rows, T):
                np.ascontiguousarray(sl[a:min(a + T, rows)])

        def centroid():
            res = []
            for a in range(0, rows, T):
                blk = torch.from_numpy(np.ascontiguousarray(sl[a:min(a + T, rows)])).view(torch.bfloat16)
                res.append(blk[:, dead_idx].float().mean(1))
            return torch.cat(res)

        nbytes = rows * vocab * hidden * 2
        out["safe_open_full_scan_GBps"] = r(nbytes / timed(scan) / 1e9, 3)
        out["safe_open_dead_centroid_scan_GBps"] = r(nbytes / timed(centroid) / 1e9, 3)
    # numpy memory map of the same file
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    start = 8 + n + header["W"]["data_offsets"][0]
    mm = np.memmap(path, dtype="<u2", mode="r", offset=start, shape=tuple(header["W"]["shape"]))
    out["memmap_one_step_ms"] = r(median([timed(lambda s=s: np.array(mm[s])) * 1000 for s in steps_probe]), 3)
    out["memmap_one_token_ms"] = r(median([timed(lambda k=k: np.array(mm[:rows, k])) * 1000 for k in tokens_probe]), 3)

    def mscan():
        for a in range(0, rows, T):
            np.array(mm[a:min(a + T, rows)])

    out["memmap_full_scan_GBps"] = r(rows * mm.shape[1] * mm.shape[2] * 2 / timed(mscan) / 1e9, 3)
    del mm
    return out


def reencode(src_bits_reader, rows, vocab, hidden, dead_mask, folder: Path, T: int, tokens: int, codec: str) -> dict:
    group = make_store(folder, steps=rows - 1, vocab=vocab, hidden=hidden, time_chunk=T, token_chunk=tokens,
                       codec=codec, dead_mask=dead_mask)
    W = group["W"]
    t0 = time.perf_counter()
    write_s = 0.0
    for a in range(0, rows, T):
        block = src_bits_reader(a, min(a + T, rows))
        t1 = time.perf_counter()
        W[a:a + len(block)] = block
        write_s += time.perf_counter() - t1
    commit(folder, rows)
    return {"write_MBps": r(rows * vocab * hidden * 2 / 2**20 / write_s, 1),
            "ratio": r(rows * vocab * hidden * 2 / dir_bytes(folder / "trajectory.zarr" / "W"), 2),
            "reencode_total_s": r(time.perf_counter() - t0, 1)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--max-wait", type=float, default=0, help="seconds to wait for the run to reach 500 steps")
    args = p.parse_args()
    res = Result("reads", args.quick)
    import crucible_record as cr
    from crucible_record.crucible3.export import export_safetensors

    t = recorded_run(args, 500, args.max_wait)
    if getattr(args, "quick_run", False):
        res.smoke_note = QUICK_RUN_NOTE
    rows = min(t.steps + 1, 65 if args.quick else 10**9)
    vocab, hidden = t.W.shape[1:]
    dead_mask = t.dead_mask.numpy()
    dead_idx = t.dead_indices
    rng = np.random.default_rng(1)
    steps_probe = [int(x) for x in rng.integers(0, rows, 5)]
    tokens_probe = [int(x) for x in rng.integers(0, vocab, 5)]
    res.details["source"] = {"run": str(args.run), "committed_steps": t.steps, "rows_read": rows,
                             "raw_MB": r(rows * vocab * hidden * 2 / 2**20, 1), "n_dead": int(dead_mask.sum()),
                             "page_cache": "warm"}
    print(f"reading W[0:{rows}] of {args.run} ({t.steps} steps committed)", flush=True)

    layouts = {}
    real = zarr_reads(t, rows, dead_idx, steps_probe, tokens_probe)
    rec = t.info.layout
    REC = (f"the recorded run as written: T={t.W.array.chunks[0]} tokens={rec.row_chunk} {codec_label(rec.codec)}"
           f" (format {t.version})")
    layouts[REC] = {"time_chunk": t.W.array.chunks[0], "token_chunk": rec.row_chunk, "codec": rec.codec, **real}
    print(f"  {REC}: {real}", flush=True)
    L = src_layout()
    alts = [(L.time_chunk, L.row_chunk, "default"), (32, 100, "default"), (64, 500, "default"), (32, 500, "default")]
    if args.quick:
        alts = [(L.time_chunk, L.row_chunk, "default"), (32, 100, "default")]
    alts = list(dict.fromkeys(alts))

    def reader(a, b):
        return np.ascontiguousarray(t.W.numpy(slice(a, b)))

    with scratch_dir("reads") as d:
        for T, tokens, codec in alts:
            folder = d / f"T{T}-tok{tokens}-{codec.replace('+', '_')}"
            w = reencode(reader, rows, vocab, hidden, dead_mask, folder, T, tokens, codec)
            tt = cr.open(folder)
            m = zarr_reads(tt, rows, dead_idx, steps_probe, tokens_probe)
            key = f"T={T} tokens={tokens} {codec_label(codec)}" + (" = src default Layout" if (T, tokens, codec) == (L.time_chunk, L.row_chunk, "default") else "")
            layouts[key] = {"time_chunk": T, "token_chunk": tokens, "codec": codec, **w, **m}
            print(f"  {key}: {layouts[key]}", flush=True)
        t0 = time.perf_counter()
        target, _ = export_safetensors(t, d / "export")
        export_s = time.perf_counter() - t0
        st = safetensors_reads(target, rows, dead_idx.numpy(), steps_probe, tokens_probe)
        st["export_s"] = r(export_s, 2)
        print(f"  safetensors: {st}", flush=True)
    res.details["layouts"] = layouts
    res.details["safetensors"] = st
    cur_key = next(k for k in layouts if k.endswith("= src default Layout"))
    cur = layouts[cur_key]
    best_tok = min(layouts.items(), key=lambda kv: kv[1]["one_token_ms"])
    best_scan = max(layouts.items(), key=lambda kv: kv[1]["full_scan_GBps"])
    res.target("6a", f"one token's whole trajectory <= 20 ms ({rows - 1} steps, {cur_key})", cur["one_token_ms"],
               cur["one_token_ms"] <= 20, unit=" ms",
               note=f"best: {best_tok[0]} {best_tok[1]['one_token_ms']} ms; safetensors safe_open "
                    f"{st['safe_open_one_token_ms']} ms, memmap {st['memmap_one_token_ms']} ms; the recorded run's layout "
                    f"{layouts[REC]['one_token_ms']} ms")
    res.target("6b", f"full scan >= 1 GB/s decoded bf16 ({rows - 1} steps, {cur_key})", cur["full_scan_GBps"],
               cur["full_scan_GBps"] >= 1.0, unit=" GB/s",
               note=f"best: {best_scan[0]} {best_scan[1]['full_scan_GBps']} GB/s; dead-token centroid scan "
                    f"{cur['dead_centroid_scan_GBps']} GB/s; safetensors safe_open {st['safe_open_full_scan_GBps']} GB/s, "
                    f"memmap {st['memmap_full_scan_GBps']} GB/s")
    res.target("6c", f"one step (info, {cur_key})", cur["one_step_ms"], None, unit=" ms",
               note=f"safetensors safe_open {st['safe_open_one_step_ms']} ms, memmap {st['memmap_one_step_ms']} ms")
    res.save()


if __name__ == "__main__":
    main()
