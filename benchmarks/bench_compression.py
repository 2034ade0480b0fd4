"""Target 3: lossless compression of a real W trajectory, codec by codec.

Reads the first N steps of W (uint16 bf16 bits) from the recorded run (default data and config),
writes them into fresh stores made by crucible_record.store.create_store with each codec
configuration (one whole time chunk per write, as the Recorder does), and reports
  ratio      raw bytes / bytes of W on disk
  write MB/s raw bytes per second of writing (encode + file writes)
  read MB/s  raw bytes per second of reading it all back (decode)
and checks every read-back bit-exact. Codec names: T = TransposeCodec(order=(1, 2, 0)) (step axis
fastest inside a chunk); delta = numcodecs Delta('<u2') (not a Zarr v3 spec codec); blosc-X-Y =
Blosc cname X, clevel, shuffle Y. Chunks are (time_chunk, 500 tokens, 64) inside shards of all
tokens unless stated. Optionally opens a default-preset store in TensorStore.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, dir_bytes, make_store, parser, r, scratch_dir, wait_for_run  # noqa: E402

SPEC_ONLY = {"raw", "zstd", "default", "blosc-zstd3-byteshuffle", "blosc-zstd3-bitshuffle", "T+zstd3", "T+zstd1",
             "T+zstd5", "T+gzip5", "T+blosc-zstd2-byteshuffle", "T+blosc-zstd1-byteshuffle", "T+blosc-zstd3-bitshuffle", "T+blosc-zstd1-bitshuffle", "T+blosc-zstd5-bitshuffle",
             "T+blosc-zstd3-byteshuffle", "T+blosc-lz4-bitshuffle", "T+blosc-lz4-byteshuffle"}

FULL = ["raw", "zstd", "blosc-zstd3-byteshuffle", "blosc-zstd3-bitshuffle",
        "default", "T+blosc-zstd3-byteshuffle", "T+blosc-zstd2-byteshuffle", "T+blosc-lz4-byteshuffle",
        "T+zstd1", "T+zstd3", "T+zstd5", "T+gzip5",
        "T+delta+zstd3", "max", "T+delta+blosc-zstd2-byteshuffle", "T+delta+blosc-zstd3-byteshuffle",
        "T+delta+blosc-zstd3-bitshuffle", "T+delta+blosc-lz4-byteshuffle"]
QUICK = ["raw", "zstd", "blosc-zstd3-bitshuffle", "T+zstd3", "default", "T+blosc-lz4-byteshuffle", "T+delta+zstd3", "max"]
# (codec, time_chunk) beyond the time chunk of 32
TIME_CHUNKS_FULL = [("default", 16), ("default", 64), ("T+zstd3", 16), ("T+zstd3", 64), ("max", 64),
                    ("T+delta+zstd3", 64)]
TIME_CHUNKS_QUICK = [("default", 16), ("T+zstd3", 16)]

ALIASES = {"default": "default (= T+blosc-zstd3-bitshuffle, src preset)",
           "max": "max (= T+delta+zstd9, src preset)", "zstd": "zstd (zstd-3 on raw bytes, src preset)",
           "raw": "raw (bytes + crc32c, src preset)"}


def measure(bits: np.ndarray, codec: str, time_chunk: int, token_chunk: int, keep: Path | None = None) -> dict:
    n, vocab, hidden = bits.shape
    with scratch_dir("codec") as d:
        folder = keep if keep is not None else d
        group = make_store(folder, steps=n - 1, vocab=vocab, hidden=hidden, time_chunk=time_chunk,
                           token_chunk=token_chunk, codec=codec)
        W = group["W"]
        t0 = time.perf_counter()
        for start in range(0, n, time_chunk):
            W[start:start + time_chunk] = bits[start:start + time_chunk]
        t_write = time.perf_counter() - t0
        on_disk = dir_bytes(folder / "trajectory.zarr" / "W")
        t0 = time.perf_counter()
        back = W[:]
        t_read = time.perf_counter() - t0
        exact = bool(np.array_equal(back, bits))
        # ratio per time block (early vs late training)
        blocks = []
        root = folder / "trajectory.zarr" / "W" / "c"
        for b in range(-(-n // time_chunk)):
            rows = min(time_chunk, n - b * time_chunk)
            size = dir_bytes(root / str(b))
            blocks.append(r(rows * vocab * hidden * 2 / max(size, 1), 2))
    mb = bits.nbytes / 2**20
    return {
        "codec": codec,
        "label": ALIASES.get(codec, codec),
        "spec_only": codec in SPEC_ONLY,
        "time_chunk": time_chunk,
        "token_chunk": token_chunk,
        "bytes_on_disk": on_disk,
        "ratio": r(bits.nbytes / on_disk, 3),
        "write_MBps": r(mb / t_write, 1),
        "read_MBps": r(mb / t_read, 1),
        "bit_exact": exact,
        "ratio_by_time_block": blocks,
    }


def tensorstore_check(store_dir: Path, bits: np.ndarray) -> dict:
    """Open the W array of a default-preset store in TensorStore (subprocess; optional)."""
    extra = os.environ.get("CRUCIBLE_BENCH_EXTRA_PATH", "/tmp/benchtools")
    code = f"""
import sys, json
sys.path.append({extra!r})
try:
    import tensorstore as ts
except ImportError as e:
    print(json.dumps({{"status": "skipped: tensorstore not installed (pip install tensorstore)"}})); sys.exit(0)
import numpy as np
def _v():
    try:
        from importlib.metadata import version
        return version("tensorstore")
    except Exception:
        import glob, os
        hits = glob.glob(os.path.join({extra!r}, "tensorstore-*.dist-info"))
        return os.path.basename(hits[0])[12:-10] if hits else "unknown"
