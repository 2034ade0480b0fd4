"""Hostile files and links in a run (issue 22): never a hang, a memory blowup, or a write outside the run.

Each case plants one hostile thing in a copy of a small run (a generic run recorded by cr.record,
or a tiny Crucible-3 run), runs the entry points concerned and checks two things: a clean one-line
error (or the correct behaviour), and that everything outside the run (a sentinel folder, another
run) is byte for byte as it was. Entry points that could hang or read without end run in a child
process under a timeout and an address-space limit (RLIMIT_AS 4 GB), so a regression fails the test
instead of taking the machine down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import crucible_record as cr
from crucible_record.errors import CrucibleError

from .clirun import assert_one_line_error, run_cli
from .conftest import TINY

STORE = "trajectory.zarr"
SHARD = f"{STORE}/W/c/0/0/0"  # the first block of W (generic and Crucible runs alike)
CHILD_TIMEOUT = 60
CHILD_MEMORY = 4 << 30
GENERIC_STEPS = 6  # blocks of 4: one whole block, one partial


# ----- runs and helpers -----------------------------------------------------------------------
def generic_fields():
    return {"W": cr.Field((50, 8), torch.bfloat16), "loss": cr.Field((), torch.float32)}


def generic_values(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"W": torch.randn(50, 8, generator=g).to(torch.bfloat16), "loss": torch.tensor(float(step))}


@pytest.fixture(scope="module")
def generic_base(tmp_path_factory) -> Path:
    """An open-ended generic run of 6 steps in blocks of 4 (resumable: it has no fixed length)."""
    run_dir = tmp_path_factory.mktemp("hostile") / "generic"
    with cr.record(run_dir, generic_fields(), layout=cr.Layout(time_chunk=4, row_chunk=25)) as rec:
        for step in range(GENERIC_STEPS):
            rec.record(step, **generic_values(step))
    return run_dir


@pytest.fixture(scope="module")
def crucible_base(tmp_path_factory, tiny_corpus) -> Path:
    """A finished tiny Crucible-3 run of 6 training steps in blocks of 4."""
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.config import RunConfig
    from crucible_record.crucible3.run import start_run

    config = RunConfig(**{**TINY, "steps": 6}, corpus=str(tiny_corpus), device="cpu")
    run_dir = tmp_path_factory.mktemp("hostile") / "crucible"
    start_run(config, run_dir, layout=Layout(time_chunk=4, row_chunk=1000), progress=False)
    return run_dir


def copy_run(base: Path, dst: Path, *, committed: int | None = None) -> Path:
    shutil.copytree(base, dst, symlinks=True)
    if committed is not None:
        (dst / STORE / "commit.json").write_text(json.dumps({"steps": committed}))
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: a file's sha256, a link's target, a folder's presence."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[key] = "link -> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "special"
    return out


def sentinel(tmp_path: Path) -> Path:
    """A folder outside every run, with a few files a stray write would change."""
    folder = tmp_path / "sentinel"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious data\n" * 10)
    (folder / "centroids.png").write_bytes(b"not a plot, somebody's file")
    return folder


def child(code: str, *, cwd: Path) -> subprocess.CompletedProcess:
    """Run Python `code` in a child process under CHILD_TIMEOUT and RLIMIT_AS CHILD_MEMORY."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("CRUCIBLE_DEBUG", None)
    try:
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: still running after {CHILD_TIMEOUT} s: {code.strip().splitlines()[0]}")


def cli_child(cwd: Path, *args) -> subprocess.CompletedProcess:
    return child(f"from crucible_record.cli import main; main({[str(a) for a in args]!r})", cwd=cwd)


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit with one line `error: ...` on stderr naming `fragments` (no MemoryError)."""
    assert result.returncode not in (0, -9), (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "MemoryError" not in lines[0] and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


READ_W = """
import crucible_record as cr
from crucible_record.errors import CrucibleError
try:
    cr.open({run!r})["W"][{key}]
except CrucibleError as e:
    print("error:", e, file=__import__("sys").stderr)
    raise SystemExit(1)
print("read")
"""


def plant_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def plant_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def plant_sparse(path: Path) -> None:
    os.truncate(path, 8 * 10**9)  # 8 GB, almost none of it on disk


# each hostile file planted, with the fragment its refusal names
EVERY_HOSTILE_FILE = pytest.mark.parametrize("plant, fragment", [(plant_fifo, "FIFO"), (plant_zero, "symlink"),
                                                                  (plant_sparse, "bytes, more than")],
                                             ids=["fifo", "dev-zero", "sparse-8GB"])


# ----- 1. reads bounded: a FIFO, /dev/zero, an 8 GB sparse file in place of a store file ---------
@pytest.mark.timeout(300)
@EVERY_HOSTILE_FILE
def test_hostile_shard_is_refused_by_reads_export_and_verify(tmp_path, generic_base, plant, fragment):
    run_dir = copy_run(generic_base, tmp_path / "run")
    plant(run_dir / SHARD)
    assert_clean_failure(child(READ_W.format(run=str(run_dir), key=":"), cwd=tmp_path), "W/c/0/0/0", fragment)
    # one token's trajectory reads only the index and one inner chunk of each shard: bounded the same way
    assert_clean_failure(child(READ_W.format(run=str(run_dir), key=":, 3"), cwd=tmp_path), "W/c/0/0/0", fragment)
    assert_clean_failure(cli_child(tmp_path, "export", run_dir, "--out", tmp_path / "out"), "W/c/0/0/0", fragment)
    result = cli_child(tmp_path, "verify", run_dir)
    assert_clean_failure(result, "damaged")
    assert "W steps 0-3" in result.stdout and fragment.lower() in result.stdout.lower(), result.stdout


@pytest.mark.timeout(300)
@EVERY_HOSTILE_FILE
def test_hostile_commit_marker_is_refused(tmp_path, generic_base, plant, fragment):
    run_dir = copy_run(generic_base, tmp_path / "run")
    plant(run_dir / STORE / "commit.json")
    assert_clean_failure(child(READ_W.format(run=str(run_dir), key=":"), cwd=tmp_path), "commit.json", fragment)
    assert_clean_failure(cli_child(tmp_path, "info", run_dir), "commit.json", fragment)
    assert_clean_failure(cli_child(tmp_path, "verify", run_dir, "--repair"), "commit.json", fragment)


@pytest.mark.timeout(300)
def test_hostile_shard_of_a_crucible_run_is_refused_by_export_and_analyze(tmp_path, crucible_base):
    run_dir = copy_run(crucible_base, tmp_path / "run")
    plant_fifo(run_dir / SHARD)
    assert_clean_failure(cli_child(tmp_path, "export", run_dir), "W/c/0/0/0", "FIFO")
    assert_clean_failure(cli_child(tmp_path, "analyze", run_dir), "W/c/0/0/0", "FIFO")
    plant_sparse(run_dir / f"{STORE}/W/c/1/0/0")
    (run_dir / SHARD).unlink()
    shutil.copy(crucible_base / SHARD, run_dir / SHARD)
    assert_clean_failure(cli_child(tmp_path, "export", run_dir, "--force"), "W/c/1/0/0", "bytes, more than")


# ----- 2. import: the input file and --metadata ---------------------------------------------------
@pytest.fixture(scope="module")
def notebook_files(tmp_path_factory, crucible_base) -> Path:
    from crucible_record.crucible3.export import export_safetensors
    from crucible_record.crucible3.trajectory import open_trajectory

    out = tmp_path_factory.mktemp("notebook")
    export_safetensors(open_trajectory(crucible_base), out)
    return out


@pytest.mark.timeout(300)
def test_import_refuses_a_fifo_or_a_device_as_metadata_or_input(tmp_path, notebook_files):
    fifo = tmp_path / "metadata.fifo"
    os.mkfifo(fifo)
    trajectory = notebook_files / "crucible_3_trajectory.safetensors"
    assert_clean_failure(cli_child(tmp_path, "import", trajectory, "--metadata", fifo, "--out", tmp_path / "a"),
                         "metadata.fifo", "FIFO")
    assert_clean_failure(cli_child(tmp_path, "import", trajectory, "--metadata", "/dev/zero", "--out", tmp_path / "b"),
                         "/dev/zero", "device")
    big = tmp_path / "metadata.json"
    big.write_bytes(b"{}")
    os.truncate(big, 8 * 10**9)
    assert_clean_failure(cli_child(tmp_path, "import", trajectory, "--metadata", big, "--out", tmp_path / "c"),
                         "metadata.json", "bytes, more than")
    assert_clean_failure(cli_child(tmp_path, "import", fifo, "--out", tmp_path / "d"), "metadata.fifo", "FIFO")
    assert not any((tmp_path / name).exists() for name in "abcd")
    # the good files still import, and a symlink --out is refused up front (the run is renamed into place)
    link = tmp_path / "link"
    (tmp_path / "empty").mkdir()
    link.symlink_to(tmp_path / "empty")
    result = cli_child(tmp_path, "import", trajectory, "--metadata", notebook_files / "metadata.json", "--out", link)
    assert_clean_failure(result, "symlink")
    assert list((tmp_path / "empty").iterdir()) == []


# ----- 3. writes only inside the run --------------------------------------------------------------
def test_store_linked_to_another_run_is_refused_and_that_run_untouched(capsys, tmp_path, crucible_base, generic_base):
    """RUN/trajectory.zarr -> another run's store: verify --repair, train --resume, cr.record(resume=True)
    and cr.open all refuse, and the other run (with a planted temporary file) is unchanged."""
    other = copy_run(crucible_base, tmp_path / "other", committed=4)
    (other / STORE / "W" / "c" / f"0.{'a' * 32}.partial").write_bytes(b"planted")
    (other / STORE / "W" / "c" / "1" / "0" / "0").write_bytes(b"damaged block")  # so verify --repair would act
    before = snapshot(other)
    run_dir = copy_run(crucible_base, tmp_path / "run", committed=4)
    shutil.rmtree(run_dir / STORE)
    (run_dir / STORE).symlink_to(other / STORE)

    assert_one_line_error(run_cli(capsys, "verify", run_dir, "--repair"), "trajectory.zarr", "symlink")
    assert_one_line_error(run_cli(capsys, "train", "--resume", run_dir, "--no-progress"), "trajectory.zarr", "symlink")
    assert_one_line_error(run_cli(capsys, "info", run_dir), "trajectory.zarr", "symlink")
    assert_one_line_error(run_cli(capsys, "export", run_dir), "trajectory.zarr", "symlink")
    with pytest.raises(CrucibleError, match="symlink"):
        cr.open(run_dir)
    assert snapshot(other) == before

    generic_other = copy_run(generic_base, tmp_path / "generic_other")
    (generic_other / STORE / f"zarr.json.{'b' * 32}.partial").write_bytes(b"planted")
    generic_before = snapshot(generic_other)
    generic = copy_run(generic_base, tmp_path / "generic")
    shutil.rmtree(generic / STORE)
    (generic / STORE).symlink_to(generic_other / STORE)
    with pytest.raises(CrucibleError, match="symlink"):
        cr.record(generic, generic_fields(), resume=True)
    assert snapshot(generic_other) == generic_before


def test_symlinked_folder_inside_the_store_is_never_written_through(tmp_path, generic_base):
    """RUN/trajectory.zarr/W/c -> a folder outside: resume refuses to write (or delete) there, reads refuse it."""
    run_dir = copy_run(generic_base, tmp_path / "run")
    outside = sentinel(tmp_path)
    shutil.copytree(run_dir / STORE / "W" / "c", outside / "c")
    shutil.rmtree(run_dir / STORE / "W" / "c")
    (run_dir / STORE / "W" / "c").symlink_to(outside / "c")
    before = snapshot(outside)

    with pytest.raises(CrucibleError, match="symlink"):
        cr.open(run_dir)["W"][:]
    with pytest.raises(CrucibleError, match="symlink"):
        cr.open(run_dir)["W"][:, 3]  # one token: the index and one inner chunk a shard, never through the link
    with pytest.raises(CrucibleError, match="W/c"):
        with cr.record(run_dir, generic_fields(), resume=True) as rec:
            for step in range(rec.next_step, rec.next_step + 8):
                rec.record(step, **generic_values(step))
    assert snapshot(outside) == before


def test_export_folder_linked_outside_is_refused(capsys, tmp_path, generic_base, crucible_base):
    outside = sentinel(tmp_path)
    before = snapshot(outside)
    for base in (generic_base, crucible_base):
        run_dir = copy_run(base, tmp_path / f"run-{base.name}")
        (run_dir / "export").symlink_to(outside)
        assert_one_line_error(run_cli(capsys, "export", run_dir), "export", "symlink")
        assert_one_line_error(run_cli(capsys, "export", run_dir, "--force"), "export", "symlink")
        link = tmp_path / f"out-{base.name}"
        link.symlink_to(outside)
        assert_one_line_error(run_cli(capsys, "export", run_dir, "--out", link), "symlink")
        assert snapshot(outside) == before
        # a symlinked export file is replaced (with --force), never written through
        (run_dir / "export").unlink()
        (run_dir / "export").mkdir()
        name = "crucible_3_trajectory.safetensors" if base is crucible_base else f"{run_dir.name}.safetensors"
        (run_dir / "export" / name).symlink_to(outside / "notes.txt")
        assert run_cli(capsys, "export", run_dir, "--force").code == 0
        assert not (run_dir / "export" / name).is_symlink()
        assert snapshot(outside) == before


@pytest.mark.timeout(300)
def test_analysis_file_linked_outside_is_replaced_not_written_through(capsys, tmp_path, crucible_base):
    run_dir = copy_run(crucible_base, tmp_path / "run")
    outside = sentinel(tmp_path)
    before = snapshot(outside)
    (run_dir / "analysis").mkdir()
    (run_dir / "analysis" / "centroids.png").symlink_to(outside / "centroids.png")
    (run_dir / "analysis" / "analysis.json").symlink_to(outside / "notes.txt")
    result = run_cli(capsys, "analyze", run_dir, "--force")
    assert result.code == 0, result.err
    assert snapshot(outside) == before
    for name in ("centroids.png", "analysis.json"):
        path = run_dir / "analysis" / name
        assert path.is_file() and not path.is_symlink()
    assert (run_dir / "analysis" / "centroids.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shutil.rmtree(run_dir / "analysis")
    (run_dir / "analysis").symlink_to(outside)
    assert_one_line_error(run_cli(capsys, "analyze", run_dir, "--force"), "analysis", "symlink")
    link = tmp_path / "link"
    link.symlink_to(outside)
    assert_one_line_error(run_cli(capsys, "analyze", run_dir, "--out", link, "--force"), "symlink")
    assert snapshot(outside) == before


@pytest.mark.timeout(300)
def test_train_out_a_symlink_records_the_whole_run_where_it_points(capsys, tmp_path, tiny_corpus):
    """`train --out LINK` (LINK -> an empty folder): the user named where the run lives; it is recorded
    there whole (checkpoint, export, analysis included), and reads back through the link."""
    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "LINK"
    link.symlink_to(target)
    outside = sentinel(tmp_path)
    before = snapshot(outside)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "steps": 3}.items()]
    result = run_cli(capsys, "train", "--out", link, *args, "--corpus", tiny_corpus, "--device", "cpu",
                     "--time-chunk", "4", "--no-progress")
    assert result.code == 0, result.err
    assert (target / STORE / "commit.json").is_file() and (target / "checkpoint.safetensors").is_file()
    assert cr.open(link).committed_steps == 4
    assert run_cli(capsys, "verify", link).code == 0
    assert run_cli(capsys, "export", link).code == 0
    assert (target / "export" / "metadata.json").is_file()
    assert snapshot(outside) == before


def test_record_to_a_symlinked_run_directory_works_whole(tmp_path):
    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    with cr.record(link, generic_fields(), layout=cr.Layout(time_chunk=4, row_chunk=25)) as rec:
        for step in range(GENERIC_STEPS):
            rec.record(step, **generic_values(step))
    with cr.record(link, generic_fields(), resume=True) as rec:
        for step in range(rec.next_step, rec.next_step + 3):
            rec.record(step, **generic_values(step))
    run = cr.open(link)
    assert run.committed_steps == GENERIC_STEPS + 3
    assert torch.equal(run["W"][7], generic_values(7)["W"])
    assert (target / STORE / "zarr.json").is_file()
