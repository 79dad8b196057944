"""bpe.py's bad-input table (issue 32): each row a command line (train, encode, prepare, export), what it is given,
the exit code, the whole one-line error word for word, and the files that must be absent or unchanged afterwards
(conftest.py's BadInput harness). Every row starts from a scratch directory d holding d/text.txt (a small corpus)
and d/tok (a 300-token tokenizer trained on it, <|endoftext|> special)."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import bpe
from conftest import BadInput, check_bad_input, run_cli
from lib import cli

E = "bpe.py: error: "
HELP = " (see --help)"  # the ending of argparse's own errors (OneLineParser)


def permissions_ignored() -> bool:
    """True for root (os.geteuid() == 0), unless it runs without CAP_DAC_OVERRIDE (say, under `setpriv
    --inh-caps=-dac_override,-dac_read_search --bounding-set=-dac_override,-dac_read_search`): a write into a
    read-only directory is tried, which is what the perm- rows need to fail."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            Path(d, "probe").touch()
            return True
        except PermissionError:
            return False
        finally:
            os.chmod(d, 0o755)
TOK_FILES = ("tok/vocab.json", "tok/merges.txt", "tok/special_tokens.json")
PERMISSION = "cannot be accessed: permission denied; check its permissions (ls -l) or choose another path"


@pytest.fixture(scope="module")
def made_tokenizer(tmp_path_factory) -> Path:
    """DIR/text.txt and DIR/tok, trained once for the module (milliseconds: a small corpus)."""
    d = tmp_path_factory.mktemp("bpe_table")
    text = "<|endoftext|>".join(f"once upon a time the cat {i} sat on the mat and the dog ran far" for i in range(40))
    (d / "text.txt").write_text(text, encoding="utf-8")
    vocab, merges = bpe.train_bpe(d / "text.txt", 300, ["<|endoftext|>"])
    (d / "tok").mkdir()
    bpe.Tokenizer(vocab, merges, ["<|endoftext|>"]).save_dir(d / "tok")
    return d


def edit_vocab(change):
    """A setup that applies change(vocab dict) to d/tok/vocab.json."""
    def setup(d):
        path = d / "tok" / "vocab.json"
        vocab = json.loads(path.read_text(encoding="utf-8"))
        change(vocab)
        path.write_text(json.dumps(vocab), encoding="utf-8")
    return setup


def write(name: str, data: bytes = b"", mode: int | None = None):
    """A setup that writes d/name (making its directory) and, with mode, chmods it (or its directory, for a name
    ending in /)."""
    def setup(d):
        path = d / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if mode is not None:
            path.chmod(mode)
    return setup


def remove(name: str):
    return lambda d: (d / name).unlink()


TRAIN = ["train", "--vocab-size", "300", "--workers", "1"]
ENCODE = ["encode", "--tokenizer", "{d}/tok", "--workers", "1"]
URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"

