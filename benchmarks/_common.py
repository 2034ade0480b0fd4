"""Shared helpers for the benchmarks: machine facts, load, results files, RSS, timing, presets.

Every benchmark writes benchmarks/results/<name>.json (full mode) or
benchmarks/results/quick/<name>.json (--quick), holding the machine, the load seen at start and
end, the target rows (target | measured | met) and the raw details behind them.
"""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# CRUCIBLE_BENCH_RESULTS moves the results (gpu_check.sh: under $OUT, the committed files untouched).
RESULTS = Path(os.environ.get("CRUCIBLE_BENCH_RESULTS", HERE / "results"))
DEFAULT_RUN = Path(os.environ.get("CRUCIBLE_BENCH_RUN", "/work/runs/default500"))
# Where scratch stores go; deleted after each benchmark.
SCRATCH = Path(os.environ.get("CRUCIBLE_BENCH_TMP", tempfile.gettempdir()))


# ----- command line --------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute or less")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN,
                   help=f"recorded run to read real trajectories from [default: {DEFAULT_RUN}]")
    return p


# ----- machine and load ----------------------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_processes(limit: int = 6) -> list[str]:
    """Other processes using CPU right now (ps, sorted by %CPU), this benchmark excluded."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ni,pcpu,rss,args", "--sort=-pcpu"],
                             capture_output=True, text=True, timeout=10).stdout.splitlines()[1:]
    except Exception:
        return []
    mine = {os.getpid(), os.getppid()}
    rows = []
    for line in out:
        parts = line.split(None, 4)
        if len(parts) < 5 or int(parts[0]) in mine or float(parts[2]) < 5.0:
            continue
        args = parts[4]
        if args.startswith("ps "):
            continue
        rows.append(f"pid {parts[0]} nice {parts[1]} cpu {parts[2]}% rss {int(parts[3]) // 1024} MB: {args[:110]}")
        if len(rows) >= limit:
            break
    return rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    versions = {}
    for mod in ("torch", "zarr", "numcodecs", "numpy", "safetensors"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    info["blas_env"] = {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}
    info["source"] = source_state()
    return info


def source_state() -> dict[str, Any]:
    """The commit benchmarked (`git rev-parse HEAD`) and which src/ files differ from it (read-only git)."""
    repo = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=repo, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        return {"commit": head or None, "src_changes_not_committed": [x.strip() for x in dirty if x.strip()]}
    except Exception as e:
        return {"commit": None, "error": str(e)}


class Result:
    """Collects target rows and details; `save()` writes the JSON file."""

    def __init__(self, name: str, quick: bool, argv: list[str] | None = None):
        self.name = name
        self.quick = quick
        self.started = time.time()
        self.data: dict[str, Any] = {
            "name": name,
            "mode": "quick" if quick else "full",
            "command": "python benchmarks/" + Path(sys.argv[0]).name + " " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": None,  # git rev-parse HEAD, filled in below
            "machine": machine(),
            "load": {"start": load_average(), "busy_processes_start": busy_processes()},
            "targets": [],
            "details": {},
        }
        self.data["commit"] = self.data["machine"]["source"].get("commit")

    smoke_note: str | None = None  # set: targets are not judged (met None), the note says why

    def target(self, id: str, target: str, measured: Any, met: bool | None, note: str = "", unit: str = "",
               *, correctness: bool = False) -> None:
        """One row of the README table. met None = not measured / skipped. A correctness row is judged
        even when `smoke_note` is set (it does not depend on the data being realistic)."""
        if self.smoke_note and met is not None and not correctness:
            met, note = None, f"{note}; {self.smoke_note}" if note else self.smoke_note
        self.data["targets"].append(
            {"id": id, "target": target, "measured": measured, "unit": unit, "met": met, "note": note}
        )
        status = {True: "MET", False: "MISSED", None: "n/a"}[met]
        print(f"[{self.name}] {id}: {target}: {measured}{unit} -> {status} {note}", flush=True)

    @property
    def details(self) -> dict[str, Any]:
        return self.data["details"]

    def save(self) -> Path:
        self.data["load"]["end"] = load_average()
        self.data["load"]["busy_processes_end"] = busy_processes()
        self.data["seconds"] = round(time.time() - self.started, 1)
        folder = RESULTS / "quick" if self.quick else RESULTS
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, path)
        print(f"[{self.name}] wrote {path} ({self.data['seconds']} s)", flush=True)
        return path


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except Exception:
        pass
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ----- numbers -------------------------------------------------------------------------------
def median(values) -> float:
    return float(statistics.median(values))


def r(x: float, digits: int = 3) -> float:
    return float(round(x, digits))


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's RSS in a thread; `.peak` and `.samples` [(t, MB)]."""

    def __init__(self, every_s: float = 0.05):
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, rss_mb()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max((m for _, m in self.samples), default=rss_mb())

    def peak_between(self, t0: float, t1: float) -> float:
        vals = [m for t, m in self.samples if t0 <= t <= t1]
        return max(vals) if vals else float("nan")


