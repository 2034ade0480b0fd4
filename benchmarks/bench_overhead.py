"""Targets 1 and 2: what recording costs a training step, and a whole recorded run.

Same engine (crucible_record.crucible3.engine.train), three variants:
  none      engine.train with no recording (a timing shim that only stamps the clock)
  recorder  the real recorder (cr.record with the Crucible-3 fields, src default Layout)
  notebook  the notebook's way: preallocated in-RAM history, .cpu() and .item() every step
            (benchmarks/notebook_history.py)
CPU: the variants run in lockstep: processes (each trains in its main thread, as the CLI
does) take turns, one step each, the order rotated every step, so the bursty load of other
processes on a shared 2-core machine hits every variant alike. A step is timed from getting the
turn to the end of its record() call; the headline is the median of the per-step paired ratios.
With the default layout the writer compresses a block once every time_chunk steps, which a short
run never reaches, so the writer's cost is measured separately:
  contention  training while a thread encodes and writes whole W blocks non-stop (100 % duty, the
              recorder's own block-write path) vs idle (the trainer waits, untimed, for the writer
              to finish before idle steps), per codec preset; with the writer's seconds per recorded
              step this gives the steady-state cost: writer_s_per_step x (1 - 1/slowdown) / step_s.
  end to end  whole runs spanning >= 2 blocks of W, each in a fresh process, interleaved rounds:
              `start_run` as `crucible-record train` runs it (checkpoints, fsync, commit every 10 s;
              inputs loaded and hashed, run created, trained, closed) vs load_inputs + engine.train
              unrecorded, plus a second unrecorded copy as an A/A control; wall and CPU seconds.
--device cuda runs none / recorder / notebook on the GPU, sequentially interleaved (3 rounds),
end to end with a synchronize and recorder.close(), or records "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SRC_PRESETS, Result, codec_label, make_store, median, parser, r, run_child,  # noqa: E402
                     scratch_dir, src_layout)
from notebook_history import NotebookHistory  # noqa: E402

warnings.filterwarnings("ignore", message="enable_nested_tensor")


class Timed:
    """Recorder-shaped shim: stamps the clock at each record(), then forwards (or not)."""

    def __init__(self, inner=None, on_record=None):
        self.inner = inner
        self.stamps: list[float] = []
        self.record_s: list[float] = []
        self.on_record = on_record
        self.next_step = 0 if inner is None else inner.next_step

    def latest(self, name: str):
        return self.inner.latest(name) if self.inner is not None else None

    def record(self, step, **tensors) -> bool:
        t = time.perf_counter()
        self.stamps.append(t)
        if self.on_record is not None:
            self.on_record(step)
        commit = self.inner.record(step, **tensors) if self.inner is not None else False
        self.record_s.append(time.perf_counter() - t)
        return commit

    def after_commit(self, step, fn) -> None:
        if self.inner is not None:
            self.inner.after_commit(step, fn)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def new_recorder(folder: Path, cfg, inputs, layout=None, **kw):
    """The recorder `crucible-record train` uses: the Crucible-3 fields and constants (no checkpoints)."""
    import crucible_record as cr
    from crucible_record.crucible3.engine import fields

    return cr.record(folder, fields(cfg), steps=cfg.steps + 1, layout=layout or src_layout(),
                     attributes={"experiment": "crucible-3", "config": cfg.to_dict()},
                     constants={"dead_mask": (inputs.masks.dead_mask, ("token",)),
                                "dead_indices": (inputs.masks.dead_indices, ("dead_token",))}, **kw)


def one_run(config, inputs, variant: str, warm: int, measured: int, device: str) -> dict:
    import torch

    from crucible_record.codecs import Layout
    from crucible_record.crucible3.engine import train

    steps = warm + measured
    cfg = config.replace(steps=steps, device=device)
    with scratch_dir("overhead") as d:
        if variant == "none":
            inner = None
        elif variant.startswith("recorder"):
            layout = Layout(time_chunk=1) if variant == "recorder_t1" else None  # None: the src default Layout
            inner = new_recorder(d / "run", cfg, inputs, layout)
        elif variant == "notebook":
            inner = NotebookHistory(steps, cfg.vocab_size, cfg.hidden_dim)
        else:
            raise ValueError(variant)
        timed = Timed(inner)
        train(cfg, inputs, timed, progress=False)
        t_trained = time.perf_counter()
        timed.close()
        if device == "cuda":
            torch.cuda.synchronize()
        t_end = time.perf_counter()
    stamps = np.array(timed.stamps)
    step_s = np.diff(stamps)[warm:]  # step k = stamps[k] - stamps[k-1]; drop the warm-up steps
    return {
        "variant": variant,
        "step_s": [r(x, 4) for x in step_s],
        "median_step_s": r(float(np.median(step_s)), 4),
        "end_to_end_step_s": r((t_end - stamps[warm]) / measured, 4),
        "close_s": r(t_end - t_trained, 4),
        "record_call_ms_median": r(1000 * median(timed.record_s[1:]), 3),
    }


def compare(config, inputs, variants, warm, measured, rounds, device, log) -> dict:
    runs = {v: [] for v in variants}
    for rnd in range(rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]  # rotate
        for v in order:
            res = one_run(config, inputs, v, warm, measured, device)
            runs[v].append(res)
            log(f"  round {rnd + 1} {v:12s} median step {res['median_step_s']:.4f} s, "
                f"end-to-end {res['end_to_end_step_s']:.4f} s/step, record() {res['record_call_ms_median']} ms")
    out = {"config": {"batch_size": config.batch_size, "seq_len": config.seq_len, "warm_steps": warm,
                      "measured_steps": measured, "rounds": rounds, "device": device},
           "runs": runs, "summary": {}}
    base_steps = [x for run in runs["none"] for x in run["step_s"]]
    base_e2e = [run["end_to_end_step_s"] for run in runs["none"]]
    round_medians = [run["median_step_s"] for run in runs["none"]]
    out["summary"]["none"] = {"median_step_s": r(median(base_steps), 4),
                              "noise_max_over_min_round_median": r(max(round_medians) / min(round_medians), 4)}
    for v in variants:
        if v == "none":
            continue
        steps = [x for run in runs[v] for x in run["step_s"]]
        e2e = [run["end_to_end_step_s"] for run in runs[v]]
        paired = [a["median_step_s"] / b["median_step_s"] for a, b in zip(runs[v], runs["none"])]
        out["summary"][v] = {
            "median_step_s": r(median(steps), 4),
            "ratio_median_step": r(median(steps) / median(base_steps), 4),
            "ratio_paired_rounds_median": r(median(paired), 4),
            "ratio_end_to_end": r(median(e2e) / median(base_e2e), 4),
            "record_call_ms_median": r(median([run["record_call_ms_median"] for run in runs[v]]), 3),
            "close_s_median": r(median([run["close_s"] for run in runs[v]]), 3),
        }
    return out


# ----- CPU: variants in lockstep ---------------------------------------------------------------
# Each variant trains in its own process (in its main thread, as the CLI does: torch behaves very
# differently in a non-main thread on a loaded 2-core machine), and the processes take turns,
# one step each, the order rotated every round, so the load of other processes hits every variant
# alike, step by step.
class Lockstep:
    def __init__(self, ctx, n: int, rounds: int):
        self.cond = ctx.Condition()
        self.pos = ctx.Value("i", 0, lock=False)
        self.abort = ctx.Value("i", 0, lock=False)
        self.schedule = [(r + j) % n for r in range(rounds) for j in range(n)]

    def wait(self, i: int) -> None:
        deadline = time.time() + 3600
        with self.cond:
            while self.abort.value == 0 and self.schedule[self.pos.value] != i:
                self.cond.wait(1.0)
                if time.time() > deadline:
                    raise TimeoutError("lockstep turn never came")
            if self.abort.value:
                raise RuntimeError("another variant failed")

    def done(self) -> None:
        with self.cond:
            self.pos.value = min(self.pos.value + 1, len(self.schedule) - 1)
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.abort.value = 1
            self.cond.notify_all()


class TurnTimed(Timed):
    """Times each step of one variant from getting its turn to the end of its record() call."""

    def __init__(self, inner, sched: Lockstep, index: int, steps: int):
        super().__init__(inner)
        self.sched, self.index, self.steps = sched, index, steps
        self.step_s: list[float] = []
        self._turn = 0.0

    def record(self, step, **tensors) -> bool:
        if step == 0:
            self.sched.wait(self.index)
        t = time.perf_counter()
        commit = self.inner.record(step, **tensors) if self.inner is not None else False
        end = time.perf_counter()
        self.record_s.append(end - t)
        if step > 0:
            self.step_s.append(end - self._turn)
        self.sched.done()
        if step < self.steps:
            self.sched.wait(self.index)
            self._turn = time.perf_counter()
        return commit


def _lockstep_child(index, variant, cfg_dict, steps, sched, folder, results) -> None:
    warnings.filterwarnings("ignore", message="enable_nested_tensor")
    try:
        from crucible_record.crucible3.config import RunConfig
        from crucible_record.crucible3.engine import load_inputs, train

        cfg = RunConfig.from_dict(cfg_dict)
        inputs = load_inputs(cfg)
        if variant in ("none", "none_again"):
            inner = None
        elif variant == "recorder":
            inner = new_recorder(Path(folder), cfg, inputs)
        elif variant == "notebook":
            inner = NotebookHistory(steps, cfg.vocab_size, cfg.hidden_dim)
        else:
            raise ValueError(variant)
        import torch

        shim = TurnTimed(inner, sched, index, steps)
        train(cfg, inputs, shim, progress=False)
        t0 = time.perf_counter()
        shim.close()
        results.put((variant, {"step_s": shim.step_s, "record_s": shim.record_s, "close_s": time.perf_counter() - t0,
                               "torch_threads": torch.get_num_threads()}))
    except BaseException as e:  # noqa: BLE001
        sched.fail()
        results.put((variant, {"error": f"{type(e).__name__}: {e}"}))


def lockstep_compare(config, inputs, variants, warm, measured, log) -> dict:
    """All variants train at once in processes, one step each in turn; paired ratios per step."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    steps = warm + measured
    cfg = config.replace(steps=steps, device="cpu")
    sched = Lockstep(ctx, len(variants), steps + 1)
    results = ctx.Queue()
    got = {}
    with scratch_dir("lockstep") as d:
        procs = [ctx.Process(target=_lockstep_child, args=(i, v, cfg.to_dict(), steps, sched, str(d / v), results),
                             name=f"variant-{v}") for i, v in enumerate(variants)]
        for pr in procs:
            pr.start()
        for _ in procs:
            v, data = results.get(timeout=3600)
            got[v] = data
        for pr in procs:
            pr.join()
    errors = [f"{v}: {g['error']}" for v, g in got.items() if "error" in g]
    if errors:
        raise RuntimeError("; ".join(errors))
    out = {"config": {"batch_size": config.batch_size, "seq_len": config.seq_len, "warm_steps": warm,
                      "measured_steps": measured, "rounds": 1, "method": "lockstep processes", "device": "cpu"},
           "runs": {v: {"step_s": [r(x, 4) for x in g["step_s"][warm:]],
                        "record_call_ms_median": r(1000 * median(g["record_s"][1:]), 3),
                        "close_s": r(g["close_s"], 3), "torch_threads": g["torch_threads"]} for v, g in got.items()},
           "summary": {}}
    base = got["none"]["step_s"][warm:]
    out["summary"]["none"] = {"median_step_s": r(median(base), 4),
                              "noise_max_over_min_step": r(max(base) / min(base), 4)}
    for v in variants:
        if v == "none":
            continue
        mine = got[v]["step_s"][warm:]
        paired = [a / b for a, b in zip(mine, base)]
        out["summary"][v] = {
            "median_step_s": r(median(mine), 4),
            "ratio_median_step": r(median(mine) / median(base), 4),
            "ratio_paired_rounds_median": r(median(paired), 4),
            "paired_ratios": [r(x, 3) for x in paired],
            "ratio_end_to_end": r((sum(mine) + got[v]["close_s"]) / sum(base), 4),
            "record_call_ms_median": r(1000 * median(got[v]["record_s"][1:]), 3),
            "close_s_median": r(got[v]["close_s"], 3),
        }
        log(f"  {v:10s} median step {median(mine):.4f} s vs none {median(base):.4f} s: x{median(mine) / median(base):.4f}, "
            f"paired per-step ratios {[r(x, 3) for x in paired]}, record() {out['summary'][v]['record_call_ms_median']} ms")
    return out