ROWS = [
    # train: the input
    BadInput("train-missing-input", [*TRAIN, "--input", "{d}/nope.txt", "--out", "{d}/out"], 2,
             E + "input file {d}/nope.txt does not exist", absent=("out",)),
    BadInput("train-input-is-a-directory", [*TRAIN, "--input", "{d}/tok", "--out", "{d}/out"], 2,
             E + "input file {d}/tok is a directory; give a text file", absent=("out",)),
    BadInput("train-empty-input", [*TRAIN, "--input", "{d}/empty.txt", "--out", "{d}/out"], 2,
             E + "input file {d}/empty.txt is empty; give a text file with some content", setup=write("empty.txt"),
             absent=("out",)),
    BadInput("train-binary-input", [*TRAIN, "--input", "{d}/x.bin", "--out", "{d}/out"], 2,
             E + "{d}/x.bin is not valid UTF-8 at byte 2 (invalid start byte); re-save it as UTF-8",
             setup=write("x.bin", b"ok\xff\xfe\x00 binary"), absent=("out",)),
    # train: the arguments
    BadInput("train-vocab-below-bytes-and-specials",
             ["train", "--vocab-size", "256", "--special-tokens", "<|endoftext|>", "--input", "{d}/text.txt",
              "--out", "{d}/out"], 2,
             E + "vocab_size 256 is smaller than 256 bytes + 1 special tokens; use at least 257", absent=("out",)),
    BadInput("train-empty-special-token", [*TRAIN, "--special-tokens", "", "--input", "{d}/text.txt", "--out",
                                           "{d}/out"], 2,
             E + "a special token is the empty string; remove it", absent=("out",)),
    BadInput("train-workers-0", ["train", "--vocab-size", "300", "--workers", "0", "--input", "{d}/text.txt",
                                 "--out", "{d}/out"], 2,
             E + "--workers must be at least 1" + HELP, absent=("out",)),
    BadInput("train-vocab-size-not-a-number", ["train", "--vocab-size", "10k", "--input", "{d}/text.txt", "--out",
                                               "{d}/out"], 2,
             "bpe.py train: error: argument --vocab-size: invalid int value: '10k'" + HELP, absent=("out",)),
    # train: the output (a file where the directory goes was an "[Errno 17] File exists" after the training)
    BadInput("train-out-is-a-file", [*TRAIN, "--input", "{d}/text.txt", "--out", "{d}/notes.txt"], 2,
             E + "--out {d}/notes.txt is a file, but the tokenizer directory goes there; give a directory (new or "
                 "existing)", setup=write("notes.txt", b"mine"), unchanged=("notes.txt",)),
    BadInput("train-out-in-a-missing-directory", [*TRAIN, "--input", "{d}/text.txt", "--out", "{d}/no/out"], 2,
             E + "output directory {d}/no does not exist; create it first", absent=("no",)),
    BadInput("train-out-under-a-file", [*TRAIN, "--input", "{d}/text.txt", "--out", "{d}/notes.txt/out"], 2,
             E + "output directory {d}/notes.txt is a file; give a path inside a directory",
             setup=write("notes.txt", b"mine"), unchanged=("notes.txt",)),

    # encode: the tokenizer directory
    BadInput("encode-tokenizer-without-merges", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/merges.txt does not exist; is {d}/tok a tokenizer directory (bpe.py train --out)?",
             setup=remove("tok/merges.txt"), absent=("ids.npy",)),
    BadInput("encode-tokenizer-missing", ["encode", "--tokenizer", "{d}/nope", "--input", "{d}/text.txt",
                                          "--output", "{d}/ids.npy"], 2,
             E + "{d}/nope/vocab.json does not exist; is {d}/nope a tokenizer directory (bpe.py train --out)?",
             absent=("ids.npy",)),
    BadInput("encode-vocab-not-json", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/vocab.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                 "column 2 (char 1)); expected {{token: id}}",
             setup=write("tok/vocab.json", b"{oops"), absent=("ids.npy",)),
    # not UTF-8: the codec's own message named no file
    BadInput("encode-vocab-not-utf8", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/vocab.json is not valid UTF-8 at byte 0 (invalid start byte); re-save it as UTF-8",
             setup=write("tok/vocab.json", b"\xff\xfe{}"), absent=("ids.npy",)),
    # an id past uint32 was a traceback (OverflowError) when the first .npy piece was written
    BadInput("encode-vocab-id-too-large", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/vocab.json must map token strings to integer ids from 0 to 2**32 - 1",
             setup=edit_vocab(lambda v: v.update({"Ġcat": 5_000_000_000})), absent=("ids.npy",)),
    # a byte missing from the vocab: the message did not say which tokenizer
    BadInput("encode-vocab-lacks-a-byte", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "tokenizer {d}/tok: vocab lacks the single byte 0x00; byte-level BPE needs all 256",
             setup=edit_vocab(lambda v: v.pop(bpe.token_to_str(b"\x00"))), absent=("ids.npy",)),
    BadInput("encode-merges-of-another-vocab", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/merges.txt line 2: 'zz' is not in {d}/tok/vocab.json; the two files do not belong together",
             setup=write("tok/merges.txt", b"#version: 0.2\nzz qq\n"), absent=("ids.npy",)),
    # an empty special token was refused without naming the file
    BadInput("encode-empty-special-token", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/special_tokens.json must be a JSON list of non-empty strings",
             setup=write("tok/special_tokens.json", b'["<|endoftext|>", ""]'), absent=("ids.npy",)),
    BadInput("encode-special-tokens-not-utf8", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 2,
             E + "{d}/tok/special_tokens.json is not valid UTF-8 at byte 2 (invalid start byte); re-save it as UTF-8",
             setup=write("tok/special_tokens.json", b'["\xff"]'), absent=("ids.npy",)),
    # encode: the input ("does not exist" for a directory, before)
    BadInput("encode-input-is-a-directory", [*ENCODE, "--input", "{d}/tok", "--output", "{d}/ids.npy"], 2,
             E + "input file {d}/tok is a directory; give a text file", absent=("ids.npy",)),
    BadInput("encode-empty-input", [*ENCODE, "--input", "{d}/empty.txt", "--output", "{d}/ids.npy"], 2,
             E + "input file {d}/empty.txt is empty", setup=write("empty.txt"), absent=("ids.npy",)),
    # encode: the output (a directory was exit 1, "cannot write: is a directory", after encoding)
    BadInput("encode-output-is-a-directory", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/tok"], 2,
             E + "--output {d}/tok is a directory, but the .npy of token ids goes there; give a file path such as "
                 "{d}/tok/ids.npy", unchanged=("tok",)),
    # the output was the input: the text was replaced by its ids
    BadInput("encode-output-is-the-input", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/text.txt"], 2,
             E + "the output {d}/text.txt is the input file; give another path for the ids (a .npy file)",
             unchanged=("text.txt",)),
    BadInput("encode-output-in-a-missing-directory", [*ENCODE, "--input", "{d}/text.txt", "--output",
                                                      "{d}/no/ids.npy"], 2,
             E + "output directory {d}/no does not exist; create it first", absent=("no",)),
    # a file as the output's directory was "output directory ... does not exist"
    BadInput("encode-output-under-a-file", [*ENCODE, "--input", "{d}/text.txt", "--output",
                                            "{d}/notes.txt/ids.npy"], 2,
             E + "output directory {d}/notes.txt is a file; give a path inside a directory",
             setup=write("notes.txt", b"mine"), unchanged=("notes.txt",)),

    # export
    BadInput("export-unknown-format", ["export", "--tokenizer", "{d}/tok", "--format", "sentencepiece", "--out",
                                       "{d}/hf"], 2,
             "bpe.py export: error: argument --format: invalid choice: 'sentencepiece' (choose from 'hf', "
             "'tiktoken')" + HELP, absent=("hf",)),
    # a file as the hf directory was "[Errno 17] File exists"
    BadInput("export-hf-out-is-a-file", ["export", "--tokenizer", "{d}/tok", "--format", "hf", "--out",
                                         "{d}/notes.txt"], 2,
             E + "--out {d}/notes.txt is a file, but the Hugging Face tokenizer directory goes there; give a "
                 "directory (new or existing)", setup=write("notes.txt", b"mine"), unchanged=("notes.txt",)),
    # a directory as the .tiktoken file was exit 1, "cannot write: is a directory"
    BadInput("export-tiktoken-out-is-a-directory", ["export", "--tokenizer", "{d}/tok", "--format", "tiktoken",
                                                    "--out", "{d}/tok"], 2,
             E + "--out {d}/tok is a directory, but the .tiktoken file goes there; give a file path such as "
                 "{d}/tok/tokenizer.tiktoken", unchanged=("tok",)),
    BadInput("export-tokenizer-without-merges", ["export", "--tokenizer", "{d}/tok", "--format", "hf", "--out",
                                                 "{d}/hf"], 2,
             E + "{d}/tok/merges.txt does not exist; is {d}/tok a tokenizer directory (bpe.py train --out)?",
             setup=remove("tok/merges.txt"), absent=("hf",)),
    # another model's tokenizer files beside ours: AutoTokenizer would add their tokens (issue 32's 303 for 300)
    BadInput("export-hf-into-another-tokenizers-directory", ["export", "--tokenizer", "{d}/tok", "--format", "hf",
                                                             "--out", "{d}/hf"], 2,
             E + "--out {d}/hf is not empty and not an earlier tokenizer export (it holds special_tokens_map.json): "
                 "pass --force to replace the tokenizer files in it and keep the rest, or a new or empty directory",
             setup=write("hf/special_tokens_map.json", b"{}"), unchanged=("hf",)),
    BadInput("export-hf-into-this-projects-tokenizer", ["export", "--tokenizer", "{d}/tok", "--format", "hf",
                                                        "--out", "{d}/tok", "--force"], 2,
             E + "--out {d}/tok is a tokenizer directory of this project (special_tokens.json), whose files the "
                 "export would delete; give a new or empty directory", unchanged=("tok",)),
    # permission faults are the machine's: exit 1 (the hf export into a read-only directory was exit 2,
    # "[Errno 13] Permission denied: ..."); these rows skip as root
    BadInput("perm-export-hf-into-read-only-directory", ["export", "--tokenizer", "{d}/tok", "--format", "hf",
                                                         "--out", "{d}/ro/hf"], 1,
             E + "{d}/ro/hf " + PERMISSION, setup=write("ro/", mode=0o555), absent=("ro/hf",)),
    BadInput("perm-export-tiktoken-into-read-only-directory", ["export", "--tokenizer", "{d}/tok", "--format",
                                                               "tiktoken", "--out", "{d}/ro/tok.tiktoken"], 1,
             E + "cannot write {d}/ro/tok.tiktoken: permission denied", setup=write("ro/", mode=0o555),
             absent=("ro/tok.tiktoken", "ro/tok.tiktoken.tmp")),
    BadInput("perm-encode-unreadable-vocab", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 1,
             E + "{d}/tok/vocab.json " + PERMISSION, setup=lambda d: (d / "tok" / "vocab.json").chmod(0),
             absent=("ids.npy",)),
    BadInput("perm-train-unreadable-input", [*TRAIN, "--input", "{d}/text.txt", "--out", "{d}/out"], 1,
             E + "{d}/text.txt " + PERMISSION, setup=lambda d: (d / "text.txt").chmod(0), absent=("out",)),
    BadInput("perm-encode-unreadable-input", [*ENCODE, "--input", "{d}/text.txt", "--output", "{d}/ids.npy"], 1,
             E + "{d}/text.txt " + PERMISSION, setup=lambda d: (d / "text.txt").chmod(0), absent=("ids.npy",)),
    BadInput("perm-train-into-read-only-directory", [*TRAIN, "--input", "{d}/text.txt", "--out", "{d}/ro/tok"], 1,
             E + "{d}/ro/tok " + PERMISSION, setup=write("ro/", mode=0o555), absent=("ro/tok",)),

    # prepare: everything that can be refused before a download starts
    BadInput("prepare-unknown-dataset", ["prepare", "wikipedia", "--out", "{d}/data"], 2,
             "bpe.py prepare: error: argument dataset: invalid choice: 'wikipedia' (choose from 'owt', "
             "'tinystories')" + HELP, absent=("data",)),
    BadInput("prepare-out-is-a-file", ["prepare", "tinystories", "--out", "{d}/notes.txt"], 2,
             E + "--out {d}/notes.txt is a file, but the dataset directory goes there; give a directory (new or "
                 "existing)", setup=write("notes.txt", b"mine"), unchanged=("notes.txt",)),
    # a base URL without a scheme was urllib's "unknown url type"
    BadInput("prepare-base-url-not-a-url", ["prepare", "tinystories", "--out", "{d}/data", "--base-url",
                                            "mirror.example.org/ts"], 2,
             E + f"base URL 'mirror.example.org/ts' (--base-url or $CS336_DATA_URL) is not an http(s):// or file:// "
                 f"URL; give one like {URL}", absent=("data",)),
    # a vocab size too small was refused only after the download
    BadInput("prepare-vocab-too-small", ["prepare", "tinystories", "--out", "{d}/data", "--vocab-size", "100"], 2,
             E + "--vocab-size 100 is smaller than 256 bytes + 1 special token (<|endoftext|>); use at least 257",
             absent=("data",)),
    # a refused connection was "[Errno 111] Connection refused", and left an empty --out behind
    BadInput("prepare-connection-refused", ["prepare", "tinystories", "--out", "{d}/data", "--base-url",
                                            "http://127.0.0.1:9/"], 1,
             E + "download of http://127.0.0.1:9/TinyStoriesV2-GPT4-train.txt failed: connection refused; check the "
                 "network and --base-url (or $CS336_DATA_URL)", absent=("data",)),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row, tmp_path, capsys, made_tokenizer, monkeypatch):
    if row.id.startswith("perm-") and permissions_ignored():
        pytest.skip("root ignores file permissions")
    monkeypatch.delenv("CS336_DATA_URL", raising=False)
    shutil.copytree(made_tokenizer, tmp_path, dirs_exist_ok=True)
    try:
        check_bad_input(row, bpe.main, tmp_path, capsys)
    finally:  # let pytest remove what a row made read-only
        for p in (tmp_path, *tmp_path.rglob("*")):
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_permission_fault_is_exit_1_even_as_root(made_tokenizer, tmp_path, capsys, monkeypatch):
    """The perm- rows skip as root; the same PermissionError here, raised where the export makes its directory."""
    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(bpe, "output_dir", refuse)
    code, _, err = run_cli(bpe.main, ["export", "--tokenizer", made_tokenizer / "tok", "--format", "hf", "--out",
                                      tmp_path / "hf"], capsys)
    assert (code, err) == (1, f"{E}{tmp_path / 'hf'} {PERMISSION}\n")


