"""Byte-level BPE: training, the tokenizer, and dataset preparation (CS336 assignment 1, section 2).

What it is: the GPT-2 style byte-level byte-pair-encoding tokenizer (Sennrich et al. 2016; Radford et al. 2019).
Text is cut into pre-tokens by the GPT-2 regex, each pre-token is a sequence of bytes, and training repeatedly merges
the most frequent adjacent pair of tokens (ties: the lexicographically greater pair) into a new token.
Why it is written this way: `train_bpe_naive` is the 20-line teaching version (and the test oracle); `train_bpe` is
the fast one (parallel pre-tokenisation, heap-based incremental pair counts) and must give identical merges.
`Tokenizer` encodes with merge ranks and caches, and matches tiktoken token for token.

    python bpe.py train --input ../shared/data/kernel-docs-train.txt --vocab-size 10000 \
        --special-tokens "<|endoftext|>" --out runs/tok
    python bpe.py encode --tokenizer runs/tok --input ../shared/data/kernel-docs-valid.txt --output runs/valid.npy
    python bpe.py prepare tinystories --out data/tinystories   # download + train 10K tokenizer + encode both splits
    python bpe.py export --tokenizer runs/tok --format hf --out runs/tok-hf   # or --format tiktoken --out tok.tiktoken
"""
import base64
import contextlib
import gc
import gzip
import heapq
import http.client
import io
import json
import multiprocessing
import operator
import os
import re
import resource
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter, defaultdict
from functools import cached_property, reduce
from itertools import accumulate, chain, compress, filterfalse, islice, repeat
from http import HTTPStatus
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import regex

from lib.cli import (EXIT_BAD_INPUT, EXIT_ENVIRONMENT, BadInputError, EnvironmentFault, OneLineParser, WriteFault,
                 atomic_file, atomic_write_text, describe_fault)

# ---------------------------------------------------------------------------------------------------------------------
# Pre-tokenisation
# ---------------------------------------------------------------------------------------------------------------------

# The GPT-2 pre-tokenisation regex (Radford et al. 2019, as in the handout section 2.4): contractions, an optional
# space + letters, an optional space + digits, an optional space + other symbols, whitespace runs (leaving the last
# space to the next word), and trailing whitespace. Needs the `regex` package for \p{L} / \p{N}.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PAT)

# The document separator of the handout's datasets (TinyStories, OpenWebText) and of GPT-2: a special token, never
# split or merged. Every layer that needs it (training data, the demo, sampling's start and stop) uses this name.
END_OF_TEXT = "<|endoftext|>"

# Chunks: a whitespace run followed by a non-whitespace run ("\n\n  foo.bar()", " the").
# Lemma: no GPT-2 pre-token contains a non-whitespace character followed by a whitespace character (the only
# alternatives that take whitespace are a single leading space, or runs of whitespace only), and the pattern has no
# lookbehind. So cutting the text just before any whitespace that follows a non-whitespace character never changes the
# pre-tokens: pretokens(chunk1 + chunk2) == pretokens(chunk1) + pretokens(chunk2). Chunks repeat far more than text
# does, so training counts chunks first and encoding caches chunk -> ids; both then run the slow GPT-2 regex only on
# unique chunks. The chunk split uses the stdlib `re` (about 3x faster than `regex` here).
# WHITESPACE is what the GPT-2 pattern's \s (the `regex` package's) matches, and the one source of the whitespace
# classes below. subtle: the stdlib `re`'s \s is not the same set (it also matches U+001C..U+001F), so the classes list
# the characters instead of saying \s; tests/test_bpe.py checks all 1,114,112 code points against `regex`'s \s.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                       "\u2028\u2029\u202f\u205f\u3000")
_WS_CHARS = "".join(map(re.escape, sorted(WHITESPACE)))  # sorted: a set's order changes from run to run
_WS, _NON_WS = f"[{_WS_CHARS}]", f"[^{_WS_CHARS}]"  # re compiles both to one bitmap lookup per character
CHUNK_RE = re.compile(rf"{_WS}*{_NON_WS}+|{_WS}+")
CHUNK_START = re.compile(rf"(?<={_NON_WS}){_WS}")  # where a chunk other than the first starts: a safe cut in text

# ASCII text does not need the `regex` package: on ASCII characters \p{L} is [A-Za-z], \p{N} is [0-9] and \s is the
# six ASCII whitespace characters, so the stdlib `re` can run the same pattern, about 2x faster. str.isascii() is O(1)
# in CPython (a flag of the string), so choosing costs nothing; tests/test_bpe.py checks the two patterns agree.
_ASCII_WS = "".join(map(re.escape, sorted(c for c in WHITESPACE if c.isascii())))
ASCII_PRETOKEN_RE = re.compile(rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_ASCII_WS}A-Za-z0-9]+"""
                               rf"""|[{_ASCII_WS}]+(?![^{_ASCII_WS}])|[{_ASCII_WS}]+""")


def find_pretokens(text: str) -> list[str]:
    """PRETOKEN_RE.findall(text), by the stdlib regex when the text is ASCII.
    find_pretokens("it's  42!") == ['it', "'s", ' ', ' 42', '!']"""
    return (ASCII_PRETOKEN_RE if text.isascii() else PRETOKEN_RE).findall(text)


def _joinable(chunk: str) -> bool:
    """True if the chunk starts with whitespace and ends with non-whitespace: then, by the lemma above, it can be
    joined to such chunks and to the end of any text without changing anyone's pre-tokens."""
    return chunk[0] in WHITESPACE and chunk[-1] not in WHITESPACE


def _split_ascii(chunks: list[str]) -> tuple[list[str], list[str]]:
    """(the pure-ASCII chunks, the others), each in order: a join of the first goes through find_pretokens' stdlib
    `re`, ~2x faster than the `regex` package that the others need.
    _split_ascii([" a", " é", " b"]) == ([" a", " b"], [" é"])"""
    is_ascii = list(map(str.isascii, chunks))
    if all(is_ascii):
        return chunks, []
    return list(compress(chunks, is_ascii)), list(compress(chunks, map(operator.not_, is_ascii)))


def special_pattern(special_tokens: Iterable[str]) -> "re.Pattern | None":
    """A regex that finds special tokens, longest first so that overlapping ones resolve to the longest match.
    special_pattern(["<|a|>", "<|a|><|a|>"]).pattern == '(<\\|a\\|><\\|a\\|>|<\\|a\\|>)'"""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


def unique_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    """The special tokens de-duplicated in order; the empty string is an error (it would match everywhere).
    unique_special_tokens(["<|a|>", "<|b|>", "<|a|>"]) == ["<|a|>", "<|b|>"]"""
    specials = list(dict.fromkeys(special_tokens))
    if any(s == "" for s in specials):
        raise ValueError("a special token is the empty string; remove it")
    return specials


def count_chunks(text: str, special_tokens: Iterable[str] = (), counts: Counter | None = None) -> Counter:
    """Chunk frequencies of `text`, split on the special tokens first so nothing spans a document boundary; added to
    `counts` if given (one Counter for many pieces: Counter.update from a list counts in C, from a Counter in Python).
    count_chunks("low low<|e|>lower", ["<|e|>"]) == Counter({'low': 1, ' low': 1, 'lower': 1})"""
    pattern = special_pattern(special_tokens)
    docs = pattern.split(text)[::2] if pattern else [text]  # odd entries of split() are the captured specials
    counts = Counter() if counts is None else counts
    for doc in docs:
        counts.update(CHUNK_RE.findall(doc))
    return counts


def chunks_to_pretokens(chunk_counts: Counter) -> Counter:
    """Chunk frequencies -> pre-token frequencies; the slow GPT-2 regex sees each unique chunk once.
    chunks_to_pretokens(Counter({" it's": 2, "a": 1})) == Counter({" it": 2, "'s": 2, "a": 1})"""
    # Chunks that occur equally often are pre-tokenised together (~800 groups on half of kernel-docs), and each group's
    # pre-tokens are counted by Counter in C: a pre-token's frequency is then its count in the group times the group's,
    # with no Python step per pre-token and no need to know which chunk each one came from.
    by_count = defaultdict(list)
    for chunk, n in chunk_counts.items():
        by_count[n].append(chunk)
    counts = {}
    get = counts.get  # note: a plain dict and a bound .get are ~3x faster than Counter's += (its __missing__ is Python)
    for n, chunks in by_count.items():
        for pretoken, k in Counter(_pretokens_of_chunks(chunks)).items():
            counts[pretoken] = get(pretoken, 0) + k * n
    return Counter(counts)


def _pretokens_of_chunks(chunks: list[str]) -> list[str]:
    """All the pre-tokens of the chunks, in one list (in no particular order): the joinable ones (by the lemma above)
    in two regex calls, one for the pure-ASCII chunks and one for the others (_split_ascii), then one call for each
    of the rest.
    sorted(_pretokens_of_chunks([" it's", "a", " é!"])) == [" it", " é", "!", "'s", "a"]"""
    joinable = [c for c in chunks if _joinable(c)]
    out = []
    for group in _split_ascii(joinable):
        if group:
            out += find_pretokens("".join(group))
    if len(joinable) < len(chunks):  # e.g. the first chunk of a text ("hello"), or trailing whitespace: on its own
        for c in chunks:
            if not _joinable(c):
                out += find_pretokens(c)
    return out


def count_pretokens(text: str, special_tokens: Iterable[str] = ()) -> Counter:
    """Pre-token frequencies of `text` (special tokens split off first, never counted).
    count_pretokens("low low<|e|>lower", ["<|e|>"]) == Counter({'low': 1, ' low': 1, 'lower': 1})"""
    return chunks_to_pretokens(count_chunks(text, special_tokens))


# ---------------------------------------------------------------------------------------------------------------------
# Reading a file in parallel pieces
# ---------------------------------------------------------------------------------------------------------------------

# A safe cut point in the raw bytes: just before an ASCII whitespace byte that follows a printable non-space ASCII
# byte (the chunk lemma above, restricted to ASCII so it can be checked on bytes and always falls on a UTF-8 character
# boundary), and not inside an occurrence of a special token. Pre-tokenising or encoding the pieces separately then
# gives exactly the result for the whole file, so the output never depends on the number of workers.
_SAFE_CUT = re.compile(rb"[!-~](?=[\t\n\x0b\x0c\r ])")
PIECE_BYTES = 1 << 20  # 1 MiB of text per piece: small enough for flat memory, big enough to amortise overhead
_CUT_WINDOW = 1 << 16  # bytes read at a time while looking for a safe cut at or after a piece's target end


def find_piece_boundaries(path, piece_bytes: int, special_tokens: Iterable[str] = ()) -> list[int]:
    """Byte offsets [0, ..., file size] cutting the file into pieces of about `piece_bytes` at safe cut points."""
    specials = [s.encode("utf-8") for s in special_tokens]
    longest = max(map(len, specials), default=0)
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        target = piece_bytes
        while target < size:
            lo = max(0, target - longest)  # read a little before the target to see specials that span a cut
            f.seek(lo)
            window = f.read(_CUT_WINDOW + 2 * longest)
            cut = None
            for m in _SAFE_CUT.finditer(window, target - lo):
                p = m.end()  # just before the whitespace byte
                if p > len(window) - longest:
                    break
                if not any(_covers(window, s, p) for s in specials):
                    cut = lo + p
                    break
            if cut is None:  # no safe cut in this window: look further on
                target += _CUT_WINDOW
                continue
            bounds.append(cut)
            target = cut + piece_bytes
    bounds.append(size)
    return bounds


