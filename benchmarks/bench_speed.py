"""Issue 12's speed goals: the real writer and reader vs one core of the bare codec, same bytes.

Every rate is compared with the bare codec on the same bytes, measured in the same process and
interleaved with it round by round (bench_codec_path.interleaved: the order rotates each round);
reported: the median, min and max over the rounds, the ratio of medians to the bare limit, and an
A/A control (the bare limit measured twice: the ratio of its two medians is the noise floor).
MB = 1e6 bytes of raw (uncompressed) data.

Writer (goal 1: >= 0.8x one core of zstd-3; scales with writer_threads; memory bounded):
  data     bf16 trajectory bits from bench_codec_path.trajectory(), one block of it fed again and
           again, so every block written holds the very bytes the bare limit compresses
  sizes    Crucible (10000 x 64, Layout(time_chunk=64, row_chunk=100)) and GPT-2 (50257 x 768,
           Layout(time_chunk=None): the recorder's automatic time chunk, read back from the
           array), default preset (transpose to step-last, zstd-3, crc32c); 3 whole blocks a run
  limit    numcodecs Zstd(level=3).encode of every step-last inner chunk of one block (the
           chunks prepared beforehand), 1 thread
  writer   cr.record(..., durability="none", writer_threads=N), N = 1 and 2: the producer calls
           rec.record(step, W=tensor) with pre-built CPU tensors as fast as it accepts them (it
           blocks while the staging slots are full, so the rate is the writer's), timed from the
           first record() to close() returning. RSS: after each quarter of the steps, and the peak
           (RssSampler) while each block is recorded; "flat" = the last block's peak minus the
           second's (block-aligned: a GPT-2 block is only 3 steps)
           fsync is the default durability: the Crucible size is also run with it (info row)
Reads (goal 2), on a 1,200-step Crucible-size run written once by cr.record (W from trajectory(),
a 0-d float32 loss; default Layout(time_chunk=64, row_chunk=100)), page cache warm:
  limit    numcodecs Zstd.decode of every inner chunk of W, read from the shard files (crc32c
           stripped), into one preallocated chunk buffer (as shardio decodes into a per-thread
           scratch), 1 thread; counted as W's raw bytes, as the scan is: same frames, a time ratio
  scan     t = cr.open(run); t["W"][a:a+64] for every block; with the reader's default threads
           (a whole block is decoded on all cores) and with 1 (blockread.default_threads patched)
  verify   crucible_record.verify.verify_run(run): raw bytes of all fields per second
  export   crucible_record.export.export_run(cr.open(run), dir): a safetensors file, fsynced
  token    t["W"][:, tok] (all 1,200 steps), random tokens after one warm-up read: median ms
  centroid t["W"][a:b][:, mask].float().mean(1) over every block, ~20 % of the rows masked:
           "at scan speed" = its rate over the default-thread scan's
Compression ratio of the default preset on that run (info; real-run ratios: bench_compression.py).
--quick: 136-step read run, 3 Crucible / 1 GPT-2 blocks a writer run, no fsync variant, 2 rounds;
not judged (a smoke test).

    python benchmarks/bench_speed.py [--quick] [--rounds 5] [--read-rounds 3]

Results: benchmarks/results/speed.json (results/quick/speed.json with --quick).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, RssSampler, dir_bytes, median, parser, r, rss_mb, scratch_dir  # noqa: E402
from bench_codec_path import interleaved, stats, trajectory  # noqa: E402

import crucible_record as cr  # noqa: E402
from crucible_record.storage import STORE_NAME  # noqa: E402

SMALL, GPT2 = (10000, 64), (50257, 768)
ROW_CHUNK = 100
LIMIT, AA = "limit: bare zstd x1", "limit A/A (same again)"
RSS_DRIFT_MB = 32
SLOTS = 3  # cr.record's default number of staging slots


# ----- measuring -----------------------------------------------------------------------------
def timed_rounds(methods: dict, rounds: int) -> tuple[dict, dict]:
    """interleaved() with its own byte count per method: name -> (setup, run, nbytes). Returns MB/s
    per wall second and per CPU second, per round. interleaved() is told 1e6 bytes, so its numbers
    are runs per second; each is scaled here by its method's bytes."""
    wall, cpu = interleaved({k: (setup, run) for k, (setup, run, _) in methods.items()}, rounds, 1e6)
    scale = {k: n / 1e6 for k, (_, _, n) in methods.items()}
    return ({k: [x * scale[k] for x in v] for k, v in wall.items()},
            {k: [x * scale[k] for x in v] for k, v in cpu.items()})


