"""Byte-level BPE: training and the tokenizer (CS336 assignment 1, section 2).

What it is: the GPT-2 style byte-level byte-pair-encoding tokenizer (Sennrich et al. 2016; Radford et al. 2019).
Text is cut into pre-tokens by the GPT-2 regex (special tokens split off whole first), each pre-token is a sequence of
bytes, and training repeatedly merges the most frequent adjacent pair of tokens (ties: the lexicographically greater
pair) into a new token (handout 2.4-2.5); the Tokenizer applies the merges to new text (2.6).
Read top to bottom: pre-tokenisation -> train_bpe_naive, the teaching version and the oracle -> the incremental
trainer that train_bpe runs (pair counts kept up to date, a heap with lazy invalidation) -> the vocab.json /
merges.txt files -> Tokenizer (encode, encode_iterable, decode) -> the command line (train, encode, prepare, and
export to Hugging Face or tiktoken files). The commands run the fast trainer and encoder of lib/fast_bpe.py
(fast=True), which tests hold equal to the code here.

    python bpe.py train --input ../shared/data/kernel-docs-train.txt --vocab-size 10000 \
        --special-tokens "<|endoftext|>" --out runs/tok
    python bpe.py encode --tokenizer runs/tok --input ../shared/data/kernel-docs-valid.txt --output runs/valid.npy
    python bpe.py prepare tinystories --out data/tinystories   # download + train 10K tokenizer + encode both splits
"""
import contextlib
import functools
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from itertools import repeat
from pathlib import Path
from typing import Iterable, Iterator

import regex

from lib import fast_bpe  # the fast trainer and encoder (fast=True); it imports no chapter
from lib.cli import (EXIT_BAD_INPUT, EXIT_ENVIRONMENT, BadInputError, EnvironmentFault, OneLineParser, atomic_file,
                     atomic_write_text, check_dir_target, check_file_target, describe_os_error, output_dir)

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


def unique_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    """The special tokens de-duplicated in order; the empty string is an error (it would match everywhere).
    unique_special_tokens(["<|a|>", "<|b|>", "<|a|>"]) == ["<|a|>", "<|b|>"]"""
    specials = list(dict.fromkeys(special_tokens))
    if any(s == "" for s in specials):
        raise ValueError("a special token is the empty string; remove it")
    return specials


def special_pattern(special_tokens: Iterable[str]) -> "re.Pattern | None":
    """A regex that finds special tokens, longest first so that overlapping ones resolve to the longest match.
    special_pattern(["<|a|>", "<|a|><|a|>"]).pattern == '(<\\|a\\|><\\|a\\|>|<\\|a\\|>)'"""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


def split_on_specials(text: str, special_re) -> list[str]:
    """[text, special, text, ..., special, text]: the special tokens (special_re: special_pattern's) split off whole
    at the odd positions, so that no pre-token, and so no merge, crosses a document boundary.
    split_on_specials("a<|e|>b", special_pattern(["<|e|>"])) == ["a", "<|e|>", "b"]"""
    return special_re.split(text) if special_re else [text]


def count_pretokens(text: str, special_tokens: Iterable[str] = ()) -> Counter:
    """Pre-token frequencies of `text` (special tokens split off first, never counted).
    count_pretokens("low low<|e|>lower", ["<|e|>"]) == Counter({'low': 1, ' low': 1, 'lower': 1})"""
    counts = Counter()
    for doc in split_on_specials(text, special_pattern(special_tokens))[::2]:
        counts.update(PRETOKEN_RE.findall(doc))
    return counts