_VMHWM_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    with open(os.environ['CRUCIBLE_BENCH_VMHWM'], 'w') as out:
                        out.write(line.split()[1])
    except OSError:
        pass
atexit.register(_peak)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name='__main__', alter_sys=True)
"""


def run_module_child(module: str, args: list[str], **kw) -> dict[str, Any]:
    """`python -m module args` in a subprocess whose own peak RSS is read from VmHWM at exit.

    wait4()'s ru_maxrss is not the child's own peak on Linux: it survives exec, so the child
    reports at least its parent's RSS at fork time. VmHWM belongs to the exec'd address space."""
    fd, path = tempfile.mkstemp(prefix="crucible-bench-vmhwm-")
    os.close(fd)
    env = dict(kw.pop("env", None) or os.environ)
    env["CRUCIBLE_BENCH_VMHWM"] = path
    try:
        out = run_child([sys.executable, "-c", _VMHWM_WRAPPER, module, *args], env=env, **kw)
        text = Path(path).read_text().strip()
        out["ru_maxrss_mb"] = out["peak_rss_mb"]
        out["peak_rss_mb"] = int(text) / 1024 if text else float("nan")
        out["cmd"] = f"python -m {module} " + " ".join(map(str, args))
    finally:
        os.unlink(path)
    return out


def run_child(cmd: list[str], *, timeout: float = 900, env: dict | None = None, cwd=None) -> dict[str, Any]:
    """Run a subprocess; return its wall time, exit code, output tail and ru_maxrss from wait4
    (an upper bound: see run_module_child for the child's own peak)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return {
        "cmd": " ".join(map(str, cmd)),
        "rc": p.returncode,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "output_tail": text[-1500:],
    }


@contextlib.contextmanager
def scratch_dir(prefix: str):
    path = Path(tempfile.mkdtemp(prefix=f"crucible-bench-{prefix}-", dir=SCRATCH))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----- the recorded run ----------------------------------------------------------------------
def wait_for_run(run: Path, want: int, max_wait_s: float, log=print):
    """Open `run` once it has `want` committed steps, waiting at most max_wait_s; else what exists."""
    from crucible_record.crucible3 import open_trajectory

    deadline = time.time() + max_wait_s
    t = open_trajectory(run)
    while t.steps < want and time.time() < deadline:
        log(f"waiting for {run}: {t.steps} of {want} steps committed")
        time.sleep(min(30.0, max(1.0, deadline - time.time())))
        t = open_trajectory(run)
    return t


QUICK_RUN_STEPS = 129  # two whole 64-step blocks of W and one more row
QUICK_RUN_NOTE = "not judged: a small quick-mode run (batch 4, seq 16), not the default-config trajectory"


def recorded_run(args, want: int, max_wait_s: float = 0, log=print):
    """The recorded Crucible-3 run the benchmark reads (`--run`), opened.

    With --quick and no run at `--run`, a small one is recorded once (the notebook's model, vocab
    10,000 x hidden 64, default layout; batch 4 x seq 16 so that it takes seconds) and kept in
    $CRUCIBLE_BENCH_TMP for the other quick benchmarks; its W is not a default-config trajectory,
    so quick compression/read numbers are only a smoke test. Full mode needs the real run."""
    if Path(args.run).exists() or not args.quick:
        if not Path(args.run).exists():
            raise SystemExit(f"no recorded run at {args.run}: record one (crucible-record train --out {args.run}) "
                             f"or pass --run / set $CRUCIBLE_BENCH_RUN")
        return wait_for_run(args.run, want, max_wait_s, log)
    from crucible_record.crucible3 import open_trajectory

    run = SCRATCH / f"crucible-bench-quick-run-{QUICK_RUN_STEPS}"
    try:
        t = open_trajectory(run)
        if getattr(t, "steps", 0) >= QUICK_RUN_STEPS:
            args.run, args.quick_run = run, True
            return t
    except Exception:
        pass
    shutil.rmtree(run, ignore_errors=True)
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    log(f"no recorded run at {args.run}; recording a small one for --quick at {run}")
    config = RunConfig(steps=QUICK_RUN_STEPS, batch_size=4, seq_len=16, device="cpu")
    start_run(config, run, layout=Layout(), checkpoints=False, progress=False, durability="none")
    args.run, args.quick_run = run, True
    return open_trajectory(run)


