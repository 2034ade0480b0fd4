"""Targets 1 and 2: what recording costs a training step.

Same engine (crucible_record.engine.train), interleaved runs, medians:
  none      engine.train with no recording (a timing shim that only stamps the clock)
  recorder  the real crucible_record.recorder.Recorder into a real store (default layout)
  notebook  the notebook's way: preallocated in-RAM history, .cpu() and .item() every step
            (benchmarks/notebook_history.py)
On the CPU a step's time is the gap between two record() calls (so it includes the previous
record() call); the first `warm` steps of each run are dropped. The end-to-end figure also counts
recorder.close() (the flush of the last, partial chunk) against the measured steps.

With the default layout the writer compresses a 32-step chunk once every 32 steps, which a short
run never reaches; two extra measurements cover it on the small config:
  recorder_t1  the real Recorder with time_chunk=1: the writer compresses inside every step
  contention   training while a thread writes default-layout chunks non-stop (100 % duty),
               alternated with idle steps, per codec preset; with the measured seconds the writer
               needs per recorded step this gives the steady-state cost of each preset.
--device cuda runs the same comparison on the GPU (end-to-end, synchronised), or records
"skipped: no CUDA".
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, make_store, median, parser, r, scratch_dir  # noqa: E402
from notebook_history import NotebookHistory  # noqa: E402

warnings.filterwarnings("ignore", message="enable_nested_tensor")


class Timed:
    """Recorder-shaped shim: stamps the clock at each record(), then forwards (or not)."""

    def __init__(self, inner=None, on_record=None):
        self.inner = inner
        self.stamps: list[float] = []
        self.record_s: list[float] = []
        self.on_record = on_record
        self._loss = float("nan")

    @property
    def latest_loss(self) -> float:
        return self.inner.latest_loss if self.inner is not None else self._loss

    def record(self, step, W, h_mean=None, loss=None, *, epoch=None) -> None:
        t = time.perf_counter()
        self.stamps.append(t)
        if self.on_record is not None:
            self.on_record(step)
        if self.inner is not None:
            self.inner.record(step, W, h_mean=h_mean, loss=loss, epoch=epoch)
        self.record_s.append(time.perf_counter() - t)

    def checkpoint(self, step, save) -> None:
        if self.inner is not None:
            self.inner.checkpoint(step, save)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def one_run(config, inputs, variant: str, warm: int, measured: int, device: str) -> dict:
    import torch

    from crucible_record.engine import train
    from crucible_record.recorder import Recorder

    steps = warm + measured
    cfg = config.replace(steps=steps, device=device)
    with scratch_dir("overhead") as d:
        if variant == "none":
            inner = None
        elif variant.startswith("recorder"):
            time_chunk = 1 if variant == "recorder_t1" else 32
            group = make_store(d, steps=steps, vocab=cfg.vocab_size, hidden=cfg.hidden_dim,
                               time_chunk=time_chunk, dead_mask=inputs.masks.dead_mask.numpy())
            inner = Recorder(group, device=device)
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


# ----- writer contention -----------------------------------------------------------------------
class ChunkWriterLoad:
    """A thread that writes whole default-layout W chunks through zarr, non-stop while `on`."""

    def __init__(self, folder: Path, chunk: np.ndarray, codec: str):
        T, V, H = chunk.shape
        self.group = make_store(folder, steps=4 * T - 1, vocab=V, hidden=H, time_chunk=T, codec=codec)
        self.array = self.group["W"]
        self.chunk = chunk
        self.on = threading.Event()
        self.stop = False
        self.busy: list[tuple[float, float]] = []  # (start, end) of each chunk write
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        T = self.chunk.shape[0]
        i = 0
        while not self.stop:
            if not self.on.wait(0.05) or self.stop:
                continue
            t = time.perf_counter()
            start = (i % 4) * T
            self.array[start:start + T] = self.chunk
            self.busy.append((t, time.perf_counter()))
            i += 1

    def busy_fraction(self, a: float, b: float) -> float:
        overlap = sum(max(0.0, min(b, e) - max(a, s)) for s, e in self.busy)
        return overlap / (b - a)

    def close(self) -> None:
        self.stop = True
        self.on.set()
        self.thread.join()


def contention(config, inputs, codec: str, blocks: int, chunk: np.ndarray, log) -> dict:
    """Alternate blocks of 2 steps with the load on / off; a step counts as loaded when the
    writer was busy >= 95 % of it and as idle when the writer was idle all of it."""
    from crucible_record.engine import train

    warm = 2
    steps = warm + 2 * 2 * blocks
    with scratch_dir("contention") as d:
        load = ChunkWriterLoad(d, chunk, codec)

        def toggle(step):  # step `step` has just finished; choose the load for step + 1
            idx = step + 1 - warm - 1
            (load.on.set if idx >= 0 and (idx // 2) % 2 == 0 else load.on.clear)()

        timed = Timed(None, on_record=toggle)
        try:
            train(config.replace(steps=steps, device="cpu"), inputs, timed, progress=False)
        finally:
            load.on.clear()
            load.close()
    stamps = timed.stamps
    on, off = [], []
    for k in range(warm + 1, len(stamps)):
        a, b = stamps[k - 1], stamps[k]
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
    """32 consecutive real steps of W (from the recorded run) for the contention load."""
    try:
        import crucible_record as cr

        t = cr.open(run)
        if t.steps + 1 >= 2 * T:
            return np.ascontiguousarray(t.W.numpy_bits(slice(T, 2 * T)))
        if t.steps + 1 >= T:
            return np.ascontiguousarray(t.W.numpy_bits(slice(0, T)))
    except Exception as e:  # no run: a synthetic walk of the same shape
        log(f"  no recorded run at {run} ({e}); using a synthetic chunk")
    rng = np.random.default_rng(0)
    import torch

    w0 = torch.from_numpy(rng.standard_normal((10000, 64), dtype=np.float32) * 0.02).to(torch.bfloat16)
    bits = w0.view(torch.int16).numpy().astype(np.int32)
    steps = [bits + np.cumsum(rng.integers(-1, 2, size=(T, 1, 1)), axis=0)[i] * (rng.random(bits.shape) < 0.25)
             for i in range(T)]
    return np.stack(steps).astype(np.uint16)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
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

    from crucible_record.config import RunConfig
    from crucible_record.engine import load_inputs

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
    elif args.quick:
        plan = [("tiny", RunConfig(batch_size=8, seq_len=32), 2, 6, 2)]
    else:
        plan = [("default", default, 1, 2, 3), ("small", small, 2, 8, 3)]

    for label, cfg, warm, measured, rounds in plan:
        vs = variants + (["recorder_t1"] if label != "default" and args.device == "cpu" else [])
        log(f"{label}: batch {cfg.batch_size}, seq {cfg.seq_len}, {rounds} rounds of {vs}")
        res.details[label] = compare(cfg, inputs_for(cfg), vs, warm, measured, rounds, args.device, log)

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
    chunk = real_chunk(args.run, 32, log)
    presets = ["default"] if args.quick else ["default", "max", "T+blosc-lz4-bitshuffle"]
    blocks = 3 if args.quick else 4
    cont = [contention(c_cfg, inputs_for(c_cfg), codec, blocks, chunk, log) for codec in presets]
    res.details["contention"] = {"config": c_label, "chunk_shape": list(chunk.shape), "presets": cont}
    est = {}
    for label in res.details:
        if label == "contention":
            continue
        step_s = res.details[label]["summary"]["none"]["median_step_s"]
        est[label] = {c["codec"]: r(1 + steady_state_estimate(step_s, c), 4) for c in cont}
    res.details["steady_state_estimate"] = est

    if args.quick:
        s = res.details["tiny"]["summary"]
        res.target("1a", "CPU overhead, default config (batch 128, seq 128) <= 1.02", "not run in --quick", None)
        res.target("1q", "CPU overhead, tiny config batch 8 seq 32 (quick only, info)", s["recorder"]["ratio_median_step"],
                   None, unit="x", note=f"notebook's way {s['notebook']['ratio_median_step']}x")
    else:
        s = res.details["default"]["summary"]
        s2 = res.details["small"]["summary"]
        noise = s["none"]["noise_max_over_min_round_median"]
        res.target("1a", "CPU overhead, default config (batch 128, seq 128): recorded/unrecorded step <= 1.02",
                   s["recorder"]["ratio_median_step"], s["recorder"]["ratio_median_step"] <= 1.02, unit="x",
                   note=f"end-to-end incl. close {s['recorder']['ratio_end_to_end']}x; "
                        f"steady state with the writer's compression (estimated) {est['default']['default']}x; "
                        f"noise between unrecorded rounds {noise}x")
        res.target("1b", "CPU overhead, batch 16 seq 64 <= 1.05", s2["recorder"]["ratio_median_step"],
                   s2["recorder"]["ratio_median_step"] <= 1.05, unit="x",
                   note=f"writer compressing inside every step (time_chunk 1) {s2['recorder_t1']['ratio_median_step']}x; "
                        f"steady state estimated {est['small']['default']}x")
        res.target("1c", "CPU: the notebook's way / unrecorded (info)", s["notebook"]["ratio_median_step"], None,
                   unit="x", note=f"batch 16 seq 64: {s2['notebook']['ratio_median_step']}x")
    d = cont[0]
    res.target("1d", "writer compression running on the other core slows a training step by (at 100% writer duty, "
               f"{c_label} config)", d["slowdown_at_100pct_writer_duty"], None, unit="x",
               note="; ".join(f"{c['codec']}: x{c['slowdown_at_100pct_writer_duty']}, "
                              f"{c['writer_s_per_recorded_step'] * 1000:.1f} ms writer time per step" for c in cont))
    res.save()


if __name__ == "__main__":
    main()
