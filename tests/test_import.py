"""`crucible-record import`: a notebook output file -> a Crucible-3 run, and `export` gives it back."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory
from crucible_record.crucible3.data import derive_dead_mask, load_tokenizer, save_dead_mask, tokenize_corpus
from crucible_record.crucible3.importer import EpochBounds
from crucible_record.export import write_safetensors

from .clirun import assert_one_line_error, run_cli
from .conftest import TINY
from .notebook_reference import run_notebook

NOTEBOOK_FILE = "crucible_3_trajectory.safetensors"


@pytest.fixture(scope="module")
def notebook_dir(tmp_path_factory, tiny_corpus, tokenizer_path):
    """The notebook's own two files for the tiny config (25 steps, 10 batches an epoch)."""
    tokens = tokenize_corpus(tiny_corpus, load_tokenizer(tokenizer_path, 10000))
    mask = tmp_path_factory.mktemp("mask") / "live_dead_tokens.safetensors"
    save_dead_mask(derive_dead_mask(tokens, 10000), mask)
    out = tmp_path_factory.mktemp("notebook")
    run_notebook(
        corpus_path=tiny_corpus, tokenizer_path=tokenizer_path, dead_mask_path=mask, output_dir=out,
        TOTAL_STEPS=TINY["steps"], BATCH_SIZE=TINY["batch_size"], SEQ_LEN=TINY["seq_len"],
        HIDDEN_DIM=TINY["hidden_dim"], NUM_LAYERS=TINY["num_layers"], NUM_HEADS=TINY["num_heads"],
    )
    batches_per_epoch = len(tokens) // TINY["seq_len"] // TINY["batch_size"]
    return out, batches_per_epoch


@pytest.fixture(scope="module")
def imported(tmp_path_factory, notebook_dir):
    """The notebook file imported with its metadata.json, through the CLI's entry point."""
    from crucible_record.cli import main

    nb, _ = notebook_dir
    run = tmp_path_factory.mktemp("imported") / "run"
    try:
        main(["import", str(nb / NOTEBOOK_FILE), "--metadata", str(nb / "metadata.json"), "--out", str(run),
              "--time-chunk", "8"])
    except SystemExit as e:  # main() exits only on an error
        raise AssertionError(f"import failed with exit code {e.code}") from None
    return run


