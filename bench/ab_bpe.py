"""Benchmark: the fast BPE merge loop of two versions, alternated run by run in one process (an A/B test).

The reason is ab_model.py's: on a noisy machine separate runs differ by 5-10% (the 32K merge loop on kernel-docs took
2.8-4.1 s from run to run on one idle VM), so a change of a few percent only shows when both versions run under the
same drift. Both versions merge the same words: the corpus's pre-token counts, computed once (by this tree's
lib/fast_bpe.py). A version is a file that has the fast merge loop (bpe_merges) and gc_paused: lib/fast_bpe.py (its
bpe_merges takes a PretokenTable since issue 33; before, the words as strs and their frequencies, from _byte_words),
or bpe.py from before the loop moved there (a86aed4 and earlier).
Each round runs bpe_merges of each version on the same counts (a fresh copy of the words for the older versions),
the order swapped every round; the times are this process's CPU seconds. Reported: the paired ratio (the median over
rounds of new / old) and the ratio of the two fastest runs. The two versions must produce the same merges. Run it
with one file twice (an A/A test) to see the noise floor.

    git show HEAD:lib/fast_bpe.py > /tmp/fast_bpe_old.py
    python bench/ab_bpe.py /tmp/fast_bpe_old.py lib/fast_bpe.py               # kernel-docs, vocab 32K, 10 rounds
    git show a86aed4:bpe.py > /tmp/bpe_a86aed4.py                             # the loop before it moved to lib/
    python bench/ab_bpe.py /tmp/bpe_a86aed4.py lib/fast_bpe.py --vocab-size 10000 --rounds 6

Pre-tokenising is not in the timed part: it is the same code in both unless the change is there (then time
train_bpe with bench_bpe.py instead).
"""
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo root (cli.py, accounting.py) and bench/ (ab_model.py)

import bpe  # noqa: E402
from ab_model import load_module  # noqa: E402
from lib import fast_bpe  # noqa: E402
from lib.measure import machine_line  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402

EOT = "<|endoftext|>"


def timed_merges(module, table, num_merges: int) -> tuple[float, list]:
    """(CPU seconds, merges) of one version's merge loop on the pre-token counts `table` (a PretokenTable)."""
    if hasattr(module, "PretokenTable"):
        inputs = (table,)
    else:  # a version from before issue 33: the words as strs (one character per byte), on a copy it may rewrite
        keep = table.lengths > 1
        words = [w.decode("latin-1") for w, _ in table.items()]
        inputs = ([w for w, k in zip(words, keep) if k], table.counts[keep].tolist())
    with module.gc_paused():  # as train_bpe runs it
        t0 = time.process_time()
        _, merges = module.bpe_merges(*inputs, num_merges)
        return time.process_time() - t0, merges


def main(argv=None) -> None:
    parser = OneLineParser(description="The fast BPE merge loop of two versions, alternated (A/B).")
    parser.add_argument("old", help="path of the baseline (a lib/fast_bpe.py, or a bpe.py up to a86aed4)")
    parser.add_argument("new", help="path of the changed version (e.g. lib/fast_bpe.py)")
    shared = Path(os.environ.get("CS336_SHARED", HERE.parent.parent / "shared"))
    parser.add_argument("--corpus", type=Path, default=shared / "data" / "kernel-docs-train.txt",
                        help="UTF-8 text with <|endoftext|> between documents (default: ../shared's kernel-docs)")
    parser.add_argument("--vocab-size", type=int, default=32_000, help="as train_bpe's, the special token included")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one run of each per round)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.vocab_size <= 257:
        parser.error("--rounds must be >= 1 and --vocab-size > 257 (256 bytes + the special token)")
    for path in (args.old, args.new):
        if not Path(path).is_file():
            parser.error(f"{path} is not a file; pass the paths of two versions (lib/fast_bpe.py or an old bpe.py)")
    if not args.corpus.is_file():
        parser.error(f"{args.corpus} is not a file; pass --corpus, or put ../shared beside the repository")

    modules = {"old": load_module(args.old, "bpe_old"), "new": load_module(args.new, "bpe_new")}
    with fast_bpe.gc_paused():
        table = fast_bpe.count_pretokens_file(args.corpus, [EOT], bpe.PRETOKEN_RE, bpe.special_pattern([EOT]))
    num_merges = args.vocab_size - 256 - 1
    print(f"{args.corpus.name}: {int((table.lengths > 1).sum()):,} words, {num_merges:,} merges, {args.rounds} rounds",
          file=sys.stderr)

    times, merges = {"old": [], "new": []}, {}
    for r in range(args.rounds):
        for who in (("old", "new") if r % 2 == 0 else ("new", "old")):
            seconds, merges[who] = timed_merges(modules[who], table, num_merges)
            times[who].append(seconds)
        if merges["old"] != merges["new"]:
            sys.exit("ab_bpe.py: error: the two versions made different merges; the change is not a pure speed-up")
        print(f"  round {r}: old {times['old'][-1]:.3f} s, new {times['new'][-1]:.3f} s", file=sys.stderr)

    paired = statistics.median(n / o for o, n in zip(times["old"], times["new"]))
    print(f"\n`python bench/ab_bpe.py {args.old} {args.new} --vocab-size {args.vocab_size} --rounds {args.rounds}`  ")
    print(f"Machine: {machine_line()}  ")
    print(f"Merge loop, CPU seconds: old median {statistics.median(times['old']):.3f} (min {min(times['old']):.3f}), "
          f"new median {statistics.median(times['new']):.3f} (min {min(times['new']):.3f}); new / old paired "
          f"{paired:.3f}, fastest runs {min(times['new']) / min(times['old']):.3f}")


if __name__ == "__main__":
    main()
