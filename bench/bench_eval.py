"""Benchmark: `sample.py --eval` (sample.evaluate) against train.py's validation loss on the same tokens.

Both score the same non-overlapping full windows of random token ids with the same random-init model (speed does
not depend on training), CPU, fp32, the fast path as the programs run it (TransformerLM(fast=True), the fast
cross-entropy): sample.evaluate(model, ids, fast=True) with its defaults (stride = context_length, 16
windows per forward), and train.evaluate over the same window starts with micro-batch 16, which is what a training
run's validation does. The two alternate in one process; medians over --repeats. Reported: tokens scored per
second each, the ratio sample / train (target: >= 1.0x within noise, as fast as training's evaluation), and the two
losses (they must agree: both call lib.evaluation.loss_over_windows).

    python bench/bench_eval.py              # tiny and ts17m, 32 windows each (~1 minute on 2 idle cores)
    python bench/bench_eval.py --quick      # smoke run: tiny, 8 windows
"""
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: model.py, sample.py, train.py
import sample  # noqa: E402
import train  # noqa: E402
from lib.measure import machine_line  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.cpu_tuning import tune_process, tuning_line  # noqa: E402
from model import PRESETS, TransformerLM  # noqa: E402

BATCH = 16


def time_both(model, ids, repeats: int) -> dict:
    """Alternating timings (s) of sample.evaluate and train.evaluate over the same windows, and their losses."""
    ctx = model.config.context_length
    starts = np.arange(0, len(ids) - ctx, ctx)  # the windows sample.evaluate scores: ids[s : s + ctx + 1]
    times = {"sample": [], "train": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_loss, n = sample.evaluate(model, ids, batch_size=BATCH, fast=True)
        times["sample"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_loss = train.evaluate(model, ids, starts, BATCH, ctx, torch.device("cpu"), contextlib.nullcontext(),
                                    fast=True)
        times["train"].append(time.perf_counter() - t0)
    model.eval()
    assert n == len(starts) * ctx, (n, len(starts), ctx)
    assert abs(sample_loss - train_loss) < 1e-4, (sample_loss, train_loss)
    return {"tokens": n, "loss": (sample_loss, train_loss), **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 8 windows, 1 repeat")
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(PRESETS))
    parser.add_argument("--windows", type=int, default=None, help="windows of context_length scored (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3)")
    args = parser.parse_args()
    configs = args.configs or (["tiny"] if args.quick else ["tiny", "ts17m"])
    windows = args.windows or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    for name in configs:
        cfg = PRESETS[name]
        torch.manual_seed(0)
        model = TransformerLM(**dataclasses.asdict(cfg), fast=True).eval()
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, windows * cfg.context_length + 1, dtype=np.int64)
        sample.evaluate(model, ids[:2 * cfg.context_length + 1], batch_size=BATCH, fast=True)  # warm-up
        r = time_both(model, ids, repeats)
        rows.append((name, cfg, r))
        print(f"  {name}: sample {r['tokens'] / r['sample']:,.0f} tok/s | train {r['tokens'] / r['train']:,.0f} tok/s",
              file=sys.stderr)
    print(f"\nCommand: `python {' '.join(sys.argv)}`  \nMachine: {machine_line()}; {tuning_line()}\n")
    print("| config | tokens scored | sample.py --eval tokens/s | train.py validation tokens/s | sample / train "
          "| losses (sample, train) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, cfg, r in rows:
        print(f"| {name} ({cfg.context_length} context, {BATCH} windows per forward) | {r['tokens']:,} "
              f"| {r['tokens'] / r['sample']:,.0f} | {r['tokens'] / r['train']:,.0f} | {r['train'] / r['sample']:.2f}x "
              f"| {r['loss'][0]:.4f}, {r['loss'][1]:.4f} |")


if __name__ == "__main__":
    tune_process()  # first: time both as `python sample.py` and `python train.py` run
    main()