def test_round_trip_is_byte_identical(capsys, tmp_path, notebook_dir, imported):
    nb, batches_per_epoch = notebook_dir
    result = run_cli(capsys, "export", imported, "--out", tmp_path / "export")
    assert result.code == 0, result.err
    source, exported = nb / NOTEBOOK_FILE, tmp_path / "export" / NOTEBOOK_FILE
    assert exported.read_bytes() == source.read_bytes()

    ref_meta = json.loads((nb / "metadata.json").read_text())
    our_meta = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert our_meta == ref_meta and list(our_meta) == list(ref_meta)

    traj = open_trajectory(imported)
    assert traj.steps == TINY["steps"] and traj.config.hidden_dim == TINY["hidden_dim"]
    assert traj.config.batch_size == TINY["batch_size"] and traj.config.num_layers == TINY["num_layers"]
    assert traj.attrs["import"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert traj.attrs["notebook_metadata"] == ref_meta
    # step 0 as the engine records it: h_mean NaN, loss the file's NaN
    assert torch.isnan(traj["h_mean"][0]).all() and torch.isnan(traj["loss"][0])
    ref = load_file(str(source))
    assert torch.equal(traj["h_mean"][1:], ref["h_mean"])

    # epoch: known where every batches-per-epoch count consistent with (25 steps, 3 epochs) agrees
    epoch = traj["epoch"][:].numpy()
    truth = np.array([0] + [math.ceil(s / batches_per_epoch) for s in range(1, TINY["steps"] + 1)])
    known = epoch != -1
    assert np.array_equal(epoch[known], truth[known])
    assert known[[0, 1, -1]].all() and 0 < (~known).sum() < TINY["steps"]
    assert traj.epochs == ref_meta["total_epochs"] == 3


def test_verify_info_analyze_work_on_the_imported_run(capsys, tmp_path, imported):
    verify = run_cli(capsys, "verify", imported)
    assert verify.code == 0 and "OK: steps 0..25 committed (25 of 25 training steps)" in verify.out, verify
    info = run_cli(capsys, "info", imported)
    assert info.code == 0, info.err
    for text in ("Progress: steps 0..25 committed (25 of 25 training steps)", "Crucible-3: epochs: 3", "W: (10000, 16) bfloat16", "Live/Dead separation",
                 "imported_by crucible-record", "device cpu"):
        assert text in info.out, text
    analyze = run_cli(capsys, "analyze", imported, "--out", tmp_path / "analysis")
    assert analyze.code == 0, analyze.err
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert result  # and the plots
    assert len(list((tmp_path / "analysis").glob("*.png"))) == 5


def test_without_metadata_config_comes_from_the_shapes(capsys, tmp_path, notebook_dir):
    nb, _ = notebook_dir
    result = run_cli(capsys, "import", nb / NOTEBOOK_FILE, "--out", tmp_path / "run")
    assert result.code == 0, result.err
    assert "tensor shapes" in result.out and "byte for byte" in result.out
    traj = open_trajectory(tmp_path / "run")
    assert (traj.config.steps, traj.config.vocab_size, traj.config.hidden_dim) == (25, 10000, 16)
    assert traj.config.batch_size == 128  # a RunConfig default, and the run says so:
    assert "RunConfig default" in traj.attrs["import"]["config_from"]
    assert traj["epoch"][:].tolist() == [0, 1] + [-1] * 24
    exported = run_cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "export")
    assert exported.code == 0, exported.err
    assert (tmp_path / "export" / NOTEBOOK_FILE).read_bytes() == (nb / NOTEBOOK_FILE).read_bytes()
    meta = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert meta["total_epochs"] is None and meta["total_steps"] == 25  # unknown, not invented


@pytest.mark.parametrize("steps,epochs", [(25, 3), (10, 1), (10, 10), (7, 2), (100, 7), (1, 1)])
def test_epoch_bounds_agree_with_every_possible_epoch_length(steps, epochs):
    known = EpochBounds(steps, epochs).at(0, steps + 1)
    feasible = [b for b in range(1, steps + 1) if math.ceil(steps / b) == epochs]
    assert feasible
    for s in range(1, steps + 1):
        answers = {math.ceil(s / b) for b in feasible}
        assert known[s] == (answers.pop() if len(answers) == 1 else -1), s
    assert known[0] == 0 and known[-1] == epochs


# ----- bad input ---------------------------------------------------------------------------------
S, V, H = 5, 12, 4