def prefix_copy(run: Path, dest: Path, steps: int) -> Path:
    """A run directory sharing the chunk files of the Crucible-3 `run` (hard links), committed to
    `steps` training steps (commit.json says steps+1 rows); the original run is untouched."""
    from crucible_record.storage import STORE_NAME

    dest.mkdir(parents=True)
    src = Path(run) / STORE_NAME
    try:
        subprocess.run(["cp", "-al", str(src), str(dest / STORE_NAME)], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        shutil.copytree(src, dest / STORE_NAME)
    marker = dest / STORE_NAME / "commit.json"
    tmp = marker.with_name("commit.json.tmp")
    tmp.write_text(json.dumps({"steps": steps + 1}) + "\n")
    os.replace(tmp, marker)  # a new file: the hard-linked original's marker is untouched
    return dest


# ----- extra codec presets for experiments (benchmarks only; src keeps its own) ---------------
from crucible_record import codecs as _codecs  # noqa: E402
from crucible_record.format import schema as _format  # noqa: E402

_SRC_CODECS_FOR = _codecs.codecs_for  # the src presets, unpatched
SRC_PRESETS = tuple(_codecs.CODEC_PRESETS)


def src_codecs(preset: str, time_chunk: int | None = None) -> dict[str, Any]:
    """The src preset's codecs for W (3-d, uint16 bf16 bits)."""
    return _SRC_CODECS_FOR(preset, (time_chunk or 64, 100, 64), "uint16")


def describe(codecs: dict[str, Any]) -> str:
    """'T+zstd3'-style name of a filters/compressors dict (crc32c left out)."""
    parts = []
    for c in list(codecs.get("filters", [])) + list(codecs.get("compressors", [])):
        name = type(c).__name__
        if name == "TransposeCodec":
            parts.append("T")
        elif name == "ZstdCodec":
            parts.append(f"zstd{c.level}")
        elif name == "GzipCodec":
            parts.append(f"gzip{c.level}")
        elif name == "BloscCodec":
            shuffle = getattr(c.shuffle, "value", c.shuffle)
            shuffle = {"shuffle": "byteshuffle", "noshuffle": "noshuffle"}.get(str(shuffle), str(shuffle))
            cname = getattr(c.cname, "value", c.cname)
            parts.append(f"blosc-{cname}{c.clevel if cname != 'lz4' else ''}-{shuffle}")
        elif name == "Delta":
            parts.append("delta")
        elif name == "Crc32cCodec":
            continue
        else:
            parts.append(name)
    return "+".join(parts) or "bytes"


def spec_only(codecs: dict[str, Any]) -> bool:
    """True when every codec is a Zarr v3 spec codec (numcodecs' are not)."""
    return not any(type(c).__module__.startswith("zarr.codecs.numcodecs")
                   for c in list(codecs.get("filters", [])) + list(codecs.get("compressors", [])))


def bench_codecs(name: str, time_chunk: int = 32) -> dict[str, Any]:
    """Codec configurations tried by the benchmarks, by name. The src presets are reused as-is."""
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec

    if name in SRC_PRESETS:
        return src_codecs(name, time_chunk)
    crc = Crc32cCodec()
    T = [TransposeCodec(order=(1, 2, 0))]

    def blosc(cname, shuffle, clevel=3):
        return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=2)

    def delta():
        from zarr.codecs.numcodecs import Delta

        return [Delta(dtype="<u2")]

    table = {
        "bytes": ([], [crc]),
        "zstd3": ([], [ZstdCodec(level=3), crc]),
        "blosc-zstd3-byteshuffle": ([], [blosc("zstd", "shuffle"), crc]),
        "blosc-zstd3-bitshuffle": ([], [blosc("zstd", "bitshuffle"), crc]),
        "T+zstd1": (T, [ZstdCodec(level=1), crc]),
        "T+zstd3": (T, [ZstdCodec(level=3), crc]),
        "T+zstd5": (T, [ZstdCodec(level=5), crc]),
        "T+gzip5": (T, [GzipCodec(level=5), crc]),
        "T+blosc-zstd3-bitshuffle": (T, [blosc("zstd", "bitshuffle"), crc]),  # the first src default
        "T+blosc-zstd3-byteshuffle": (T, [blosc("zstd", "shuffle"), crc]),
        # c-blosc runs zstd at level 2*clevel-1: blosc clevel 2 = zstd level 3, clevel 1 = level 1
        "T+blosc-zstd2-byteshuffle": (T, [blosc("zstd", "shuffle", 2), crc]),
        "T+blosc-zstd1-byteshuffle": (T, [blosc("zstd", "shuffle", 1), crc]),
        "T+blosc-lz4-bitshuffle": (T, [blosc("lz4", "bitshuffle", 5), crc]),
        "T+blosc-lz4-byteshuffle": (T, [blosc("lz4", "shuffle", 5), crc]),
        "T+delta+zstd3": (T + delta(), [ZstdCodec(level=3), crc]),
        "T+delta+zstd9": (T + delta(), [ZstdCodec(level=9), crc]),
        "T+delta+blosc-zstd2-byteshuffle": (T + delta(), [blosc("zstd", "shuffle", 2), crc]),
        "T+delta+blosc-zstd3-byteshuffle": (T + delta(), [blosc("zstd", "shuffle"), crc]),
        "T+delta+blosc-lz4-byteshuffle": (T + delta(), [blosc("lz4", "shuffle", 5), crc]),
    }
    if name not in table:
        raise KeyError(f"unknown benchmark codec {name!r}")
    filters, compressors = table[name]
    return {"filters": filters, "compressors": compressors}


