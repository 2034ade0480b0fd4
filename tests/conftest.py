"""Shared fixtures: a tiny corpus cut from the shipped one and a tiny config, so runs take seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from crucible_record.crucible3.config import RunConfig
from crucible_record.crucible3.data import default_corpus_path, default_tokenizer_path

TINY = dict(steps=25, batch_size=4, seq_len=16, hidden_dim=16, num_layers=1, num_heads=2)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """About 700 tokens: 10 batches of 4x16 per epoch, so 25 steps cross two epoch boundaries."""
    text = default_corpus_path().read_text(encoding="utf-8")[:3000]
    path = tmp_path_factory.mktemp("data") / "tiny_corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return default_tokenizer_path()


@pytest.fixture(scope="session")
def tiny_config(tiny_corpus) -> RunConfig:
    return RunConfig(**TINY, corpus=str(tiny_corpus), device="cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config) -> Path:
    """One recorded tiny run, shared by the read-only tests."""
    from crucible_record.crucible3.run import start_run
    from crucible_record.codecs import Layout

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    start_run(tiny_config, run_dir, layout=Layout(time_chunk=8, row_chunk=1000), progress=False)
    return run_dir