def tensors(**changes):
    """A small valid notebook file's tensors; `changes` replace or (None) remove some."""
    rng = np.random.default_rng(0)
    dead = torch.zeros(V, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    loss = torch.from_numpy(rng.random(S + 1, dtype=np.float32))
    loss[0] = float("nan")
    t = {"W": torch.from_numpy(rng.integers(0, 2**16, (S + 1, V, H), dtype=np.uint16)),
         "h_mean": torch.from_numpy(rng.random((S, H), dtype=np.float32)), "loss": loss, "dead_mask": dead,
         "dead_indices": torch.tensor([1, 4, 7])}
    t.update(changes)
    return {k: v for k, v in t.items() if v is not None}


def metadata(t=None, **changes):
    t = t or tensors()
    meta = {"experiment": "Crucible 3", "series": "Crucible", "date": "2025-11-28", "total_steps": S,
            "batch_size": 128, "seq_len": 128, "learning_rate": 0.001, "weight_decay": 0.0, "beta1": 0.9,
            "beta2": 0.999, "epsilon": 1e-08, "vocab_size": V, "hidden_dim": H, "num_layers": 2, "num_heads": 2,
            "random_seed": 42, "n_dead_tokens": 3, "n_live_tokens": V - 3, "final_loss": t["loss"][-1].item(),
            "total_epochs": 2, "device": "cpu",
            "data_shapes": {"W": [S + 1, V, H], "h_mean": [S, H], "loss": [S + 1]}, "notes": "n"}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def _save(path, t, **kw):
    save_file(t, str(path), **kw)
    return path


def test_small_synthetic_file_round_trips(capsys, tmp_path):
    t = tensors()
    src = _save(tmp_path / "in.safetensors", t)
    (tmp_path / "meta.json").write_text(json.dumps(metadata(t), indent=2))
    (tmp_path / "empty").mkdir()  # an empty --out directory is fine (as for train)
    result = run_cli(capsys, "import", src, "--metadata", tmp_path / "meta.json", "--out", tmp_path / "empty",
                     "--time-chunk", "2")
    assert result.code == 0, result.err
    assert run_cli(capsys, "export", tmp_path / "empty", "--out", tmp_path / "exp").code == 0
    assert (tmp_path / "exp" / NOTEBOOK_FILE).read_bytes() == src.read_bytes()
    assert json.loads((tmp_path / "exp" / "metadata.json").read_text()) == metadata(t)
    assert cr.open(tmp_path / "empty")["epoch"][:].tolist() == [0, 1, 1, 1, -1, 2]  # B is 3 or 4


def test_a_header_not_laid_out_by_save_file_imports_and_says_so(capsys, tmp_path):
    src = _save(tmp_path / "in.safetensors", tensors(), metadata={"who": "someone else"})
    result = run_cli(capsys, "import", src, "--out", tmp_path / "run")
    assert result.code == 0, result.err
    assert "bytes differ" in result.out
    assert run_cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "exp").code == 0
    ours, theirs = load_file(str(tmp_path / "exp" / NOTEBOOK_FILE)), load_file(str(src))
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)) for k in theirs)


def _bad_header(path):
    good = _save(path.with_suffix(".good"), tensors()).read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    header["loss"]["data_offsets"][1] += 4  # claims more bytes than the dtype and shape need
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + good[8 + n:])


BAD_FILES = [
    # (id, how to make the file (path -> None), fragments of the error)
    ("not safetensors", lambda p: p.write_text("W,h_mean,loss\n1,2,3\n"), ["not a safetensors file"]),
    ("empty file", lambda p: p.write_bytes(b""), ["not a safetensors file"]),
    ("truncated", lambda p: p.write_bytes(_save(p, tensors()).read_bytes()[:-7]), ["not a safetensors file"]),
    ("bad header entry", _bad_header, ["not a safetensors file", "loss"]),
    ("missing tensor", lambda p: _save(p, tensors(h_mean=None)), ["h_mean", "missing"]),
    ("extra tensor", lambda p: _save(p, tensors(grad=torch.zeros(3))), ["unexpected", "grad"]),
    ("W as bf16", lambda p: _save(p, tensors(W=torch.zeros(S + 1, V, H, dtype=torch.bfloat16))), ["W", "BF16", "U16"]),
    ("loss float64", lambda p: _save(p, tensors(loss=torch.full((S + 1,), float("nan"), dtype=torch.float64))),
     ["loss", "F64", "F32"]),
    ("mask not bool", lambda p: _save(p, tensors(dead_mask=torch.zeros(V, dtype=torch.uint8))), ["dead_mask", "BOOL"]),
    ("indices int32", lambda p: _save(p, tensors(dead_indices=torch.tensor([1, 4, 7], dtype=torch.int32))),
     ["dead_indices", "I32"]),
    ("W 2-d", lambda p: _save(p, tensors(W=torch.zeros(S + 1, V * H, dtype=torch.uint16))), ["W", "dimension"]),
    ("no step", lambda p: _save(p, tensors(W=torch.zeros(1, V, H, dtype=torch.uint16), h_mean=torch.zeros(0, H),
                                           loss=torch.full((1,), float("nan")))), ["no training step"]),
    ("h_mean steps", lambda p: _save(p, tensors(h_mean=torch.zeros(S - 1, H))), ["inconsistent step counts"]),
    ("loss steps", lambda p: _save(p, tensors(loss=torch.full((S,), float("nan")))), ["inconsistent step counts"]),
    ("h_mean width", lambda p: _save(p, tensors(h_mean=torch.zeros(S, H + 1))), ["h_mean", "width"]),
    ("mask length", lambda p: _save(p, tensors(dead_mask=torch.zeros(V + 1, dtype=torch.bool),
                                               dead_indices=torch.zeros(0, dtype=torch.long))), ["dead_mask", "vocabulary"]),
    ("indices vs mask", lambda p: _save(p, tensors(dead_indices=torch.tensor([1, 4, 8]))),
     ["dead_indices does not list"]),
    ("loss[0] not NaN", lambda p: _save(p, tensors(loss=torch.ones(S + 1))), ["loss[0]", "NaN"]),
]


