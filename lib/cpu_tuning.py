"""lib/cpu_tuning.py: the process-wide CPU settings `python train.py` (and sample.py, and the benchmarks) run under.

Two settings, both set once, first thing in the process: subnormal floats flushed to zero in every thread, and
glibc's malloc told to keep the memory a training step frees for the next one. Neither changes what is computed
beyond a subnormal's last bits; both only remove a slowdown (BENCHMARKS.md has the figures). A lower-floor module:
it imports no chapter, so train.py and sample.py call it first thing under `if __name__ == "__main__":`.
"""
import ctypes
import sys

import torch


def flush_subnormals() -> bool:
    """Make every CPU thread flush subnormal floats (|x| < 1.2e-38 in fp32) to zero; returns whether the CPU can.

    x86 computes on subnormals in microcode, far slower than on normal floats (bench/bench_subnormal.py: a multiply
    16x and a fused AdamW step 20x slower on subnormal inputs). A run that drives some of its state toward zero (an
    lr of 0.64 on the --cpu experiments' model) slowed from ~220 to 1,240 ms/step between steps 250 and 324 without
    this, and stayed at 190 ms/step for all 733 steps with it (BENCHMARKS.md). Flushing changes numbers below any
    loss's resolution: a baseline run's losses move by ~1e-7.

    torch.set_flush_denormal sets the calling thread's FTZ/DAZ bits, and a thread created later copies them from its
    creator. So this must run before torch's OpenMP thread pool starts (the first parallel op): called after, it
    flushes only in the main thread, i.e. half of a 2-thread op's results. That is why it sits first in __main__."""
    return torch.set_flush_denormal(True)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a training step frees for the next step; returns whether it could.

    A CPU step allocates and frees the same large tensors every step (activations, gradients, the loss's chunks).
    glibc hands an allocation above its mmap threshold (128 KiB, raised as it goes to at most 32 MiB) fresh pages
    from the kernel and gives them back on free, and it trims the free top of its heap; either way the next step
    writes to new pages, and the first write to each 4 KiB page is a page fault (several microseconds on a VM).
    With a 1 GiB threshold and no trimming the heap keeps what was freed and, after a few steps of growing, the
    next step reuses it: `python train.py --preset ts17m` on 2 cores (a Xeon VM) 865-890 ms/step in fp32 against
    1,010-1,037 without, 437-446 against 474-495 in bf16 (BENCHMARKS.md). The cost: the process keeps its peak
    heap until it exits, a peak a training run reaches every step anyway. Off glibc (macOS, Windows, musl) it does
    nothing."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the interpreter itself runs on
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>; mallopt returns 1 on success
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


PROCESS_TUNING: dict = {}  # what tune_process set in this process: {setting: whether it took effect}


def tune_process() -> dict:
    """The process-wide CPU settings `python train.py` runs under (the benchmarks call this too, so that they time
    what train.py runs): {setting: whether it took effect}. First thing in a process: see flush_subnormals."""
    PROCESS_TUNING.update(flush_subnormals=flush_subnormals(), keep_freed_memory=keep_freed_memory())
    return dict(PROCESS_TUNING)


def tuning_line() -> str:
    """For benchmark reports: which of tune_process's settings this process runs under."""
    on = [name for name, took in PROCESS_TUNING.items() if took]
    if not PROCESS_TUNING:
        return "process untuned"
    return f"lib.cpu_tuning.tune_process(): {', '.join(on) or 'nothing took effect'}"
