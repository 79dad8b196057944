"""datasets.py: bpe.py's operations on whole datasets: `bpe.py encode` (a text file -> a .npy of token ids, encoded
in parallel pieces and streamed to disk) and `bpe.py prepare` (download TinyStories or the OpenWebText sample, train
its tokenizer, encode both splits). An upper-floor module: it imports bpe.py (the tokenizer) and lib/fast_bpe.py (the
file's pieces and the worker processes); bpe.py imports it only inside its encode and prepare commands.

    python bpe.py encode --tokenizer runs/tok --input ../shared/data/kernel-docs-valid.txt --output runs/valid.npy
    python bpe.py prepare tinystories --out data/tinystories
"""
import contextlib
import gzip
import http.client
import io
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from http import HTTPStatus
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import bpe
from lib import fast_bpe
from lib.cli import (BadInputError, EnvironmentFault, WriteFault, atomic_file, check_dir_target, describe_fault,
                     output_dir)

# The output is np.save's format, so np.load(mmap_mode="r") maps it: a header giving the dtype and the length, then
# the ids. It is written in one pass, piece by piece as the workers hand the ids back: the header first, for a
# placeholder length, then the ids, then the header again, in place, with the real length. note: that works because
# the header is as long for any length: numpy pads it to a multiple of 64 bytes and leaves room for a length of up
# to 21 digits (numpy PR #20321, numpy >= 1.24), so the ids start at the same byte either way. The file goes through
# cli.atomic_file: a failed write (a full disk, say) leaves the previous file at the output path, and no temporary.

UINT16_VOCAB = 1 << 16  # a vocab of up to 65,536 tokens has ids that fit in uint16: half the disk and memory of uint32
MAX_TOKENS = 2**63 - 1  # the placeholder length: the longest numpy allows (its shapes are signed 64-bit)


def _token_dtype(vocab_size: int) -> type:
    """The .npy dtype for a vocab: _token_dtype(50_257) is np.uint16, _token_dtype(70_000) is np.uint32."""
    return np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32


def _npy_header(dtype, n_tokens: int) -> bytes:
    """np.save's header (format 1.0) for a 1-D array of n_tokens ids; its length does not depend on n_tokens:
    len(_npy_header(np.uint16, 5)) == len(_npy_header(np.uint16, MAX_TOKENS)) == 128"""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": (n_tokens,)})
    return buf.getvalue()


_worker_tokenizer = None  # the tokenizer of an encode worker (Pool gives fn no state, so _init_encode_worker sets it)