def read_text(path) -> str:
    """A UTF-8 text file's text; invalid UTF-8 is a BadInputError (a ValueError) that says at which byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path} is not valid UTF-8 at byte {e.start} ({e.reason}); re-save it as UTF-8") from None


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
    text = read_text(input_path)
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
# Training: the incremental version (what train_bpe runs)
# ---------------------------------------------------------------------------------------------------------------------
# The naive trainer recounts every pair in the corpus for every merge. But merging (a, b) changes only the words that
# contain (a, b), so we count the pairs once, remember which words hold each pair, and after a merge re-count just
# those words. A word is a tuple of token ids (at first its bytes); a pre-token seen n times is one word of
# frequency n.

def word_pairs(word: tuple) -> Counter:
    """The adjacent pairs of a word, each with how often it occurs there.
    word_pairs((1, 2, 1, 2)) == Counter({(1, 2): 2, (2, 1): 1})"""
    return Counter(zip(word, word[1:]))


def count_pairs(words: list[tuple], freqs: list[int]) -> tuple[defaultdict, defaultdict]:
    """pair -> its count in the corpus (summed over word frequencies), and pair -> the set of words that hold it.
    count_pairs([(1, 2, 1), (2, 1)], [3, 1]) == ({(1, 2): 3, (2, 1): 4}, {(1, 2): {0}, (2, 1): {0, 1}})"""
    pair_counts, pair_words = defaultdict(int), defaultdict(set)
    for i, (word, n) in enumerate(zip(words, freqs)):
        for pair, k in word_pairs(word).items():
            pair_counts[pair] += k * n
            pair_words[pair].add(i)
    return pair_counts, pair_words


class Greater:
    """A pair of byte strings that compares the other way round, so that heapq, which pops the smallest entry, pops
    the greater pair first among pairs of equal count (the tie rule).
    Greater((b"b", b"a")) < Greater((b"a", b"z")), since (b"b", b"a") > (b"a", b"z")"""
    __slots__ = ("pair",)

    def __init__(self, pair: tuple[bytes, bytes]):
        self.pair = pair

    def __lt__(self, other: "Greater") -> bool:
        return self.pair > other.pair


def heap_entry(count: int, pair: tuple[int, int], vocab: list[bytes]) -> tuple:
    """The heap entry of a pair of ids seen `count` times: the smallest entry is the most frequent pair, ties going to
    the greater pair of byte strings. heap_entry(5, (104, 105), vocab) == (-5, Greater((b"h", b"i")), (104, 105))"""
    return -count, Greater((vocab[pair[0]], vocab[pair[1]])), pair


def pop_best(heap: list, pair_counts: dict) -> tuple[int, int] | None:
    """Pop the most frequent pair (ties: the greater one), skipping stale entries, whose count is no longer the pair's
    count (a merge changed it after they were pushed). None when no pair is left."""
    while heap:
        neg_count, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) == -neg_count:
            return pair
    return None


def apply_merge(pair: tuple, new: int, words: list[tuple], freqs: list[int], pair_counts: defaultdict,
                pair_words: defaultdict) -> set:
    """Merge `pair` into the token `new` in every word that holds it, and bring pair_counts and pair_words up to date
    by re-counting the pairs of just those words. Returns the pairs whose counts changed and that still occur.
    words [(1, 2, 3)], freqs [2], merging (1, 2) into 9: the word becomes (9, 3); (1, 2) and (2, 3) lose 2 each, so
    they are gone, and (9, 3) gains 2: returns {(9, 3)}."""
    change = defaultdict(int)  # pair -> how its count changes
    for i in pair_words.pop(pair):
        before, n = word_pairs(words[i]), freqs[i]
        words[i] = merge_word(words[i], pair, new)
        after = word_pairs(words[i])
        for p, k in before.items():
            change[p] -= k * n
            if p not in after:
                pair_words[p].discard(i)
        for p, k in after.items():
            change[p] += k * n
            pair_words[p].add(i)
    changed = set()
    for p, delta in change.items():
        if delta == 0:  # a pair away from the merge: taken out and put back
            continue
        pair_counts[p] += delta
        if pair_counts[p] == 0:  # gone from the corpus (the merged pair itself among them)
            del pair_counts[p]
            pair_words.pop(p, None)
        else:
            changed.add(p)
    return changed


def bpe_merges(pretoken_counts: Counter, num_merges: int) -> list[tuple[bytes, bytes]]:
    """The merge loop: pre-token frequencies -> at most num_merges merges (pairs of byte strings), in order.
    bpe_merges(Counter({"ab": 2, "abc": 1}), 2) == [(b"a", b"b"), (b"ab", b"c")]"""
    words = [tuple(p.encode("utf-8")) for p in pretoken_counts]  # ids: at first each token is a byte, id == value
    freqs = list(pretoken_counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes; each merge appends its new token

    # The bookkeeping, kept up to date after each merge instead of recounted:
    #   pair_counts[pair]  how often the pair (a, b) of ids occurs in the corpus (its words' frequencies, summed);
    #   pair_words[pair]   the set of words (indices into `words`) that hold it, so that a merge visits only those;
    #   heap               a max-heap of the pairs by count, ties to the greater pair of byte strings; heapq is a
    #                      min-heap, so an entry is (-count, Greater(the pair's bytes), pair) (heap_entry).
    # Lazy invalidation: finding and updating a pair's entry inside the heap would cost a search, so when a merge
    # changes a pair's count we push a new entry and leave the old one where it is. A stale entry is recognised when
    # it is popped, because its count is no longer the pair's count, and skipped (pop_best). Every pair that occurs
    # has an entry with its current count, so the first current entry popped is the true maximum. subtle: an old
    # entry never looks current again, because once a pair exists its count only goes down: a merge creates only pairs
    # that hold the new token.
    # Cost of one merge: re-counting the pairs of the words that hold the merged pair (their total length), plus
    # O(log heap) per changed pair pushed and per stale entry popped; never a pass over the whole corpus.
    pair_counts, pair_words = count_pairs(words, freqs)
    heap = [heap_entry(n, pair, vocab) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < num_merges:
        pair = pop_best(heap, pair_counts)
        if pair is None:  # no pair occurs any more: the corpus has no further merges
            break
        a, b = pair
        merges.append((vocab[a], vocab[b]))
        vocab.append(vocab[a] + vocab[b])
        for changed in apply_merge(pair, len(vocab) - 1, words, freqs, pair_counts, pair_words):
            heapq.heappush(heap, heap_entry(pair_counts[changed], changed, vocab))
    return merges


def check_training_args(input_path, vocab_size: int, special_tokens) -> list[str]:
    """Validate the arguments of train_bpe; returns the special tokens de-duplicated in order."""
    path = Path(input_path)
    if path.is_dir():
        raise IsADirectoryError(f"input file {path} is a directory; give a text file")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty; give a text file with some content")
    specials = unique_special_tokens(special_tokens)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(specials)} special tokens; "
                         f"use at least {256 + len(specials)}")
    return specials


def train_bpe(input_path, vocab_size: int, special_tokens=(), *, fast=False, num_workers=None, progress=False):
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns (vocab, merges): vocab maps id -> bytes (0..255 the single bytes, then one id per merge in creation order,
    then the special tokens); merges is the list of (bytes, bytes) pairs in creation order. Identical to
    train_bpe_naive. fast=True: lib/fast_bpe.py's trainer, the same merges; only it uses num_workers (processes that
    pre-tokenise; default one per CPU) and progress (lines on stderr)."""
    specials = check_training_args(input_path, vocab_size, special_tokens)
    num_merges = vocab_size - 256 - len(specials)
    if fast:  # lib/fast_bpe.py, same merges: parallel pre-tokenisation, words as strs merged in C, numpy pair counts
        merges = fast_bpe.train(input_path, specials, num_merges, PRETOKEN_RE, special_pattern(specials),
                                num_workers=num_workers, progress=progress)
    else:
        merges = bpe_merges(count_pretokens(read_text(input_path), specials), num_merges)
    if len(merges) < num_merges:
        print(f"note: the corpus has only {len(merges)} distinct merges; stopping at vocab size "
              f"{256 + len(merges) + len(specials)} instead of {vocab_size}", file=sys.stderr)
    vocab = {i: bytes([i]) for i in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = a + b
    for s in specials:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


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
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"output directory {parent} is a file; give a path inside a directory")
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
        raw = json.loads(read_text(vocab_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{vocab_path} is not valid JSON ({e}); expected {{token: id}}") from None
    # ids below 2**32: what a .npy of ids holds (lib/datasets.py); no real vocab comes near it
    if not isinstance(raw, dict) or not all(type(i) is int and 0 <= i < 1 << 32 for i in raw.values()):
        raise ValueError(f"{vocab_path} must map token strings to integer ids from 0 to 2**32 - 1")
    vocab = {i: str_to_token(s, str(vocab_path)) for s, i in raw.items()}
    if len(vocab) != len(raw):
        raise ValueError(f"{vocab_path} gives the same id to two tokens")
    known = set(vocab.values())
    merges = []
    for n, line in enumerate(read_text(merges_path).split("\n"), start=1):
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

# Where a stream of text may be cut without changing its pre-tokens: just before a whitespace character that follows
# a non-whitespace one. No GPT-2 pre-token holds a non-whitespace character followed by a whitespace one (the
# alternatives that take whitespace take a single leading space or whitespace only), and the pattern has no
# lookbehind, so pretokens(text[:p]) + pretokens(text[p:]) == pretokens(text) at such a p.
SAFE_CUT_RE = regex.compile(r"(?<=\S)\s")


class Tokenizer:
    """Encode text to ids and back with a byte-level BPE vocab (ours or GPT-2's: any id order works).

    tok = Tokenizer.from_dir("runs/tok"); tok.decode(tok.encode("hello<|endoftext|>")) == "hello<|endoftext|>"
    fast=True encodes through lib/fast_bpe.py's encoder: the same ids, with caches and batched merges.
    """

    CUT_LOOKBACK = 4096  # characters before the end of the buffer searched for a safe cut (see _safe_cut)

    def __init__(self, vocab: dict[int, bytes], merges: list, special_tokens=None, *, fast=False):
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
        self.fast = fast  # lib/fast_bpe.py's encoder: caches text it has seen, merges new pre-tokens in numpy batches
        self._encoder = fast_bpe.Encoder(self._bpe, self._byte_ids, self._ranks, self.vocab_size,
                                         self.special_token_ids, self._special_re, PRETOKEN_RE) if fast else None

    def __reduce__(self):  # pickle (for worker processes) the arguments, not the caches
        return functools.partial(Tokenizer, fast=self.fast), (self.vocab, self.merges, self.special_tokens)

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None, *, fast=False) -> "Tokenizer":
        vocab, merges = load_tokenizer_files(vocab_path, merges_path)
        return cls(vocab, merges, special_tokens, fast=fast)

    @classmethod
    def from_dir(cls, directory, *, fast=False) -> "Tokenizer":
        """A tokenizer directory: vocab.json, merges.txt and (optional) special_tokens.json, a JSON list of strings."""
        d = Path(directory)
        for name in ("vocab.json", "merges.txt"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} does not exist; is {d} a tokenizer directory (bpe.py train --out)?")
        specials = []
        if (d / "special_tokens.json").is_file():
            try:
                specials = json.loads(read_text(d / "special_tokens.json"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{d / 'special_tokens.json'} is not valid JSON ({e}); expected a list of strings") from None
            if not isinstance(specials, list) or not all(isinstance(s, str) and s for s in specials):
                raise ValueError(f"{d / 'special_tokens.json'} must be a JSON list of non-empty strings")
        try:
            return cls.from_files(d / "vocab.json", d / "merges.txt", specials, fast=fast)
        except ValueError as e:  # one that does not say where (a byte missing from the vocab): name the directory
            raise (e if str(d) in str(e) else ValueError(f"tokenizer {d}: {e}")) from None

    def save_dir(self, directory) -> None:
        """What from_dir reads: vocab.json, merges.txt and special_tokens.json, all three or (write_text_files) none."""
        d = Path(directory)
        vocab_text, merges_text = tokenizer_file_texts(self.vocab, self.merges)
        write_text_files({d / "vocab.json": vocab_text, d / "merges.txt": merges_text,
                          d / "special_tokens.json": json.dumps(self.special_tokens, ensure_ascii=False) + "\n"})

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

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

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens are matched first (longest wins) and never split; the GPT-2 regex cuts the
        text between them into pre-tokens, and each pre-token's bytes are merged by rank (_bpe)."""
        if self._encoder is not None:  # fast=True: the same ids from lib/fast_bpe.py (see __init__)
            return self._encoder.encode(text)
        ids = []
        for k, part in enumerate(split_on_specials(text, self._special_re)):
            if k % 2:  # a special token
                ids.append(self.special_token_ids[part])
            else:
                for pretoken in PRETOKEN_RE.findall(part):
                    ids.extend(self._bpe(pretoken))
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
        p is the last SAFE_CUT_RE position that leaves room for the longest special token after it (so no special
        match can still change), moved back to the start of a special token match if one spans it (a match start is
        itself a safe cut: special tokens are split off first). subtle: that room is there because a special token
        may arrive in pieces ("<|endof", then "text|>"), and its start must not be encoded before its end is seen."""
        longest = max(map(len, self.special_tokens), default=0)
        limit = len(buf) - longest
        start = max(0, limit - self.CUT_LOOKBACK)
        cut = 0
        for m in SAFE_CUT_RE.finditer(buf, start, max(start, limit)):
            cut = m.start()
        if not cut or self._special_re is None:
            return cut
        for m in self._special_re.finditer(buf, 0, cut + longest):
            if m.start() < cut < m.end():
                return m.start()
        return cut

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD. note: a character's bytes may span two
        tokens, so decode a whole sequence, not token by token."""
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocab (size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def train_command(args) -> None:
    """bpe.py train: train on --input and write the tokenizer directory --out."""
    t0 = time.perf_counter()
    out = Path(args.out)
    check_output_dir(out)
    check_dir_target(out, "--out", "the tokenizer directory")
    from lib.memory import TreePeak  # the largest sum over this process and its workers alive at once
    with output_dir(out), TreePeak() as peak:  # out is made before training: one that cannot be made fails first
        vocab, merges = train_bpe(args.input, args.vocab_size, args.special_tokens, fast=True,
                                  num_workers=args.workers, progress=True)
        Tokenizer(vocab, merges, args.special_tokens).save_dir(out)
    longest = max(vocab.values(), key=len)
    print(f"trained {len(vocab):,} tokens in {time.perf_counter() - t0:.1f} s, peak memory "
          f"{peak.bytes / 2**20:.0f} MiB, longest token {longest.decode('utf-8', 'replace')!r} "
          f"({len(longest)} bytes) -> {out}")


def encode_command(args) -> None:
    """bpe.py encode: encode --input with the tokenizer directory --tokenizer into the .npy --output."""
    from lib import datasets  # parallel encoding into a .npy (operations: imported only here)
    t0 = time.perf_counter()
    tok = Tokenizer.from_dir(args.tokenizer, fast=True)
    check_file_target(args.output, "--output", "the .npy of token ids", "ids.npy")
    n = datasets.encode_file(tok, args.input, args.output, args.workers, progress=True)
    dt, size = time.perf_counter() - t0, os.path.getsize(args.input)
    print(f"{n:,} tokens, {size / max(n, 1):.2f} bytes/token, {size / 1e6 / dt:.1f} MB/s -> {args.output}")


def prepare_command(args) -> None:
    """bpe.py prepare: download a dataset, train its tokenizer and encode both splits into --out."""
    from lib import datasets
    t0 = time.perf_counter()
    counts = datasets.prepare(args.dataset, args.out, args.base_url, args.vocab_size, args.workers)
    print(f"prepared {args.dataset} in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v:,} tokens" for k, v in counts.items()) + f" -> {args.out}")


def export_command(args) -> None:
    """bpe.py export: the tokenizer directory --tokenizer as Hugging Face tokenizer files (a directory) or a
    .tiktoken file, --out."""
    from lib import tokenizer_formats as formats  # other libraries' file formats (imported only here)
    tok = Tokenizer.from_dir(args.tokenizer)
    out = Path(args.out)
    check_output_dir(out)
    if args.format == "hf":
        check_dir_target(out, "--out", "the Hugging Face tokenizer directory")
        stale = formats.hf_tokenizer_replaces(out, args.force)  # another tokenizer's files are not left beside ours
        with output_dir(out):
            formats.save_hf_tokenizer(tok, out)
            for name in stale:
                (out / name).unlink()
        print(f"wrote {out}/tokenizer.json and tokenizer_config.json; in Python: "
              f"transformers.AutoTokenizer.from_pretrained({str(out)!r}) or tokenizers.Tokenizer.from_file("
              f"{str(out / 'tokenizer.json')!r})")
    else:
        check_file_target(out, "--out", "the .tiktoken file", "tokenizer.tiktoken")
        atomic_write_text(out, formats.tiktoken_file_text(tok))
        print(f"wrote {out}; in Python:\n  {formats.tiktoken_one_liner(tok, out)}")


def build_parser() -> OneLineParser:
    """The subcommands; each sets args.command_fn, the function that runs it."""
    from lib import datasets  # the names of the datasets `prepare` knows
    parser = OneLineParser(prog="bpe.py", description=__doc__.split("\n")[0])
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
    p.add_argument("dataset", choices=sorted(datasets.DATASETS))
    p.add_argument("--out", required=True)
    p.add_argument("--base-url", default=None, help=f"download from here instead (or set ${datasets.BASE_URL_ENV})")
    p.add_argument("--vocab-size", type=int, default=None, help="default: 10000 (tinystories), 32000 (owt)")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(command_fn=prepare_command)
    p = sub.add_parser("export", help="write a tokenizer directory as Hugging Face tokenizer.json or a .tiktoken file")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    p.add_argument("--format", choices=["hf", "tiktoken"], required=True)
    p.add_argument("--out", required=True, help="hf: a directory (tokenizer.json, tokenizer_config.json); "
                                                "tiktoken: the .tiktoken file")
    p.add_argument("--force", action="store_true", help="hf: write into a directory that holds more than an earlier "
                   "export, replacing the tokenizer files there (other tokenizers' too) and keeping the rest")
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
    except ValueError as e:  # bad input: bad arguments, bad file contents
        print(f"bpe.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a wrong path is the user's (2); permissions, a full or failing disk the machine's (1)
        code, line = describe_os_error(e)
        print(f"bpe.py: error: {line}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