# ----- writer contention -----------------------------------------------------------------------
class ChunkWriterLoad:
    """A thread that writes whole W blocks non-stop while `on`, the way the recorder writes a block:
    format.encode_block + store.set (one file per shard), or zarr's array[...] = block where this
    version of src has no encode_block."""

    def __init__(self, folder: Path, chunk: np.ndarray, codec: str):
        from crucible_record.storage import open_store

        T, V, H = chunk.shape
        self.group = make_store(folder, steps=4 * T - 1, vocab=V, hidden=H, time_chunk=T, codec=codec)
        self.store = open_store(folder, read_only=False, durability="none")
        self.codec = codec
        self.array = self.group["W"]
        self.chunk = chunk
        self.on = threading.Event()
        self.stop = False
        self.busy: list[tuple[float, float]] = []  # (start, end) of each chunk write
        self.writing = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _write(self, block: int) -> None:
        from crucible_record import format as fmt

        T = self.chunk.shape[0]
        if hasattr(fmt, "encode_block"):
            for key, data in fmt.encode_block(self.array, block, self.chunk).items():
                self.store.set(key, data)
        else:
            self.array[block * T:(block + 1) * T] = self.chunk

    def _run(self) -> None:
        i = 0
        while not self.stop:
            if not self.on.wait(0.05) or self.stop:
                continue
            self.writing = True
            t = time.perf_counter()
            self._write(i % 4)
            self.busy.append((t, time.perf_counter()))
            self.writing = False
            i += 1

    def busy_fraction(self, a: float, b: float) -> float:
        overlap = sum(max(0.0, min(b, e) - max(a, s)) for s, e in self.busy)
        return overlap / (b - a)

    def close(self) -> None:
        self.stop = True
        self.on.set()
        self.thread.join()


