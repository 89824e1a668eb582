import itertools

import pytest

from moekit.train.data import _split_hash, build_corpus, split_files, split_text


def test_tiny_split_keeps_a_file_on_each_side_independent_of_order(tmp_path):
    files = [tmp_path / f"f{i}.txt" for i in range(3)]
    # 1% rarely selects any of 3 files, 99% nearly always selects all: both fallbacks get exercised
    for pct in (1.0, 99.0):
        splits = {tuple(map(tuple, split_files(list(order), pct))) for order in itertools.permutations(files)}
        (train, val), = {(frozenset(t), frozenset(v)) for t, v in splits}  # the same split for every order
        assert train and val and not train & val and train | val == set(files)
    # the fallback picks by hash: the lowest-hash file is the held-out one when nothing falls under 1%
    if all(_split_hash(f) >= 100 for f in files):
        assert split_files(files, 1.0)[1] == [min(files, key=_split_hash)]
    with pytest.raises(ValueError, match="at least 2 files"):
        split_files(files[:1], 5.0)
    with pytest.raises(ValueError, match="val_percent=0"):
        split_files(files, 0)


def test_split_text_cuts_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_text(text, 10.0)
    assert head + tail == text and head.endswith("\n")
    assert 0.85 * len(text) < len(head) <= 0.9 * len(text)
    with pytest.raises(ValueError, match="too short"):
        split_text("x", 10.0)


def test_single_user_file_is_split_by_position(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    book = tmp_path / "book.txt"
    book.write_text("".join(f"chapter {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    corpus = build_corpus([book], vocab_size=300, val_percent=10.0)
    assert "1 file split by position" in corpus.description
    head, tail = split_text(book.read_text(), 10.0)
    eos = corpus.tokenizer.eos_id
    assert corpus.tokenizer.decode([t for t in corpus.train.tokens.tolist() if t != eos]) == head
    assert corpus.tokenizer.decode([t for t in corpus.val.tokens.tolist() if t != eos]) == tail
    # the second build comes from the caches and is identical
    again = build_corpus([book], vocab_size=300, val_percent=10.0)
    assert again.train.tokens.equal(corpus.train.tokens) and again.val.tokens.equal(corpus.val.tokens)


def test_binary_or_non_utf8_files_are_refused_naming_the_file(tmp_path):
    from moekit.errors import UsageError
    from moekit.train.data import read_text

    exe = tmp_path / "renamed_executable.txt"
    exe.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(UsageError, match="renamed_executable.txt.*binary"):
        build_corpus([exe])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("".join(chr(c) for c in range(0xC0, 0x100)).encode("latin-1") * 20)
    with pytest.raises(UsageError, match="latin1.txt.*not UTF-8 text"):
        read_text(latin)
    # a UTF-8 file with one stray byte and a literal U+FFFD stays usable text
    ok = tmp_path / "ok.txt"
    ok.write_bytes("déjà vu \ufffd ".encode() * 200 + b"\xff")
    assert read_text(ok).startswith("déjà vu \ufffd")
