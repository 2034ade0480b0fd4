"""The write and read paths of one whole block vs the codec's own speed ("Record at GPU speed").

A realistic bf16 trajectory block is built (float32 master weights ~N(0, 0.02) plus small Gaussian
updates each step, recorded as bf16 bits; lr is set so that ~35% of the entries change per step):
  small: a (10000, 64) embedding, T=64 steps (82 MB raw), default preset (transpose, zstd-3, crc32c);
  gpt2:  a (50257, 768) embedding, T=4 steps (309 MB raw), fewer rounds.
Then, in this one process, interleaved round by round (the order rotates each round), medians:

  write  limit      numcodecs Zstd(3).encode of every step-fastest inner chunk, prepared beforehand (1 thread)
         limit A/A  the same measurement again (the control: its ratio to `limit` is the noise floor)
         zarr       array[0:T] = block through zarr-python into a LocalStore (the shard deleted before,
                    as for a block written the first time) = today's path
         encode xN  shardio.encode_shard(array, block, threads=N) + store.set(key, Buffer) (zarr's
                    atomic LocalStore write: temporary file + rename)
  read   limit      numcodecs Zstd.decode of every inner chunk into a preallocated buffer (1 thread)
         limit A/A  again
         zarr       array[0:T] (the shard file is in the page cache)
         decode xN  store.get(key) + shardio.decode_shard(array, bytes, out, threads=N) into a preallocated block

MB/s are raw (uncompressed) bytes per second; ratios are to the limit's median. Also measured: the
staging transposes (numpy vs torch vs staging step-last while recording) and whether each
C call releases the GIL (the longest stall of a Python ticker thread while it runs). Every encoded
shard is checked byte-identical to the file zarr wrote, every decode bit-exact.

    python benchmarks/bench_codec_path.py [--rounds 5] [--gpt2-rounds 5] [--no-gpt2] [--threads 1,2]

Results: benchmarks/results/codec_path.json (with `git rev-parse HEAD`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3.*")


# ----- data ----------------------------------------------------------------------------------
def trajectory(rows: int, cols: int, steps: int, *, lr: float = 2.5e-5, seed: int = 0) -> np.ndarray:
    """bf16 bits (uint16) of `steps` snapshots of a (rows, cols) weight trained with small updates."""
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(rows, cols, generator=g) * 0.02
    out = np.empty((steps, rows, cols), np.uint16)
    for t in range(steps):
        out[t] = master.bfloat16().view(torch.uint16).numpy()
        master += torch.randn(rows, cols, generator=g) * lr
    return out


# ----- helpers -------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception as e:  # pragma: no cover
        return f"unknown ({e})"


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)}


def interleaved(methods: dict, rounds: int, nbytes: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every method once per round, rotating the order. Returns (wall, cpu): MB/s of raw bytes
    per wall-clock second, and per CPU-second of this process (all its threads; steadier than the
    wall clock when other jobs share the cores)."""
    names = list(methods)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            setup, run = methods[name]
            if setup is not None:
                setup()
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[name].append(nbytes / (t1 - t0) / 1e6)
            cpu[name].append(nbytes / max(c1 - c0, 1e-9) / 1e6)
    return wall, cpu


def make_array(folder: Path, block: np.ndarray, preset: str, row_chunk: int = 100):
    import zarr

    from crucible_record.codecs import chunking, codecs_for
    from crucible_record.format.blocks import WRITE_ALL

    store = zarr.storage.LocalStore(folder)
    T = block.shape[0]
    array = zarr.create_array(store, name="W", shape=block.shape, dtype=block.dtype, fill_value=0x7FC0,
                              config=WRITE_ALL, **chunking(block.shape[1:], T, row_chunk),
                              **codecs_for(preset, chunking(tuple(block.shape[1:]), block.shape[0], row_chunk)["chunks"], str(block.dtype)))
    return store, array


