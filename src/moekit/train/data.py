"""Text corpora -> token streams -> deterministic batches.

Default corpus: the ``.py`` source files of the running Python's standard library (found with
``sysconfig.get_paths()["stdlib"]``), real text present on every machine with Python. Files are taken in
sorted path order up to ``max_bytes`` (8 MB by default); test suites, site-packages, idlelib and turtledemo
are skipped. User corpora are any text files and folders. Files are split into train/val by a hash of
their name and parent folder (stable across machines and runs, independent of file order); a single
file is split by position instead (its last ``val_percent`` is validation). The batch at step i depends
only on (seed, i), so a resumed run sees exactly the batches an uninterrupted run would."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.errors import UsageError

if TYPE_CHECKING:
    from moekit.train.tokenizer import Tokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".toml", ".cfg", ".html", ".c", ".h")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int = 8_000_000) -> list[Path]:
    """Sorted stdlib ``.py`` files (skipping tests and site-packages) up to ``max_bytes`` in total."""
    root = stdlib_dir()
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(p.relative_to(root).parts[:-1]):
            continue
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        files.append(p)
        total += size
    return files


def collect_files(paths: list[str | Path], max_bytes: int | None = None) -> list[Path]:
    """User text files and folders (recursively, text suffixes only), sorted; clear error if missing."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise UsageError(f"data path {str(raw)!r} does not exist (expected a text file or a folder)")
        if p.is_file():
            out.append(p)
        else:
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES))
    if not out:
        raise UsageError(f"data paths {[str(p) for p in paths]} contain no text files "
                         f"(looked for suffixes {list(TEXT_SUFFIXES)})")
    if max_bytes is not None:
        kept, total = [], 0
        for f in out:
            total += f.stat().st_size
            if total > max_bytes and kept:
                break
            kept.append(f)
        out = kept
    return out


def _split_hash(path: Path) -> int:
    """Hash of the file name and its parent folder: the same on every machine, independent of file order."""
    return int(hashlib.sha1("/".join(path.parts[-2:]).encode()).hexdigest(), 16) % 10_000


def is_val_file(path: Path, val_percent: float) -> bool:
    return _split_hash(path) < val_percent * 100


def split_files(files: list[Path], val_percent: float = 5.0) -> tuple[list[Path], list[Path]]:
    """Deterministic train/val split of >= 2 files by file hash (no seed, no dependence on order)."""
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent={val_percent}: must be in (0, 100)")
    if len(files) < 2:
        raise ValueError(f"need at least 2 files to split into train/val by file, got {len(files)}")
    val = {f for f in files if is_val_file(f, val_percent)}
    # tiny corpora: keep at least one file on each side, chosen by hash so the split stays order-independent
    if not val:
        val = {min(files, key=_split_hash)}
    elif len(val) == len(files):
        val.remove(max(files, key=_split_hash))
    return [f for f in files if f not in val], [f for f in files if f in val]


def split_text(text: str, val_percent: float) -> tuple[str, str]:
    """One document: hold out its last ``val_percent`` as validation, cut at a line break when there is one."""
    cut = int(len(text) * (1 - val_percent / 100))
    line_break = text.rfind("\n", 0, cut)
    cut = line_break + 1 if line_break > 0 else cut
    if cut <= 0 or cut >= len(text):
        raise UsageError(f"the single data file is too short ({len(text)} characters) to split into train/val")
    return text[:cut], text[cut:]