def summarize(wall: dict, cpu: dict, base: str = LIMIT) -> dict:
    """stats() of every method, its ratio of medians to `base`, and its CPU-second rate."""
    ref, ref_cpu = median(wall[base]), median(cpu[base])
    return {k: {**stats(v), "ratio_to_limit": r(median(v) / ref), "cpu_MBps": r(median(cpu[k]), 1),
                "cpu_ratio_to_limit": r(median(cpu[k]) / ref_cpu)} for k, v in wall.items()}


def spread(s: dict) -> str:
    return f"{s['median']:.0f} MB/s (min {s['min']:.0f}, max {s['max']:.0f})"


def versus(table: dict, name: str, what: str) -> str:
    """The note of a ratio row: both sides' absolute rates and spreads, and the A/A control."""
    return (f"{spread(table[name])} vs {what} {spread(table[LIMIT])}; "
            f"A/A control {table[AA]['ratio_to_limit']:.2f}x; {table[name]['n']} rounds")


@contextlib.contextmanager
def reader_threads(n: int):
    """The reader decodes a whole block with blockread.default_threads() threads: pin it to `n`."""
    from crucible_record import blockread

    saved = blockread.default_threads
    blockread.default_threads = lambda: n
    try:
        yield
    finally:
        blockread.default_threads = saved


@contextlib.contextmanager
def phase(seconds: dict, name: str):
    """Wall seconds of one part of the benchmark, kept in the details (to size the rounds)."""
    t0 = time.perf_counter()
    yield
    seconds[name] = r(time.perf_counter() - t0, 1)
    print(f"{name}: {seconds[name]} s", flush=True)


def step_last_chunks(block: np.ndarray, rc: int) -> list[np.ndarray]:
    """A block's inner chunks of `rc` rows with the step axis fastest: the bytes the store compresses."""
    return [np.ascontiguousarray(block[:, a:a + rc].transpose(1, 2, 0)) for a in range(0, block.shape[1], rc)]


def bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits).view(torch.bfloat16)


# ----- writer --------------------------------------------------------------------------------
def chosen_chunks(folder: Path, shape: tuple[int, int], layout) -> tuple[tuple, tuple]:
    """(chunks, shards) cr.record gives a bf16 field of `shape` under `layout`, read back from the
    created array (the automatic time chunk is the recorder's choice, not recomputed here)."""
    import zarr

    cr.record(folder, {"W": cr.Field(shape, torch.bfloat16)}, steps=1, layout=layout, durability="none").close()
    array = zarr.open_array(folder / STORE_NAME, path="W", mode="r")
    chunks, shards = tuple(array.chunks), tuple(array.shards or array.chunks)
    shutil.rmtree(folder)
    return chunks, shards