def _covers(window: bytes, special: bytes, p: int) -> bool:
    """True if an occurrence of `special` in `window` starts before offset p and ends after it."""
    for start in range(max(0, p - len(special) + 1), p):
        if window.startswith(special, start):
            return True
    return False


def read_piece(path, start: int, end: int) -> str:
    """The text of bytes [start, end) of the file; a file that cannot be read, or invalid UTF-8, is a BadInputError
    that says where. note: never an OSError, which encode_file (reading pieces while its output is open) would report
    as a fault of the output file."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {describe_fault(e, path)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path} is not valid UTF-8 at byte {start + e.start} ({e.reason}); "
                            f"re-save it as UTF-8") from None


def _count_pieces(args) -> Counter:
    """Worker: pre-token counts of a list of pieces. Each worker opens the file and reads only its own pieces, so
    memory holds one piece of text at a time plus the counts (which scale with unique pre-tokens)."""
    path, ranges, special_tokens = args
    chunk_counts = Counter()
    for start, end in ranges:
        count_chunks(read_piece(path, start, end), special_tokens, chunk_counts)
    return chunks_to_pretokens(chunk_counts)  # once per worker: unique chunks repeat across pieces


def _split_evenly(items: list, n: int) -> list[list]:
    """[1, 2, 3, 4, 5] in 2 -> [[1, 2, 3], [4, 5]] (contiguous, so each worker reads one stretch of the file)."""
    k, r = divmod(len(items), n)
    out, i = [], 0
    for j in range(n):
        out.append(items[i:i + k + (j < r)])
        i += k + (j < r)
    return [o for o in out if o]


def _num_workers(requested: int | None) -> int:
    """The number of worker processes: as requested, else one per CPU."""
    return requested or os.cpu_count() or 1


def _map_pieces(fn, jobs: list, num_workers: int | None, initializer=None, initargs=(), warm_first=False) -> Iterator:
    """fn(job) for each job, yielded in order, computed by up to `num_workers` forked worker processes, or in this
    process when there is one worker or one job. initializer(*initargs) runs before fn in each process that calls it,
    as multiprocessing.Pool's initializer does. warm_first: compute the first job here before forking, so whatever it
    leaves in memory (a tokenizer's caches) is already there in every worker.
    Close the generator (contextlib.closing) to stop the workers early, e.g. when the caller fails half way."""
    num_workers = _num_workers(num_workers)
    if num_workers == 1 or len(jobs) <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, jobs)
        return
    if warm_first:
        if initializer is not None:
            initializer(*initargs)
        yield fn(jobs[0])
        jobs = jobs[1:]
    # note: "fork", so workers start at once and share this process's memory (copy-on-write), caches included;
    # imap hands results back in job order.
    with multiprocessing.get_context("fork").Pool(min(num_workers, len(jobs)), initializer, initargs) as pool:
        yield from pool.imap(fn, jobs)  # leaving the `with` (done, failed or closed) terminates the workers


def count_pretokens_file(input_path, special_tokens=(), num_workers=None) -> Counter:
    """Pre-token counts of a whole file, pre-tokenised in parallel by `num_workers` processes (one stretch of
    pieces each, so each worker turns its chunk counts into pre-token counts once)."""
    num_workers = _num_workers(num_workers)
    bounds = find_piece_boundaries(input_path, PIECE_BYTES, special_tokens)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    jobs = [(str(input_path), group, tuple(special_tokens)) for group in _split_evenly(ranges, num_workers)]
    parts = _map_pieces(_count_pieces, jobs, num_workers)
    total = next(parts)
    for part in parts:
        total.update(part)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Training: the teaching version (the oracle)
# ---------------------------------------------------------------------------------------------------------------------

def merge_word(word: tuple, pair: tuple, new) -> tuple:
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new`.
    merge_word((1, 2, 1, 2, 3), (1, 2), 9) == (9, 9, 3)"""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe_naive(input_path, vocab_size: int, special_tokens=()) -> tuple[dict[int, bytes], list]:
    """Teaching version: recount every pair after every merge. O(merges x corpus); the reference for train_bpe."""
    text = Path(input_path).read_text(encoding="utf-8")
    words = Counter({tuple(bytes([b]) for b in w.encode("utf-8")): n
                     for w, n in count_pretokens(text, special_tokens).items()})
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    while len(vocab) < vocab_size - len(special_tokens):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties: the lexicographically greater pair of byte strings
        merges.append(best)
        vocab[len(vocab)] = best[0] + best[1]
        words = Counter({merge_word(w, best, best[0] + best[1]): n for w, n in words.items()})
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


# ---------------------------------------------------------------------------------------------------------------------
# Training: the fast version
# ---------------------------------------------------------------------------------------------------------------------

MAX_TRAIN_VOCAB = 0x110000  # bpe_merges writes token ids as characters, chr(id), and chr stops at U+10FFFF


def check_training_args(input_path, vocab_size: int, special_tokens) -> list[str]:
    """Validate the arguments of train_bpe; returns the special tokens de-duplicated in order."""
    path = Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty; give a text file with some content")
    specials = unique_special_tokens(special_tokens)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(specials)} special tokens; "
                         f"use at least {256 + len(specials)}")
    if vocab_size - len(specials) > MAX_TRAIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too large: training supports at most {MAX_TRAIN_VOCAB:,} "
                         f"tokens besides the special tokens; use a smaller one")
    return specials


_INVERT = {c: 256 - c for c in range(256)}  # str.translate table: chr(byte c) -> chr(256 - c), reversing the order


def _inverted(token: bytes) -> str:
    """A key that sorts byte strings in reverse lexicographic order, so heapq's min-heap pops the greater one first:
    each byte c as chr(256 - c), then chr(257), greater than them all, which puts a prefix after its extensions
    (b"a" < b"ab", so _inverted(b"a") > _inverted(b"ab")) and makes the keys prefix-free: two of them concatenated
    compare as the pair of keys would (see _PairQueue)."""
    return token.decode("latin-1").translate(_INVERT) + "\u0101"


def _byte_words(counts: Counter) -> tuple[list[str], list[int]]:
    """Pre-token counts -> (words, their frequencies), a word being a str with one character per token: chr(id).
    _byte_words(Counter({"hé": 2, "a": 5})) == (["h\\xc3\\xa9"], [2])"""
    # At the start id == byte value, so decoding the UTF-8 bytes as Latin-1 gives exactly that (b"\xc3\xa9" ->
    # "\xc3\xa9", two tokens). Strings let the merge loop find and rewrite the pair with str methods that run in C,
    # with no Python-level step per token: a merge is `word.replace(chr(a) + chr(b), chr(new))`, whose non-overlapping
    # left-to-right rule is exactly BPE's. Single-byte words have no pairs and are dropped.
    words, freqs = [], []
    for pretoken, n in counts.items():
        w = pretoken.encode("utf-8").decode("latin-1")
        if len(w) > 1:
            words.append(w)
            freqs.append(n)
    return words, freqs


def count_pairs(words: list[str], freqs: list[int]) -> tuple[defaultdict, defaultdict]:
    """Initial pair counts and pair -> word indices (an int32 array each), vectorised with numpy (a word is a str of
    token ids, see _byte_words; here every id is still a byte, < 256). A pair is the 2-character str of its two ids.
    count_pairs(["abab", "ba"], [3, 1]) -> ({"ab": 6, "ba": 4}, {"ab": array([0]), "ba": array([0, 1])})"""
    lengths = np.fromiter(map(len, words), dtype=np.int32, count=len(words))
    flat = np.frombuffer("".join(words).encode("latin-1"), dtype=np.uint8).astype(np.int32)  # chr(i) -> byte i
    word_of = np.repeat(np.arange(len(words), dtype=np.int32), lengths)  # the word index of each position
    inside = word_of[:-1] == word_of[1:]  # adjacent positions in the same word form a pair
    code = (flat[:-1] * 256 + flat[1:])[inside].astype(np.uint16)  # note: numpy sorts 16-bit keys by radix sort
    where = word_of[:-1][inside]
    del flat, word_of, inside  # note: these arrays are ~10 MB each on a 27 MB corpus; free them before the lists
    if len(code) == 0:  # every word is a single byte: nothing to merge
        return defaultdict(int), defaultdict(list)
    order = np.argsort(code, kind="stable")
    code, where = code[order], where[order]
    weight = np.asarray(freqs, dtype=np.int64)[where]
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    totals = np.add.reduceat(weight, starts).tolist()
    # A word that holds a pair twice ("abab") is listed once: after the stable sort, its positions are neighbours.
    once = np.r_[True, (code[1:] != code[:-1]) | (where[1:] != where[:-1])]
    code, where = code[once], where[once]
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    pair_counts, pair_words = defaultdict(int), defaultdict(list)
    for s, e, c, total in zip(starts.tolist(), [*starts[1:].tolist(), len(code)], code[starts].tolist(), totals):
        pair = chr(c >> 8) + chr(c & 255)
        pair_counts[pair] = total
        pair_words[pair] = where[s:e]
    return pair_counts, pair_words


PROGRESS_MERGES = 1000  # with progress=True, bpe_merges prints a line every this many merges


