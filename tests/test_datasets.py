"""Tests of lib/datasets.py's encode_file (bpe.py encode): the .npy holds the ids encode gives (plain or fast
tokenizer, 1 or 2 workers, many pieces), uint16 or uint32 by vocab size, no leftover files; bad inputs are errors that
name the problem and leave nothing behind. Its write faults, and `prepare`, are tested in test_faults_bpe.py and
test_bpe_cli.py.

Run: python -m pytest tests/test_datasets.py (~3 s on 2 cores). This file has no slow tests.
"""
import random

import numpy as np
import pytest

import bpe
from lib import datasets, fast_bpe
from test_bpe import EOT, random_text, trained, write  # noqa: F401 (fixture)


def test_encode_file_matches_encode(tmp_path, trained, monkeypatch):
    vocab, merges = trained
    plain = bpe.Tokenizer(vocab, merges, [EOT])
    text = random_text(random.Random(4), 5000, alphabet="abcdefé", specials=[EOT])
    src = write(tmp_path, text)
    monkeypatch.setattr(fast_bpe, "PIECE_BYTES", 1000)
    for fast, workers in ((True, 1), (True, 2), (False, 2)):
        out = tmp_path / f"out{workers}{fast}.npy"
        n = datasets.encode_file(bpe.Tokenizer(vocab, merges, [EOT], fast=fast), src, out, num_workers=workers)
        arr = np.load(out, mmap_mode="r")
        assert arr.dtype == np.uint16 and n == len(arr)
        assert arr.tolist() == plain.encode(text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out1True.npy", "out2False.npy", "out2True.npy"]


def test_encode_file_uint32_for_big_vocab(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {i: b"tok%d" % i for i in range(256, 70_000)}
    tok = bpe.Tokenizer(vocab, [])
    datasets.encode_file(tok, write(tmp_path, "hi there"), tmp_path / "o.npy")
    arr = np.load(tmp_path / "o.npy")
    assert arr.dtype == np.uint32 and tok.decode(arr.tolist()) == "hi there"


def test_encode_file_bad_inputs(tmp_path, trained):
    tok = bpe.Tokenizer(*trained)
    with pytest.raises(FileNotFoundError, match="output directory"):
        datasets.encode_file(tok, write(tmp_path, "abc"), tmp_path / "no" / "o.npy")
    with pytest.raises(ValueError, match="empty"):
        datasets.encode_file(tok, write(tmp_path, "", "e.txt"), tmp_path / "o.npy")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="not valid UTF-8 at byte 3"):
        datasets.encode_file(tok, bad, tmp_path / "o.npy")
    assert not any(p.name.startswith("o.npy") for p in tmp_path.iterdir())
