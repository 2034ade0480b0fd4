"""Durable and safe: what fsync durability and time-bounded commits cost the writer.

One recording, as the recorder writes a Crucible-size run: W (10000, 64) bf16 with ~25 % of its
entries moving one bf16 ulp a step (4 fixed masks, cycled), plus h_mean (64,) f32, loss () f32 and
epoch () int64; 257 steps (quick: 129) = 4 (2) whole blocks of time_chunk 64 and one more row;
default codec. Variants (only the recorder's settings differ):

  fsync/blocks      durability="fsync", commit_interval 1e9 s: a commit only when a block fills
                    (and at the last step)
  fsync/blocks A/A  the same again: the A/A control (its ratio to fsync/blocks is the noise floor)
  none/blocks       durability="none"
  fsync/every8      durability="fsync", commit_interval 0.25 s: a commit point every 8 steps, so
                    each block's partial rows are encoded and rewritten 7 times before it fills
  none/every8       durability="none", the same commits

The producer is the same in every variant: it records steps as fast as record() accepts them
(9 staging slots, so the 7 steps after a commit point never wait for the writer and arrive within
the short commit_interval), except before every 8th step, where it waits until the writer is idle
(every row placed, no commit running); in the every8 variants it then sleeps 0.3 s (longer than
their commit_interval, so that step is a commit point; the writer is idle meanwhile, so the sleep
is left out of the others). On a loaded machine a slow step can still make an extra commit point:
the commits actually made are counted and reported. Measured per run:

  writer s/step   seconds the writer thread spent placing rows, writing blocks and committing
                  (Recorder._place and Recorder._commit wrapped; both run on the writer thread;
                  zarr's encoding runs inside them), divided by the steps recorded
  CPU s/step      process CPU seconds (every thread: producer, writer, zarr's) per step
  fsync calls     os.fsync wrapped: calls (and seconds) inside each commit, and at creation
  commits         commit points the writer performed (block fills + time-based + the last step)

Interleaved: each repeat runs every variant once in this process, the order rotated; medians with
min-max; ratios are paired per repeat, then their median and range.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, median, parser, r, scratch_dir  # noqa: E402

VOCAB, HIDDEN, TIME_CHUNK = 10000, 64, 64
EVERY = 8  # steps between the producer's pauses (= commit points of the every8 variants)
PAUSE_S = 0.3
SHORT_INTERVAL_S = 0.25
VARIANTS = {  # name -> (durability, commit_interval)
    "fsync/blocks": ("fsync", 1e9),
    "fsync/blocks A/A": ("fsync", 1e9),
    "none/blocks": ("none", 1e9),
    "fsync/every8": ("fsync", SHORT_INTERVAL_S),
    "none/every8": ("none", SHORT_INTERVAL_S),
}


class Probe:
    """Wraps the writer's work and os.fsync, this process only (installed once)."""

    def __init__(self):
        from crucible_record.recorder import Recorder

        for name in ("_place", "_commit"):
            if not hasattr(Recorder, name):
                raise SystemExit(f"crucible_record.recorder.Recorder has no {name}() any more: update this benchmark's Probe")
        self.local = threading.local()
        self.reset()
        place, commit, fsync = Recorder._place, Recorder._commit, os.fsync
        probe = self

        def timed_place(rec, slot):
            t = time.perf_counter()
            try:
                return place(rec, slot)
            finally:
                probe.busy_s += time.perf_counter() - t
                probe.placed += 1

        def timed_commit(rec, steps):
            t = time.perf_counter()
            probe.committing = True
            probe.local.in_commit = True
            before = probe.fsync_commit
            try:
                return commit(rec, steps)
            finally:
                probe.local.in_commit = False
                probe.committing = False
                probe.busy_s += time.perf_counter() - t
                probe.commit_s.append(time.perf_counter() - t)
                probe.fsync_per_commit.append(probe.fsync_commit - before)
                probe.commits_at.append(steps)

        def counted_fsync(fd):
            t = time.perf_counter()
            try:
                return fsync(fd)
            finally:
                if getattr(probe.local, "in_commit", False):
                    probe.fsync_commit += 1
                    probe.fsync_commit_s += time.perf_counter() - t
                else:
                    probe.fsync_other += 1

        Recorder._place, Recorder._commit, os.fsync = timed_place, timed_commit, counted_fsync

    def reset(self) -> None:
        self.busy_s = self.fsync_commit_s = 0.0
        self.placed = self.fsync_commit = self.fsync_other = 0
        self.committing = False
        self.commit_s: list[float] = []
        self.fsync_per_commit: list[int] = []
        self.commits_at: list[int] = []

    def wait_idle(self, recorded: int) -> None:
        while self.placed < recorded or self.committing:
            time.sleep(0.001)


