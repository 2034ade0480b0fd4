"""The command line of the examples that read a Crucible-3 run: RUN_DIR, or --small to record one first.

A helper the examples import (not an example itself)."""

import argparse
import time


def small_run(out, name: str) -> str:
    """--small: record a small Crucible-3 run first (20 steps of a narrow model, seconds on a CPU)."""
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    out = out or time.strftime(f"runs/{name}-%Y%m%d-%H%M%S")
    print(f"recording a small Crucible-3 run into {out}")
    config = RunConfig(steps=20, batch_size=4, seq_len=16, hidden_dim=16, num_layers=1, device="cpu")
    start_run(config, out, layout=Layout(time_chunk=8), progress=False)
    return out


def crucible_run(doc: str, name: str) -> str:
    """The run the example reads: RUN_DIR as given, or a small run recorded first (--small [--out DIR])."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a Crucible-3 run (crucible-record train)")
    p.add_argument("--small", action="store_true", help="record a small Crucible-3 run first (seconds on a CPU) and use it")
    p.add_argument("--out", help=f"with --small: the new run's directory (default: runs/{name}-<date>-<time>)")
    args = p.parse_args()
    if (args.run_dir is None) == (not args.small):
        p.error("give a RUN_DIR, or --small to record a small run first (not both)")
    if args.out and not args.small:
        p.error("--out goes with --small")
    return small_run(args.out, name) if args.small else args.run_dir
