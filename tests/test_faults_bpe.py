"""Faults while bpe.py and lib/datasets.py write their files: a write that fails part-way, on a full disk (ENOSPC) or a failing one (EIO),
never leaves a torn file or a temporary behind, and never costs the file that was there before.

- The .npy of datasets.encode_file is written in one pass (header with a placeholder length, the ids, the header again) and
  is byte for byte what np.save writes, uint16 and uint32, with 1 or 2 workers; np.load(mmap_mode="r") maps it.
- encode_file and `bpe.py encode` with a write failing after N bytes (cli.open_for_write replaced by the fail_writes
  fixture below): one line `bpe.py: error: cannot write OUT.npy: CAUSE`, exit code 1 (cli.EXIT_ENVIRONMENT), no *.tmp,
  the previous .npy untouched and loadable; a bad or vanished input still says so and exits with 2.
- The tokenizer files (save_tokenizer, Tokenizer.save_dir, `bpe.py train`): all three are replaced or none,
  whichever of them fails.
- A real tmpfs (root on Linux only, skipped elsewhere): a .npy that does not fit in 2 MiB.
The download's .part (kept on a write fault, resumed after) is tested in test_bpe_cli.py, beside its HTTP server,
with the shared fault helpers of conftest.py.

Run: python -m pytest tests/test_faults_bpe.py (~3 s on 2 cores). This file has no slow tests; `python -m pytest -m
slow` runs the project's slow end-to-end checks, which the default run skips.
"""
import errno
import io
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

import bpe
from lib import cli, datasets, fast_bpe

EOT = "<|endoftext|>"
FAULTS = [(errno.ENOSPC, "no space left on device"), (errno.EIO, "input/output error")]


