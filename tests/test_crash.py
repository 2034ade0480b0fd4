"""Kill, interrupt and resume real `crucible-record train` processes; nothing committed is lost."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from crucible_record.crucible3 import open_trajectory
from crucible_record.storage import run_lock
from crucible_record.verify import verify_run

from .clirun import assert_one_line_error, run_cli
from .test_cli import tiny_flags

STEPS = 40


# The command as a terminal runs it: Ctrl-C raises KeyboardInterrupt. (A test run started in the
# background by a shell without job control has SIGINT ignored, and Python then keeps it ignored in
# its children: `python -m crucible_record` would not see the signal at all.)
CLI_WITH_SIGINT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from crucible_record.cli import main; main()")


def train_cmd(corpus, out, *extra):
    flags = tiny_flags(corpus)
    flags[flags.index("--steps") + 1] = str(STEPS)
    return [sys.executable, "-c", CLI_WITH_SIGINT, "train", *flags, "--out", str(out), "--time-chunk", "4", *extra]


def committed(run_dir) -> int:
    """Training steps committed (commit.json counts step 0 too); -2 before the run exists."""
    try:
        return json.loads((run_dir / "trajectory.zarr" / "commit.json").read_text())["steps"] - 1
    except (OSError, ValueError):
        return -2  # not created yet


def start_and_wait(cmd, run_dir, until_step, timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while committed(run_dir) < until_step:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"run ended before step {until_step}: rc={proc.returncode} {err[-2000:]}")
        time.sleep(0.005)
    return proc


def resume(run_dir, progress: bool = False):
    cmd = [sys.executable, "-m", "crucible_record", "train", "--resume", str(run_dir)] + ([] if progress else ["--no-progress"])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def arrays(run_dir, steps=None):
    t = open_trajectory(run_dir)
    n = t.steps if steps is None else steps
    return t.W.numpy(slice(0, n + 1)), t.h_mean.numpy()[:n], t.loss.numpy()[: n + 1].view(np.uint32)


def assert_prefix_equal(run_dir, reference_dir):
    steps = open_trajectory(run_dir).steps
    ours, ref = arrays(run_dir), arrays(reference_dir, steps)
    for name, a, b in zip(("W", "h_mean", "loss"), ours, ref):
        assert a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus):
    """An uninterrupted run, made by the same command in a subprocess (same torch threads)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = subprocess.run(train_cmd(tiny_corpus, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_at_random_points_loses_nothing_and_resumes_exactly(tmp_path, tiny_corpus, reference):
    rng = random.Random(1234)
    for trial in range(3):
        run_dir = tmp_path / f"killed{trial}"
        proc = start_and_wait(train_cmd(tiny_corpus, run_dir), run_dir, rng.randrange(0, STEPS - 8))
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        t = open_trajectory(run_dir)  # opens fine after a SIGKILL, shows only the committed prefix
        assert 0 <= t.steps <= STEPS
        assert_prefix_equal(run_dir, reference)

        done = resume(run_dir)  # the dead process's lock does not block this
        assert done.returncode == 0, done.stderr
        assert open_trajectory(run_dir).steps == STEPS
        assert_prefix_equal(run_dir, reference)
        assert verify_run(run_dir).ok


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_then_resume_is_byte_identical(tmp_path, tiny_corpus, reference, sig):
    run_dir = tmp_path / "run"
    proc = start_and_wait(train_cmd(tiny_corpus, run_dir), run_dir, 9)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out.startswith(f"training {run_dir} on cpu: {STEPS} steps of "), out  # the first line names all
    lines = [line for line in err.splitlines() if line.strip()]
    if sig == signal.SIGINT:  # said at once (by a watcher thread), then the current step is finished
        assert lines.pop(0) == "Ctrl-C: stopping after the current step (Ctrl-C again to stop at once)", err
    assert len(lines) == 1 and "Traceback" not in err, err
    t = open_trajectory(run_dir)
    assert lines[0].startswith("stopped: ")  # the user's own stop is not reported as an error
    assert f"steps 0..{t.steps} committed ({t.steps} of {STEPS} training steps)" in lines[0] and "--resume" in lines[0]
    assert t.steps >= 9  # what the writer had was drained and committed, not dropped
    assert_prefix_equal(run_dir, reference)

    done = resume(run_dir)
    assert done.returncode == 0, done.stderr
    assert_prefix_equal(run_dir, reference)
    assert open_trajectory(run_dir).steps == STEPS
    export_ours = subprocess.run([sys.executable, "-m", "crucible_record", "export", str(run_dir)], capture_output=True)
    export_ref = subprocess.run([sys.executable, "-m", "crucible_record", "export", str(reference), "--force"], capture_output=True)
    assert export_ours.returncode == 0 and export_ref.returncode == 0
    name = "crucible_3_trajectory.safetensors"
    assert (run_dir / "export" / name).read_bytes() == (reference / "export" / name).read_bytes()


def store_files(run_dir) -> dict[str, bytes]:
    root = run_dir / "trajectory.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_steps_extends_a_finished_then_a_stopped_run_byte_identical(tmp_path, tiny_corpus, reference):
    """A finished 20-step run, extended with --steps 30 and stopped on the way (at 24), then extended with
    --steps 40: every file of its store is the uninterrupted 40-step run's (CPU, same threads)."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_corpus, run_dir)
    cmd[cmd.index("--steps") + 1] = "20"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert open_trajectory(run_dir).steps == 20

    extend = [sys.executable, "-m", "crucible_record", "train", "--resume", str(run_dir), "--no-progress", "--steps"]
    done = subprocess.run(extend + ["30"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # stopped on the way: what a kill after 25 committed steps leaves (the later rows uncommitted,
    # the checkpoint ahead of the marker: it is not trusted, steps are recomputed and checked)
    (run_dir / "trajectory.zarr" / "commit.json").write_text(json.dumps({"steps": 25}) + "\n")
    t = open_trajectory(run_dir)
    assert t.steps == 24 and t.config.steps == 30
    assert_prefix_equal(run_dir, reference)

    done = subprocess.run(extend + ["40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir} at training step" in done.stderr
    assert open_trajectory(run_dir).steps == 40
    assert store_files(run_dir) == store_files(reference)


def test_second_writer_is_refused(capsys, tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "trajectory.zarr" / "commit.json").write_text('{"steps": 11}')  # stopped at step 10
    with run_lock(run_dir):
        assert_one_line_error(run_cli(capsys, "train", "--resume", run_dir), "another process")
    assert committed(run_dir) == 10


def killed_without_checkpoint(corpus, run_dir):
    """A run SIGKILLed after step 13 whose checkpoint is gone: resume must start from step 0."""
    proc = start_and_wait(train_cmd(corpus, run_dir), run_dir, 13)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    os.remove(run_dir / "checkpoint.safetensors")
    return run_dir


def test_resume_without_checkpoint_recomputes_from_step_zero(tmp_path, tiny_corpus, reference):
    run_dir = killed_without_checkpoint(tiny_corpus, tmp_path / "run")
    kept = committed(run_dir)
    done = resume(run_dir, progress=True)
    assert done.returncode == 0, done.stderr
    assert f"at training step {kept + 1}: recomputing and checking steps 0-{kept} against the run" in done.stderr
    assert "checking=recomputed step" in done.stderr and "nan" not in done.stderr  # the bar shows no loss it lacks
    assert_prefix_equal(run_dir, reference)
    assert open_trajectory(run_dir).steps == STEPS


def test_resume_detects_a_diverging_recomputation(tmp_path, tiny_corpus, reference):
    """If a recomputed step differs from the recorded one (other threads, other device), say so."""
    run_dir = killed_without_checkpoint(tiny_corpus, tmp_path / "run")
    loss = zarr.open_array(run_dir / "trajectory.zarr" / "loss", mode="r+")
    loss[5] = loss[5] + 1.0  # what a different machine would have produced
    before = committed(run_dir)
    done = resume(run_dir)
    assert done.returncode != 0 and "diverged at step 5" in done.stderr and "Traceback" not in done.stderr
    assert committed(run_dir) == before
