"""Corpus + tokenizer -> token ids, and the live/dead token masks (loaded or derived)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import CrucibleError


def default_corpus_path() -> Path:
    return Path(str(resources.files("crucible_record.crucible3") / "data" / "corpus.txt"))


def default_tokenizer_path() -> Path:
    return Path(str(resources.files("crucible_record.crucible3") / "data" / "tokenizer.json"))


def load_tokenizer(path: str | Path, vocab_size: int):
    """Load a `tokenizers` JSON file and check it has the configured vocabulary size."""
    from tokenizers import Tokenizer

    path = Path(path)
    _check_readable(path, "tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception with a long message
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CrucibleError(f"tokenizer {path} is not a valid tokenizers JSON file: {first_line}") from None
    size = tokenizer.get_vocab_size()
    if size != vocab_size:
        raise CrucibleError(f"tokenizer {path} has {size} tokens but --vocab-size is {vocab_size}")
    return tokenizer


def tokenize_corpus(corpus_path: str | Path, tokenizer) -> list[int]:
    """Token ids of the whole corpus, encoded in one call as the notebook does."""
    path = Path(corpus_path)
    _check_readable(path, "corpus")
    try:
        return tokenizer.encode(path.read_text(encoding="utf-8")).ids
    except UnicodeDecodeError as e:
        raise CrucibleError(f"corpus {path} is not UTF-8 text (byte {e.start})") from None


class TextDataset(Dataset):
    """The notebook's dataset: consecutive, non-overlapping windows of seq_len tokens."""

    def __init__(self, tokens: list[int], seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_sequences = len(tokens) // seq_len

    def __len__(self) -> int:
        return self.n_sequences

    def __getitem__(self, idx: int) -> torch.Tensor:
        start = idx * self.seq_len
        return torch.tensor(self.tokens[start:start + self.seq_len], dtype=torch.long)


@dataclass(frozen=True)
class TokenMasks:
    dead_mask: torch.Tensor  # (vocab,) bool
    dead_indices: torch.Tensor  # (n_dead,) int64

    def constants(self) -> dict[str, tuple[torch.Tensor, tuple[str]]]:
        """The masks as a run's constants (cr.record's `constants`), with their dimension names."""
        return {"dead_mask": (self.dead_mask, ("token",)), "dead_indices": (self.dead_indices, ("dead_token",))}


def derive_dead_mask(tokens: list[int], vocab_size: int) -> TokenMasks:
    """Dead tokens are those that never occur in the tokenized corpus."""
    counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=vocab_size)
    dead_mask = counts[:vocab_size] == 0
    return TokenMasks(dead_mask, torch.nonzero(dead_mask).flatten().long())


def load_dead_mask(path: str | Path, vocab_size: int) -> TokenMasks:
    """Load the notebook's mask file and check it against the vocabulary."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_readable(path, "dead mask")
    try:
        masks = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CrucibleError(f"dead mask {path} is not a safetensors file: {e}") from None
    missing = [key for key in ("dead_mask", "dead_indices") if key not in masks]
    if missing:
        raise CrucibleError(f"dead mask {path} has no tensor named {', '.join(missing)}")
    mask, indices = masks["dead_mask"], masks["dead_indices"]
    if mask.dim() != 1 or mask.numel() != vocab_size:
        raise CrucibleError(f"dead mask {path}: dead_mask has shape {list(mask.shape)}, expected [{vocab_size}]")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise CrucibleError(f"dead mask {path}: dead_mask has dtype {mask.dtype}, expected bool")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise CrucibleError(f"dead mask {path}: dead_mask holds values other than 0 and 1")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dim() != 1:
        raise CrucibleError(
            f"dead mask {path}: dead_indices must be a 1-D integer tensor, got {indices.dtype} {list(indices.shape)}"
        )
    dead_mask = mask.bool()
    dead_indices = indices.long()
    if not torch.equal(dead_indices, torch.nonzero(dead_mask).flatten()):
        raise CrucibleError(f"dead mask {path}: dead_indices does not list the tokens set in dead_mask")
    return TokenMasks(dead_mask, dead_indices)


def save_dead_mask(masks: TokenMasks, path: str | Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise CrucibleError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        save_file({"dead_mask": masks.dead_mask, "dead_indices": masks.dead_indices}, str(path))
    except (SafetensorError, OSError) as e:
        raise CrucibleError(f"cannot write {path}: {e}") from None


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CrucibleError(f"{what} file not found: {path}")
    if not path.is_file():
        raise CrucibleError(f"{what} path is not a file: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CrucibleError(f"cannot read {what} file {path}: {e.strerror or e}") from None
