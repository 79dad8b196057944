"""fast_bpe.py: bpe.py's fast path, the trainer and the encoder that the programs run (train_bpe(..., fast=True),
Tokenizer(..., fast=True)). Same merges and same ids as bpe.py's readable code; tests/test_fast_bpe.py holds them equal.

Why it is faster:
- pre-tokenisation counts whitespace-delimited chunks first (text repeats; the slow GPT-2 regex sees each unique chunk
  once, ASCII chunks through an equivalent stdlib regex) and reads the file in pieces, one stretch per worker process;
- the merge loop keeps words as strs of token ids (merges are str.replace in C), counts the first pairs with numpy,
  rewrites the first (big) merges as numpy array operations (_FlatWords), and keeps a leaner heap (_PairQueue:
  one-string entries; rare pairs not tracked until they could matter);
- encoding caches chunk -> ids and pre-token -> ids and merges many new pre-tokens at once in numpy (_bpe_batch),
  looking merges up in a vectorised hash table.
A lower-floor module: it imports no chapter. What the teaching needs (the GPT-2 regex, the special-token pattern, the
per-pre-token merge) is bpe.py's and is passed in as arguments.
"""
import contextlib
import gc
import heapq
import multiprocessing
import operator
import os
import re
import sys
import time
from collections import Counter, defaultdict
from functools import cached_property, reduce
from itertools import accumulate, chain, compress, filterfalse, islice
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from lib.cli import BadInputError, describe_fault

# ---------------------------------------------------------------------------------------------------------------------
# Pre-tokenisation by chunks
# ---------------------------------------------------------------------------------------------------------------------

# Lemma: no GPT-2 pre-token contains a non-whitespace character followed by a whitespace character (the only
# alternatives that take whitespace are a single leading space, or runs of whitespace only), and the pattern has no
# lookbehind. So cutting the text just before any whitespace that follows a non-whitespace character never changes the
# pre-tokens: pretokens(chunk1 + chunk2) == pretokens(chunk1) + pretokens(chunk2). Chunks repeat far more than text
# does, so training counts chunks first and encoding caches chunk -> ids; both then run the slow GPT-2 regex only on
# unique chunks. The chunk split uses the stdlib `re` (about 3x faster than `regex` here).
# WHITESPACE is what the GPT-2 pattern's \s (the `regex` package's) matches, and the one source of the whitespace
# classes below. subtle: the stdlib `re`'s \s is not the same set (it also matches U+001C..U+001F), so the classes list
# the characters instead of saying \s; tests/test_fast_bpe.py checks all 1,114,112 code points against `regex`'s \s.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                       "\u2028\u2029\u202f\u205f\u3000")
_WS_CHARS = "".join(map(re.escape, sorted(WHITESPACE)))  # sorted: a set's order changes from run to run
_WS, _NON_WS = f"[{_WS_CHARS}]", f"[^{_WS_CHARS}]"  # re compiles both to one bitmap lookup per character
CHUNK_RE = re.compile(rf"{_WS}*{_NON_WS}+|{_WS}+")