def bpe_merges(words: list[str], freqs: list[int], num_merges: int, *, progress=False,
               t0=None) -> tuple[list[bytes], list]:
    """The merge loop: words (see _byte_words; the loop rewrites them) and their frequencies -> (tokens by id,
    merges as id pairs), at most num_merges of them.
    bpe_merges(["ab", "abc"], [2, 1], 2) -> ([..256 bytes.., b"ab", b"abc"], [(97, 98), (256, 99)])"""
    t0 = time.perf_counter() if t0 is None else t0

    # The bookkeeping (what makes a merge cheap). A pair (a, b) is the 2-character str chr(a) + chr(b):
    #   pair_counts[pair]  how often the pair occurs in the corpus (sum of word frequencies);
    #   pair_words[pair]   the indices of the words that contain it, an int32 array that names each word once in the
    #                      first merges (the array phase, see _Words), later a list that may name a word twice; either
    #                      may name words that no longer contain the pair: those visits find nothing to merge, which
    #                      is cheaper than keeping the lists exact;
    #   queue              a max-heap of the pairs on (count, then the byte strings), see _PairQueue, which also keeps
    #                      rare pairs out of the heap until they could matter.
    # Lazy invalidation: counts only ever go down for existing pairs (a merge turns (x, a) into (x, ab)), and new pairs
    # all contain the new token and are pushed once the merge is done. So when an entry is popped whose count is no
    # longer the pair's count, it is pushed back with the current count (if above 0) and skipped; the first popped
    # entry whose count is current is the true maximum, because every live pair has an entry at least as large.
    # Cost of one merge: O(total length of the words that contain the pair) to rewrite them and update the counts of
    # their neighbouring pairs, plus O(log heap) per pushed or re-pushed entry; never a pass over the whole corpus.
    # The count changes of one merge are first summed per neighbour token, then applied once per changed pair.
    pair_counts, pair_words = count_pairs(words, freqs)
    corpus = _Words(words, freqs)
    vocab = [bytes([i]) for i in range(256)]
    keys = [_inverted(t) for t in vocab]
    queue = _PairQueue(pair_counts, keys)

    merges = []
    while len(merges) < num_merges:
        pair = queue.pop_best(pair_counts)
        if pair is None:  # no pair occurs any more: the corpus has no further merges
            break
        a, b = pair
        new = chr(len(vocab))  # the merged token, as a word character
        vocab.append(vocab[ord(a)] + vocab[ord(b)])
        keys.append(_inverted(vocab[-1]))
        merges.append((ord(a), ord(b)))
        tally = corpus.merge(pair_words.pop(pair), pair, new)
        _apply_pair_deltas(tally, pair, new, pair_counts, pair_words, queue)
        # A greedy left-to-right merge leaves no (a, b) behind. subtle: only after the deltas, which touch (a, b)
        # itself when a == b ("a a a" loses (a, a) twice, once as the merged pair and once as (b, y)), and may already
        # have forgotten it (_lose).
        pair_counts.pop(pair, None)
        if progress and len(merges) % PROGRESS_MERGES == 0:
            print(f"merges {len(merges):,}/{num_merges:,}  {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return vocab, merges


RARE_PAIR_COUNT = 8  # a new pair seen at most this often waits outside the heap (_PairQueue)
_MAX_COUNT = (1 << 64) - 1  # above any pair count: a count key is _MAX_COUNT - count


def _count_key(count: int) -> str:
    """4 characters that sort in descending order of count (0 <= count < 2^64): _MAX_COUNT - count in 16-bit digits,
    most significant first. _count_key(2) < _count_key(1)."""
    c = _MAX_COUNT - count
    return chr(c >> 48) + chr((c >> 32) & 0xFFFF) + chr((c >> 16) & 0xFFFF) + chr(c & 0xFFFF)


def _entry_count(entry: str) -> int:
    """The count a queue entry was made with (the inverse of its _count_key prefix)."""
    return _MAX_COUNT - ((ord(entry[0]) << 48) | (ord(entry[1]) << 32) | (ord(entry[2]) << 16) | ord(entry[3]))


class _PairQueue:
    """The merge loop's max-heap of pairs, on (count, then the byte strings), with lazy invalidation (see bpe_merges),
    and a waiting list: a brand-new pair that occurs at most RARE_PAIR_COUNT times goes there instead of into the
    heap, because the loop rarely gets down to such counts (on kernel-docs the 32,000th merge's pair still occurs 15
    times) while most new pairs are that rare (78% of all pushes at 32K). That keeps the heap ~4x smaller (~30 MB
    less at 32K) and saves their pushes. The first time the heap's top is no more frequent than RARE_PAIR_COUNT, the
    waiting pairs still alive join the heap at once, and from then on every pair goes straight in.

    An entry is one str, entry(count, a, b) = _count_key(count) + _inverted(a's bytes) + _inverted(b's bytes) + the
    pair, which sorts exactly as the tuple (-count, key(a), key(b)) would: the count key has a fixed width and the
    byte keys are prefix-free. note: why one str: heapq then compares two entries with one string comparison in C,
    where tuples compare element by element, and the keys of tied counts as tuples of ints again; late in the loop
    most counts tie. At 32K on kernel-docs the 86K heappops take 0.19-0.21 s instead of 0.36-0.46 (line profiles;
    BENCHMARKS.md). The pair is the entry's last two characters."""

    def __init__(self, pair_counts: dict, keys: list):
        self.keys = keys  # token id -> _inverted(token bytes); bpe_merges appends one per merge
        self.heap = [self.entry(n, p) for p, n in pair_counts.items()]
        heapq.heapify(self.heap)
        self.waiting: list | None = []  # None once flushed

    def entry(self, count: int, pair: str) -> str:
        """The heap entry of a pair that occurs `count` times."""
        return _count_key(count) + self.keys[ord(pair[0])] + self.keys[ord(pair[1])] + pair

    def push(self, count: int, pair: str) -> None:
        """Add a pair that occurs `count` (> 0) times and has no entry yet."""
        if count <= RARE_PAIR_COUNT and self.waiting is not None:
            self.waiting.append(pair)
        else:
            heapq.heappush(self.heap, self.entry(count, pair))

    def pop_best(self, pair_counts: dict) -> str | None:
        """Pop entries until one is current and return its pair: the most frequent pair (ties: the greater byte
        strings), or None once no pair is left. A stale entry, whose count is no longer the pair's count, is pushed
        back with the current count if that is above 0 (lazy invalidation). Every waiting pair occurs at most
        RARE_PAIR_COUNT times, so a current entry above that is the maximum whatever waits."""
        heap, heappush, heappop = self.heap, heapq.heappush, heapq.heappop  # note: local names are faster below
        while True:
            if self.waiting is not None and (not heap or _entry_count(heap[0]) <= RARE_PAIR_COUNT):
                self._flush_waiting(pair_counts)
            if not heap:
                return None
            entry = heappop(heap)
            pair = entry[-2:]
            count = pair_counts.get(pair, 0)
            if count == _entry_count(entry):
                return pair
            if count > 0:
                heappush(heap, _count_key(count) + entry[4:])

    def _flush_waiting(self, pair_counts: dict) -> None:
        """Move the waiting pairs that still occur into the heap, with their current counts."""
        for pair in self.waiting:
            count = pair_counts.get(pair, 0)
            if count > 0:
                self.heap.append(self.entry(count, pair))
        heapq.heapify(self.heap)
        self.waiting = None


class _NeighbourTally(NamedTuple):
    """How one merge of the pair (a, b) into `new` changes the neighbouring pairs, by neighbour token. Made by
    _rewrite_words (or _FlatWords.merge), applied by _apply_pair_deltas."""
    left_words: dict   # x -> the index of the word, once per occurrence with left neighbour x: (x, a) became (x, new)
    left_counts: dict  # x -> those occurrences, by frequency (the summed frequencies of left_words[x])
    right_words: dict  # y -> the same for each occurrence with right neighbour y: (b, y) became (new, y)
    right_counts: dict
    overlap: int       # back-to-back occurrences ("a b a b"), by frequency: their (b, a) is gone, and the (new, a) that
                       # right_words["a"] lists for them does not exist


def _rewrite_words(words: list[str], freqs: list[int], word_ids: list[int], pair: str, new: str) -> _NeighbourTally:
    """Merge `pair` into the token `new` in every listed word that still holds it (rewriting `words` in place), and
    list the neighbours of the merged occurrences, as they were before the rewrite.
    words = ["abab", "cab"]; _rewrite_words(words, [1, 2], [0, 1], "ab", "Z") turns words into ["ZZ", "cZ"] and
    lists left_words {"Z": [0], "c": [1]}, right_words {"a": [0]}, overlap 1."""
    # Each occurrence with left neighbour x turns (x, a) into (x, new), and with right neighbour y turns (b, y) into
    # (new, y). The loop only records which word each neighbour was seen in; the counts are the frequencies of those
    # words, summed afterwards in C (_neighbour_counts). note: that leaves the loop with no dict arithmetic per
    # occurrence: the 32K merge loop on kernel-docs is 5.6% faster (BENCHMARKS.md).
    a = pair[0]
    left_words, right_words = defaultdict(list), defaultdict(list)
    overlap = 0
    for i in word_ids:
        w = words[i]
        head, found, tail = w.partition(pair)
        if not found:  # the word no longer holds the pair (an earlier merge took one of its tokens)
            continue
        if pair not in tail:  # one occurrence (3 words in 4 here): its neighbours are head's last and tail's first
            if head:          # note: partition + concatenation, ~10% faster than the walk below for this case
                left_words[head[-1]].append(i)
            if tail:
                right_words[tail[0]].append(i)
            words[i] = head + new + tail
            continue
        j, end = len(head), 0  # two or more occurrences: walk them left to right
        while j >= 0:
            if j:
                if j == end:  # "a b a b": the left neighbour is the `new` just made, and the previous
                    x = new   # occurrence listed (new, a), which does not exist: count it out
                    overlap += freqs[i]
                else:
                    x = w[j - 1]
                left_words[x].append(i)
            end = j + 2
            if end < len(w):  # the right neighbour, as it is before this word is rewritten
                right_words[w[end]].append(i)
            j = w.find(pair, end)
        words[i] = w.replace(pair, new)  # BPE's merge: non-overlapping, left to right
    return _NeighbourTally(left_words, _neighbour_counts(left_words, freqs),
                           right_words, _neighbour_counts(right_words, freqs), overlap)


def _neighbour_counts(word_lists: dict, freqs: list[int]) -> dict:
    """neighbour -> occurrences: the summed frequencies of the words listed for it (a word once per occurrence)."""
    get = freqs.__getitem__
    return {x: sum(map(get, ids)) for x, ids in word_lists.items()}


class _Words:
    """The words the merge loop rewrites, in whichever form is faster: first _FlatWords, one array for all of them
    (the first merges list thousands of words each), then, from the first time that stops paying, the words as strs
    and _rewrite_words (most later merges list a few dozen words)."""

    def __init__(self, words: list[str], freqs: list[int]):
        self.words, self.freqs = words, freqs
        self.flat, self.freq_of = _FlatWords(words), np.asarray(freqs, np.int64)  # None once the array phase is over

    def merge(self, word_ids, pair: str, new: str) -> _NeighbourTally:
        """Merge `pair` into `new` in the listed words; tally the neighbours of the merged occurrences."""
        if self.flat is not None and not self.flat.worth_it(len(word_ids)):
            self.words[:], self.flat = self.flat.words(), None
            # One int object per word for the lists made from here on (an object array hands out the objects it
            # holds): a fresh int per list entry would cost 28 bytes x millions of entries.
            self.word_objs = np.array(list(range(len(self.words))), dtype=object)
        if self.flat is not None:
            return self.flat.merge(word_ids, pair, new, self.freq_of)
        if type(word_ids) is not list:  # an array the array phase made
            word_ids = self.word_objs[word_ids].tolist()
        return _rewrite_words(self.words, self.freqs, word_ids, pair, new)


class _FlatWords:
    """The words end to end in one array of token ids, for the merge loop's first merges, which list thousands of
    words each: a merge is then ~40 numpy calls on the listed words, with no Python step per word, where
    _rewrite_words takes ~1.5 us of Python per listed word. note: measured, a merge here is ~1.5x faster from ~250
    listed words and 2x from 1,000; the 32K merge loop takes 0.65x the time on a 1M-word corpus, and ~0.96x on
    kernel-docs, whose merges list fewer words (BENCHMARKS.md). Each word keeps a slot of its length at the start
    plus one: its tokens, then END, the room its merges free up filling with END too.
    _FlatWords(["ab", "b"]).tokens == [97, 98, END, 98, END]."""

    END = np.iinfo(np.uint32).max  # not a token id: no pair can span two words, and a word's neighbours are known
    MIN_WORDS = 150  # the words per merge below which _rewrite_words is faster (measured on kernel-docs, 32K)

    def __init__(self, words: list[str]):
        # note: the UTF-32 of a word is its ids (a word character is chr(id)); surrogatepass lets the ids 0xD800 to
        # 0xDFFF through, which are chrs like any other here
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        ids = np.frombuffer("".join(words).encode("utf-32-le", "surrogatepass"), np.uint32)  # (total,)
        self.tokens = np.insert(ids, np.cumsum(lengths), self.END)  # (total + num_words,) every slot, END after each
        self.size = lengths + 1  # (num_words,) each slot's size, fixed
        self.start = np.cumsum(self.size) - self.size  # (num_words,) where each slot begins
        self.average_words = None  # words listed per merge, a moving average (see worth_it)

    def worth_it(self, listed: int) -> bool:
        """Is this representation still the faster one? A merge here costs ~40 numpy calls whatever its size, so
        it pays while merges list many words, as the first ones do. The average over the last ~100 merges decides,
        so that the odd small merge among big ones does not end the array phase: the first time it drops below
        MIN_WORDS, the merge loop switches to _rewrite_words for good."""
        average = listed if self.average_words is None else self.average_words
        self.average_words = average + (listed - average) / 100
        return self.average_words >= self.MIN_WORDS

    def merge(self, word_ids: np.ndarray, pair: str, new: str, freq_of: np.ndarray) -> _NeighbourTally:
        """_rewrite_words on this representation: merge `pair` into `new` in the listed words (none listed twice) and
        tally the merged occurrences' neighbours, with the word lists as int32 arrays listing a word once.
        freq_of: (num_words,) int64, each word's frequency."""
        a, b, new_id, END = ord(pair[0]), ord(pair[1]), ord(new), self.END
        start, size = self.start[word_ids], self.size[word_ids]  # (m,) each
        ends = np.cumsum(size)  # (m,) where each listed word's slot ends in `tokens` below
        tokens = self.tokens[concatenated_ranges(start, size)]  # (n,) the listed words' slots end to end, last END
        # hit[k]: an occurrence starts at k. In a run of candidates ("a a a a" for the pair (a, a): runs need a == b)
        # BPE's left-to-right merge takes every other one, starting with the first.
        hit = np.zeros(tokens.size + 1, bool)  # two False at the end: hit[k - 2] is False for k < 2 (index -1, -2)
        np.logical_and(tokens[:-1] == a, tokens[1:] == b, out=hit[:-2])
        at = np.flatnonzero(hit)  # (occurrences,) at + 2 < n, since the last token is END, never b
        if a == b:
            # subtle: hit keeps the dropped ones, which changes nothing below: hit[at - 2] of a kept position is the
            # kept one two before it in its run, or, for a run's first, a position that is no occurrence at all
            at = every_other_in_runs(at)
        in_slot = np.searchsorted(ends, at, side="right")  # (occurrences,) which listed word each is in
        occurrence_word = word_ids[in_slot]
        freq = freq_of[occurrence_word]  # (occurrences,) each occurrence counts its word's frequency

        # Left neighbours: the token before (END: none), or `new` where the previous occurrence ends right here (an
        # overlap, see _NeighbourTally). Right neighbours: the token after, as it is before the rewrite. at - 1 = -1
        # reads the last token, END: no neighbour.
        left, right, overlaps = tokens[at - 1], tokens[at + 2], hit[at - 2]
        left[overlaps] = new_id
        has_left, has_right = left != END, right != END
        left_words, left_counts = _group_by_neighbour(left[has_left], occurrence_word[has_left], freq[has_left])
        right_words, right_counts = _group_by_neighbour(right[has_right], occurrence_word[has_right], freq[has_right])

        # The rewrite: an occurrence's first token becomes `new` and its second goes; each slot's remaining tokens
        # move up to its front, and the room freed at its end (one token per occurrence) fills with END.
        tokens[at] = new_id
        keep = np.ones(tokens.size, bool)
        keep[at + 1] = False
        removed = np.bincount(in_slot, minlength=size.size)  # (m,) per slot
        self.tokens[concatenated_ranges(start, size - removed)] = tokens[keep]  # every slot keeps its END: size >= 1
        freed = removed > 0
        self.tokens[concatenated_ranges((start + size - removed)[freed], removed[freed])] = END
        return _NeighbourTally(left_words, left_counts, right_words, right_counts, int(freq[overlaps].sum()))

    def words(self) -> list[str]:
        """The words as strs again (see _byte_words), for the rest of the merge loop."""
        in_use = self.tokens != self.END
        lengths = np.add.reduceat(in_use, self.start)
        text = self.tokens[in_use].tobytes().decode("utf-32-le", "surrogatepass")
        ends = np.cumsum(lengths)
        return list(map(text.__getitem__, map(slice, (ends - lengths).tolist(), ends.tolist())))


def concatenated_ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes)]), every size at least 1, as one cumsum:
    each position is the one before plus 1, except a range's first, which steps to its start. note: ~3x faster than
    the usual np.repeat(starts - (ends - sizes), sizes) + np.arange(total) (0.46 vs 1.4 ms for 100K ranges, 700K
    positions): two passes over the total where that is three, and np.repeat copies range by range. _FlatWords.merge
    builds three per merge; with them (and writing the rewritten slots straight back) its merges take ~12% less.
    concatenated_ranges(np.array([5, 0]), np.array([2, 3])).tolist() == [5, 6, 0, 1, 2]"""
    if not len(sizes):
        return np.zeros(0, np.int64)
    ends = np.cumsum(sizes)  # (m,) each range's end in the result
    steps = np.ones(ends[-1], np.int64)  # (total,)
    steps[0] = starts[0]
    steps[ends[:-1]] = starts[1:] - (starts[:-1] + sizes[:-1] - 1)  # from the last of range k - 1 to the start of k
    return np.cumsum(steps, out=steps)


def every_other_in_runs(at: np.ndarray) -> np.ndarray:
    """Sorted positions with only the 1st, 3rd, 5th, ... of each run of consecutive positions kept: where a pair
    (a, a) starts in "a a a a", BPE's non-overlapping left-to-right merge takes every other position, from the run's
    start. note: on the positions, not on a mask of all tokens, so its passes are over the occurrences only.
    every_other_in_runs(np.array([0, 1, 2, 4, 5])).tolist() == [0, 2, 4]"""
    follows = at[1:] == at[:-1] + 1  # (m - 1,) position k + 1 continues k's run
    if not follows.any():  # no run (the usual case): nothing to drop
        return at
    k = np.arange(at.size)
    run_start = np.maximum.accumulate(np.where(np.r_[True, ~follows], k, 0))  # (m,) index of each one's run start
    return at[(k - run_start) % 2 == 0]


def _group_by_neighbour(neighbour: np.ndarray, word: np.ndarray, freq: np.ndarray) -> tuple[dict, dict]:
    """One merge's occurrences, grouped by neighbour token: ({chr(neighbour): int32 array of the words they are in,
    each once}, {chr(neighbour): their summed frequencies}). All three inputs (k,), one entry per occurrence, in text
    order (so a word's occurrences are next to each other)."""
    if not neighbour.size:
        return {}, {}
    # stable: each word's occurrences stay together in its group. note: numpy sorts 16-bit keys by radix sort, 3x
    # faster here than the 32-bit sort (ids below 65,536: vocabularies up to that size)
    key = neighbour.astype(np.uint16) if neighbour.max() < 1 << 16 else neighbour
    order = np.argsort(key, kind="stable")
    neighbour, word, freq = neighbour[order], word[order], freq[order]
    new_group = np.empty(neighbour.size, bool)
    new_group[0] = True
    np.not_equal(neighbour[1:], neighbour[:-1], out=new_group[1:])
    first = np.flatnonzero(new_group)
    keys = list(map(chr, neighbour[first].tolist()))
    counts = np.add.reduceat(freq, first).tolist()
    once = new_group.copy()  # a word's first occurrence in each group
    once[1:] |= word[1:] != word[:-1]
    bounds = [*(np.cumsum(once)[first] - 1).tolist(), int(once.sum())]  # each group's start in word[once], then end
    word = word[once]
    word_lists = map(word.__getitem__, map(slice, bounds[:-1], bounds[1:]))
    return dict(zip(keys, word_lists)), dict(zip(keys, counts))


def _apply_pair_deltas(tally: _NeighbourTally, pair: str, new: str, pair_counts: dict, pair_words: dict,
                       queue: _PairQueue) -> None:
    """Apply one merge's tally to the bookkeeping, once per changed pair: the old neighbour pairs (x, a) and (b, y)
    lose their counts; the new pairs (x, new) and (new, y), all brand new, get theirs and the tally's word lists, and
    are pushed on the queue if they occur."""
    a, b = pair
    left_words, right_words, overlap = tally.left_words, tally.right_words, tally.overlap
    for x, count in tally.left_counts.items():
        if x != new:  # (new, a) did not exist before this merge
            _lose(pair_counts, pair_words, x + a, count)
        x_new = x + new
        pair_counts[x_new] = count
        pair_words[x_new] = left_words[x]
        queue.push(count, x_new)  # count > 0: every left neighbour is an occurrence
    for y, count in tally.right_counts.items():
        _lose(pair_counts, pair_words, b + y, count)  # one per listed occurrence: an overlap's (b, a) is gone too
        if y == a:
            count -= overlap  # but an overlap made no (new, a) (see _NeighbourTally)
        if count > 0:  # 0 when every (new, a) the tally saw was an overlap (see _rewrite_words)
            new_y = new + y
            pair_counts[new_y] = count
            pair_words[new_y] = right_words[y]
            queue.push(count, new_y)


def _lose(pair_counts: dict, pair_words: dict, pair: str, count: int) -> None:
    """Take `count` occurrences from a pair; a pair left with none is forgotten, its word list too. Most pairs a merge
    touches end there (at 32K merges on kernel-docs, half of the pairs ever seen, holding 70% of all the word-list
    entries), so forgetting them keeps memory to the live pairs. Its queue entries go when popped or flushed (count 0:
    dropped).
    _lose({"ab": 3}, {"ab": [0]}, "ab", 3) leaves both dicts empty."""
    left = pair_counts[pair] - count
    if left:
        pair_counts[pair] = left
    else:
        del pair_counts[pair]
        pair_words.pop(pair, None)  # None: the merged pair itself, whose list bpe_merges has already taken


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector inside a `with` block (reference counting still frees everything that
    is not in a reference cycle). Training allocates millions of small lists, tuples and strings but makes no cycles;
    with the collector on, it would rescan the ever-growing counts and bookkeeping again and again (~15% of the merge
    loop's time, ~8% of the pre-tokenisation workers', which are forked inside the block and inherit the pause)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def train_bpe(input_path, vocab_size: int, special_tokens=(), *, num_workers=None, progress=False):
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns (vocab, merges): vocab maps id -> bytes (0..255 the single bytes, then one id per merge in creation order,
    then the special tokens); merges is the list of (bytes, bytes) pairs in creation order. Identical to
    train_bpe_naive, whatever num_workers is."""
    specials = check_training_args(input_path, vocab_size, special_tokens)
    t0 = time.perf_counter()
    num_merges = vocab_size - 256 - len(specials)
    with gc_paused():
        counts = count_pretokens_file(input_path, specials, num_workers)
        if progress:
            dt = time.perf_counter() - t0
            mb = os.path.getsize(input_path) / 1e6
            print(f"pre-tokenised {mb:.1f} MB in {dt:.1f} s ({mb / dt:.1f} MB/s), {len(counts):,} unique pre-tokens",
                  file=sys.stderr)
        words, freqs = _byte_words(counts)  # a word is a str with one character per token, chr(id)
        del counts  # note: ~20 MB on kernel-docs that the merge loop, whose memory peaks at its end, no longer needs
        vocab, merges = bpe_merges(words, freqs, num_merges, progress=progress, t0=t0)
    if len(merges) < num_merges:
        print(f"note: the corpus has only {len(merges)} distinct merges; stopping at vocab size "
              f"{256 + len(merges) + len(specials)} instead of {vocab_size}", file=sys.stderr)

    vocab_dict = dict(enumerate(vocab))
    for s in specials:
        vocab_dict[len(vocab_dict)] = s.encode("utf-8")
    return vocab_dict, [(vocab[a], vocab[b]) for a, b in merges]


# ---------------------------------------------------------------------------------------------------------------------
# Files: GPT-2's vocab.json / merges.txt format
# ---------------------------------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters: printable Latin-1 bytes map to themselves,
    the others (control bytes, space, ...) to chr(256 + k). Tokens then contain no spaces or newlines, so one merge
    fits on one "a b" line. bytes_to_unicode()[ord(" ")] == "Ġ", bytes_to_unicode()[ord("\\n")] == "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_to_str(token: bytes) -> str:
    """A token as it is written in vocab.json / merges.txt: token_to_str(b" hi\\n") == "ĠhiĊ"."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def str_to_token(s: str, where: str) -> bytes:
    """The inverse of token_to_str; a character outside the alphabet is a ValueError that names `where`."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{where}: {s!r} has character {e.args[0]!r} outside GPT-2's byte-to-unicode alphabet") from None


def check_output_dir(path) -> None:
    """Raise FileNotFoundError (naming it) unless the directory that `path` goes into exists; it is never created."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist; create it first")