# ----- one block -----------------------------------------------------------------------------
def bench_block(name: str, block: np.ndarray, rounds: int, scratch: Path, preset: str = "default",
                threads: tuple[int, ...] = (1, 2)) -> dict:
    from numcodecs import Zstd
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from crucible_record.shardio import decode_shard, encode_shard, shard_layout

    folder = scratch / name
    store, array = make_array(folder, block, preset)
    key = "W/" + array.metadata.encode_chunk_key((0,) * block.ndim)
    path = folder / key
    layout = shard_layout(array)
    level = next(c.level for c in array.metadata.codecs[0].codecs if type(c).__name__ == "ZstdCodec")
    proto = default_buffer_prototype()

    # correctness first: zarr's file == encode_shard's bytes; decode bit-exact
    array[:] = block
    zarr_bytes = path.read_bytes()
    n = max(threads)
    assert encode_shard(array, block, n) == zarr_bytes, f"{name}: encode_shard differs from zarr's shard"
    out = np.empty_like(block)
    decode_shard(array, zarr_bytes, out, n)
    assert np.array_equal(out, block), f"{name}: decode_shard is not bit-exact"

    T, rc = layout.chunk_shape[0], layout.chunk_shape[1]
    chunks = [np.ascontiguousarray(block[:, r:r + rc].transpose(tuple(range(1, block.ndim)) + (0,)))
              for r in range(0, block.shape[1], rc)]
    zstd = Zstd(level=level)
    compressed = [zstd.encode(c) for c in chunks]
    targets = [np.empty_like(c) for c in chunks]
    out_block = np.empty_like(block)

    def bare_encode():
        for c in chunks:
            zstd.encode(c)

    def bare_decode():
        for data, target in zip(compressed, targets):
            zstd.decode(data, out=target)

    def delete_shard():
        path.unlink(missing_ok=True)

    def zarr_write():
        array[0:block.shape[0]] = block

    def encoder(threads, store_it):
        def run():
            data = encode_shard(array, block, threads)
            if store_it:
                sync(store.set(key, proto.buffer.from_bytes(data)))
        return run

    def zarr_read():
        np.asarray(array[0:block.shape[0]])

    def decoder(threads):
        def run():
            data = sync(store.get(key, proto))
            decode_shard(array, data.as_numpy_array(), out_block, threads)
        return run

    write = {
        "limit: bare zstd encode x1": (None, bare_encode),
        "limit A/A (same again)": (None, bare_encode),
        "zarr-python write": (delete_shard, zarr_write),
        **{f"encode_shard x{n} + store.set": (None, encoder(n, True)) for n in threads},
    }
    array[:] = block  # the shard on disk for the reads
    read = {
        "limit: bare zstd decode x1": (None, bare_decode),
        "limit A/A (same again)": (None, bare_decode),
        "zarr-python read": (None, zarr_read),
        **{f"store.get + decode_shard x{n}": (None, decoder(n)) for n in threads},
    }
    nbytes = block.nbytes
    w, w_cpu = interleaved(write, rounds, nbytes)
    if not path.exists():
        zarr_write()
    rd, rd_cpu = interleaved(read, rounds, nbytes)
    assert np.array_equal(out_block, block)
    result = {"shape": list(block.shape), "dtype": "bf16 bits (uint16)", "raw_mb": round(nbytes / 1e6, 1),
              "preset": preset, "chunk_shape": list(layout.chunk_shape), "shard_shape": list(layout.shard_shape),
              "inner_chunks": len(chunks), "compression_ratio": round(nbytes / len(zarr_bytes), 3),
              "changed_per_step": round(float((block[1:] != block[:-1]).mean()), 3) if block.shape[0] > 1 else None,
              "rounds": rounds, "bytes_identical_to_zarr": True, "decode_bit_exact": True}
    for side, runs, cpu in (("write", w, w_cpu), ("read", rd, rd_cpu)):
        limit = statistics.median(runs[next(iter(runs))])
        limit_cpu = statistics.median(cpu[next(iter(cpu))])
        result[side] = {m: {**stats(v), "ratio_to_limit": round(statistics.median(v) / limit, 3),
                            "cpu_mb_per_s": round(statistics.median(cpu[m]), 1),
                            "cpu_ratio_to_limit": round(statistics.median(cpu[m]) / limit_cpu, 3)}
                        for m, v in runs.items()}
    return result


