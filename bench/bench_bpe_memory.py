"""BPE training at OpenWebText's size: peak memory and time of `bpe.py train` against HF tokenizers (issue 33).

Writes bench/synth_corpus.py's --letters corpus at each size (seeded; skipped if the file is already there), then runs,
alternately and each as its own process, `python bpe.py train` (vocab 32K, <|endoftext|>) and Hugging Face tokenizers'
BpeTrainer fed by a streaming iterator (16 MiB blocks, documents split on <|endoftext|>, the same GPT-2 regex and
byte-level alphabet, the same number of threads as our workers). For each: wall time, and the peak of the memory of
the whole process tree (the sum of the resident sizes of the process and all its workers alive at the same moment,
sampled from /proc every 50 ms by lib/memory.TreePeak, from this process). With --worker-counts it then runs ours
with each of those worker counts, to see whether memory grows with them. Ends with a Markdown table for BENCHMARKS.md.

    python bench/bench_bpe_memory.py --sizes 2000 12000 --dir /tmp/bpe_mem                # ~45 minutes on 2 cores
    python bench/bench_bpe_memory.py --sizes 12000 --dir /tmp/bpe_mem --skip-hf --worker-counts 2 4 8
    python bench/bench_bpe_memory.py --sizes 20 --dir /tmp/bpe_mem                         # smoke run, seconds
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import bpe  # noqa: E402
from lib.memory import TreePeak  # noqa: E402

EOT = bpe.END_OF_TEXT
HF_BLOCK_BYTES = 16 << 20


# ---------------------------------------------------------------------------------------------------------------------
# The two trainers, each run as a child process
# ---------------------------------------------------------------------------------------------------------------------

def hf_documents(path):
    """The file's documents, a list per 16 MiB block, reading as a user streaming a big file would."""
    rest = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(HF_BLOCK_BYTES):
            docs = (rest + block).split(EOT)
            rest = docs.pop()
            yield docs
    if rest:
        yield [rest]


def train_hf(path, vocab_size: int) -> None:
    """Hugging Face tokenizers' BPE trainer with the GPT-2 pre-tokeniser (RAYON_NUM_THREADS set by the parent)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(bpe.GPT2_PAT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(hf_documents(path), trainer)


def run(argv, env=None) -> tuple[float, int, str]:
    """(wall seconds, peak bytes of the process tree, stderr) of one child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
    with TreePeak(child.pid) as peak:
        _, err = child.communicate()
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        sys.exit(f"bench_bpe_memory.py: {argv[1]} failed (exit {child.returncode}): {err.strip()[-500:]}")
    return seconds, peak.bytes, err


def run_ours(path, vocab_size: int, workers: int) -> tuple[float, int, int]:
    """(seconds, peak bytes, unique pre-tokens) of `bpe.py train`."""
    with tempfile.TemporaryDirectory() as out:
        seconds, peak, err = run([sys.executable, str(ROOT / "bpe.py"), "train", "--input", str(path), "--vocab-size",
                                  str(vocab_size), "--special-tokens", EOT, "--workers", str(workers), "--out", out])
    unique = re.search(r"([\d,]+) unique pre-tokens", err)
    return seconds, peak, int(unique.group(1).replace(",", "")) if unique else -1


def run_hf(path, vocab_size: int, workers: int) -> tuple[float, int]:
    seconds, peak, _ = run([sys.executable, __file__, "--hf-child", str(path), "--vocab-size", str(vocab_size)],
                           env={"RAYON_NUM_THREADS": str(workers)})
    return seconds, peak


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------------

def corpus(directory: Path, mb: float) -> Path:
    """The seeded --letters corpus of `mb` MB in directory, written once."""
    from synth_corpus import write_letter_corpus
    path = directory / f"letters-{mb:g}MB.txt"
    if not path.is_file():
        print(f"writing {path} ...", file=sys.stderr)
        part = path.with_suffix(".part")
        write_letter_corpus(part, int(mb * 1e6), 3_000_000, 1.1, seed=0)
        part.replace(path)
    return path


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2000, 12000], help="corpus sizes in MB")
    ap.add_argument("--dir", type=Path, help="where the corpora are written (~14 GB for the default)")
    ap.add_argument("--vocab-size", type=int, default=32_000)
    ap.add_argument("--workers", type=int, default=2, help="our workers and HF's threads in the comparison")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (HF, then ours) per size")
    ap.add_argument("--worker-counts", type=int, nargs="*", default=[], help="then ours alone with these workers")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_child:
        return train_hf(args.hf_child, args.vocab_size)
    if args.dir is None:
        ap.error("--dir DIR is required: where the corpora are written")
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in args.sizes:
        path = corpus(args.dir, mb)
        for r in range(args.rounds):
            hf = None if args.skip_hf else run_hf(path, args.vocab_size, args.workers)
            ours = run_ours(path, args.vocab_size, args.workers)
            line = f"{mb:g} MB round {r}: ours {ours[0]:.1f} s {gb(ours[1])} ({ours[2]:,} unique pre-tokens)"
            if hf:
                line += (f" | HF {hf[0]:.1f} s {gb(hf[1])} | time {ours[0] / hf[0]:.2f}x, memory "
                         f"{ours[1] / hf[1]:.2f}x")
            print(line, file=sys.stderr, flush=True)
            rows.append((f"{mb:g} MB, {ours[2] / 1e6:.1f}M pre-tokens", args.workers, ours, hf))
        for w in args.worker_counts:
            ours = run_ours(path, args.vocab_size, w)
            print(f"{mb:g} MB, ours with {w} workers: {ours[0]:.1f} s {gb(ours[1])}", file=sys.stderr, flush=True)
            rows.append((f"{mb:g} MB, {ours[2] / 1e6:.1f}M pre-tokens", w, ours, None))
    print(f"\n`python bench/bench_bpe_memory.py {' '.join(sys.argv[1:])}`; {platform.machine()}, {os.cpu_count()} "
          f"cores; vocab {args.vocab_size:,}; peak = largest sum of resident memory over the process tree\n")
    print("| corpus | workers | ours | HF tokenizers (streaming) | time | peak memory |\n|---|---|---|---|---|---|")
    for name, w, ours, hf in rows:
        theirs = f"{hf[0]:.1f} s, {gb(hf[1])}" if hf else "-"
        ratios = (f"{ours[0] / hf[0]:.2f}x | {ours[1] / hf[1]:.2f}x" if hf else "- | -")
        print(f"| {name} | {w} | {ours[0]:.1f} s, {gb(ours[1])} | {theirs} | {ratios} |")


if __name__ == "__main__":
    main()