class WriterRun:
    """One writer variant. setup() opens a fresh recorder (outside the timing); run() records every
    step with pre-built tensors and closes it: the time of that is the writer's sustained rate."""

    def __init__(self, folder: Path, block: np.ndarray, steps: int, layout, threads: int, durability: str):
        self.folder, self.steps, self.layout = folder, steps, layout
        self.threads, self.durability = threads, durability
        self.block = block
        self.tensors = [bf16(block[t]) for t in range(len(block))]
        self.field = {"W": cr.Field(tuple(block.shape[1:]), torch.bfloat16)}
        self.rss: list[list[float]] = []  # per run: RSS MB right after each quarter of the steps
        self.rss_peaks: list[list[float]] = []  # per run: the peak RSS MB while each block is recorded
        self.max_queued = 0  # most steps ever waiting for the writer (bounded by the slots?)
        self.rec = None

    def setup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.rec = cr.record(self.folder, self.field, steps=self.steps, layout=self.layout, slots=SLOTS,
                             durability=self.durability, writer_threads=self.threads)

    def run(self) -> None:
        rec, tensors, T = self.rec, self.tensors, len(self.tensors)
        quarters = [max(1, self.steps * q // 4) for q in (1, 2, 3, 4)]  # steps done at each quarter
        work = getattr(rec, "_work", None)  # the writer's queue (private): sampled, never changed
        rss, block_ends = [], []
        base = time.perf_counter()
        with RssSampler(0.02) as sampler:  # (a thread reading /proc/self/statm 50 times a second)
            for step in range(self.steps):
                rec.record(step, W=tensors[step % T])
                if work is not None:
                    self.max_queued = max(self.max_queued, work.qsize())
                rss += [r(rss_mb(), 1)] * quarters.count(step + 1)
                if (step + 1) % T == 0:
                    block_ends.append(time.perf_counter() - base)
            rec.close()
            block_ends[-1] = time.perf_counter() - base  # the last block: up to close() returning
        self.rec = None  # its buffers go now, not at the next setup()
        self.rss.append(rss)
        # Per block: from record() of the previous block's last step returning to that of its own
        # (the last block: to close() returning). The writer starts encoding the previous block at
        # the window's start and the producer, out of free slots, waits for it within the window: each
        # window holds one whole block encode and its transient buffers.
        edges = [0.0] + block_ends
        self.rss_peaks.append([r(sampler.peak_between(a, b), 1) for a, b in zip(edges, edges[1:])])

    def last_step_exact(self) -> bool:
        """The last step of the last run reads back bit-exact (the run was written, not skipped)."""
        last = self.steps - 1
        return bool(np.array_equal(cr.open(self.folder)["W"].numpy(last), self.block[last % len(self.block)]))


def bench_writer(name: str, shape: tuple[int, int], layout, blocks: int, rounds: int, folder: Path,
                 variants: list[tuple[int, str]], block_of) -> dict:
    """The writer variants (threads, durability) and the bare encode limit, interleaved.
    block_of(T): the (T, *shape) uint16 block fed again and again."""
    from numcodecs import Zstd

    chunks, shards = chosen_chunks(folder / "probe", shape, layout)
    T, rc = chunks[0], chunks[1]
    block = block_of(T)
    pieces = step_last_chunks(block, rc)
    zstd = Zstd(level=3)

    def bare_encode():
        for c in pieces:
            zstd.encode(c)

    steps = blocks * T
    raw = steps * block[0].nbytes
    writers = {f"writer x{k}, durability {d}": WriterRun(folder / f"w{k}{d}", block, steps, layout, k, d)
               for k, d in variants}
    methods = {LIMIT: (None, bare_encode, block.nbytes), AA: (None, bare_encode, block.nbytes),
               **{k: (w.setup, w.run, raw) for k, w in writers.items()}}
    wall, cpu = timed_rounds(methods, rounds)
    table = summarize(wall, cpu)
    out = {"name": name, "shape": list(shape), "layout": layout.to_dict(), "chunks": list(chunks), "shards": list(shards),
           "time_chunk": T, "blocks_per_run": blocks, "steps_per_run": steps, "raw_MB_per_run": r(raw / 1e6, 1),
           "block_MB": r(block.nbytes / 1e6, 1), "inner_chunks_per_block": len(pieces),
           "rounds": rounds, "MBps": table}
    written = next(iter(writers.values())).folder / STORE_NAME / "W"
    out["compression_ratio_on_disk"] = r(raw / dir_bytes(written), 3)
    for k, w in writers.items():
        out["MBps"][k].update({"rss_mb_after_each_quarter_per_run": w.rss,
                               "rss_peak_mb_by_block_per_run": w.rss_peaks, "max_steps_queued": w.max_queued,
                               "slots": SLOTS, "last_step_bit_exact": w.last_step_exact()})
        shutil.rmtree(w.folder, ignore_errors=True)
    for k, s in table.items():
        print(f"  {name} {k:34s} {spread(s)} x{s['ratio_to_limit']:.2f} of the limit", flush=True)
    return out


def rss_drift(writer: dict) -> list[tuple[str, float]]:
    """(variant, peak RSS while the last block is recorded minus while the second one is) of every
    writer run of >= 3 blocks. Peaks over block-aligned windows, not quarters: at the GPT-2 size a
    block is 3 steps and the quarters of a 3-block run would set a window holding a block's encode
    against one holding none."""
    return [(f"{writer['name']}, {k}", q[-1] - q[1]) for k, s in writer["MBps"].items()
            for q in s.get("rss_peak_mb_by_block_per_run", []) if len(q) >= 3 and not np.isnan(q[-1] - q[1])]


# ----- reads ---------------------------------------------------------------------------------
def write_read_run(run: Path, bits: np.ndarray) -> dict:
    """The run the reads use: W (bits: (steps, 10000, 64) uint16) and a 0-d float32 loss, written
    once by cr.record with the default layout (2 writer threads, durability none: not timed here)."""
    n = len(bits)
    loss = (5.0 * np.exp(-np.arange(n) / 400.0) + 0.05 * np.random.default_rng(1).random(n)).astype(np.float32)
    fields = {"W": cr.Field(SMALL, torch.bfloat16), "loss": cr.Field((), torch.float32)}
    t0 = time.perf_counter()
    with cr.record(run, fields, steps=n, layout=cr.Layout(time_chunk=64, row_chunk=ROW_CHUNK),
                   durability="none", writer_threads=2) as rec:
        for s in range(n):
            rec.record(s, W=bf16(bits[s]), loss=torch.tensor(loss[s]))
    return {"steps": n, "write_s": r(time.perf_counter() - t0, 2)}


def check_and_warm(run: Path, bits: np.ndarray) -> None:
    """Read every file of the run once (page cache warm for every variant) and check that the
    first, a middle and the last block read back as the recorded bits."""
    for path in sorted(run.rglob("*")):
        if path.is_file():
            path.read_bytes()
    W = cr.open(run)["W"]
    T = W.array.chunks[0]
    last = (len(W) - 1) // T * T
    for a in sorted({0, last // T // 2 * T, last}):
        if not np.array_equal(W.numpy(slice(a, min(a + T, len(W)))), bits[a:a + T]):
            raise SystemExit(f"the read run's W rows {a}.. do not read back bit-exact")


def shard_frames(run: Path) -> tuple[list[np.ndarray], int]:
    """Every inner chunk's zstd frame of W, read from the shard files with the crc32c stripped (the
    bytes the reader decompresses), and the decoded size of one inner chunk."""
    from crucible_record.shardio import _read_index, shard_layout

    array = cr.open(run)["W"].array
    layout = shard_layout(array)
    codecs = [name for name, _ in layout.bytes_codecs]
    if codecs != ["zstd", "crc32c"]:
        raise SystemExit(f"W is not stored as zstd + crc32c ({codecs}): the bare limit would not match it")
    frames = []
    for b in range(-(-array.shape[0] // layout.shard_shape[0])):
        buf = np.fromfile(run / STORE_NAME / array.path / array.metadata.encode_chunk_key((b, 0, 0)), dtype=np.uint8)
        spans = _read_index(layout, buf)
        frames += [buf[offset:offset + nbytes - 4] for offset, nbytes in (spans[c] for c in sorted(spans))]
    return frames, layout.chunk_nbytes


def read_methods(run: Path, export_dir: Path, rounds: int, token_ms: list[float]) -> tuple[dict, dict]:
    """name -> (setup, run, bytes) of the read variants and the bare decode limit; and facts."""
    from numcodecs import Zstd

    from crucible_record import blockread
    from crucible_record.export import export_run
    from crucible_record.verify import verify_run

    t = cr.open(run)
    W = t["W"]
    rows, T = len(W), W.array.chunks[0]
    w_bytes = rows * int(np.prod(W.shape[1:])) * 2
    all_bytes = t.raw_bytes()
    frames, chunk_nbytes = shard_frames(run)
    target = np.empty(chunk_nbytes, np.uint8)
    zstd = Zstd()
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.random(W.shape[1]) < 0.2)
    per_round = -(-12 // rounds)  # >= 12 tokens in all

    def bare_decode():
        for frame in frames:
            zstd.decode(frame, out=target)

    def scan():
        field = cr.open(run)["W"]
        for a in range(0, rows, T):
            field[a:min(a + T, rows)]

    def scan_1_thread():
        with reader_threads(1):
            scan()

    def centroid():
        field = cr.open(run)["W"]
        for a in range(0, rows, T):
            field[a:min(a + T, rows)][:, mask].float().mean(1)

    def verify():
        report = verify_run(run)
        if not report.ok:
            raise SystemExit(f"verify_run found problems: {report.problems[:3]}")

    def export_setup():
        shutil.rmtree(export_dir, ignore_errors=True)

    def export():
        export_run(cr.open(run), export_dir)

    def tokens():
        for tok in rng.integers(0, W.shape[1], per_round):
            t0 = time.perf_counter()
            W[:, int(tok)]
            token_ms.append((time.perf_counter() - t0) * 1e3)

    W[:, 0]  # the warm-up read
    threads = blockread.default_threads()
    methods = {
        LIMIT: (None, bare_decode, w_bytes),  # the same frames as the scan: a ratio of times
        AA: (None, bare_decode, w_bytes),
        f"scan, default threads ({threads})": (None, scan, w_bytes),
        "scan, 1 thread": (None, scan_1_thread, w_bytes),
        "verify_run": (None, verify, all_bytes),
        "export_run": (export_setup, export, all_bytes),
        "centroid scan": (None, centroid, w_bytes),
        "token trajectories": (None, tokens, per_round * rows * int(W.shape[2]) * 2),
    }
    facts = {"steps": rows, "time_chunk": T, "W_raw_MB": r(w_bytes / 1e6, 1), "all_fields_raw_MB": r(all_bytes / 1e6, 1),
             "inner_chunks": len(frames), "limit_decoded_MB_incl_last_block_padding": r(len(frames) * chunk_nbytes / 1e6, 1),
             "reader_default_threads": threads, "masked_rows": int(mask.sum()), "tokens_per_round": per_round,
             "W_on_disk_MB": r(dir_bytes(run / STORE_NAME / "W") / 1e6, 1),
             "run_on_disk_MB": r(t.bytes_on_disk() / 1e6, 1)}
    return methods, facts


def bench_reads(run: Path, export_dir: Path, rounds: int) -> dict:
    token_ms: list[float] = []
    methods, facts = read_methods(run, export_dir, rounds, token_ms)
    wall, cpu = timed_rounds(methods, rounds)
    table = summarize(wall, cpu)
    for k, s in table.items():
        if k != "token trajectories":  # (its number is the ms per token, below)
            print(f"  reads {k:34s} {spread(s)} x{s['ratio_to_limit']:.2f} of the limit", flush=True)
    print(f"  reads one token's trajectory: median {median(token_ms):.1f} ms of {len(token_ms)}", flush=True)
    return {**facts, "rounds": rounds, "MBps": table, "token_ms": [r(x, 2) for x in token_ms]}


# ----- report --------------------------------------------------------------------------------
def report_writer(res: Result, small: dict, gpt2: dict) -> None:
    for ids, scale_id, w, label in (("S1a", "S1b", small, "Crucible-size"), ("S1c", "S1d", gpt2, "GPT-2-size")):
        tab, x1, x2 = w["MBps"], "writer x1, durability none", "writer x2, durability none"
        size = (f"{w['shape'][0]} x {w['shape'][1]} bf16, time chunk {w['time_chunk']}, chunks {w['chunks']}, "
                f"{w['blocks_per_run']} blocks = {w['raw_MB_per_run']:.0f} MB a run")
        ratio = tab[x1]["ratio_to_limit"]
        res.target(ids, f"writer, {label} ({w['shape'][0]} x {w['shape'][1]}), 1 writer thread: >= 0.8x one core of "
                   "bare zstd-3 on the same bytes", ratio, ratio >= 0.8, unit="x",
                   note=f"{versus(tab, x1, 'bare zstd-3 x1')}; {size}; durability none (fsync is the default)")
        scale = r(tab[x2]["median"] / tab[x1]["median"])
        res.target(scale_id, f"writer, {label}, 2 writer threads: scales (> 1.0x of 1 thread)", scale, scale > 1.0, unit="x",
                   note=f"{spread(tab[x2])} vs 1 thread {spread(tab[x1])}; x{tab[x2]['ratio_to_limit']:.2f} of bare "
                        f"zstd-3 x1 ({tab[LIMIT]['median']:.0f} MB/s); A/A control {tab[AA]['ratio_to_limit']:.2f}x; "
                        f"the producer shares the {res.data['machine'].get('nproc')} cores")
    drifts = rss_drift(small) + rss_drift(gpt2)
    worst = max(drifts, key=lambda d: abs(d[1])) if drifts else ("none", float("nan"))
    queued = max(s.get("max_steps_queued", 0) for w in (small, gpt2) for s in w["MBps"].values())
    x1 = "writer x1, durability none"
    quarters = {w["name"]: w["MBps"][x1]["rss_mb_after_each_quarter_per_run"][-1] for w in (small, gpt2)}
    res.target("S1e", f"writer RSS flat: peak while the last block is recorded minus while the second is <= "
               f"{RSS_DRIFT_MB} MB (worst writer run of >= 3 blocks)", r(worst[1], 1) if drifts else "n/a",
               abs(worst[1]) <= RSS_DRIFT_MB if drifts else None,
               unit=" MB", note=f"worst: {worst[0]}; {len(drifts)} runs; RSS after each quarter of the steps, last "
                                f"x1 run: {quarters} MB; most steps ever queued for the writer {queued} ({SLOTS} "
                                "staging slots bound the queue)")
    fs = "writer x1, durability fsync"
    if fs in small["MBps"]:
        tab = small["MBps"]
        res.target("S1f", "writer, Crucible-size, 1 thread, durability fsync (the default): info",
                   tab[fs]["ratio_to_limit"], None, unit="x",
                   note=f"{versus(tab, fs, 'bare zstd-3 x1')}; x{tab[fs]['median'] / tab['writer x1, durability none']['median']:.2f} "
                        "of durability none")


def report_reads(res: Result, rd: dict) -> None:
    tab = rd["MBps"]
    scan = next(k for k in tab if k.startswith("scan, default"))
    size = f"{rd['steps']} steps, {rd['W_raw_MB']:.0f} MB of W"
    ratio = tab[scan]["ratio_to_limit"]
    res.target("S2a", "full scan t['W'][a:a+64], reader's default threads: >= 0.8x one core of bare zstd decode",
               ratio, ratio >= 0.8, unit="x",
               note=f"{versus(tab, scan, 'bare decode x1')}; {rd['reader_default_threads']} decode threads vs 1 core; {size}")
    ratio = tab["scan, 1 thread"]["ratio_to_limit"]
    res.target("S2b", "full scan, 1 decode thread (like for like): >= 0.8x one core of bare zstd decode", ratio,
               ratio >= 0.8, unit="x", note=f"{versus(tab, 'scan, 1 thread', 'bare decode x1')}; {size}")
    ratio = tab["verify_run"]["ratio_to_limit"]
    res.target("S2c", "verify_run, raw bytes of all fields: >= 0.8x one core of bare zstd decode", ratio, ratio >= 0.8,
               unit="x", note=f"{versus(tab, 'verify_run', 'bare decode x1')}; reader's default threads "
                               f"({rd['reader_default_threads']}); {rd['all_fields_raw_MB']:.0f} MB raw")
    ratio = tab["export_run"]["ratio_to_limit"]
    res.target("S2d", "export_run to safetensors, raw bytes: >= 0.5x one core of bare zstd decode", ratio, ratio >= 0.5,
               unit="x", note=f"{versus(tab, 'export_run', 'bare decode x1')}; reader's default threads; the file "
                               f"is written and fsynced; {rd['all_fields_raw_MB']:.0f} MB raw")
    ms = median(rd["token_ms"])
    res.target("S2e", f"one token's whole trajectory t['W'][:, tok] ({rd['steps']} steps), warm: <= 10 ms", r(ms, 2),
               ms <= 10, unit=" ms",
               note=f"median of {len(rd['token_ms'])} random tokens (min {min(rd['token_ms']):.1f}, max "
                    f"{max(rd['token_ms']):.1f} ms) after one warm-up read; read inner chunk by inner chunk (blockread.read_one_row)")
    cen = r(tab["centroid scan"]["median"] / tab[scan]["median"])
    res.target("S2f", "dead-token centroid scan t['W'][a:b][:, mask].float().mean(1): at scan speed (>= 0.8x the "
               "default-thread full scan)", cen, cen >= 0.8, unit="x",
               note=f"{spread(tab['centroid scan'])} vs scan {spread(tab[scan])}; {rd['masked_rows']} of "
                    f"{SMALL[0]} rows masked; x{tab['centroid scan']['ratio_to_limit']:.2f} of bare decode x1")
    raw, disk = rd["W_raw_MB"], rd["W_on_disk_MB"]
    res.target("S3", "compression ratio of the default preset on the synthetic run (W): info", r(raw / disk, 2), None,
               unit="x", note=f"{raw:.0f} MB raw -> {disk:.0f} MB on disk (whole run {rd['run_on_disk_MB']:.0f} MB); "
                              "synthetic trajectory(): the real-run goal is bench_compression.py's")


# ----- main ----------------------------------------------------------------------------------
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="writer rounds [5; --quick 2]")
    p.add_argument("--read-rounds", type=int, default=None, help="read rounds [3; --quick 2]")
    args = p.parse_args()
    quick = args.quick
    rounds = args.rounds or (2 if quick else 5)
    read_rounds = args.read_rounds or (2 if quick else 3)  # (5 would take the full mode past 8 min)
    read_steps = 136 if quick else 1200  # quick: 2 whole blocks and a partial one
    small_blocks, gpt2_blocks = (3, 1) if quick else (3, 3)
    res = Result("speed", quick)
    if quick:
        res.smoke_note = (f"not judged: --quick ({read_steps}-step read run, {small_blocks} Crucible / {gpt2_blocks} "
                          f"GPT-2 blocks a writer run, {rounds} rounds)")
    res.details["note"] = __doc__.split("\n\n")[0] + " MB = 1e6 bytes, raw."
    phases = res.details["phase_s"] = {}
    with scratch_dir("speed") as d:
        with phase(phases, "read run: trajectory, write, check"):
            bits = trajectory(*SMALL, read_steps)
            res.details["read_run"] = write_read_run(d / "run", bits)
            check_and_warm(d / "run", bits)
            first_block = bits[:64].copy()
            del bits
        print(f"read run: {res.details['read_run']}", flush=True)
        with phase(phases, "writer, Crucible size"):
            res.details["writer_crucible"] = bench_writer(
                "crucible", SMALL, cr.Layout(time_chunk=64, row_chunk=ROW_CHUNK), small_blocks, rounds, d,
                [(1, "none"), (2, "none")] + ([] if quick else [(1, "fsync")]),
                lambda T: first_block[:T] if T <= len(first_block) else trajectory(*SMALL, T))
        with phase(phases, "writer, GPT-2 size"):
            res.details["writer_gpt2"] = bench_writer(
                "gpt2", GPT2, cr.Layout(time_chunk=None), gpt2_blocks, rounds, d, [(1, "none"), (2, "none")],
                lambda T: trajectory(*GPT2, T))
        with phase(phases, "reads"):
            res.details["reads"] = bench_reads(d / "run", d / "export", read_rounds)
    report_writer(res, res.details["writer_crucible"], res.details["writer_gpt2"])
    report_reads(res, res.details["reads"])
    res.save()


if __name__ == "__main__":
    main()