def make_steps(seed: int = 0):
    """W0 (bf16) and 4 masks of +-1 ulp moves on ~25 % of the entries."""
    import torch

    rng = np.random.default_rng(seed)
    W = (torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    direction = np.where(rng.random((VOCAB, HIDDEN)) < 0.5, 1, -1).astype(np.int16)
    moves = [torch.from_numpy(direction * (rng.random((VOCAB, HIDDEN)) < 0.25)) for _ in range(4)]
    return W, moves


def one_run(folder: Path, variant: str, steps: int, probe: Probe) -> dict:
    import torch

    import crucible_record as cr

    durability, interval = VARIANTS[variant]
    W0, moves = make_steps()
    W = W0.clone()
    bits = W.view(torch.int16)
    fields = {"W": cr.Field((VOCAB, HIDDEN), torch.bfloat16), "h_mean": cr.Field((HIDDEN,), torch.float32),
              "loss": cr.Field((), torch.float32), "epoch": cr.Field((), torch.int64)}
    rng = np.random.default_rng(1)
    h_means = torch.from_numpy(rng.standard_normal((EVERY, HIDDEN), dtype=np.float32))
    probe.reset()
    t_create = time.perf_counter()
    rec = cr.record(folder / "run", fields, steps=steps, layout=cr.Layout(time_chunk=TIME_CHUNK),
                    commit_interval=interval, durability=durability, slots=EVERY + 1)
    create_s = time.perf_counter() - t_create
    fsync_at_creation = probe.fsync_other
    paused = 0.0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        if step % EVERY == EVERY - 1:
            t = time.perf_counter()
            probe.wait_idle(step)
            if interval < 1e9:
                time.sleep(PAUSE_S)
            paused += time.perf_counter() - t
        if step:
            bits.add_(moves[step % 4])
        rec.record(step, W=W, h_mean=h_means[step % EVERY], loss=torch.tensor(1.0 / (step + 1)),
                   epoch=torch.tensor(1 + step // 100))
    rec.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    on_disk = sum(p.stat().st_size for p in (folder / "run").rglob("*") if p.is_file())
    back = cr.open(folder / "run")
    exact = bool(np.array_equal(back["W"].numpy(steps - 1), W.view(torch.uint16).numpy()))
    partial = [s for s in probe.commits_at if s % TIME_CHUNK and s != steps]
    return {
        "variant": variant, "durability": durability, "commit_interval_s": interval, "steps": steps,
        "writer_s_per_step": probe.busy_s / steps, "process_cpu_s_per_step": cpu / steps,
        "writer_busy_s": probe.busy_s, "wall_s": wall, "producer_paused_s": paused,
        "commits": len(probe.commits_at), "partial_block_commits": len(partial),
        "commit_s_median": median(probe.commit_s) if probe.commit_s else None,
        "fsync_per_commit": probe.fsync_per_commit, "fsync_in_commits": probe.fsync_commit,
        "fsync_s_in_commits": probe.fsync_commit_s, "fsync_at_creation": fsync_at_creation,
        "create_s": create_s, "bytes_on_disk": on_disk, "last_step_bit_exact": exact,
    }


def spread(values: list[float], digits: int = 4) -> dict:
    return {"median": r(median(values), digits), "min": r(min(values), digits), "max": r(max(values), digits)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="rounds of every variant [full 3, quick 2]")
    p.add_argument("--steps", type=int, default=None, help="steps recorded [full 257, quick 129]")
    args = p.parse_args()
    res = Result("durability", args.quick)
    steps = args.steps or (2 * TIME_CHUNK + 1 if args.quick else 4 * TIME_CHUNK + 1)
    repeats = args.repeats or (2 if args.quick else 3)
    probe = Probe()
    names = list(VARIANTS)
    runs: dict[str, list[dict]] = {v: [] for v in names}
    with scratch_dir("durability") as d:
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for v in order:
                folder = d / f"r{rep}-{v.replace('/', '-').replace(' ', '')}"
                folder.mkdir()
                out = one_run(folder, v, steps, probe)
                runs[v].append(out)
                print(f"  repeat {rep + 1} {v:17s} writer {out['writer_s_per_step'] * 1000:7.2f} ms/step "
                      f"(process CPU {out['process_cpu_s_per_step'] * 1000:6.2f}), {out['commits']:3d} commits "
                      f"({out['partial_block_commits']} of a partial block), fsync/commit "
                      f"{median(out['fsync_per_commit']) if out['fsync_per_commit'] else 0:g}, "
                      f"{out['bytes_on_disk'] / 2**20:.1f} MB", flush=True)
    summary = {}
    for v in names:
        rs = runs[v]
        summary[v] = {
            "writer_s_per_step": spread([x["writer_s_per_step"] for x in rs], 5),
            "process_cpu_s_per_step": spread([x["process_cpu_s_per_step"] for x in rs], 5),
            "commits": spread([x["commits"] for x in rs], 1),
            "partial_block_commits": spread([x["partial_block_commits"] for x in rs], 1),
            "fsync_per_commit": spread([f for x in rs for f in x["fsync_per_commit"]] or [0], 1),
            "fsync_s_per_commit": r(median([x["fsync_s_in_commits"] / max(x["commits"], 1) for x in rs]), 5),
            "fsync_at_creation": spread([x["fsync_at_creation"] for x in rs], 1),
            "commit_s": spread([x["commit_s_median"] for x in rs if x["commit_s_median"] is not None] or [0], 4),
            "all_bit_exact": all(x["last_step_bit_exact"] for x in rs),
        }

    def paired(a: str, b: str) -> dict:
        return spread([x["writer_s_per_step"] / y["writer_s_per_step"] for x, y in zip(runs[a], runs[b])])

    ratios = {
        "fsync/none, block-only commits": paired("fsync/blocks", "none/blocks"),
        "fsync/none, commits every 8 steps": paired("fsync/every8", "none/every8"),
        "every 8 steps/block-only, fsync": paired("fsync/every8", "fsync/blocks"),
        "every 8 steps/block-only, none": paired("none/every8", "none/blocks"),
        "A/A: fsync/blocks again/fsync/blocks": paired("fsync/blocks A/A", "fsync/blocks"),
    }
    res.details["setup"] = {
        "fields": {"W": [VOCAB, HIDDEN, "bf16, ~25% of entries move 1 ulp a step"], "h_mean": [HIDDEN, "f32"],
                   "loss": "f32", "epoch": "int64"},
        "steps": steps, "time_chunk": TIME_CHUNK, "codec": "default", "repeats": repeats,
        "producer": f"flat out ({EVERY + 1} slots); before every {EVERY}th step it waits for the writer to be idle, "
                    f"then (every8 variants) sleeps {PAUSE_S} s",
        "variants": {v: {"durability": dur, "commit_interval_s": ci} for v, (dur, ci) in VARIANTS.items()},
        "writer_time": "Recorder._place + Recorder._commit on the writer thread (wall); CPU = the process's",
        "scratch": str(d.parent),
    }
    res.details["summary"] = summary
    res.details["ratios_of_writer_s_per_step"] = ratios
    res.details["runs"] = {v: [{k: (r(x, 5) if isinstance(x, float) else x) for k, x in run.items()} for run in rs]
                           for v, rs in runs.items()}
    s = summary
    ms = lambda v: f"{s[v]['writer_s_per_step']['median'] * 1000:.2f} ms"  # noqa: E731
    res.target("8a", "fsync durability: writer time per step, fsync / none (block-only commits, info)",
               ratios["fsync/none, block-only commits"]["median"], None, unit="x",
               note=f"{ms('fsync/blocks')} vs {ms('none/blocks')} a step; paired range "
                    f"{ratios['fsync/none, block-only commits']['min']}-{ratios['fsync/none, block-only commits']['max']}; "
                    f"A/A control {ratios['A/A: fsync/blocks again/fsync/blocks']['median']}x "
                    f"(range {ratios['A/A: fsync/blocks again/fsync/blocks']['min']}-"
                    f"{ratios['A/A: fsync/blocks again/fsync/blocks']['max']}); process CPU per step "
                    f"{s['fsync/blocks']['process_cpu_s_per_step']['median'] * 1000:.2f} vs "
                    f"{s['none/blocks']['process_cpu_s_per_step']['median'] * 1000:.2f} ms; {repeats} interleaved repeats, "
                    f"{steps} steps")
    res.target("8b", f"time-bounded commits every {EVERY} steps (partial blocks rewritten) / block-only commits, "
               "writer time per step, fsync (info)",
               ratios["every 8 steps/block-only, fsync"]["median"], None, unit="x",
               note=f"{ms('fsync/every8')} vs {ms('fsync/blocks')} a step; paired range "
                    f"{ratios['every 8 steps/block-only, fsync']['min']}-{ratios['every 8 steps/block-only, fsync']['max']}; "
                    f"commits {s['fsync/every8']['commits']['median']:g} vs {s['fsync/blocks']['commits']['median']:g} "
                    f"({s['fsync/every8']['partial_block_commits']['median']:g} of partial blocks); without fsync "
                    f"{ratios['every 8 steps/block-only, none']['median']}x; fsync/none with commits every {EVERY} steps "
                    f"{ratios['fsync/none, commits every 8 steps']['median']}x")
    res.target("8c", "fsync calls per commit (durability fsync, info)",
               s["fsync/every8"]["fsync_per_commit"]["median"], None,
               note=f"every-{EVERY} commits: range {s['fsync/every8']['fsync_per_commit']['min']:g}-"
                    f"{s['fsync/every8']['fsync_per_commit']['max']:g}, "
                    f"{s['fsync/every8']['fsync_s_per_commit'] * 1000:.2f} ms of fsync per commit; block-only commits: "
                    f"median {s['fsync/blocks']['fsync_per_commit']['median']:g} "
                    f"(range {s['fsync/blocks']['fsync_per_commit']['min']:g}-{s['fsync/blocks']['fsync_per_commit']['max']:g}); "
                    f"creating the run: {s['fsync/blocks']['fsync_at_creation']['median']:g}; durability none: "
                    f"{s['none/blocks']['fsync_per_commit']['max']:g}")
    exact = all(x["all_bit_exact"] for x in summary.values())
    res.target("8d", "every run reads back its last step bit-exact", exact, exact)
    res.save()


if __name__ == "__main__":
    main()
