"""Benchmark: the training loop's own throughput (`train.train`, as `python train.py` runs it) against the bare model
step of bench/bench_model.py (forward + loss + backward + AdamW step on one fixed batch), on CPU, at the tiny and
ts17m presets in fp32 and bf16 autocast. The difference is the loop's overhead: memmap batches, the lr schedule,
gradient clipping, the loss/NaN bookkeeping and logging. Target: <= 3%.

Both sides run in this one process, alternating round by round (bare steps, then a short train.py run), and each
reports the median per-step time after warm-up steps (train.py's from its own log.jsonl, `ms_per_step` with
--log-interval 1). Evaluation is reported separately, amortised at train.py's defaults (20 batches every 500 steps).

    python bench/bench_train.py              # tiny + ts17m, fp32 + bf16 (~4 minutes on 2 idle cores)
    python bench/bench_train.py --quick      # smoke run
    time python train.py                     # the offline demo end to end (reported beside this table)
"""
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo root (train.py, model.py, ...) and bench/ (bench_model.py)

import train  # noqa: E402
from accounting import train_flops_per_token  # noqa: E402
from lib.measure import machine_line  # noqa: E402
from bench_model import BATCH, DTYPES, build_ours, make_step, matmul_peak  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.cpu_tuning import tune_process, tuning_line  # noqa: E402
from lib.runs import read_log, resolve_args  # noqa: E402
from model import PRESETS  # noqa: E402


def bare_step_times(cfg, B, precision, warmup, steps) -> list[float]:
    """Seconds per step of bench_model's bare step (the reference), after `warmup` untimed steps."""
    torch.manual_seed(0)
    model, opt = build_ours(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, cfg.context_length), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, cfg.context_length), generator=g)
    step = make_step(model, opt, x, y, False, precision == "bf16")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def train_step_times(name, B, precision, warmup, steps, data, out) -> list[float]:
    """Seconds per step as train.py logs them (ms_per_step, log every step), after `warmup` steps."""
    argv = ["--data", str(data), "--val-data", str(data), "--preset", name, "--batch-size", str(B),
            "--max-iters", str(warmup + steps), "--warmup-iters", "0", "--log-interval", "1",
            "--eval-interval", str(10**9), "--eval-iters", "1", "--ckpt-interval", str(10**9), "--dtype", precision,
            "--device", "cpu", "--peak-flops", "0", "--out", str(out), "--overwrite"]
    args, _ = resolve_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(args)
    rows = [r for r in read_log(out / "log.jsonl") if "ms_per_step" in r]
    return [r["ms_per_step"] / 1000 for r in rows[warmup:]]


def eval_batch_seconds(cfg, B, precision, data) -> float:
    """One validation batch of train.evaluate (forward only), the median of 3."""
    torch.manual_seed(0)
    model, _ = build_ours(cfg)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    starts = np.arange(B) * cfg.context_length
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        train.evaluate(model, data, starts, B, cfg.context_length, torch.device("cpu"), autocast, fast=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = OneLineParser(description="train.py loop throughput vs the bare model step (CPU)")
    p.add_argument("--configs", nargs="+", choices=sorted(BATCH), default=["tiny", "ts17m"])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3, help="alternations of bare steps and a train.py run")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side per round")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, fp32, 1 round of 2 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.configs, a.precisions, a.rounds, a.steps, a.warmup = ["tiny"], ["fp32"], 1, 2, 1
    load_before = os.getloadavg()[0]
    peak = {prec: matmul_peak(DTYPES[prec], 0.5) for prec in a.precisions}  # bench_model's denominator
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.configs:
            cfg, B = PRESETS[name], BATCH[name]
            # random ids, enough for every window; uint16 as lib/datasets.encode_file writes them
            data_path = tmp / f"{name}.npy"
            np.save(data_path, np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000, dtype=np.uint16))
            data = np.load(data_path, mmap_mode="r")
            for prec in a.precisions:
                bare, loop = [], []
                for _ in range(a.rounds):
                    bare += bare_step_times(cfg, B, prec, a.warmup, a.steps)
                    loop += train_step_times(name, B, prec, a.warmup, a.steps, data_path, tmp / "run")
                t_bare, t_loop = statistics.median(bare), statistics.median(loop)
                t_eval = eval_batch_seconds(cfg, B, prec, data)
                tok = B * cfg.context_length
                rows.append(dict(name=name, B=B, T=cfg.context_length, prec=prec, bare=tok / t_bare, loop=tok / t_loop,
                                 mfu=tok / t_loop * train_flops_per_token(cfg) / peak[prec],
                                 eval_pct=100 * 20 * t_eval / (500 * t_loop)))
                print(f"done: {name} {prec}", file=sys.stderr)
    load_after = os.getloadavg()[0]

    command = "python bench/bench_train.py" + ("" if not (argv or sys.argv[1:]) else
                                               " " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n## train.py\n")
    print("Training throughput of the loop itself (`train.train`, what `python train.py --data ...` runs: memmap")
    print("batches, lr schedule, clipping, NaN/loss bookkeeping, logging) vs bench_model.py's bare step on a fixed")
    print(f"batch, alternated in one process; medians over {a.rounds} x {a.steps} steps after warm-up. MFU =")
    print("accounting.train_flops_per_token x tokens/s / the measured torch.mm peak. Evaluation is amortised")
    print("separately at the defaults (20 validation batches every 500 steps).\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {machine_line()}; {tuning_line()}; load average {load_before:.2f} before, "
          f"{load_after:.2f} after\n")
    print("| preset | batch x context | precision | bare step tokens/s | train.py tokens/s | loop overhead "
          "| train.py MFU | + eval at defaults |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['B']} x {r['T']} | {r['prec']} | {r['bare']:,.0f} | {r['loop']:,.0f} "
              f"| {100 * (1 - r['loop'] / r['bare']):+.1f}% | {100 * r['mfu']:.0f}% | +{r['eval_pct']:.1f}% |")
    print("\nTarget: loop overhead <= 3% (a negative overhead is noise: the loop cannot be faster than its step).")
    print("The offline demo end to end: `time python train.py` (BPE, encode, 300 steps of a 1M-parameter model, "
          "sample).")


if __name__ == "__main__":
    tune_process()  # first: time the step under the settings `python train.py` runs with
    main()
