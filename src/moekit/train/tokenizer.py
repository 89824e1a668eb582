"""Byte-level BPE trained locally with HF ``tokenizers`` and cached on disk.

Byte-level means every string round-trips exactly (no unknown tokens). The cache key is the corpus
fingerprint plus the vocabulary size, so the same corpus never trains twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.errors import CheckpointError, UsageError

DOC_SEPARATOR = "<|endoftext|>"
FILE_NAME = "tokenizer.json"  # a tokenizer's name in run folders and model folders


def cache_dir() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.token_to_id(DOC_SEPARATOR)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """All documents as one stream, each followed by the separator token. ``progress``: a bar over the
        characters (documents are encoded in chunks; every document is encoded on its own either way)."""
        ids: list[int] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(map(len, texts)), desc="tokenising", unit="char", unit_scale=True, leave=False)
        chunk = 64
        for i in range(0, len(texts), chunk):
            for enc in self.hf.encode_batch(texts[i:i + chunk]):
                ids.extend(enc.ids)
                ids.append(self.eos_id)
            if bar is not None:
                bar.update(sum(map(len, texts[i:i + chunk])))
        if bar is not None:
            bar.close()
        return torch.tensor(ids, dtype=torch.long)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path, eos_id: int | None = None) -> Tokenizer:
        """CheckpointError naming ``path`` if it is missing, damaged or not a moekit tokenizer. ``eos_id``: the
        token that separates documents, for an HF model's tokenizer (default: moekit's separator)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for any unreadable file
            raise CheckpointError(f"{path}: not a readable tokenizer file, damaged or not a tokenizer.json "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if eos_id is None and hf.token_to_id(DOC_SEPARATOR) is None:
            raise CheckpointError(f"{path}: has no {DOC_SEPARATOR} token (not a tokenizer moekit trained)")
        tok = cls(hf)
        tok.eos_id = tok.eos_id if eos_id is None else eos_id
        return tok


def train_bpe(texts: list[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UsageError(f"--vocab-size / vocab_size={vocab_size}: must be >= 300 (256 byte tokens + merges + specials)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DOC_SEPARATOR],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def get_tokenizer(texts: list[str], vocab_size: int, fingerprint: str, progress: bool = False) -> Tokenizer:
    """Load the cached tokenizer for (fingerprint, vocab_size) or train and cache it (atomic write)."""
    path = cache_dir() / "tokenizers" / f"bpe-{fingerprint}-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.load(path)
    tok = train_bpe(texts, vocab_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok
