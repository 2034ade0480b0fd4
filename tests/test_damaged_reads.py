"""Damaged or crafted shards are one clean CrucibleError everywhere: shard indexes that pass their
checksum but cannot come from the writer (an inner chunk marked absent, two entries sharing bytes)
are refused by verify and by every read; resuming inside a damaged block is one error naming the
field and rows, in the API and on the command line (no asyncio noise)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

import crucible_record as cr
from crucible_record.shardio import MAX_U64, shard_layout
from crucible_record.verify import verify_run

from .conftest import TINY
from .test_durability import generic_fields, generic_values, record_generic

STORE = "trajectory.zarr"


def shard_of(run: Path, name: str, block: int) -> Path:
    return run / STORE / name / "c" / str(block) / "0" / "0"


def rewrite_index(run: Path, name: str, block: int, edit) -> None:
    """Edit the (offset, nbytes) pairs of a shard's index (at its end) and recompute its crc32c."""
    layout = shard_layout(cr.open(run)[name].array)
    path = shard_of(run, name, block)
    data = bytearray(path.read_bytes())
    n = layout.index_nbytes
    index = np.frombuffer(bytes(data[-n:-4]), dtype="<u8").reshape(layout.grid + (2,)).copy()
    edit(index)
    raw = index.tobytes()
    data[-n:] = raw + int(google_crc32c.value(raw)).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def absent(index):
    index[0, 2, 0] = MAX_U64  # rows 4-5 of w: committed data marked "not written"


def shared(index):
    index[0, 3, 0] = index[0, 2, 0]  # rows 6-7 of w read rows 4-5's bytes (a valid chunk: its crc passes)


@pytest.mark.parametrize("edit,what", [(absent, "absent from the shard index"), (shared, "overlap")])
def test_crafted_shard_index_is_damage_for_verify_and_every_read(tmp_path, edit, what):
    run = tmp_path / "run"
    record_generic(run, 11)  # w (8, 3) bf16: blocks of 4 steps, 4 inner chunks of 2 rows per shard
    good = cr.open(run)["w"].numpy()
    rewrite_index(run, "w", 1, edit)

    report = verify_run(run)
    assert [p.split(":")[0] for p in report.problems] == ["w steps 4-7"], report.problems
    assert what in report.problems[0]
    w = cr.open(run)["w"]
    for key in [slice(None), (slice(None), 6), (slice(None), 0), (slice(4, 8, 2), slice(5, 8)), 5,
                (slice(2, 7), [7, 0])]:
        with pytest.raises(cr.CrucibleError, match=rf"^cannot read w rows 4-7: .*{what}"):
            w.numpy(key)
    # the other blocks still read, and equal what was written
    assert np.array_equal(w.numpy(slice(0, 4)).view(np.uint16), good[:4].view(np.uint16))
    assert np.array_equal(w.numpy((slice(8, 11), 6)).view(np.uint16), good[8:, 6].view(np.uint16))


def flip_a_data_byte(run: Path, name: str, block: int) -> None:
    path = shard_of(run, name, block)
    data = bytearray(path.read_bytes())
    data[len(data) // 4] ^= 0xFF  # inside an inner chunk (the index is at the end)
    path.write_bytes(bytes(data))


def test_resume_inside_a_damaged_block_is_one_crucible_error(tmp_path):
    run = tmp_path / "run"
    record_generic(run, 6)  # rows 4-5 committed in block 1: a resume reads them back
    flip_a_data_byte(run, "w", 1)
    with pytest.raises(cr.CrucibleError, match=r"cannot read w rows 4-5: .*verify --repair"):
        with cr.record(run, generic_fields(), resume=True, commit_interval=1e6) as rec:
            rec.record(rec.next_step, **generic_values(rec.next_step))
    assert json.loads((run / STORE / "commit.json").read_text())["steps"] == 6


@pytest.fixture(scope="module")
def crucible_run(tmp_path_factory, tiny_corpus) -> Path:
    """A finished tiny Crucible run of 10 steps in blocks of 4 (W rows 0-3, 4-7, 8-10)."""
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    run = tmp_path_factory.mktemp("damaged") / "base"
    start_run(RunConfig(**{**TINY, "steps": 10}, corpus=str(tiny_corpus), device="cpu"), run,
              layout=Layout(time_chunk=4, row_chunk=1000), progress=False)
    return run


def test_cli_resume_inside_a_damaged_block_prints_one_line(tmp_path, crucible_run):
    """`train --resume` must read W's committed rows 4-5 back (block 1 is the partial one after the
    marker is set to 6 steps); a flipped byte there is one line, not a ValueError with asyncio's
    "Task exception was never retrieved" / "Task was destroyed" tracebacks after it."""
    run = tmp_path / "run"
    shutil.copytree(crucible_run, run)
    (run / STORE / "commit.json").write_text(json.dumps({"steps": 6}) + "\n")
    flip_a_data_byte(run, "W", 1)
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "crucible_record", "train", "--resume", str(run),
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    # (train --resume checks every committed block before it starts: the damage is named by its steps)
    assert lines[0].startswith("error: ") and "W steps 4-5" in lines[0] and "verify --repair" in lines[0], lines[0]
    assert "Task" not in result.stderr and "Traceback" not in result.stderr