def write_text_files(files: dict) -> None:
    """Write {path: text} (UTF-8) all or nothing: each file through cli.atomic_file, and every one complete on disk
    before any of them replaces its old version, so that a failed write (a cli.WriteFault) leaves all the old files in
    place: a tokenizer directory is never half old, half new. The directories must exist (check_output_dir).
    note: the os.replace()s still come one after another; they need no space, so only a crash between them can leave
    a mix."""
    for path in files:
        check_output_dir(path)
    with contextlib.ExitStack() as stack:  # leaving it, each atomic_file (last first) replaces its file
        for path, text in files.items():
            data = text.encode("utf-8")
            f = stack.enter_context(atomic_file(path, needed=len(data)))
            f.write(data)
            # subtle: flush and fsync here, not only in atomic_file's exit, so that a full disk or an I/O error shows
            # while no file has been replaced yet (a failure in the first exit would come after the last's replace).
            f.sync()


def tokenizer_file_texts(vocab: dict[int, bytes], merges: list) -> tuple[str, str]:
    """The text of vocab.json ({token string: id}) and of merges.txt (a version line, then one "a b" line per merge).
    tokenizer_file_texts({0: b"a", 1: b"b", 2: b"ab"}, [(b"a", b"b")]) == ('{\\n"a": 0,\\n"b": 1,\\n"ab": 2\\n}\\n',
                                                                       '#version: 0.2\\na b\\n')"""
    strings = {token_to_str(t): i for i, t in sorted(vocab.items())}
    if len(strings) != len(vocab):
        raise ValueError("vocab has two ids for the same byte string; vocab.json cannot represent that")
    return (json.dumps(strings, ensure_ascii=False, indent=0) + "\n",
            "#version: 0.2\n" + "".join(f"{token_to_str(a)} {token_to_str(b)}\n" for a, b in merges))


