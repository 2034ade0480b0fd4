"""A recorded training run: create or resume RUN_DIR, lock it, train, stop cleanly on signals."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .engine import Inputs, load_inputs, resolve_device, train
from .errors import CrucibleError, Interrupted, RecorderError
from .recorder import Recorder
from .store import Layout, committed_steps, create_store, open_store, provenance, store_bytes

CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".lock"
DEFAULT_CHECKPOINT_EVERY = 64


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final_loss: float
    epochs: int
    bytes_on_disk: int
    seconds: float


def start_run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    layout: Layout = Layout(),
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    progress: bool = True,
) -> RunSummary:
    """Train a new run into RUN_DIR (which must not exist, or be empty)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CrucibleError(f"--out {run_dir} already exists and is not empty; choose a new directory")
    layout.validate()
    if checkpoint_every < 0:
        raise CrucibleError("--checkpoint-every must be >= 0 (0 turns checkpoints off)")
    inputs = load_inputs(config)  # every input is checked before anything is written
    device = resolve_device(config.device)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CrucibleError(f"cannot create {run_dir}: {e.strerror or e}") from None
    with run_lock(run_dir):
        group = create_store(
            run_dir,
            steps=config.steps,
            vocab_size=config.vocab_size,
            hidden_dim=config.hidden_dim,
            dead_mask=inputs.masks.dead_mask.numpy(),
            layout=layout,
            attributes={
                "config": config.to_dict(),
                "provenance": provenance(device),
                "inputs": _input_hashes(inputs),
                "date": dt.date.today().isoformat(),
                "checkpoint_every": checkpoint_every,
            },
        )
        return _train_recorded(config, inputs, group, run_dir, device, checkpoint_every, progress)


def resume_run(run_dir: str | Path, *, progress: bool = True) -> RunSummary:
    """Continue a stopped run to its configured steps, bit-identical to an uninterrupted run."""
    run_dir = Path(run_dir)
    open_store(run_dir)  # a clear error if this is not a run, before taking the lock
    with run_lock(run_dir):
        group = open_store(run_dir, mode="r+")
        config = RunConfig.from_dict(group.attrs["config"])
        done = committed_steps(group)
        if done >= config.steps:
            raise CrucibleError(f"{run_dir} is already complete ({done} of {config.steps} steps)")
        inputs = load_inputs(config)
        if _input_hashes(inputs) != group.attrs.get("inputs"):
            raise CrucibleError(f"the corpus, tokenizer or dead mask of {run_dir} changed since it was recorded")
        device = resolve_device(config.device)
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is not None and checkpoint["step"] > done:
            checkpoint = None  # cannot happen with our writer; never trust a checkpoint ahead of the data
        every = int(group.attrs.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
        return _train_recorded(
            config, inputs, group, run_dir, device, every, progress, checkpoint=checkpoint, done=done
        )


def _train_recorded(config, inputs: Inputs, group, run_dir: Path, device: str, every: int,
                    progress: bool, checkpoint: dict | None = None, done: int = -1) -> RunSummary:
    started = time.perf_counter()
    recorder = Recorder(group, device=device)
    replay = _ReplayCheck(group) if done >= 0 else None
    try:
        with _signals_raise_interrupted():
            result = train(
                config,
                inputs,
                recorder,
                progress=progress,
                checkpoint_every=every,
                save_checkpoint=lambda state: save_checkpoint(run_dir, state),
                resume_from=checkpoint,
                replay=replay,
                replay_until=done,
            )
        recorder.close()
    except (KeyboardInterrupt, Interrupted):
        try:
            recorder.close()
        except RecorderError as e:
            raise e from None
        raise Interrupted(
            f"stopped: {recorder.committed} of {config.steps} steps committed in {run_dir}; "
            f"continue with: crucible-record train --resume {run_dir}"
        ) from None
    except BaseException:
        try:
            recorder.close()  # commit what is safe to commit; its own error is secondary
        except RecorderError:
            pass
        raise
    return RunSummary(
        run_dir=run_dir,
        steps=recorder.committed,
        final_loss=result.final_loss,
        epochs=result.epochs,
        bytes_on_disk=store_bytes(run_dir),
        seconds=time.perf_counter() - started,
    )


class _ReplayCheck:
    """On resume, steps already on disk are recomputed and must equal what was written."""

    def __init__(self, group):
        self.group = group

    def __call__(self, step: int, W: torch.Tensor, h_mean, loss) -> None:
        same = np.array_equal(W.cpu().view(torch.uint16).numpy(), self.group["W"][step])
        if step > 0:
            same = same and np.array_equal(h_mean.cpu().numpy(), self.group["h_mean"][step - 1])
            stored = np.float32(self.group["loss"][step])
            same = same and stored == np.float32(loss.float().cpu().item())
        if not same:
            raise CrucibleError(
                f"resume diverged at step {step}: the recomputed step differs from the recorded one "
                f"(was the run recorded with another torch thread count ({self.group.attrs['provenance']['torch_threads']}) or device?)"
            )


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, then atomic rename: never a torn checkpoint."""
    path = run_dir / CHECKPOINT_FILE
    tmp = run_dir / f".{CHECKPOINT_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:
        raise CrucibleError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to resume from step 0") from None


@contextmanager
def run_lock(run_dir: Path):
    """One writer per run. flock is released by the OS when a process dies, so no stale locks."""
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CrucibleError(f"{run_dir} is being written by another process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


@contextmanager
def _signals_raise_interrupted():
    """SIGTERM behaves like Ctrl-C: raise in the training thread so the writer can drain."""
    def handler(signum, frame):
        raise Interrupted(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _input_hashes(inputs: Inputs) -> dict[str, str]:
    return {
        "corpus_sha256": _sha256(inputs.corpus_path),
        "tokenizer_sha256": _sha256(inputs.tokenizer_path),
        "dead_mask_sha256": hashlib.sha256(inputs.masks.dead_mask.numpy().tobytes()).hexdigest(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
