"""Benchmark: generation speed of sample.py with the KV cache against the recompute-everything reference.

Generates 512 new tokens from a 16-token prompt at the tiny and ts17m presets (context_length raised to 576 so the
window never slides), batch 1 and 8, random-init weights (speed does not depend on training), fp32, CPU, the model's
fast path as sample.py builds it (TransformerLM(fast=True)). Reports
tokens/s with and without the cache, the speed-up (target >= 5x), and the cache's mean step latency over the first
and last 64 tokens (target: flat, since each step attends over a longer cache but computes one position).

The reference step (crop, full forward, sample) costs the same at a given length whatever the tokens, so by
default it is timed on every 8th step of the cached run's own sequence (--ref-every 8) and the steps between are
interpolated; --ref-every 1 times the reference generation loop itself, every step (about 8x longer). Cache and
reference alternate within one process, and medians over --repeats are reported.

    python bench/bench_sample.py                 # full table (a few minutes on 2 idle cores)
    python bench/bench_sample.py --quick         # smoke run: tiny only, 128 new tokens
    python bench/bench_sample.py --ref-every 1   # time every reference step too
"""
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: model.py, sample.py, accounting.py
from lib.measure import machine_line  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.cpu_tuning import tune_process, tuning_line  # noqa: E402
from model import PRESETS, TransformerLM  # noqa: E402
from sample import generate_stream, next_logits, sample_next  # noqa: E402

PROMPT_LEN = 16


def time_cached(model, prompt, new_tokens, seed):
    """Step latencies (s) of generate_stream with the cache, and the (B, T) sequence it produced."""
    gen = torch.Generator().manual_seed(seed)
    latencies, steps = [], []
    start = time.perf_counter()
    for step in generate_stream(model, prompt, new_tokens, generator=gen, use_cache=True):
        now = time.perf_counter()
        latencies.append(now - start)
        steps.append(step)
        start = now
    return np.array(latencies), torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)


@torch.inference_mode()
def time_reference(model, seq, new_tokens, ref_every, seed):
    """Total seconds of the no-cache reference for new_tokens steps over seq (B, PROMPT_LEN + new_tokens)."""
    gen = torch.Generator().manual_seed(seed)
    if ref_every == 1:                                          # the reference loop itself, every step
        start = time.perf_counter()
        for _ in generate_stream(model, seq[:, :PROMPT_LEN], new_tokens, generator=gen, use_cache=False):
            pass
        return time.perf_counter() - start
    # One reference step = crop + full forward + sample, exactly generate_stream's body with use_cache=False.
    measured = sorted(set(range(0, new_tokens, ref_every)) | {new_tokens - 1})
    seconds = []
    for i in measured:
        start = time.perf_counter()
        logits, _ = next_logits(model, seq[:, :PROMPT_LEN + i], None)
        sample_next(logits, generator=gen)
        seconds.append(time.perf_counter() - start)
    # steps in between: linear interpolation in the step index (cost grows with length)
    return float(np.interp(np.arange(new_tokens), measured, seconds).sum())


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny only, 128 new tokens")
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(PRESETS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=None, help="default 512 (128 with --quick)")
    parser.add_argument("--ref-every", type=int, default=None, help="time every Nth reference step (default 8, "
                        "16 with --quick; 1 = the whole reference loop)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs or (["tiny"] if args.quick else ["tiny", "ts17m"])
    new_tokens = args.new_tokens or (128 if args.quick else 512)
    ref_every = args.ref_every or (16 if args.quick else 8)
    if new_tokens < 128 or ref_every < 1 or args.repeats < 1:
        parser.error("--new-tokens must be >= 128 (two 64-token latency windows), --ref-every and --repeats >= 1")

    rows = []
    for name in configs:
        config = dataclasses.replace(PRESETS[name], context_length=PROMPT_LEN + new_tokens + 48)  # 576 at 512
        torch.manual_seed(0)
        model = TransformerLM(**dataclasses.asdict(config), fast=True).eval()  # as sample.py's CLI loads it
        for batch in args.batch_sizes:
            prompt = torch.randint(config.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
            time_cached(model, prompt, 8, seed=0)                               # warm-up
            cached_s, ref_s, first, last = [], [], [], []
            for r in range(args.repeats):
                latencies, seq = time_cached(model, prompt, new_tokens, seed=r)
                ref_s.append(time_reference(model, seq, new_tokens, ref_every, seed=r))
                cached_s.append(latencies.sum())
                first.append(latencies[:64].mean())
                last.append(latencies[-64:].mean())
            row = dict(config=name, batch=batch, ref_tps=batch * new_tokens / statistics.median(ref_s),
                       cache_tps=batch * new_tokens / statistics.median(cached_s),
                       speedup=statistics.median(ref_s) / statistics.median(cached_s),
                       first_ms=1e3 * statistics.median(first), last_ms=1e3 * statistics.median(last))
            rows.append(row)
            print(f"{name} batch {batch}: no cache {row['ref_tps']:.1f} tok/s, cache {row['cache_tps']:.1f} tok/s "
                  f"({row['speedup']:.1f}x); cache step {row['first_ms']:.1f} ms (first 64) -> "
                  f"{row['last_ms']:.1f} ms (last 64)", file=sys.stderr, flush=True)

    command = "python bench/bench_sample.py" + (" --quick" if args.quick else "") + \
        ("" if args.ref_every is None else f" --ref-every {args.ref_every}")
    ref_note = "every step" if ref_every == 1 else f"every {ref_every}th step timed, the rest interpolated"
    print(f"\n## sample.py\n\n`{command}`: {new_tokens} new tokens from a {PROMPT_LEN}-token prompt, random-init "
          f"weights, fp32, temperature 1; context_length {PROMPT_LEN + new_tokens + 48} so the window never slides. "
          f"No cache = sample.py's reference (full forward of the whole context each step; {ref_note}). "
          f"Step latency = one new token for every row of the batch. Median of {args.repeats} run(s).\n")
    print(f"Machine: {machine_line()}; {tuning_line()}\n")
    print("| config | batch | no cache (tok/s) | KV cache (tok/s) | speed-up (target ≥ 5x) "
          "| cache step, first 64 (ms) | cache step, last 64 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['ref_tps']:.1f} | {r['cache_tps']:.1f} | {r['speedup']:.1f}x "
              f"| {r['first_ms']:.1f} | {r['last_ms']:.1f} |")


if __name__ == "__main__":
    tune_process()  # first: time generation under the settings `python sample.py` runs with
    main()
