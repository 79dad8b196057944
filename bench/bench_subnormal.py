"""Benchmark: what subnormal floats cost on this CPU, and whether lib.cpu_tuning.flush_subnormals() removes the cost.

A float32 below 1.18e-38 in magnitude is subnormal. x86 cores compute on subnormals in microcode, many times slower
than on normal floats, unless the thread's FTZ/DAZ bits (flush-to-zero, denormals-are-zero) are set. A training run
whose optimizer state or weights decay toward zero can end up with millions of them, and every step slows down.

Each mode runs in a fresh Python process (the FTZ/DAZ bits are per thread and cannot be unset by the pool's threads):
    off          torch's defaults (IEEE subnormals)
    late         torch.set_flush_denormal(True) after torch's OpenMP pool has started (after a first parallel op):
                 only the calling thread flushes, the pool's other threads do not
    first        lib.cpu_tuning.flush_subnormals() before any torch op, as `python train.py` does: every thread flushes
and times two things on subnormal inputs against the same work on normal ones:
    multiply     x * 1.0 over 4,194,304 floats (one elementwise pass, split across the threads)
    AdamW step   optim.AdamW(fused=True) on 1,315,968 parameters (the --cpu experiments' model size) whose
                 gradients are 1e-20 (their squares, Adam's second moment, are subnormal) vs 1e-3
"unflushed" counts the multiply's results that are still nonzero: 0 when every thread flushes. (Counted on the bit
patterns: under DAZ a float compare reads a subnormal as 0. The inputs are made by numpy before any flushing,
since converting 1e-39 to float32 under FTZ would already give 0.)

    python bench/bench_subnormal.py      # ~20 s
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_FLOATS = 4 * 1024 * 1024
N_PARAMS = 1_315_968
REPEATS = 15
MODES = ("off", "late", "first")


def timed(fn) -> float:
    """Median seconds of fn() over REPEATS calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(mode: str) -> dict:
    """One mode's timings, in this (fresh) process."""
    import numpy as np
    subnormal = np.full(N_FLOATS, 1e-39, dtype=np.float32)  # made before any flushing (see the header)
    normal = np.full(N_FLOATS, 1e-3, dtype=np.float32)
    sys.path.insert(0, str(ROOT))
    import torch
    import optim
    from lib import cpu_tuning
    if mode == "first":
        cpu_tuning.flush_subnormals()
    x_sub, x_norm = torch.from_numpy(subnormal), torch.from_numpy(normal)
    _ = x_norm * 1.0  # starts the OpenMP pool
    if mode == "late":
        torch.set_flush_denormal(True)
    result = {"mode": mode, "threads": torch.get_num_threads(),
              "unflushed": int(((x_sub * 1.0).view(torch.int32) != 0).sum())}
    result["multiply normal ms"] = 1e3 * timed(lambda: x_norm * 1.0)
    result["multiply subnormal ms"] = 1e3 * timed(lambda: x_sub * 1.0)
    for name, g in (("normal", 1e-3), ("subnormal", 1e-20)):
        p = torch.nn.Parameter(torch.full((N_PARAMS,), 0.02))
        p.grad = torch.full_like(p, g)
        opt = optim.AdamW([p], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
        result[f"AdamW {name} ms"] = 1e3 * timed(opt.step)
    return result


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--mode":
        print(json.dumps(measure(sys.argv[2])))
        return
    sys.path.insert(0, str(ROOT))
    from lib.measure import machine_line
    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout))
    print("Command: `python bench/bench_subnormal.py`  ")
    print(f"Machine: {machine_line()}; {rows[0]['threads']} threads; medians of {REPEATS}\n")
    print("| mode | multiply, normal ms | multiply, subnormal ms | slowdown | AdamW, normal ms | AdamW, subnormal ms "
          "| slowdown | unflushed results |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mul = r["multiply subnormal ms"] / r["multiply normal ms"]
        adam = r["AdamW subnormal ms"] / r["AdamW normal ms"]
        print(f"| {r['mode']} | {r['multiply normal ms']:.2f} | {r['multiply subnormal ms']:.2f} | {mul:.1f}x | "
              f"{r['AdamW normal ms']:.2f} | {r['AdamW subnormal ms']:.2f} | {adam:.1f}x | "
              f"{r['unflushed']:,} of {N_FLOATS:,} |")


if __name__ == "__main__":
    main()