# ASCII text does not need the `regex` package: on ASCII characters \p{L} is [A-Za-z], \p{N} is [0-9] and \s is the
# six ASCII whitespace characters, so the stdlib `re` can run the same pattern, about 2x faster. str.isascii() is O(1)
# in CPython (a flag of the string), so choosing costs nothing; tests/test_fast_bpe.py checks the two patterns agree.
_ASCII_WS = "".join(map(re.escape, sorted(c for c in WHITESPACE if c.isascii())))
ASCII_PRETOKEN_RE = re.compile(rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_ASCII_WS}A-Za-z0-9]+"""
                               rf"""|[{_ASCII_WS}]+(?![^{_ASCII_WS}])|[{_ASCII_WS}]+""")



def find_pretokens(text: str, pretoken_re) -> list[str]:
    """pretoken_re.findall(text) (pretoken_re: bpe.py's compiled GPT-2 regex), by the stdlib regex when the text is
    ASCII. find_pretokens("it's  42!", bpe.PRETOKEN_RE) == ['it', "'s", ' ', ' 42', '!']"""
    return (ASCII_PRETOKEN_RE if text.isascii() else pretoken_re).findall(text)


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


def count_chunks(text: str, special_re=None, counts: Counter | None = None) -> Counter:
    """Chunk frequencies of `text`, split on the special tokens first so nothing spans a document boundary; added to
    `counts` if given (one Counter for many pieces: Counter.update from a list counts in C, from a Counter in Python).
    special_re: bpe.special_pattern(special tokens), or None.
    count_chunks("low low<|e|>lower", bpe.special_pattern(["<|e|>"])) == Counter({'low': 1, ' low': 1, 'lower': 1})"""
    docs = special_re.split(text)[::2] if special_re else [text]  # odd entries of split() are the captured specials
    counts = Counter() if counts is None else counts
    for doc in docs:
        counts.update(CHUNK_RE.findall(doc))
    return counts


def chunks_to_pretokens(chunk_counts: Counter, pretoken_re) -> Counter:
    """Chunk frequencies -> pre-token frequencies; the slow GPT-2 regex sees each unique chunk once.
    chunks_to_pretokens(Counter({" it's": 2, "a": 1}), bpe.PRETOKEN_RE) == Counter({" it": 2, "'s": 2, "a": 1})"""
    # Chunks that occur equally often are pre-tokenised together (~800 groups on half of kernel-docs), and each group's
    # pre-tokens are counted by Counter in C: a pre-token's frequency is then its count in the group times the group's,
    # with no Python step per pre-token and no need to know which chunk each one came from.
    by_count = defaultdict(list)
    for chunk, n in chunk_counts.items():
        by_count[n].append(chunk)
    counts = {}
    get = counts.get  # note: a plain dict and a bound .get are ~3x faster than Counter's += (its __missing__ is Python)
    for n, chunks in by_count.items():
        for pretoken, k in Counter(_pretokens_of_chunks(chunks, pretoken_re)).items():
            counts[pretoken] = get(pretoken, 0) + k * n
    return Counter(counts)


def _pretokens_of_chunks(chunks: list[str], pretoken_re) -> list[str]:
    """All the pre-tokens of the chunks, in one list (in no particular order): the joinable ones (by the lemma above)
    in two regex calls, one for the pure-ASCII chunks and one for the others (_split_ascii), then one call for each
    of the rest.
    sorted(_pretokens_of_chunks([" it's", "a", " é!"], bpe.PRETOKEN_RE)) == [" it", " é", "!", "'s", "a"]"""
    joinable = [c for c in chunks if _joinable(c)]
    out = []
    for group in _split_ascii(joinable):
        if group:
            out += find_pretokens("".join(group), pretoken_re)
    if len(joinable) < len(chunks):  # e.g. the first chunk of a text ("hello"), or trailing whitespace: on its own
        for c in chunks:
            if not _joinable(c):
                out += find_pretokens(c, pretoken_re)
    return out


def count_pretokens(text: str, pretoken_re, special_re=None) -> Counter:
    """bpe.count_pretokens(text, special tokens) by chunks: pre-token frequencies, special tokens split off first.
    count_pretokens("low low<|e|>lower", bpe.PRETOKEN_RE, bpe.special_pattern(["<|e|>"])) == Counter({'low': 1,
    ' low': 1, 'lower': 1})"""
    return chunks_to_pretokens(count_chunks(text, special_re), pretoken_re)


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
    that says where. note: never an OSError, which datasets.encode_file (reading pieces while its output is open)
    would report as a fault of the output file."""
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


class PretokenTable(NamedTuple):
    """Pre-tokens and their counts, packed: what a worker sends back and what the merge loop starts from. note: ~20
    bytes a pre-token plus its text, where a Counter of strs takes ~120 (a str object, a dict slot, an int); at
    OpenWebText's size (~7M distinct pre-tokens) that is the difference between ~0.2 and ~1 GB per copy."""
    text: bytes           # the pre-tokens' UTF-8, end to end
    lengths: np.ndarray   # (n,) int64, each pre-token's bytes
    counts: np.ndarray    # (n,) int64, how often each occurs

    @classmethod
    def pack(cls, counts: dict) -> "PretokenTable":
        """{pre-token (str or UTF-8 bytes): count} -> a table, in the dict's order."""
        keys = [k.encode("utf-8") for k in counts] if counts and isinstance(next(iter(counts)), str) else list(counts)
        return cls(b"".join(keys), np.fromiter(map(len, keys), np.int64, len(keys)),
                   np.fromiter(counts.values(), np.int64, len(keys)))

    def items(self) -> Iterator[tuple[bytes, int]]:
        """(pre-token as UTF-8 bytes, count) pairs, one bytes object at a time."""
        ends = np.cumsum(self.lengths)
        keys = map(self.text.__getitem__, map(slice, (ends - self.lengths).tolist(), ends.tolist()))
        return zip(keys, self.counts.tolist())


def _count_pieces(args) -> PretokenTable:
    """Worker: pre-token counts of a list of pieces, packed. Each worker opens the file and reads only its own pieces,
    so memory holds one piece of text at a time plus the counts (which scale with unique pre-tokens)."""
    path, ranges, pretoken_re, special_re = args
    chunk_counts = Counter()
    for start, end in ranges:
        count_chunks(read_piece(path, start, end), special_re, chunk_counts)
    return PretokenTable.pack(chunks_to_pretokens(chunk_counts, pretoken_re))  # unique chunks repeat across pieces


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


# The workers' memory: a worker's counts grow with the unique pre-tokens of the text it has counted, which for a
# long text is most of the file's (the common ones are everywhere), so a worker that counted a whole stretch of an
# OpenWebText-sized file held ~2.5 GB, and N workers N times that. Instead the file is cut into jobs of at most
# JOB_TEXT_BYTES / N bytes each: the N jobs in flight then hold about as much as one job of JOB_TEXT_BYTES would,
# whatever N is, and each job's counts come back packed (PretokenTable) to the one table of the whole file, in the
# main process. The cost: the unique chunks of each job go through the slow regex once per job rather than once per
# worker. note: 512 MiB keeps that under ~10% of the time at 12 GB (BENCHMARKS.md, issue 33).
JOB_TEXT_BYTES = 512 << 20


def _jobs(ranges: list[tuple[int, int]], num_workers: int) -> list[list[tuple[int, int]]]:
    """The pieces in contiguous groups of at most ~JOB_TEXT_BYTES / num_workers bytes (at least one piece each, and
    never fewer groups than workers while there are pieces for them)."""
    total = ranges[-1][1] - ranges[0][0] if ranges else 0
    per_job = max(1, min(total / num_workers, JOB_TEXT_BYTES / num_workers))
    jobs, job, size = [], [], 0
    for start, end in ranges:
        if job and size + (end - start) > per_job:
            jobs.append(job)
            job, size = [], 0
        job.append((start, end))
        size += end - start
    return jobs + [job] if job else jobs


def count_pretokens_file(input_path, special_tokens, pretoken_re, special_re, num_workers=None) -> PretokenTable:
    """Pre-token counts of a whole file (as UTF-8 bytes), pre-tokenised in parallel by `num_workers` processes, in
    jobs of bounded size (see above). special_re: bpe.special_pattern of the special tokens (None if there are none);
    pretoken_re: bpe.PRETOKEN_RE."""
    num_workers = _num_workers(num_workers)
    bounds = find_piece_boundaries(input_path, PIECE_BYTES, special_tokens)
    jobs = [(str(input_path), group, pretoken_re, special_re)
            for group in _jobs(list(zip(bounds[:-1], bounds[1:])), num_workers)]
    total = {}  # pre-token (bytes) -> count: the one full table, ~100 bytes a pre-token while it is a dict
    get = total.get
    for part in _map_pieces(_count_pieces, jobs, num_workers):
        for pretoken, n in part.items():
            total[pretoken] = get(pretoken, 0) + n
        del part
    return PretokenTable.pack(total)


# ---------------------------------------------------------------------------------------------------------------------
# Training: the merge loop
# ---------------------------------------------------------------------------------------------------------------------

_INVERT = {c: 256 - c for c in range(256)}  # str.translate table: chr(byte c) -> chr(256 - c), reversing the order


def _inverted(token: bytes) -> str:
    """A key that sorts byte strings in reverse lexicographic order, so heapq's min-heap pops the greater one first:
    each byte c as chr(256 - c), then chr(257), greater than them all, which puts a prefix after its extensions
    (b"a" < b"ab", so _inverted(b"a") > _inverted(b"ab")) and makes the keys prefix-free: two of them concatenated
    compare as the pair of keys would (see _PairQueue)."""
    return token.decode("latin-1").translate(_INVERT) + "\u0101"


def byte_words(table: PretokenTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The merge loop's words: the pre-tokens of two bytes or more (a single byte has no pair), as (ids, lengths,
    freqs): every word's token ids end to end, (total,) uint8 (at the start a token id is its byte), each word's
    length, (num_words,) int64, and frequency, (num_words,) int64.
    byte_words(PretokenTable.pack({"hé": 2, "a": 5})) == ([104, 195, 169], [3], [2])"""
    keep = table.lengths > 1
    ids = np.frombuffer(table.text, np.uint8)[np.repeat(keep, table.lengths)]
    return ids, table.lengths[keep], table.counts[keep]


def count_pairs(ids: np.ndarray, lengths: np.ndarray, freqs: np.ndarray) -> tuple[defaultdict, defaultdict]:
    """Pair counts and pair -> word indices (an int32 array each, naming a word once), vectorised with numpy: every
    word's token ids end to end (ids), each word's length and frequency. A pair is the 2-character str of its two ids.
    Run on byte_words' arrays at the start, and once more on the current words if the loop gets down to the rare pairs
    (see _PairQueue).
    count_pairs(b"ababba" as ids, [4, 2], [3, 1]) -> ({"ab": 6, "ba": 4}, {"ab": array([0]), "ba": array([0, 1])})"""
    # A pair's code: its two ids side by side in one integer, 16 bits while every id is a byte (numpy sorts 16-bit
    # keys by radix sort), else 64.
    shift = 8 if ids.size == 0 or ids.max() < 256 else 32
    first = ids[:-1].astype(np.uint16 if shift == 8 else np.uint64)
    # Position k and k + 1 form a pair unless k is the last position of a word; a word of length n has n - 1 pairs.
    inside = np.ones(max(ids.size - 1, 0), bool)
    inside[np.cumsum(lengths)[:-1] - 1] = False
    code = (first << shift | ids[1:])[inside]  # (pairs,)
    del first, inside
    where = np.repeat(np.arange(lengths.size, dtype=np.int32), lengths - 1)  # (pairs,) the word of each pair
    if code.size == 0:  # no word of two tokens: nothing to merge
        return defaultdict(int), defaultdict(list)
    order = np.argsort(code, kind="stable")
    code, where = code[order], where[order]
    del order  # note: 8 bytes a pair, the largest array here; free it before the next ones
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    totals = np.add.reduceat(freqs[where], starts).tolist()
    # A word that holds a pair twice ("abab") is listed once: after the stable sort, its positions are neighbours.
    once = np.r_[True, (code[1:] != code[:-1]) | (where[1:] != where[:-1])]
    code, where = code[once], where[once]
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    pair_counts, pair_words, mask = defaultdict(int), defaultdict(list), (1 << shift) - 1
    for s, e, c, total in zip(starts.tolist(), [*starts[1:].tolist(), len(code)], code[starts].tolist(), totals):
        pair = chr(c >> shift) + chr(c & mask)
        pair_counts[pair] = total
        pair_words[pair] = where[s:e]
    return pair_counts, pair_words


PROGRESS_MERGES = 1000  # with progress=True, bpe_merges prints a line every this many merges


def bpe_merges(table: PretokenTable, num_merges: int, *, progress=False, t0=None) -> tuple[list[bytes], list]:
    """The merge loop: pre-token counts -> (tokens by id, merges as id pairs), at most num_merges of them.
    bpe_merges(PretokenTable.pack({"ab": 2, "abc": 1}), 2) -> ([..256 bytes.., b"ab", b"abc"], [(97, 98), (256, 99)])"""
    t0 = time.perf_counter() if t0 is None else t0

    # The bookkeeping (what makes a merge cheap). A pair (a, b) is the 2-character str chr(a) + chr(b):
    #   pair_counts[pair]  how often the pair occurs in the corpus (sum of word frequencies);
    #   pair_words[pair]   the indices of the words that contain it, an int32 array that names each word once in the
    #                      first merges (the array phase, see _Words), later a list that may name a word twice; either
    #                      may name words that no longer contain the pair: those visits find nothing to merge, which
    #                      is cheaper than keeping the lists exact;
    #   queue              a max-heap of the pairs on (count, then the byte strings), see _PairQueue.
    # Rare new pairs are not kept at all (none of the three) until the loop could get down to them (_PairQueue):
    # then every pair is counted afresh from the words, once, and from there on all are kept.
    # Lazy invalidation: counts only ever go down for existing pairs (a merge turns (x, a) into (x, ab)), and new pairs
    # all contain the new token and are pushed once the merge is done. So when an entry is popped whose count is no
    # longer the pair's count, it is pushed back with the current count (if above 0) and skipped; the first popped
    # entry whose count is current is the true maximum, because every live pair has an entry at least as large.
    # Cost of one merge: O(total length of the words that contain the pair) to rewrite them and update the counts of
    # their neighbouring pairs, plus O(log heap) per pushed or re-pushed entry; never a pass over the whole corpus.
    # The count changes of one merge are first summed per neighbour token, then applied once per changed pair.
    ids, lengths, freqs = byte_words(table)
    pair_counts, pair_words = count_pairs(ids, lengths, freqs)
    corpus = _Words(_FlatWords(ids, lengths), freqs)
    del ids
    vocab = [bytes([i]) for i in range(256)]
    keys = [_inverted(t) for t in vocab]
    queue = _PairQueue(pair_counts, keys)

    merges = []
    while len(merges) < num_merges:
        pair = queue.pop_best(pair_counts)
        if pair is None and not queue.complete:  # the untracked rare pairs could be next: count them all, once
            pair_counts, pair_words = count_pairs(*corpus.arrays())
            queue = _PairQueue(pair_counts, keys, complete=True)
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


RARE_PAIR_COUNT = 8  # a new pair seen at most this often is not tracked until the loop gets down to such counts
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
    """The merge loop's max-heap of pairs, on (count, then the byte strings), with lazy invalidation (see bpe_merges).

    Rare pairs: a brand-new pair that occurs at most RARE_PAIR_COUNT times is not tracked at all (no count, no word
    list, no entry), because the loop rarely gets down to such counts (at 32K merges the last pair merged occurs
    thousands of times on OpenWebText, 15 times on kernel-docs) while most new pairs are that rare (78% of them on
    kernel-docs; on issue 33's 400 MB corpus, 2.3M of 2.7M pairs, ~600 MB of bookkeeping). A new pair's count never
    grows (see bpe_merges), so a rare one stays rare. If the heap's top gets down to RARE_PAIR_COUNT (or the heap
    empties), pop_best returns None and bpe_merges counts every pair afresh from the words, once, and goes on with a
    `complete` queue that tracks every pair.

    An entry is one str, entry(count, a, b) = _count_key(count) + _inverted(a's bytes) + _inverted(b's bytes) + the
    pair, which sorts exactly as the tuple (-count, key(a), key(b)) would: the count key has a fixed width and the
    byte keys are prefix-free. note: why one str: heapq then compares two entries with one string comparison in C,
    where tuples compare element by element, and the keys of tied counts as tuples of ints again; late in the loop
    most counts tie. At 32K on kernel-docs the 86K heappops take 0.19-0.21 s instead of 0.36-0.46 (line profiles;
    BENCHMARKS.md). The pair is the entry's last two characters."""

    def __init__(self, pair_counts: dict, keys: list, complete: bool = False):
        self.keys = keys  # token id -> _inverted(token bytes); bpe_merges appends one per merge
        self.heap = [self.entry(n, p) for p, n in pair_counts.items()]
        heapq.heapify(self.heap)
        self.complete = complete  # tracks every pair, rare ones too

    def entry(self, count: int, pair: str) -> str:
        """The heap entry of a pair that occurs `count` times."""
        return _count_key(count) + self.keys[ord(pair[0])] + self.keys[ord(pair[1])] + pair

    def tracks(self, count: int) -> bool:
        """Is a new pair that occurs `count` times kept (counted, listed, pushed)?"""
        return count > RARE_PAIR_COUNT or self.complete

    def push(self, count: int, pair: str) -> None:
        """Add a pair that occurs `count` (> 0) times and has no entry yet."""
        heapq.heappush(self.heap, self.entry(count, pair))

    def pop_best(self, pair_counts: dict) -> str | None:
        """Pop entries until one is current and return its pair: the most frequent pair (ties: the greater byte
        strings), or None once no pair is left, or, unless complete, once an untracked rare pair could be the best.
        A stale entry, whose count is no longer the pair's count, is pushed back with the current count if that is
        above 0 (lazy invalidation)."""
        heap, heappush, heappop = self.heap, heapq.heappush, heapq.heappop  # note: local names are faster below
        while True:
            if not heap or (not self.complete and _entry_count(heap[0]) <= RARE_PAIR_COUNT):
                return None
            entry = heappop(heap)
            pair = entry[-2:]
            count = pair_counts.get(pair, 0)
            if count == _entry_count(entry):
                return pair
            if count > 0:
                heappush(heap, _count_key(count) + entry[4:])


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
    with one character per token, chr(id), and _rewrite_words (most later merges list a few dozen words)."""

    def __init__(self, flat: "_FlatWords", freq_of: np.ndarray):
        self.flat, self.freq_of = flat, freq_of  # flat is None once the array phase is over
        self.words = self.freqs = None  # the str phase's words and frequencies (lists)

    def merge(self, word_ids, pair: str, new: str) -> _NeighbourTally:
        """Merge `pair` into `new` in the listed words; tally the neighbours of the merged occurrences."""
        if self.flat is not None and not self.flat.worth_it(len(word_ids)):
            self.words, self.freqs, self.flat = self.flat.words(), self.freq_of.tolist(), None
            # One int object per word for the lists made from here on (an object array hands out the objects it
            # holds): a fresh int per list entry would cost 28 bytes x millions of entries.
            self.word_objs = np.array(list(range(len(self.words))), dtype=object)
        if self.flat is not None:
            return self.flat.merge(word_ids, pair, new, self.freq_of)
        if type(word_ids) is not list:  # an array the array phase made
            word_ids = self.word_objs[word_ids].tolist()
        return _rewrite_words(self.words, self.freqs, word_ids, pair, new)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The words as they are now, as count_pairs takes them: (ids, lengths, freqs)."""
        if self.flat is not None:
            return (*self.flat.ids(), self.freq_of)
        ids = np.frombuffer("".join(self.words).encode("utf-32-le", "surrogatepass"), np.uint32)
        return ids, np.fromiter(map(len, self.words), np.int64, len(self.words)), self.freq_of


class _FlatWords:
    """The words end to end in one array of token ids, for the merge loop's first merges, which list thousands of
    words each: a merge is then ~40 numpy calls on the listed words, with no Python step per word, where
    _rewrite_words takes ~1.5 us of Python per listed word. note: measured, a merge here is ~1.5x faster from ~250
    listed words and 2x from 1,000; the 32K merge loop takes 0.65x the time on a 1M-word corpus, and ~0.96x on
    kernel-docs, whose merges list fewer words (BENCHMARKS.md). Each word keeps a slot of its length at the start
    plus one: its tokens, then END, the room its merges free up filling with END too.
    _FlatWords(ids of b"abb", lengths [2, 1]).tokens == [97, 98, END, 98, END]."""

    END = np.iinfo(np.uint32).max  # not a token id: no pair can span two words, and a word's neighbours are known
    MIN_WORDS = 150  # the words per merge below which _rewrite_words is faster (measured on kernel-docs, 32K)

    def __init__(self, ids: np.ndarray, lengths: np.ndarray):
        """ids: (total,) the words' token ids end to end; lengths: (num_words,) int64."""
        self.tokens = np.insert(ids.astype(np.uint32), np.cumsum(lengths), self.END)  # (total + num_words,)
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

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """The words' token ids end to end, (total,) uint32, and each word's length, (num_words,)."""
        in_use = self.tokens != self.END
        return self.tokens[in_use], np.add.reduceat(in_use, self.start)

    def words(self) -> list[str]:
        """The words as strs again, one character per token, chr(id), for the rest of the merge loop. note: ids 0xD800
        to 0xDFFF are surrogate code points, which surrogatepass lets through."""
        ids, lengths = self.ids()
        text = ids.tobytes().decode("utf-32-le", "surrogatepass")
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
    are pushed on the queue if they occur and the queue tracks them (rare ones are left out, see _PairQueue)."""
    a, b = pair
    left_words, right_words, overlap = tally.left_words, tally.right_words, tally.overlap
    for x, count in tally.left_counts.items():
        if x != new:  # (new, a) did not exist before this merge
            _lose(pair_counts, pair_words, x + a, count)
        if queue.tracks(count):  # count > 0: every left neighbour is an occurrence
            x_new = x + new
            pair_counts[x_new] = count
            pair_words[x_new] = left_words[x]
            queue.push(count, x_new)
    for y, count in tally.right_counts.items():
        _lose(pair_counts, pair_words, b + y, count)  # one per listed occurrence: an overlap's (b, a) is gone too
        if y == a:
            count -= overlap  # but an overlap made no (new, a) (see _NeighbourTally)
        if count > 0 and queue.tracks(count):  # 0 when every (new, a) the tally saw was an overlap (_rewrite_words)
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
    left = pair_counts.get(pair)
    if left is None:  # a rare pair the loop does not track (see _PairQueue)
        return
    left -= count
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


MAX_TRAIN_VOCAB = 0x110000  # bpe_merges writes token ids as characters, chr(id), and chr stops at U+10FFFF


def train(input_path, special_tokens: list[str], num_merges: int, pretoken_re, special_re, *, num_workers=None,
          progress=False) -> list[tuple[bytes, bytes]]:
    """bpe.train_bpe(..., fast=True): the merges (byte pairs, in creation order, at most num_merges) of a UTF-8 text
    file, identical to bpe.py's trainers whatever num_workers is. bpe.py has checked the arguments and passes its
    GPT-2 regex (pretoken_re) and special_pattern(special_tokens) (special_re)."""
    if num_merges + 256 > MAX_TRAIN_VOCAB:
        raise ValueError(f"vocab_size {num_merges + 256 + len(special_tokens)} is too large: training supports at "
                         f"most {MAX_TRAIN_VOCAB:,} tokens besides the special tokens; use a smaller one")
    t0 = time.perf_counter()
    with gc_paused():
        table = count_pretokens_file(input_path, special_tokens, pretoken_re, special_re, num_workers)
        if progress:
            dt = time.perf_counter() - t0
            mb = os.path.getsize(input_path) / 1e6
            print(f"pre-tokenised {mb:.1f} MB in {dt:.1f} s ({mb / dt:.1f} MB/s), {table.counts.size:,} unique "
                  f"pre-tokens", file=sys.stderr)
        vocab, merges = bpe_merges(table, num_merges, progress=progress, t0=t0)
    return [(vocab[a], vocab[b]) for a, b in merges]


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
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


class Encoder:
    """bpe.Tokenizer(..., fast=True)'s encode: the same ids as the plain encode, with two caches (chunk -> ids and
    pre-token -> ids) filled for all of a text's new chunks at once, the GPT-2 regex run on joined chunks, and the
    new pre-tokens merged together in numpy (_bpe_batch). Why it is faster: text repeats, so a warm encode is mostly
    dict lookups, and a cold one runs the slow regex and the merges once per unique chunk, batched.

    What the teaching needs comes from bpe.Tokenizer: bpe, its per-pre-token merge by rank (the reference, and what
    fills the pre-token cache one by one); byte_ids, the id of each byte; ranks, (id_a, id_b) -> (rank, merged id);
    special_token_ids and special_re (bpe.special_pattern of them, or None); pretoken_re, bpe.PRETOKEN_RE."""

    CACHE_LIMIT = 1 << 20  # entries per cache before it is cleared, so streaming huge files keeps memory bounded

    def __init__(self, bpe, byte_ids: list[int], ranks: dict, vocab_size: int, special_token_ids: dict, special_re,
                 pretoken_re):
        self._bpe, self._byte_ids, self._ranks, self.vocab_size = bpe, byte_ids, ranks, vocab_size
        self.special_token_ids, self._special_re, self._pretoken_re = special_token_ids, special_re, pretoken_re
        self._pretoken_cache = _Cache(bpe)
        self._chunk_cache = {}

    # The same merges for many pre-tokens at once, in numpy: the cold path of encoding, where tens of thousands of new
    # pre-tokens arrive together (60K in the first 10 MB of kernel-docs), runs about 2x faster this way than one
    # _bpe call each. _bpe (bpe.Tokenizer's) stays the reference; tests check the two agree.
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
            new[chunk] = tuple(chain.from_iterable(map(pretoken_ids, find_pretokens(chunk, self._pretoken_re))))
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
        bpe.Tokenizer's own encode; tests check the two agree."""
        if not chunks:
            return iter(())
        pieces = find_pretokens("".join(chunks), self._pretoken_re)
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
