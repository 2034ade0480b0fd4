"""Every bad input: one line on stderr, non-zero exit, no traceback, nothing existing overwritten."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from crucible_record.crucible3.data import default_tokenizer_path

from .clirun import assert_one_line_error, run_cli
from .test_cli import tiny_flags


@pytest.fixture
def files(tmp_path, tiny_corpus):
    """A folder of broken inputs, made fresh for each case."""
    f = {}
    f["missing"] = tmp_path / "nope.txt"
    f["dir"] = tmp_path / "adir"
    f["dir"].mkdir()
    f["latin1"] = tmp_path / "latin1.txt"
    f["latin1"].write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    f["short"] = tmp_path / "short.txt"
    f["short"].write_text("just a few words")
    tok = default_tokenizer_path().read_text()
    f["truncated_tok"] = tmp_path / "tok.json"
    f["truncated_tok"].write_text(tok[: len(tok) // 2])
    f["mask_len"] = tmp_path / "mask_len.safetensors"
    save_file({"dead_mask": torch.zeros(10, dtype=torch.bool), "dead_indices": torch.zeros(0, dtype=torch.long)}, str(f["mask_len"]))
    f["mask_dtype"] = tmp_path / "mask_dtype.safetensors"
    save_file({"dead_mask": torch.zeros(10000), "dead_indices": torch.zeros(0, dtype=torch.long)}, str(f["mask_dtype"]))
    f["mask_keys"] = tmp_path / "mask_keys.safetensors"
    save_file({"something": torch.zeros(10000, dtype=torch.bool)}, str(f["mask_keys"]))
    f["mask_garbage"] = tmp_path / "garbage.safetensors"
    f["mask_garbage"].write_bytes(b"\x00\x01not a safetensors file")
    f["mask_inconsistent"] = tmp_path / "mask_inc.safetensors"
    save_file({"dead_mask": torch.zeros(10000, dtype=torch.bool), "dead_indices": torch.tensor([3])}, str(f["mask_inconsistent"]))
    f["bad_json"] = tmp_path / "bad.json"
    f["bad_json"].write_text("{not json")
    f["unknown_key"] = tmp_path / "unknown.json"
    f["unknown_key"].write_text(json.dumps({"stepz": 3}))
    f["wrong_type"] = tmp_path / "wrong.json"
    f["wrong_type"].write_text(json.dumps({"lr": "fast"}))
    f["corpus"] = tiny_corpus
    return f


TRAIN_CASES = [
    # (case id, extra args, fragments the one-line error must contain)
    ("missing corpus", ["--corpus", "{missing}"], ["corpus", "not found"]),
    ("corpus is a directory", ["--corpus", "{dir}"], ["not a file"]),
    ("non-UTF-8 corpus", ["--corpus", "{latin1}"], ["not UTF-8"]),
    ("corpus shorter than a batch", ["--corpus", "{short}"], ["too short"]),
    ("missing tokenizer", ["--tokenizer", "{missing}"], ["tokenizer", "not found"]),
    ("truncated tokenizer", ["--tokenizer", "{truncated_tok}"], ["not a valid tokenizers JSON"]),
    ("vocab size differs", ["--vocab-size", "5000"], ["10000 tokens", "--vocab-size is 5000"]),
    ("mask wrong length", ["--dead-mask", "{mask_len}"], ["shape [10]", "expected [10000]"]),
    ("mask wrong dtype", ["--dead-mask", "{mask_dtype}"], ["dtype"]),
    ("mask without tensors", ["--dead-mask", "{mask_keys}"], ["no tensor named"]),
    ("mask not safetensors", ["--dead-mask", "{mask_garbage}"], ["not a safetensors file"]),
    ("mask inconsistent", ["--dead-mask", "{mask_inconsistent}"], ["dead_indices"]),
    ("missing mask", ["--dead-mask", "{missing}"], ["not found"]),
    ("zero steps", ["--steps", "0"], ["--steps", "positive"]),
    ("negative batch", ["--batch-size", "-4"], ["--batch-size", "positive"]),
    ("zero hidden", ["--hidden-dim", "0"], ["--hidden-dim"]),
    ("absurd steps", ["--steps", "100000000000"], ["--steps", "limit"]),
    ("heads do not divide", ["--num-heads", "3"], ["--num-heads 3", "does not divide"]),
    ("negative lr", ["--lr", "-1"], ["--lr"]),
    ("nan lr", ["--lr", "nan"], ["--lr"]),
    ("beta out of range", ["--beta2", "1.5"], ["--beta2"]),
    ("zero eps", ["--eps", "0"], ["--eps"]),
    ("seq len 1", ["--seq-len", "1"], ["--seq-len"]),
    ("not a number", ["--steps", "ten"], ["steps"]),
    ("unknown device", ["--device", "tpu"], ["device"]),
    ("cuda absent", ["--device", "cuda"], ["CUDA"]),
    ("bad config file", ["--config", "{bad_json}"], ["not valid"]),
    ("missing config file", ["--config", "{missing}"], ["cannot read config"]),
    ("unknown config key", ["--config", "{unknown_key}"], ["unknown config key", "stepz"]),
    ("wrong config type", ["--config", "{wrong_type}"], ["lr", "number"]),
    ("unknown codec", ["--codec", "lzma9000"], ["codec"]),
    ("zero time chunk", ["--time-chunk", "0"], ["chunk"]),
    ("zero token chunk", ["--token-chunk", "0"], ["chunk"]),
    ("negative commit interval", ["--commit-interval", "-1"], ["--commit-interval"]),
    ("nan commit interval", ["--commit-interval", "nan"], ["--commit-interval"]),
    ("unknown durability", ["--durability", "maybe"], ["durability"]),
    ("unsupported URL as out", ["--out", "ftp://host/run"], ["unsupported URL scheme"]),
]


@pytest.mark.parametrize("case,args,fragments", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(capsys, tmp_path, files, case, args, fragments):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [a.format(**files) for a in args]
    out = tmp_path / "run"
    result = run_cli(capsys, "train", *tiny_flags(files["corpus"]), "--out", out, *args)
    assert_one_line_error(result, *fragments)
    assert not (out / "trajectory.zarr").exists()  # nothing was written for a refused run


def test_train_refuses_existing_run_and_keeps_it(capsys, tmp_path, tiny_run, tiny_corpus):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", copy)
    assert_one_line_error(result, "not empty")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_resume_refuses_changed_settings(capsys, tiny_run):
    assert_one_line_error(run_cli(capsys, "train", "--resume", tiny_run, "--lr", "0.5"), "--resume", "--lr")
    assert_one_line_error(run_cli(capsys, "train", "--resume", tiny_run, "--steps", "5"), "--steps 5 is fewer",
                          "not shortened")


def test_resume_of_complete_run(capsys, tiny_run):
    assert_one_line_error(run_cli(capsys, "train", "--resume", tiny_run), "already complete")


def _not_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bogus = tmp_path / "bogus"
    (bogus / "trajectory.zarr").mkdir(parents=True)
    (bogus / "trajectory.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return {"missing": tmp_path / "missing", "empty": empty, "foreign zarr": bogus}


# What each kind of non-run is told (the path itself is in every message, so "run" alone says nothing).
NOT_A_RUN = {"missing": "run directory not found", "empty": "is not a crucible-record run (no trajectory.zarr)",
             "foreign zarr": "is not a crucible-record run (no format marker)"}


@pytest.mark.parametrize("command", ["info", "export", "resume", "verify", "analyze"])
@pytest.mark.parametrize("kind", ["missing", "empty", "foreign zarr"])
def test_commands_refuse_non_runs(capsys, tmp_path, command, kind):
    path = _not_runs(tmp_path)[kind]
    args = ["train", "--resume", path] if command == "resume" else [command, path]
    assert_one_line_error(run_cli(capsys, *args), NOT_A_RUN[kind])


def test_newer_format_is_refused(capsys, tmp_path, tiny_run):
    copy = tmp_path / "newer"
    shutil.copytree(tiny_run, copy)
    meta_path = copy / "trajectory.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    for args in (["info", copy], ["export", copy], ["train", "--resume", copy], ["verify", copy], ["analyze", copy]):
        assert_one_line_error(run_cli(capsys, *args), "newer")


def test_export_out_is_a_file(capsys, tmp_path, tiny_run):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert_one_line_error(run_cli(capsys, "export", tiny_run, "--out", target), "not a directory")
    assert target.read_text() == "keep me"


DEAD_MASK_CASES = [
    ("missing corpus", ["--corpus", "{missing}"], ["not found"]),
    ("non-UTF-8 corpus", ["--corpus", "{latin1}"], ["UTF-8"]),
    ("truncated tokenizer", ["--tokenizer", "{truncated_tok}"], ["tokenizers JSON"]),
    ("vocab differs", ["--vocab-size", "77"], ["--vocab-size is 77"]),
    ("zero vocab", ["--vocab-size", "0"], ["positive"]),
    ("out in missing folder", ["--out", "{missing}/x/y.safetensors"], ["cannot write"]),
]


@pytest.mark.parametrize("case,args,fragments", DEAD_MASK_CASES, ids=[c[0] for c in DEAD_MASK_CASES])
def test_dead_mask_bad_input(capsys, tmp_path, files, case, args, fragments):
    args = [a.format(**files) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "m.safetensors")]
    assert_one_line_error(run_cli(capsys, "dead-mask", *args), *fragments)


def test_unknown_command_and_option(capsys):
    assert_one_line_error(run_cli(capsys, "trian"), "no such command")
    assert_one_line_error(run_cli(capsys, "train", "--stepz", "3"), "no such option")


def test_the_store_itself_is_refused_with_its_parent_named(capsys, tiny_run):
    """`verify RUN/trajectory.zarr`: the store inside a run was given; say which directory to pass."""
    for command in ("verify", "info"):
        assert_one_line_error(run_cli(capsys, command, tiny_run / "trajectory.zarr"),
                              "is the store inside a run: pass the run directory, " + str(tiny_run))