@pytest.mark.parametrize("case,make,fragments", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_one_line_and_writes_nothing(capsys, tmp_path, case, make, fragments):
    src = tmp_path / "in.safetensors"
    make(src)
    out = tmp_path / "new" / "run"
    assert_one_line_error(run_cli(capsys, "import", src, "--out", out), *fragments)
    assert not (tmp_path / "new").exists()


def _meta_file(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))


BAD_METADATA = [
    ("not JSON", "{total_steps: 5", ["not valid JSON"]),
    ("not an object", "[1, 2]", ["JSON object"]),
    ("missing key", metadata(total_epochs=None), ["lacks", "total_epochs"]),
    ("unknown key", metadata(optimizer="sgd"), ["does not write", "optimizer"]),
    ("steps differ", metadata(total_steps=S + 1), ["total_steps is 6", "tensors have 5"]),
    ("vocab differs", metadata(vocab_size=V + 1), ["vocab_size"]),
    ("width differs", metadata(hidden_dim=8), ["hidden_dim"]),
    ("dead count differs", metadata(n_dead_tokens=4), ["n_dead_tokens"]),
    ("live count differs", metadata(n_live_tokens=1), ["n_live_tokens"]),
    ("final loss differs", metadata(final_loss=1.5), ["final_loss"]),
    ("shapes differ", metadata(data_shapes={"W": [1, 2, 3]}), ["data_shapes"]),
    ("epochs impossible", metadata(total_epochs=S + 1), ["total_epochs", "impossible"]),
    ("epochs zero", metadata(total_epochs=0), ["total_epochs"]),
    ("bad config value", metadata(num_heads=3), ["num-heads 3 does not divide"]),
    ("wrong type", metadata(learning_rate="fast"), ["lr must be a number"]),
    ("date not text", metadata(date=20251128), ["date must be a string"]),
]