def save_tokenizer(vocab: dict[int, bytes], merges: list, vocab_path, merges_path) -> None:
    """Write vocab.json and merges.txt (both or, on a failed write, neither: write_text_files)."""
    vocab_text, merges_text = tokenizer_file_texts(vocab, merges)
    write_text_files({vocab_path: vocab_text, merges_path: merges_text})


def load_tokenizer_files(vocab_path, merges_path) -> tuple[dict[int, bytes], list]:
    """Read what save_tokenizer writes (and OpenAI's GPT-2 files); raise ValueError naming the bad line."""
    try:
        raw = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{vocab_path} is not valid JSON ({e}); expected {{token: id}}") from None
    if not isinstance(raw, dict) or not all(isinstance(i, int) and i >= 0 for i in raw.values()):
        raise ValueError(f"{vocab_path} must map token strings to non-negative integer ids")
    vocab = {i: str_to_token(s, str(vocab_path)) for s, i in raw.items()}
    if len(vocab) != len(raw):
        raise ValueError(f"{vocab_path} gives the same id to two tokens")
    known = set(vocab.values())
    merges = []
    for n, line in enumerate(Path(merges_path).read_text(encoding="utf-8").split("\n"), start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_path} line {n}: expected two tokens separated by one space, got {line!r}")
        a, b = (str_to_token(p, f"{merges_path} line {n}") for p in parts)
        for part in (a, b, a + b):
            if part not in known:
                raise ValueError(f"{merges_path} line {n}: {token_to_str(part)!r} is not in {vocab_path}; "
                                 f"the two files do not belong together")
        merges.append((a, b))
    return vocab, merges


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------------

class _Cache(dict):
    """A dict that computes missing values with `fn`; `map(cache.__getitem__, keys)` then runs in C for hits."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __missing__(self, key):
        value = self[key] = self.fn(key)
        return value


def _split_chunks(texts: list[str]) -> tuple[list[str], list[int]]:
    """The chunks (CHUNK_RE) of all the texts in one list, and how many each text has.
    _split_chunks(["a b", "", " c"]) == (["a", " b", " c"], [2, 0, 1])
    note: one list, not one per text (a document, between special tokens): the cyclic garbage collector tracks every
    list, and a few thousand of them, each alive until encode returns, set off collections that walk through every
    chunk they hold: 8-16% of a warm 10 MB encode (BENCHMARKS.md). Each text's findall list is freed as soon as it is
    copied in, which keeps the collector's count of new objects where it was."""
    chunks, counts = [], []
    for text in texts:
        found = CHUNK_RE.findall(text)
        chunks += found
        counts.append(len(found))
    return chunks, counts


class _HashTable:
    """A dict from int64 keys to int64 values in numpy arrays, looked up for a whole array of keys at once (the
    encoder's batched BPE looks up ~10^5 pairs per round): open addressing with linear probing, in a table 4 to 8
    times the number of keys, so a lookup rarely probes more than one slot.
    note: a sorted array of the keys and np.searchsorted is the simpler way to do this; each of its lookups is ~16
    dependent steps through the array, most of them cache misses, where a hash slot is one. 3-4x faster for 400,000
    lookups among GPT-2's 50,000 merges (BENCHMARKS.md); tests check _bpe_batch, its user, equal to _bpe.
    _HashTable(np.array([3, 7]), np.array([30, 70]), -1).get(np.array([7, 5, 3])).tolist() == [70, -1, 30]"""

    EMPTY = -1  # a free slot (keys are >= 0)
    FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the top bits of key * this spread keys evenly

    def __init__(self, keys: np.ndarray, values: np.ndarray, missing: int):
        """keys (n,) distinct, >= 0; values (n,); missing: what get gives for a key not in the table."""
        self.bits = max(4, int(keys.size * 4 - 1).bit_length())  # 2^bits slots, at least 4 per key
        self.keys = np.full(1 << self.bits, self.EMPTY, np.int64)  # (slots,)
        self.values = np.full(1 << self.bits, missing, np.int64)  # (slots,)
        self.missing = missing
        # Linear probing, all keys at once: each round every key still waiting tries its current slot, one key per
        # free slot takes it, and the others move on one slot.
        slot = self._slot(keys)  # (n,)
        waiting = np.arange(keys.size)
        while waiting.size:
            tried = slot[waiting]
            free = np.flatnonzero(self.keys[tried] == self.EMPTY)  # which of the waiting keys found a free slot
            taken, first = np.unique(tried[free], return_index=True)  # each free slot tried, and its first taker
            won = free[first]
            self.keys[taken], self.values[taken] = keys[waiting[won]], values[waiting[won]]
            waiting = np.delete(waiting, won)
            slot[waiting] = (slot[waiting] + 1) & (self.keys.size - 1)

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        """The home slot of each key: the top `bits` bits of key * FIBONACCI (mod 2^64; Knuth's multiplicative hash)."""
        return ((keys.astype(np.uint64) * self.FIBONACCI) >> np.uint64(64 - self.bits)).astype(np.intp)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """(m,) int64 keys -> (m,) their values, `missing` for keys not in the table. A key's probe goes slot by slot
        from its home until it finds the key, or a free slot (then the key is not in the table)."""
        out = np.full(keys.size, self.missing, np.int64)
        slot = self._slot(keys)
        probing = np.arange(keys.size)
        while probing.size:
            at = slot[probing]
            found = self.keys[at]
            hit = found == keys[probing]
            out[probing[hit]] = self.values[at[hit]]
            probing = probing[~hit & (found != self.EMPTY)]  # a different key there: the next slot
            slot[probing] = (slot[probing] + 1) & (self.keys.size - 1)
        return out