@pytest.mark.parametrize("error,code,line", [
    (PermissionError(errno.EACCES, "Permission denied", "out"), 1, "out " + PERMISSION),
    (OSError(errno.EROFS, "Read-only file system", "out"), 1,
     "out is on a read-only file system; choose a path on a writable disk"),
    (OSError(errno.ENOSPC, "No space left on device", "out"), 1,
     "out cannot be written: no space left on device; free some space or choose another disk"),
    (OSError(errno.EIO, "Input/output error", "out"), 1,
     "out cannot be read or written: input/output error; the disk may be failing: check it (dmesg) or use another"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "in.txt"), 2, "in.txt does not exist; check the path"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "d"), 2, "d is a directory; give a file path"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/x"), 2,
     "f/x is not a directory (or a part of the path is a file); check the path"),
    (FileNotFoundError("input file x does not exist"), 2, "input file x does not exist"),  # our own message, kept
])
def test_describe_os_error(error, code, line):
    """Whose fault an OSError is (2: the path given; 1: the machine) and one line without "[Errno N]"."""
    assert cli.describe_os_error(error) == (code, line)


def test_a_tokenizer_export_replaces_an_earlier_one_and_force_removes_only_tokenizer_files(made_tokenizer, tmp_path,
                                                                                          capsys):
    """Into an earlier export: replaced, exit 0. With --force into another model's directory: the other tokenizer's
    files go (special_tokens_map.json, vocab.json), the rest stays (weights, README.md)."""
    export = ["export", "--tokenizer", made_tokenizer / "tok", "--format", "hf", "--out", tmp_path / "hf"]
    assert run_cli(bpe.main, export, capsys)[0] == 0
    assert run_cli(bpe.main, export, capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("special_tokens_map.json", "vocab.json", "model.safetensors", "README.md"):
        (tmp_path / "hf" / name).write_text("{}")
    assert run_cli(bpe.main, [*export, "--force"], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "model.safetensors",
                                                                   "tokenizer.json", "tokenizer_config.json"]
