"""Goal 3 of issue 12 (and 2 on a GPU): what recording costs a training run, end to end.

Headline (CPU): whole runs, each in a fresh process, interleaved round by round (order rotated),
medians of 5 rounds, every run spanning >= 2 whole blocks of W so the writer's compression lands
inside the measurement:
  none                     load_inputs + engine.train, unrecorded
  recorded_no_checkpoints  start_run as `crucible-record train` runs it (fsync, default writer
                           threads), without model checkpoints (they are not the recorder's cost)
  none_again               a second unrecorded variant: the A/A control of the method's noise
at batch 16 x seq 128 (12 steps, blocks of 4; goal <= 1.03x) and the default config (batch 128
x seq 128; 2 steps, blocks of 1 step: ~30 s a step on a 2-core machine without AVX-512; goal
<= 1.01x). Short blocks are the writer's worst case: the same bytes a step in more, smaller writes. The ratio is of median wall seconds after the
inputs are loaded (tokenizing is the same fixed cost in every variant); the whole-wall and
CPU-second ratios are reported beside it.
--details adds the older measurements: the variants (and the notebook's way,
benchmarks/notebook_history.py) in lockstep, one step each in turn; and the writer's compression
running non-stop beside training (contention), per codec preset.
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
        from crucible_record.format import blocks as fmt

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
        from crucible_record.crucible3 import open_trajectory

        t = open_trajectory(run)
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
    loop = []  # the training loop alone (its steps, record() calls and the writer beside them)

    def timed_train(*a, **kw):
        t = time.perf_counter()
        try:
            return engine.train(*a, **kw)
        finally:
            loop.append(time.perf_counter() - t)

    run.train = timed_train
    with scratch_dir("e2e") as d:
        t0, c0 = time.perf_counter(), time.process_time()
        if variant.startswith("recorded"):
            summary = run.start_run(cfg, d / "run", layout=Layout(time_chunk=spec["time_chunk"]),
                                    checkpoints=variant != "recorded_no_checkpoints", progress=False)
            on_disk = summary.bytes_on_disk
        else:
            timed_train(cfg, load_inputs(cfg), None, progress=False)
            on_disk = 0
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "load_inputs_s": sum(loading), "loop_s": sum(loop),
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
                      "ratio_median_cpu": r(median(cpus) / median([x["cpu_s"] for x in base]), 4),
                      "median_loop_s": r(median([x["loop_s"] for x in runs[v]]), 3),
                      "ratio_median_loop": r(median([x["loop_s"] for x in runs[v]]) /
                                             median([x["loop_s"] for x in base]), 4)}
    return {"config": {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "steps": cfg.steps,
                       "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim, "time_chunk": time_chunk,
                       "W_rows": cfg.steps + 1, "blocks": -(-(cfg.steps + 1) // time_chunk), "rounds": rounds},
            "runs": {v: [{k: r(x, 3) if isinstance(x, float) else x for k, x in run.items()} for run in rs]
                     for v, rs in runs.items()},
            "summary": summary}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--e2e-rounds", type=int, default=None, help="rounds of the end-to-end runs [full 5, quick 2]")
    p.add_argument("--details", action="store_true",
                   help="also the step-by-step lockstep comparison and the writer-contention measurement")
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
                         ("2b", "GPU overhead, batch 16 seq 128"),
                         ("2c", "GPU: the notebook's way (.cpu()/.item() each step) / unrecorded")):
            res.target(id_, tgt, "skipped: no CUDA", None)
        res.save()
        return

    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.engine import load_inputs

    default = RunConfig()
    small = RunConfig(batch_size=16, seq_len=128)
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
    elif args.details:
        # CPU, --details: lockstep (interleaved step by step), then the writer compressing inside every step
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
        res.target("2a", "GPU overhead, default config (recorded/unrecorded step time, end to end) <= 1.05",
                   s["recorder"][key], s["recorder"][key] <= 1.05, unit="x")
        s2 = res.details["small"]["summary"]
        res.target("2b", "GPU overhead, batch 16 seq 128 <= 1.05", s2["recorder"][key], s2["recorder"][key] <= 1.05,
                   unit="x")
        res.target("2c", "GPU: the notebook's way / unrecorded, default config (info)",
                   s["notebook"][key], None, note=f"batch 16 seq 128: {s2['notebook'][key]}x", unit="x")
        res.save()
        return

    # ----- CPU headline: whole recorded runs spanning >= 2 blocks vs unrecorded, end to end -------
    rounds = args.e2e_rounds or (2 if args.quick else 5)
    if args.quick:
        plan = [("tiny", RunConfig(batch_size=8, seq_len=32, steps=16), 8, "1q", None)]
    else:  # (label, config, time chunk, target id, goal); 2+ whole blocks of W in every run
        # sized for this 2-core machine without AVX-512 (a default-config step takes ~30 s here)
        plan = [("small", small.replace(steps=12), 4, "1b", 1.03), ("default", default.replace(steps=2), 1, "1a", 1.01)]
    for label, cfg, time_chunk, target_id, goal in plan:
        cfg = cfg.replace(device="cpu")
        log(f"end to end: {label} config, {cfg.steps} steps, time chunk {time_chunk}, {rounds} rounds")
        e2e = end_to_end(cfg, ["none", "recorded_no_checkpoints", "none_again"], time_chunk, rounds, log)
        res.details[f"end_to_end_{label}"] = e2e
        es, c = e2e["summary"], e2e["config"]
        rec, aa = es["recorded_no_checkpoints"], es["none_again"]
        measured = rec["ratio_median_wall_after_inputs"]
        res.target(target_id, f"CPU overhead of recording, end to end ({label} config: batch {c['batch_size']}, seq "
                   f"{c['seq_len']}; {c['steps']} steps = {c['blocks']} blocks of {time_chunk}) <= {goal}x"
                   if goal else f"CPU overhead of recording, end to end ({label} config, quick: info)",
                   measured, None if goal is None else measured <= goal, unit="x",
                   note=f"median wall seconds after loading the inputs, recorded (start_run as `crucible-record "
                        f"train`, fsync, no checkpoints) / unrecorded (engine.train), {c['rounds']} interleaved rounds, "
                        f"a fresh process each: paired per-round ratios {rec['ratio_paired_rounds']}; A/A control "
                        f"(a 2nd unrecorded variant) {aa['ratio_median_wall_after_inputs']}x; whole wall incl. "
                        f"inputs {rec['ratio_median_wall']}x; the training loop alone (steps + record(), without "
                        f"creating the run and the final commit) {rec['ratio_median_loop']}x (A/A "
                        f"{aa['ratio_median_loop']}x); CPU seconds {rec['ratio_median_cpu']}x; unrecorded "
                        f"{es['none']['min_wall_s']}-{es['none']['max_wall_s']} s")

    if args.details and not args.quick:
        c_label, c_cfg = "small", small
        chunk = real_chunk(args.run, src_layout().time_chunk, log)
        presets = [p for p in ("default", "fast") if p in SRC_PRESETS]
        cont = [contention(c_cfg, inputs_for(c_cfg), codec, 4, chunk, log) for codec in presets]
        res.details["contention"] = {"config": c_label, "chunk_shape": list(chunk.shape), "presets": cont}
        d = cont[0]
        res.target("1d", "writer compression running on the other core slows a training step by (at 100% writer "
                   f"duty, {c_label} config; info)", d["slowdown_at_100pct_writer_duty"], None, unit="x",
                   note="; ".join(f"{c['label']}: x{c['slowdown_at_100pct_writer_duty']}, "
                                  f"{c['writer_s_per_recorded_step'] * 1000:.1f} ms writer time per step" for c in cont))
    res.save()


if __name__ == "__main__":
    main()