class Tokenizer:
    """Encode text to ids and back with a byte-level BPE vocab (ours or GPT-2's: any id order works).

    tok = Tokenizer.from_dir("runs/tok"); tok.decode(tok.encode("hello<|endoftext|>")) == "hello<|endoftext|>"
    """

    CACHE_LIMIT = 1 << 20  # entries per cache before it is cleared, so streaming huge files keeps memory bounded
    CUT_LOOKBACK = 4096  # characters before the end of the buffer searched for a safe cut (see _safe_cut)

    def __init__(self, vocab: dict[int, bytes], merges: list, special_tokens=None):
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = unique_special_tokens(special_tokens or ())
        token_ids = {t: i for i, t in self.vocab.items()}
        for s in self.special_tokens:  # specials absent from the vocab are appended
            if s.encode("utf-8") not in token_ids:
                i = max(self.vocab, default=-1) + 1
                self.vocab[i] = s.encode("utf-8")
                token_ids[s.encode("utf-8")] = i
        self.special_token_ids = {s: token_ids[s.encode("utf-8")] for s in self.special_tokens}
        missing = [b for b in range(256) if bytes([b]) not in token_ids]
        if missing:
            raise ValueError(f"vocab lacks the single byte {missing[0]:#04x}; byte-level BPE needs all 256")
        self._byte_ids = [token_ids[bytes([b])] for b in range(256)]
        # (id_a, id_b) -> (rank, id of the merged token): merging = repeatedly apply the lowest-ranked pair present.
        self._ranks = {}
        for rank, (a, b) in enumerate(self.merges):
            if a + b not in token_ids or a not in token_ids or b not in token_ids:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses a token that is not in the vocab")
            self._ranks.setdefault((token_ids[a], token_ids[b]), (rank, token_ids[a + b]))
        self._special_re = special_pattern(self.special_tokens)
        self._pretoken_cache = _Cache(self._bpe)
        self._chunk_cache = {}

    def __reduce__(self):  # pickle (for worker processes) without the caches
        return (Tokenizer, (self.vocab, self.merges, self.special_tokens))

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None) -> "Tokenizer":
        vocab, merges = load_tokenizer_files(vocab_path, merges_path)
        return cls(vocab, merges, special_tokens)

    @classmethod
    def from_dir(cls, directory) -> "Tokenizer":
        """A tokenizer directory: vocab.json, merges.txt and (optional) special_tokens.json, a JSON list of strings."""
        d = Path(directory)
        for name in ("vocab.json", "merges.txt"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} does not exist; is {d} a tokenizer directory (bpe.py train --out)?")
        specials = []
        if (d / "special_tokens.json").is_file():
            try:
                specials = json.loads((d / "special_tokens.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{d / 'special_tokens.json'} is not valid JSON ({e}); expected a list of strings") from None
            if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
                raise ValueError(f"{d / 'special_tokens.json'} must be a JSON list of strings")
        return cls.from_files(d / "vocab.json", d / "merges.txt", specials)

    def save_dir(self, directory) -> None:
        """What from_dir reads: vocab.json, merges.txt and special_tokens.json, all three or (write_text_files) none."""
        d = Path(directory)
        vocab_text, merges_text = tokenizer_file_texts(self.vocab, self.merges)
        write_text_files({d / "vocab.json": vocab_text, d / "merges.txt": merges_text,
                          d / "special_tokens.json": json.dumps(self.special_tokens, ensure_ascii=False) + "\n"})

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    # -- encoding -----------------------------------------------------------------------------------------------------

    _NO_MERGE = (1 << 62, -1)  # the "rank" of a pair that is not a merge: larger than every real rank

    def _bpe(self, pretoken: str) -> tuple:
        """Ids of one pre-token: start from its bytes, then merge the lowest-ranked adjacent pair until none is left.
        Merging by rank gives the same result as replaying the merge list in order, without scanning it. Each step
        is one C-level min() over the (rank, merged id) of the current pairs; only the two pairs beside the merge
        change. (Occurrences of the best pair are merged one at a time, leftmost first: a pair that contains the new
        token always ranks later, so this equals merging all of them left to right.)"""
        get, none = self._ranks.get, self._NO_MERGE
        ids = list(map(self._byte_ids.__getitem__, pretoken.encode("utf-8")))
        pairs = list(map(get, zip(ids, ids[1:]), repeat(none)))  # pairs[k]: (rank, merged id) of (ids[k], ids[k+1])
        while pairs:
            best = min(pairs)
            if best is none or best[1] < 0:
                break
            i = pairs.index(best)
            new = best[1]
            ids[i:i + 2] = (new,)
            del pairs[i]
            if i < len(pairs):
                pairs[i] = get((new, ids[i + 1]), none)
            if i > 0:
                pairs[i - 1] = get((ids[i - 1], new), none)
        return tuple(ids)

    # The same merges for many pre-tokens at once, in numpy: the cold path of encoding, where tens of thousands of new
    # pre-tokens arrive together (60K in the first 10 MB of kernel-docs), runs about 2x faster this way than one
    # _bpe call each. _bpe stays the reference; tests check the two agree.
    BATCH_MIN = 64  # fewer new pre-tokens than this: one _bpe call each (numpy's per-call overhead would dominate)
    # A pair's merge packed in one int64, rank << 32 | merged id: the lowest rank is then one min(), and the merged id
    # comes with it. Not a merge: above every real one.
    _NO_MERGE_PACKED = np.iinfo(np.int64).max

    @cached_property
    def _merge_table(self) -> tuple[int, "_HashTable"]:
        """V = vocab_size, and the merges as a _HashTable: pair key id_a * V + id_b -> its packed merge."""
        V, n = self.vocab_size, len(self._ranks)
        # note: np.fromiter over the flattened pairs, 2.5x faster than np.array(list(...)) of 50,000 tuples
        pairs = np.fromiter(chain.from_iterable(self._ranks), np.int64, 2 * n).reshape(n, 2)  # (n, 2) id_a, id_b
        rank_and_id = np.fromiter(chain.from_iterable(self._ranks.values()), np.int64, 2 * n).reshape(n, 2)
        packed = (rank_and_id[:, 0] << 32) | rank_and_id[:, 1]
        return V, _HashTable(pairs[:, 0] * V + pairs[:, 1], packed, self._NO_MERGE_PACKED)

    def _merges_of(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """The packed merge of each pair of ids (first[k], second[k]), _NO_MERGE_PACKED where that is no merge."""
        V, table = self._merge_table
        return table.get(first * V + second)

    @cached_property
    def _byte_pair_merges(self) -> np.ndarray:
        """(65536,) the packed merge of each pair of bytes, at byte_a << 8 | byte_b: the first round of _bpe_batch
        looks up every position, and indexing this table is ~6x faster than the _HashTable (2.1 vs 12.1 ms for 421,000
        pairs of ASCII bytes)."""
        byte_ids = np.array(self._byte_ids, np.int64)
        return self._merges_of(byte_ids.repeat(256), np.tile(byte_ids, 256))

    def _look_up_pairs(self, ids, word, at, merge) -> None:
        """merge[at] := the packed merge of the pair (ids[at], ids[at + 1]), _NO_MERGE_PACKED where the two positions
        belong to different words. All arrays (n,) int64 except `at`, positions < n - 1."""
        merge[at] = np.where(word[at] == word[at + 1], self._merges_of(ids[at], ids[at + 1]), self._NO_MERGE_PACKED)

    def _bpe_batch(self, pretokens: list[str]) -> list[tuple]:
        """[self._bpe(p) for p in pretokens], every word advanced one merge per round.

        All words lie end to end in one array, `word` saying which word each position belongs to. Each round: the
        lowest rank in each word (np.minimum.reduceat) is that word's next merge; every occurrence of it is merged,
        leftmost first, so in a run of equal pairs ("aaa" for the pair "aa") every other one. Words without a merge
        left are finished and leave the arrays, and only the pairs beside a merge are looked up again."""
        data = np.frombuffer("".join(pretokens).encode("utf-8"), np.uint8)  # (n,) all words' bytes
        ids = np.array(self._byte_ids, np.int64)[data]  # (n,) their token ids
        # Which word each byte is in, from the words' lengths in characters: a character starts at each byte that is
        # not a UTF-8 continuation byte (0b10xxxxxx). note: ~10x faster than encoding each word to count its bytes
        char_ends = np.cumsum(np.fromiter(map(len, pretokens), np.int64, len(pretokens)))
        byte_ends = np.append(np.flatnonzero((data & 0xC0) != 0x80), data.size)[char_ends]  # (words,)
        word = np.repeat(np.arange(len(pretokens), dtype=np.int32), np.diff(byte_ends, prepend=0))  # (n,)
        merge = np.full(ids.size, self._NO_MERGE_PACKED)  # (n,) the packed merge of the pair starting there
        merge[:-1] = np.where(word[:-1] == word[1:],
                              self._byte_pair_merges[(data[:-1].astype(np.intp) << 8) | data[1:]], self._NO_MERGE_PACKED)
        done_ids, done_word = [], []
        while ids.size:
            starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
            best = np.repeat(np.minimum.reduceat(merge, starts), np.diff(np.r_[starts, ids.size]))  # (n,) word's min
            finished = best == self._NO_MERGE_PACKED
            # a run of equal pairs ("a a a" for (a, a)) merges every other one
            at = every_other_in_runs(np.flatnonzero((merge == best) & ~finished))
            ids[at] = merge[at] & 0xFFFFFFFF  # the merged id, from the packed merge
            done_ids.append(ids[finished])
            done_word.append(word[finished])
            keep = ~finished
            keep[at + 1] = False  # the right half of each merged pair
            at = (np.cumsum(keep) - 1)[at]  # where the merged tokens are after the deletion
            ids, word, merge = ids[keep], word[keep], merge[keep]
            if ids.size:
                changed = np.zeros(ids.size, bool)  # the pairs that start at or end at a merged token
                changed[at] = True
                changed[at[at > 0] - 1] = True
                changed[-1] = False
                merge[-1] = self._NO_MERGE_PACKED
                self._look_up_pairs(ids, word, np.flatnonzero(changed), merge)
        all_word = np.concatenate(done_word)
        all_ids = tuple(np.concatenate(done_ids)[np.argsort(all_word, kind="stable")].tolist())  # word by word
        ends = np.cumsum(np.bincount(all_word, minlength=len(pretokens)))
        return list(map(all_ids.__getitem__, map(slice, [0, *ends[:-1].tolist()], ends.tolist())))

    def _cache_chunks(self, chunks: list[str], counts: list[int]) -> None:
        """Put the ids of every chunk not yet in the chunk cache into it; the GPT-2 regex and BPE see only new text.
        chunks, counts: as _split_chunks gives them.

        Only a text's first chunk can start with non-whitespace, and only its last can end with whitespace. Every
        other chunk starts with whitespace and ends without, so, by the lemma above, any number of them can be joined,
        pre-tokenised by one regex call (find_pretokens: ASCII and other text separately, each with its fastest
        regex) and split back (_joined_chunk_ids). The first and last chunks are done one by one."""
        cache, pretoken_ids = self._chunk_cache, self._pretoken_cache.__getitem__
        new = dict.fromkeys(filterfalse(cache.__contains__, chunks) if cache else chunks)  # once each, in order
        lasts = list(accumulate(counts))  # one past each text's last chunk
        edges = [chunks[i] for n, end in zip(counts, lasts) if n for i in (end - n, end - 1)]
        ends = {c for c in edges if c in new and not _joinable(c)}
        for chunk in ends:
            new[chunk] = tuple(chain.from_iterable(map(pretoken_ids, find_pretokens(chunk))))
        joinable = list(filterfalse(ends.__contains__, new)) if ends else list(new)
        for group in _split_ascii(joinable):
            new.update(zip(group, self._joined_chunk_ids(group)))
        # note: `new`, now chunk -> ids, goes into the cache in one update. Into an empty cache (a cold start) that is
        # one copy of its table: with the fill of `new` above, ~30 ms for 191,000 chunks against ~42 ms for inserting
        # them one by one into a growing table
        cache.update(new)

    def _joined_chunk_ids(self, chunks: list[str]) -> Iterator[tuple]:
        """The ids of each of the chunks, in order (chunks that can be joined, see _cache_chunks), with one regex call
        and no Python loop per chunk or pre-token: every chunk ends where one of its pre-tokens ends, so the
        cumulative lengths locate each chunk's last pre-token (np.searchsorted), and each chunk's ids are one slice of
        all the ids. New pre-tokens go into the pre-token cache. The plain version, one pre-token at a time, is
        encode_plain; tests check the two agree."""
        if not chunks:
            return iter(())
        pieces = find_pretokens("".join(chunks))
        new = list(filterfalse(self._pretoken_cache.__contains__, dict.fromkeys(pieces)))
        if len(new) >= self.BATCH_MIN:
            self._pretoken_cache.update(zip(new, self._bpe_batch(new)))
        piece_ids = list(map(self._pretoken_cache.__getitem__, pieces))  # any still missing: _bpe, one by one
        all_ids = tuple(reduce(operator.iadd, piece_ids, []))  # note: iadd = list.extend by tuple, see encode
        piece_ends = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)))  # in characters
        chunk_ends = np.cumsum(np.fromiter(map(len, chunks), np.int64, len(chunks)))
        last_piece = np.searchsorted(piece_ends, chunk_ends)  # index of each chunk's last pre-token
        assert np.array_equal(piece_ends[last_piece], chunk_ends), "a chunk does not end where a pre-token ends"
        ids_end = np.cumsum(np.fromiter(map(len, piece_ids), np.int64, len(piece_ids)))[last_piece]  # in ids
        ids_start = np.concatenate(([0], ids_end[:-1]))
        return map(all_ids.__getitem__, map(slice, ids_start.tolist(), ids_end.tolist()))

    def encode_plain(self, text: str) -> list[int]:
        """Reference path without the chunk cache: GPT-2 regex over the whole text, then BPE per pre-token."""
        parts = self._special_re.split(text) if self._special_re else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_token_ids[part])
            else:
                for pretoken in PRETOKEN_RE.findall(part):
                    ids.extend(self._bpe(pretoken))
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens are matched first (longest wins) and never split; the ordinary text between them
        is cut into chunks (see CHUNK_RE), and each chunk's ids come from the chunk cache, filled for all of this
        text's new chunks at once (_cache_chunks)."""
        if len(self._chunk_cache) > self.CACHE_LIMIT:  # bounded memory when streaming: cleared between calls
            self._chunk_cache.clear()
            self._pretoken_cache.clear()
        parts = self._special_re.split(text) if self._special_re else [text]  # odd entries: the specials themselves
        chunks, counts = _split_chunks(parts[::2])
        # note: assemble first, and fill the caches only if a chunk is missing (KeyError): when every chunk is cached
        # (warm), that saves a pass of cache lookups over all chunks, ~5% of the encode; when one is not, the
        # assembly stops at it, the caches are filled for all of this text's new chunks at once, and it starts over.
        try:
            return self._assemble(parts, chunks, counts)
        except KeyError:
            pass
        with gc_paused():  # note: filling the caches makes ~10^5 tuples, no cycles; the collector's rescans of the
            self._cache_chunks(chunks, counts)  # growing caches cost ~8% of a cold 10 MB encode (BENCHMARKS.md)
        return self._assemble(parts, chunks, counts)

    def _assemble(self, parts: list[str], chunks: list[str], counts: list[int]) -> list[int]:
        """The ids of encode's text from the chunk cache (KeyError if a chunk is not in it): the chunks' ids in
        order, with each special token's id between the texts it separated (counts[k] chunks in the k-th text)."""
        ids_of, texts = self._chunk_cache.__getitem__, iter(chunks)  # one pass over the chunks, text after text
        # note: reduce(operator.iadd, ...) is `ids += chunk_ids` for each chunk, in C: one list.extend from a tuple per
        # chunk, which copies the ids as a block, ~20% faster here than chain.from_iterable's one step per id.
        ids = reduce(operator.iadd, map(ids_of, islice(texts, counts[0])), [])
        for special, n in zip(parts[1::2], counts[1:]):
            ids.append(self.special_token_ids[special])
            ids = reduce(operator.iadd, map(ids_of, islice(texts, n)), ids)  # the same list, extended in place
        return ids

    def encode_iterable(self, iterable: Iterable[str], *, buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open file), holding about `buffer_chars` of text at a time.
        Yields exactly encode("".join(iterable)): text is only cut at safe points (see _safe_cut), so a long stretch
        without whitespace stays buffered until whitespace arrives."""
        buf = ""
        for piece in iterable:
            buf += piece
            if len(buf) < buffer_chars:
                continue
            cut = self._safe_cut(buf)
            if cut:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
        yield from self.encode(buf)

    def _safe_cut(self, buf: str) -> int:
        """A position p with encode(buf[:p]) + encode(buf[p:] + rest) == encode(buf + rest) for any rest, or 0.
        p is the last chunk boundary (before whitespace that follows non-whitespace) that leaves room for the longest
        special token after it (so no special match can still change), moved back to the start of a special token
        match if one spans it (a match start is itself a safe cut: special tokens are split off first)."""
        longest = max(map(len, self.special_tokens), default=0)
        limit = len(buf) - longest
        start = max(0, limit - self.CUT_LOOKBACK)
        cut = 0
        for m in CHUNK_START.finditer(buf[start:limit]):
            cut = start + m.start()
        if not cut or self._special_re is None:
            return cut
        for m in self._special_re.finditer(buf, 0, cut + longest):
            if m.start() < cut < m.end():
                return m.start()
        return cut

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocab (size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------------
# Sharing a tokenizer: Hugging Face tokenizer.json and tiktoken's .tiktoken
# ---------------------------------------------------------------------------------------------------------------------
# Both libraries can run a Tokenizer exactly (tests/test_hf.py compares ids on random Unicode, special tokens and real
# text): HF `tokenizers` as a BPE model with our merges in rank order behind the GPT-2 regex, tiktoken with each token's
# rank = its id. Both files are plain JSON / text, so bpe.py needs neither library; `tokenizer_from_hf_json` reads a
# tokenizer.json back (train.py import), refusing what Tokenizer cannot reproduce.

def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The tokenizer.json of `tok`: what tokenizers.Tokenizer.from_file and transformers' AutoTokenizer load.
    hf_tokenizer_json(tok)["model"]["merges"][0] == ["Ġ", "t"] for a tokenizer whose first merge is (b" ", b"t")."""
    # Pitfalls, each of which changes ids (found by checking against tiktoken):
    #   - ByteLevel's default add_prefix_space=True puts a space before the text (" hello" instead of "hello");
    #   - Split with a plain string pattern matches that string literally: the GPT-2 regex must be {"Regex": ...};
    #   - merges are written as pairs, not "a b" strings, so no token's characters can be split wrongly.
    # subtle: ByteLevel(use_regex=False) after our Split, not ByteLevel(use_regex=True): the latter is the same GPT-2
    # regex today, but spelling it out keeps the file independent of the library's built-in pattern.
    specials = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for s, i in sorted(tok.special_token_ids.items(), key=lambda item: item[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_PAT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": _hf_vocab(tok),
                  # a repeated pair keeps its first rank, as Tokenizer does (HF would keep the last)
                  "merges": [[token_to_str(a), token_to_str(b)] for a, b in dict.fromkeys(tok.merges)]},
    }