def debris(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


def run_main(argv, capsys):
    rc = bpe.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_error_line(err: str, expected: str):
    """The error is the last line of stderr, on its own (after any progress line), and there is only one."""
    lines = err.strip().splitlines()
    assert lines[-1] == f"bpe.py: error: {expected}", err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A tokenizer directory (vocab 300, <|endoftext|>) trained on a small corpus."""
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "über", "日本", "it's", "ran"]
    (d / "corpus.txt").write_text(EOT.join(" ".join(rng.choice(words) for _ in range(30)) + ".\n" for _ in range(40)),
                                  encoding="utf-8")
    bpe.Tokenizer(*bpe.train_bpe(d / "corpus.txt", 300, [EOT], fast=True, num_workers=1), [EOT]).save_dir(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> bpe.Tokenizer:
    return bpe.Tokenizer.from_dir(tok_dir, fast=True)  # as `bpe.py encode` loads it


def text_of(n_lines: int, seed=1) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "über", "日本", "it's", "dog", "42"]
    return "".join(" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".\n", f".{EOT}"])
                   for _ in range(n_lines))


@pytest.fixture
def src(tmp_path, monkeypatch):
    """A ~25 kB text cut into 1 kB pieces, so the ids go out in many writes."""
    monkeypatch.setattr(fast_bpe, "PIECE_BYTES", 1000)
    path = tmp_path / "in.txt"
    path.write_text(text_of(400), encoding="utf-8")
    return path


@pytest.fixture
def old_npy(tmp_path):
    """A .npy already at the output path: what a failed write must leave alone."""
    path = tmp_path / "out.npy"
    np.save(path, np.array([7, 8, 9], dtype=np.uint16))
    return path


def assert_old_npy_intact(path):
    assert np.load(path, mmap_mode="r").tolist() == [7, 8, 9]
    assert debris(path.parent) == []


# ---------------------------------------------------------------------------------------------------------------------
# the one-pass .npy writer
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("big_vocab", [False, True], ids=["uint16", "uint32"])
def test_one_pass_npy_equals_np_save(tmp_path, tok, src, workers, big_vocab):
    if big_vocab:  # 70,000 tokens: ids need uint32
        tok = bpe.Tokenizer(tok.vocab | {i: b"tok%d" % i for i in range(len(tok.vocab), 70_000)}, tok.merges, [EOT],
                            fast=True)
    dtype = np.uint32 if big_vocab else np.uint16
    out = tmp_path / "out.npy"
    n = datasets.encode_file(tok, src, out, num_workers=workers)
    expected = io.BytesIO()
    np.save(expected, np.array(tok.encode(src.read_text(encoding="utf-8")), dtype=dtype))
    assert out.read_bytes() == expected.getvalue()  # header and ids, byte for byte
    arr = np.load(out, mmap_mode="r")
    assert arr.dtype == dtype and len(arr) == n > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]


def test_npy_header_length_does_not_depend_on_the_length():
    for dtype in (np.uint16, np.uint32):
        lengths = {len(datasets._npy_header(dtype, n)) for n in (0, 7, 10**9, datasets.MAX_TOKENS)}
        assert lengths == {128}  # a multiple of 64, as the format asks


# ---------------------------------------------------------------------------------------------------------------------
# a write of the .npy fails part-way
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("err, cause", FAULTS)
def test_encode_file_write_fault(tok, src, old_npy, fail_writes, err, cause, workers):
    broken = fail_writes(err, after_bytes=5_000, name_contains="out.npy")
    with pytest.raises(cli.WriteFault, match=f"^cannot write {re.escape(str(old_npy))}: {cause}$"):
        datasets.encode_file(tok, src, old_npy, num_workers=workers)
    assert broken == [old_npy.with_name("out.npy.tmp")]  # one file written: the .npy, not a raw copy first
    assert_old_npy_intact(old_npy)


@pytest.mark.parametrize("err, cause", FAULTS)
def test_encode_cli_write_fault(tok_dir, src, old_npy, fail_writes, capsys, err, cause):
    fail_writes(err, after_bytes=5_000, name_contains="out.npy")
    rc, stderr = run_main(["encode", "--tokenizer", tok_dir, "--input", src, "--output", old_npy, "--workers", 1],
                          capsys)
    assert rc == cli.EXIT_ENVIRONMENT == 1
    assert "\rencoded" in stderr  # the fault came after some ids went out, with a progress line open
    assert_one_error_line(stderr, f"cannot write {old_npy}: {cause}")
    assert_old_npy_intact(old_npy)


def test_encode_output_dir_vanishes(tok, src, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_open = cli.open_for_write

    def remove_dir_then_open(path):  # the directory passed the check at the start, then went away
        out_dir.rmdir()
        return real_open(path)

    monkeypatch.setattr(cli, "open_for_write", remove_dir_then_open)
    with pytest.raises(cli.WriteFault, match="cannot write .*out.npy: no such file or directory"):
        datasets.encode_file(tok, src, out_dir / "out.npy", num_workers=1)


def test_input_faults_are_still_bad_input(tok, tok_dir, src, old_npy, capsys, monkeypatch):
    """A bad byte in a late piece, read while the output is open, is the input's fault (exit code 2), not a write
    fault; so is an input that vanishes half way."""
    data = src.read_bytes()
    bad = data.index(b" ", 20_000) + 1  # after an ASCII byte, so the error is at this byte
    src.write_bytes(data[:bad] + b"\xff" + data[bad:])
    rc, stderr = run_main(["encode", "--tokenizer", tok_dir, "--input", src, "--output", old_npy, "--workers", 2],
                          capsys)
    assert rc == cli.EXIT_BAD_INPUT == 2
    assert_one_error_line(stderr, f"{src} is not valid UTF-8 at byte {bad} (invalid start byte); re-save it as UTF-8")
    assert_old_npy_intact(old_npy)

    src.write_bytes(data)
    real_bounds = fast_bpe.find_piece_boundaries

    def bounds_then_delete(path, *args):
        bounds = real_bounds(path, *args)
        Path(path).unlink()
        return bounds

    monkeypatch.setattr(fast_bpe, "find_piece_boundaries", bounds_then_delete)
    with pytest.raises(cli.BadInputError, match=f"cannot read {re.escape(str(src))}: no such file or directory"):
        datasets.encode_file(tok, src, old_npy, num_workers=1)
    assert_old_npy_intact(old_npy)


def test_corrupt_gzip_is_bad_input_not_a_write_fault(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(cli.BadInputError, match="x.gz is not a complete gzip file"):
        datasets.gunzip(tmp_path / "x.gz", tmp_path / "x.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gz"]


# ---------------------------------------------------------------------------------------------------------------------
# a write of the tokenizer files fails part-way
# ---------------------------------------------------------------------------------------------------------------------

def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "special_tokens.json"])
@pytest.mark.parametrize("err, cause", FAULTS)
def test_save_dir_write_fault_keeps_the_old_tokenizer(tmp_path, tok, fail_writes, name, err, cause):
    # an older tokenizer: the first 10 merges, no special tokens, so each of the three files differs from tok's
    old = bpe.Tokenizer({i: tok.vocab[i] for i in range(266)}, tok.merges[:10])
    old.save_dir(tmp_path)
    before = snapshot(tmp_path)
    fail_writes(err, after_bytes=10, name_contains=name)
    with pytest.raises(cli.WriteFault, match=f"^cannot write {re.escape(str(tmp_path / name))}: {cause}$"):
        tok.save_dir(tmp_path)
    assert snapshot(tmp_path) == before  # none of the three replaced, not even the ones written before the fault
    again = bpe.Tokenizer.from_dir(tmp_path)
    assert (again.vocab, again.merges, again.special_tokens) == (old.vocab, old.merges, [])


def test_save_dir_fault_at_fsync_keeps_the_old_tokenizer(tmp_path, tok, monkeypatch):
    """A fault that shows only when the data goes to disk (an I/O error at fsync; a full disk at the flush of a small
    buffered file): the third file's, after the first two are complete. Still none of the three is replaced."""
    bpe.Tokenizer({i: tok.vocab[i] for i in range(266)}, tok.merges[:10]).save_dir(tmp_path)
    before = snapshot(tmp_path)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(cli.WriteFault, match="special_tokens.json: input/output error"):
        tok.save_dir(tmp_path)
    assert snapshot(tmp_path) == before


def test_save_tokenizer_write_fault(tmp_path, tok, fail_writes):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    bpe.save_tokenizer(tok.vocab, tok.merges[:5], v, m)
    before = snapshot(tmp_path)
    fail_writes(errno.ENOSPC, after_bytes=100, name_contains="merges")
    with pytest.raises(cli.WriteFault, match="merges.txt: no space left on device"):
        bpe.save_tokenizer(tok.vocab, tok.merges, v, m)
    assert snapshot(tmp_path) == before
    assert bpe.load_tokenizer_files(v, m) == (tok.vocab, tok.merges[:5])


def test_train_cli_write_fault(tmp_path, src, fail_writes, capsys):
    out = tmp_path / "tok"
    fail_writes(errno.ENOSPC, after_bytes=0, name_contains="merges")
    rc, stderr = run_main(["train", "--input", src, "--vocab-size", 280, "--out", out, "--workers", 1], capsys)
    assert rc == 1
    assert_one_error_line(stderr, f"cannot write {out / 'merges.txt'}: no space left on device")
    assert not out.exists()  # the directory the failed command made is gone too (it was left empty before)


# ---------------------------------------------------------------------------------------------------------------------
# a real full disk
# ---------------------------------------------------------------------------------------------------------------------

def test_encode_to_a_full_tmpfs(tmp_path, tmpfs, capsys):
    """One token per byte, 1.2 MB of text: a 2.4 MB .npy, which a 2 MiB tmpfs cannot hold."""
    small = tmpfs("2m")
    out = small / "out.npy"
    np.save(out, np.array([7, 8, 9], dtype=np.uint16))
    bytes_only = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT])
    (tmp_path / "tok").mkdir()
    bytes_only.save_dir(tmp_path / "tok")
    src = tmp_path / "in.txt"
    src.write_text(text_of(20_000), encoding="utf-8")
    assert src.stat().st_size > 1_100_000
    free_before = os.statvfs(small).f_bfree
    rc, stderr = run_main(["encode", "--tokenizer", tmp_path / "tok", "--input", src, "--output", out,
                           "--workers", 1], capsys)
    assert rc == 1
    assert_one_error_line(stderr, f"cannot write {out}: no space left on device")
    assert_old_npy_intact(out)
    assert os.statvfs(small).f_bfree == free_before  # the space the failed write took is free again