def codec_label(name: str) -> str:
    """'default preset (T+zstd3)' for src presets, the name itself otherwise."""
    if name in SRC_PRESETS:
        return f"{name} preset ({describe(bench_codecs(name))})"
    return name


@contextlib.contextmanager
def extra_presets():
    """Let Layout / format.create_run (and so cr.record) accept the benchmark codec names for W
    (monkeypatch, this process); other fields of a run get the src default preset."""
    def codecs_for(preset: str, chunk_shape: tuple[int, ...], storage_dtype: str) -> dict[str, Any]:
        if preset in SRC_PRESETS:
            return _SRC_CODECS_FOR(preset, chunk_shape, storage_dtype)
        if len(chunk_shape) == 3:
            return bench_codecs(preset)
        return _SRC_CODECS_FOR("default", chunk_shape, storage_dtype)

    class _Any(tuple):
        def __contains__(self, item):  # every name passes validate(); bench_codecs rejects unknowns
            return True

    saved = _format.codecs_for, _codecs.CODEC_PRESETS
    _format.codecs_for, _codecs.CODEC_PRESETS = codecs_for, _Any(SRC_PRESETS)
    try:
        yield
    finally:
        _format.codecs_for, _codecs.CODEC_PRESETS = saved


def src_layout():
    """The src default Layout (time_chunk, row_chunk, codec) as it is now."""
    from crucible_record.codecs import Layout

    return Layout()


def make_store(run_dir: Path, *, steps: int, vocab: int, hidden: int, time_chunk: int | None = None,
               token_chunk: int | None = None, codec: str = "default", dead_mask=None):
    """A fresh Crucible-3-shaped run (fields of crucible3.engine.fields: W (steps+1, vocab, hidden),
    h_mean, loss, epoch; constants dead_mask, dead_indices) made by crucible_record.format.create_run
    with any benchmark codec for W, nothing written yet; chunk sizes default to the src Layout's.
    Returns the zarr group: write W blocks directly, then `commit(run_dir, rows)`."""
    import numpy as np
    import torch

    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.engine import fields
    from crucible_record.format.schema import create_run
    from crucible_record.storage import open_store

    d = Layout()
    if dead_mask is None:
        dead_mask = np.zeros(vocab, dtype=bool)
    dead = torch.from_numpy(np.asarray(dead_mask, dtype=bool).copy())
    config = RunConfig(steps=steps, vocab_size=vocab, hidden_dim=hidden, num_heads=1)
    layout = Layout(time_chunk=time_chunk or d.time_chunk, row_chunk=token_chunk or d.row_chunk, codec=codec)
    store = open_store(run_dir, read_only=False, durability="none")
    with extra_presets():
        store.prepare_new()
        return create_run(store, fields(config), steps=steps + 1, layout=layout,
                          attributes={"experiment": "crucible-3", "config": config.to_dict(),
                                      "provenance": {"note": "benchmark"}},
                          constants={"dead_mask": (dead, ("token",)),
                                     "dead_indices": (torch.nonzero(dead).flatten(), ("dead_token",))})


def commit(run_dir: Path, rows: int) -> None:
    """Move the commit marker of a make_store run: rows 0..rows-1 of W are readable (cr.open)."""
    from crucible_record.format.schema import write_commit
    from crucible_record.storage import open_store

    write_commit(open_store(run_dir, read_only=False, durability="none"), rows)
