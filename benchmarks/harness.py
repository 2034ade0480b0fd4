"""The one harness every benchmark in this folder runs on.

A benchmark is a script with a ``child(**spec) -> dict`` function (one measurement, in a fresh
process) and a ``main()`` that asks the harness to run its variants:

    runs = compare(__file__, {"none": {...}, "recorded": {...}}, reference="none", args=args)

``compare`` runs every variant once per round, each in a fresh child process (``python SCRIPT
--child JSON``), rotating the order each round, and adds an A/A control: the reference variant a
second time, whose ratio to the first shows the noise of the method on this machine. With
``--baseline-src DIR`` every variant named in ``library`` also runs against that other checkout of
the library (its children get ``PYTHONPATH=DIR/src``), as "NAME @base", interleaved in the same
rounds: old and new code on the same machine in the same session.

``Result`` writes results/<name>.json: the commit of each tree, the machine, its load at start and
end (with the busy processes), the command, and per table every variant's median, min, max and
ratio of medians to the reference. ``make_readme.py`` turns those files into README.md.

The physical limit is measured the same way: a variant whose child runs the bare compressor
(``bare_compressor``: the preset's own, via numcodecs) on the same bytes (``step_last_chunks``).

Only the public API of crucible_record is used, here and in every benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "@@result "  # the line a child prints its result on
BASE = " @base"  # suffix of a variant run against --baseline-src
WRITER_NICE = 10  # the recorder's writer thread runs at nice +10 on the CPU (its documented behaviour)


# ----- command line --------------------------------------------------------------------------
def parser(doc: str, rounds: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds [{rounds}]")
    p.add_argument("--quick", action="store_true", help="smallest sizes, seconds: a smoke test (results/quick/)")
    p.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                   help="also run the library's variants against the checkout DIR (PYTHONPATH=DIR/src)")
    p.add_argument("--results", type=Path, default=Path(os.environ.get("CRUCIBLE_BENCH_RESULTS", HERE / "results")),
                   help="folder of the result files [benchmarks/results or $CRUCIBLE_BENCH_RESULTS]")
    p.add_argument("--scratch", type=Path, default=Path(os.environ.get("CRUCIBLE_BENCH_TMP", tempfile.gettempdir())),
                   help="where scratch runs go (deleted) [$CRUCIBLE_BENCH_TMP or the system's temp dir]")
    return p


def child_main(fn) -> None:
    """In a child (``--child JSON``): run fn(**spec), print its result on the MARK line, exit."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        import resource

        result = fn(**json.loads(sys.argv[2]))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(MARK + json.dumps({**result, "child_cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
        sys.exit(0)


# ----- children and rounds -------------------------------------------------------------------
def run_child(script: str, spec: dict, src: Path | None = None, timeout: float = 3600, env: dict | None = None) -> dict:
    """One fresh process ``python SCRIPT --child JSON`` importing crucible_record from `src`
    (default: this checkout's src/). Returns its result, with the child's whole wall and CPU seconds."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    others = [x for x in env.get("PYTHONPATH", "").split(os.pathsep)  # (e.g. gpu_check.sh's wheels)
              if x and Path(x).resolve() != (ROOT / "src").resolve()]
    env["PYTHONPATH"] = os.pathsep.join([str(src or ROOT / "src"), *others])
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen([sys.executable, script, "--child", json.dumps(spec)], stdout=out,
                             stderr=subprocess.STDOUT, env=env)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    lines = [x for x in text.splitlines() if x.startswith(MARK)]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"child {Path(script).name} {spec} (src {src or 'this tree'}) failed, exit {p.returncode}:\n"
                         f"{text[-3000:]}")
    return {**json.loads(lines[-1][len(MARK):]), "child_wall_s": time.perf_counter() - t0}


def compare(script: str, variants: dict[str, dict], reference: str, args, library: list[str] | None = None,
            rounds: int | None = None, baseline_spec=None) -> dict[str, list[dict]]:
    """Every variant once per round (`rounds`, default --rounds), each in a fresh child, order
    rotated; the reference twice (A/A, as "REF (A/A)"); the `library` variants (default: all) also
    against --baseline-src, with baseline_spec(spec) as their spec if given."""
    plan = {name: (spec, None) for name, spec in variants.items()}
    plan[f"{reference} (A/A)"] = (variants[reference], None)
    if args.baseline_src:
        for name in (library if library is not None else list(variants)):
            spec = baseline_spec(variants[name]) if baseline_spec else variants[name]
            plan[name + BASE] = (spec, args.baseline_src / "src")
    names = list(plan)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    rounds = rounds or args.rounds
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            spec, src = plan[name]
            runs[name].append(run_child(script, spec, src))
            print(f"[{Path(script).stem}] round {k + 1}/{rounds} {name}: "
                  f"{ {key: v for key, v in runs[name][-1].items() if isinstance(v, (int, float))} }", flush=True)
    return runs


def summarize(runs: dict[str, list[dict]], metric: str, reference: str) -> dict[str, Any]:
    """Per variant: median, min, max, n of `metric`, its ratio of medians to the reference, and
    (for a variant with an @base twin) the ratio of this tree to the baseline."""
    ref = statistics.median(x[metric] for x in runs[reference])
    rows = {}
    for name, xs in runs.items():
        values = [x[metric] for x in xs if x.get(metric) is not None]
        if not values:
            continue
        m = statistics.median(values)
        rows[name] = {"median": m, "min": min(values), "max": max(values), "n": len(values),
                      "ratio": m / ref if ref else None}
    for name in list(rows):
        if name + BASE in rows and rows[name + BASE]["median"]:
            rows[name]["vs_baseline"] = rows[name]["median"] / rows[name + BASE]["median"]
    return {"metric": metric, "reference": reference, "aa": rows.get(f"{reference} (A/A)", {}).get("ratio"),
            "rows": rows}


def run_ranks(target, world: int, args: tuple, timeout: float = 900) -> None:
    """target(rank, port, *args) in `world` spawned processes on a free local port (torch.distributed
    ranks); SystemExit if one fails or hangs."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=target, args=(rank, port, *args)) for rank in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
            if p.exitcode != 0:
                raise SystemExit(f"a rank exited with {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


# ----- the bare codec: the physical limit ------------------------------------------------------
def step_last_chunks(block, row_chunk: int) -> list:
    """A (T, rows, ...) block's inner chunks of `row_chunk` rows, step axis last: the bytes the
    default preset compresses (its transpose codec puts the step fastest)."""
    import numpy as np

    return [np.ascontiguousarray(np.moveaxis(block[:, a:a + row_chunk], 0, -1))
            for a in range(0, block.shape[1], row_chunk)]


def bare_compressor(dtype: str, chunk_shape: tuple[int, ...], preset: str = "default"):
    """The numcodecs compressor that crucible_record.codecs.codecs_for(preset) gives an array of
    `dtype` (bf16 is stored as uint16 bits), without zarr, files or the recorder."""
    import numcodecs
    import numcodecs.blosc

    from crucible_record.codecs import codecs_for

    numcodecs.blosc.use_threads = False  # as zarr runs blosc (importing zarr's blosc codec sets it)
    compressors = [c.to_dict() for c in codecs_for(preset, chunk_shape, dtype)["compressors"]]
    conf = next((c for c in compressors if c["name"] != "crc32c"), None)
    if conf is None:
        return None  # raw
    c = conf.get("configuration", {})
    if conf["name"] == "zstd":
        return numcodecs.Zstd(level=c["level"])
    if conf["name"] == "blosc":
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[c["shuffle"]]
        return numcodecs.Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=shuffle, typesize=c["typesize"])
    raise SystemExit(f"no bare equivalent for the {conf['name']} compressor of preset {preset}")


def lower_thread_priority(nice: int = WRITER_NICE) -> None:
    """This thread at the writer's nice (Linux: a thread id is a process id for setpriority)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        pass


# ----- machine, load, result file ------------------------------------------------------------
def busy_processes(limit: int = 5) -> list[str]:
    """Other processes using > 5 % CPU now (ps), this one and its parent left out."""
    try:
        lines = subprocess.run(["ps", "-eo", "pid,ni,pcpu,args", "--sort=-pcpu"], capture_output=True,
                               text=True, timeout=10).stdout.splitlines()[1:]
    except Exception:
        return []
    mine = {os.getpid(), os.getppid()}
    rows = [x.split(None, 3) for x in lines]
    return [f"{a[3][:100]} ({a[2]}% CPU, nice {a[1]})" for a in rows
            if len(a) == 4 and int(a[0]) not in mine and float(a[2]) >= 5 and not a[3].startswith("ps ")][:limit]


def commit_of(tree: Path) -> str | None:
    """`git rev-parse HEAD` of a checkout, '+dirty' when its src/ has changes not committed."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=tree, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        info["cpu"] = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                           if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for mod in ("torch", "zarr", "numcodecs", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


class Result:
    """One benchmark's result file: tables (from summarize), rows (single figures) and details."""

    def __init__(self, name: str, args):
        self.name, self.args, self.started = name, args, time.time()
        self.data: dict[str, Any] = {
            "name": name, "quick": bool(args.quick),
            "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit_of(ROOT),
            "baseline": ({"src": str(args.baseline_src), "commit": commit_of(args.baseline_src)}
                         if args.baseline_src else None),
            "machine": machine(),
            "load": {"start": [round(x, 2) for x in os.getloadavg()], "busy_start": busy_processes()},
            "tables": {}, "rows": [], "details": {}}

    def table(self, title: str, summary: dict, note: str = "") -> None:
        self.data["tables"][title] = {**summary, "note": note}
        print(f"[{self.name}] {title} ({summary['metric']}, ratio to {summary['reference']}; A/A {summary['aa']}):")
        for name, row in summary["rows"].items():
            vs = f", {row['vs_baseline']:.3f}x @base" if "vs_baseline" in row else ""
            print(f"    {name:40s} {row['median']:10.3f} ({row['min']:.3f}..{row['max']:.3f}) "
                  f"{row['ratio'] or 0:.3f}x{vs}", flush=True)

    def row(self, what: str, value: Any, unit: str = "", note: str = "") -> None:
        self.data["rows"].append({"what": what, "value": value, "unit": unit, "note": note})
        print(f"[{self.name}] {what}: {value}{unit} {note}", flush=True)

    @property
    def details(self) -> dict[str, Any]:
        return self.data["details"]

    def save(self) -> Path:
        self.data["load"].update(end=[round(x, 2) for x in os.getloadavg()], busy_end=busy_processes())
        self.data["seconds"] = round(time.time() - self.started, 1)
        folder = self.args.results / ("quick" if self.args.quick else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        print(f"[{self.name}] wrote {path} ({self.data['seconds']} s)", flush=True)
        return path
