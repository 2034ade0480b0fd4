"""`crucible-record view` on a GPT-2-size embedding field: time to the first drawn page, time per live refresh, the server's peak memory, against reading the field once with the bare codec.

The field is (vocab, hidden) bf16, a random walk in which a quarter of the entries move each step
(as late pure-bf16 AdamW training; 7 precomputed sparse moves in turn), written once before the rounds in blocks of the default layout.
Children, each a fresh process: ``bare`` decodes the field's step-last inner chunks with the preset's
own compressor (numcodecs; compressed untimed beforehand: the limit of any read); ``read`` reads it
once through cr.open, block by block; ``stats`` computes every per-step statistic (FieldStats, one
pass); ``page`` starts `crucible-record view --no-browser` and headless Chromium: seconds from
page load to every plot drawn (the first block), and to every step drawn, with the server's peak
RSS (VmHWM); ``live`` records a new run of the same width while a Follower follows it, and times
each refresh that found new committed steps (the server's work per live update).

    python benchmarks/bench_view.py [--rounds 3] [--vocab 50257] [--hidden 64] [--steps 500] [--full] [--quick]

--full: hidden 768, the GPT-2 size (38 GB raw for 500 steps: minutes to write and read on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.ROOT / "tests"))


def walk(run: str, vocab: int, hidden: int, steps: int, seed: int = 0, follow=None):
    """Record the random walk; `follow(step)` is called after each step (the live child)."""
    import torch

    import crucible_record as cr

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=g) * 0.02
    # 7 precomputed sparse moves, used in turn (a step costs an add, not fresh random numbers)
    moves = [(torch.rand(vocab, hidden, generator=g) < 0.25) * torch.randn(vocab, hidden, generator=g) * 1e-3
             for _ in range(7)]
    with cr.record(run, {"W": cr.Field((vocab, hidden), torch.bfloat16)}, steps=steps,
                   layout=cr.Layout(time_chunk=None), commit_interval=2.0) as rec:
        for step in range(steps):
            if step:
                w += moves[step % 7]
            rec.record(step, W=w.bfloat16())
            if follow:
                follow(step)


def peak_rss_mb(pid: str = "self") -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(x.split()[1]) for x in status if x.startswith("VmHWM")) / 1024


def child(kind: str, run: str, vocab: int = 0, hidden: int = 0, steps: int = 0) -> dict:
    import numpy as np

    import crucible_record as cr

    field = cr.open(run)["W"] if kind != "live" else None
    if kind == "bare":
        from crucible_record.stats import block_rows

        unit, layout = block_rows(field), cr.open(run).info.layout
        codec = harness.bare_compressor("uint16", (unit, layout.row_chunk, field.shape[2]))
        seconds = raw = 0
        for first in range(0, len(field), unit):
            chunks = harness.step_last_chunks(field.numpy(slice(first, first + unit)), layout.row_chunk)
            encoded = [codec.encode(c) for c in chunks]
            out = [np.empty_like(c) for c in chunks]
            t0 = time.perf_counter()
            for e, o in zip(encoded, out):
                codec.decode(e, out=o)
            seconds += time.perf_counter() - t0
            raw += sum(c.nbytes for c in chunks)
        return {"seconds": seconds, "gb_per_s": raw / seconds / 1e9}
    if kind == "read":
        from crucible_record.stats import block_rows

        t0 = time.perf_counter()
        for first in range(0, len(field), block_rows(field)):
            field.numpy(slice(first, first + block_rows(field)))
        return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    if kind == "stats":
        from crucible_record.stats import FieldStats

        t0 = time.perf_counter()
        FieldStats().update(field)
        return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    if kind == "page":
        from viewpage import all_drawn, chrome, figures, free_port, serving, start_view, stop, wait_for

        port = free_port()
        view = start_view(run, port)
        driver = chrome()
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(lambda: serving(url), timeout=600, what="the server")
            t0 = time.perf_counter()
            driver.get(url)
            wait_for(lambda: all_drawn(driver, 5), timeout=3600, what="the page drawn", every=0.05)
            first = time.perf_counter() - t0
            wait_for(lambda: figures(driver)[0]["points"] == 3 * len(field), timeout=3600, what="every step", every=0.2)
            complete = time.perf_counter() - t0
            rss = peak_rss_mb(str(view.pid))
        finally:
            driver.quit()
            stop(view)
        return {"first_drawn_s": first, "seconds": complete, "peak_rss_mb": rss}
    if kind == "live":
        from crucible_record.view import Follower

        shutil.rmtree(run, ignore_errors=True)
        follower, times = None, []

        def follow(step):
            nonlocal follower
            if follower is None:
                follower = Follower(run)
            before = follower.snapshot().run
            t0 = time.perf_counter()
            snap = follower.refresh()
            if snap.run is not None and (before is None or snap.run.committed_steps > before.committed_steps):
                times.append(time.perf_counter() - t0)

        try:
            walk(run, vocab, hidden, steps, follow=follow)
        finally:
            shutil.rmtree(run, ignore_errors=True)
        return {"seconds": statistics.median(times), "max_s": max(times), "refreshes": len(times),
                "peak_rss_mb": peak_rss_mb()}
    raise SystemExit(f"unknown child {kind}")


def main() -> None:
    p = harness.parser(__doc__, rounds=3)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--live-steps", type=int, default=120, help="steps of the run written while followed [120]")
    p.add_argument("--full", action="store_true", help="hidden 768: the GPT-2 size")
    args = p.parse_args()
    vocab, hidden, steps, live = args.vocab, 768 if args.full else args.hidden, args.steps, args.live_steps
    if args.quick:
        vocab, hidden, steps, live = 2000, 16, 60, 30
    res = harness.Result("view", args)
    scratch = args.scratch / f"crucible-bench-view-{os.getpid()}"
    run = str(scratch / "run")
    try:
        t0 = time.perf_counter()
        harness.run_child(__file__, {"kind": "make", "run": run, "vocab": vocab, "hidden": hidden, "steps": steps})
        res.row(f"writing the {steps} x {vocab} x {hidden} bf16 run (setup)", round(time.perf_counter() - t0, 1), " s")
        variants = {kind: {"kind": kind, "run": run} for kind in ("bare", "read", "stats", "page")}
        variants["live"] = {"kind": "live", "run": str(scratch / "live"), "vocab": vocab, "hidden": hidden, "steps": live}
        runs = harness.compare(__file__, variants, "bare", args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = f"W {vocab} x {hidden} bf16, {steps} steps"
    res.table(f"seconds over the whole field ({size})", harness.summarize(runs, "seconds", "bare"),
              "bare: decode only; read: cr.open block by block; stats: every statistic; page: page load to every "
              "step drawn; live: one refresh that found new steps (median; a run of the same width being written)")
    res.table(f"peak RSS, MB ({size})", harness.summarize(runs, "peak_rss_mb", "read"),
              "page: the server process (VmHWM); the others: the child")
    page = runs["page"]
    res.row("time to the first drawn page (page load -> every plot drawn)",
            round(statistics.median(x["first_drawn_s"] for x in page), 2), " s")
    res.row("time per live refresh (server side, median; max)",
            f"{statistics.median(x['seconds'] for x in runs['live']):.3f}; "
            f"{statistics.median(x['max_s'] for x in runs['live']):.3f}", " s")
    res.row("bare codec decode rate", round(statistics.median(x["gb_per_s"] for x in runs["bare"]), 2), " GB/s")
    res.details["runs"] = runs
    res.save()


def make(run: str, vocab: int, hidden: int, steps: int, kind: str = "make") -> dict:
    walk(run, vocab, hidden, steps)
    return {}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child" and '"make"' in sys.argv[2]:
        harness.child_main(make)
    harness.child_main(child)
    main()