# a text file that is not UTF-8 (Latin-1 accents, a stray byte) decodes with a few replacement characters;
# beyond this share of its characters the file is binary or in another encoding, and training on it is noise
MAX_UNDECODABLE = 0.01


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (undecodable bytes replaced); a binary file is a UsageError naming it."""
    raw = path.read_bytes()
    if b"\x00" in raw:  # NUL never occurs in text; executables, archives, tensors and UTF-16 all have it
        raise UsageError(f"data file {str(path)!r} is binary (it contains NUL bytes), not text; give text files")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # replacements made, not ones in the file
    if bad > MAX_UNDECODABLE * max(len(text), 1):
        raise UsageError(f"data file {str(path)!r} is not UTF-8 text ({bad / len(text):.0%} of its characters do "
                         f"not decode); convert it to UTF-8 or leave it out")
    return text


def read_texts(files: list[Path]) -> list[str]:
    return [read_text(f) for f in files]


def corpus_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class TokenStream:
    """One split's tokens as a flat 1-D LongTensor; documents joined by the tokenizer's separator."""

    tokens: Tensor

    def __len__(self) -> int:
        return self.tokens.numel()

    def batch(self, index: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets [B, S], random windows fixed by (seed, index)."""
        n = self.tokens.numel() - seq_len - 1
        if n <= 0:
            raise UsageError(f"corpus split has {self.tokens.numel()} tokens, fewer than seq_len+1={seq_len + 1}")
        g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
        starts = torch.randint(0, n + 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        chunk = self.tokens[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def eval_batches(self, num_batches: int, batch_size: int, seq_len: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed set of validation batches (seed -1 stream), the same for every model and step."""
        return [self.batch(i, batch_size, seq_len, seed=-1) for i in range(num_batches)]


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream
    train_files: list[Path]
    val_files: list[Path]
    description: str

    def check_seq_len(self, seq_len: int) -> None:
        """Every batch is seq_len + 1 consecutive tokens of one split: both splits must be longer."""
        for name, stream in (("training", self.train), ("validation", self.val)):
            if len(stream) <= seq_len:
                raise UsageError(f"--seq-len {seq_len}: the {name} split has only {len(stream):,} tokens "
                                 f"(needs > {seq_len}); use a shorter --seq-len or more --data")


def build_corpus(paths: list[str | Path] | None = None, *, vocab_size: int = 2048, max_bytes: int = 8_000_000,
                 val_percent: float = 5.0, tokenizer: Tokenizer | None = None, progress: bool = False) -> Corpus:
    """Files -> split -> BPE tokenizer (trained on the train split, cached) -> token streams (cached).
    ``tokenizer``: encode with this one instead (e.g. a checkpoint's); its token streams are not cached.
    ``progress``: progress bars while the tokenizer trains and the texts are encoded (seconds to minutes)."""
    from moekit.train.tokenizer import cache_dir, get_tokenizer

    files = default_corpus_files(max_bytes) if not paths else collect_files(paths, max_bytes)
    if len(files) == 1:  # a single user file (a book, a log): split it by position instead of by file
        train_files = val_files = files
        head, tail = split_text(read_texts(files)[0], val_percent)
        train_texts, val_texts = [head], [tail]
    else:
        train_files, val_files = split_files(files, val_percent)
        train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    if tokenizer is not None:
        tok, token_cache = tokenizer, None
    else:
        fp = corpus_fingerprint(files)
        token_cache = cache_dir() / "tokens" / f"{fp}-{vocab_size}-{val_percent}.pt"
        tok_key = corpus_fingerprint(train_files) + (f"-head{val_percent}" if len(files) == 1 else "")
        tok = get_tokenizer(train_texts, vocab_size, tok_key, progress)
    if token_cache is not None and token_cache.is_file():
        cached = torch.load(token_cache, weights_only=True)  # tensors only: loading cannot run code
        train, val = cached["train"], cached["val"]
    else:
        train, val = tok.encode_documents(train_texts, progress), tok.encode_documents(val_texts, progress)
        if token_cache is not None:
            token_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = token_cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"train": train, "val": val}, tmp)
            os.replace(tmp, token_cache)
    where = "Python standard library source (" + str(stdlib_dir()) + ")" if not paths else ", ".join(map(str, paths))
    split = ("1 file split by position" if len(files) == 1
             else f"{len(train_files)} train / {len(val_files)} val files")
    desc = (f"{where}: {split}, "
            f"{train.numel():,} / {val.numel():,} tokens, BPE vocab {tok.vocab_size}")
    return Corpus(tok, TokenStream(train), TokenStream(val), train_files, val_files, desc)