@pytest.mark.parametrize("case,content,fragments", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_bad_metadata_is_one_line_and_writes_nothing(capsys, tmp_path, case, content, fragments):
    src = _save(tmp_path / "in.safetensors", tensors())
    _meta_file(tmp_path / "metadata.json", content)
    out = tmp_path / "run"
    result = run_cli(capsys, "import", src, "--metadata", tmp_path / "metadata.json", "--out", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "metadata.json"]


def test_bad_paths(capsys, tmp_path):
    src = _save(tmp_path / "in.safetensors", tensors())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert_one_line_error(run_cli(capsys, "import", src, "--out", tmp_path / "full"), "already exists")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert_one_line_error(run_cli(capsys, "import", src, "--out", src), "already exists")
    assert_one_line_error(run_cli(capsys, "import", tmp_path / "nope.safetensors", "--out", tmp_path / "r"), "not found")
    assert_one_line_error(run_cli(capsys, "import", tmp_path, "--out", tmp_path / "r"), "not a file")
    assert_one_line_error(run_cli(capsys, "import", src, "--metadata", tmp_path / "nope.json", "--out", tmp_path / "r"),
                          "cannot read metadata")
    assert_one_line_error(run_cli(capsys, "import", src, "--out", "s3://bucket/run"), "local run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "in.safetensors"]


def test_a_failure_part_way_leaves_nothing(capsys, tmp_path, monkeypatch):
    """A read error in the middle of W (after blocks were recorded): no run, no temporary folder."""
    from crucible_record.crucible3 import importer

    src = _save(tmp_path / "in.safetensors", tensors())
    real_read, calls = importer.NotebookFile.read, []

    def failing_read(self, f, name, first=0, count=None):
        calls.append((name, first))
        if name == "W" and first >= 4:
            raise OSError(5, "Input/output error")
        return real_read(self, f, name, first, count)

    monkeypatch.setattr(importer.NotebookFile, "read", failing_read)
    result = run_cli(capsys, "import", src, "--out", tmp_path / "deep" / "run", "--time-chunk", "2")
    assert_one_line_error(result, "Input/output error")
    assert ("W", 2) in calls  # blocks were recorded before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


# ----- memory ----------------------------------------------------------------------------------------
_MEASURE = textwrap.dedent("""
    import sys
    from crucible_record.codecs import Layout
    from crucible_record.crucible3.importer import import_notebook

    def peak_kb():
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))

    for source, run in zip(sys.argv[1::2], sys.argv[2::2]):  # a warm-up, then the small file, then the large
        import_notebook(source, run, layout=Layout(time_chunk=8, row_chunk=2000), durability="none")
        print(peak_kb())
""")


def _synthetic_file(path, steps, vocab=2000, hidden=64):
    """A notebook-shaped file streamed to disk (never whole in memory)."""
    step_bytes = vocab * hidden * 2
    rng = np.random.default_rng(1)

    def w_blocks():
        for first in range(0, steps + 1, 16):
            yield rng.integers(0, 2**16, (min(16, steps + 1 - first), vocab, hidden), dtype=np.uint16).tobytes()

    loss = np.full(steps + 1, np.nan, dtype="<f4")
    write_safetensors(path, {
        "W": ("U16", [steps + 1, vocab, hidden], (steps + 1) * step_bytes, w_blocks),
        "h_mean": ("F32", [steps, hidden], steps * hidden * 4, lambda: iter([np.zeros(steps * hidden, "<f4").tobytes()])),
        "loss": ("F32", [steps + 1], (steps + 1) * 4, lambda: iter([loss.tobytes()])),
        "dead_mask": ("BOOL", [vocab], vocab, lambda: iter([np.zeros(vocab, np.uint8).tobytes()])),
        "dead_indices": ("I64", [0], 0, lambda: iter([])),
    })
    return path


def test_peak_memory_is_flat_in_the_file_size(tmp_path):
    """One process imports a tiny file (warm-up), then a file, then one with 10x its steps (6 MB vs
    62 MB of W); the peak resident memory after the large one must be that after the small one.
    The peak is the process's VmHWM: ru_maxrss (getrusage) of a child on Linux starts from the
    forking parent's RSS (it survives the exec), which would hide any growth."""
    args = []
    for steps in (2, 24, 240):
        args += [_synthetic_file(tmp_path / f"in{steps}.safetensors", steps), tmp_path / f"run{steps}"]
    done = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    _, small, large = (int(x) / 1024 for x in done.stdout.split())
    assert open_trajectory(tmp_path / "run240").steps == 240
    assert large - small < 16, (small, large, "MB; W grew by 55 MB")
