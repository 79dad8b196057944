"""A synthetic training corpus for the BPE scale benchmark (issue 14): seeded, so the same arguments always write the
same bytes; never committed (write it anywhere, e.g. /tmp).

What it is: documents of words separated by `<|endoftext|>`. The words are ~1.5M distinct made-up ones, each 1-4
syllables (so BPE finds real structure to merge: common syllables first, then words), with Zipf frequencies
(Zipf 1949: the k-th most frequent word has frequency ~ 1/k, as in natural text), so a 100 MB sample holds ~1M
distinct words, many of them once: the long tail that makes the merge loop's bookkeeping big. Between words: mostly a
space, sometimes punctuation or a newline, so the GPT-2 pre-tokeniser sees more than letters.

    python bench/synth_corpus.py --out /tmp/synth.txt                 # 110 MB, seed 0 (~1 minute)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mb", type=float, default=110.0, help="size to write, in MB (10^6 bytes)")
    ap.add_argument("--vocab", type=int, default=1_500_000, help="distinct words to draw from")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the word frequencies")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stats = write_corpus(args.out, args.mb, args.vocab, args.zipf, args.seed)
    print(f"wrote {args.out}: {stats['bytes'] / 1e6:.1f} MB, {stats['documents']:,} documents, "
          f"{stats['distinct_words']:,} distinct words (seed {args.seed})")


if __name__ == "__main__":
    main()