def contention(config, inputs, codec: str, blocks: int, chunk: np.ndarray, log) -> dict:
    """Alternate blocks of 2 steps with the load on / off. Before an idle block the trainer waits
    (untimed) until the writer has finished its chunk; a step counts as loaded when the writer was
    busy >= 95 % of it and as idle when the writer was idle all of it."""
    from crucible_record.crucible3.engine import train

    warm = 2
    steps = warm + 2 * 2 * blocks
    with scratch_dir("contention") as d:
        load = ChunkWriterLoad(d, chunk, codec)
        begin, end = [], []

        class Shim(Timed):
            def record(self, step, **tensors):
                begin.append(time.perf_counter())
                idx = step + 1 - warm - 1  # the step about to run, counted from the first measured one
                if idx >= 0 and (idx // 2) % 2 == 0:
                    load.on.set()
                else:
                    load.on.clear()
                    while load.writing:
                        time.sleep(0.005)
                end.append(time.perf_counter())
                return False

        train(config.replace(steps=steps, device="cpu"), inputs, Shim(None), progress=False)
        load.on.clear()
        load.close()
    on, off = [], []
    for k in range(warm + 1, len(begin)):
        a, b = end[k - 1], begin[k]
        f = load.busy_fraction(a, b)
        if f >= 0.95:
            on.append(b - a)
        elif f == 0.0:
            off.append(b - a)
    chunk_mb = chunk.nbytes / 2**20
    write_s = median([e - s for s, e in load.busy])
    slow = median(on) / median(off) if on and off else float("nan")
    res = {
        "codec": codec,
        "label": codec_label(codec),
        "steps_with_load": len(on),
        "steps_idle": len(off),
        "median_step_idle_s": r(median(off), 4) if off else None,
        "median_step_loaded_s": r(median(on), 4) if on else None,
        "slowdown_at_100pct_writer_duty": r(slow, 4),
        "chunk_write_s_while_training": r(write_s, 3),
        "chunk_write_MBps_while_training": r(chunk_mb / write_s, 1),
        "writer_s_per_recorded_step": r(write_s / chunk.shape[0], 4),
    }
    log(f"  contention {codec}: idle {res['median_step_idle_s']} s (n={len(off)}), loaded "
        f"{res['median_step_loaded_s']} s (n={len(on)}) -> x{res['slowdown_at_100pct_writer_duty']}; "
        f"chunk write {res['chunk_write_s_while_training']} s = "
        f"{res['writer_s_per_recorded_step'] * 1000:.1f} ms per recorded step")
    return res


def steady_state_estimate(step_s: float, c: dict) -> float:
    """Overhead fraction: the writer is busy w s per step and, while busy, costs (1 - 1/slowdown) of it."""
    w = c["writer_s_per_recorded_step"]
    slow = c["slowdown_at_100pct_writer_duty"]
    return w * max(0.0, 1 - 1 / slow) / step_s


def real_chunk(run: Path, T: int, log) -> np.ndarray:
    """T consecutive real steps of W (from the recorded run) for the contention load."""
    try:
        import crucible_record as cr

        t = cr.open(run)
        if t.steps + 1 >= 2 * T:
            return np.ascontiguousarray(t.W.numpy(slice(T, 2 * T)))
        if t.steps + 1 >= T:
            return np.ascontiguousarray(t.W.numpy(slice(0, T)))
    except Exception as e:  # no run: a synthetic walk of the same shape
        log(f"  no recorded run at {run} ({e}); using a synthetic chunk")
    rng = np.random.default_rng(0)
    import torch

    w0 = torch.from_numpy(rng.standard_normal((10000, 64), dtype=np.float32) * 0.02).to(torch.bfloat16)
    bits = w0.view(torch.int16).numpy().astype(np.int32)
    steps = [bits + np.cumsum(rng.integers(-1, 2, size=(T, 1, 1)), axis=0)[i] * (rng.random(bits.shape) < 0.25)
             for i in range(T)]
    return np.stack(steps).astype(np.uint16)


# ----- end to end: whole runs, each in a fresh process -------------------------------------------
def e2e_child(spec: dict) -> dict:
    """One whole run in this (fresh) process: wall and CPU seconds from loading the inputs to close."""
    import resource

    from crucible_record.codecs import Layout
    from crucible_record.crucible3 import engine, run
    from crucible_record.crucible3.config import RunConfig

    cfg = RunConfig.from_dict(spec["config"])
    variant = spec["variant"]
    loading = []

    def load_inputs(config):  # timed: tokenizing the corpus is the same fixed cost in every variant
        t = time.perf_counter()
        try:
            return engine.load_inputs(config)
        finally:
            loading.append(time.perf_counter() - t)

    run.load_inputs = load_inputs
    with scratch_dir("e2e") as d:
        t0, c0 = time.perf_counter(), time.process_time()
        if variant.startswith("recorded"):
            summary = run.start_run(cfg, d / "run", layout=Layout(time_chunk=spec["time_chunk"]),
                                    checkpoints=variant != "recorded_no_checkpoints", progress=False)
            on_disk = summary.bytes_on_disk
        else:
            engine.train(cfg, load_inputs(cfg), None, progress=False)
            on_disk = 0
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "load_inputs_s": sum(loading),
            "after_inputs_wall_s": wall - sum(loading), "bytes_on_disk": on_disk,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def end_to_end(cfg, variants: list[str], time_chunk: int, rounds: int, log) -> dict:
    """Interleaved rounds (order rotated each round) of whole runs, each variant in a fresh process."""
    import json

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for v in order:
            spec = {"variant": v, "config": cfg.to_dict(), "time_chunk": time_chunk}
            out = run_child([sys.executable, __file__, "--e2e-child", json.dumps(spec)], timeout=1800)
            line = [x for x in out["output_tail"].splitlines() if x.startswith("RESULT ")]
            if out["rc"] != 0 or not line:
                raise RuntimeError(f"end-to-end run {v} failed:\n{out['output_tail'][-800:]}")
            res = json.loads(line[-1][7:])
            runs[v].append(res)
            log(f"  e2e round {rnd + 1} {v:24s} {res['wall_s']:.2f} s wall, {res['cpu_s']:.2f} s CPU")
    base = runs["none"]
    summary = {}
    for v in variants:
        walls, cpus = [x["wall_s"] for x in runs[v]], [x["cpu_s"] for x in runs[v]]
        after = [x["after_inputs_wall_s"] for x in runs[v]]
        paired = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[v], base)]
        summary[v] = {"median_wall_s": r(median(walls), 3), "min_wall_s": r(min(walls), 3),
                      "max_wall_s": r(max(walls), 3), "median_cpu_s": r(median(cpus), 3),
                      "median_load_inputs_s": r(median([x["load_inputs_s"] for x in runs[v]]), 3),
                      "ratio_median_wall": r(median(walls) / median([x["wall_s"] for x in base]), 4),
                      "ratio_paired_rounds": [r(x, 4) for x in paired],
                      "ratio_median_wall_after_inputs": r(median(after) / median([x["after_inputs_wall_s"] for x in base]), 4),
                      "ratio_median_cpu": r(median(cpus) / median([x["cpu_s"] for x in base]), 4)}
    return {"config": {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "steps": cfg.steps,
                       "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim, "time_chunk": time_chunk,
                       "W_rows": cfg.steps + 1, "blocks": -(-(cfg.steps + 1) // time_chunk), "rounds": rounds},
            "runs": {v: [{k: r(x, 3) if isinstance(x, float) else x for k, x in run.items()} for run in rs]
                     for v, rs in runs.items()},
            "summary": summary}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--e2e-rounds", type=int, default=None, help="rounds of the end-to-end runs [full 3, quick 2]")
    p.add_argument("--e2e-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.e2e_child:
        import json

        print("RESULT " + json.dumps(e2e_child(json.loads(args.e2e_child))), flush=True)
        return
    name = "overhead" if args.device == "cpu" else "overhead_cuda"
    res = Result(name, args.quick)
    log = lambda s: print(s, flush=True)  # noqa: E731

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        for id_, tgt in (("2a", "GPU overhead, default config (recorded/unrecorded, end-to-end)"),
                         ("2b", "GPU overhead, batch 16 seq 64"),
                         ("2c", "GPU: the notebook's way (.cpu()/.item() each step) / unrecorded")):
            res.target(id_, tgt, "skipped: no CUDA", None)
        res.save()
        return

    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.engine import load_inputs

    default = RunConfig()
    small = RunConfig(batch_size=16, seq_len=64)
    inputs = {}

    def inputs_for(cfg):
        key = (cfg.batch_size, cfg.seq_len)
        if key not in inputs:
            inputs[key] = load_inputs(cfg)
        return inputs[key]

    variants = ["none", "recorder", "notebook"]
    if args.device == "cuda":
        plan = [("default", default, 10, 40 if args.quick else 150, 3),
                ("small", small, 10, 40 if args.quick else 150, 3)]
        for label, cfg, warm, measured, rounds in plan:
            log(f"{label}: batch {cfg.batch_size}, seq {cfg.seq_len}, {rounds} rounds of {variants}")
            res.details[label] = compare(cfg, inputs_for(cfg), variants, warm, measured, rounds, args.device, log)
    else:
        # CPU: lockstep (interleaved step by step), then the writer compressing inside every step
        plan = [("tiny", RunConfig(batch_size=8, seq_len=32), 2, 6)] if args.quick else \
               [("default", default, 1, 6), ("small", small, 2, 12)]
        # "none_again" is a second unrecorded copy: an A/A control of the method's own bias and noise
        for label, cfg, warm, measured in plan:
            vs = variants + ["none_again"]
            log(f"{label}: batch {cfg.batch_size}, seq {cfg.seq_len}, lockstep of {vs}, {measured} measured steps")
            res.details[label] = lockstep_compare(cfg, inputs_for(cfg), vs, warm, measured, log)

    if args.device == "cuda":
        key = "ratio_end_to_end"
        s = res.details["default"]["summary"]
        res.target("2a", "GPU overhead, default config (recorded/unrecorded, end-to-end) <= 1.02",
                   s["recorder"][key], s["recorder"][key] <= 1.02, unit="x")
        s2 = res.details["small"]["summary"]
        res.target("2b", "GPU overhead, batch 16 seq 64 <= 1.05", s2["recorder"][key], s2["recorder"][key] <= 1.05, unit="x")
        res.target("2c", "GPU: the notebook's way / unrecorded, default config (info)",
                   s["notebook"][key], None, note=f"batch 16 seq 64: {s2['notebook'][key]}x", unit="x")
        res.save()
        return

    # ----- CPU: contention of the writer's compression with training --------------------------
    c_label, c_cfg = ("tiny", plan[0][1]) if args.quick else ("small", small)
    chunk = real_chunk(args.run, src_layout().time_chunk, log)
    presets = ["default"] if args.quick else [p for p in ("default", "fast") if p in SRC_PRESETS]
    if not args.quick:
        presets.append("T+blosc-zstd3-bitshuffle")  # the first default, for comparison
    blocks = 3 if args.quick else 4
    cont = [contention(c_cfg, inputs_for(c_cfg), codec, blocks, chunk, log) for codec in presets]
    res.details["contention"] = {"config": c_label, "chunk_shape": list(chunk.shape), "presets": cont}
    est = {}
    for label in res.details:
        if label == "contention" or label.endswith("time_chunk_1"):
            continue
        summ = res.details[label]["summary"]
        step_s = summ["none"]["median_step_s"]
        record_s = summ["recorder"]["record_call_ms_median"] / 1000
        est[label] = {c["codec"]: r(1 + record_s / step_s + steady_state_estimate(step_s, c), 4) for c in cont}
    res.details["steady_state_estimate"] = est

    if args.quick:
        s = res.details["tiny"]["summary"]
        res.target("1a", "CPU overhead, default config (batch 128, seq 128) <= 1.02", "not run in --quick", None)
        res.target("1q", "CPU overhead, tiny config batch 8 seq 32 (quick only, info; lockstep ratio of medians)",
                   s["recorder"]["ratio_median_step"], None, unit="x",
                   note=f"notebook's way {s['notebook']['ratio_median_step']}x; A/A control {s['none_again']['ratio_median_step']}x")
    else:
        s = res.details["default"]["summary"]
        s2 = res.details["small"]["summary"]
        noise = s["none"]["noise_max_over_min_step"]
        key = "ratio_median_step"
        res.target("1a", "CPU overhead, default config (batch 128, seq 128): recorded/unrecorded step <= 1.02 "
                   "(lockstep, ratio of median steps)",
                   s["recorder"][key], s["recorder"][key] <= 1.02, unit="x",
                   note=f"A/A control (a 2nd unrecorded copy in the same lockstep): {s['none_again'][key]}x; "
                        f"per-step paired ratios {s['recorder']['paired_ratios']} (median "
                        f"{s['recorder']['ratio_paired_rounds_median']}x); single unrecorded steps vary {noise}x; "
                        f"record() {s['recorder']['record_call_ms_median']} ms")
        res.target("1e", "CPU overhead, default config, steady state from measured parts <= 1.02 "
                   "(record() + the writer's compression competing for the cores)",
                   est["default"]["default"], est["default"]["default"] <= 1.02, unit="x",
                   note=f"1 + (record() + writer s/step x (1 - 1/slowdown)) / step; per preset: {est['default']}")
        res.target("1b", "CPU overhead, batch 16 seq 64 <= 1.05 (lockstep, ratio of median steps)",
                   s2["recorder"][key], s2["recorder"][key] <= 1.05, unit="x",
                   note=f"A/A control {s2['none_again'][key]}x; notebook's way {s2['notebook'][key]}x; per-step paired "
                        f"ratios median {s2['recorder']['ratio_paired_rounds_median']}x; unrecorded "
                        f"steps max/min {s2['none']['noise_max_over_min_step']}x; record() "
                        f"{s2['recorder']['record_call_ms_median']} ms")
        res.target("1f", "CPU overhead, batch 16 seq 64, steady state from measured parts <= 1.05",
                   est["small"]["default"], est["small"]["default"] <= 1.05, unit="x", note=f"per preset: {est['small']}")
        res.target("1c", "CPU: the notebook's way / unrecorded (info, same lockstep)", s["notebook"][key], None,
                   unit="x", note=f"batch 16 seq 64: {s2['notebook'][key]}x")
    # ----- CPU: whole recorded runs spanning >= 2 blocks vs unrecorded ---------------------------
    if args.quick:
        e2e_cfg, e2e_tc, e2e_label = RunConfig(batch_size=8, seq_len=32, steps=17), 8, "tiny"
    else:
        e2e_cfg, e2e_tc, e2e_label = small.replace(steps=2 * 64 + 1), 64, "small"
    e2e_cfg = e2e_cfg.replace(device="cpu")
    log(f"end to end: {e2e_label} config, {e2e_cfg.steps} steps, time chunk {e2e_tc}")
    e2e = end_to_end(e2e_cfg, ["none", "recorded", "none_again"], e2e_tc, args.e2e_rounds or (2 if args.quick else 3), log)
    res.details["end_to_end"] = e2e
    es = e2e["summary"]
    c = e2e["config"]
    res.target("1g", f"CPU end to end, a whole recorded run ({e2e_label} config: batch {c['batch_size']}, seq "
               f"{c['seq_len']}, {c['steps']} steps = {c['blocks']} blocks of {e2e_tc}) / unrecorded (info)",
               es["recorded"]["ratio_median_wall"], None, unit="x",
               note=f"`crucible-record train`'s way (start_run: checkpoints, fsync) vs load_inputs + engine.train; "
                    f"medians of {c['rounds']} interleaved rounds, fresh process each: {es['recorded']['median_wall_s']} s "
                    f"(range {es['recorded']['min_wall_s']}-{es['recorded']['max_wall_s']}) vs "
                    f"{es['none']['median_wall_s']} s (range {es['none']['min_wall_s']}-{es['none']['max_wall_s']}); "
                    f"paired per-round ratios {es['recorded']['ratio_paired_rounds']}; without loading the inputs "
                    f"(tokenizing, {es['none']['median_load_inputs_s']} s) {es['recorded']['ratio_median_wall_after_inputs']}x; "
                    f"CPU seconds ratio "
                    f"{es['recorded']['ratio_median_cpu']}x; A/A control (2nd unrecorded) {es['none_again']['ratio_median_wall']}x")

    d = cont[0]
    res.target("1d", "writer compression running on the other core slows a training step by (at 100% writer duty, "
               f"{c_label} config)", d["slowdown_at_100pct_writer_duty"], None, unit="x",
               note="; ".join(f"{c['label']}: x{c['slowdown_at_100pct_writer_duty']}, "
                              f"{c['writer_s_per_recorded_step'] * 1000:.1f} ms writer time per step" for c in cont))
    res.save()


if __name__ == "__main__":
    main()
