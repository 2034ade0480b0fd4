"""A recorded Crucible-3 run: create or resume RUN_DIR, train, stop cleanly on signals.

The run is a generic one (``cr.record``) whose fields are :func:`engine.fields`; its attributes
say ``experiment: crucible-3`` and hold the config, provenance and hashes of the inputs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import dtypes
from ..codecs import Layout
from ..errors import CrucibleError, Interrupted, RecorderError
from ..format.schema import open_group, read_commit
from ..verify import verify_run
from ..api import record
from ..writer import Recorder
from ..steps_text import steps_committed
from ..storage import DEFAULT_COMMIT_INTERVAL, is_url, open_store
from . import checkpoint
from .config import RunConfig, training_line
from .engine import Inputs, StepHook, build_model, fields, load_inputs, resolve_device, train
from .trajectory import EXPERIMENT


@dataclass
class RunSummary:
    run_dir: Path
    steps: int  # training steps committed
    planned: int  # training steps configured
    final_loss: float
    epochs: int
    bytes_on_disk: int
    seconds: float


def start_run(config: RunConfig, run_dir: str | Path, *, layout: Layout = Layout(), checkpoints: bool = True,
              commit_interval: float = DEFAULT_COMMIT_INTERVAL, durability: str = "fsync", progress: bool = True,
              writer_threads: int | None = None, announce: Callable[[str], None] = lambda line: None,
              say: Callable[[str], None] = lambda line: None) -> RunSummary:
    """Train a new run into RUN_DIR (which must not exist, or be empty).

    ``announce`` gets the first line at once, before the inputs are read: the run, the device, the
    config; ``say`` what is said while training (Ctrl-C)."""
    if not is_url(run_dir):
        run_dir = Path(run_dir)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise CrucibleError(f"--out {run_dir} already exists and is not empty; choose a new directory")
    layout.validate()
    device = resolve_device(config.device)
    announce(training_line(run_dir, device, config))
    inputs = load_inputs(config)  # every input is checked before anything is written
    import zarr  # (after the first line: on a GPU build it waits for torch and this module's imports)

    from .. import __version__

    provenance = {"package": f"crucible-record {__version__}", "torch": torch.__version__, "zarr": zarr.__version__,
                  "numpy": np.__version__, "python": platform.python_version(), "device": device,
                  "torch_threads": str(torch.get_num_threads())}  # (a resume on other threads would diverge)
    attributes = {"experiment": EXPERIMENT, "config": config.to_dict(), "provenance": provenance,
                  "inputs": _input_hashes(inputs), "date": dt.date.today().isoformat(), "checkpoints": checkpoints}
    recorder = record(run_dir, fields(config, inputs.masks), steps=config.steps + 1,  # W[0]: the initial state
                      attributes=attributes, constants=inputs.masks.constants(), layout=layout,
                      commit_interval=commit_interval, durability=durability, writer_threads=writer_threads)
    return _train_recorded(config, inputs, recorder, run_dir, checkpoints, progress, say)


def resume_run(run_dir: str | Path, *, steps: int | None = None, commit_interval: float = DEFAULT_COMMIT_INTERVAL,
               durability: str = "fsync", progress: bool = True,
               writer_threads: int | None = None, announce: Callable[[str], None] = lambda line: None,
               say: Callable[[str], None] = lambda line: None) -> RunSummary:
    """Continue a stopped run to its configured steps, bit-identical to an uninterrupted run.

    ``steps``: continue a stopped or finished run to that many training steps instead (at least its
    own): the same trajectory as an uninterrupted run of `steps` steps (nothing in the notebook's
    loop depends on the step count but where it stops: no lr schedule, the data order is per epoch).

    ``announce`` gets the first line at once: the run, the device, the config. ``say`` gets one line
    before training: where it resumes, and which recorded steps are first recomputed and checked
    (those after the checkpoint); and what is said while training (Ctrl-C).
    """
    store = open_store(run_dir)
    group, info = open_group(store)  # a clear error if this is not a run
    if info.version < 2:
        raise CrucibleError(f"{run_dir} was recorded by crucible-record 0.1 (format 1): it can be read and exported, not resumed")
    if info.attributes.get("experiment") != EXPERIMENT:
        raise CrucibleError(f"{run_dir} is not a Crucible-3 run; `train --resume` continues only those")
    config = RunConfig.from_dict(info.attributes["config"])  # with its --record choice, if any
    done = read_commit(store, group, info)["steps"] - 1
    attributes = None
    if steps is not None and steps != config.steps:
        if steps < config.steps:
            raise CrucibleError(f"--steps {steps} is fewer than the {config.steps} steps of {run_dir}; "
                                "a run can be extended, not shortened")
        config = config.replace(steps=steps)
        attributes = {**info.attributes, "config": config.to_dict()}  # as a run of `steps` steps says
    if done >= config.steps:
        raise CrucibleError(f"{run_dir} is already complete: {steps_committed(done + 1, of=config.steps + 1, training=True)}; "
                            f"extend it with: crucible-record train --resume {run_dir} --steps N (N > {config.steps})")
    announce(f"continuing {run_dir} on {resolve_device(config.device)}: {config.describe()}")
    damage = verify_run(run_dir)  # continuing over a damaged committed block would keep the damage and exit 0
    if not damage.ok:
        raise CrucibleError(f"{run_dir} is damaged ({damage.problems[0]}): run `crucible-record verify --repair` "
                            f"to move the commit back before it, then resume")
    inputs = load_inputs(config)
    if _input_hashes(inputs) != info.attributes.get("inputs"):
        raise CrucibleError(f"the corpus, tokenizer or dead mask of {run_dir} changed since it was recorded")
    with torch.device("meta"):  # the run's model without memory or RNG draws, to check the checkpoint against
        model = build_model(config)
    ckpt = checkpoint.load(store, checkpoint.size_limit(model))  # before taking the run: a refusal leaves it as it was
    if ckpt is not None:
        checkpoint.check_fits(ckpt, model.to(torch.bfloat16))
    recorder = record(run_dir, fields(config, inputs.masks), resume=True, commit_interval=commit_interval, durability=durability,
                      writer_threads=writer_threads, **({} if attributes is None else
                                                        {"steps": config.steps + 1, "attributes": attributes}))
    if ckpt is not None and ckpt["meta"]["step"] >= recorder.next_step:
        ckpt = None  # never trust a checkpoint ahead of the data: recompute instead
    first = ckpt["meta"]["step"] + 1 if ckpt is not None else 0  # the first step train() recomputes
    last = recorder.next_step - 1
    say(f"resuming {run_dir} at training step {recorder.next_step}"
        + (f": recomputing and checking steps {first}-{last} against the run first" if first <= last else ""))
    checkpoints = bool(info.attributes.get("checkpoints", True))
    return _train_recorded(config, inputs, recorder, run_dir, checkpoints, progress, say, ckpt)


def _train_recorded(config, inputs: Inputs, recorder: Recorder, run_dir, checkpoints: bool, progress: bool,
                    say: Callable[[str], None], ckpt: dict | None = None) -> RunSummary:
    started = time.perf_counter()
    try:
        with _signals_stop(say) as stop_requested:
            result = train(config, inputs, recorder, progress=progress,
                           checkpoints_to=recorder.store if checkpoints else None, resume_from=ckpt,
                           replay=_replay_check(run_dir) if recorder.next_step > 0 else None,
                           stop_requested=stop_requested)
        recorder.close()
    except (KeyboardInterrupt, Interrupted):
        try:
            recorder.close()  # commit what is safe to commit
        except RecorderError as e:
            raise e from None
        raise Interrupted(
            f"stopped: {steps_committed(recorder.committed, of=config.steps + 1, training=True)} in {run_dir}; "
            f"continue with: crucible-record train --resume {run_dir}"
        ) from None
    except BaseException:
        with suppress(RecorderError):
            recorder.close()  # commit what is safe to commit; its own error is secondary
        raise
    return RunSummary(run_dir, recorder.committed - 1, config.steps, result.final_loss, result.epochs,
                      recorder.store.bytes_on_disk(), time.perf_counter() - started)


def _replay_check(run_dir) -> StepHook:
    """On resume, steps already on disk are recomputed and must equal what was written, bit for bit.

    Each stored block is decoded once (the recomputed steps of a block are checked against it).
    A field that keeps some rows only (--record-rows) is checked on those rows.
    """
    from ..reader import Run

    run, blocks = Run(run_dir), {}  # name -> (first step, the decoded block)

    def check(step: int, tensors: dict) -> None:
        for name, value in tensors.items():
            field = run[name]
            start = step - step % field.array.chunks[0]
            if blocks.get(name, (None,))[0] != start:
                blocks[name] = (start, field.numpy(slice(start, min(start + field.array.chunks[0], len(field)))))
            given = value.detach().cpu()
            given = dtypes.to_stored(given if field.rows is None else given.index_select(0, field.rows))
            if given.numpy().tobytes() != blocks[name][1][step - start].tobytes():
                raise CrucibleError(
                    f"resume diverged at step {step} ({name}): the recomputed step differs from the recorded one "
                    f"(was the run recorded with another torch thread count "
                    f"({run.attributes['provenance']['torch_threads']}) or device?)"
                )

    return check


@contextmanager
def _signals_stop(say: Callable[[str], None]):
    """Ctrl-C: say at once that training stops after the current step, and stop there (the step is
    recorded, the writer commits); a second Ctrl-C, or SIGTERM, raises in the training thread at once
    so the writer can drain. Yields the check the loop makes after each step.

    "At once": a Python signal handler runs only when the training thread is back in Python (after
    the current torch op, seconds at the default config on a CPU), so a watcher thread woken by
    signal.set_wakeup_fd prints the line."""
    requested = threading.Event()

    def on_signal(signum, frame):
        if signum == signal.SIGTERM or requested.is_set():
            raise Interrupted(f"received signal {signum}")
        requested.set()

    try:
        previous_term = signal.signal(signal.SIGTERM, on_signal)
    except ValueError:  # not the main thread: leave signals alone
        yield requested.is_set
        return
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN:  # a shell that started us in the background keeps Ctrl-C away
        signal.signal(signal.SIGINT, on_signal)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch():
        told = False
        while data := os.read(read_end, 64):
            if signal.SIGINT in data and not told and previous_int is not signal.SIG_IGN:
                told = True
                say("\nCtrl-C: stopping after the current step (Ctrl-C again to stop at once)")

    watcher = threading.Thread(target=watch, name="crucible-record-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield requested.is_set
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)  # the watcher reads end-of-file and returns
        watcher.join()
        os.close(read_end)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _input_hashes(inputs: Inputs) -> dict[str, str]:
    return {"corpus_sha256": _sha256(inputs.corpus_path), "tokenizer_sha256": _sha256(inputs.tokenizer_path),
            "dead_mask_sha256": hashlib.sha256(inputs.masks.dead_mask.numpy().tobytes()).hexdigest()}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