def _init_encode_worker(tokenizer):
    """Pool initializer (and, for work done in this process, a plain call): the tokenizer _encode_piece uses."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_piece(args) -> tuple[int, np.ndarray]:
    """Worker: (end, ids) for the text of bytes [start, end) of the file."""
    path, start, end, dtype = args
    return end, np.array(_worker_tokenizer.encode(fast_bpe.read_piece(path, start, end)), dtype=dtype)


def encode_file(tokenizer: bpe.Tokenizer, input_path, output_path, num_workers=None, progress=False) -> int:
    """Encode a text file to an np.save-format .npy of ids (uint16, or uint32 for vocabs over 65,536 tokens).
    Pieces split at safe cut points are encoded in parallel (fast_bpe's pieces and workers, with whichever encoder
    the tokenizer has: Tokenizer(..., fast=True) is the fast one) and streamed to the file in order (see above):
    the ids never sit in memory whole, and the file at output_path is the new one, complete, or (after a failed
    write, a cli.WriteFault) whatever was there before. Returns the number of tokens."""
    input_path, output_path = Path(input_path), Path(output_path)
    _check_encode_paths(input_path, output_path)
    dtype, total_bytes = _token_dtype(tokenizer.vocab_size), input_path.stat().st_size
    pieces = _encoded_pieces(tokenizer, input_path, dtype, num_workers)
    with contextlib.closing(pieces), atomic_file(output_path) as out:
        out.write(_npy_header(dtype, MAX_TOKENS))
        n_tokens = _write_ids(pieces, out, total_bytes, progress)
        out.seek(0)
        out.write(_npy_header(dtype, n_tokens))  # as long as the placeholder: the ids stay where they are
    return n_tokens


def _check_encode_paths(input_path: Path, output_path: Path) -> None:
    """Fail before any work when the input is missing or empty, the output's directory is missing, or the output is
    the input (the ids would replace the text they came from)."""
    if input_path.is_dir():
        raise IsADirectoryError(f"input file {input_path} is a directory; give a text file")
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    if input_path.stat().st_size == 0:
        raise ValueError(f"input file {input_path} is empty")
    bpe.check_output_dir(output_path)
    if output_path.exists() and output_path.samefile(input_path):
        raise BadInputError(f"the output {output_path} is the input file; give another path for the ids (a .npy "
                            f"file)")


def _encoded_pieces(tokenizer: bpe.Tokenizer, input_path: Path, dtype, num_workers) -> Iterator[tuple[int, np.ndarray]]:
    """(end byte offset, ids) of each piece of the file, in file order, encoded by `num_workers` processes. A generator:
    close it to stop the workers."""
    bounds = fast_bpe.find_piece_boundaries(input_path, fast_bpe.PIECE_BYTES, tokenizer.special_tokens)
    jobs = [(str(input_path), s, e, dtype) for s, e in zip(bounds[:-1], bounds[1:])]
    # The first piece is encoded here before forking (warm_first), so its caches (most of the cost of a cold start)
    # are warm in the workers, which inherit this process's memory.
    return fast_bpe._map_pieces(_encode_piece, jobs, num_workers, _init_encode_worker, (tokenizer,), warm_first=True)


def _write_ids(pieces: Iterable[tuple[int, np.ndarray]], out, total_bytes: int, progress: bool) -> int:
    """Write the ids of the pieces, in order, to the open file `out` (bare array bytes, as after a .npy header);
    returns the number of tokens. progress: one updating line on stderr with bytes done, speed and tokens, ended
    however the writing ends (so that an error message starts a line of its own)."""
    n_tokens, t0, shown = 0, time.perf_counter(), False
    try:
        for end, ids in pieces:
            out.write(ids.tobytes())
            n_tokens += len(ids)
            if progress:
                dt = time.perf_counter() - t0
                print(f"\rencoded {end / 1e6:.1f}/{total_bytes / 1e6:.1f} MB  {end / 1e6 / dt:.1f} MB/s  "
                      f"{n_tokens:,} tokens", end="", file=sys.stderr)
                shown = True
    finally:
        if shown:
            print(file=sys.stderr)
    return n_tokens



# ---------------------------------------------------------------------------------------------------------------------
# Dataset preparation: download, train, encode
# ---------------------------------------------------------------------------------------------------------------------

DATASETS = {
    "tinystories": dict(base_url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/",
                        files={"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"},
                        vocab_size=10_000),
    "owt": dict(base_url="https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main/",
                files={"train": "owt_train.txt.gz", "valid": "owt_valid.txt.gz"},
                vocab_size=32_000),
}
BASE_URL_ENV = "CS336_DATA_URL"  # overrides the base URL (a mirror, or a local test server)
DOWNLOAD_TIMEOUT_S = 60  # seconds a connect or a read may wait before the download counts as failed
DOWNLOAD_BLOCK = 1 << 20  # bytes per read (1 MiB), and one progress update each
COPY_BUFFER = 1 << 24  # bytes per read when decompressing a big file (16 MiB: few system calls, little memory)


class DownloadError(EnvironmentFault):
    """A download failed or stopped: the network's or the server's fault, not the input's (cli.EXIT_ENVIRONMENT)."""


def download(url: str, dest: Path, progress=True) -> Path:
    """Download url to dest, resuming dest.part with an HTTP Range request if an earlier attempt was cut off.
    note: dest.part is kept when a download fails, whatever the cause (a dropped connection, a full disk): it is not
    debris but the bytes fetched so far, and the next run asks the server only for the rest."""
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if have and isinstance(e, urllib.error.HTTPError) and e.code == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
            os.replace(part, dest)  # nothing after byte `have`: the .part file is taken as complete
            return dest
        raise _download_failed(url, part, e) from None
    with response:
        if have and response.status != HTTPStatus.PARTIAL_CONTENT:  # the server ignored the Range: start over
            have = 0
        total = have + int(response.headers.get("Content-Length") or 0)
        done = _save_body(response, url, part, have, total, progress)
    if total and done != total:
        raise DownloadError(f"download of {url} stopped at {done} of {total} bytes; re-run to resume")
    os.replace(part, dest)
    return dest


def _save_body(response, url: str, part: Path, have: int, total: int, progress: bool) -> int:
    """Write the body of `response` to `part`, after the `have` bytes already there; returns the bytes it then holds.
    A failed read is a DownloadError, a failed write a cli.WriteFault, and `part` keeps what it got either way.
    progress: one updating line on stderr, ended however the download ends."""
    done, t0, shown = have, time.perf_counter(), False
    try:
        with _open_part(part, append=bool(have)) as f:
            while block := _read_block(response, url, part):
                f.write(block)
                done += len(block)
                if progress:
                    rate = (done - have) / 1e6 / max(time.perf_counter() - t0, 1e-9)
                    print(f"\rdownloading {part.name.removesuffix('.part')}: {done / 1e6:.1f}/{total / 1e6:.1f} MB  "
                          f"{rate:.1f} MB/s", end="", file=sys.stderr)
                    shown = True
    except OSError as e:  # the disk's fault: _read_block turns the network's into a DownloadError
        kept = part.stat().st_size if part.is_file() else done  # note: more than `done` after a short write
        cause = describe_fault(e, part, needed=total - kept if total else None)
        raise WriteFault(part, f"{cause}; the download so far is kept there, and a re-run resumes it") from None
    finally:
        if shown:
            print(file=sys.stderr)
    return done


