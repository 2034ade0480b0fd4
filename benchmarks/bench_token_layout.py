"""One token's whole trajectory vs the layout's row chunk: what the <= 10 ms goal costs in compression.

A token read (t["W"][:, tok]) decodes one inner chunk per block of steps: row_chunk tokens x
time_chunk steps x hidden, i.e. row_chunk times the bytes it returns. This writes the same
1,200-step Crucible-size trajectory (bench_codec_path.trajectory, 10000 x 64 bf16) with
Layout(time_chunk=64, row_chunk=R) for a few R, then measures, page cache warm, interleaved
round by round: the median ms of random token reads, the full-scan rate, the bare zstd decode of
the inner chunks one token read needs (its floor on this machine), and the compression ratio.

    python benchmarks/bench_token_layout.py [--quick] [--row-chunks 100,25,10]

Results: benchmarks/results/token_layout.json (results/quick/ with --quick).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, dir_bytes, median, parser, r, scratch_dir  # noqa: E402
from bench_codec_path import trajectory  # noqa: E402

import crucible_record as cr  # noqa: E402
from crucible_record.storage import STORE_NAME  # noqa: E402

SMALL = (10000, 64)
GOAL_MS = 10.0


def write_run(path: Path, bits: np.ndarray, row_chunk: int) -> None:
    with cr.record(path, {"W": cr.Field(SMALL, torch.bfloat16)}, steps=len(bits), durability="none",
                   layout=cr.Layout(time_chunk=64, row_chunk=row_chunk)) as rec:
        for s in range(len(bits)):
            rec.record(s, W=torch.from_numpy(bits[s]).view(torch.bfloat16))
    for file in sorted(path.rglob("*")):  # page cache warm
        if file.is_file():
            file.read_bytes()


def token_floor_ms(path: Path, token: int) -> float:
    """Bare zstd decode (1 thread) of the inner chunks holding `token`, one per block."""
    from numcodecs import Zstd

    from crucible_record.shardio import _read_index, shard_layout

    array = cr.open(path)["W"].array
    layout = shard_layout(array)
    coords = (0, token // layout.chunk_shape[1], 0)
    frames = []
    for b in range(-(-array.shape[0] // layout.shard_shape[0])):
        buf = np.fromfile(path / STORE_NAME / "W" / array.metadata.encode_chunk_key((b, 0, 0)), dtype=np.uint8)
        offset, nbytes = _read_index(layout, buf)[coords]
        frames.append(buf[offset:offset + nbytes - 4])
    out, zstd = np.empty(layout.chunk_nbytes, np.uint8), Zstd()
    t0 = time.perf_counter()
    for frame in frames:
        zstd.decode(frame, out=out)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--row-chunks", default="100,25,10")
    p.add_argument("--rounds", type=int, default=None, help="[5; --quick 2]")
    args = p.parse_args()
    row_chunks = [int(x) for x in args.row_chunks.split(",")]
    steps, rounds = (200, 2) if args.quick else (1200, args.rounds or 5)
    res = Result("token_layout", args.quick)
    if args.quick:
        res.smoke_note = f"not judged: --quick ({steps} steps, {rounds} rounds)"
    rng = np.random.default_rng(0)
    with scratch_dir("token-layout") as d:
        bits = trajectory(*SMALL, steps)
        raw = bits.nbytes
        for rc in row_chunks:
            write_run(d / f"rc{rc}", bits, rc)
        del bits
        ms = {rc: [] for rc in row_chunks}
        floor = {rc: [] for rc in row_chunks}
        scan = {rc: [] for rc in row_chunks}
        for rnd in range(rounds):
            order = row_chunks[rnd % len(row_chunks):] + row_chunks[:rnd % len(row_chunks)]
            for rc in order:
                W = cr.open(d / f"rc{rc}")["W"]
                W[:, 0]  # warm-up
                for tok in rng.integers(0, SMALL[0], 4):
                    t0 = time.perf_counter()
                    W[:, int(tok)]
                    ms[rc].append((time.perf_counter() - t0) * 1e3)
                    floor[rc].append(token_floor_ms(d / f"rc{rc}", int(tok)))
                t0 = time.perf_counter()
                for a in range(0, steps, 64):
                    W[a:a + 64]
                scan[rc].append(raw / (time.perf_counter() - t0) / 1e6)
        rows = {}
        for rc in row_chunks:
            ratio = raw / dir_bytes(d / f"rc{rc}" / STORE_NAME / "W")
            rows[rc] = {"token_ms": [r(x, 2) for x in ms[rc]], "token_ms_median": r(median(ms[rc]), 2),
                        "floor_ms_median": r(median(floor[rc]), 2), "scan_MBps_median": r(median(scan[rc]), 1),
                        "compression_ratio": r(ratio, 3)}
            print(f"row_chunk {rc:4d}: token {rows[rc]['token_ms_median']} ms (bare-decode floor "
                  f"{rows[rc]['floor_ms_median']} ms), scan {rows[rc]['scan_MBps_median']} MB/s, "
                  f"compression {rows[rc]['compression_ratio']}x", flush=True)
    res.details.update({"steps": steps, "rounds": rounds, "row_chunks": rows})
    for i, rc in enumerate(row_chunks):
        x = rows[rc]
        res.target(f"T{i + 1}", f"one token's trajectory ({steps} steps), Layout(row_chunk={rc}): <= {GOAL_MS:g} ms",
                   x["token_ms_median"], x["token_ms_median"] <= GOAL_MS, unit=" ms",
                   note=f"median of {len(x['token_ms'])} random tokens, {rounds} interleaved rounds (min "
                        f"{min(x['token_ms']):.1f}, max {max(x['token_ms']):.1f}); bare zstd decode of the same "
                        f"inner chunks {x['floor_ms_median']} ms; full scan {x['scan_MBps_median']} MB/s; "
                        f"compression {x['compression_ratio']}x")
    res.save()


if __name__ == "__main__":
    main()