# ----- transposes ----------------------------------------------------------------------------
def bench_transposes(block: np.ndarray, rounds: int, rc: int = 100) -> dict:
    """Every inner chunk to step-last (encode) and back (decode): the alternatives, MB/s of raw
    bytes, interleaved; 'shardio' is what shardio.STAGING="auto" does for this chunk shape."""
    from crucible_record import shardio
    from crucible_record.shardio import _as_torch

    T, R, H = block.shape
    R -= R % rc
    block = block[:, :R]
    perm = (1, 2, 0)
    X = rc * H
    scratch = np.empty((rc, H, T), block.dtype)
    rows_tmp = np.empty((T, X), block.dtype)
    bt = torch.from_numpy(block.view(np.int16))
    whole = np.empty((R * H, T), block.dtype)
    staged = np.empty((R, H, T), block.dtype)
    ref = np.ascontiguousarray(block[:, R - rc:].transpose(perm))
    out = np.empty_like(block)
    layout = shardio.ShardLayout(True, (T, R, H), (T, rc, H), (1, R // rc, 1), (), perm, False, False, (), True,
                                 False, block.dtype, 0, True)

    def enc_np_ascontiguous():
        for r in range(0, R, rc):
            np.ascontiguousarray(block[:, r:r + rc].transpose(perm))

    def enc_np_copyto_scratch():
        for r in range(0, R, rc):
            np.copyto(scratch, block[:, r:r + rc].transpose(perm))

    def enc_torch_permute_contiguous():
        for r in range(0, R, rc):
            bt[:, r:r + rc].permute(1, 2, 0).contiguous()

    def enc_gather_rows_then_torch_blocked():
        for r in range(0, R, rc):
            np.copyto(rows_tmp, block[:, r:r + rc].reshape(T, X))
            _as_torch(scratch.reshape(X, T)).copy_(_as_torch(rows_tmp).t())

    def enc_torch_whole_block_blocked():
        _as_torch(whole).copy_(_as_torch(block.reshape(T, R * H)).t())

    def enc_stage_step_last_per_step():  # the recorder writing each step into a step-last buffer
        for t in range(T):
            staged[:, :, t] = block[t]

    def enc_shardio():
        for r in range(0, R, rc):
            shardio._to_step_last(block[:, r:r + rc], layout)

    def dec_np_plain():
        for r in range(0, R, rc):
            np.copyto(out[:, r:r + rc], ref.transpose(2, 0, 1))

    def dec_np_tiled256():
        flat = ref.reshape(X, T)
        for r in range(0, R, rc):
            rows = out[:, r:r + rc].reshape(T, X)
            for c in range(0, X, 256):
                np.copyto(rows[:, c:c + 256], flat[c:c + 256].T)

    def dec_torch_blocked_then_rows():
        for r in range(0, R, rc):
            _as_torch(rows_tmp).copy_(_as_torch(ref.reshape(X, T)).t())
            np.copyto(out[:, r:r + rc].reshape(T, X), rows_tmp)

    def dec_shardio():
        for r in range(0, R, rc):
            shardio._from_step_last(ref, out[:, r:r + rc], layout)

    fns = [enc_np_ascontiguous, enc_np_copyto_scratch, enc_torch_permute_contiguous,
           enc_gather_rows_then_torch_blocked, enc_torch_whole_block_blocked, enc_stage_step_last_per_step,
           enc_shardio, dec_np_plain, dec_np_tiled256, dec_torch_blocked_then_rows, dec_shardio]
    enc_gather_rows_then_torch_blocked()
    assert np.array_equal(scratch, ref)
    assert np.array_equal(shardio._to_step_last(block[:, R - rc:], layout), ref)
    dec_shardio()
    assert np.array_equal(out[:, R - rc:], block[:, R - rc:])
    runs, cpu = interleaved({f.__name__: (None, f) for f in fns}, rounds, block.nbytes)
    result = {"shape": list(block.shape), "chunk": [T, rc, H]}
    for direction, base in (("enc_", "enc_np_ascontiguous"), ("dec_", "dec_np_plain")):
        b_wall, b_cpu = statistics.median(runs[base]), statistics.median(cpu[base])
        for name, v in runs.items():
            if name.startswith(direction):
                result[name] = {**stats(v), "ratio_to_numpy": round(statistics.median(v) / b_wall, 3),
                                "cpu_mb_per_s": round(statistics.median(cpu[name]), 1),
                                "cpu_ratio_to_numpy": round(statistics.median(cpu[name]) / b_cpu, 3)}
    return result


# ----- the GIL -------------------------------------------------------------------------------
def gil_check() -> dict:
    """Longest stall of a Python ticker thread while each call runs, as a fraction of the call's
    duration: ~1 = the call holds the GIL; ~0 = it releases it (the ticker kept running). The
    smallest of 3 tries is kept: the OS descheduling the ticker on a busy machine only adds stalls."""
    import google_crc32c
    import numcodecs.blosc
    from numcodecs import Blosc, Zstd

    numcodecs.blosc.use_threads = False
    x = trajectory(2000, 64, 64, seed=1).transpose(1, 2, 0).copy()  # 16 MB
    zstd, blosc = Zstd(level=3), Blosc(cname="lz4", clevel=5, shuffle=1, typesize=2)
    ez, eb = zstd.encode(x), blosc.encode(x)
    out = np.empty_like(x)
    rows = np.ascontiguousarray(x.reshape(-1, 64).T)
    tt = torch.from_numpy(out.view(np.int16).reshape(-1, 64))
    trows = torch.from_numpy(rows.view(np.int16))
    src = np.ascontiguousarray(x.transpose(2, 0, 1)).transpose(1, 2, 0)  # a real (strided) transpose
    floats = list(np.random.default_rng(0).random(400_000))
    big = np.concatenate([x.reshape(-1)] * 8)
    big_bytes = big.tobytes()
    calls = {
        "zstd-3 encode": lambda: zstd.encode(x),
        "zstd decode into buffer": lambda: zstd.decode(ez, out=out),
        "blosc lz4 encode": lambda: blosc.encode(x),
        "blosc decode into buffer": lambda: blosc.decode(eb, out=out),
        # google_crc32c releases the GIL only for `bytes` of >= 1 MB (its _should_release_gil)
        "google_crc32c.value(ndarray 128 MB)": lambda: google_crc32c.value(big),
        "google_crc32c.value(bytes 128 MB)": lambda: google_crc32c.value(big_bytes),
        "numpy copyto (transpose)": lambda: [np.copyto(out, src) for _ in range(4)],
        "torch copy_ (blocked transpose)": lambda: tt.copy_(trows.t()),
        "control: sorted(list) holds the GIL": lambda: sorted(floats),
    }
    result = {}
    for name, call in calls.items():
        tries = []
        for _ in range(3):
            ticks: list[float] = []
            stop = threading.Event()

            def ticker():
                append, now = ticks.append, time.perf_counter
                while not stop.is_set():
                    append(now())

            th = threading.Thread(target=ticker)
            th.start()
            time.sleep(0.02)
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            time.sleep(0.02)
            stop.set()
            th.join()
            edges = [t0] + [t for t in ticks if t0 <= t <= t1] + [t1]
            tries.append((max(b - a for a, b in zip(edges, edges[1:])), t1 - t0))
        gap, duration = min(tries, key=lambda g: g[0] / g[1])
        result[name] = {"call_ms": round(duration * 1e3, 1), "longest_stall_ms": round(gap * 1e3, 1),
                        "stall_fraction": round(gap / duration, 3), "releases_gil": gap / duration < 0.5,
                        "stall_fractions_of_3_tries": [round(g / d, 3) for g, d in tries]}
    return result


# ----- main ----------------------------------------------------------------------------------
def table(name: str, res: dict) -> str:
    lines = [f"\n{name}: {res['shape']} {res['dtype']}, {res['raw_mb']} MB raw, ratio {res['compression_ratio']}x, "
             f"{res['inner_chunks']} inner chunks {res['chunk_shape']}, {res['rounds']} rounds",
             f"  {'':36s} {'wall MB/s':>10s} {'min':>6s} {'max':>6s} {'x limit':>8s} {'MB/cpu-s':>9s} {'x limit':>8s}"]
    for side in ("write", "read"):
        for m, s in res[side].items():
            lines.append(f"  {side + ': ' + m:36s} {s['median']:10.0f} {s['min']:6.0f} {s['max']:6.0f} "
                         f"{s['ratio_to_limit']:8.2f} {s['cpu_mb_per_s']:9.0f} {s['cpu_ratio_to_limit']:8.2f}")
    return "\n".join(lines)


def print_transposes(name: str, res: dict) -> None:
    print(f"staging transposes, {name}: block {res['shape']}, inner chunks {res['chunk']} "
          "(x numpy = vs numpy's plain copy, same direction):", flush=True)
    for m, s in res.items():
        if isinstance(s, dict):
            print(f"  {m:36s} {s['median']:6.0f} MB/s (min {s['min']:.0f}, max {s['max']:.0f}) x{s['ratio_to_numpy']:.2f};"
                  f" {s['cpu_mb_per_s']:6.0f} MB/cpu-s x{s['cpu_ratio_to_numpy']:.2f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="rounds for the (10000, 64) x 64-step block")
    p.add_argument("--gpt2-rounds", type=int, default=5, help="rounds for the (50257, 768) x 4-step block")
    p.add_argument("--no-gpt2", action="store_true")
    p.add_argument("--threads", default="1,2", help="thread counts for encode_shard/decode_shard [1,2]")
    p.add_argument("--out", type=Path, default=None, help="[results/codec_path.json; --quick: results/quick/]")
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 GPT-2 round (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.gpt2_rounds = min(args.rounds, 2), min(args.gpt2_rounds, 1)
    if args.out is None:
        args.out = HERE / "results" / ("quick" if args.quick else "") / "codec_path.json"
    threads = tuple(int(n) for n in args.threads.split(","))
    t_start = time.time()
    import numcodecs
    import zarr

    data = {
        "name": "codec_path",
        "command": "python benchmarks/bench_codec_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                    "versions": {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__,
                                 "torch": torch.__version__}},
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "notes": "MB/s of raw bytes; medians over rounds run interleaved in one process; ratios to the bare-zstd "
                 "limit measured in the same rounds; 'limit A/A' is the limit measured twice (noise control).",
    }
    scratch = Path(tempfile.mkdtemp(prefix="crucible-bench-codec-path-"))
    try:
        small = trajectory(10000, 64, 64)
        print("GIL check (longest Python-thread stall / call duration):", flush=True)
        data["gil"] = gil_check()
        for name, g in data["gil"].items():
            print(f"  {name:36s} {g['call_ms']:7.1f} ms call, stall {g['stall_fraction']:.2f} -> "
                  f"{'releases' if g['releases_gil'] else 'HOLDS'} the GIL", flush=True)
        data["transposes"] = {"small": bench_transposes(small, args.rounds)}
        print_transposes("small", data["transposes"]["small"])
        data["small"] = bench_block("small", small, args.rounds, scratch, threads=threads)
        print(table("small", data["small"]), flush=True)
        del small
        if not args.no_gpt2:
            big = trajectory(50257, 768, 4)
            data["transposes"]["gpt2_first_5000_rows"] = bench_transposes(np.ascontiguousarray(big[:, :5000]), args.rounds)
            print_transposes("gpt2, first 5000 rows", data["transposes"]["gpt2_first_5000_rows"])
            data["gpt2"] = bench_block("gpt2", big, args.gpt2_rounds, scratch, threads=threads)
            print(table("gpt2", data["gpt2"]), flush=True)
            del big
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data["load_end"] = [round(x, 2) for x in os.getloadavg()]
    data["seconds"] = round(time.time() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out} ({data['seconds']} s, load {data['load_start']} -> {data['load_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