def _hf_vocab(tok: Tokenizer) -> dict[str, int]:
    """The BPE model's vocab: each token in byte-level characters (token_to_str), but a special token as its plain
    text. subtle: when HF loads tokenizer.json, an added token keeps its id only if the vocab holds its content under
    that id; otherwise it gets a fresh id past the vocab (a special token with a space in it would move)."""
    special_ids = {i: s for s, i in tok.special_token_ids.items()}
    for s in special_ids.values():
        # subtle: HF's ByteLevel decoder reads a token made only of byte-level characters as bytes ("é" is byte 0xE9),
        # added tokens included; any other character makes it take the token's UTF-8 as it is.
        if all(c in CHAR_TO_BYTE for c in s) and token_to_str(s.encode("utf-8")) != s:
            raise ValueError(f"special token {s!r} would decode wrongly in Hugging Face tokenizers (its ByteLevel "
                             f"decoder reads {s!r} as the bytes {bytes(CHAR_TO_BYTE[c] for c in s)!r}); rename it")
    vocab = {special_ids.get(i) or token_to_str(t): i for i, t in sorted(tok.vocab.items())}
    if len(vocab) != len(tok.vocab):
        raise ValueError("a special token's text is the byte-level spelling of another token; tokenizer.json cannot "
                         "hold both")
    return vocab


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json (no custom code), <|endoftext|> (when
    there is one) as BOS and EOS, as in GPT-2; no clean-up of spaces, which would change decoded text."""
    eot = END_OF_TEXT if END_OF_TEXT in tok.special_token_ids else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def save_hf_tokenizer(tok: Tokenizer, directory, model_max_length: int | None = None) -> None:
    """directory/tokenizer.json and tokenizer_config.json: what AutoTokenizer.from_pretrained(directory) reads."""
    d = Path(directory)
    atomic_write_text(d / "tokenizer.json", json.dumps(hf_tokenizer_json(tok), ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(d / "tokenizer_config.json",
                      json.dumps(hf_tokenizer_config(tok, model_max_length), indent=2) + "\n")


def tiktoken_ranks(tok: Tokenizer) -> dict[bytes, int]:
    """tiktoken's mergeable_ranks (token bytes -> rank = id), special tokens left out (they are passed separately).

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. That is our merge order
    only if every merge makes a new token with a higher id than the merges before it, and every multi-byte token is
    made by a merge: true of train_bpe's vocabularies and GPT-2's, refused (ValueError) for any other."""
    token_ids = {t: i for i, t in tok.vocab.items()}
    special_ids = set(tok.special_token_ids.values())
    previous = -1
    for rank, (a, b) in enumerate(tok.merges):
        made = token_ids[a + b]
        if made <= previous:
            raise ValueError(f"merge {rank} ({token_to_str(a)} {token_to_str(b)}) makes token id {made}, not above the "
                             f"previous merge's {previous}: tiktoken ranks tokens by id, so this tokenizer's merge "
                             f"order cannot be expressed")
        previous = made
    made_ids = {token_ids[a + b] for a, b in tok.merges}
    stray = sorted(i for i, t in tok.vocab.items() if len(t) > 1 and i not in made_ids and i not in special_ids)
    if stray:
        raise ValueError(f"token id {stray[0]} ({token_to_str(tok.vocab[stray[0]])}) is made by no merge: tiktoken "
                         f"would still produce it, Tokenizer never does")
    return {t: i for i, t in sorted(tok.vocab.items()) if i not in special_ids}


def tiktoken_file_text(tok: Tokenizer) -> str:
    """The .tiktoken file: one "base64(token bytes) rank" line per token, the format tiktoken.load.load_tiktoken_bpe
    reads. tiktoken_file_text(tok).splitlines()[32] == "IA== 32" (the space byte) for a train_bpe tokenizer."""
    return "".join(f"{base64.b64encode(t).decode('ascii')} {i}\n" for t, i in tiktoken_ranks(tok).items())


def tiktoken_one_liner(tok: Tokenizer, path) -> str:
    """The Python line that builds a tiktoken.Encoding from the .tiktoken file at `path` (the file holds no special
    tokens and no regex, so the line carries them)."""
    return (f"import tiktoken, tiktoken.load; enc = tiktoken.Encoding(name={Path(path).stem!r}, pat_str={GPT2_PAT!r}, "
            f"mergeable_ranks=tiktoken.load.load_tiktoken_bpe({str(path)!r}), "
            f"special_tokens={dict(tok.special_token_ids)!r})")


def tokenizer_from_hf_json(obj: dict, where: str) -> Tokenizer:
    """A Tokenizer from a Hugging Face tokenizer.json (parsed): byte-level BPE behind the GPT-2 regex, as GPT-2's and
    hf_tokenizer_json's are. What Tokenizer would encode differently is a ValueError naming it, e.g. a SentencePiece
    (Metaspace / byte-fallback) tokenizer, a normalizer, another split regex or ignore_merges (Llama 3's)."""
    model = obj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: the model is {model.get('type')!r}, not BPE: only byte-level BPE tokenizers can be "
                         f"imported")
    _check_hf_byte_level(obj, where)
    for key, harmless in (("dropout", (None, 0.0)), ("continuing_subword_prefix", (None, "")),
                          ("end_of_word_suffix", (None, "")), ("byte_fallback", (False,)),
                          ("ignore_merges", (False,))):
        if model.get(key) not in harmless:
            raise ValueError(f"{where}: the BPE model sets {key}={model[key]!r}, which bpe.Tokenizer does not have")
    # An added token's id is its own even when the BPE vocab lists it too (HF's added tokens take precedence), and its
    # content is plain text, not byte-level characters.
    added = {a["id"]: a for a in obj.get("added_tokens") or []}
    vocab = {i: str_to_token(s, where) for s, i in model["vocab"].items() if i not in added}
    merges = [tuple(str_to_token(p, where) for p in (m.split(" ") if isinstance(m, str) else m))
              for m in model.get("merges", [])]
    for i, a in sorted(added.items()):
        if any(a.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            raise ValueError(f"{where}: added token {a['content']!r} strips spaces or matches whole words only, "
                             f"which bpe.Tokenizer's special tokens do not")
        vocab[i] = a["content"].encode("utf-8")
    specials = [added[i]["content"] for i in sorted(added)]
    return Tokenizer(vocab, merges, specials)


def _check_hf_byte_level(obj: dict, where: str) -> None:
    """ValueError unless the pre-tokenizer is GPT-2's (ByteLevel with its built-in regex, or Split(GPT-2 regex) then
    ByteLevel), without a prefix space, with no normalizer and a ByteLevel decoder."""
    pre = obj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if "ByteLevel" not in kinds or (obj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: not a byte-level tokenizer (pre-tokenizer {'+'.join(map(str, kinds))}, decoder "
                         f"{(obj.get('decoder') or {}).get('type')}): only byte-level BPE can be imported")
    byte_level = steps[kinds.index("ByteLevel")]
    gpt2_split = {"type": "Split", "pattern": {"Regex": GPT2_PAT}, "behavior": "Isolated", "invert": False}
    if not (kinds == ["ByteLevel"] and byte_level.get("use_regex", True)
            or steps == [gpt2_split, byte_level] and not byte_level.get("use_regex", True)):
        patterns = [step.get("pattern") for step in steps if step.get("type") == "Split"]
        raise ValueError(f"{where}: the pre-tokenizer ({'+'.join(map(str, kinds))}, split by {patterns or 'nothing'}) "
                         f"does not split by GPT-2's regex, the one bpe.Tokenizer uses")
    if byte_level.get("add_prefix_space", True):
        raise ValueError(f"{where}: ByteLevel add_prefix_space is true (a space is put before every text), which "
                         f"bpe.Tokenizer does not do")
    if obj.get("normalizer") is not None:
        raise ValueError(f"{where}: the tokenizer has a normalizer ({obj['normalizer'].get('type')}), which "
                         f"bpe.Tokenizer does not")


# ---------------------------------------------------------------------------------------------------------------------
# Encoding whole files to .npy
# ---------------------------------------------------------------------------------------------------------------------
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
    return end, np.array(_worker_tokenizer.encode(read_piece(path, start, end)), dtype=dtype)


def encode_file(tokenizer: Tokenizer, input_path, output_path, num_workers=None, progress=False) -> int:
    """Encode a text file to an np.save-format .npy of ids (uint16, or uint32 for vocabs over 65,536 tokens).
    Pieces split at safe cut points are encoded in parallel and streamed to the file in order (see the banner above):
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
    """Fail before any work when the input is missing or empty, or the output's directory is missing."""
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    if input_path.stat().st_size == 0:
        raise ValueError(f"input file {input_path} is empty")
    check_output_dir(output_path)


def _encoded_pieces(tokenizer: Tokenizer, input_path: Path, dtype, num_workers) -> Iterator[tuple[int, np.ndarray]]:
    """(end byte offset, ids) of each piece of the file, in file order, encoded by `num_workers` processes. A generator:
    close it to stop the workers."""
    bounds = find_piece_boundaries(input_path, PIECE_BYTES, tokenizer.special_tokens)
    jobs = [(str(input_path), s, e, dtype) for s, e in zip(bounds[:-1], bounds[1:])]
    # The first piece is encoded here before forking (warm_first), so its caches (most of the cost of a cold start)
    # are warm in the workers, which inherit this process's memory.
    return _map_pieces(_encode_piece, jobs, num_workers, _init_encode_worker, (tokenizer,), warm_first=True)


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
    """The one `open` of a download's .part file: a seam the fault-injection tests replace, as lib/cli.py's open_for_write is
    for every other file (which cannot serve here: it truncates, and a resumed download appends)."""
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
    return DownloadError(f"download of {url} failed: {getattr(error, 'reason', error)}{kept}")


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
    out = Path(out_dir)
    check_output_dir(out)
    out.mkdir(exist_ok=True)
    texts = {}
    for split, filename in spec["files"].items():
        txt = out / filename.removesuffix(".gz")
        if not txt.is_file():
            got = download(base_url.rstrip("/") + "/" + filename, out / filename, progress)
            if filename.endswith(".gz"):
                gunzip(got, txt)
        texts[split] = txt
    specials = [END_OF_TEXT]
    vocab, merges = train_bpe(texts["train"], vocab_size or spec["vocab_size"], specials,
                              num_workers=num_workers, progress=progress)
    tok = Tokenizer(vocab, merges, specials)
    tok.save_dir(out)
    return {split: encode_file(tok, txt, out / f"{split}.npy", num_workers, progress) for split, txt in texts.items()}


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def _peak_rss_mib() -> float:
    """Peak resident memory of this process and of its (finished) worker processes, whichever is larger."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024  # Linux reports KiB


def train_command(args) -> None:
    """bpe.py train: train on --input and write the tokenizer directory --out."""
    t0 = time.perf_counter()
    out = Path(args.out)
    check_output_dir(out)
    vocab, merges = train_bpe(args.input, args.vocab_size, args.special_tokens, num_workers=args.workers, progress=True)
    out.mkdir(exist_ok=True)
    Tokenizer(vocab, merges, args.special_tokens).save_dir(out)
    longest = max(vocab.values(), key=len)
    print(f"trained {len(vocab):,} tokens in {time.perf_counter() - t0:.1f} s, peak memory "
          f"{_peak_rss_mib():.0f} MiB, longest token {longest.decode('utf-8', 'replace')!r} "
          f"({len(longest)} bytes) -> {out}")


def encode_command(args) -> None:
    """bpe.py encode: encode --input with the tokenizer directory --tokenizer into the .npy --output."""
    t0 = time.perf_counter()
    tok = Tokenizer.from_dir(args.tokenizer)
    n = encode_file(tok, args.input, args.output, args.workers, progress=True)
    dt, size = time.perf_counter() - t0, os.path.getsize(args.input)
    print(f"{n:,} tokens, {size / max(n, 1):.2f} bytes/token, {size / 1e6 / dt:.1f} MB/s -> {args.output}")


def prepare_command(args) -> None:
    """bpe.py prepare: download a dataset, train its tokenizer and encode both splits into --out."""
    t0 = time.perf_counter()
    counts = prepare(args.dataset, args.out, args.base_url, args.vocab_size, args.workers)
    print(f"prepared {args.dataset} in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v:,} tokens" for k, v in counts.items()) + f" -> {args.out}")


def export_command(args) -> None:
    """bpe.py export: the tokenizer directory --tokenizer as Hugging Face tokenizer files (a directory) or a
    .tiktoken file, --out."""
    tok = Tokenizer.from_dir(args.tokenizer)
    out = Path(args.out)
    check_output_dir(out)
    if args.format == "hf":
        out.mkdir(exist_ok=True)
        save_hf_tokenizer(tok, out)
        print(f"wrote {out}/tokenizer.json and tokenizer_config.json; in Python: "
              f"transformers.AutoTokenizer.from_pretrained({str(out)!r}) or tokenizers.Tokenizer.from_file("
              f"{str(out / 'tokenizer.json')!r})")
    else:
        atomic_write_text(out, tiktoken_file_text(tok))
        print(f"wrote {out}; in Python:\n  {tiktoken_one_liner(tok, out)}")


def build_parser() -> OneLineParser:
    """The subcommands; each sets args.command_fn, the function that runs it."""
    parser = OneLineParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a tokenizer and write DIR/{vocab.json,merges.txt,special_tokens.json}")
    p.add_argument("--input", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--special-tokens", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(command_fn=train_command)
    p = sub.add_parser("encode", help="encode a text file to a .npy of token ids")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(command_fn=encode_command)
    p = sub.add_parser("prepare", help="download a dataset, train its tokenizer, encode train and valid")
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--out", required=True)
    p.add_argument("--base-url", default=None, help=f"download from here instead (or set ${BASE_URL_ENV})")
    p.add_argument("--vocab-size", type=int, default=None, help="default: 10000 (tinystories), 32000 (owt)")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(command_fn=prepare_command)
    p = sub.add_parser("export", help="write a tokenizer directory as Hugging Face tokenizer.json or a .tiktoken file")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    p.add_argument("--format", choices=["hf", "tiktoken"], required=True)
    p.add_argument("--out", required=True, help="hf: a directory (tokenizer.json, tokenizer_config.json); "
                                                "tiktoken: the .tiktoken file")
    p.set_defaults(command_fn=export_command, workers=None)
    return parser


def main(argv=None) -> int:
    """Run one subcommand; a problem is one line on stderr and an exit code (see lib/cli.py), never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        args.command_fn(args)
    except EnvironmentFault as e:  # not the user's input: a failed write (a full disk), a failed download
        print(f"bpe.py: error: {e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except (ValueError, OSError) as e:  # bad input: missing/unreadable files, bad arguments, bad file contents
        print(f"bpe.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
