"""The exported safetensors must be byte-identical to what the notebook itself writes (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from crucible_record.crucible3.data import derive_dead_mask, load_tokenizer, save_dead_mask, tokenize_corpus
from crucible_record.crucible3.export import export_safetensors
from crucible_record.crucible3.run import start_run
from crucible_record.codecs import Layout
from crucible_record.crucible3 import open_trajectory

from .conftest import TINY
from .notebook_reference import run_notebook


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory, tiny_corpus, tokenizer_path):
    tokens = tokenize_corpus(tiny_corpus, load_tokenizer(tokenizer_path, 10000))
    path = tmp_path_factory.mktemp("mask") / "live_dead_tokens.safetensors"
    save_dead_mask(derive_dead_mask(tokens, 10000), path)
    return path


@pytest.fixture(scope="module")
def notebook_file(tmp_path_factory, tiny_corpus, tokenizer_path, mask_file):
    out = tmp_path_factory.mktemp("notebook")
    run_notebook(
        corpus_path=tiny_corpus, tokenizer_path=tokenizer_path, dead_mask_path=mask_file, output_dir=out,
        TOTAL_STEPS=TINY["steps"], BATCH_SIZE=TINY["batch_size"], SEQ_LEN=TINY["seq_len"],
        HIDDEN_DIM=TINY["hidden_dim"], NUM_LAYERS=TINY["num_layers"], NUM_HEADS=TINY["num_heads"],
    )
    return out


@pytest.mark.parametrize("codec", ["default", "max"])
def test_export_is_byte_identical_to_notebook(tmp_path, tiny_config, mask_file, notebook_file, codec):
    config = tiny_config.replace(dead_mask=str(mask_file))
    # a time chunk that does not divide the steps: the last chunk is partial
    start_run(config, tmp_path / "run", layout=Layout(time_chunk=7, row_chunk=3000, codec=codec), progress=False)
    traj = open_trajectory(tmp_path / "run")
    ours, meta = export_safetensors(traj, tmp_path / "export")

    reference = notebook_file / "crucible_3_trajectory.safetensors"
    ref_tensors, our_tensors = load_file(str(reference)), load_file(str(ours))
    assert list(our_tensors) == list(ref_tensors)
    for name in ref_tensors:
        assert our_tensors[name].dtype == ref_tensors[name].dtype, name
        assert torch.equal(our_tensors[name].view(torch.uint8), ref_tensors[name].view(torch.uint8)), name
    assert ours.read_bytes() == reference.read_bytes()

    ref_meta = json.loads((notebook_file / "metadata.json").read_text())
    our_meta = json.loads(meta.read_text())
    assert list(our_meta) == list(ref_meta)
    differ = {k for k in ref_meta if our_meta[k] != ref_meta[k]}
    assert differ == {"date"}  # the notebook hard-codes its date; ours is the run's
    assert our_meta["total_epochs"] == 3  # two reshuffles happened


def test_derived_mask_equals_mask_file(tmp_path, tiny_run, mask_file):
    """Without --dead-mask the run derives the same mask the mask file holds."""
    traj = open_trajectory(tiny_run)
    masks = load_file(str(mask_file))
    assert torch.equal(traj.dead_mask, masks["dead_mask"])
    assert torch.equal(traj.dead_indices, masks["dead_indices"])


def test_tiny_run_matches_notebook_without_mask_file(tiny_run, notebook_file):
    traj = open_trajectory(tiny_run)
    ref = load_file(str(notebook_file / "crucible_3_trajectory.safetensors"))
    assert torch.equal(traj.W[:].view(torch.uint16), ref["W"])
    assert torch.equal(traj.h_mean, ref["h_mean"])
    assert torch.equal(traj.loss.view(torch.int32), ref["loss"].view(torch.int32))
