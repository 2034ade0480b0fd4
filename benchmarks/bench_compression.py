"""Target 3: lossless compression of a real W trajectory, codec by codec.

Reads the first N steps of W (uint16 bf16 bits) from the recorded run (default data and config),
writes them into fresh runs made by crucible_record.format.create_run with each codec
configuration (one whole time chunk per write, as the Recorder does), and reports
  ratio      raw bytes / bytes of W on disk
  write MB/s raw bytes per second of writing (encode + file writes)
  read MB/s  raw bytes per second of reading it all back (decode)
and checks every read-back bit-exact. Codec names: T = TransposeCodec(order=(1, 2, 0)) (step axis
fastest inside a chunk); delta = numcodecs Delta('<u2') (not a Zarr v3 spec codec); blosc-X-Y =
Blosc cname X, clevel, shuffle Y; "<name> preset" = crucible_record.codecs' preset of that name as
it is when the benchmark runs. Chunks are (time_chunk, row_chunk, 64) of the src default Layout,
inside shards of all tokens, unless stated; a whole-run pass repeats the src presets on every
committed step. Optionally opens a default-preset store in TensorStore.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from crucible_record.crucible3 import open_trajectory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (QUICK_RUN_NOTE, SRC_PRESETS, Result, bench_codecs, codec_label, describe, dir_bytes,  # noqa: E402
                     make_store, parser, r, recorded_run, scratch_dir, spec_only, src_layout)

# src presets first (whatever they are now), then the alternatives; duplicates of a preset are skipped
FULL = ["default", "max", "fast", "zstd", "raw", "blosc-zstd3-bitshuffle", "T+blosc-zstd3-bitshuffle",
        "T+blosc-zstd3-byteshuffle", "T+blosc-zstd2-byteshuffle", "T+blosc-lz4-byteshuffle", "T+blosc-lz4-bitshuffle",
        "T+zstd1", "T+zstd3", "T+zstd5", "T+delta+zstd3", "T+delta+blosc-zstd2-byteshuffle"]
QUICK = ["default", "max", "fast", "raw", "zstd", "T+blosc-zstd3-bitshuffle", "T+blosc-lz4-byteshuffle", "T+delta+zstd3"]
# (codec, time_chunk) beside the src layout's time chunk
TIME_CHUNKS_FULL = [("default", 32), ("default", 128), ("max", 32), ("T+delta+zstd3", 32)]
TIME_CHUNKS_QUICK = [("default", 32)]
# on every committed step of the run, src layout
WHOLE_RUN_FULL = ["default", "max", "T+delta+zstd3"]


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
        "label": codec_label(codec),
        "spec_only": spec_only(bench_codecs(codec)),
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
    W = t.W.array
    T = W.chunks[0]
    vocab, hidden = W.shape[1:]
    blocks = (t.steps + 1) // T
    root = t.run_dir / "trajectory.zarr" / "W" / "c"
    sizes = [dir_bytes(root / str(b)) for b in range(blocks)]
    raw = T * vocab * hidden * 2
    return {"whole_blocks": blocks, "steps_covered": blocks * T, "layout": {**t.info.layout.to_dict(), "time_chunk": T},
            "ratio": r(blocks * raw / max(sum(sizes), 1), 3),
            "ratio_by_time_block": [r(raw / max(s, 1), 2) for s in sizes]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="rows of W to use [full: 256, quick: 64]")
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for the run to reach 200 steps")
    args = p.parse_args()
    res = Result("compression", args.quick)
    want = args.steps or (64 if args.quick else 256)
    minimum = min(want, 201)
    t = recorded_run(args, minimum, 0 if args.quick else args.max_wait)
    if getattr(args, "quick_run", False):
        res.smoke_note = QUICK_RUN_NOTE
    n = min(want, t.steps + 1)
    t0 = time.perf_counter()
    bits = np.ascontiguousarray(t.W.numpy(slice(0, n)))
    res.details["source"] = {"run": str(args.run), "committed_steps_at_start": t.steps, "rows_used": n,
                             "note": "rows 0..n-1 of W (row 0 = initial weights)", "raw_MB": r(bits.nbytes / 2**20, 1),
                             "read_s": r(time.perf_counter() - t0, 2)}
    print(f"using W[0:{n}] of {args.run} ({t.steps} steps committed), {bits.nbytes / 2**20:.0f} MB raw", flush=True)

    L = src_layout()
    T0, K0 = L.time_chunk, L.row_chunk
    res.details["layout"] = {"time_chunk": T0, "token_chunk": K0, "note": "the src default Layout when this ran"}
    rows, seen = [], {}
    for codec in (QUICK if args.quick else FULL):
        try:
            bench_codecs(codec)
        except KeyError:  # a preset src no longer has
            continue
        if codec in SRC_PRESETS:
            seen[describe(bench_codecs(codec))] = codec
        elif describe(bench_codecs(codec)) in seen:
            print(f"  ({codec} is the {seen[describe(bench_codecs(codec))]} preset: not repeated)", flush=True)
            continue
        keep = None
        if codec == "default":
            keep = Path(tempfile.mkdtemp(prefix="crucible-bench-ts-"))
        m = measure(bits, codec, T0, K0, keep=keep)
        if keep is not None:
            res.details["tensorstore"] = tensorstore_check(keep, bits)
            shutil.rmtree(keep, ignore_errors=True)
        rows.append(m)
        print(f"  {m['label']:48s} T={T0:<3d} x{m['ratio']:6.2f}  write {m['write_MBps']:7.1f} MB/s  read "
              f"{m['read_MBps']:7.1f} MB/s  exact={m['bit_exact']}", flush=True)
    for codec, tc in (TIME_CHUNKS_QUICK if args.quick else TIME_CHUNKS_FULL):
        if tc == T0:
            continue
        m = measure(bits, codec, tc, K0)
        rows.append(m)
        print(f"  {m['label']:48s} T={tc:<3d} x{m['ratio']:6.2f}  write {m['write_MBps']:7.1f} MB/s  "
              f"read {m['read_MBps']:7.1f} MB/s  exact={m['bit_exact']}", flush=True)
    res.details["codecs"] = rows
    whole = []
    if not args.quick and t.steps + 1 > n:
        t = open_trajectory(args.run)  # the run has grown meanwhile
        n_all = t.steps + 1
        del bits
        bits = np.ascontiguousarray(t.W.numpy(slice(0, n_all)))
        for codec in WHOLE_RUN_FULL:
            m = measure(bits, codec, T0, K0)
            whole.append(m)
            print(f"  whole run ({n_all - 1} steps) {m['label']:40s} T={T0:<3d} x{m['ratio']:6.2f}  write "
                  f"{m['write_MBps']:7.1f} MB/s  read {m['read_MBps']:7.1f} MB/s  exact={m['bit_exact']}", flush=True)
        res.details["whole_run"] = {"steps": n_all - 1, "codecs": whole}
    res.details["real_store"] = real_store_ratio(t)
    print(f"  the recorded run's own store: {res.details['real_store']}", flush=True)

    exact = all(m["bit_exact"] for m in rows + whole)
    by = {(m["codec"], m["time_chunk"]): m for m in rows}
    d, mx = by[("default", T0)], by[("max", T0)]
    best_spec = max((m for m in rows if m["spec_only"]), key=lambda m: m["ratio"])
    best = max(rows, key=lambda m: m["ratio"])
    rs = res.details["real_store"]
    res.target("3a", f"compression, {d['label']} >= 4x, v3 spec codecs only, first {n - 1} steps, chunks ({T0}, {K0}, 64)",
               d["ratio"], d["ratio"] >= 4 and d["spec_only"], unit="x",
               note=f"spec only: {d['spec_only']}; write {d['write_MBps']} MB/s, read {d['read_MBps']} MB/s; best spec-only: "
                    f"{best_spec['label']} T={best_spec['time_chunk']} {best_spec['ratio']}x; the recorded run's own store "
                    f"({rs['layout']}) {rs['ratio']}x over {rs['steps_covered']} steps")
    res.target("3b", f"compression, {mx['label']} >= 6.5x, first {n - 1} steps", mx["ratio"], mx["ratio"] >= 6.5, unit="x",
               note=f"write {mx['write_MBps']} MB/s; best found: {best['label']} T={best['time_chunk']} {best['ratio']}x "
                    f"at {best['write_MBps']} MB/s write")
    if whole:
        wb = {m["codec"]: m for m in whole}
        steps_all = res.details["whole_run"]["steps"]
        wd, wm, wq = wb["default"], wb["max"], wb["T+delta+zstd3"]
        res.target("3e", f"whole run ({steps_all} steps): {wd['label']} >= 4x", wd["ratio"], wd["ratio"] >= 4, unit="x",
                   note=f"per {T0}-step block {wd['ratio_by_time_block']}; write {wd['write_MBps']} MB/s")
        res.target("3f", f"whole run ({steps_all} steps): {wm['label']} >= 6.5x", wm["ratio"], wm["ratio"] >= 6.5, unit="x",
                   note=f"per block {wm['ratio_by_time_block']}; write {wm['write_MBps']} MB/s; T+delta+zstd3 "
                        f"{wq['ratio']}x at {wq['write_MBps']} MB/s write")
    res.target("3c", "every codec reads back bit-exact", exact, exact, correctness=True)
    ts = res.details.get("tensorstore", {})
    res.target("3d", "default-preset store opens in TensorStore (optional)", ts.get("status"),
               bool(ts.get("bit_exact")) if ts.get("status") == "opened" else None,
               note=f"tensorstore {ts.get('tensorstore', '')}, bit-exact {ts.get('bit_exact')}", correctness=True)
    res.save()


if __name__ == "__main__":
    main()
