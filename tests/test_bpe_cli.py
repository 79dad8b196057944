"""Tests of bpe.py's command line, run as a subprocess: `train` and `encode` write what the library functions
produce, with any number of workers; every bad input exits with code 2 (cli.EXIT_BAD_INPUT) and one `bpe.py: error:`
line, no traceback, nothing half-written; `prepare` downloads from an HTTP server on 127.0.0.1 started here (plain
and gzipped files, a cut-off download resumed with an HTTP Range request, a failed download reported with exit code 1,
cli.EXIT_ENVIRONMENT), trains, and encodes both splits. In process (bpe.main): a write of the download's .part that
fails part-way (a fake writer from test_faults_bpe.py, and a real 16 KiB tmpfs where root may mount one) is one line
naming the .part and the cause, exit code 1, the .part kept; a re-run resumes it with a Range request.

Run: python -m pytest tests/test_bpe_cli.py (~10 s on 2 cores). This file has no slow tests; `python -m pytest -m slow`
runs the project's slow end-to-end checks, which the default run skips.
"""
import gzip
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import bpe
from conftest import FailingFile
from lib import datasets
from test_faults_bpe import FAULTS

ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"


def run(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "bpe.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def corpus(seed=0, n_docs=60) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "über", "naïve", "日本", "dog", "ran", "far", "away", "it's"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + ".\n" for _ in range(n_docs)]
    return EOT.join(docs)


def assert_clean_error(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpe.py: error:") and pattern in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_train_then_encode(tmp_path):
    text = corpus()
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    r = run("train", "--input", tmp_path / "c.txt", "--vocab-size", 300, "--special-tokens", EOT, "--out",
            tmp_path / "tok", "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "longest token" in r.stdout and "peak memory" in r.stdout and "pre-tokenised" in r.stderr
    tok = bpe.Tokenizer.from_dir(tmp_path / "tok")
    assert (tok.vocab, tok.merges) == bpe.train_bpe(tmp_path / "c.txt", 300, [EOT], num_workers=1)
    outs = []
    for workers in (1, 2):
        r = run("encode", "--tokenizer", tmp_path / "tok", "--input", tmp_path / "c.txt", "--output",
                tmp_path / f"c{workers}.npy", "--workers", workers)
        assert r.returncode == 0, r.stderr
        assert "bytes/token" in r.stdout
        outs.append(np.load(tmp_path / f"c{workers}.npy", mmap_mode="r"))
    assert outs[0].tolist() == outs[1].tolist() == tok.encode(text)
    assert tok.decode(outs[0].tolist()) == text


def test_cli_bad_inputs(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(corpus(), encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine text \xc3\x28 oops")
    train = ["train", "--vocab-size", 300, "--out"]
    assert_clean_error(run(*train, tmp_path / "o1", "--input", tmp_path / "missing.txt"), "does not exist")
    assert_clean_error(run(*train, tmp_path / "o2", "--input", tmp_path / "empty.txt"), "is empty")
    assert_clean_error(run(*train, tmp_path / "o3", "--input", tmp_path / "bad.txt"), "not valid UTF-8 at byte 10")
    assert_clean_error(run("train", "--vocab-size", 100, "--out", tmp_path / "o4", "--input", good), "smaller than 256")
    assert_clean_error(run(*train, tmp_path / "o5", "--input", good, "--special-tokens", ""), "empty string")
    assert_clean_error(run(*train, tmp_path / "no" / "o6", "--input", good), "does not exist")
    assert_clean_error(run("encode", "--tokenizer", tmp_path / "o1", "--input", good, "--output", tmp_path / "x.npy"),
                       "tokenizer directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "empty.txt", "good.txt"]  # nothing written

    assert run(*train, tmp_path / "tok", "--input", good).returncode == 0
    assert_clean_error(run("encode", "--tokenizer", tmp_path / "tok", "--input", good, "--output",
                           tmp_path / "no" / "x.npy"), "output directory")
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\nzz qq\n", encoding="utf-8")
    assert_clean_error(run("encode", "--tokenizer", tmp_path / "tok", "--input", good, "--output",
                           tmp_path / "x.npy"), "do not belong together")
    assert not (tmp_path / "x.npy").exists()
    r = run("train", "--input", good)  # argparse misuse: exit code 2 from argparse itself
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# prepare, against a local HTTP server
# ---------------------------------------------------------------------------------------------------------------------

class RangeServer(ThreadingHTTPServer):
    """Serves `files` (name -> bytes) at any path ending in the name; honours "Range: bytes=N-"; names in `cut_once`
    are cut off half way the first time they are requested (as a dropped connection would)."""

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.cut_once, self.ranges = files, set(), []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        data = self.server.files.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            self.server.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        name = self.path.rsplit("/", 1)[-1]
        if name in self.server.cut_once:
            self.server.cut_once.discard(name)
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    files = {"TinyStoriesV2-GPT4-train.txt": corpus(1, 200).encode(), "TinyStoriesV2-GPT4-valid.txt": corpus(2).encode(),
             "owt_train.txt.gz": gzip.compress(corpus(3, 200).encode()), "owt_valid.txt.gz": gzip.compress(corpus(4).encode())}
    srv = RangeServer(files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/data"
    srv.shutdown()


def check_prepared(out: Path, train_text: str, valid_text: str):
    tok = bpe.Tokenizer.from_dir(out)
    assert tok.vocab_size == 300 and tok.special_tokens == [EOT]
    assert tok.decode(np.load(out / "train.npy").tolist()) == train_text
    assert tok.decode(np.load(out / "valid.npy").tolist()) == valid_text
    assert not [p for p in out.iterdir() if p.name.endswith((".part", ".tmp"))]


def test_prepare_resumes_a_cut_off_download(tmp_path, server):
    srv, url = server
    srv.cut_once.add("TinyStoriesV2-GPT4-train.txt")
    out = tmp_path / "ts"
    r = run("prepare", "tinystories", "--out", out, "--base-url", url, "--vocab-size", 300, "--workers", 1)
    assert r.returncode == 1 and "download of" in r.stderr and "re-run to resume" in r.stderr, r.stderr
    # the error is on its own line, after the progress line
    assert r.stderr.splitlines()[-1].startswith("bpe.py: error: download of")
    assert "Traceback" not in r.stderr
    part = out / "TinyStoriesV2-GPT4-train.txt.part"
    have = part.stat().st_size
    assert 0 < have < len(srv.files["TinyStoriesV2-GPT4-train.txt"])
    r = run("prepare", "tinystories", "--out", out, "--base-url", url, "--vocab-size", 300, "--workers", 1)
    assert r.returncode == 0, r.stderr
    assert srv.ranges == [f"bytes={have}-"]  # resumed where it stopped, not restarted
    assert "downloading TinyStoriesV2-GPT4-valid.txt" in r.stderr
    check_prepared(out, corpus(1, 200), corpus(2))


def test_prepare_owt_gzipped_via_env(tmp_path, server):
    srv, url = server
    env = {**os.environ, datasets.BASE_URL_ENV: url}
    r = run("prepare", "owt", "--out", tmp_path / "owt", "--vocab-size", 300, env=env)
    assert r.returncode == 0, r.stderr
    check_prepared(tmp_path / "owt", corpus(3, 200), corpus(4))
    assert not list((tmp_path / "owt").glob("*.gz"))


def test_prepare_failed_download(tmp_path, server):
    srv, url = server
    srv.files.clear()  # every request now 404s
    r = run("prepare", "tinystories", "--out", tmp_path / "ts", "--base-url", url)
    assert r.returncode == 1 and "download of" in r.stderr and "failed" in r.stderr and "Not Found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run("prepare", "tinystories", "--out", tmp_path / "ts", "--base-url", "http://127.0.0.1:9/")
    assert r.returncode == 1 and "download of" in r.stderr and "failed" in r.stderr


def prepare_in_process(out: Path, url: str, capsys):
    rc = bpe.main(["prepare", "tinystories", "--out", str(out), "--base-url", url, "--vocab-size", "300",
                   "--workers", "1"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("err, cause", FAULTS)
def test_prepare_resumes_a_download_stopped_by_a_write_fault(tmp_path, server, monkeypatch, capsys, err, cause):
    """The .part write fails 10,000 bytes in: one line naming the .part and the cause, exit code 1, the .part kept
    (it is how the download resumes); the next run asks only for the rest and ends with the whole file."""
    srv, url = server
    name = "TinyStoriesV2-GPT4-train.txt"
    monkeypatch.setattr(datasets, "DOWNLOAD_BLOCK", 4096)  # several writes, so some bytes are in before the fault
    real_open_part = datasets._open_part
    monkeypatch.setattr(datasets, "_open_part", lambda part, append: FailingFile(real_open_part(part, append), 10_000, err))
    out = tmp_path / "ts"
    rc, stderr = prepare_in_process(out, url, capsys)
    part = out / (name + ".part")
    assert rc == 1
    assert stderr.splitlines()[-1] == (f"bpe.py: error: cannot write {part}: {cause}; the download so far is kept "
                                       f"there, and a re-run resumes it"), stderr
    assert len(stderr.strip().split("\n")) == 2 and "Traceback" not in stderr  # the progress line (ended), the error
    have = part.stat().st_size
    assert 0 < have < len(srv.files[name]) and part.read_bytes() == srv.files[name][:have]

    monkeypatch.setattr(datasets, "_open_part", real_open_part)  # the disk has room again
    rc, stderr = prepare_in_process(out, url, capsys)
    assert rc == 0, stderr
    assert srv.ranges == [f"bytes={have}-"]  # resumed where it stopped
    assert (out / name).read_bytes() == srv.files[name]
    check_prepared(out, corpus(1, 200), corpus(2))


def test_prepare_download_fills_a_real_tmpfs_then_resumes(server, tmpfs, capsys):
    """A real full disk: a 16 KiB tmpfs cannot hold the ~25 kB train split; grown to 2 MiB, the same prepare resumes
    from the .part and finishes."""
    srv, url = server
    out = tmpfs("16k")
    rc, stderr = prepare_in_process(out, url, capsys)
    part = out / "TinyStoriesV2-GPT4-train.txt.part"
    assert rc == 1
    assert stderr.splitlines()[-1].startswith(f"bpe.py: error: cannot write {part}: no space left on device: "), stderr
    assert "needed" in stderr and "the download so far is kept there" in stderr
    have = part.stat().st_size
    assert 0 < have < len(srv.files["TinyStoriesV2-GPT4-train.txt"])
    subprocess.run(["mount", "-o", "remount,size=2m", str(out)], check=True)
    rc, stderr = prepare_in_process(out, url, capsys)
    assert rc == 0, stderr
    assert srv.ranges == [f"bytes={have}-"]
    check_prepared(out, corpus(1, 200), corpus(2))