spec = {{"driver": "zarr3", "kvstore": {{"driver": "file", "path": {str(store_dir / "trajectory.zarr" / "W")!r}}}}}
arr = ts.open(spec, read=True).result()
data = arr.read().result()
ref = np.load({str(store_dir / "ref.npy")!r})
print(json.dumps({{"status": "opened", "tensorstore": getattr(ts, "__version__", None) or _v(), "shape": list(arr.shape), "dtype": str(arr.dtype),
                  "codecs": json.loads(json.dumps(arr.spec().to_json().get("metadata", {{}}).get("codecs", []))),
                  "bit_exact": bool(np.array_equal(np.asarray(data), ref))}}))
"""
    np.save(store_dir / "ref.npy", bits)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        return {"status": "failed", "stderr": out.stderr[-800:]}


def real_store_ratio(t) -> dict:
    """The recorded run's own W: raw bytes of committed whole blocks / their bytes on disk."""
    W = t.group["W"]
    T = W.chunks[0]
    vocab, hidden = W.shape[1:]
    blocks = (t.steps + 1) // T
    root = t.run_dir / "trajectory.zarr" / "W" / "c"
    sizes = [dir_bytes(root / str(b)) for b in range(blocks)]
    raw = T * vocab * hidden * 2
    return {"whole_blocks": blocks, "steps_covered": blocks * T, "layout": t.attrs.get("layout"),
            "ratio": r(blocks * raw / max(sum(sizes), 1), 3),
            "ratio_by_time_block": [r(raw / max(s, 1), 2) for s in sizes]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="rows of W to use [full: 224 = 7 chunks of 32, quick: 64]")
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for the run to reach 200 steps")
    args = p.parse_args()
    res = Result("compression", args.quick)
    want = args.steps or (64 if args.quick else 224)
    minimum = min(want, 200)
    t = wait_for_run(args.run, minimum, 0 if args.quick else args.max_wait)
    n = min(want, t.steps + 1)
    t0 = time.perf_counter()
    bits = np.ascontiguousarray(t.W.numpy_bits(slice(0, n)))
    res.details["source"] = {"run": str(args.run), "committed_steps_at_start": t.steps, "rows_used": n,
                             "note": "rows 0..n-1 of W (row 0 = initial weights)", "raw_MB": r(bits.nbytes / 2**20, 1),
                             "read_s": r(time.perf_counter() - t0, 2)}
    print(f"using W[0:{n}] of {args.run} ({t.steps} steps committed), {bits.nbytes / 2**20:.0f} MB raw", flush=True)

    rows = []
    for codec in (QUICK if args.quick else FULL):
        keep = None
        if codec == "default":
            ts_dir = Path(__import__("tempfile").mkdtemp(prefix="crucible-bench-ts-"))
            keep = ts_dir
        m = measure(bits, codec, 32, 500, keep=keep)
        if keep is not None:
            res.details["tensorstore"] = tensorstore_check(keep, bits)
            __import__("shutil").rmtree(keep, ignore_errors=True)
        rows.append(m)
        print(f"  {m['label']:48s} x{m['ratio']:6.2f}  write {m['write_MBps']:7.1f} MB/s  read {m['read_MBps']:7.1f} MB/s"
              f"  exact={m['bit_exact']}", flush=True)
    for codec, tc in (TIME_CHUNKS_QUICK if args.quick else TIME_CHUNKS_FULL):
        m = measure(bits, codec, tc, 500)
        rows.append(m)
        print(f"  {m['label'][:40]:40s} T={tc:<3d}   x{m['ratio']:6.2f}  write {m['write_MBps']:7.1f} MB/s  "
              f"read {m['read_MBps']:7.1f} MB/s  exact={m['bit_exact']}", flush=True)
    res.details["codecs"] = rows
    res.details["real_store"] = real_store_ratio(t)
    print(f"  real store {args.run}: {res.details['real_store']}", flush=True)

    exact = all(m["bit_exact"] for m in rows)
    by = {(m["codec"], m["time_chunk"]): m for m in rows}
    d, mx = by[("default", 32)], by[("max", 32)]
    best_spec = max((m for m in rows if m["spec_only"]), key=lambda m: m["ratio"])
    best = max(rows, key=lambda m: m["ratio"])
    res.target("3a", f"compression, default preset (spec codecs only) >= 4x, {n - 1} steps", d["ratio"], d["ratio"] >= 4,
               unit="x", note=f"write {d['write_MBps']} MB/s, read {d['read_MBps']} MB/s; real run store "
                              f"{res.details['real_store']['ratio']}x over {res.details['real_store']['steps_covered']} steps; "
                              f"best spec-only here: {best_spec['label']} T={best_spec['time_chunk']} {best_spec['ratio']}x")
    res.target("3b", f"compression, max preset >= 6.5x, {n - 1} steps", mx["ratio"], mx["ratio"] >= 6.5, unit="x",
               note=f"write {mx['write_MBps']} MB/s; best found: {best['label']} T={best['time_chunk']} {best['ratio']}x "
                    f"at {best['write_MBps']} MB/s write")
    res.target("3c", "every codec reads back bit-exact", exact, exact)
    ts = res.details.get("tensorstore", {})
    res.target("3d", "default-preset store opens in TensorStore (optional)", ts.get("status"),
               bool(ts.get("bit_exact")) if ts.get("status") == "opened" else None,
               note=f"tensorstore {ts.get('tensorstore', '')}, bit-exact {ts.get('bit_exact')}")
    res.save()


if __name__ == "__main__":
    main()
