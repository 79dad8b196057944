"""A synthetic training corpus for the BPE scale benchmark (issue 14): seeded, so the same arguments always write the
same bytes; never committed (write it anywhere, e.g. /tmp).

What it is: documents of words separated by `<|endoftext|>`. The words are ~1.5M distinct made-up ones, each 1-4
syllables (so BPE finds real structure to merge: common syllables first, then words), with Zipf frequencies
(Zipf 1949: the k-th most frequent word has frequency ~ 1/k, as in natural text), so a 100 MB sample holds ~1M
distinct words, many of them once: the long tail that makes the merge loop's bookkeeping big. Between words: mostly a
space, sometimes punctuation or a newline, so the GPT-2 pre-tokeniser sees more than letters.

    python bench/synth_corpus.py --out /tmp/synth.txt                 # 110 MB, seed 0 (~1 minute)
    python bench/synth_corpus.py --letters --mb 12000 --out /tmp/owt12.txt   # issue 33: 12 GB (~2 minutes)
    python bench/bench_bpe.py --synthetic /tmp/synth.txt              # train vocab 32K, ours vs HF tokenizers
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402

ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "ch", "sh", "th",
          "st", "tr", "pl", "gr", "br"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "x"]
# What follows a word, and how often: mostly one space (the GPT-2 pre-token " word" then starts the next word).
SEPARATORS = [" ", ", ", ". ", ".\n", "\n\n", " - ", "; ", ": ", "? ", "! ", " (", ") ", " 42 ", "'s "]
SEPARATOR_P = [0.80, 0.05, 0.04, 0.03, 0.01, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005, 0.01]


def make_vocabulary(rng: np.random.Generator, n_words: int) -> np.ndarray:
    """n_words distinct words of 1-4 random syllables (onset + vowel + coda), in random order."""
    syllables = np.array([o + v + c for o in ONSETS for v in VOWELS for c in CODAS], dtype=object)
    words: dict[str, None] = {}
    while len(words) < n_words:  # draw a batch, keep the new ones (dict: ordered, so the result is seeded)
        k = n_words - len(words) + 1000
        n_syl = rng.choice([1, 2, 3, 4], size=k, p=[0.15, 0.4, 0.3, 0.15])
        parts = syllables[rng.integers(0, len(syllables), size=(k, 4))]
        for row, n in zip(parts.tolist(), n_syl.tolist()):
            words["".join(row[:n])] = None
    return np.array(list(words)[:n_words], dtype=object)


def zipf_cdf(n_words: int, exponent: float) -> np.ndarray:
    """Cumulative probabilities of ranks 1..n_words with p(k) ~ 1 / k**exponent."""
    p = 1.0 / np.arange(1, n_words + 1, dtype=np.float64) ** exponent
    return np.cumsum(p / p.sum())


def write_corpus(out: Path, target_mb: float, n_vocab: int, exponent: float, seed: int) -> dict:
    """Write documents until the file holds target_mb megabytes; returns what was written."""
    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(rng, n_vocab)
    cdf = zipf_cdf(n_vocab, exponent)
    seen = np.zeros(n_vocab, dtype=bool)
    size = docs = 0
    with open(out, "w", encoding="utf-8", newline="") as f:
        while size < target_mb * 1e6:
            n = int(rng.integers(100, 3000))  # words in this document
            idx = np.minimum(np.searchsorted(cdf, rng.random(n)), n_vocab - 1)  # inverse-CDF sampling of ranks
            seen[idx] = True
            seps = rng.choice(len(SEPARATORS), size=n, p=SEPARATOR_P)
            text = "".join(w + SEPARATORS[s] for w, s in zip(vocab[idx].tolist(), seps.tolist()))
            text = text[0].upper() + text[1:] + "\n" + bpe.END_OF_TEXT + "\n"
            f.write(text)
            size += len(text)  # ASCII only: characters are bytes
            docs += 1
    return {"bytes": size, "documents": docs, "distinct_words": int(seen.sum())}


# ---------------------------------------------------------------------------------------------------------------------
# --letters: the OpenWebText-sized corpus of the BPE memory benchmark (issue 33), written with numpy at ~100 MB/s
# ---------------------------------------------------------------------------------------------------------------------
# Random letter strings instead of syllables (so a 3M-word lexicon is cheap to make), Zipf(1.1) frequencies,
# capitalised words (every document's first word and ~8% of the others), commas and full stops, and <|endoftext|>
# between documents of 50-400 words. A lexicon word becomes up to four distinct pre-tokens (" word", " Word", "Word",
# "word" after a newline), so 2 GB holds ~4M distinct pre-tokens and 12 GB ~6-7M, as issue 33 measured.

LETTER_SEPARATORS = [b" ", b", ", b". ", b".\n"]
LETTER_SEPARATOR_P = [0.86, 0.07, 0.05, 0.02]
LETTER_BLOCK_WORDS = 4_000_000  # words per write: ~30 MB of text, a few hundred MB of numpy temporaries


def make_letter_lexicon(rng: np.random.Generator, n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """n_words distinct lowercase strings of 2-14 random letters, as fixed-width bytes (S14) and their lengths."""
    words = np.zeros(0, dtype="S14")
    while len(words) < n_words:
        k = 2 * (n_words - len(words)) + 1000
        lengths = np.clip(rng.poisson(5.0, size=k) + 2, 2, 14)
        letters = rng.integers(ord("a"), ord("z") + 1, size=(k, 14), dtype=np.uint8)
        letters[np.arange(14) >= lengths[:, None]] = 0  # S14 strips the trailing NULs
        drawn = letters.view("S14").ravel()
        words = np.concatenate([words, drawn])
        _, first = np.unique(words, return_index=True)  # distinct, in the order first drawn (seeded)
        words = words[np.sort(first)]
    words = words[:n_words]
    return words, np.char.str_len(words)


def gather(table: bytes, starts: np.ndarray, sizes: np.ndarray) -> bytes:
    """b"".join(table[s:s + n] for s, n in zip(starts, sizes)), in numpy."""
    flat = np.frombuffer(table, dtype=np.uint8)
    ends = np.cumsum(sizes)
    index = np.arange(ends[-1]) - np.repeat(ends - sizes - starts, sizes)
    return flat[index].tobytes()


def write_letter_corpus(out: Path, target_bytes: int, n_lexicon: int, exponent: float, seed: int) -> dict:
    """Write documents of Zipf-distributed random-letter words until the file holds target_bytes."""
    rng = np.random.default_rng(seed)
    words, lengths = make_letter_lexicon(rng, n_lexicon)
    # One table of byte strings: the words, the same words capitalised, the separators, the document end.
    pieces = [*words.tolist(), *np.char.capitalize(words).tolist(), *LETTER_SEPARATORS,
              b".\n" + bpe.END_OF_TEXT.encode() + b"\n"]
    sizes_of = np.array([len(x) for x in pieces], dtype=np.int64)
    starts_of = np.cumsum(sizes_of) - sizes_of
    table = b"".join(pieces)
    first_sep, doc_end = 2 * n_lexicon, 2 * n_lexicon + len(LETTER_SEPARATORS)
    cdf = zipf_cdf(n_lexicon, exponent)
    size = docs = 0
    with open(out, "wb") as f:
        while size < target_bytes:
            n = int(min(LETTER_BLOCK_WORDS, (target_bytes - size) / 8 + 1000))  # ~8.3 bytes a word
            word = np.minimum(np.searchsorted(cdf, rng.random(n)), n_lexicon - 1)
            sep = first_sep + rng.choice(len(LETTER_SEPARATORS), size=n, p=LETTER_SEPARATOR_P)
            ends = np.cumsum(rng.integers(50, 401, size=n // 50))  # documents of 50-400 words
            ends = ends[ends < n]
            sep[ends] = doc_end
            capital = rng.random(n) < 0.08
            capital[ends[:-1] + 1] = True
            capital[0] = True
            word += capital * n_lexicon
            order = np.stack([word, sep], axis=1).ravel()  # word, separator, word, separator, ...
            data = gather(table, starts_of[order], sizes_of[order])
            f.write(data)
            size += len(data)
            docs += len(ends)
    return {"bytes": size, "documents": docs, "lexicon": n_lexicon}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mb", type=float, default=110.0, help="size to write, in MB (10^6 bytes)")
    ap.add_argument("--vocab", type=int, default=None, help="distinct words to draw from (default 1.5M; --letters 3M)")
    ap.add_argument("--zipf", type=float, default=None, help="Zipf exponent of the word frequencies (default 1.0; "
                                                              "--letters 1.1)")
    ap.add_argument("--letters", action="store_true", help="issue 33's corpus: random-letter words (fast; use "
                                                           "--mb 2000 or 12000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.letters:
        stats = write_letter_corpus(args.out, int(args.mb * 1e6), args.vocab or 3_000_000, args.zipf or 1.1,
                                    args.seed)
        print(f"wrote {args.out}: {stats['bytes'] / 1e6:.1f} MB, {stats['documents']:,} documents, lexicon "
              f"{stats['lexicon']:,} words (seed {args.seed})")
        return
    stats = write_corpus(args.out, args.mb, args.vocab or 1_500_000, args.zipf or 1.0, args.seed)
    print(f"wrote {args.out}: {stats['bytes'] / 1e6:.1f} MB, {stats['documents']:,} documents, "
          f"{stats['distinct_words']:,} distinct words (seed {args.seed})")


if __name__ == "__main__":
    main()