def _open_part(part: Path, append: bool):
    """The one `open` of a download's .part file: a seam the fault-injection tests replace, as lib/cli.py's open_for_write
    is for every other file (which cannot serve here: it truncates, and a resumed download appends)."""
    return open(part, "ab" if append else "wb")


def _read_block(response, url: str, part: Path) -> bytes:
    """The next block of a response's body, b"" at its end; the network's errors (a dropped connection, a timeout)
    are a DownloadError."""
    try:
        return response.read(DOWNLOAD_BLOCK)
    except (http.client.HTTPException, OSError) as e:
        raise _download_failed(url, part, e) from None


def _download_failed(url: str, part: Path, error: BaseException) -> DownloadError:
    """The one line for a download that the network or the server broke off, saying whether it can resume."""
    kept = f"; partial data kept in {part}, re-run to resume" if part.is_file() and part.stat().st_size else ""
    reason = getattr(error, "reason", error)  # a URLError wraps the OSError (a refused connection) as its reason
    if isinstance(reason, OSError) and reason.strerror:  # its words, without "[Errno 111]"
        reason = reason.strerror.lower()
    return DownloadError(f"download of {url} failed: {reason}{kept}; check the network and --base-url "
                         f"(or ${BASE_URL_ENV})")


def gunzip(src: Path, dest: Path) -> Path:
    """Decompress src into dest (through cli.atomic_file, so dest is complete or absent), then delete src."""
    with gzip.open(src, "rb") as fin, atomic_file(dest) as fout:
        while block := _read_gzip_block(fin, src):
            fout.write(block)
    src.unlink()
    return dest


def _read_gzip_block(fin, src: Path) -> bytes:
    """The next block of decompressed data; a corrupt or cut-off src is a BadInputError naming it (not an OSError,
    which atomic_file would report as a fault of the file being written)."""
    try:
        return fin.read(COPY_BUFFER)
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(f"{src} is not a complete gzip file ({e}); delete it and re-run to download it "
                            f"again") from None


def prepare(name: str, out_dir, base_url=None, vocab_size=None, num_workers=None, progress=True) -> dict:
    """Download a dataset's train/valid text, train its tokenizer on train, encode both splits into out_dir."""
    spec = DATASETS[name]
    base_url = base_url or os.environ.get(BASE_URL_ENV) or spec["base_url"]
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise BadInputError(f"base URL {base_url!r} (--base-url or ${BASE_URL_ENV}) is not an http(s):// or file:// "
                            f"URL; give one like {spec['base_url']}")
    if vocab_size is not None and vocab_size < 257:  # before the download, not after it
        raise BadInputError(f"--vocab-size {vocab_size} is smaller than 256 bytes + 1 special token "
                            f"({bpe.END_OF_TEXT}); use at least 257")
    out = Path(out_dir)
    bpe.check_output_dir(out)
    check_dir_target(out, "--out", "the dataset directory")
    with output_dir(out):  # a failed first download leaves no empty directory (a partial one is kept to resume)
        return _prepare_in(spec, out, base_url, vocab_size, num_workers, progress)


def _prepare_in(spec: dict, out: Path, base_url: str, vocab_size, num_workers, progress) -> dict:
    """prepare's steps, in the existing directory out: download, train the tokenizer, encode both splits."""
    texts = {}
    for split, filename in spec["files"].items():
        txt = out / filename.removesuffix(".gz")
        if not txt.is_file():
            got = download(base_url.rstrip("/") + "/" + filename, out / filename, progress)
            if filename.endswith(".gz"):
                gunzip(got, txt)
        texts[split] = txt
    specials = [bpe.END_OF_TEXT]
    vocab, merges = bpe.train_bpe(texts["train"], vocab_size or spec["vocab_size"], specials, fast=True,
                                  num_workers=num_workers, progress=progress)
    tok = bpe.Tokenizer(vocab, merges, specials, fast=True)
    tok.save_dir(out)
    return {split: encode_file(tok, txt, out / f"{split}.npy", num_workers, progress) for split, txt in texts.items()}

